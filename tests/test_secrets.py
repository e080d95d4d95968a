"""Canaries (issue 6): a real `aiid run` whose vault holds a canary key for every provider and
egress secret; allowed, denied and erroring traffic, providers that echo the key (in the body,
in headers, in the status line, streamed and split across chunks, compressed every way the
gateway can decode); then every place a secret could surface is searched:

* every file the gateway wrote (the whole home tree: databases, WAL, logs, checkpoints),
* its stdout and stderr (plain log mode) and, when tmux is installed, the live console's
  screen and its log file,
* every response (status line, headers, raw and decoded body) the agents received,
* `aiid audit export`, `aiid audit tail`, `aiid audit verify` and `aiid vault list` output.

Provider keys: 0 hits anywhere (also a 16-character middle fragment, also JSON-escaped).
Agent tokens: 0 hits in any audit row or log line (the token's jti may appear).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import socket
import ssl
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import brotli
import pytest
from e2e import TMUX, TLSServer, aiid, free_port, start_console_gateway, start_gateway
from standin import StandIn
from test_bypass import H2Client, Reply, fast_home, h2_headers, read_reply, request_bytes

from aiid_proxy.admin import issue_token
from aiid_proxy.home import Home

pytestmark = pytest.mark.e2e

GEMINI_HOST = "generativelanguage.googleapis.com"
GEMINI_PATH = "/v1beta/models/gemini-1.5-flash:generateContent"

# One canary per provider the registry knows, plus egress secrets; '/' and '+' in some, so the
# JSON-escaped form (`\/`) is exercised too.
CANARIES = {
    "openai": "sk-canary-openai-Q7v2Lm9Xc4Rt8Wb1",
    "openai-eu": "sk-canary-openaieu-H3k8Zp2Nq6Yd0Fs5",
    "anthropic": "sk-ant-canary-Ju4Tg7Vh1Cx9Kw3Ea",
    "azure-openai": "canaryazure0Mf5Pr8Bn2Ls6Dj4Wq",
    "gemini": "AIza/canary+gemini-Rb6Yt1Hm8Kc3Xv5",
    "mistral": "canary-mistral-Ue2Ni7Sd4Fo9Gl1Pz",
    "groq": "gsk_canary_groq_Wa3Qe8Ry5Tu2Io7P",
    "openrouter": "sk-or-canary-Lk1Jh6Gf3Ds8Az4Xc",
    "github": "ghp_canary/github+Mn5Bv0Cx7Zl2Kj9",
}
HOSTS = {
    "openai": ("api.openai.com", "/v1/chat/completions"),
    "openai-eu": ("eu.api.openai.com", "/v1/chat/completions"),
    "anthropic": ("api.anthropic.com", "/v1/messages"),
    "azure-openai": ("acme.openai.azure.com", "/openai/deployments/gpt-4o-mini/chat/completions"),
    "mistral": ("api.mistral.ai", "/v1/chat/completions"),
    "groq": ("api.groq.com", "/openai/v1/chat/completions"),
    "openrouter": ("openrouter.ai", "/api/v1/chat/completions"),
}
DEAD_HOST = "eu.api.openai.com"  # mapped to a closed port: upstream connection errors

POLICY = """\
version: 1
tenant: {tenant}
default: deny
audit: {{record_prompts: false}}
rules:
  - id: no-gpt-4o
    providers: [openai]
    models: ["gpt-4o"]
    effect: deny
    reason: "gpt-4o is not allowed"
  - id: everything-else
    providers: [openai, openai-eu, anthropic, azure-openai, gemini, mistral, groq, openrouter]
    effect: allow
  - id: github
    hosts: ["api.github.com"]
    methods: [GET]
    paths: ["/repos/*"]
    inject: {{header: Authorization, scheme: Bearer, secret: github}}
    effect: allow
