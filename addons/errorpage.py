"""mitmproxy's own error answers to HTTP/1 agents, in the contract's shape.

mitmproxy answers some failures itself, after every hook has run and with no hook in between:
an upstream it cannot connect to (502), a request head it cannot parse (400), a body over its
limit (413). Its answer is an HTML page without our request id, where the contract promises
``x-aiid-request-id`` on every response and refusals as ``{"type": "error", "error": {...}}``.

For HTTP/1 agents (every official SDK) this module swaps that page for the contract's JSON:
the flow's own request id when the pipeline gave it one (its ``error`` audit record has the
same id), a fresh one otherwise. mitmproxy offers no hook for it, so :func:`install` wraps the
two places of ``mitmproxy.proxy.layers.http._http1`` that build the page; a test pins the
behaviour against the installed mitmproxy. HTTP/2 agents still get mitmproxy's page.
"""

from __future__ import annotations

import weakref
from collections.abc import Generator
from typing import Any

from mitmproxy import http, version
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import HttpEvent, ResponseProtocolError

from aiid_proxy.errors import RequestRefused
from aiid_proxy.gateway import new_request_id, refusal_body

# The request id the pipeline gave each request still in flight (by the request object the
# HTTP/1 server layer holds: the very object the flow carries).
_IDS: weakref.WeakKeyDictionary[http.Request, str] = weakref.WeakKeyDictionary()
_TYPES = {400: "bad_request", 413: "too_large", 502: "upstream_error"}
_installed = False


def remember(request: http.Request, request_id: str) -> None:
    """Answer any error mitmproxy raises for ``request`` with ``request_id``."""
    _IDS[request] = request_id


def error_response(status: int, message: str, request: http.Request | None = None) -> bytes:
    """The whole HTTP/1.1 response mitmproxy would send as its error page, as JSON."""
    request_id = _IDS.get(request) if request is not None else None
    refusal = RequestRefused(
        status,
        _TYPES.get(status, "gateway_error"),
        f"aiid gateway: {message}" if message else "aiid gateway: error",
    )
    rid = request_id or new_request_id()
    resp = http.Response.make(
        status,
        refusal_body(refusal, rid),
        {
            "server": version.MITMPROXY,
            "connection": "close",
            "content-type": "application/json",
            "x-aiid-request-id": rid,
        },
    )
    return http1.assemble_response(resp)


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
