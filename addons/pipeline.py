"""The gateway as mitmproxy addons.

One addon per pipeline stage (identity -> route -> policy -> rate limit -> audit -> inject),
then ``LastGate``: each is a separate top-level addon, so an exception in one stage (which
mitmproxy only logs) cannot skip the gate. A stage does nothing unless every stage before it
completed; the gate kills every flow that does not carry a complete, sealed allow verdict.

The way back is in :mod:`addons.response`, what every addon shares (the :class:`Runtime`, the
flow's state) in :mod:`addons.runtime`, the log scrubber in :mod:`addons.logscrub`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any

from mitmproxy import connection, http, tcp, udp
from mitmproxy.net.http import url

from addons import errorpage
from addons.logscrub import LOG_SCRUBBER
from addons.response import ResponseFilter
from addons.runtime import (
    OURS,
    STATE,
    Runtime,
    header_pairs,
    pending_state,
    settled,
    state_of,
)
from aiid_proxy.audit.writers import log_unwritten
from aiid_proxy.bodies import too_large
from aiid_proxy.control import Answer
from aiid_proxy.errors import AiidError, AuditError, RequestRefused, VaultError
from aiid_proxy.gateway import (
    FlowState,
    Gateway,
    Target,
    is_ip_literal,
    refusal_body,
    request_digest,
    token_from_value,
)
from aiid_proxy.policy import Decision
from aiid_proxy.providers import (
    ACCOUNT_HEADERS,
    CREDENTIAL_HEADERS,
    CREDENTIAL_QUERY_PARAMS,
)

log = logging.getLogger("aiid")


def answer_refusal(flow: http.HTTPFlow, st: FlowState, r: RequestRefused) -> None:
    """Answer the flow with the contract's JSON refusal, marked as ours (the gate lets only
    our own answer stand in for the provider's)."""
    resp = http.Response.make(
        r.status,
        refusal_body(r, st.request_id),
        {"content-type": "application/json", **errorpage.id_headers(st.request_id), **r.headers},
    )
    flow.response = resp
    flow.metadata[OURS] = resp


async def refuse(rt: Runtime, flow: http.HTTPFlow, st: FlowState, r: RequestRefused) -> None:
    answer_refusal(flow, st, r)
    fut = rt.gw().record_refusal(st, r)
    if fut is not None:
        try:
            await settled(fut)
        except AiidError:
            log.exception("deny record not written")


