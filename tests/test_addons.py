"""The mitmproxy addons, driven through mitmproxy's own AddonManager the way the proxy core
drives them (no network): requestheaders -> request -> (our refusal | simulated upstream)
-> responseheaders -> [streamed body] -> response. The manager catches and logs an exception
per top-level addon, exactly as in production, so fail-closed behaviour is tested for real.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CANARY_GITHUB,
    CANARY_OPENAI,
    NOKEY_TENANT,
    TENANT,
    audit_rows,
    write_policies,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from mitmproxy import exceptions, http
from mitmproxy.addons import onboarding, proxyserver, save, savehar, tlsconfig
from mitmproxy.flow import Error
from mitmproxy.proxy.layers.http import (
    HttpConnectHook,
    HttpErrorHook,
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.proxy.layers.tcp import TcpStartHook
from mitmproxy.proxy.layers.udp import UdpStartHook
from mitmproxy.proxy.layers.websocket import WebsocketStartHook
from mitmproxy.proxy.server_hooks import ClientDisconnectedHook
from mitmproxy.test import taddons, tflow, tutils

from addons import logscrub, pipeline, runtime
from addons import response as response_side
from addons.pipeline import (
    AuditStage,
    IdentityStage,
    InjectStage,
    Intake,
    LastGate,
    PolicyStage,
    RateLimitStage,
    RouteStage,
    make_addons,
)
from addons.runtime import Runtime
from aiid_proxy.admin import revoke_token
from aiid_proxy.clock import FakeClock
from aiid_proxy.control import Answer
from aiid_proxy.errors import AuditError, SecretNotFound
from aiid_proxy.gateway import Gateway
from aiid_proxy.home import Home
from aiid_proxy.providers import ACCOUNT_HEADERS, CREDENTIAL_HEADERS
from aiid_proxy.scrub import Scrubber, public_prefix

KILLED = Error.KILLED_MESSAGE
CHAT = "/v1/chat/completions"
OPENAI = "api.openai.com"


def chat_body(model: str = "gpt-4o-mini", **extra: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    body.update(extra)
    return json.dumps(body).encode()


def make_flow(
    token: str | None = None,
    *,
    host: str = OPENAI,
    port: int = 443,
    scheme: str = "https",
    method: str = "POST",
    path: str = CHAT,
    body: bytes | None = None,
    headers: list[tuple[str, str]] | None = None,
    host_header: str | None = None,
    connect_host: str | None = None,
    sni: str | None = None,
    tls: bool = True,
) -> http.HTTPFlow:
    """A request as mitmproxy hands it to addons inside a CONNECT tunnel to ``host``."""
    f = tflow.tflow()
    req = f.request
    req.scheme = scheme
    req.host = host
    req.port = port
    req.method = method
    req.path = path
    req.authority = ""
    fields: list[tuple[str, str]] = [("Host", host_header or host)]
    if token is not None:
        fields.append(("Authorization", f"Bearer {token}"))
    fields.append(("content-type", "application/json"))
    fields.extend(headers or [])
    req.headers = http.Headers([(k.encode(), v.encode()) for k, v in fields])
    req.content = chat_body() if body is None else body
    f.client_conn.tls = tls
    f.client_conn.sni = (sni or host) if tls else None
    f.server_conn.address = (connect_host or host, port)
    return f


def upstream_response(
    content: bytes | None = None, headers: dict[str, str] | None = None, status: int = 200
) -> http.Response:
    if content is None:
        content = json.dumps(
            {
                "id": "chatcmpl-1",
                "choices": [{"message": {"role": "assistant", "content": "hello"}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
            }
        ).encode()
    return http.Response.make(status, content, headers or {"content-type": "application/json"})


def killed(flow: http.HTTPFlow) -> bool:
    return flow.error is not None and flow.error.msg == KILLED


@dataclass
class Result:
    flow: http.HTTPFlow
    sent: http.Request | None = None  # what left for the provider (None: nothing did)
    streamed: list[bytes] = field(default_factory=list)  # what a stream filter released


class Harness:
    """The addons in a real mitmproxy AddonManager, plus the plumbing to drive flows."""

    def __init__(self, gw: Gateway, home: Home, clock: FakeClock, addons: list[Any]) -> None:
        self.gw = gw
        self.home = home
        self.clock = clock
        self.addons = addons
        self.rt: Runtime = addons[0]
        self.tctx = taddons.context(*addons)
        self.loop = self.tctx.master.event_loop
        self.futures: list[Any] = []
        for name in ("record_error", "record_refusal", "record_response", "record_approval"):
            self._spy(name)

    def _spy(self, name: str) -> None:
        """Keep every audit future the addons start, so a test can wait for all of them."""
        real = getattr(self.gw, name)

        def spy(*a: Any, **kw: Any) -> Any:
            fut = real(*a, **kw)
            if fut is not None:
                self.futures.append(fut)
            return fut

        setattr(self.gw, name, spy)

    def addon(self, cls: type) -> Any:
        return next(a for a in self.addons if type(a) is cls)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def hook(self, hook: Any) -> None:
        await self.tctx.master.addons.handle_lifecycle(hook)

    async def drive(
        self,
        flow: http.HTTPFlow,
        upstream: http.Response | None = None,
        chunks: list[bytes] | None = None,
    ) -> Result:
        """One flow through the hooks in the order mitmproxy's HTTP layer fires them."""
        res = Result(flow)
        await self.hook(HttpRequestHeadersHook(flow))
        if killed(flow):
            return res
        await self.hook(HttpRequestHook(flow))
        if killed(flow):
            await self.hook(HttpErrorHook(flow))
            return res
        if flow.response is None:
            res.sent = flow.request.copy()
            flow.response = upstream or upstream_response()
        await self.hook(HttpResponseHeadersHook(flow))
        if killed(flow):
            await self.hook(HttpErrorHook(flow))
            return res
        stream = flow.response.stream
        if callable(stream) and chunks is not None:
            res.streamed = [stream(c) for c in chunks]
            res.streamed.append(stream(b""))
            flow.response.content = b""  # store_streamed_bodies is off
        await self.hook(HttpResponseHook(flow))
        return res

    def send(self, flow: http.HTTPFlow, **kw: Any) -> Result:
        res = self.run(self.drive(flow, **kw))
        self.settle()
        return res

    def settle(self) -> None:
        """Wait until every audit record the addons queued is committed."""
        for fut in self.futures:
            with contextlib.suppress(Exception):  # a failed append is the test's business
                fut.result(timeout=10)

    def rows(self, tenant: str = TENANT, request_id: str | None = None) -> list[dict[str, Any]]:
        self.settle()
        rows = audit_rows(self.home, tenant)
        if request_id is not None:
            rows = [r for r in rows if r["request_id"] == request_id]
        return rows

    def close(self) -> None:
        self.tctx.__exit__(None, None, None)


@pytest.fixture
def make_harness(
    make_gateway: Callable[..., Gateway],
    policies_dir: Path,
    gateway_home: Home,
    fake_clock: FakeClock,
) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(
        policies: Path | None = None,
        edit: Callable[[list[Any]], list[Any]] | None = None,
        **gw_kw: Any,
    ) -> Harness:
        gw = make_gateway(policies or policies_dir, **gw_kw)
        addons = make_addons(Runtime(gateway=gw))
        if edit is not None:
            addons = edit(addons)
        h = Harness(gw, gateway_home, fake_clock, addons)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture
def h(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


def refusal(flow: http.HTTPFlow) -> dict[str, Any]:
    """The refusal we answered with, checked against the contract's shape."""
    resp = flow.response
    assert resp is not None
    assert resp.headers["content-type"] == "application/json"
    doc = json.loads(resp.content or b"")
    assert doc["type"] == "error"
    assert set(doc["error"]) == {"type", "message", "rule", "request_id"}
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    assert doc["error"]["request_id"] == resp.headers["x-aiid-request-id"]
    assert doc["error"]["request_id"].startswith("req_")
    return doc["error"]


def rid_of(flow: http.HTTPFlow) -> str:
    st = runtime.state_of(flow)
    assert st is not None
    return st.request_id


# --------------------------------------------------------------------------------------------
# allowed requests
# --------------------------------------------------------------------------------------------


def _basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"agent:{token}".encode()).decode()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(
            lambda t: [
                ("Authorization", f"Bearer {t}"),
                ("AUTHORIZATION", f"bearer {t}"),
                ("X-Api-Key", t),
                ("api-KEY", t),
                ("x-goog-api-key", t),
                ("X-GOOG-API-KEY", t),
            ],
            id="same-token-in-every-sdk-header-repeated-odd-case",
        ),
        pytest.param(
            lambda t: [
                ("Proxy-Authorization", _basic(t)),
                ("Authorization", "Bearer sk-junk-from-the-sdk"),
                ("authorization", "Bearer other-junk"),
                ("x-API-key", "junk"),
                ("Api-Key", "junk2"),
                ("x-goog-api-key", "junk3"),
                ("PROXY-AUTHORIZATION", f"Bearer {t}"),
            ],
            id="proxy-authorization-wins-junk-elsewhere",
        ),
    ],
)
def test_allowed_request_strips_every_credential_and_injects_the_vault_key(
    h: Harness, issue: Callable[..., str], headers: Callable[[str], list[tuple[str, str]]]
) -> None:
    flow = make_flow(headers=headers(issue()), path=CHAT + "?key=agent-key&keep=1")
    seen_at_gate: list[list[dict[str, Any]]] = []
    gate = h.addon(LastGate)
    real_gate = gate.request

    def spying_gate(f: http.HTTPFlow) -> None:
        seen_at_gate.append(audit_rows(h.home))  # what is committed when the gate runs
        real_gate(f)

    gate.request = spying_gate

    res = h.send(flow)

    assert not killed(flow)
    assert res.sent is not None, "the request should have gone upstream"
    sent = res.sent
    for name in CREDENTIAL_HEADERS:
        if name != "authorization":
            assert sent.headers.get_all(name) == [], name
    assert sent.headers.get_all("authorization") == [f"Bearer {CANARY_OPENAI}"]
    assert "key" not in sent.query and sent.query.get("keep") == "1"
    assert "proxy-connection" not in sent.headers
    assert sent.content == chat_body()
    assert sent.host == OPENAI and sent.scheme == "https"

    rid = rid_of(flow)
    assert len(seen_at_gate) == 1
    before_gate = [r for r in seen_at_gate[0] if r["request_id"] == rid]
    assert [r["event"] for r in before_gate] == ["request"]
    req = before_gate[0]
    assert (req["agent"], req["provider"], req["model"], req["rule"]) == (
        "bot",
        "openai",
        "gpt-4o-mini",
        "small-models",
    )
    assert req["seq"] >= 1 and req["mac"]
    events = [r["event"] for r in h.rows(request_id=rid)]
    assert events == ["request", "response"]
    assert flow.response is not None and flow.response.headers["x-aiid-request-id"] == rid


def test_no_secret_or_token_is_written_to_the_audit_log(
    h: Harness, issue: Callable[..., str]
) -> None:
    token = issue()
    h.send(make_flow(token))
    h.send(make_flow(token, body=chat_body("gpt-4o")))
    dump = json.dumps(h.rows(), default=str)
    assert CANARY_OPENAI not in dump
    assert token not in dump
    assert '"hi"' not in dump  # record_prompts is off


def test_prompts_and_completions_are_recorded_only_when_the_tenant_asks(
    make_harness: Callable[..., Harness], policies_dir: Path, issue: Callable[..., str]
) -> None:
    policy = policies_dir / "acme.yaml"
    plain = make_harness(policies_dir)  # the policy as it was: nothing kept
    flow = make_flow(issue())
    plain.send(flow)
    for r in plain.rows(request_id=rid_of(flow)):
        assert {"prompt", "completion"}.isdisjoint(json.loads(str(r["detail"])))
    policy.write_text(
        policy.read_text().replace(
            "default: deny\n", "default: deny\naudit: {record_prompts: true}\n"
        )
    )
    h = make_harness(policies_dir)
    flow = make_flow(issue())
    h.send(flow)
    rows = {r["event"]: json.loads(str(r["detail"])) for r in h.rows(request_id=rid_of(flow))}
    assert '"hi"' in rows["request"]["prompt"]
    # and the completion, as the agent got it (the key the provider echoed is scrubbed)
    assert json.loads(rows["response"]["completion"])["choices"][0]["message"]["content"]
    echo = make_flow(issue())
    h.send(echo, upstream=http.Response.make(200, b'{"echo": "' + CANARY_OPENAI.encode() + b'"}'))
    done = next(r for r in h.rows(request_id=rid_of(echo)) if r["event"] == "response")
    assert json.loads(json.loads(str(done["detail"]))["completion"]) == {"echo": "[REDACTED]"}
    # a streamed completion is kept as the events the agent got
    sflow = make_flow(issue(), body=chat_body(stream=True))
    stream = _sse({"choices": [{"delta": {"content": "streamed " + CANARY_OPENAI}}]})
    h.send(sflow, upstream=http.Response.make(200, b"", {"content-type": "text/event-stream"}),
           chunks=[stream[:20], stream[20:]])  # fmt: skip
    done = next(r for r in h.rows(request_id=rid_of(sflow)) if r["event"] == "response")
    kept = json.loads(str(done["detail"]))["completion"]
    assert "streamed [REDACTED]" in kept and kept.startswith("data: ")
    assert CANARY_OPENAI not in json.dumps(h.rows(), default=str)


