"""The gateway as mitmproxy addons.

One addon per pipeline stage (identity -> route -> policy -> rate limit -> audit -> inject),
then ``LastGate``: each is a separate top-level addon, so an exception in one stage (which
mitmproxy only logs) cannot skip the gate. A stage does nothing unless every stage before it
completed; the gate kills every flow that does not carry a complete, sealed allow verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mitmproxy import connection, ctx, exceptions, http, tcp, udp
from mitmproxy.net.http import url
from mitmproxy.utils import human

from addons import errorpage
from aiid_proxy.audit.writers import WRITER_MODES
from aiid_proxy.bodies import DEFAULT_BODY_LIMIT, too_large
from aiid_proxy.control import Answer, ApprovalBroker, ControlServer
from aiid_proxy.errors import AiidError, AuditError, RequestRefused
from aiid_proxy.gateway import (
    RECORDED_BYTES,
    FlowState,
    Gateway,
    Target,
    is_ip_literal,
    ratelimit_headers,
    refusal_body,
    token_from_value,
)
from aiid_proxy.home import Home
from aiid_proxy.policy import Decision
from aiid_proxy.providers import (
    CREDENTIAL_HEADERS,
    CREDENTIAL_QUERY_PARAMS,
    SSEUsageTracker,
    Usage,
    estimate_body_usage,
    parse_usage,
)
from aiid_proxy.scrub import Fragments, Scrubber, escaped_anywhere, redact_escaped
from aiid_proxy.streaming import StreamGuard, spelled_in_array

log = logging.getLogger("aiid")


# Credentials an agent may send, whatever the gateway makes of them: an agent token (a JWT),
# the value after Bearer/Basic (also on a header line mitmproxy could not parse, which it logs
# verbatim: "Invalid header line: b'Authorization Bearer eyJ...'"), a provider-style key.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")
_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+|%20|\+)[A-Za-z0-9._~+/=%-]{8,}")
_KEYLIKE = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}")


def redact_credentials(text: str) -> str:
    """``text`` with every agent-credential-shaped string replaced by ``[REDACTED]``."""
    if "eyJ" in text:
        text = _JWT.sub("[REDACTED]", text)
    if "sk-" in text:
        text = _KEYLIKE.sub("[REDACTED]", text)
    return _SCHEME.sub(lambda m: f"{m.group(1)} [REDACTED]", text)


class LogScrubber:
    """Every log record of this process is scrubbed of every secret the gateway injected, and
    of anything shaped like an agent's credential (:func:`redact_credentials`): mitmproxy logs
    raw upstream bytes ("Unexpected data from server: b'...'") and its errors quote upstream
    status lines and unparsable request lines. Installed (as the log record factory) when the
    gateway loads."""

    def __init__(self) -> None:
        self.secrets: frozenset[str] = frozenset()  # replaced, never mutated: other threads log
        self.fragments = Fragments(())  # pieces of them (12+ characters): replaced likewise
        self.scrubber = Scrubber(())
        self._base: Callable[..., logging.LogRecord] | None = None

    def install(self) -> None:
        if self._base is None:
            self._base = logging.getLogRecordFactory()
            logging.setLogRecordFactory(self._record)

    def add(self, secret: str) -> None:
        if secret and secret not in self.secrets:
            self.fragments = Fragments((*self.secrets, secret))  # built once per new secret
            # also as a bytes repr quotes a JSON-escaped echo ("\\/" for "/"), and its first 8
            # characters: mitmproxy quotes undecodable upstream bodies cut short ("LookupError
            # when decoding b'sk-CANAR with 'bogus'")
            more = {secret, secret.replace("/", "\\\\/")}
            if len(secret) >= 16:
                more.add(secret[:8])
            secrets = self.secrets | more
            self.scrubber = Scrubber(secrets)  # built once per new secret, not per log line
            self.secrets = secrets
        self.install()

    def scrub(self, text: str) -> str:
        """``text`` without any secret injected so far (or a piece of one), or anything
        credential-shaped."""
        return redact_credentials(self.fragments.redact(self.scrubber.scrub_text(text)))

    def _record(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        assert self._base is not None
        rec = self._base(*args, **kwargs)
        try:
            scrubber = self.scrubber
            try:
                msg = rec.getMessage()
            except Exception:
                msg = str(rec.msg)
            pieces = self.fragments
            clean = redact_credentials(pieces.redact(scrubber.scrub_text(msg)))
            if clean != msg:
                rec.msg, rec.args = clean, ()
            if rec.exc_info and rec.exc_info[1] is not None:
                text = "".join(traceback.format_exception(*rec.exc_info)).rstrip("\n")
                tb = redact_credentials(pieces.redact(scrubber.scrub_text(text)))
                if tb != text:
                    # into the message, exc_info gone: mitmproxy's formatter formats exc_info
                    # itself (it ignores exc_text), so nothing else would keep it out
                    rec.msg, rec.args = f"{clean}\n{tb}", ()
                    rec.exc_info, rec.exc_text = None, None
        except Exception:  # never break the caller's logging; never log unscrubbed text
            rec.msg, rec.args, rec.exc_info, rec.exc_text = "(log line withheld)", (), None, None
        return rec


LOG_SCRUBBER = LogScrubber()

STATE = "aiid"  # flow.metadata key holding the FlowState
SHUTDOWN_TICKS = 100  # x 10 ms: how long shutdown waits for held requests to be refused
OURS = "aiid_refusal"  # flow.metadata key holding the refusal Response object we made

# Options that would let traffic bypass the pipeline or weaken TLS, and the value we pin.
PINNED: dict[str, Any] = {
    "connection_strategy": "lazy",
    "ssl_insecure": False,
    "ignore_hosts": [],
    "allow_hosts": [],
    "tcp_hosts": [],
    "rawtcp": False,
    "websocket": False,
    "http3": False,
    "stream_large_bodies": None,
    "validate_inbound_headers": True,
    "onboarding": False,
    "save_stream_file": None,  # would write injected keys to disk
    "hardump": "",
}
TLS_OK = ("TLS1_2", "TLS1_3")


class Runtime:
    """Owns the library Gateway; reads options once in ``configure``."""

    def __init__(self, gateway: Gateway | None = None) -> None:
        self.gateway = gateway
        self.on_gateway: list[Callable[[Gateway], None]] = []
        self._key: tuple[str, str, int, str] | None = None
        self._checked = False  # the audit chains were verified at start
        self._rollback = False  # a build was just refused: its rollback builds nothing
        self._skip: tuple[str, str, int, str] | None = None  # the options that rollback restored
        self.broker = ApprovalBroker()
        self.control: ControlServer | None = None
        self.holds: dict[str, set[tuple[str, str]]] = {}  # client id -> (tenant, request id)

    async def running(self) -> None:
        if self.gateway is None:
            return
        self.gateway.attach(asyncio.get_running_loop())
        if self.control is None:
            self.control = ControlServer(self.gateway.home, self._answer)
            try:
                await self.control.start()
            except OSError as e:
                log.warning("approval control channel unavailable: %s", e)
                self.control = None
        if self._key is not None and not self._checked:  # built here: `aiid run`, not a test
            self._checked = True
            # the channel is ours: no other gateway runs on this home, so a request an
            # earlier run left without an end is unfinished for good
            self.gateway.check_chains(close_unfinished=self.control is not None)

    def _answer(self, msg: dict[str, Any]) -> str:
        answer = msg.get("answer")
        if answer not in ("approve", "deny"):
            raise AiidError("answer must be approve or deny")
        ttl = msg.get("ttl")
        return self.broker.answer(
            str(msg.get("tenant")),
            str(msg.get("request_id")),
            Answer(
                approved=answer == "approve",
                by=str(msg.get("by") or "unknown")[:100],
                reason=str(msg.get("reason") or "")[:300],
                ttl=float(ttl) if isinstance(ttl, (int, float)) else None,
            ),
        )

    def load(self, loader: Any) -> None:
        LOG_SCRUBBER.install()  # before the first request: agents' lines can be logged
        loader.add_option(
            "aiid_home", str, "", "aiid home directory (default $AIID_HOME or ./.aiid)"
        )
        loader.add_option(
            "aiid_policies", str, "", "policy directory (default $AIID_POLICIES or ./policies)"
        )
        loader.add_option(
            "aiid_body_limit", int, DEFAULT_BODY_LIMIT, "largest request body accepted, bytes"
        )
        loader.add_option(
            "aiid_audit_writer",
            str,
            "process",
            "where the tenants' audit logs are written: 'process' (a child process, no GIL "
            "shared with the proxy) or 'thread' (a writer thread per tenant in this process)",
            choices=sorted(WRITER_MODES),
        )

    def configure(self, updated: set[str]) -> None:
        # Every check first, then the gateway, and only then option updates of our own: an
        # update re-enters configure, and a refusal after one made mitmproxy's rollback
        # re-enter it again and again (~15 s and a RecursionError before a start failed).
        opts = ctx.options
        pin: dict[str, Any] = {}
        for name, want in PINNED.items():
            if name not in updated or not hasattr(opts, name) or getattr(opts, name) == want:
                continue
            if opts.has_changed(name):
                raise exceptions.OptionsError(
                    f"aiid-proxy requires {name}={want!r}: other values let traffic bypass checks"
                )
            pin[name] = want  # a mitmproxy default (e.g. under mitmdump -s): pin it
        for name in ("tls_version_client_min", "tls_version_server_min"):
            if name in updated and getattr(opts, name) not in TLS_OK:
                raise exceptions.OptionsError(f"aiid-proxy requires {name} of TLS1_2 or higher")
        if hasattr(opts, "flow_detail") and opts.flow_detail > 1:
            raise exceptions.OptionsError(
                "aiid-proxy requires flow_detail <= 1: higher levels print injected keys"
            )
        if not all(str(m).startswith("regular") for m in (opts.mode or ["regular"])):
            raise exceptions.OptionsError("aiid-proxy runs in regular proxy mode only")
        if not self._build(opts):
            return  # a rollback of refused options: nothing of ours to apply either
        if pin:
            opts.update(**pin)
        if "aiid_body_limit" in updated or "body_size_limit" in updated:
            limit = opts.aiid_body_limit
            current = opts.body_size_limit
            # mitmproxy's own (plain-text) 413 is only the hard ceiling: declared lengths over
            # the limit get the contract's JSON 413 from Intake, decoded sizes from the Route.
            if current is None or human.parse_size(current) != 2 * limit:
                opts.update(body_size_limit=str(2 * limit))

    def _build(self, opts: Any) -> bool:
        """(Re)build the Gateway when the options it is made from changed; False for the
        rollback of options just refused (nothing built, nothing to apply)."""
        if self.gateway is not None and self._key is None:
            return True  # injected (tests)
        home = Home.resolve(opts.aiid_home or None)
        policies = Path(opts.aiid_policies or os.environ.get("AIID_POLICIES") or "policies")
        key = (
            str(home.root),
            str(policies.absolute()),
            int(opts.aiid_body_limit),
            str(opts.aiid_audit_writer),
        )
        if key == self._key:
            return True
        if self._rollback or key == self._skip:
            # mitmproxy's rollback of the options just refused re-enters configure with the
            # options from before (once per nested rollback), at start the defaults: ./.aiid
            # and ./policies, another home. Nothing is built from them: no policy record in
            # another home's log, and the refusal the user sees stays about their own home.
            self._rollback = False
            self._skip = key
            return False
        try:
            gw = Gateway(
                home,
                policies.absolute(),
                body_limit=int(opts.aiid_body_limit),
                audit_writer=str(opts.aiid_audit_writer),
            )
        except AiidError as e:
            self._rollback = True  # the next configure is mitmproxy undoing these options
            raise exceptions.OptionsError(f"aiid-proxy cannot start: {e.one_line()}") from None
        self._skip = None
        if self.gateway is not None:
            self.gateway.close()
        self.gateway = gw
        self._key = key
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # not running yet: `running` attaches it
        if loop is not None:
            gw.attach(loop)
        for fn in self.on_gateway:
            fn(gw)
        return True

    async def done(self) -> None:
        if self.control is not None:
            await self.control.stop()
        await self._deny_held()
        if self.gateway is not None:
            self.gateway.close()

    async def _deny_held(self) -> None:
        """At shutdown, every request still held for approval is denied (403, its approval
        record says why) rather than left for the closing connection to drop."""
        held = [p for p in self.broker.pending.values() if not p.future.done()]
        for p in held:
            p.future.set_result(Answer(False, "shutdown", "the gateway is shutting down"))
        for _ in range(SHUTDOWN_TICKS):  # bounded: let the held requests send their refusals
            if not any(p.request_id in self.broker.pending for p in held):
                break
            await asyncio.sleep(0.01)

    def gw(self) -> Gateway:
        if self.gateway is None:
            raise AiidError("gateway is not configured")
        return self.gateway


AUDIT_WAIT = 10.0
"""Seconds a flow waits for an audit record (a writer stopped or stuck on its storage)
before it is refused: fail closed, but never hang an agent for ever."""


async def settled[T](fut: Future[T], timeout: float = AUDIT_WAIT) -> T:
    """Await a library future (an audit record): raise AuditError after ``timeout`` s.

    One resolved on this loop's own thread (the audit writer process's replies are read
    there) wakes the task directly, where ``asyncio.wrap_future`` would go through
    ``call_soon_threadsafe`` and the loop's self-pipe."""
    if not fut.done():
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        here = threading.get_ident()

        def wake(_: Future[T]) -> None:
            if not waiter.done():
                waiter.set_result(None)

        def done(f: Future[T]) -> None:
            if threading.get_ident() == here:
                wake(f)
            else:
                loop.call_soon_threadsafe(wake, f)

        def late() -> None:
            if not waiter.done():
                waiter.set_exception(
                    AuditError(f"the audit log did not commit the record within {timeout:g} s")
                )

        fut.add_done_callback(done)
        timer = loop.call_later(timeout, late)
        try:
            await waiter
        except asyncio.CancelledError:
            fut.cancel()
            raise
        finally:
            timer.cancel()
    return fut.result()