class ConnectGuard:
    """CONNECT: refuse raw IP targets; remember the connection's Proxy-Authorization."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.conn_tokens: dict[str, str] = {}

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        st = self.rt.gw().new_flow(
            Target("https", flow.request.host, flow.request.port, "CONNECT", "")
        )
        flow.metadata[STATE] = st
        if is_ip_literal(flow.request.host):
            # an agent identified by its CONNECT credentials: the refusal goes to its tenant's
            # audit log (an attempt to reach a raw IP is that tenant's business)
            value = flow.request.headers.get("proxy-authorization")
            if value is not None:
                with contextlib.suppress(AiidError):
                    token = token_from_value("proxy-authorization", value)
                    st.identity = self.rt.gw().verifier.verify(token)
            await refuse(
                self.rt,
                flow,
                st,
                RequestRefused(
                    403,
                    "policy_denied",
                    "raw IP addresses are not allowed; use a host name",
                    "default",
                ),
            )
            return
        value = flow.request.headers.get("proxy-authorization")
        if value is not None:
            try:
                token = token_from_value("proxy-authorization", value)
            except RequestRefused:
                token = ""  # malformed: every request on this connection is refused
            self.conn_tokens[flow.client_conn.id] = token
        # mitmproxy's own "200 Connection established" carries no header at all; ours names
        # the tunnel's id, as every response to an agent carries one (connection_strategy is
        # pinned lazy, so a response set here skips no upstream connect)
        now = time.time()
        flow.response = http.Response(
            flow.request.data.http_version,
            200,
            b"Connection established",
            http.Headers([(b"x-aiid-request-id", st.request_id.encode())]),
            b"",
            None,
            now,
            now,
        )

    def client_disconnected(self, client: connection.Client) -> None:
        self.conn_tokens.pop(client.id, None)
        # a request held for approval whose agent hung up: nobody waits for the answer
        for tenant, rid in self.rt.holds.pop(client.id, ()):
            with contextlib.suppress(AiidError):  # answered meanwhile
                self.rt.broker.answer(
                    tenant, rid, Answer(False, "agent", "the agent hung up while it was held")
                )

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        flow.kill()

    def udp_start(self, flow: udp.UDPFlow) -> None:
        flow.kill()

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None and flow.killable:
            flow.kill()


class Intake:
    """requestheaders: record what the agent asked for, before any rewriting option runs."""

    def __init__(self, rt: Runtime, guard: ConnectGuard) -> None:
        self.rt = rt
        self.guard = guard

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.request.stream = False  # the body must be complete before anything is decided
        req = flow.request
        # Where mitmproxy will connect: the CONNECT target in a tunnel, else the host of an
        # absolute-form request line ("POST https://evil/... Host: api.openai.com" must not
        # pass as api.openai.com). Route refuses it unless it equals the Host header.
        connect_host = req.host or None
        if flow.client_conn.tls and flow.server_conn.address is not None:
            connect_host = str(flow.server_conn.address[0])
        path, _, query = req.path.partition("?")
        # A port in the Host header (or :authority) is where the agent says it is going, and
        # what the URL (map_remote, upstream) is built from: it must pass the port check too.
        port = req.port
        if req.host_header:
            _, stated = url.parse_authority(req.host_header, check=False)
            port = stated if stated is not None else port
        st = self.rt.gw().new_flow(
            Target(
                scheme=req.scheme,
                host=req.pretty_host,
                port=port,
                method=wire_method(req),
                path=path,
                query=query,
                connect_host=connect_host,
                sni=flow.client_conn.sni,
                stated_hosts=tuple(
                    host_and_port(a)
                    for a in (
                        *([req.authority] if req.authority else []),
                        *req.headers.get_all("host"),
                    )
                ),
            ),
            self.guard.conn_tokens.get(flow.client_conn.id),
        )
        flow.metadata[STATE] = st
        errorpage.remember(req, st.request_id)  # for mitmproxy's own error answers
        declared = req.headers.get("content-length", "")
        gw = self.rt.gw()
        if declared.isdigit() and int(declared) > gw.body_limit:
            # refuse before reading the body; identify first so the deny lands in the tenant
            try:
                gw.identify(st, header_pairs(flow))
                refusal = too_large(gw.body_limit)
            except RequestRefused as r:
                refusal = r
            refuse_now(self.rt, flow, st, refusal)


def host_and_port(authority: str) -> tuple[str, int]:
    """An authority as mitmproxy parses it: (lowercase host without a trailing dot, port or
    443); ("", 0), which names no host, when it does not parse."""
    try:
        host, port = url.parse_authority(authority, check=True)
    except ValueError:
        return "", 0
    return host.lower().rstrip("."), 443 if port is None else port


def wire_method(req: http.Request) -> str:
    """The method as it goes upstream: ``Request.method`` upper-cases what the agent sent."""
    return req.data.method.decode("utf-8", "surrogateescape")


def sealed_parts(
    req: http.Request,
) -> tuple[str, str, bytes, tuple[tuple[bytes, bytes], ...], str]:
    """What the verdict is sealed to, read the same way by the seal and by the last gate:
    method (as sent), URL, body, header fields, and the request target's authority."""
    return wire_method(req), req.url, req.raw_content or b"", req.headers.fields, req.authority


def refuse_now(rt: Runtime, flow: http.HTTPFlow, st: FlowState, r: RequestRefused) -> None:
    """Synchronous refusal for hooks before the agent is known (nothing to await)."""
    answer_refusal(flow, st, r)
    rt.gw().record_refusal(st, r)