def test_gzip_body_is_decoded_for_policy_and_forwarded_decoded(
    h: Harness, issue: Callable[..., str]
) -> None:
    flow = make_flow(issue(), headers=[("content-encoding", "gzip")])
    flow.request.raw_content = gzip.compress(chat_body())
    res = h.send(flow)
    assert res.sent is not None
    assert "content-encoding" not in res.sent.headers
    assert res.sent.raw_content == chat_body()
    assert res.sent.headers["content-length"] == str(len(chat_body()))


def test_host_egress_rule_injects_its_secret(h: Harness, issue: Callable[..., str]) -> None:
    flow = make_flow(issue(), host="api.github.com", method="GET", path="/repos/a/b", body=b"")
    res = h.send(flow)
    assert res.sent is not None
    assert res.sent.headers.get_all("authorization") == [f"Bearer {CANARY_GITHUB}"]
    # the canary contains "/": its JSON-escaped form is scrubbed too
    echo = json.dumps({"seen": CANARY_GITHUB}).replace("/", "\\/").encode()
    flow2 = make_flow(issue(), host="api.github.com", method="GET", path="/repos/a/b", body=b"")
    h.send(flow2, upstream=upstream_response(echo))
    assert flow2.response is not None
    assert b"canary" not in (flow2.response.content or b"")


def test_an_egress_rule_without_inject_sends_no_credential(
    make_harness: Callable[..., Harness], issue: Callable[..., str], tmp_path: Path
) -> None:
    """`inject` is optional: the request leaves with every credential the agent sent
    stripped and none added (it was refused with "names no secret to inject", while
    `policy explain` said allow)."""
    d = write_policies(tmp_path / "noinject")
    text = (d / f"{TENANT}.yaml").read_text()
    rule = "  - {id: status-read, hosts: [status.example.com], methods: [GET], effect: allow}\n"
    (d / f"{TENANT}.yaml").write_text(text.replace("limits:", rule + "limits:", 1))
    h = make_harness(d)
    token = issue()
    flow = make_flow(
        token, host="status.example.com", method="GET", path=f"/x?token={token}&page=2",
        body=b"", headers=[("cookie", f"t={token}"), ("x-auth-token", token), ("x-keep", "1")],
    )  # fmt: skip
    res = h.send(flow)
    assert res.sent is not None
    sent = {k.lower() for k, _ in res.sent.headers.fields}
    assert not sent & {b"authorization", b"x-api-key", b"proxy-authorization"}
    # the agent's token in any other field never leaves either (its signature is the mark)
    assert token.rsplit(".", 1)[-1] not in repr(res.sent.headers.fields) + res.sent.url
    assert res.sent.headers["x-keep"] == "1" and res.sent.query.get("page") == "2"
    assert flow.response is not None and flow.response.status_code == 200
    assert [r["event"] for r in h.rows(request_id=rid_of(flow))] == ["request", "response"]


# --------------------------------------------------------------------------------------------
# refusals: status, shape, audit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    build: Callable[[Harness, Callable[..., str]], http.HTTPFlow]
    status: int
    type: str
    rule: str | None = None
    tenant: str | None = TENANT  # where the deny record goes; None: unauthenticated, no record
    setup: Callable[[Harness], None] | None = None


def _flow(**kw: Any) -> Callable[[Harness, Callable[..., str]], http.HTTPFlow]:
    def build(h: Harness, issue: Callable[..., str]) -> http.HTTPFlow:
        return make_flow(issue(), **kw)

    return build


def _expired(h: Harness, issue: Callable[..., str]) -> http.HTTPFlow:
    token = issue(ttl=60)
    h.clock.advance(60)  # at exp: refused from then on
    return make_flow(token)


def _revoked(h: Harness, issue: Callable[..., str]) -> http.HTTPFlow:
    token = issue()
    jti = h.gw.verifier.verify(token).jti
    revoke_token(h.home, TENANT, jti)
    h.clock.advance(2)  # past the revocation list's re-stat interval
    return make_flow(token)


def _target_flow(
    authority: str, *, host_headers: tuple[str, ...] | None = None
) -> Callable[[Harness, Callable[..., str]], http.HTTPFlow]:
    """Inside a tunnel to api.openai.com: a request target (absolute-form, or HTTP/2's
    :authority) of ``authority``, and these Host headers (None: the default one)."""

    def build(h: Harness, issue: Callable[..., str]) -> http.HTTPFlow:
        f = make_flow(issue())
        f.request.authority = authority
        if host_headers is not None:
            f.request.headers.pop("Host", None)
            for v in host_headers:
                f.request.headers.add("Host", v)
        return f

    return build


def _gzip_flow(
    payload: bytes, coding: str = "gzip"
) -> Callable[[Harness, Callable[..., str]], http.HTTPFlow]:
    """A request whose raw body is ``payload`` sent as ``Content-Encoding: coding``."""

    def build(h: Harness, issue: Callable[..., str]) -> http.HTTPFlow:
        f = make_flow(issue())
        f.request.headers["Content-Encoding"] = coding
        f.request.raw_content = payload
        return f

    return build


def _set_body_limit(h: Harness) -> None:
    h.gw.body_limit = 1024


def ref(
    build: Callable[[Harness, Callable[..., str]], http.HTTPFlow],
    status: int,
    type_: str,
    rule: str | None = None,
    *,
    tenant: str | None = TENANT,
    setup: Callable[[Harness], None] | None = None,
    events: tuple[str, ...] = ("deny",),
    id: str,
) -> Any:
    return pytest.param(build, status, type_, rule, tenant, setup, events, id=id)


ANON = {"tenant": None}  # unauthenticated: no tenant to audit in
SMALL = {"setup": _set_body_limit}

REFUSALS = [
    ref(_flow(body=chat_body("gpt-4o")), 403, "policy_denied", "no-gpt-4o", id="denied-model"),
    ref(
        _flow(body=chat_body("gpt-3.5-turbo")),
        403,
        "policy_denied",
        "default",
        id="no-rule-default-deny",
    ),
    ref(lambda h, i: make_flow(None), 401, "unauthenticated", **ANON, id="missing-token"),
    ref(lambda h, i: make_flow(""), 401, "unauthenticated", **ANON, id="empty-bearer"),
    ref(lambda h, i: make_flow("not-a-jwt"), 401, "unauthenticated", **ANON, id="bad-token"),
    ref(
        lambda h, i: make_flow(i()[:-4] + "AAAA"),
        401,
        "unauthenticated",
        **ANON,
        id="bad-signature",
    ),
    # signed by the admin key but no longer valid: refused, and audited in its tenant
    ref(_expired, 401, "unauthenticated", id="expired-token"),
    ref(_revoked, 401, "unauthenticated", id="revoked-token"),
    ref(
        lambda h, i: make_flow("sk-proj-abcdefghijklmnopqrstuvwxyz012345"),
        401,
        "unauthenticated",
        **ANON,
        id="raw-provider-key",
    ),
    ref(
        lambda h, i: make_flow(i(), headers=[("x-api-key", i("other"))]),
        401,
        "unauthenticated",
        **ANON,
        id="two-different-tokens",
    ),
    ref(
        lambda h, i: make_flow(headers=[("Authorization", "Digest abc")]),
        401,
        "unauthenticated",
        **ANON,
        id="unsupported-scheme",
    ),
    ref(
        lambda h, i: make_flow(headers=[("Proxy-Authorization", "Basic !!!")]),
        401,
        "unauthenticated",
        **ANON,
        id="malformed-basic",
    ),
    # routing
    ref(_flow(host="example.com", path="/"), 403, "policy_denied", "default", id="unknown-host"),
    ref(_flow(host="93.184.216.34"), 403, "policy_denied", "default", id="raw-ipv4-host"),
    ref(_flow(host="127.1"), 403, "policy_denied", "default", id="shorthand-ip-host"),
    ref(
        _flow(host="::1", host_header="[::1]"), 403, "policy_denied", "default", id="raw-ipv6-host"
    ),
    ref(_flow(port=8443), 403, "policy_denied", "default", id="port-not-443"),
    ref(_flow(method="post"), 400, "bad_request", id="lower-case-method"),
    ref(_flow(scheme="http", tls=False), 403, "policy_denied", "default", id="plain-http"),
    ref(
        _flow(connect_host="evil.example"),
        403,
        "policy_denied",
        "default",
        id="host-connect-mismatch",
    ),
    ref(_flow(sni="evil.example"), 403, "policy_denied", "default", id="sni-mismatch"),
    ref(
        _flow(host="evil.example", host_header=OPENAI, tls=False),
        403,
        "policy_denied",
        "default",
        id="absolute-form-host-header-mismatch",
    ),
    # mitmproxy keeps an absolute-form target inside a tunnel and sends it upstream as is:
    # "POST https://evil.example/... HTTP/1.1" with Host api.openai.com (or none) went out
    # with the key, audited as api.openai.com
    ref(
        _target_flow("evil.example"),
        403,
        "policy_denied",
        "default",
        id="absolute-form-in-tunnel-other-host",
    ),
    ref(
        _target_flow("evil.example", host_headers=()),
        403,
        "policy_denied",
        "default",
        id="absolute-form-in-tunnel-no-host-header",
    ),
    ref(
        _target_flow("api.openai.com:8443"),
        403,
        "policy_denied",
        "default",
        id="absolute-form-in-tunnel-other-port",
    ),
    ref(
        _target_flow("api.openai.com:99999"),
        403,
        "policy_denied",
        "default",
        id="absolute-form-in-tunnel-bad-port",
    ),
    ref(
        _target_flow("api.openai.com", host_headers=(OPENAI, "evil.example")),
        403,
        "policy_denied",
        "default",
        id="two-host-headers-disagree",
    ),
    ref(
        _flow(headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")]),
        403,
        "policy_denied",
        "default",
        id="websocket-upgrade",
    ),
    ref(
        _flow(path="/v1/fine_tuning/jobs"),
        403,
        "policy_denied",
        "default",
        id="unknown-provider-path",
    ),
    ref(
        _flow(method="DELETE", path="/repos/a/b", host="api.github.com", body=b""),
        403,
        "policy_denied",
        "default",
        id="host-rule-wrong-method",
    ),
    # bodies
    ref(
        _gzip_flow(gzip.compress(chat_body("gpt-4o"))),
        403,
        "policy_denied",
        "no-gpt-4o",
        id="gzip-hides-denied-model",
    ),
    ref(_gzip_flow(b"\x1f\x8b not gzip at all"), 400, "bad_request", id="undecodable-gzip"),
    ref(_gzip_flow(gzip.compress(chat_body())[:-6]), 400, "bad_request", id="truncated-gzip"),
    ref(_gzip_flow(chat_body(), "compress"), 400, "bad_request", id="unknown-encoding"),
    ref(_flow(body=b"model=gpt-4o-mini"), 400, "bad_request", id="non-json"),
    ref(_flow(body=b'["gpt-4o-mini"]'), 400, "bad_request", id="json-not-object"),
    ref(
        _flow(body=b'{"model": "gpt-4o-mini", "model": "gpt-4o"}'),
        400,
        "bad_request",
        id="duplicate-json-keys",
    ),
    ref(_flow(body=chat_body(user="x" * 2000)), 413, "too_large", **SMALL, id="body-over-limit"),
    ref(
        _gzip_flow(gzip.compress(b" " * 5000)), 413, "too_large", **SMALL, id="gzip-bomb-over-limit"
    ),
    # credentials
    ref(
        lambda h, i: make_flow(i(tenant=NOKEY_TENANT)),
        403,
        "policy_denied",
        "vault",  # not the rule that allowed it ([AB])
        tenant=NOKEY_TENANT,
        events=("request", "deny"),
        id="tenant-without-vault-key",
    ),
]


@pytest.mark.parametrize(
    ("build", "status", "type_", "rule", "tenant", "setup", "events"), REFUSALS
)
def test_refusals(
    h: Harness,
    issue: Callable[..., str],
    build: Callable[[Harness, Callable[..., str]], http.HTTPFlow],
    status: int,
    type_: str,
    rule: str | None,
    tenant: str | None,
    setup: Callable[[Harness], None] | None,
    events: tuple[str, ...],
) -> None:
    if setup is not None:
        setup(h)
    flow = build(h, issue)
    res = h.send(flow)

    assert res.sent is None, "a refused request must not leave"
    assert not killed(flow)
    assert flow.response is not None and flow.response.status_code == status
    err = refusal(flow)
    assert err["type"] == type_
    if rule is not None:
        assert err["rule"] == rule
    rid = err["request_id"]
    assert rid == rid_of(flow)
    if tenant is None:
        assert not h.rows(request_id=rid)
        assert not h.rows(NOKEY_TENANT, request_id=rid)
    else:
        rows = h.rows(tenant, request_id=rid)
        assert tuple(r["event"] for r in rows) == events
        deny = rows[-1]
        assert deny["status"] == status
        if rule is not None:
            assert deny["rule"] == rule
        assert deny["agent"] == "bot"
        assert deny["reason"].startswith(type_)


# --------------------------------------------------------------------------------------------
# Proxy-Authorization on the CONNECT
# --------------------------------------------------------------------------------------------


def connect_flow(like: http.HTTPFlow, host: str, proxy_auth: str | None) -> http.HTTPFlow:
    """The CONNECT that opened ``like``'s client connection."""
    headers = http.Headers()
    if proxy_auth is not None:
        headers["Proxy-Authorization"] = proxy_auth
    req = tutils.treq(
        method=b"CONNECT",
        scheme=b"",
        host=host,
        port=443,
        authority=f"{host}:443".encode(),
        path=b"",
        headers=headers,
        content=b"",
    )
    return tflow.tflow(client_conn=like.client_conn, req=req)


@pytest.mark.parametrize(
    ("connect_auth", "sdk_auth", "status"),
    [
        pytest.param(lambda t: _basic(t), "Bearer sk-anything", 200, id="basic-token-junk-sdk-key"),
        pytest.param(lambda t: f"Bearer {t}", "Bearer sk-anything", 200, id="bearer-token"),
        pytest.param(lambda t: _basic(t), None, 200, id="no-sdk-key-at-all"),
        pytest.param(lambda t: _basic(t), "Negotiate x y z", 200, id="unparseable-sdk-key-unread"),
        pytest.param(lambda t: "Basic !!notbase64", None, 401, id="malformed-connect-auth"),
        pytest.param(lambda t: _basic("garbage"), None, 401, id="bad-token-on-connect"),
        pytest.param(
            lambda t: _basic("garbage"), "token", 401, id="valid-sdk-key-does-not-override"
        ),
    ],
)
def test_connect_proxy_authorization_identifies_the_connection(
    h: Harness,
    issue: Callable[..., str],
    connect_auth: Callable[[str], str],
    sdk_auth: str | None,
    status: int,
) -> None:
    token = issue()
    headers = [] if sdk_auth is None else [("Authorization", sdk_auth.replace("token", token))]
    flow = make_flow(headers=headers)
    conn = connect_flow(flow, OPENAI, connect_auth(token))
    h.run(h.hook(HttpConnectHook(conn)))
    # a host name: the tunnel is allowed, its 200 names the tunnel's request id ([AA]: the
    # contract has every response to an agent carry one; mitmproxy's own 200 had no header)
    assert conn.response is not None and conn.response.status_code == 200
    assert conn.response.headers["x-aiid-request-id"].startswith("req_")
    assert "content-length" not in conn.response.headers  # none on a 2xx to CONNECT (RFC 9110)

    res = h.send(flow)
    assert not killed(flow)
    assert flow.response is not None
    if status == 200:
        assert res.sent is not None
        assert res.sent.headers.get_all("authorization") == [f"Bearer {CANARY_OPENAI}"]
    else:
        assert res.sent is None
        assert flow.response.status_code == status
        assert refusal(flow)["type"] == "unauthenticated"


def test_connect_token_is_forgotten_when_the_client_disconnects(
    h: Harness, issue: Callable[..., str]
) -> None:
    flow = make_flow()
    h.run(h.hook(HttpConnectHook(connect_flow(flow, OPENAI, _basic(issue())))))
    guard = h.addon(pipeline.ConnectGuard)
    assert flow.client_conn.id in guard.conn_tokens
    h.run(h.hook(ClientDisconnectedHook(flow.client_conn)))
    assert flow.client_conn.id not in guard.conn_tokens


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("10.0.0.1", id="ipv4"),
        pytest.param("::1", id="ipv6"),
        pytest.param("2130706433", id="decimal-ipv4"),
        pytest.param("0x7f.1", id="hex-shorthand"),
    ],
)
def test_connect_to_a_raw_ip_is_refused(h: Harness, host: str) -> None:
    conn = connect_flow(make_flow(), host, None)
    h.run(h.hook(HttpConnectHook(conn)))
    assert conn.response is not None and conn.response.status_code == 403
    assert refusal(conn)["type"] == "policy_denied"


