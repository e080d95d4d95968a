"""mitmproxy's own error answers to HTTP/1 agents, in the contract's shape.

mitmproxy answers some failures itself, after every hook has run and with no hook in between:
an upstream it cannot connect to (502), a request head it cannot parse (400), a body over its
limit (413). Its answer is an HTML page without our request id, where the contract promises
``x-aiid-request-id`` on every response and refusals as ``{"type": "error", "error": {...}}``.

This module swaps that page for the contract's JSON, for HTTP/1 agents (every official SDK)
and HTTP/2 agents (curl's default over TLS): the flow's own request id when the pipeline gave
it one (its ``error`` audit record has the same id), a fresh one otherwise. mitmproxy offers no
hook for it, so :func:`install` wraps the places of ``mitmproxy.proxy.layers.http._http1`` and
``_http2`` that build the page; tests pin the behaviour against the installed mitmproxy.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator
from typing import Any

from mitmproxy import http, version
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import HttpLayer, _http1, _http2
from mitmproxy.proxy.layers.http._events import HttpEvent, ResponseProtocolError

from aiid_proxy.errors import RequestRefused
from aiid_proxy.gateway import new_request_id, refusal_body

# The request id the pipeline gave each request still in flight (by the request object the
# HTTP/1 server layer holds: the very object the flow carries).
_IDS: weakref.WeakKeyDictionary[http.Request, str] = weakref.WeakKeyDictionary()
_TYPES = {400: "bad_request", 413: "too_large", 502: "upstream_error"}
_installed = False
_scrub: Callable[[str], str] = str
"""What mitmproxy's error messages go through before they reach an agent: they quote upstream
bytes ("Received invalid header name: b'x-<key>'"). Set by the pipeline (set_scrubber)."""


def set_scrubber(scrub: Callable[[str], str]) -> None:
    global _scrub
    _scrub = scrub


def remember(request: http.Request, request_id: str) -> None:
    """Answer any error mitmproxy raises for ``request`` with ``request_id``."""
    _IDS[request] = request_id


def _answer(status: int, message: str, request: http.Request | None) -> tuple[str, bytes]:
    """(request id, JSON body) of the answer to an error mitmproxy raised for ``request``."""
    request_id = _IDS.get(request) if request is not None else None
    if "body_size_limit" in message:  # mitmproxy's own wording names an option of its own
        message = "request body exceeds the gateway's body limit (aiid_body_limit)"
    refusal = RequestRefused(
        status,
        _TYPES.get(status, "gateway_error"),
        f"aiid gateway: {_scrub(message)}" if message else "aiid gateway: error",
    )
    rid = request_id or new_request_id()
    return rid, refusal_body(refusal, rid)


def id_headers(rid: str) -> dict[str, str]:
    """The request id on an answer of the gateway's own: ``x-aiid-request-id`` (the contract),
    and the headers the SDKs read into their errors' ``request_id`` (openai: ``x-request-id``;
    anthropic: ``request-id``). Provider answers keep the provider's own."""
    return {"x-aiid-request-id": rid, "x-request-id": rid, "request-id": rid}


def error_response(status: int, message: str, request: http.Request | None = None) -> bytes:
    """The whole HTTP/1.1 response mitmproxy would send as its error page, as JSON."""
    rid, body = _answer(status, message, request)
    resp = http.Response.make(
        status,
        body,
        {
            "server": version.MITMPROXY,
            "connection": "close",
            "content-type": "application/json",
            **id_headers(rid),
        },
    )
    return http1.assemble_response(resp)


def _stream_request(server: _http2.Http2Server, stream_id: int) -> http.Request | None:
    """The request of an HTTP/2 stream: its HttpStream, in the HttpLayer above ``server``
    (still there when the error is sent: the stream is dropped after)."""
    for layer in reversed(server.context.layers):
        if isinstance(layer, HttpLayer):
            flow = getattr(layer.streams.get(stream_id), "flow", None)
            return flow.request if isinstance(flow, http.HTTPFlow) else None
    return None


def _h2_error(
    server: _http2.Http2Server, event: ResponseProtocolError
) -> Generator[commands.Command, Any, bool]:
    """mitmproxy's own branch for an error it answers on an HTTP/2 stream, with our JSON in
    place of its page; False (nothing sent) where mitmproxy would reset the stream instead."""
    sid = event.stream_id
    status = event.code.http_status_code()
    stream = server.h2_conn.streams.get(sid)
    if (
        status is None
        or stream is None
        or server.is_closed(sid)
        or not server.is_open_for_us(sid)
        or stream.state_machine.headers_sent
    ):
        return False
    rid, body = _answer(status, event.message, _stream_request(server, sid))
    server.h2_conn.send_headers(
        sid,
        [
            (b":status", b"%d" % status),
            (b"server", version.MITMPROXY.encode()),
            (b"content-type", b"application/json"),
            *((k.encode(), v.encode()) for k, v in id_headers(rid).items()),
        ],
    )
    server.h2_conn.send_data(sid, body, end_stream=True)
    data = server.h2_conn.data_to_send()
    if data:
        yield commands.SendData(server.conn, data)
    return True


def install() -> None:
    """Swap mitmproxy's HTTP/1 error page for ours (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    server = _http1.Http1Server
    original = server.send

    def send(self: Any, event: HttpEvent) -> Generator[commands.Command, Any, None]:
        # mitmproxy's own branch for this event, with our response in place of its page.
        if isinstance(event, ResponseProtocolError) and not self.response:
            status = event.code.http_status_code()
            if status is not None:
                if not (self.conn.state & ConnectionState.CAN_WRITE):
                    return
                yield commands.SendData(
                    self.conn, error_response(status, event.message, self.request)
                )
                yield commands.CloseConnection(self.conn)
                return
        yield from original(self, event)

    server.send = send  # type: ignore[method-assign]
    # Errors raised before there is a request to speak of (an unparsable head).
    _http1.make_error_response = error_response

    h2 = _http2.Http2Server
    h2_original = h2._handle_event

    def handle_event(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
        if isinstance(event, ResponseProtocolError) and (yield from _h2_error(self, event)):
            return
        yield from h2_original(self, event)

    h2._handle_event = handle_event  # type: ignore[method-assign]