"""


# --------------------------------------------------------------------------- an echoing upstream


class EchoUpstream(TLSServer):
    """A TLS HTTP/1.1 server that echoes the credential it receives, in the shape the query
    parameter ``echo=`` asks for (every way a response can carry bytes back)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.seen: list[str] = []
        super().__init__(cert, key)

    def _conn(self, raw: socket.socket) -> None:
        raw.settimeout(3)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            n = int(headers.get("content-length", "0"))
            while len(rest) < n:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
            key = headers.get("x-goog-api-key") or headers.get("authorization", "")
            variant = lines[0].split(" ")[1].partition("echo=")[2].split("&")[0]
            self.seen.append(variant)
            for part in self._reply(variant, key):
                if isinstance(part, float):
                    time.sleep(part)
                else:
                    conn.sendall(part)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                raw.close()

    @staticmethod
    def _reply(variant: str, key: str) -> list[bytes | float]:
        k = key.encode()
        msg = json.dumps({"error": {"message": f"API key not valid: {key}"}}).encode()
        slashed = msg.replace(b"/", b"\\/")

        def resp(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
            hs = "".join(f"{a}: {b}\r\n" for a, b in headers)
            return f"HTTP/1.1 {status}\r\n{hs}content-length: {len(body)}\r\n\r\n".encode() + body

        js = [("content-type", "application/json")]
        if variant == "reason":
            return [b"HTTP/1.1 401 Bad key " + k + b"\r\ncontent-length: 2\r\n\r\n{}"]
        if variant == "headers":
            return [
                resp(
                    "401 Unauthorized",
                    [
                        ("x-echo", key),
                        ("www-authenticate", f'Bearer error="{key}"'),
                        ("set-cookie", f"k={key}; Secure"),
                        ("location", f"https://example.com/?k={key}"),
                        ("link", f"<https://example.com/{key}>; rel=x"),
                        *js,
                    ],
                    msg,
                )
            ]
        if variant == "early-hints":
            return [
                b"HTTP/1.1 103 Early Hints\r\nlink: <" + k + b">; rel=preload\r\n\r\n",
                resp("200 OK", js, msg),
            ]
        if variant == "bad-status":
            return [b"HTTP/1.1 40x key " + k + b"\r\ncontent-length: 0\r\n\r\n"]
        if variant == "bad-version":
            return [b"HTTP/7.7 401 " + k + b"\r\ncontent-length: 0\r\n\r\n"]
        if variant == "bad-header":
            return [b"HTTP/1.1 401 No\r\nx: y\r\n" + k + b"\r\ncontent-length: 0\r\n\r\n"]
        if variant == "extra-data":
            return [resp("200 OK", js, b"{}") + b"HTTP/1.1 200 OK\r\nx: " + k + b"\r\n\r\n"]
        if variant == "json-slash":
            return [resp("401 Unauthorized", js, slashed)]
        if variant == "header-name":  # a name cannot be scrubbed into a valid one: dropped
            return [resp("200 OK", [(f"x-{key}", "1"), *js], b"{}")]
        if variant == "escaped":  # the same JSON to any parser, the key in no run of bytes
            esc = "".join(f"\\u{ord(c):04x}" for c in key).encode()
            return [resp("401 Unauthorized", js, b'{"error":{"message":"bad key ' + esc + b'"}}')]
        if variant == "name-all-but-last":  # an invalid name: mitmproxy's 502 quotes it
            return [resp("200 OK", [(f"x-{key[:-1]}", "1"), *js], b"{}")]
        if variant == "status-all-but-last":  # an unparsable status line, quoted likewise
            return [b"HTTP/1.1 2x0 " + k[:-1] + b"\r\ncontent-length: 0\r\n\r\n"]
        if variant == "split-values":  # halves in two fields: a piece of the key each
            half = len(key) // 2
            return [resp("200 OK", [("x-a", key[:half]), ("x-b", key[half:]), *js], b"{}")]
        esc_key = "".join(f"\\u{ord(c):04x}" for c in key)
        if variant == "ndjson-escaped":  # no one JSON document: cannot be re-encoded, killed
            return [resp("200 OK", js, b'{"a":"' + esc_key.encode() + b'"}\n{"b":1}\n')]
        if variant == "nested-escaped":  # escapes inside a string of JSON
            inner = json.dumps({"a": '{"k":"' + esc_key + '"}'}).encode()
            return [resp("200 OK", js, inner)]
        if variant == "array-spelled":  # Gemini's JSON-array stream, read whole
            third = len(key) // 3
            items = [
                {"candidates": [{"content": {"parts": [{"text": t}]}}]}
                for t in ("a ", key[:third], key[third : 2 * third], key[2 * third :])
            ]
            return [resp("200 OK", js, json.dumps(items).encode())]
        if variant == "bogus-coding":  # mitmproxy's error quotes the body's first bytes
            return [resp("200 OK", [*js, ("content-encoding", "bogus")], k)]
        codecs = {
            "gzip": lambda b: gzip.compress(b),
            "deflate": zlib.compress,
            "br": brotli.compress,
        }
        if variant in codecs:
            body = codecs[variant](msg)
            return [resp("401 Unauthorized", [*js, ("content-encoding", variant)], body)]
        if variant == "gzip-gzip":  # stacked codings: what clients undo, mitmproxy may not
            body = gzip.compress(gzip.compress(msg))
            return [resp("401 Unauthorized", [*js, ("content-encoding", "gzip, gzip")], body)]
        if variant == "x-unknown":
            body = gzip.compress(msg)
            return [resp("401 Unauthorized", [*js, ("content-encoding", "x-custom")], body)]
        if variant == "chunked-split":
            head = b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n"
            head += b"transfer-encoding: chunked\r\n\r\n"
            cut = msg.index(k) + len(k) // 2
            parts: list[bytes | float] = [head]
            for piece in (msg[:cut], msg[cut:]):
                parts += [b"%x\r\n%s\r\n" % (len(piece), piece), 0.02]
            return [*parts, b"0\r\n\r\n"]
        if variant == "sse-gzip-spelled":  # not streamable (encoded): guarded whole
            third = len(k) // 3
            events = b"".join(
                b'data: {"candidates":[{"content":{"parts":[{"text":"' + piece + b'"}]}}]}\n\n'
                for piece in (b"a ", k[:third], k[third : 2 * third], k[2 * third :], b" z")
            )
            return [
                resp(
                    "200 OK",
                    [("content-type", "Text/Event-Stream"), ("content-encoding", "gzip")],
                    gzip.compress(events),
                )
            ]
        if variant in ("sse-split", "sse-bytewise", "sse-gzip"):
            events = [
                b'data: {"candidates":[{"content":{"parts":[{"text":"a"}]}}]}\n\n',
                b'data: {"candidates":[{"content":{"parts":[{"text":"' + k + b'"}]}}]}\n\n',
                b'data: {"candidates":[{"content":{"parts":[{"text":"'
                + k.replace(b"/", b"\\/")
                + b'"}]}}],"usageMetadata":{"promptTokenCount":1,"candidatesTokenCount":2}}\n\n',
            ]
            stream = b"".join(events)
            if variant == "sse-gzip":
                return [
                    resp(
                        "200 OK",
                        [("content-type", "text/event-stream"), ("content-encoding", "gzip")],
                        gzip.compress(stream),
                    )
                ]
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            head += b"transfer-encoding: chunked\r\n\r\n"
            step = 1 if variant == "sse-bytewise" else 7
            parts = [head]
            for i in range(0, len(stream), step):
                piece = stream[i : i + step]
                parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            return [*parts, b"0\r\n\r\n"]
        return [resp("401 Unauthorized", js, msg)]


ECHO_VARIANTS = [
    "plain",
    "reason",
    "headers",
    "early-hints",
    "bad-status",
    "bad-version",
    "bad-header",
    "extra-data",
    "json-slash",
    "header-name",
    "name-all-but-last",
    "status-all-but-last",
    "split-values",
    "escaped",
    "bogus-coding",
    "gzip",
    "deflate",
    "br",
    "gzip-gzip",
    "x-unknown",
    "chunked-split",
    "sse-split",
    "sse-bytewise",
    "sse-gzip",
    "sse-gzip-spelled",
    "ndjson-escaped",
    "nested-escaped",
    "array-spelled",
]


# echoes the gateway answers with the key replaced; the others (malformed status line or
# header, stacked or unknown content-encoding) end with the flow killed
SCRUBBED_VARIANTS = [
    "plain",
    "reason",
    "headers",
    "bad-version",
    "json-slash",
    "escaped",
    "gzip",
    "deflate",
    "br",
    "chunked-split",
    "sse-split",
    "sse-bytewise",
    "sse-gzip",
]


# --------------------------------------------------------------------------- driving traffic


@dataclass
class Seen:
    """Everything that came back to the agents."""

    replies: list[bytes] = field(default_factory=list)
    statuses: list[tuple[str, int]] = field(default_factory=list)

    def add(self, what: str, r: Reply) -> None:
        self.statuses.append((what, r.status))
        self.replies.append(b"\n".join([r.raw, *unpacked(r.body)]))

    def blob(self) -> bytes:
        return b"\n".join(self.replies)


def unpacked(body: bytes) -> list[bytes]:
    """``body`` and whatever an agent gets by undoing any compression, layer after layer
    (whatever Content-Encoding claimed: a client or a curious agent would try)."""
    out = [body]
    for _ in range(4):
        data = out[-1]
        for undo in (gzip.decompress, zlib.decompress, brotli.decompress):
            try:
                data = undo(data)
                break
            except Exception:
                continue
        else:
            return out
        out.append(data)
    return out


def tunnel(proxy_port: int, ca: Path, host: str, alpn: str = "http/1.1") -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)
    sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols([alpn])
    return ctx.wrap_socket(sock, server_hostname=host)


