"""The way back: response headers, bodies and streams scrubbed of the injected key, usage
counted, the ``response`` record written; upstream errors recorded."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, http

from addons.runtime import OURS, Runtime, state_of
from aiid_proxy.audit.writers import log_unwritten
from aiid_proxy.errors import AiidError
from aiid_proxy.gateway import (
    RECORDED_BYTES,
    FlowState,
    ratelimit_headers,
)
from aiid_proxy.providers import (
    Provider,
    Route,
    SSEUsageTracker,
    Usage,
    estimate_body_usage,
    parse_usage,
)
from aiid_proxy.scrub import (
    Scrubber,
    escaped_anywhere,
    redact_escaped,
    scrub_fragments_in_json,
)
from aiid_proxy.streaming import StreamGuard, looks_like_sse, spelled_in_array

log = logging.getLogger("aiid")

SCRUBBED_HEAD = "aiid_scrubbed_head"


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


def _no_usage() -> Usage | None:
    return None


def body_usage(
    provider: Provider, route: Route | None, body: bytes, status: int, est_in: int
) -> Usage | None:
    """A whole body's usage as the provider reports it; an estimate for a successful call
    that reports none."""
    usage = parse_usage(provider, route, body)
    if usage is None and 200 <= status < 300 and route is not None:
        usage = estimate_body_usage(body, est_in)
    return usage


SHUTDOWN_CUT = "the gateway shut down"


def _stream_usage(sf: StreamFilter, est_in: int) -> Usage:
    """What a stream in transit has carried (its last event dispatched, as at its end); it
    is cut there: what is charged is what the agent got, nothing more leaves after."""
    if sf.cut is None:
        sf.cut = SHUTDOWN_CUT
    sf.tracker.close()
    return sf.usage(est_in)


def _ended(flow: http.HTTPFlow, st: FlowState) -> bool:
    """Its end is on record as an error already (the gateway shut down while it was in
    transit): the provider's answer is not let out after that record. Killed; True."""
    if not st.error_recorded or flow.metadata.get(OURS) is flow.response:
        return False
    if flow.killable:
        flow.kill()
    return True