def _headers(flow: http.HTTPFlow) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in flow.request.headers.fields]


def state_of(flow: http.HTTPFlow) -> FlowState | None:
    st = flow.metadata.get(STATE)
    return st if isinstance(st, FlowState) else None


def _pending(flow: http.HTTPFlow) -> FlowState | None:
    """The flow's state if the pipeline should keep working on it."""
    if flow.response is not None or flow.error is not None or not flow.live:
        return None
    return state_of(flow)


async def refuse(rt: Runtime, flow: http.HTTPFlow, st: FlowState, r: RequestRefused) -> None:
    resp = http.Response.make(
        r.status,
        refusal_body(r, st.request_id),
        {"content-type": "application/json", **errorpage.id_headers(st.request_id), **r.headers},
    )
    flow.response = resp
    flow.metadata[OURS] = resp
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
                method=req.method,
                path=path,
                query=query,
                connect_host=connect_host,
                sni=flow.client_conn.sni,
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
                gw.identify(st, _headers(flow))
                refusal = too_large(gw.body_limit)
            except RequestRefused as r:
                refusal = r
            refuse_now(self.rt, flow, st, refusal)


def refuse_now(rt: Runtime, flow: http.HTTPFlow, st: FlowState, r: RequestRefused) -> None:
    """Synchronous refusal for hooks before the agent is known (nothing to await)."""
    resp = http.Response.make(
        r.status,
        refusal_body(r, st.request_id),
        {"content-type": "application/json", **errorpage.id_headers(st.request_id), **r.headers},
    )
    flow.response = resp
    flow.metadata[OURS] = resp
    rt.gw().record_refusal(st, r)