def exchange(port: int, ca: Path, host: str, raw: bytes, timeout: float = 5.0) -> Reply:
    """One request; informational (1xx) replies are kept and the final one read too."""
    with tunnel(port, ca, host) as s:
        s.settimeout(timeout)
        s.sendall(raw)
        r = read_reply(s)
        extra = b""
        for _ in range(5):
            if not 100 <= r.status < 200:
                break
            s.settimeout(min(timeout, 1.0))  # mitmproxy may take a 1xx for the final answer
            extra += r.raw
            r = read_reply(s)
        r.raw = extra + r.raw
        return r


def chat_body(model: str, stream: bool = False) -> bytes:
    return json.dumps(
        {
            "model": model,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream,
        }
    ).encode()


def drive(port: int, ca: Path, tokens: dict[str, str], seen: Seen, full: bool = True) -> None:
    """Allowed, denied, erroring and echoing traffic from every kind of agent (``full``: every
    provider; else the echoing upstream and the refusals only)."""
    bot = tokens["bot"]
    auth = [("Authorization", f"Bearer {bot}"), ("Content-Type", "application/json")]
    for provider, (host, path) in HOSTS.items() if full else ():
        model = "claude-3-5-haiku" if provider == "anthropic" else "gpt-4o-mini"
        for extra, stream in (
            ([], False),
            ([], True),
            ([("x-standin-echo-key", "1")], False),
            ([("x-standin-echo-key", "1")], True),
            ([("x-standin-echo-key", "1"), ("x-standin-gzip", "1")], False),
            ([("x-standin-gzip", "1")], False),
            ([("x-standin-echo-key", "1"), ("x-standin-status", "500")], False),
            ([("x-standin-status", "503")], False),
        ):
            raw = request_bytes("POST", path, host, auth + extra, chat_body(model, stream))
            seen.add(f"{provider} {extra} {stream}", exchange(port, ca, host, raw))
    gem = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
    for variant in ECHO_VARIANTS:
        raw = request_bytes("POST", f"{GEMINI_PATH}?echo={variant}", GEMINI_HOST, auth, gem)
        # (an upstream 103 ends the flow: mitmproxy would take it for the final answer)
        seen.add(f"gemini echo {variant}", exchange(port, ca, GEMINI_HOST, raw, 5.0))
    # the key in a query string the agent sent (Gemini's ?key=): stripped, never echoed back
    raw = request_bytes("POST", f"{GEMINI_PATH}?key={bot}&echo=plain", GEMINI_HOST, auth, gem)
    seen.add("gemini key in query", exchange(port, ca, GEMINI_HOST, raw))
    # egress secret, echoed by the stand-in
    gh = [("Authorization", f"Bearer {tokens['coder']}"), ("x-standin-echo-key", "1")]
    raw = request_bytes("GET", "/repos/a/b", "api.github.com", gh, b"", length=False)
    seen.add("github echo", exchange(port, ca, "api.github.com", raw))
    # denied, unauthenticated, no key in the vault, upstream unreachable, Proxy-Authorization
    openai_host, openai_path = HOSTS["openai"]
    for what, hs, body in (
        ("denied", auth, chat_body("gpt-4o")),
        ("bad token", [("Authorization", f"Bearer {bot[:-6]}AAAAAA")], chat_body("gpt-4o-mini")),
        ("revoked-looking", [("x-api-key", bot + "x")], chat_body("gpt-4o-mini")),
        ("no key", [("Authorization", f"Bearer {tokens['empty']}")], chat_body("gpt-4o-mini")),
        ("duplicate json", auth, b'{"model":"gpt-4o-mini","model":"gpt-4o"}'),
    ):
        raw = request_bytes("POST", openai_path, openai_host, hs, body)
        seen.add(what, exchange(port, ca, openai_host, raw))
    dead_path = HOSTS["openai-eu"][1]
    raw = request_bytes("POST", dead_path, DEAD_HOST, auth, chat_body("gpt-4o-mini"))
    seen.add("upstream down", exchange(port, ca, DEAD_HOST, raw))
    malformed(port, ca, bot)
    # HTTP/2 agent, echo streamed and not
    for stream in (False, True):
        with tunnel(port, ca, openai_host, "h2") as s:
            r = H2Client(s).request(
                h2_headers(bot, openai_path, openai_host, [("x-standin-echo-key", "1")]),
                chat_body("gpt-4o-mini", stream),
            )
        hdrs = "\n".join(f"{k}: {v}" for k, v in r.headers).encode()
        seen.replies.append(hdrs + b"\n" + r.body)
        seen.statuses.append((f"h2 echo stream={stream}", r.status))


