"""mitmproxy's own error answers (upstream unreachable, unparsable request) reach HTTP/1 and
HTTP/2 agents in the contract's shape, with ``x-aiid-request-id`` (the flow's own id when it
has one)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import openai
import pytest
from e2e import OPENAI_CANARY, Gateway, make_home, point_agent_at, read_audit, start_gateway
from mitmproxy.test import tutils
from standin import StandIn

from addons import errorpage

POLICY = """
version: 1
tenant: acme
default: deny
rules:
  - id: openai-small
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
"""
RID = re.compile(r"^req_[0-9a-f]{24}$")


def _parse(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    head = conn.next_event()
    assert isinstance(head, h11.Response)
    body = b""
    while isinstance(ev := conn.next_event(), h11.Data):
        body += ev.data
    assert isinstance(ev, h11.EndOfMessage)
    headers = {k.decode(): v.decode() for k, v in head.headers}
    return head.status_code, headers, json.loads(body)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        pytest.param(502, "upstream_error", id="upstream-unreachable"),
        pytest.param(400, "bad_request", id="unparsable-request"),
        pytest.param(413, "too_large", id="over-mitmproxys-limit"),
    ],
)
def test_the_error_page_is_the_contracts_json(status: int, kind: str) -> None:
    req = tutils.treq()
    errorpage.remember(req, "req_" + "ab" * 12)
    got, headers, body = _parse(errorpage.error_response(status, "Connection refused", req))
    assert got == status
    assert headers["x-aiid-request-id"] == "req_" + "ab" * 12
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert body["type"] == "error"
    assert body["error"]["type"] == kind
    assert body["error"]["request_id"] == "req_" + "ab" * 12
    assert "Connection refused" in body["error"]["message"]


def test_an_error_without_a_flow_gets_a_fresh_id() -> None:
    _, headers, body = _parse(errorpage.error_response(400, "Bad request line"))
    assert RID.match(headers["x-aiid-request-id"])
    assert body["error"]["request_id"] == headers["x-aiid-request-id"]
    _, again, _ = _parse(errorpage.error_response(400, "Bad request line"))
    assert again["x-aiid-request-id"] != headers["x-aiid-request-id"]


# -- end to end: a real gateway whose upstream is down ----------------------------------------
@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("down")
    si = StandIn(root)  # only for its CA: nothing listens where the providers are mapped
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed again at once: connections are refused
    home = make_home(root, {"acme": {"openai": OPENAI_CANARY}})
    policies = root / "policies"
    policies.mkdir()
    (policies / "acme.yaml").write_text(POLICY)
    gw = start_gateway(home, policies, dead, si.ca_path)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.mark.e2e
def test_an_sdk_gets_json_and_the_request_id_when_the_provider_is_down(
    down: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_agent_at(down, monkeypatch)
    client = openai.OpenAI(api_key=down.token("acme", "bot"), max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    err = info.value
    assert err.status_code == 502
    rid = err.response.headers["x-aiid-request-id"]
    assert RID.match(rid)
    body = err.response.json()
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["request_id"] == rid
    assert "aiid gateway" in err.message
    # The same id names the request's records: its durable request record and the error.
    rows = [r for r in read_audit(down.home, "acme") if r["request_id"] == rid]
    assert [r["event"] for r in rows] == ["request", "error"]
    assert OPENAI_CANARY not in err.response.text


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.parametrize("version", ["--http2", "--http1.1"])
def test_curl_gets_json_and_the_request_id_when_the_provider_is_down(
    down: Gateway, tmp_path: Path, version: str
) -> None:
    # curl speaks HTTP/2 to the gateway by default (ALPN after CONNECT): mitmproxy answers
    # that on another code path than HTTP/1.
    head, body_file = tmp_path / "head", tmp_path / "body"
    token = down.token("acme", "bot")
    done = subprocess.run(
        [
            *("curl", "-sS", version, "--proxy", down.proxy, "--cacert", str(down.ca)),
            *("-H", f"Authorization: Bearer {token}", "-H", "content-type: application/json"),
            *("-d", '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'),
            *("-D", str(head), "-o", str(body_file), "-w", "%{http_version} %{http_code}"),
            "https://api.openai.com/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("2 502" if version == "--http2" else "1.1 502")
    headers = dict(line.split(": ", 1) for line in head.read_text().splitlines() if ": " in line)
    assert headers["content-type"] == "application/json"
    rid = headers["x-aiid-request-id"]
    assert RID.match(rid)
    body = json.loads(body_file.read_text())
    assert body["error"]["type"] == "upstream_error"
    assert body["error"]["request_id"] == rid
    assert body["error"]["message"].startswith("aiid gateway: ")
    rows = [r for r in read_audit(down.home, "acme") if r["request_id"] == rid]
    assert [r["event"] for r in rows] == ["request", "error"]
    assert OPENAI_CANARY not in body_file.read_text() + head.read_text()


@pytest.mark.e2e
def test_an_unparsable_request_gets_json_with_an_id(down: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", down.port), timeout=10) as s:
        s.sendall(b"GET http://example.com/ HTTP/1.1\r\nHost example.com\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    status, headers, body = _parse(raw)
    assert status == 400
    assert RID.match(headers["x-aiid-request-id"])
    assert body["error"] == {
        "type": "bad_request",
        "message": body["error"]["message"],
        "rule": None,
        "request_id": headers["x-aiid-request-id"],
    }
    assert body["error"]["message"].startswith("aiid gateway: ")


def test_the_swap_is_installed_once(tmp_path: Path) -> None:
    from mitmproxy.proxy.layers.http import _http1, _http2

    errorpage.install()
    send, handle = _http1.Http1Server.send, _http2.Http2Server._handle_event
    errorpage.install()
    assert _http1.Http1Server.send is send
    assert _http2.Http2Server._handle_event is handle
    assert _http1.make_error_response is errorpage.error_response


def test_mitmproxys_body_limit_is_worded_as_the_gateways() -> None:
    """[AL] The same limit answered in two wordings, one naming an option users never set."""
    _, _, body = _parse(
        errorpage.error_response(413, "Request body exceeds mitmproxy's body_size_limit.")
    )
    message = body["error"]["message"]
    assert "body_size_limit" not in message and "aiid_body_limit" in message