class _Stage:
    """A pipeline stage: acts only on a pending flow; a refusal becomes the contract's JSON.
    ``run`` may be a coroutine (it is awaited: no later stage runs meanwhile)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def request(self, flow: http.HTTPFlow) -> None:
        st = _pending(flow)
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
        gw.identify(st, _headers(flow))


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

    async def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> None:
        d = gw.decide(st)
        if d.effect == "approve":
            await self._hold(gw, st, d, flow.client_conn.id)

    async def _hold(self, gw: Gateway, st: FlowState, d: Decision, client: str = "") -> None:
        assert st.identity is not None
        key = (
            st.identity.tenant,
            st.identity.agent,
            st.provider_name or st.target.host,
            st.model or "",
            d.rule_id,
        )
        broker = self.rt.broker
        by = broker.granted(key)
        if by is not None:
            st.approved_by = by
            st.standing_approval = True
            return
        gw.refuse_unpriced(st)  # refused anyway after the wait: never ask a human
        timeout = float(d.approval_timeout)
        pending = broker.hold(st.identity.tenant, st.request_id, key, timeout)
        hold_key = (st.identity.tenant, st.request_id)
        self.rt.holds.setdefault(client, set()).add(hold_key)
        held = gw.record_hold(st, timeout)  # not awaited: the hold itself needs no fsync
        if held is not None:
            held.add_done_callback(_log_unwritten)
        gw.emit("pending", {"state": st, "deadline": time.time() + timeout})
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
            try:
                await settled(fut)
            except AiidError as e:  # no record of the human's answer: do not forward
                raise RequestRefused(
                    503, "audit_error", "approval could not be audited", d.rule_id
                ) from e
        if not ans.approved:
            raise RequestRefused(403, "policy_denied", f"approval {text}", d.rule_id)
        gw.recheck_held(st)  # revoked, expired or denied by an edit meanwhile: refused now
        st.approved_by = ans.by


class RateLimitStage(_Stage):
    def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> None:
        gw.reserve(st)


AUDIT_PENDING = "aiid_request_record"
SCRUBBED_HEAD = "aiid_scrubbed_head"


class AuditStage(_Stage):
    """Queues the ``request`` record. :class:`InjectStage` does its work while the record
    commits, then waits for it: nothing is sealed (so nothing leaves) before it is durable."""

    def run(self, gw: Gateway, st: FlowState, flow: http.HTTPFlow) -> None:
        try:
            flow.metadata[AUDIT_PENDING] = gw.audit_request(st)
        except AuditError as e:  # the log is closed or unusable: refused at once
            _unrecorded(flow, gw, st, e)


def _unrecorded(flow: http.HTTPFlow, gw: Gateway, st: FlowState, e: AuditError) -> None:
    # No durable `request` record (disk full, I/O error...): nothing may leave. Kill the flow
    # here with one clear line, not an addon traceback further down.
    if flow.killable:
        flow.kill()
    gw.record_error(st, f"request record not written: {e.one_line()}")


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


# Request headers InjectStage removes before adding its own: every credential header, the
# hop-by-hop proxy header, and the framing/encoding it re-states (the body is sent decoded).
_STRIPPED = frozenset(
    n.encode()
    for n in (
        *CREDENTIAL_HEADERS,
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
        inj = gw.inject(st)  # a refusal (no key, vault error) is answered by _Stage
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
        if await request_record_durable(flow, gw, st):
            gw.seal(st, req.method, req.url, req.raw_content or b"", req.headers.fields)


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
            and self.rt.gw().check_sealed(
                st, req.method, req.url, req.raw_content or b"", req.headers.fields
            )
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


class StreamFilter(StreamGuard):
    """Streamed (SSE) response bodies: every complete event passes on at once, scrubbed, its
    usage counted; past the output reservation the stream is cut (aiid_proxy.streaming).

    Nothing to pass on is an empty ``bytearray``, never ``b""``: mitmproxy sends a ``bytes``
    result as one HTTP/1.1 chunk, and a zero-length chunk ends a chunked body (the agent would
    see the stream end early), while it iterates any other result chunk by chunk (none here).
    """

    def __call__(self, chunk: bytes) -> bytes | bytearray:  # type: ignore[override]
        out = super().__call__(chunk)
        return out if out else bytearray()


def close_upstream(flow: http.HTTPFlow) -> None:
    """Soon (not inside the layer that is feeding the stream filter): close the provider side
    of a flow in transit, so a cut stream stops costing tokens and the agent's connection ends.
    mitmproxy cannot kill a flow in transit, so this closes the server connection itself; the
    flow then ends through the ``error`` hook."""

    def close() -> None:
        try:
            ps = ctx.master.addons.get("proxyserver")
            handler = ps.connections.get(flow.client_conn.id) if ps is not None else None
            if handler is not None and flow.server_conn in handler.transports:
                handler.close_connection(flow.server_conn)
        except Exception:
            log.exception("could not close the upstream connection of a cut stream")

    asyncio.get_running_loop().call_soon(close)


def replace_headers(headers: http.Headers, values: dict[str, str]) -> None:
    """``headers[name] = value`` for every item, in one pass over the fields (each single
    assignment scans them all): every field of those names is replaced."""
    names = {name.lower().encode() for name in values}
    fields = [f for f in headers.fields if f[0].lower() not in names]
    fields.extend((name.encode(), value.encode()) for name, value in values.items())
    headers.fields = tuple(fields)


def _log_unwritten(fut: Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("response record not written: %s", fut.exception())


class ResponseFilter:
    """Responses: request id on every one; scrub the injected key; usage; audit."""

    aiid_always = True  # a script's AddonHalt must not skip the scrub (addons/dispatch.py)

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # mitmproxy only logs an addon's exception and sends the response on: kill it instead, so a
    # failure here can never pass an unscrubbed key back to the agent.
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._responseheaders(flow)
        except Exception:
            self._fail(flow, "responseheaders")

    def response(self, flow: http.HTTPFlow) -> None:
        try:
            self._response(flow)
        except Exception:
            self._fail(flow, "response")

    def _fail(self, flow: http.HTTPFlow, hook: str) -> None:
        log.exception("response filter failed in %s: flow killed", hook)
        if flow.killable:
            flow.kill()
        st = state_of(flow)
        if st is not None and self.rt.gateway is not None:
            self.rt.gateway.record_error(st, f"response filter failed in {hook}")

    def _responseheaders(self, flow: http.HTTPFlow) -> None:
        st = state_of(flow)
        resp = flow.response
        if st is None or resp is None:
            return
        if flow.metadata.get(OURS) is resp or not st.allows():
            resp.headers["x-aiid-request-id"] = st.request_id
            return
        if 100 <= resp.status_code < 200:
            # mitmproxy takes an upstream 1xx (103 Early Hints) for the final answer and
            # drops the real one after it: the agent would wait for ever, the audit log say
            # 103. Ended here, on record.
            if flow.killable:
                flow.kill()
            self.rt.gw().record_error(
                st,
                f"the provider sent an informational {resp.status_code} response, which the "
                "gateway does not relay",
                sent=True,
            )
            return
        scrubber = self._scrubber(st)
        self._scrub_headers(resp, scrubber)
        ours = {"x-aiid-request-id": st.request_id}
        if st.rate is not None:  # our limits, not the tenant's account limits at the provider
            ours.update(ratelimit_headers(st.rate, refused=False))
        replace_headers(resp.headers, ours)
        # what `response` need not scrub again (header fields are an immutable tuple: any
        # change by another addon replaces it)
        flow.metadata[SCRUBBED_HEAD] = (resp.headers.fields, resp.reason)
        ctype = resp.headers.get("content-type", "").lower()
        encoded = resp.headers.get("content-encoding", "identity").lower() != "identity"
        route = st.route
        if ctype.startswith("text/event-stream") and not encoded and route and route.provider:
            sf = StreamFilter(
                scrubber,
                SSEUsageTracker(route.provider, route.route),
                output_cap=st.output_cap,
                request_id=st.request_id,
                on_cut=lambda: close_upstream(flow),
                keep=RECORDED_BYTES if self.rt.gw().records_prompts(st) else 0,
            )
            resp.stream = sf
            flow.metadata["aiid_stream"] = sf

    def _response(self, flow: http.HTTPFlow) -> None:
        st = state_of(flow)
        resp = flow.response
        if st is None or resp is None or flow.metadata.get(OURS) is resp or not st.allows():
            return
        gw = self.rt.gw()
        scrubber = self._scrubber(st)
        seen = flow.metadata.get(SCRUBBED_HEAD)
        if seen is None or seen[0] is not resp.headers.fields or seen[1] != resp.reason:
            self._scrub_headers(resp, scrubber)
        sf = flow.metadata.get("aiid_stream")
        usage: Usage | None = None
        hits = 0
        extra: dict[str, Any] = {}
        completion: bytes | None = None
        est_in = st.route.facts.estimated_input_tokens if st.route and st.route.facts else 0
        if isinstance(sf, StreamFilter):
            usage = sf.usage(est_in)
            hits = sf.scrubber.hits
            completion = bytes(sf.kept)
            if sf.cut:
                extra["cut"] = sf.cut
        elif (
            resp.headers.get("content-type", "").lower().startswith("text/event-stream")
            and st.route is not None
            and st.route.provider is not None
        ):
            # An event stream that could not be streamed (the provider encoded it, gzip,
            # although asked for identity): read whole, then guarded as a stream all the same
            # (the key spelled over events, the reservation), and sent re-encoded.
            resp.trailers = None
            body = resp.get_content(strict=True) or b""
            guard = StreamGuard(
                scrubber,
                SSEUsageTracker(st.route.provider, st.route.route),
                output_cap=st.output_cap,
                request_id=st.request_id,
            )
            clean = guard.feed(body) + guard.close()
            hits = scrubber.hits
            if clean != body:
                resp.content = clean
            completion = clean
            usage = guard.usage(est_in)
            if guard.cut:
                extra["cut"] = guard.cut
        else:
            resp.trailers = None  # sent after this hook: never unscrubbed
            body = resp.get_content(strict=True) or b""  # undecodable: cannot scrub, _fail
            clean = scrubber.scrub(body)
            clean, escaped = redact_escaped(clean, scrubber.secrets)  # "\u0073k-..."
            scrubber.hits += escaped
            hits = scrubber.hits
            spelled = escaped_anywhere(clean, scrubber.secrets)  # where no re-encoding reaches
            if not spelled and st.route is not None and st.route.provider is not None:
                tracker = SSEUsageTracker(st.route.provider, st.route.route)
                spelled = spelled_in_array(clean, tracker, scrubber.secrets)  # Gemini's array
            if spelled:
                if flow.killable:
                    flow.kill()
                gw.record_error(
                    st, "the response spelled the injected key where it cannot be scrubbed: "
                    "killed", sent=True,
                )  # fmt: skip
                return
            if hits:
                resp.content = clean
            completion = clean
            if st.route is not None and st.route.provider is not None:
                usage = parse_usage(st.route.provider, st.route.route, clean)
                if usage is None and 200 <= resp.status_code < 300 and st.route.route:
                    usage = estimate_body_usage(clean, est_in)  # no usage reported: estimate
        fut = gw.record_response(st, resp.status_code, usage, hits, extra, completion)
        if fut is not None:
            # Not awaited: the contract makes the *request* record durable before anything
            # leaves; the response record commits after the response is released, without
            # an fsync of its own (audit.log.LAZY_EVENTS). A failure to write it is logged.
            fut.add_done_callback(_log_unwritten)

    def error(self, flow: http.HTTPFlow) -> None:
        st = state_of(flow)
        if st is None or self.rt.gateway is None or st.refusal is not None:
            return
        msg = flow.error.msg if flow.error else "unknown error"
        scrubber = self._scrubber(st)  # errors quote upstream bytes (status lines, names)
        clean = scrubber.fragments.redact(scrubber.scrub_text(msg))
        if clean != msg and flow.killable:
            flow.kill()  # else mitmproxy's 502 page would quote the key to the agent
        msg = clean
        sf = flow.metadata.get("aiid_stream")
        if isinstance(sf, StreamFilter) and flow.response is not None and st.allows():
            # a stream that ended early (cut by us, or a hang-up): still the provider's output,
            # so settle with what was counted instead of handing the reservation back
            est_in = st.route.facts.estimated_input_tokens if st.route and st.route.facts else 0
            sf.tracker.close()
            extra = {"cut": sf.cut} if sf.cut else {"incomplete": msg[:200]}
            self.rt.gateway.record_response(
                st, flow.response.status_code, sf.usage(est_in), sf.scrubber.hits, extra
            )
            return
        sent = st.allows() and flow.server_conn.timestamp_tls_setup is not None
        self.rt.gateway.record_error(st, f"upstream or connection error: {msg}", sent=sent)

    @staticmethod
    def _scrubber(st: FlowState) -> Scrubber:
        if st.injection is None:
            return Scrubber([])
        return Scrubber([st.injection.scrub_value()])

    @staticmethod
    def _scrub_headers(resp: http.Response, scrubber: Scrubber) -> None:
        if not scrubber.active:
            return
        reason = scrubber.scrub_text(resp.reason or "")
        if reason != (resp.reason or ""):
            resp.reason = reason  # "HTTP/1.1 401 Bad key sk-..." reaches HTTP/1.1 agents
        fields = []
        changed = False
        # a piece of the key (12+ characters: all of it but the last, split over values)
        # anywhere in the header block: the fields that hold one are scrubbed of it
        blob = b"\n".join(k + b"\n" + v for k, v in resp.headers.fields)
        pieces = scrubber.lower_fragments.found(blob.decode("utf-8", "surrogateescape").lower())
        for k, v in resp.headers.fields:
            if scrubber.in_name(k):  # "x-sk-...: 1": dropped whole
                changed = True
                continue
            nv = scrubber.scrub(v)
            if pieces:
                text = nv.decode("utf-8", "surrogateescape")
                redacted = scrubber.fragments.redact(text)
                if redacted != text:
                    scrubber.hits += 1
                    nv = redacted.encode("utf-8", "surrogateescape")
            changed |= nv != v
            fields.append((k, nv))
        if changed:
            resp.headers.fields = tuple(fields)


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