def test_a_raw_ip_connect_by_an_identified_agent_is_audited(
    h: Harness, issue: Callable[..., str]
) -> None:
    conn = connect_flow(make_flow(), "169.254.169.254", _basic(issue("coder-1")))
    h.run(h.hook(HttpConnectHook(conn)))
    err = refusal(conn)
    rows = h.rows(request_id=err["request_id"])
    assert [(r["event"], r["agent"], r["status"]) for r in rows] == [("deny", "coder-1", 403)]
    assert "raw IP addresses are not allowed" in rows[0]["reason"]
    # a CONNECT with a forged token is refused just the same, and not audited anywhere
    forged = connect_flow(make_flow(), "10.0.0.1", _basic(issue("coder-1")[:-4] + "AAAA"))
    h.run(h.hook(HttpConnectHook(forged)))
    assert forged.response is not None and forged.response.status_code == 403
    assert not h.rows(request_id=refusal(forged)["request_id"])


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(tflow.ttcpflow, id="tcp"),
        pytest.param(tflow.tudpflow, id="udp"),
    ],
)
def test_tcp_and_udp_flows_are_killed(h: Harness, make: Callable[[], Any]) -> None:
    f = make()
    hook = TcpStartHook(f) if make is tflow.ttcpflow else UdpStartHook(f)
    h.run(h.hook(hook))
    assert f.error is not None and f.error.msg == KILLED


def test_websocket_start_kills(h: Harness) -> None:
    f = tflow.twebsocketflow()
    h.run(h.hook(WebsocketStartHook(f)))
    assert killed(f)


# --------------------------------------------------------------------------------------------
# rate limits
# --------------------------------------------------------------------------------------------


def test_rate_limit_refuses_the_extra_request_until_time_passes(
    h: Harness, issue: Callable[..., str]
) -> None:
    token = issue("limited-1")
    for _ in range(2):
        res = h.send(make_flow(token))
        assert res.sent is not None
    flow = make_flow(token)
    res = h.send(flow)
    assert res.sent is None
    assert flow.response is not None and flow.response.status_code == 429
    err = refusal(flow)
    assert err["type"] == "rate_limited"
    retry = int(flow.response.headers["retry-after"])
    assert retry >= 1
    assert "x-should-retry" not in flow.response.headers  # this one passes later: retry
    rows = h.rows(request_id=err["request_id"])
    assert [(r["event"], r["status"]) for r in rows] == [("deny", 429)]

    # another agent is not limited by limited-1's bucket
    assert h.send(make_flow(issue("bot"))).sent is not None

    h.clock.advance(retry)
    assert h.send(make_flow(token)).sent is not None


def _limited_tokens(make_harness: Callable[..., Harness], policies: Path, tpm: int) -> Harness:
    """A harness whose limited-* agents also have ``tpm`` tokens a minute."""
    acme = policies / f"{TENANT}.yaml"
    acme.write_text(
        acme.read_text().replace(
            '"limited-*": {requests_per_minute: 2}',
            f'"limited-*": {{requests_per_minute: 2, tokens_per_minute: {tpm}}}',
        )
    )
    return make_harness()


def test_a_request_larger_than_the_token_limit_is_told_it_can_never_pass(
    make_harness: Callable[..., Harness], policies_dir: Path, issue: Callable[..., str]
) -> None:
    h = _limited_tokens(make_harness, policies_dir, 1000)
    flow = make_flow(issue("limited-1"), body=chat_body(max_tokens=5000))
    assert h.send(flow).sent is None
    assert flow.response is not None and flow.response.status_code == 429
    err = refusal(flow)
    assert err["type"] == "rate_limited" and err["rule"] == "agent tokens_per_minute"
    assert "more than the agent tokens_per_minute limit ever allows" in err["message"]
    assert "lower max_tokens" in err["message"]
    # the SDKs retry a 429 after Retry-After unless told not to: this one never passes
    assert flow.response.headers["x-should-retry"] == "false"


def test_counting_tokens_costs_no_tokens_per_minute(
    make_harness: Callable[..., Harness], policies_dir: Path, issue: Callable[..., str]
) -> None:
    """messages/count_tokens processes nothing: it reserved its input against the agent's
    tokens_per_minute (a count before each call halved the agent's rate) and was recorded as
    estimated input usage."""
    h = _limited_tokens(make_harness, policies_dir, 50)
    token = issue("limited-1")
    body = json.dumps(
        {
            "model": "claude-3-5-haiku-latest",
            "messages": [{"role": "user", "content": "word " * 600}],
        }
    ).encode()
    for _ in range(2):  # each over the whole limit, were it counted
        flow = make_flow(
            token, host="api.anthropic.com", path="/v1/messages/count_tokens", body=body
        )
        res = h.send(flow, upstream=upstream_response(b'{"input_tokens": 754}'))
        assert res.sent is not None, refusal(flow)
        row = response_row(h, flow)
        assert (row["input_tokens"], row["output_tokens"]) == (0, 0)
        assert "usage_estimated" not in json.loads(row["detail"])


def test_without_max_tokens_a_small_token_limit_reserves_what_it_leaves(
    make_harness: Callable[..., Harness], policies_dir: Path, issue: Callable[..., str]
) -> None:
    # The default reservation (4096 output tokens) over a 300/minute limit refused every
    # request that set no max_tokens, for ever.
    h = _limited_tokens(make_harness, policies_dir, 300)
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    flow = make_flow(issue("limited-1"), body=body)
    assert h.send(flow).sent is not None
    st = runtime.state_of(flow)
    assert st is not None and st.route is not None and st.route.facts is not None
    est_in = st.route.facts.estimated_input_tokens
    assert st.output_cap == 300 - est_in  # the stream is cut there
    # A request that asks for more than the limit by max_tokens is still refused as such.
    big = make_flow(issue("limited-1"), body=chat_body(max_tokens=301))
    assert h.send(big).sent is None and big.response is not None
    assert big.response.status_code == 429