def _send_raw(sock: socket.socket, raw: bytes) -> None:
    """Send, then read whatever comes back until the proxy closes or goes quiet."""
    sock.settimeout(2)
    with contextlib.suppress(OSError):
        sock.sendall(raw)
        while sock.recv(65536):
            pass


def malformed(port: int, ca: Path, token: str) -> None:
    """Requests mitmproxy cannot parse, carrying the agent's token where it logs them
    verbatim ("Invalid header line: b'...'", "Bad HTTP request line: ...")."""
    basic = base64.b64encode(f"x:{token}".encode()).decode()
    host = HOSTS["openai"][0]
    plain = [
        f"GET http://{host}/v1/models?key={token} HTTP/1.1 junk\r\nHost: {host}\r\n\r\n",
        f"GET http://{host}/v1/models HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization Bearer {token}\r\n\r\n",
        f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n"
        f"Proxy-Authorization Basic {basic}\r\n\r\n",
        f"CONNECT {host}:443 HTTP/1.1\r\nProxy-Authorization: Basic\r\n Bearer {token}\r\n\r\n",
    ]
    for raw in plain:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            _send_raw(sock, raw.encode())
    with tunnel(port, ca, host) as tls:  # the same inside TLS
        _send_raw(
            tls,
            f"POST /v1/x HTTP/1.1\r\nHost: {host}\r\nAuthorization Bearer {token}\r\n\r\n".encode(),
        )
    with tunnel(port, ca, host) as tls:
        _send_raw(tls, f"GET /v1/models?key={token} HTTP/1.1 junk\r\nHost: {host}\r\n\r\n".encode())