class _Stage:
    """A pipeline stage: acts only on a pending flow; a refusal becomes the contract's JSON.
    ``run`` may be a coroutine (it is awaited: no later stage runs meanwhile)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def request(self, flow: http.HTTPFlow) -> None:
        st = pending_state(flow)
        if st is None:
            return
        try:
            done = self.run(self.rt.gw(), st, flow)
            if done is not None:
                await done
        except RequestRefused as r:
            await refuse(self.rt, flow, st, r)

    def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> Awaitable[None] | None:
        raise NotImplementedError


class IdentityStage(_Stage):
    def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> None:
        gw.identify(st, header_pairs(flow))


class RouteStage(_Stage):
    def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> None:
        gw.route(st, lowercase_headers(flow.request.headers), flow.request.raw_content or b"")


def lowercase_headers(headers: http.Headers) -> dict[str, str]:
    """The headers as one lowercase-keyed dict, values joined as ``Headers.get`` joins them
    (one pass, where each ``Headers.get`` scans every field)."""
    out: dict[str, str] = {}
    for k, v in headers.fields:
        name = k.decode("utf-8", "surrogateescape").lower()
        value = v.decode("utf-8", "surrogateescape")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


class PolicyStage(_Stage):
    """Decide; an `approve` decision holds the flow here until a human answers or time runs
    out (the hook awaits, so no later stage runs and nothing leaves meanwhile)."""

    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            await super().request(flow)
        finally:  # a held flow is answered (its refusal set, or let on): shutdown may go on
            st = flow.metadata.get(STATE)
            if st is not None:
                self.rt.answering.discard(st.request_id)

    async def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> None:
        d = gw.decide(st)
        if d.effect == "approve":
            try:
                await self._hold(gw, st, d, flow.client_conn.id)
            except AuditError as e:  # no record of the human's answer: killed, on record
                _unrecorded(flow, gw, st, e, "approval record not written")

    async def _hold(self, gw: Gateway, st: FlowState, d: Decision, client: str = "") -> None:
        assert st.identity is not None
        key: tuple[str, ...] = (
            st.identity.tenant,
            st.identity.agent,
            st.provider_name or st.target.host,
            st.model or "",
            d.rule_id,
        )
        if st.provider_name is None:  # egress: a grant covers the same method and path only
            key += (st.target.method, st.target.path)
        broker = self.rt.broker
        by = broker.granted(key)
        if by is not None:
            st.approved_by = by
            st.standing_approval = True
            return
        gw.refuse_unpriced(st)  # refused anyway after the wait: never ask a human
        timeout = float(d.approval_timeout)
        pending = broker.hold(st.identity.tenant, st.request_id, key, timeout)
        self.rt.answering.add(st.request_id)
        hold_key = (st.identity.tenant, st.request_id)
        self.rt.holds.setdefault(client, set()).add(hold_key)
        try:  # from here on the hold is released whatever happens (a hold record refused)
            held = gw.record_hold(st, timeout)  # not awaited: the hold itself needs no fsync
            if held is not None:
                held.add_done_callback(log_unwritten)
            gw.emit("pending", {"state": st, "deadline": pending.deadline})  # the gateway's clock
            log.info(
                "request %s held for approval (rule %s, %ss): aiid approve %s %s",
                st.request_id,
                d.rule_id,
                int(timeout),
                st.identity.tenant,
                st.request_id,
            )
            try:
                ans = await asyncio.wait_for(asyncio.shield(pending.future), timeout)
            except TimeoutError:
                ans = Answer(False, "timeout", f"no answer within {int(timeout)} s")
        finally:
            broker.release(st.request_id)
            mine = self.rt.holds.get(client)
            if mine is not None:
                mine.discard(hold_key)
                if not mine:
                    del self.rt.holds[client]
        verdict = "approved" if ans.approved else "denied"
        text = f"{verdict} by {ans.by}" + (f": {ans.reason}" if ans.reason else "")
        fut = gw.record_approval(st, ans.approved, ans.by, text)
        if fut is not None:
            await settled(fut)  # AuditError: no record of the human's answer (run kills)
        if not ans.approved:
            raise RequestRefused(403, "policy_denied", f"approval {text}", d.rule_id)
        gw.recheck_held(st)  # revoked, expired or denied by an edit meanwhile: refused now
        st.approved_by = ans.by


class RateLimitStage(_Stage):
    def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> None:
        gw.reserve(st)


AUDIT_PENDING = "aiid_request_record"


class AuditStage(_Stage):
    """Queues the ``request`` record. :class:`InjectStage` does its work while the record
    commits, then waits for it: nothing is sealed (so nothing leaves) before it is durable."""

    def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> None:
        try:
            flow.metadata[AUDIT_PENDING] = gw.audit_request(st)
        except AuditError as e:  # the log is closed or unusable: refused at once
            _unrecorded(flow, gw, st, e)


def _unrecorded(
    flow: http.HTTPFlow,
    gw: Gateway,
    st: FlowState,
    e: AuditError,
    what: str = "request record not written",
) -> None:
    # No durable `request` record (disk full, I/O error...): nothing may leave. Kill the flow
    # here with one clear line, not an addon traceback further down.
    if flow.killable:
        flow.kill()
    gw.record_error(st, f"{what}: {e.one_line()}")


async def request_record_durable(flow: http.HTTPFlow, gw: Gateway, st: FlowState) -> bool:
    """Wait for the flow's queued ``request`` record; False (flow killed, error recorded)
    when it could not be made durable: nothing may leave then."""
    fut = flow.metadata.pop(AUDIT_PENDING, None)
    if fut is None:
        return False  # never queued: the seal refuses, LastGate kills
    try:
        result = await settled(fut)
    except AuditError as e:
        _unrecorded(flow, gw, st, e)
        return False
    gw.audit_done(st, result)
    return True


# Request headers InjectStage removes before adding its own: every credential header, those
# that pick the key's billed account, the hop-by-hop proxy header, and the framing/encoding it
# re-states (the body is sent decoded).
_STRIPPED = frozenset(
    n.encode()
    for n in (
        *CREDENTIAL_HEADERS,
        *ACCOUNT_HEADERS,
        "proxy-connection",
        "content-encoding",
        "transfer-encoding",
        "content-length",
    )
)


def _hbytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")  # as mitmproxy encodes header values


class InjectStage(_Stage):
    """Strip every credential the agent sent, inject the vault key, seal the verdict."""

    async def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> None:
        try:
            inj = gw.inject(st)  # a refusal (no key in the vault) is answered by _Stage
        except VaultError as e:  # a key that cannot be decrypted: killed, on record
            if flow.killable:
                flow.kill()
            gw.record_error(st, e.one_line())
            return
        req = flow.request
        # a key in the query string is never an identity and never leaves (any spelling);
        # no "?" in the path: no query to parse
        mark = st.token_mark
        if "?" in req.path:
            for qname in {
                k
                for k, v in req.query.items(multi=True)
                if k.lower() in CREDENTIAL_QUERY_PARAMS or (mark and mark in v)
            }:
                del req.query[qname]
        assert st.route is not None
        fields = req.headers.fields
        names = {k.lower() for k, _ in fields}
        if b"content-encoding" in names:
            req.raw_content = st.route.body  # decoded by Route: sent as read, unencoded
        # Exact framing upstream: mitmproxy forwards an HTTP/2 request that has no
        # content-length to an HTTP/1.1 server unframed, and the server then reads the body as
        # a second request that no stage ever saw (smuggling). The body is complete here.
        body = req.raw_content or b""
        ours: list[tuple[bytes, bytes]] = []
        if st.route.facts is not None and st.route.facts.stream:
            ours.append((b"accept-encoding", b"identity"))  # so the stream can be scrubbed
        # Our id for this request (replacing any the agent sent): the audit record's key.
        ours.append((b"x-aiid-request-id", st.request_id.encode()))
        for hname, hvalue in inj.extra_headers:  # provider data, e.g. an API version header
            ours.append((_hbytes(hname), _hbytes(hvalue)))
        if inj.header:  # an egress rule without `inject` sends no credential at all
            ours.append((_hbytes(inj.header), _hbytes(inj.value.reveal())))
        if body or b"content-length" in names:
            ours.append((b"content-length", str(len(body)).encode()))
        # One pass: every credential the agent sent, its framing and encoding headers, and
        # whatever we set are dropped; then ours are appended.
        drop = _STRIPPED | {k.lower() for k, _ in ours}
        bmark = mark.encode()
        req.headers.fields = (
            *(
                f
                for f in fields
                # the agent's token in any other field (a cookie, x-auth-token): dropped too
                if f[0].lower() not in drop and not (bmark and bmark in f[1])
            ),
            *ours,
        )
        LOG_SCRUBBER.add(inj.scrub_value())
        req.trailers = None  # trailers are sent after the request hook: never forward them
        # The digest of the request as it is now, taken while its record commits; LastGate
        # takes it again from the request as it leaves, and both must agree.
        digest = request_digest(*sealed_parts(req))
        if await request_record_durable(flow, gw, st):
            gw.seal_digest(st, digest)


class LastGate:
    """The only way out: a flow leaves iff it carries a complete, sealed allow verdict."""

    aiid_always = True  # run even after another addon raised AddonHalt (addons/dispatch.py)

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def request(self, flow: http.HTTPFlow) -> None:
        ok = False
        try:
            ok = self._passes(flow)
        finally:
            if not ok:
                self._kill(flow, "no complete allow verdict")

    def _passes(self, flow: http.HTTPFlow) -> bool:
        st = state_of(flow)
        if st is None:
            return False
        if flow.response is not None:
            # only our own refusal may answer instead of the provider
            return st.refusal is not None and flow.metadata.get(OURS) is flow.response
        req = flow.request
        return (
            flow.live
            and flow.error is None
            and not req.stream
            and req.scheme == "https"
            and not req.trailers
            and self.rt.gw().check_sealed(st, *sealed_parts(req))
        )

    def _kill(self, flow: http.HTTPFlow, reason: str) -> None:
        if flow.killable:
            flow.kill()
        flow.response = None
        st = state_of(flow)
        if st is not None and self.rt.gateway is not None:
            self.rt.gateway.record_error(st, reason)
        else:
            log.warning("flow killed without state: %s", reason)


def make_addons(rt: Runtime | None = None) -> list[Any]:
    """Every addon, in pipeline order. Add them as separate top-level addons."""
    rt = rt or Runtime()
    guard = ConnectGuard(rt)
    errorpage.install()
    errorpage.set_scrubber(LOG_SCRUBBER.scrub)
    return [
        rt,
        guard,
        Intake(rt, guard),
        IdentityStage(rt),
        RouteStage(rt),
        PolicyStage(rt),
        RateLimitStage(rt),
        AuditStage(rt),
        InjectStage(rt),
        LastGate(rt),
        ResponseFilter(rt),
    ]