def test_a_refusal_after_the_rate_limit_stage_gives_the_reservation_back(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """limited-* may send 2 a minute: one refused at inject (no key) then two allowed."""
    vault = h.gw.tenant(TENANT).vault
    real_get = vault.get
    missing = {"on": True}

    def get(name: str) -> Any:
        if missing["on"]:
            raise SecretNotFound(name)
        return real_get(name)

    monkeypatch.setattr(vault, "get", get)
    token = issue("limited-2")
    denied = make_flow(token)
    h.send(denied)
    assert denied.response is not None and denied.response.status_code == 403
    assert refusal(denied)["type"] == "policy_denied"
    missing["on"] = False
    for _ in range(2):
        assert h.send(make_flow(token)).sent is not None


# --------------------------------------------------------------------------------------------
# approvals
# --------------------------------------------------------------------------------------------


async def _held(
    h: Harness,
    flow: http.HTTPFlow,
    answer: Answer | None,
    meanwhile: Callable[[], None] | None = None,
) -> tuple[Result, str]:
    """Drive ``flow`` until the policy stage holds it, run ``meanwhile``, answer, and let it
    finish."""
    pending = asyncio.Event()
    h.gw.listeners.append(lambda kind, data: pending.set() if kind == "pending" else None)
    task = asyncio.ensure_future(h.drive(flow))
    await asyncio.wait_for(pending.wait(), 10)
    st = runtime.state_of(flow)
    assert st is not None and st.request_id in h.rt.broker.pending
    assert not task.done()  # nothing left while held
    # nothing but the hold itself is on record while it waits (that record is not awaited)
    assert {r["event"] for r in audit_rows(h.home) if r["request_id"] == st.request_id} <= {"held"}
    if meanwhile is not None:
        meanwhile()
    if answer is not None:
        h.rt.broker.answer(TENANT, st.request_id, answer)
    res = await asyncio.wait_for(task, 10)
    assert st.request_id not in h.rt.broker.pending
    return res, st.request_id


@pytest.mark.parametrize(
    ("answer", "passes", "decided_by"),
    [
        pytest.param(Answer(True, "alice"), True, "alice", id="approved"),
        pytest.param(Answer(False, "bob", "too expensive"), False, "bob", id="denied"),
    ],
)
def test_approve_rule_holds_until_a_human_answers(
    h: Harness, issue: Callable[..., str], answer: Answer, passes: bool, decided_by: str
) -> None:
    flow = make_flow(issue(), body=chat_body("o1-mini"))
    res, rid = h.run(_held(h, flow, answer))
    h.settle()
    rows = h.rows(request_id=rid)
    held = rows[0]  # on record from the start of the hold, before anyone answers
    assert (held["event"], held["rule"], held["status"]) == ("held", "big-needs-human", None)
    assert held["reason"].startswith("held for approval by rule big-needs-human, ")
    assert held["reason"].endswith(f"aiid approve {TENANT} {rid}")
    approval = next(r for r in rows if r["event"] == "approval")
    assert json.loads(approval["detail"])["decided_by"] == decided_by
    assert decided_by in approval["reason"]
    assert approval["rule"] == "big-needs-human"
    if passes:
        assert res.sent is not None
        assert res.sent.headers["authorization"] == f"Bearer {CANARY_OPENAI}"
        assert [r["event"] for r in rows] == ["held", "approval", "request", "response"]
        assert json.loads(rows[2]["detail"])["approved_by"] == "alice"
    else:
        assert res.sent is None
        assert flow.response is not None and flow.response.status_code == 403
        err = refusal(flow)
        assert err["rule"] == "big-needs-human" and "bob" in err["message"]
        assert [r["event"] for r in rows] == ["held", "approval", "deny"]


def test_an_approval_that_cannot_be_recorded_kills_the_flow_on_record(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error inside the gateway (the contract): killed, with an `error` record; it was a
    503 `audit_error` refusal, a type the contract does not have (pass [W])."""
    from concurrent.futures import Future

    def unrecorded(*a: Any, **kw: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        fut.set_exception(AuditError("audit write failed: disk I/O error"))
        return fut

    monkeypatch.setattr(h.gw, "record_approval", unrecorded)
    flow = make_flow(issue(), body=chat_body("o1-mini"))
    res, rid = h.run(_held(h, flow, Answer(True, "alice")))
    h.settle()
    assert_killed(res, recorded=True)
    (err,) = error_rows(h, flow)
    assert err["reason"] == "approval record not written: audit write failed: disk I/O error"


@pytest.mark.parametrize(
    ("change", "status", "kind", "needle"),
    [
        pytest.param("revoke", 401, "unauthenticated", "token revoked while", id="revoked"),
        pytest.param("expire", 401, "unauthenticated", "token expired while", id="expired"),
        pytest.param("deny-edit", 403, "policy_denied", "policy changed while", id="policy-edit"),
    ],
)
def test_an_approval_never_outlives_a_revocation_or_a_denying_edit(
    h: Harness, issue: Callable[..., str], change: str, status: int, kind: str, needle: str
) -> None:
    """The token and the policy are checked again when a human approves: minutes may pass."""
    token = issue(ttl=600)
    jti = h.gw.verifier.verify(token).jti

    def meanwhile() -> None:
        if change == "revoke":
            revoke_token(h.home, TENANT, jti)
            h.clock.advance(5)  # past the revocation list's polling interval
        elif change == "expire":
            h.clock.advance(601)
        else:
            path = h.gw.policies.directory / f"{TENANT}.yaml"
            text = path.read_text().replace(
                "- id: big-needs-human",
                "- id: no-o1\n    models: [o1*]\n    effect: deny\n  - id: big-needs-human",
            )
            path.write_text(text)
            h.gw.policies.refresh()
            assert "no-o1" in [r.id for r in h.gw.policy_for(TENANT).rules]  # type: ignore[union-attr]

    flow = make_flow(token, body=chat_body("o1-mini"))
    res, rid = h.run(_held(h, flow, Answer(True, "alice"), meanwhile))
    h.settle()
    assert res.sent is None
    assert flow.response is not None and flow.response.status_code == status
    err = refusal(flow)
    assert err["type"] == kind and needle in err["message"], err
    rows = h.rows(request_id=rid)
    assert [r["event"] for r in rows] == ["held", "approval", "deny"]
    assert rows[-1]["status"] == status


def test_a_held_request_whose_agent_hangs_up_leaves_the_pending_list(
    h: Harness, issue: Callable[..., str]
) -> None:
    """Nobody waits for the answer any more: denied at once ("the agent hung up"), on
    record, instead of waiting for a human (who could still approve it) or the timeout."""
    flow = make_flow(issue(), body=chat_body("o1-mini"))
    guard = h.addon(pipeline.ConnectGuard)
    res, rid = h.run(_held(h, flow, None, lambda: guard.client_disconnected(flow.client_conn)))
    h.settle()
    assert res.sent is None and rid not in h.rt.broker.pending and not h.rt.holds
    rows = h.rows(request_id=rid)
    assert [r["event"] for r in rows] == ["held", "approval", "deny"]
    assert "the agent hung up" in rows[1]["reason"]


def test_a_request_refused_anyway_is_never_held_for_a_human(
    make_harness: Callable[..., Harness], issue: Callable[..., str], tmp_path: Path
) -> None:
    """Under a budget, a model with no price is refused (403, rule budgets): before the hold,
    not after a human approved it."""
    d = write_policies(tmp_path / "priced")
    f = d / f"{TENANT}.yaml"
    f.write_text(f.read_text() + "budgets:\n  tenant: {usd_per_day: 5}\n")
    h = make_harness(d)
    flow = make_flow(issue(), body=chat_body("o1-unpriced-x"))
    res = h.run(asyncio.wait_for(h.drive(flow), 10))  # a hold would hang: nobody answers
    h.settle()
    assert res.sent is None and flow.response is not None
    assert flow.response.status_code == 403 and refusal(flow)["rule"] == "budgets"
    assert [r["event"] for r in h.rows(request_id=rid_of(flow))] == ["deny"]


def test_approval_with_ttl_grants_later_identical_requests(
    h: Harness, issue: Callable[..., str]
) -> None:
    token = issue()
    res, _ = h.run(
        _held(h, make_flow(token, body=chat_body("o1-mini")), Answer(True, "alice", ttl=60))
    )
    assert res.sent is not None
    # granted: no hold this time (the harness would hang on a hold: nobody answers)
    again = make_flow(token, body=chat_body("o1-mini"))
    res2 = h.run(asyncio.wait_for(h.drive(again), 10))
    assert res2.sent is not None
    # Each request record says how it was approved: the held one by alice's answer (with its
    # approval record), the second by her standing approval, without a hold or a record.
    first, second = (
        [r for r in h.rows(request_id=rid_of(f)) if r["event"] != "response"]
        for f in (res.flow, again)
    )
    assert [r["event"] for r in first] == ["held", "approval", "request"]
    assert first[2]["reason"] == "approved by alice"
    assert [(r["event"], r["reason"]) for r in second] == [
        ("request", "approved by alice (standing approval, not held)")
    ]


def test_a_standing_approval_of_an_egress_request_covers_that_method_and_path_only(
    make_harness: Callable[..., Harness], policies_dir: Path, issue: Callable[..., str]
) -> None:
    """The grant key had no method or path for egress: approving DELETE /repos/a/x for an
    hour approved, unasked, every DELETE the rule matches."""
    acme = policies_dir / f"{TENANT}.yaml"
    acme.write_text(
        acme.read_text().replace(
            "limits:",
            "  - id: github-deletes-need-human\n"
            '    hosts: ["api.github.com"]\n'
            "    methods: [DELETE]\n"
            '    paths: ["/repos/*"]\n'
            "    inject: {header: Authorization, scheme: Bearer, secret: github}\n"
            "    effect: approve\n"
            "limits:",
        )
    )
    h = make_harness()
    token = issue()

    def delete(path: str) -> http.HTTPFlow:
        return make_flow(token, host="api.github.com", method="DELETE", path=path, body=b"")

    res, _ = h.run(_held(h, delete("/repos/a/x"), Answer(True, "alice", ttl=3600)))
    assert res.sent is not None
    same = h.run(asyncio.wait_for(h.drive(delete("/repos/a/x")), 10))  # granted: not held
    assert same.sent is not None
    other, _ = h.run(_held(h, delete("/repos/a/y"), Answer(False, "bob")))  # held again
    assert other.sent is None and other.flow.response is not None
    assert other.flow.response.status_code == 403


@pytest.mark.parametrize(
    "ttl", [pytest.param("600", id="string"), pytest.param(10**300, id="huge-int")]
)
def test_a_control_answer_with_a_ttl_that_is_no_number_is_refused(h: Harness, ttl: Any) -> None:
    """A string ttl was dropped (approved once, no grant, no word); a 300-digit one raised
    OverflowError with a traceback."""
    from aiid_proxy.errors import AiidError

    msg = {"tenant": TENANT, "request_id": "req_1", "answer": "approve", "ttl": ttl}
    with pytest.raises(AiidError, match="ttl must be a number of seconds"):
        h.rt._answer(msg)  # noqa: SLF001 - the control channel's handler


def test_a_hold_whose_record_is_refused_leaves_nothing_pending(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held record refused (a closed or broken log): the flow dies, and no pending entry
    stays behind for `aiid approve` to answer, or for shutdown to wait on."""

    def refused(*a: Any, **kw: Any) -> Any:
        raise AuditError("audit log closed")

    monkeypatch.setattr(h.gw, "record_hold", refused)
    flow = make_flow(issue(), body=chat_body("o1-mini"))
    res = h.run(asyncio.wait_for(h.drive(flow), 10))
    assert res.sent is None and killed(flow)
    assert h.rt.broker.pending == {} and h.rt.holds == {}


def test_approval_timeout_denies(
    make_harness: Callable[..., Harness], issue: Callable[..., str], tmp_path: Path
) -> None:
    h = make_harness(write_policies(tmp_path / "quick", approval_timeout="0.01s"))
    flow = make_flow(issue(), body=chat_body("o1-mini"))
    res, rid = h.run(_held(h, flow, None))
    assert res.sent is None
    assert flow.response is not None and flow.response.status_code == 403
    assert "timeout" in refusal(flow)["message"]
    assert [r["event"] for r in h.rows(request_id=rid)] == ["held", "approval", "deny"]


# --------------------------------------------------------------------------------------------
# fail closed
# --------------------------------------------------------------------------------------------


def error_rows(h: Harness, flow: http.HTTPFlow) -> list[dict[str, Any]]:
    st = runtime.state_of(flow)
    if st is None:
        return []
    return [r for r in h.rows(request_id=st.request_id) if r["event"] == "error"]


def assert_killed(res: Result, *, recorded: bool) -> None:
    flow = res.flow
    assert killed(flow), flow.error
    assert res.sent is None, "a killed flow must not leave"
    assert flow.response is None
    st = runtime.state_of(flow)
    if recorded:
        assert st is not None and st.error_recorded


def _without(cls: type) -> Callable[[list[Any]], list[Any]]:
    return lambda addons: [a for a in addons if type(a) is not cls]


@pytest.mark.parametrize(
    ("cls", "identified"),
    [
        pytest.param(Intake, False, id="no-intake-no-flowstate"),
        pytest.param(IdentityStage, False, id="no-identity"),
        pytest.param(RouteStage, True, id="no-route"),
        pytest.param(PolicyStage, True, id="no-policy"),
        pytest.param(RateLimitStage, True, id="no-ratelimit"),
        pytest.param(AuditStage, True, id="no-audit"),
        pytest.param(InjectStage, True, id="no-inject"),
    ],
)
def test_a_missing_stage_kills_the_flow(
    make_harness: Callable[..., Harness], issue: Callable[..., str], cls: type, identified: bool
) -> None:
    h = make_harness(edit=_without(cls))
    flow = make_flow(issue())
    res = h.send(flow)
    assert_killed(res, recorded=identified)
    if identified:
        rows = error_rows(h, flow)
        assert len(rows) == 1 and "verdict" in rows[0]["reason"]
    else:
        assert error_rows(h, flow) == []


class Foreign:
    """Another addon in the chain doing something to the flow in its ``request`` hook."""

    def __init__(self, name: str, act: Callable[[http.HTTPFlow], None]) -> None:
        self.name = name
        self.act = act

    def request(self, flow: http.HTTPFlow) -> None:
        self.act(flow)


def _before(cls: type, foreign: Foreign) -> Callable[[list[Any]], list[Any]]:
    def edit(addons: list[Any]) -> list[Any]:
        i = next(i for i, a in enumerate(addons) if type(a) is cls)
        return [*addons[:i], foreign, *addons[i:]]

    return edit


def _set(attr: str, value: Any) -> Callable[[http.HTTPFlow], None]:
    return lambda f: setattr(f.request, attr, value)


def _fake_response(f: http.HTTPFlow) -> None:
    f.response = http.Response.make(200, b'{"fake": true}')


@pytest.mark.parametrize(
    ("act", "before", "identified"),
    [
        pytest.param(
            _set("content", chat_body().replace(b"-mini", b"-maxi")),
            LastGate,
            True,
            id="same-length-body-after-seal",
        ),
        pytest.param(_set("content", chat_body("gpt-4o")), LastGate, True, id="body-after-seal"),
        pytest.param(_set("host", "evil.example"), LastGate, True, id="host-after-seal"),
        pytest.param(_set("port", 8443), LastGate, True, id="port-after-seal"),
        pytest.param(_set("method", "PUT"), LastGate, True, id="method-after-seal"),
        pytest.param(
            lambda f: setattr(f.request.data, "method", b"post"),
            LastGate,
            True,
            id="method-case-after-seal",
        ),
        pytest.param(_set("path", "/v1/embeddings"), LastGate, True, id="path-after-seal"),
        pytest.param(_set("scheme", "http"), LastGate, True, id="scheme-after-seal"),
        pytest.param(_set("stream", True), LastGate, True, id="streaming-after-seal"),
        pytest.param(
            lambda f: f.request.query.update({"x": "1"}), LastGate, True, id="query-after-seal"
        ),
        pytest.param(
            lambda f: f.request.headers.add("x-exfil", "1"),
            LastGate,
            True,
            id="header-added-after-seal",
        ),
        pytest.param(
            lambda f: f.request.headers.update({"Host": "evil.example"}),
            LastGate,
            True,
            id="host-header-after-seal",
        ),
        pytest.param(
            lambda f: f.request.headers.update({"authorization": "Bearer x"}),
            LastGate,
            True,
            id="credential-after-seal",
        ),
        pytest.param(
            _set("trailers", http.Headers(x=b"1")), LastGate, True, id="trailers-after-seal"
        ),
        pytest.param(
            _set("authority", "evil.example"), LastGate, True, id="request-target-after-seal"
        ),
        pytest.param(_fake_response, LastGate, True, id="foreign-response-before-gate"),
        pytest.param(_fake_response, IdentityStage, False, id="foreign-response-first"),
        pytest.param(lambda f: f.metadata.pop("aiid"), LastGate, False, id="state-removed"),
    ],
)
def test_tampering_after_the_verdict_kills_the_flow(
    make_harness: Callable[..., Harness],
    issue: Callable[..., str],
    act: Callable[[http.HTTPFlow], None],
    before: type,
    identified: bool,
) -> None:
    h = make_harness(edit=_before(before, Foreign("tamper", act)))
    flow = make_flow(issue())
    res = h.send(flow)
    assert_killed(res, recorded=identified)
    assert len(error_rows(h, flow)) == (1 if identified else 0)


@pytest.mark.parametrize(
    ("cls", "hook", "identified"),
    [
        pytest.param(Intake, "requestheaders", False, id="intake"),
        pytest.param(IdentityStage, "request", False, id="identity-stage"),
        pytest.param(RouteStage, "request", True, id="route-stage"),
        pytest.param(PolicyStage, "request", True, id="policy-stage"),
        pytest.param(RateLimitStage, "request", True, id="ratelimit-stage"),
        pytest.param(AuditStage, "request", True, id="audit-stage"),
        pytest.param(InjectStage, "request", True, id="inject-stage"),
        pytest.param(LastGate, "_passes", True, id="gate-itself"),
    ],
)
def test_an_exception_in_any_stage_kills_the_flow(
    h: Harness, issue: Callable[..., str], cls: type, hook: str, identified: bool
) -> None:
    addon = h.addon(cls)

    def boom(*a: Any, **kw: Any) -> None:
        raise RuntimeError("injected fault")

    setattr(addon, hook, boom)
    flow = make_flow(issue())
    res = h.send(flow)
    assert_killed(res, recorded=identified)
    assert len(error_rows(h, flow)) == (1 if identified else 0)


@pytest.mark.parametrize(
    ("method", "identified"),
    [
        pytest.param("new_flow", False, id="new_flow"),
        pytest.param("identify", False, id="identify"),
        pytest.param("route", True, id="route"),
        pytest.param("decide", True, id="decide"),
        pytest.param("reserve", True, id="reserve"),
        pytest.param("audit_request", True, id="audit_request"),
        pytest.param("audit_done", True, id="audit_done"),
        pytest.param("inject", True, id="inject"),
        pytest.param("seal_digest", True, id="seal_digest"),
        pytest.param("check_sealed", True, id="check_sealed"),
        pytest.param("policy_for", True, id="policy_for"),
    ],
)
def test_an_exception_in_the_library_kills_the_flow(
    h: Harness,
    issue: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    identified: bool,
) -> None:
    def boom(*a: Any, **kw: Any) -> None:
        raise RuntimeError(f"injected fault in {method}")

    monkeypatch.setattr(h.gw, method, boom)
    flow = make_flow(issue())
    res = h.send(flow)
    assert_killed(res, recorded=identified)
    assert len(error_rows(h, flow)) == (1 if identified else 0)


def test_a_request_record_never_committed_kills_the_flow_after_the_wait(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer stopped (SIGSTOP) or stuck on its storage never answers: the flow is refused
    after AUDIT_WAIT instead of hanging the agent, and nothing leaves."""
    from concurrent.futures import Future

    audit = h.gw.tenant(TENANT).audit
    real_append = audit.append
    stuck: list[Future[Any]] = []

    def append(event: str, **fields: Any) -> Future[Any]:
        if event == "request":
            stuck.append(Future())
            return stuck[-1]
        return real_append(event, **fields)

    monkeypatch.setattr(audit, "append", append)
    monkeypatch.setattr(runtime.settled, "__defaults__", (0.05,))
    flow = make_flow(issue())
    res = h.run(asyncio.wait_for(h.drive(flow), 10))
    assert_killed(res, recorded=True)
    (row,) = error_rows(h, flow)
    assert "did not commit the record within 0.05 s" in (row["reason"] or "")
    assert len(stuck) == 1 and not stuck[0].done()


@pytest.mark.parametrize("at_once", [False, True], ids=["through-the-future", "at-append"])
def test_an_audit_failure_kills_the_flow(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch, at_once: bool
) -> None:
    """The audit writer reports failure through the future, or append refuses at once (a
    closed log): nothing may leave unrecorded, and the error says why in one line."""
    from concurrent.futures import Future

    audit = h.gw.tenant(TENANT).audit
    real_append = audit.append

    def append(event: str, **fields: Any) -> Future[Any]:
        if event == "request":
            if at_once:
                raise AuditError("audit log is closed")
            fut: Future[Any] = Future()
            fut.set_exception(AuditError("disk full"))
            return fut
        return real_append(event, **fields)

    monkeypatch.setattr(audit, "append", append)
    flow = make_flow(issue())
    res = h.send(flow)
    assert_killed(res, recorded=True)
    (row,) = error_rows(h, flow)
    assert "request record not written" in (row["reason"] or "")


@pytest.mark.parametrize(
    "hook",
    [
        pytest.param("responseheaders", id="responseheaders"),
        pytest.param("response", id="response"),
    ],
)
def test_an_exception_in_the_response_filter_kills_the_flow(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch, hook: str
) -> None:
    """An echo of the key must not reach the agent unscrubbed because the scrubber failed."""
    calls = {"n": 0}
    real = response_side.ResponseFilter._scrubber

    def failing(st: Any) -> Any:
        calls["n"] += 1
        if (hook == "responseheaders") == (calls["n"] == 1):
            raise RuntimeError("injected fault")
        return real(st)

    monkeypatch.setattr(response_side.ResponseFilter, "_scrubber", staticmethod(failing))
    flow = make_flow(issue())
    h.send(flow, upstream=upstream_response(f'{{"echo": "{CANARY_OPENAI}"}}'.encode()))
    assert killed(flow)
    assert len(error_rows(h, flow)) == 1


# --------------------------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------------------------


def response_row(h: Harness, flow: http.HTTPFlow) -> dict[str, Any]:
    rows = [r for r in h.rows(request_id=rid_of(flow)) if r["event"] == "response"]
    assert len(rows) == 1
    return rows[0]


def test_allowed_response_carries_the_request_id_and_usage_is_recorded(
    h: Harness, issue: Callable[..., str]
) -> None:
    flow = make_flow(issue())
    h.send(flow)
    assert flow.response is not None and flow.response.status_code == 200
    assert flow.response.headers["x-aiid-request-id"] == rid_of(flow)
    row = response_row(h, flow)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == (200, 7, 5)
    assert row["model"] == "gpt-4o-mini" and row["agent"] == "bot"


def test_a_tenant_registered_in_a_region_is_kept_there(
    make_harness: Callable[..., Harness], gateway_home: Home, issue: Callable[..., str]
) -> None:
    # `aiid tenant add acme --region eu`; acme's policy names no region: openai is in "us"
    settings = gateway_home.tenant_settings_path(TENANT)
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "region": "eu"}))
    h = make_harness()
    flow = make_flow(issue())
    h.send(flow)
    err = refusal(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert (err["type"], err["rule"]) == ("policy_denied", "region")
    assert err["message"] == (
        "provider region 'us' is outside the tenant region 'eu' (aiid tenant add)"
    )
    assert [r["event"] for r in audit_rows(h.home)][-1] == "deny"


def _gzip_resp(body: bytes) -> http.Response:
    r = http.Response.make(
        200, b"", {"content-type": "application/json", "content-encoding": "gzip"}
    )
    r.raw_content = gzip.compress(body)
    return r


ECHO = json.dumps(
    {
        "error": {"message": f"Incorrect API key provided: {CANARY_OPENAI}; {CANARY_OPENAI}"},
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
).encode()


@pytest.mark.parametrize(
    "upstream",
    [
        pytest.param(
            lambda: http.Response.make(
                401,
                ECHO,
                {"content-type": "application/json", "x-echo": f"Bearer {CANARY_OPENAI}"},
            ),
            id="identity-body-and-header",
        ),
        pytest.param(lambda: _gzip_resp(ECHO), id="gzip-body"),
        pytest.param(
            lambda: http.Response.make(
                200, ECHO.replace(b"/", b"\\/"), {"content-type": "text/plain"}
            ),
            id="plain-text",
        ),
    ],
)
def test_the_injected_key_never_comes_back(
    h: Harness, issue: Callable[..., str], upstream: Callable[[], http.Response]
) -> None:
    flow = make_flow(issue())
    h.send(flow, upstream=upstream())
    resp = flow.response
    assert resp is not None
    raw = b"".join(k + v for k, v in resp.headers.fields) + (resp.raw_content or b"")
    body = resp.get_content(strict=True) or b""
    for blob in (raw, body):
        assert CANARY_OPENAI.encode() not in blob
    assert body.count(b"[REDACTED]") == 2
    if "x-echo" in resp.headers:
        assert resp.headers["x-echo"] == "Bearer [REDACTED]"
    row = response_row(h, flow)
    assert json.loads(row["detail"]).get("scrubbed_secrets", 0) >= 2
    assert (row["input_tokens"], row["output_tokens"]) == (3, 2)


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def test_a_stream_in_transit_at_shutdown_is_charged_its_pieces(
    h: Harness, issue: Callable[..., str]
) -> None:
    """The response filter tells the flow's state what its stream carried so far: the
    shutdown's error record charges it (it charged no output at all)."""
    flow = make_flow(issue(), body=chat_body(stream=True, max_tokens=500))

    async def go() -> None:
        await h.hook(HttpRequestHeadersHook(flow))
        await h.hook(HttpRequestHook(flow))
        flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
        await h.hook(HttpResponseHeadersHook(flow))

    h.run(go())
    stream = flow.response.stream if flow.response else None
    assert callable(stream)
    for _ in range(40):  # 40 pieces reached the agent, then the gateway stops
        stream(b'data: {"choices": [{"delta": {"content": "abcdefgh"}}]}\n\n')
    h.gw.close()
    (err,) = error_rows(h, flow)
    assert err["reason"] == "gateway shut down before the request completed"
    assert err["output_tokens"] >= 40
    # cut there: what is charged is what the agent got, nothing more leaves (pieces that
    # arrived between the record and the connection's end were charged to nobody)
    assert not stream(b'data: {"choices": [{"delta": {"content": "more"}}]}\n\n')


def test_a_response_released_just_before_the_shutdown_is_a_response_on_record(
    h: Harness, issue: Callable[..., str]
) -> None:
    """Its accounting was due on the loop's next turn, the shutdown came first: the agent
    had the whole 200, the record said "shut down before the request completed"."""
    flow = make_flow(issue())

    async def go() -> None:
        await h.hook(HttpRequestHeadersHook(flow))
        await h.hook(HttpRequestHook(flow))
        flow.response = upstream_response()
        await h.hook(HttpResponseHeadersHook(flow))
        await h.hook(HttpResponseHook(flow))
        h.gw.close()  # before the loop's next turn

    h.run(go())
    assert not killed(flow) and flow.response is not None
    assert error_rows(h, flow) == []
    row = response_row(h, flow)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == (200, 7, 5)


@pytest.mark.parametrize("hook", ["responseheaders", "response"])
def test_an_answer_that_arrives_after_the_shutdown_recorded_its_end_is_not_let_out(
    h: Harness, issue: Callable[..., str], hook: str
) -> None:
    flow = make_flow(issue())

    async def go() -> None:
        await h.hook(HttpRequestHeadersHook(flow))
        await h.hook(HttpRequestHook(flow))
        flow.response = upstream_response()
        if hook == "response":
            await h.hook(HttpResponseHeadersHook(flow))
        h.gw.close()  # records the flow's end: an error
        await h.hook(
            HttpResponseHeadersHook(flow) if hook == "responseheaders" else HttpResponseHook(flow)
        )

    h.run(go())
    assert killed(flow)
    (err,) = error_rows(h, flow)
    assert err["reason"] == "gateway shut down before the request completed"


def test_streamed_response_is_scrubbed_across_chunks_and_usage_counted(
    h: Harness, issue: Callable[..., str]
) -> None:
    flow = make_flow(issue(), body=chat_body(stream=True, stream_options={"include_usage": True}))
    stream = _sse(
        {"choices": [{"delta": {"content": "your key is " + CANARY_OPENAI}}]},
        {"choices": [{"delta": {"content": "!"}}]},
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4}},
    )
    at = stream.index(CANARY_OPENAI.encode())
    cuts = [0, at + 3, at + 10, at + len(CANARY_OPENAI) - 1, len(stream)]
    chunks = [stream[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    upstream = http.Response.make(200, b"", {"content-type": "text/event-stream"})

    res = h.send(flow, upstream=upstream, chunks=chunks)

    assert res.sent is not None
    assert res.sent.headers["accept-encoding"] == "identity"
    assert callable(flow.response.stream) if flow.response else False
    out = b"".join(res.streamed)
    assert out == stream.replace(CANARY_OPENAI.encode(), b"[REDACTED]")
    # nothing is held back once the key is complete and an event ends
    assert res.streamed[-1] == b""
    assert flow.response is not None
    assert flow.response.headers["x-aiid-request-id"] == rid_of(flow)
    row = response_row(h, flow)
    assert (row["input_tokens"], row["output_tokens"]) == (11, 4)
    assert json.loads(row["detail"])["scrubbed_secrets"] == 1


@pytest.mark.parametrize(
    "authority",
    [
        pytest.param(OPENAI, id="authority"),
        pytest.param(f"{OPENAI}:443", id="authority-with-port"),
        pytest.param("API.OpenAI.com.", id="authority-other-case-trailing-dot"),
    ],
)
def test_a_request_target_naming_the_same_host_is_allowed(
    h: Harness, issue: Callable[..., str], authority: str
) -> None:
    """HTTP/2's :authority (or an absolute-form target) that names the tunnel's own host."""
    flow = make_flow(issue())
    flow.request.authority = authority
    res = h.send(flow)
    assert res.sent is not None and not killed(flow)
    assert res.sent.authority == authority


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        pytest.param("path", b"/v1/chat/completions\xff", id="path"),
        pytest.param("path", b"/v1/chat/completions?x=\xff", id="query"),
        pytest.param("method", b"P\xffST", id="method"),
        pytest.param("host", b"api.openai.com\xff", id="host"),
    ],
)
def test_a_refusal_of_undecodable_request_bytes_is_on_record(
    h: Harness, issue: Callable[..., str], field: str, raw: bytes
) -> None:
    """mitmproxy keeps undecodable request-line bytes (surrogate escapes): the deny record's
    detail raised in the audit log's text check, so the refusal left with no record."""
    flow = make_flow(issue())
    setattr(flow.request.data, field, raw)
    if field == "host":
        flow.request.headers["Host"] = raw.decode("utf-8", "surrogateescape")
    res = h.send(flow)
    assert res.sent is None and flow.response is not None
    assert flow.response.status_code in (400, 403)
    rows = h.rows(request_id=rid_of(flow))
    assert [r["event"] for r in rows] == ["deny"]


@pytest.mark.parametrize("streamed", [pytest.param(True, id="sse"), pytest.param(False, id="json")])
def test_upstream_trailers_never_reach_the_agent(
    h: Harness, issue: Callable[..., str], streamed: bool
) -> None:
    """mitmproxy sends ``response.trailers`` (HTTP/2 upstreams) after the response hook: an
    event stream's were relayed unscrubbed, the injected key in them."""
    leak = http.Headers([(b"x-upstream-debug", f"key={CANARY_OPENAI}".encode())])
    if streamed:
        flow = make_flow(issue(), body=chat_body(stream=True))
        upstream = http.Response.make(200, b"", {"content-type": "text/event-stream"})
        upstream.trailers = leak
        res = h.send(flow, upstream=upstream, chunks=[_sse({"choices": [{"delta": {}}]})])
        assert res.streamed  # the stream path
    else:
        flow = make_flow(issue())
        upstream = upstream_response()
        upstream.trailers = leak
        h.send(flow, upstream=upstream)
    assert flow.response is not None and not killed(flow)
    assert flow.response.trailers is None


def test_refusal_responses_are_not_scrubbed_or_recorded_as_responses(
    h: Harness, issue: Callable[..., str]
) -> None:
    flow = make_flow(issue(), body=chat_body("gpt-4o"))
    h.send(flow)
    rows = h.rows(request_id=rid_of(flow))
    assert [r["event"] for r in rows] == ["deny"]


def test_upstream_error_is_audited(h: Harness, issue: Callable[..., str]) -> None:
    flow = make_flow(issue())

    async def go() -> None:
        await h.hook(HttpRequestHeadersHook(flow))
        await h.hook(HttpRequestHook(flow))
        flow.error = Error("connection refused")
        await h.hook(HttpErrorHook(flow))

    h.run(go())
    rows = error_rows(h, flow)
    assert len(rows) == 1 and "connection refused" in rows[0]["reason"]


@pytest.mark.parametrize(
    ("message", "leak"),
    [
        pytest.param(
            f"Received invalid header name: b'x-{CANARY_OPENAI}'", CANARY_OPENAI, id="name"
        ),
        # h2 quotes a GOAWAY's debug data (20 bytes) as hex: a server put the key there
        pytest.param(
            "HTTP/2 connection closed: <ConnectionTerminated error_code:2, last_stream_id:1, "
            f"additional_data:{(b'bye ' + CANARY_OPENAI.encode())[:20].hex()}>",
            CANARY_OPENAI[:16].encode().hex(),
            id="goaway-hex",
        ),
        # [AK] mitmproxy's 502 quoted an upstream status line with the key upper-cased
        pytest.param(
            f"Cannot parse HTTP response: Bad HTTP response line: b'HTTP/1.1 2x0 "
            f"{CANARY_OPENAI.upper()}'",
            CANARY_OPENAI.upper()[:16],
            id="status-line-upper-cased",
        ),
    ],
)
def test_an_upstream_error_quoting_the_key_is_scrubbed_on_the_flow_too(
    h: Harness, issue: Callable[..., str], message: str, leak: str
) -> None:
    """The record was scrubbed, but ``flow.error.msg`` kept the key for every later addon
    and for flow dumps; a key quoted in hex passed everywhere."""
    flow = make_flow(issue())

    async def go() -> None:
        await h.hook(HttpRequestHeadersHook(flow))
        await h.hook(HttpRequestHook(flow))
        flow.live = False  # as mitmproxy has it by the error hook: no longer killable
        flow.error = Error(message)
        await h.hook(HttpErrorHook(flow))

    h.run(go())
    assert flow.error is not None and leak not in flow.error.msg
    rows = error_rows(h, flow)
    assert len(rows) == 1 and leak not in (rows[0]["reason"] or "")


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


@pytest.fixture
def opts_ctx(gateway: Gateway) -> Iterator[tuple[Any, Runtime]]:
    rt = Runtime(gateway=gateway)
    stock = (
        proxyserver.Proxyserver(),
        tlsconfig.TlsConfig(),
        onboarding.Onboarding(),
        save.Save(),
        savehar.SaveHar(),
    )
    with taddons.context(*stock, *make_addons(rt)) as tctx:
        # what `aiid run` sets at start (addons/runner.py)
        tctx.options.update(
            tls_version_client_min="TLS1_2", tls_version_server_min="TLS1_2", **runtime.PINNED
        )
        yield tctx, rt


REFUSED, PINNED_BACK = "refused", "pinned"


def test_a_tls_key_log_refuses_to_start(
    opts_ctx: tuple[Any, Runtime], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SSLKEYLOGFILE (read by mitmproxy at import) would log every TLS session's keys, and
    the upstream ones decrypt the injected provider keys."""
    from mitmproxy.net import tls

    tctx, rt = opts_ctx
    monkeypatch.setattr(tls, "log_master_secret", tls.MasterSecretLogger(tmp_path / "keys"))
    with pytest.raises(exceptions.OptionsError, match="SSLKEYLOGFILE"):
        tctx.configure(rt, listen_port=9998)
    monkeypatch.setattr(tls, "log_master_secret", None)
    tctx.configure(rt, listen_port=9998)


@pytest.mark.parametrize(
    ("opts", "outcome"),
    [
        pytest.param({"ssl_insecure": True}, REFUSED, id="ssl_insecure"),
        pytest.param({"ignore_hosts": ["api.openai.com"]}, REFUSED, id="ignore_hosts"),
        pytest.param({"allow_hosts": ["example.com"]}, REFUSED, id="allow_hosts"),
        pytest.param({"tcp_hosts": [".*"]}, REFUSED, id="tcp_hosts"),
        pytest.param({"stream_large_bodies": "1m"}, REFUSED, id="stream_large_bodies"),
        pytest.param({"tls_version_client_min": "TLS1_1"}, REFUSED, id="tls-client-1.1"),
        pytest.param({"tls_version_server_min": "UNBOUNDED"}, REFUSED, id="tls-server-any"),
        pytest.param({"mode": ["transparent"]}, REFUSED, id="transparent-mode"),
        # mitmproxy's own defaults: set back to the pinned value rather than refused, so that
        # `mitmdump -s addons/aiid.py` starts; what matters is that they never take effect
        pytest.param({"connection_strategy": "eager"}, PINNED_BACK, id="eager"),
        pytest.param({"rawtcp": True}, PINNED_BACK, id="rawtcp"),
        pytest.param({"websocket": True}, PINNED_BACK, id="websocket"),
        pytest.param({"http3": True}, PINNED_BACK, id="http3"),
    ],
)
def test_configure_never_lets_a_bypass_option_take_effect(
    opts_ctx: tuple[Any, Runtime], opts: dict[str, Any], outcome: str
) -> None:
    tctx, rt = opts_ctx
    name, value = next(iter(opts.items()))
    before = getattr(tctx.options, name)
    if outcome == REFUSED:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(rt, **opts)
        assert getattr(tctx.options, name) == before  # rolled back
    else:
        tctx.configure(rt, **opts)
        assert getattr(tctx.options, name) == runtime.PINNED[name] != value


@pytest.mark.parametrize(
    "opts",
    [
        pytest.param({"ssl_insecure": False}, id="ssl_insecure-false"),
        pytest.param({"connection_strategy": "lazy"}, id="lazy"),
        pytest.param({"tls_version_client_min": "TLS1_3"}, id="tls-1.3"),
        pytest.param({"listen_port": 9999}, id="unrelated"),
    ],
)
def test_configure_accepts_safe_values(opts_ctx: tuple[Any, Runtime], opts: dict[str, Any]) -> None:
    tctx, rt = opts_ctx
    tctx.configure(rt, **opts)
    for k, v in opts.items():
        assert getattr(tctx.options, k) == v


def test_configure_sets_body_size_limit_from_aiid_body_limit(
    opts_ctx: tuple[Any, Runtime],
) -> None:
    tctx, rt = opts_ctx
    # mitmproxy's own limit is a hard ceiling at twice the cap: declared lengths over the cap
    # get the contract's JSON 413 from Intake, decoded bodies from RouteStage
    tctx.configure(rt, aiid_body_limit=12345)
    assert tctx.options.body_size_limit == "24690"
    tctx.configure(rt, body_size_limit="1g")  # cannot be raised past the ceiling
    assert tctx.options.body_size_limit == "24690"


def test_a_gateway_that_cannot_start_is_refused_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refusal after configure had updated an option of its own made mitmproxy's rollback
    # re-enter configure (each time building a gateway) until a RecursionError.
    built: list[Path] = []

    def refuse(home: Home, *args: Any, **kw: Any) -> Gateway:
        built.append(home.root)
        raise AuditError("the audit key does not match")

    monkeypatch.setattr(runtime, "Gateway", refuse)
    rt = Runtime()
    with taddons.context(proxyserver.Proxyserver(), *make_addons(rt)) as tctx:
        limit = tctx.options.body_size_limit
        built.clear()  # the context's own first configure (the default home)
        with pytest.raises(exceptions.OptionsError, match="cannot start: the audit key"):
            tctx.configure(rt, aiid_home=str(tmp_path / "home"), aiid_body_limit=12345)
        # once, and nothing else: mitmproxy's rollback re-enters configure with the options
        # from before (the default home, ./.aiid): no gateway is built from those
        assert built == [tmp_path / "home"], built
        assert tctx.options.body_size_limit == limit  # nothing of ours was applied
        assert rt.gateway is None


@pytest.mark.parametrize(
    ("before", "values", "after"),
    [
        pytest.param(
            [("Content-Type", "application/json")],
            {"x-aiid-request-id": "r1"},
            [("Content-Type", "application/json"), ("x-aiid-request-id", "r1")],
            id="adds",
        ),
        pytest.param(
            [("X-AIID-Request-Id", "spoof"), ("a", "1"), ("x-aiid-request-id", "spoof2")],
            {"x-aiid-request-id": "r1"},
            [("a", "1"), ("x-aiid-request-id", "r1")],
            id="replaces-every-field-any-case",
        ),
        pytest.param(
            [("x-ratelimit-limit-requests", "999"), ("b", "2")],
            {"x-aiid-request-id": "r1", "x-ratelimit-limit-requests": "60"},
            [("b", "2"), ("x-aiid-request-id", "r1"), ("x-ratelimit-limit-requests", "60")],
            id="several",
        ),
    ],
)
def test_replace_headers_is_assignment_in_one_pass(
    before: list[tuple[str, str]], values: dict[str, str], after: list[tuple[str, str]]
) -> None:
    h = http.Headers([(k.encode(), v.encode()) for k, v in before])
    ref = http.Headers([(k.encode(), v.encode()) for k, v in before])
    for k, v in values.items():
        ref[k] = v
    response_side.replace_headers(h, values)
    assert [(k.decode(), v.decode()) for k, v in h.fields] == after
    assert {k.lower(): h.get_all(k) for k in h} == {k.lower(): ref.get_all(k) for k in ref}


def test_the_key_is_prepared_while_the_request_record_commits(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """InjectStage works while the writer commits, and the flow is sealed (may leave) only
    once the record is durable: held here, the request hook does not finish."""
    from concurrent.futures import Future

    audit = h.gw.tenant(TENANT).audit
    real_append = audit.append
    gate: Future[Any] = Future()
    injected: list[bool] = []
    real_inject = h.gw.inject

    def inject(st: Any) -> Any:
        injected.append(not gate.done())  # while the record is still being committed
        return real_inject(st)

    def append(event: str, **fields: Any) -> Future[Any]:
        fut = real_append(event, **fields)
        if event != "request":
            return fut
        held: Future[Any] = Future()
        gate.add_done_callback(lambda _g: held.set_result(fut.result(timeout=10)))
        return held

    monkeypatch.setattr(audit, "append", append)
    monkeypatch.setattr(h.gw, "inject", inject)
    flow = make_flow(issue())

    async def go() -> Result:
        task = asyncio.ensure_future(h.drive(flow))
        for _ in range(50):
            await asyncio.sleep(0)
        assert injected == [True]
        st = runtime.state_of(flow)
        assert st is not None and st.digest is None and st.audit is None and not task.done()
        assert not h.gw.check_sealed(
            st,
            flow.request.method,
            flow.request.url,
            flow.request.raw_content or b"",
            flow.request.headers.fields,
        )
        gate.set_result(None)
        return await task

    res = h.run(go())
    h.settle()
    assert res.sent is not None and flow.response is not None and flow.response.status_code == 200


def test_a_response_is_accounted_after_its_hook_returns(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """mitmproxy sends the response on when the `response` hook returns: its usage, the
    settlement and its record come on the next turn of the loop, off the agent's way."""
    rf = h.addon(response_side.ResponseFilter)
    real_hook, real_record = rf.response, h.gw.record_response
    returned: list[bool] = []
    recorded_after: list[bool] = []

    def hook(flow: http.HTTPFlow) -> None:
        real_hook(flow)
        returned.append(True)

    def record(*a: Any, **kw: Any) -> Any:
        recorded_after.append(bool(returned))
        return real_record(*a, **kw)

    monkeypatch.setattr(rf, "response", hook)
    monkeypatch.setattr(h.gw, "record_response", record)
    h.tctx.master.addons.chain = list(h.tctx.master.addons.chain)  # the table sees the hook
    flow = make_flow(issue())
    res = h.send(flow)
    assert res.sent is not None and flow.response is not None
    assert flow.response.status_code == 200
    assert recorded_after == [True]
    (row,) = [r for r in h.rows(request_id=rid_of(flow)) if r["event"] == "response"]
    assert row["input_tokens"] == 7 and row["output_tokens"] == 5


def test_a_response_accounting_failure_is_on_record(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the response went out, a failure to account it cannot kill the flow: it is
    logged and recorded as an error (the response was sent)."""
    monkeypatch.setattr(response_side, "body_usage", lambda *a: 1 / 0)
    flow = make_flow(issue())
    res = h.send(flow)
    assert res.sent is not None and flow.response is not None
    assert flow.response.status_code == 200
    (row,) = error_rows(h, flow)
    assert "could not be accounted" in row["reason"]


@pytest.mark.parametrize(
    "late",
    [
        pytest.param(lambda r: r.headers.add("x-late", "1"), id="header-added"),
        pytest.param(lambda r: setattr(r, "path", "/v1/embeddings"), id="path"),
        pytest.param(lambda r: setattr(r, "content", chat_body("gpt-4o")), id="body"),
    ],
)
def test_a_request_changed_while_its_record_commits_never_leaves(
    h: Harness,
    issue: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    late: Callable[[http.Request], None],
) -> None:
    """The seal's digest is taken while the record commits; a change made meanwhile (after
    the digest) is caught by LastGate, which takes the digest again from what would leave."""
    real = pipeline.request_record_durable

    async def durable(flow: http.HTTPFlow, gw: Any, st: Any) -> bool:
        ok = await real(flow, gw, st)
        late(flow.request)
        return ok

    monkeypatch.setattr(pipeline, "request_record_durable", durable)
    flow = make_flow(issue())
    res = h.send(flow)
    assert_killed(res, recorded=True)
    assert len(error_rows(h, flow)) == 1


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([("Content-Type", "application/json")], id="one"),
        pytest.param([("Connection", "keep-alive"), ("connection", "Upgrade")], id="repeated"),
        pytest.param([("X-Odd", "caf\u00e9"), ("UPGRADE", "websocket")], id="case-and-utf8"),
        pytest.param([], id="none"),
    ],
)
def test_lowercase_headers_agrees_with_headers_get(fields: list[tuple[str, str]]) -> None:
    h = http.Headers([(k.encode(), v.encode()) for k, v in fields])
    d = pipeline.lowercase_headers(h)
    assert set(d) == {k.lower() for k, _ in fields}
    for name in {k for k, _ in fields} | {"upgrade", "connection", "absent"}:
        assert d.get(name.lower()) == h.get(name)


@pytest.mark.parametrize(
    "late",
    [
        pytest.param(
            lambda r: r.headers.add("x-late", f"Bearer {CANARY_OPENAI}"), id="header-added"
        ),
        pytest.param(lambda r: setattr(r, "reason", f"bad key {CANARY_OPENAI}"), id="reason"),
        pytest.param(
            lambda r: setattr(
                r, "headers", http.Headers(x_new=f"{CANARY_OPENAI}", content_type="text/plain")
            ),
            id="headers-replaced",
        ),
    ],
)
def test_headers_changed_after_responseheaders_are_scrubbed_again(
    h: Harness,
    issue: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    late: Callable[[http.Response], None],
) -> None:
    """Another addon may touch the response between our two hooks: `response` scrubs what
    changed (it skips only the very header tuple `responseheaders` left)."""
    real_hook = h.hook

    async def hook(event: Any) -> None:
        if isinstance(event, HttpResponseHook) and event.flow.response is not None:
            late(event.flow.response)
        await real_hook(event)

    monkeypatch.setattr(h, "hook", hook)
    flow = make_flow(issue())
    h.send(flow)
    resp = flow.response
    assert resp is not None and resp.status_code == 200
    raw = b"".join(k + v for k, v in resp.headers.fields) + resp.reason.encode()
    assert CANARY_OPENAI.encode() not in raw and b"[REDACTED]" in raw


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(CANARY_OPENAI.upper(), id="upper"),
        pytest.param(CANARY_OPENAI.swapcase(), id="swapcase"),
        pytest.param(f"key={CANARY_OPENAI.lower()}; x", id="lower-inside"),
        pytest.param(CANARY_OPENAI.upper().replace("/", "\\/"), id="escaped-upper"),
        pytest.param("\u0130 " + CANARY_OPENAI.upper(), id="non-ascii-beside"),
        # the hex of the key's own bytes (h2 quotes GOAWAY data so): not the lower-cased
        # key's hex, which the any-case pass looks for (pass [X])
        pytest.param(CANARY_OPENAI.encode().hex(), id="hex"),
        pytest.param(CANARY_OPENAI.encode().hex().upper(), id="hex-upper"),
    ],
)
def test_the_key_in_another_letter_case_is_scrubbed_from_header_values(
    h: Harness, issue: Callable[..., str], value: str
) -> None:
    """Found in any case (the block check), but removed only in its own case: the agent got
    "x-echo: SK-PROJ/..." (pass [V])."""
    flow = make_flow(issue())
    upstream = upstream_response(headers={"content-type": "application/json", "x-echo": value})
    h.send(flow, upstream=upstream)
    resp = flow.response
    assert resp is not None and resp.status_code == 200
    low = resp.headers["x-echo"].lower()
    assert CANARY_OPENAI.lower()[:12] not in low and "[redacted]" in low
    hexed = CANARY_OPENAI.encode().hex()
    assert not [hexed[i : i + 12] for i in range(len(hexed) - 11) if hexed[i : i + 12] in low]


@pytest.mark.parametrize("key", ["AIzaSyPtYgjmUhBel31iEl2hpChYgCfrL1spNxn", CANARY_OPENAI])
@pytest.mark.parametrize("hexed", [bytes.hex, lambda b: b.hex().upper()])
def test_the_hex_of_a_key_with_capitals_all_through_is_scrubbed_from_headers(
    key: str, hexed: Callable[[bytes], str]
) -> None:
    """The header block was let through when neither the any-case fragments (the lower-
    cased key's hex) nor a whole key were in it: the hex of a Gemini-style key's own bytes
    passed unchanged for about half of such keys (pass [Y])."""
    resp = http.Response.make(200, b"", [(b"x-echo", hexed(key.encode()).encode())])
    response_side.ResponseFilter._scrub_headers(resp, Scrubber([key]))
    assert resp.headers["x-echo"] == "[REDACTED]"
    # in a header's name: dropped (pass [Z]: the name's check knew only the lower-cased
    # key's hex)
    name = b"x-" + hexed(key.encode()).encode()[:40]
    resp = http.Response.make(200, b"", [(name, b"1"), (b"x-ok", b"1")])
    response_side.ResponseFilter._scrub_headers(resp, Scrubber([key]))
    names = [k for k, _ in resp.headers.fields]
    assert name not in names and b"x-ok" in names


@pytest.mark.parametrize("reason", [CANARY_OPENAI, CANARY_OPENAI.upper(), CANARY_OPENAI[5:20]])
def test_the_key_in_any_case_is_scrubbed_from_the_reason_phrase(
    h: Harness, issue: Callable[..., str], reason: str
) -> None:
    """HTTP/1.1 agents get the reason phrase: the upper-cased key passed there (pass [X])."""
    flow = make_flow(issue())
    upstream = upstream_response(status=401)
    upstream.reason = f"Bad key {reason}"
    h.send(flow, upstream=upstream)
    resp = flow.response
    assert resp is not None
    assert resp.reason.startswith("Bad key [REDACTED]")
    assert CANARY_OPENAI.lower()[5:17] not in resp.reason.lower()


@pytest.mark.parametrize("name", [f"x-{CANARY_OPENAI}", f"x-{CANARY_OPENAI}".lower()])
def test_a_header_named_after_the_key_is_dropped(
    h: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A name cannot be scrubbed into a valid one ("[" is no token character): the field goes,
    in any case (HTTP/2 lowercases names), and counts as a scrub hit."""
    real_hook = h.hook

    async def hook(event: Any) -> None:
        if isinstance(event, HttpResponseHook) and event.flow.response is not None:
            event.flow.response.headers.add(name, "1")
        await real_hook(event)

    monkeypatch.setattr(h, "hook", hook)
    flow = make_flow(issue())
    h.send(flow)
    h.settle()
    resp = flow.response
    assert resp is not None and resp.status_code == 200
    raw = b"".join(k + v for k, v in resp.headers.fields).lower()
    assert CANARY_OPENAI.lower().encode() not in raw and b"x-aiid-request-id" in raw
    (row,) = [r for r in h.rows(request_id=rid_of(flow)) if r["event"] == "response"]
    assert json.loads(row["detail"])["scrubbed_secrets"] == 1


@pytest.mark.parametrize("status", [100, 103])
def test_an_upstream_informational_response_ends_the_flow_on_record(
    h: Harness, issue: Callable[..., str], status: int
) -> None:
    """mitmproxy takes a 1xx for the final answer and drops the real one after it: the agent
    hung until its own timeout, and the log said 103. Killed, with an error record."""
    flow = make_flow(issue())
    res = h.send(flow, upstream=http.Response.make(status, b"", {"link": "</x>; rel=preload"}))
    assert res.sent is not None and killed(flow)
    rows = h.rows(request_id=rid_of(flow))
    assert [r["event"] for r in rows] == ["request", "error"]
    assert f"informational {status} response" in rows[1]["reason"]


def _resolve_here(fut: Future[int]) -> None:
    asyncio.get_running_loop().call_soon(fut.set_result, 7)


def _resolve_in_a_thread(fut: Future[int]) -> None:
    # started once the task awaits: the future is surely resolved from the other thread
    asyncio.get_running_loop().call_soon(threading.Thread(target=fut.set_result, args=(7,)).start)


def _fail_here(fut: Future[int]) -> None:
    asyncio.get_running_loop().call_soon(fut.set_exception, AuditError("disk full"))


@pytest.mark.parametrize(
    ("resolve", "threadsafe_calls"),
    [
        pytest.param(lambda f: f.set_result(7), 0, id="already-done"),
        pytest.param(_resolve_here, 0, id="on-the-loop-thread"),
        pytest.param(_resolve_in_a_thread, 1, id="from-another-thread"),
    ],
)
def test_settled_wakes_the_task_without_the_self_pipe_when_it_can(
    resolve: Callable[[Future[int]], None], threadsafe_calls: int
) -> None:
    async def go() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(*a: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            return real(*a, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        fut: Future[int] = Future()
        resolve(fut)
        return await asyncio.wait_for(runtime.settled(fut), 10), calls

    assert asyncio.run(go()) == (7, threadsafe_calls)


def test_settled_raises_the_futures_error_and_cancels_it_when_cancelled() -> None:
    async def go() -> Future[int]:
        failing: Future[int] = Future()
        _fail_here(failing)
        with pytest.raises(AuditError, match="disk full"):
            await runtime.settled(failing)
        waiting: Future[int] = Future()
        task = asyncio.ensure_future(runtime.settled(waiting))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return waiting

    assert asyncio.run(go()).cancelled()


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        pytest.param(
            "Invalid header line: b'Authorization Bearer eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJib3QifQ"
            ".N9HhXmG703LKDs41uDxJSY9CK3XoPKyePfIr'",
            "Invalid header line: b'Authorization Bearer [REDACTED]'",
            id="bearer-jwt",
        ),
        pytest.param(
            "Proxy-Authorization Basic eDpleUpoYmNpT2lKRlpFUlRRU0lz",
            "Proxy-Authorization Basic [REDACTED]",
            id="basic",
        ),
        pytest.param(
            "Bad HTTP request line: GET /?key=sk-proj-abcdefghijklmnopqrstuv HTTP/1.1 x",
            "Bad HTTP request line: GET /?key=[REDACTED] HTTP/1.1 x",
            id="key-in-query",
        ),
        pytest.param(
            "[127.0.0.1:4444] client connect", "[127.0.0.1:4444] client connect", id="untouched"
        ),
    ],
)
def test_log_lines_never_carry_an_agent_credential(line: str, kept: str) -> None:
    assert logscrub.redact_credentials(line) == kept


def test_a_log_line_that_cannot_be_written_is_dropped_not_fatal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """mitmproxy's terminal log calls sys.exit(1) when stdout fails (a full disk under
    `aiid run --no-console > file`): the gateway stopped serving. Dropped, said once."""
    import errno
    import logging

    from mitmproxy.addons import termlog

    from addons.runner import keep_serving_when_the_log_fails

    class Full:
        def write(self, _s: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def isatty(self) -> bool:
            return False

    keep_serving_when_the_log_fails()
    keep_serving_when_the_log_fails()  # idempotent
    handler = termlog.TermLogHandler(out=Full())  # type: ignore[arg-type]
    rec = logging.LogRecord("aiid", logging.INFO, __file__, 1, "a line", (), None)
    for _ in range(3):
        handler.emit(rec)  # no SystemExit
    err = capsys.readouterr().err
    assert err.count("aiid: log output failed (No space left on device)") == 1, err


def test_set_specs_are_parsed_as_mitmdump_parses_them() -> None:
    from mitmproxy import options

    from addons.runner import BadSetting, check_sets

    opts = options.Options()
    check_sets(opts, ["ssl_insecure", "tcp_timeout=30", "ignore_hosts=a", "ignore_hosts=b"])
    assert opts.ssl_insecure is False and opts.tcp_timeout == 600  # checked, not applied
    for bad in (["tcp_timeout=x"], ["tcp_timeout=1", "tcp_timeout=2"], ["nope=1"]):
        with pytest.raises(BadSetting):
            check_sets(opts, bad)


SHORT = "sk-sh/rt9"  # shorter than a fragment: only whole secrets are looked for
_PIECES = [
    CANARY_OPENAI,
    CANARY_OPENAI.upper(),
    CANARY_OPENAI[:12],
    CANARY_OPENAI[5:17],
    CANARY_OPENAI[-12:],
    SHORT,
    SHORT.upper(),
]
_PIECES += [SHORT.replace("/", "\\/"), "x", "-", ":", " ", "\u212a"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    hst.lists(
        hst.tuples(
            hst.lists(hst.sampled_from(_PIECES), min_size=1, max_size=3).map("".join),
            hst.lists(hst.sampled_from(_PIECES), max_size=4).map("".join),
        ),
        max_size=6,
    )
)
def test_the_header_block_fast_path_changes_nothing_the_field_walk_would(
    fields: list[tuple[str, str]],
) -> None:
    """addons.response skips the field-by-field scrub when ``anywhere`` and the fragments
    find nothing in the whole block: for any block, the walk itself must then change
    nothing (the block holds every name and value)."""
    raw = tuple((k.encode(), v.encode()) for k, v in fields)
    fast = http.Response.make(200, b"", raw)
    response_side.ResponseFilter._scrub_headers(fast, Scrubber([CANARY_OPENAI, SHORT]))

    class Walk(Scrubber):
        def anywhere(self, data: bytes, low: str | None = None) -> bool:
            return True

    slow = http.Response.make(200, b"", raw)
    response_side.ResponseFilter._scrub_headers(slow, Walk([CANARY_OPENAI, SHORT]))
    assert fast.headers.fields == slow.headers.fields


@pytest.mark.parametrize(
    "shown",
    [
        pytest.param(CANARY_OPENAI[:-1], id="one-character-short"),
        pytest.param(CANARY_OPENAI.upper(), id="upper-case"),
        pytest.param(CANARY_OPENAI[:20] + "\n" + CANARY_OPENAI[20:], id="split-over-lines"),
    ],
)
def test_a_piece_of_the_key_in_any_case_is_scrubbed_from_a_body(
    h: Harness, issue: Callable[..., str], shown: str
) -> None:
    """Bodies were scrubbed of the exact key only: an error quoting it one character short,
    or upper-cased, reached the agent (pass [AC])."""
    flow = make_flow(issue())
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {shown}"}}).encode()
    upstream = upstream_response(
        status=401, headers={"content-type": "application/json"}, content=body
    )
    h.send(flow, upstream=upstream)
    resp = flow.response
    assert resp is not None and resp.status_code == 401
    low = resp.get_text().lower()
    assert "[redacted]" in low
    key = CANARY_OPENAI.lower()
    # what is left is at most the key's public start (its first 16 characters)
    left = [key[i : i + 12] for i in range(len(key) - 11) if key[i : i + 12] in low]
    assert all(key.index(w) + 12 <= public_prefix(CANARY_OPENAI) for w in left), left
    json.loads(resp.get_text())  # still JSON


def test_headers_that_pick_the_billed_account_are_stripped(
    h: Harness, issue: Callable[..., str]
) -> None:
    """The agent chose which of the key's organizations or projects was used and billed
    (pass [AC]): OpenAI-Organization / OpenAI-Project went upstream beside the injected key."""
    t = issue()
    extra = [
        ("OpenAI-Organization", "org-evil"),
        ("openai-project", "proj_evil"),
        ("X-Goog-User-Project", "other-project"),
        ("x-keep", "1"),
    ]
    flow = make_flow(t, headers=extra)
    res = h.send(flow)
    assert res.sent is not None
    for name in ACCOUNT_HEADERS:
        assert res.sent.headers.get_all(name) == [], name
    assert res.sent.headers["x-keep"] == "1"


# -- [AK] event streams read whole, error streams ---------------------------------------------
@pytest.mark.parametrize(
    "ctype",
    [
        pytest.param("application/json", id="json-label"),
        pytest.param("text/plain", id="text-label"),
        pytest.param("", id="no-label"),
    ],
)
def test_an_event_stream_not_labelled_as_one_is_guarded_as_a_stream(
    h: Harness, issue: Callable[..., str], ctype: str
) -> None:
    """An SDK that asked for a stream parses the body as one whatever its label: a key spelled
    over deltas in a stream labelled application/json reached the agent whole."""
    flow = make_flow(issue(), body=chat_body(stream=True))
    k = CANARY_OPENAI
    stream = _sse(
        {"choices": [{"index": 0, "delta": {"content": k[:10]}}]},
        {"choices": [{"index": 0, "delta": {"content": k[10:]}}]},
    )
    upstream = http.Response.make(200, stream, {"content-type": ctype} if ctype else {})
    res = h.send(flow, upstream=upstream)
    assert res.sent is not None and flow.response is not None
    assert not callable(flow.response.stream)  # read whole: not labelled as a stream
    text = "".join(
        json.loads(line[6:]).get("choices", [{}])[0].get("delta", {}).get("content", "")
        for line in flow.response.content.split(b"\n")
        if line.startswith(b"data: {") and b'"choices"' in line
    )
    assert k not in text
    assert b"injected_key_in_output" in flow.response.content


def test_an_error_labelled_as_an_event_stream_is_scanned_as_an_error_body(
    h: Harness, issue: Callable[..., str]
) -> None:
    """A 401 labelled text/event-stream was streamed, so checked for the whole key only: the
    key upper-cased in it reached the agent."""
    flow = make_flow(issue(), body=chat_body(stream=True))
    body = json.dumps({"error": {"message": "bad key " + CANARY_OPENAI.upper()}}).encode()
    upstream = http.Response.make(401, body, {"content-type": "text/event-stream"})
    res = h.send(flow, upstream=upstream, chunks=[body])
    assert res.streamed == []  # not streamed: read whole
    assert flow.response is not None and flow.response.status_code == 401
    out = flow.response.content
    assert CANARY_OPENAI.upper().encode() not in out and CANARY_OPENAI.encode() not in out
    assert b"[REDACTED]" in out


def test_log_lines_and_error_pages_lose_the_key_in_any_letter_case() -> None:
    """[AK] The log scrubber (which mitmproxy's error pages go through too) matched pieces of
    the key in its own case only: a 502 quoting the key upper-cased reached the agent, the
    audit log and the gateway log."""
    ls = logscrub.LogScrubber()
    ls.add(CANARY_OPENAI)
    line = f"Bad HTTP response line: b'HTTP/1.1 2x0 {CANARY_OPENAI.upper()}'"
    clean = ls.scrub(line)
    assert "[REDACTED]" in clean and CANARY_OPENAI.upper()[:16] not in clean