# --------------------------------------------------------------------------- the search


def needles(secret: str) -> list[bytes]:
    """The secret, its JSON-escaped form, and a 16-character fragment from its middle."""
    mid = len(secret) // 2
    forms = {secret, secret.replace("/", "\\/"), secret[mid - 8 : mid + 8]}
    return [f.encode() for f in forms]


def token_needles(token: str) -> list[bytes]:
    """The whole token, its signature (the part that makes it a credential), and the Basic
    credential :func:`malformed` sends it in."""
    basic = base64.b64encode(f"x:{token}".encode())
    return [token.encode(), token.rsplit(".", 1)[-1].encode(), basic, basic[-40:]]


def hits(blob: bytes, secrets: dict[str, list[bytes]]) -> list[str]:
    return [name for name, forms in secrets.items() if any(f in blob for f in forms)]


def files_under(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            yield p


@dataclass
class World:
    home: Path
    policies: Path
    si: StandIn
    echo: EchoUpstream
    tokens: dict[str, str]
    seen: Seen
    outputs: dict[str, bytes]  # name -> bytes the gateway printed (logs, screens)
    cli: dict[str, bytes]  # `aiid audit export` etc.: command -> stdout + stderr


def gateway_args(si: StandIn, echo: EchoUpstream) -> list[str]:
    dead = free_port()
    extra = []
    for host in ("acme.openai.azure.com", "api.groq.com", "openrouter.ai"):
        extra += ["--set", f"map_remote=|//{host}/|//localhost:{si.port}/"]
    extra += ["--set", f"map_remote=|//{GEMINI_HOST}/|//localhost:{echo.port}/"]
    extra += ["--set", f"map_remote=|//{DEAD_HOST}/|//localhost:{dead}/"]
    return extra


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("secrets")
    si = StandIn(root)
    si.start()
    echo = EchoUpstream(si.cert_path, si.key_path)
    home = fast_home(root, {"acme": {k: v for k, v in CANARIES.items() if k != "github"}})
    aiid(home, "tenant", "add", "empty")  # the CLI path too: a tenant, a key from stdin
    aiid(home, "vault", "put", "acme", "github", input=CANARIES["github"] + "\n")
    policies = root / "policies"
    policies.mkdir()
    for t in ("acme", "empty"):
        (policies / f"{t}.yaml").write_text(POLICY.format(tenant=t))
    h = Home(home)
    tokens = {
        "bot": issue_token(h, "acme", "bot", 3600),
        "coder": issue_token(h, "acme", "coder-1", 3600),
        "empty": issue_token(h, "empty", "bot", 3600),
    }
    seen = Seen()
    outputs: dict[str, bytes] = {}
    try:
        # 1. plain log mode: stdout and stderr captured
        gw = start_gateway(home, policies, si.port, si.ca_path, extra=gateway_args(si, echo))
        try:
            drive(gw.port, gw.ca, tokens, seen)
        finally:
            gw.stop()
        outputs["stdout+stderr"] = gw.log_path.read_bytes()
        # 2. the live console in a terminal, when tmux is there: the screen, its log file
        if TMUX is not None:
            cg = start_console_gateway(
                home, policies, si.port, si.ca_path, width=160, extra=gateway_args(si, echo)
            )
            try:
                drive(cg.port, cg.ca, tokens, seen, full=False)
                time.sleep(0.6)  # one redraw
                outputs["console screen"] = cg.screen().encode()
                outputs["console scrollback"] = cg.tmux(
                    "capture-pane", "-p", "-S", "-", "-t", cg.session
                ).stdout.encode()
            finally:
                cg.stop()
        yield World(home, policies, si, echo, tokens, seen, outputs, cli_outputs(home))
    finally:
        echo.stop()
        si.stop()


# --------------------------------------------------------------------------- the checks


PROVIDER_SECRETS = {name: needles(secret) for name, secret in CANARIES.items()}


def test_the_traffic_really_happened(world: World) -> None:
    """The search below means something only if keys went out and were echoed back."""
    statuses = dict(world.seen.statuses)
    assert statuses["openai [] False"] == 200
    assert statuses["denied"] == 403 and statuses["bad token"] == 401
    assert statuses["no key"] == 403 and statuses["duplicate json"] == 400
    assert statuses["upstream down"] in (502, 503, 504, 0)
    echoed = [r for r in world.si.requests if r.header("x-standin-echo-key")]
    assert len(echoed) >= 4 * (len(HOSTS) - 1)
    upstream = json.dumps([r.headers for r in world.si.requests])
    for provider in HOSTS:
        if provider != "openai-eu":
            assert CANARIES[provider] in upstream, f"{provider} key never went upstream"
    assert set(world.echo.seen) >= set(ECHO_VARIANTS)
    assert b"[REDACTED]" in world.seen.blob()
    # the echoing upstream's key came back and was replaced (the rest were killed: status 0)
    replies = dict(zip((w for w, _ in world.seen.statuses), world.seen.replies, strict=True))
    for variant in SCRUBBED_VARIANTS:
        assert b"[REDACTED]" in replies[f"gemini echo {variant}"], variant


def test_no_provider_key_in_any_response(world: World) -> None:
    found = [
        (what, hits(reply, PROVIDER_SECRETS))
        for (what, _), reply in zip(world.seen.statuses, world.seen.replies, strict=True)
        if hits(reply, PROVIDER_SECRETS)
    ]
    assert found == [], found


def test_no_provider_key_in_any_file_the_gateway_wrote(world: World) -> None:
    found = [
        (str(p.relative_to(world.home)), hits(p.read_bytes(), PROVIDER_SECRETS))
        for p in files_under(world.home)
        if hits(p.read_bytes(), PROVIDER_SECRETS)
    ]
    assert found == []
    assert any(p.name == "audit.db" for p in files_under(world.home))


def test_no_provider_key_in_gateway_output(world: World) -> None:
    assert world.outputs["stdout+stderr"], "the gateway printed nothing at all"
    found = {name: hits(out, PROVIDER_SECRETS) for name, out in world.outputs.items()}
    assert all(v == [] for v in found.values()), found
    # nor a key's first characters: mitmproxy quotes the first bytes of an undecodable body
    starts = {name: [secret[:8].encode()] for name, secret in CANARIES.items()}
    found = {name: hits(out, starts) for name, out in world.outputs.items()}
    assert all(v == [] for v in found.values()), found


def cli_outputs(home: Path) -> dict[str, bytes]:
    out = {}
    for args in (
        ("audit", "export", "acme", "--format", "jsonl"),
        ("audit", "export", "empty", "--format", "jsonl"),
        ("audit", "tail", "acme"),
        ("audit", "verify", "acme"),
        ("vault", "list", "acme"),
        ("vault", "list", "empty"),
    ):
        p = aiid(home, *args, check=False)
        out[" ".join(args)] = (p.stdout + p.stderr).encode()
    return out


def test_no_provider_key_in_audit_export_or_vault_list(world: World) -> None:
    outs = world.cli
    export = outs["audit export acme --format jsonl"].decode()
    rows = [json.loads(line) for line in export.splitlines() if line.strip()]
    assert len(rows) > 50 and all("mac" in r for r in rows)
    assert any(r["event"] == "response" for r in rows) and any(r["event"] == "deny" for r in rows)
    assert "openai" in outs["vault list acme"].decode()
    found = {name: hits(out, PROVIDER_SECRETS) for name, out in outs.items()}
    assert all(v == [] for v in found.values()), found


def test_no_agent_token_in_any_audit_row_or_log_line(world: World) -> None:
    tokens = {name: token_needles(t) for name, t in world.tokens.items()}
    places = {
        **world.outputs,
        **world.cli,
        **{str(p.relative_to(world.home)): p.read_bytes() for p in files_under(world.home)},
    }
    found = {name: hits(blob, tokens) for name, blob in places.items() if hits(blob, tokens)}
    assert found == {}
    # the token's id is what the audit log keeps
    import jwt

    jti = jwt.decode(world.tokens["bot"], options={"verify_signature": False})["jti"]
    assert jti in places["audit export acme --format jsonl"].decode()


def test_no_agent_token_upstream(world: World) -> None:
    """Not one request the providers received carried an agent token, anywhere."""
    upstream = json.dumps([(r.path, r.headers) for r in world.si.requests]).encode()
    upstream += b"".join(r.body for r in world.si.requests)
    tokens = {name: token_needles(t) for name, t in world.tokens.items()}
    assert hits(upstream, tokens) == []


@pytest.mark.parametrize("variant", ["ndjson-escaped", "nested-escaped", "array-spelled"])
def test_a_key_that_cannot_be_scrubbed_from_a_body_kills_the_flow(
    world: World, variant: str
) -> None:
    """Escapes in no one JSON document (or in a string of JSON), a key spelled over a
    JSON-array stream: nothing to re-encode safely, so nothing is sent."""
    statuses = dict(world.seen.statuses)
    assert statuses[f"gemini echo {variant}"] == 0  # the connection was killed


def test_a_key_spelled_in_an_encoded_event_stream_is_cut(world: World) -> None:
    """gzip despite `accept-encoding: identity`: mitmproxy cannot stream it, the gateway reads
    it whole and guards it as a stream: the text the agent assembles never holds the key."""
    replies = dict(zip((w for w, _ in world.seen.statuses), world.seen.replies, strict=True))
    body = unpacked(replies["gemini echo sse-gzip-spelled"])[-1]
    text = ""
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            obj = json.loads(line[6:])
            for cand in obj.get("candidates", []):
                text += "".join(p.get("text", "") for p in cand["content"]["parts"])
    assert text.startswith("a ") and CANARIES["gemini"][:4] not in text, text
    assert b"spelled out the key" in body