def after_release(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the hook that calls this has returned and mitmproxy has sent the
    response on (the next turn of the event loop): what only counts a response (its usage,
    the settlement, its record) is not on the agent's way. Without a running loop, now."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return
    loop.call_soon(fn)


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
        if _ended(flow, st):
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
        if (
            ctype.startswith("text/event-stream")
            and not encoded
            and resp.status_code < 400  # an error is read whole: scanned as error bodies are
            and route
            and route.provider
        ):
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
            est_in = route.facts.estimated_input_tokens if route.facts else 0
            st.usage_so_far = functools.partial(_stream_usage, sf, est_in)

    def _response(self, flow: http.HTTPFlow) -> None:
        st = state_of(flow)
        resp = flow.response
        if st is None or resp is None or flow.metadata.get(OURS) is resp or not st.allows():
            return
        if _ended(flow, st):
            return
        # trailers (HTTP/2 upstreams) are sent after this hook, on every path: never scrubbed,
        # so never relayed (an HTTP/1.1 agent cannot even take them: mitmproxy crashed)
        resp.trailers = None
        gw = self.rt.gw()
        scrubber = self._scrubber(st)
        seen = flow.metadata.get(SCRUBBED_HEAD)
        if seen is None or seen[0] is not resp.headers.fields or seen[1] != resp.reason:
            self._scrub_headers(resp, scrubber)
        sf = flow.metadata.get("aiid_stream")
        usage: Callable[[], Usage | None] = _no_usage
        hits = 0
        extra: dict[str, Any] = {}
        completion: bytes | None = None
        est_in = st.route.facts.estimated_input_tokens if st.route and st.route.facts else 0
        if isinstance(sf, StreamFilter):
            usage = functools.partial(sf.usage, est_in)
            hits = sf.scrubber.hits
            completion = bytes(sf.kept)
            if sf.cut:
                extra["cut"] = sf.cut
        else:
            body = resp.get_content(strict=True) or b""  # undecodable: cannot scrub, _fail
            provider = st.route.provider if st.route is not None else None
            sse = resp.headers.get("content-type", "").lower().startswith("text/event-stream")
            if provider is not None and (sse or looks_like_sse(body)):
                # An event stream read whole: encoded (gzip, although asked for identity), an
                # error status, or not labelled as one (an SDK parses it all the same):
                # guarded as a stream all the same (the key spelled over events, the
                # reservation), and sent re-encoded.
                assert st.route is not None
                guard = StreamGuard(
                    scrubber,
                    SSEUsageTracker(provider, st.route.route),
                    output_cap=st.output_cap,
                    request_id=st.request_id,
                )
                clean = guard.feed(body) + guard.close()
                usage = functools.partial(guard.usage, est_in)
                if guard.cut:
                    extra["cut"] = guard.cut
            else:
                clean = scrubber.scrub(body)
                clean, escaped = redact_escaped(clean, scrubber.secrets)  # "\u0073k-..."
                scrubber.hits += escaped
                spelled = escaped_anywhere(clean, scrubber.secrets)  # no re-encoding reaches
                if not spelled and provider is not None:
                    assert st.route is not None
                    tracker = SSEUsageTracker(provider, st.route.route)
                    spelled = spelled_in_array(clean, tracker, scrubber.secrets)  # Gemini's
                if spelled:
                    if flow.killable:
                        flow.kill()
                    gw.record_error(
                        st, "the response spelled the injected key where it cannot be "
                        "scrubbed: killed", sent=True,
                    )  # fmt: skip
                    return
                if provider is not None:
                    assert st.route is not None
                    usage = functools.partial(
                        body_usage, provider, st.route.route, clean, resp.status_code, est_in
                    )
            if resp.status_code >= 400:  # an error quoting the key: a piece of it, any case;
                clean = scrub_fragments_in_json(clean, scrubber)  # in its JSON strings first
                clean = scrubber.scrub_fragments(clean)  # then as bytes (text, markup)
            hits = scrubber.hits
            if clean != body:
                resp.content = clean
            completion = clean
        status = resp.status_code

        def account() -> None:
            if st.finish is not account:
                return  # run already, by a shutdown
            st.finish = None
            try:
                fut = gw.record_response(st, status, usage(), hits, extra, completion)
            except Exception as e:
                if isinstance(e, AiidError):  # the audit log: one line, no traceback
                    why = e.one_line()
                else:
                    log.exception("response of request %s not accounted", st.request_id)
                    why = type(e).__name__
                with contextlib.suppress(Exception):
                    gw.record_error(
                        st,
                        f"the response could not be accounted (it was sent to the agent): {why}",
                        sent=True,
                        killed=False,
                    )
                return
            if fut is not None:
                # Not awaited: the contract makes the *request* record durable before
                # anything leaves; the response record commits after the response is
                # released, without an fsync of its own (audit.record.LAZY_EVENTS). A failure
                # to write it is logged.
                fut.add_done_callback(log_unwritten)

        st.finish = account
        after_release(account)

    def error(self, flow: http.HTTPFlow) -> None:
        st = state_of(flow)
        if st is None or self.rt.gateway is None or st.refusal is not None:
            return
        msg = flow.error.msg if flow.error else "unknown error"
        scrubber = self._scrubber(st)  # errors quote upstream bytes (status lines, names)
        clean = scrubber.redact_any_case(scrubber.scrub_text(msg))
        if clean != msg:
            if flow.killable:
                flow.kill()  # else mitmproxy's 502 page would quote the key to the agent
            if flow.error is not None:
                flow.error.msg = clean  # for every addon after this one, and flow dumps
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
        self.rt.gateway.record_error(
            st, f"upstream or connection error: {msg}", sent=sent, killed=False
        )

    @staticmethod
    def _scrubber(st: FlowState) -> Scrubber:
        if st.injection is None:
            return Scrubber([])
        return Scrubber([st.injection.scrub_value()])

    @staticmethod
    def _scrub_headers(resp: http.Response, scrubber: Scrubber) -> None:
        if not scrubber.active:
            return
        reason = scrubber.redact_any_case(scrubber.scrub_text(resp.reason or ""))
        if reason != (resp.reason or ""):
            resp.reason = reason  # "HTTP/1.1 401 Bad key sk-..." reaches HTTP/1.1 agents
        fields = []
        changed = False
        # a piece of the key (12+ characters: all of it but the last, split over values)
        # anywhere in the header block: the fields that hold one are scrubbed of it
        blob = b"\n".join(k + b"\n" + v for k, v in resp.headers.fields)
        text = blob.decode("utf-8", "surrogateescape")
        low = text.lower()
        # in any case; and in the key's own case, which alone finds the hex of its bytes
        pieces = scrubber.lower_fragments.found(low) or scrubber.fragments.found(text)
        if not pieces and not scrubber.anywhere(blob, low):
            # Neither the key nor a piece of it in any name or value (each is part of the
            # block): nothing below would change. Field by field costs ~5 µs a field.
            return
        for k, v in resp.headers.fields:
            if scrubber.in_name(k):  # "x-sk-...: 1": dropped whole
                changed = True
                continue
            nv = scrubber.scrub(v)
            if pieces:  # found in any letter case: removed in any letter case
                text = nv.decode("utf-8", "surrogateescape")
                redacted = scrubber.redact_any_case(text)
                if redacted != text:
                    scrubber.hits += 1
                    nv = redacted.encode("utf-8", "surrogateescape")
            changed |= nv != v
            fields.append((k, nv))
        if changed:
            resp.headers.fields = tuple(fields)
