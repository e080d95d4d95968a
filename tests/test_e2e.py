"""End to end: a real `aiid run` subprocess, real TLS, real SQLite, the official SDKs and curl
as agents configured only by HTTPS_PROXY and SSL_CERT_FILE, and a local provider stand-in."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from e2e import (
    ANTHROPIC_CANARY,
    GITHUB_CANARY,
    OPENAI_CANARY,
    Gateway,
    aiid,
    free_port,
    make_home,
    point_agent_at,
    read_audit,
    start_gateway,
)
from standin import StandIn

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
tenant: {tenant}
default: deny
rules:
  - id: no-gpt-4o
    providers: [openai]
    models: ["gpt-4o"]
    effect: deny
    reason: "gpt-4o is not allowed here"
  - id: openai-small
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
  - id: claude
    providers: [anthropic]
    models: ["claude-*"]
    effect: allow
  - id: github-for-coders
    agents: ["coder-*"]
    hosts: ["api.github.com"]
    methods: [GET]
    paths: ["/repos/*"]
    inject: {{header: Authorization, scheme: Bearer, secret: github}}
    effect: allow
"""


def write_policy(policies: Path, tenant: str, text: str) -> None:
    tmp = policies / f".{tenant}.tmp"
    tmp.write_text(text)
    tmp.replace(policies / f"{tenant}.yaml")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, StandIn]]:
    root = tmp_path_factory.mktemp("e2e")
    si = StandIn(root)
    si.start()
    home = make_home(
        root,
        {
            "acme": {
                "openai": OPENAI_CANARY,
                "anthropic": ANTHROPIC_CANARY,
                "github": GITHUB_CANARY,
            },
            "other": {},
        },
    )
    policies = root / "policies"
    policies.mkdir()
    write_policy(policies, "acme", POLICY.format(tenant="acme"))
    write_policy(policies, "other", POLICY.format(tenant="other"))
    gw = start_gateway(home, policies, si.port, si.ca_path)
    try:
        yield gw, si
    finally:
        gw.stop()
        si.stop()


@pytest.fixture()
def agent(env: tuple[Gateway, StandIn], monkeypatch: pytest.MonkeyPatch) -> Gateway:
    gw, _ = env
    point_agent_at(gw, monkeypatch)
    return gw


def upstream_headers_clean(si: StandIn, token: str) -> None:
    for rec in si.requests:
        blob = json.dumps(rec.headers) + rec.body.decode("latin-1")
        assert token not in blob, "agent token reached the provider"


def audit_rows(gw: Gateway, tenant: str) -> list[dict[str, Any]]:
    return read_audit(gw.home, tenant)


def test_openai_chat_allowed_with_vault_key_upstream(
    agent: Gateway, env: tuple[Gateway, StandIn]
) -> None:
    _, si = env
    token = agent.token("acme", "support-1")
    client = openai.OpenAI(api_key=token, max_retries=0)
    before = si.hits("/v1/chat/completions")
    r = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert r.headers["x-aiid-request-id"].startswith("req_")
    assert r.parse().choices[0].message.content == "Hello from the stand-in"
    assert si.hits("/v1/chat/completions") == before + 1
    rec = si.last()
    assert rec.header("authorization") == f"Bearer {OPENAI_CANARY}"
    assert len(rec.header_all("authorization")) == 1
    upstream_headers_clean(si, token)
    rid = r.headers["x-aiid-request-id"]
    rows = [row for row in audit_rows(agent, "acme") if row["request_id"] == rid]
    assert [row["event"] for row in rows] == ["request", "response"]
    assert rows[1]["status"] == 200 and rows[1]["output_tokens"] == 5
    assert rows[0]["rule"] == "openai-small" and rows[0]["agent"] == "support-1"


def test_openai_stream_and_responses_api(agent: Gateway, env: tuple[Gateway, StandIn]) -> None:
    token = agent.token("acme", "support-1")
    client = openai.OpenAI(api_key=token, max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    usage = None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "Hello from the stand-in"
    assert usage is not None and usage.completion_tokens == 5
    resp = client.responses.create(model="gpt-4o-mini", input="hi")
    assert resp.output_text == "Hello from the stand-in"
    rows = [r for r in audit_rows(agent, "acme") if r["event"] == "response"]
    assert rows[-1]["input_tokens"] is not None and rows[-1]["output_tokens"] == 5
    assert rows[-2]["output_tokens"] == 5  # the stream's usage chunk was counted


def test_anthropic_messages_and_stream(agent: Gateway, env: tuple[Gateway, StandIn]) -> None:
    _, si = env
    token = agent.token("acme", "writer")
    client = anthropic.Anthropic(api_key=token, max_retries=0)
    msg = client.messages.create(
        model="claude-3-5-haiku-latest",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert msg.content[0].text == "Hello from the stand-in"
    rec = si.last()
    assert rec.header("x-api-key") == ANTHROPIC_CANARY
    assert rec.header("authorization") is None
    with client.messages.stream(
        model="claude-3-5-haiku-latest",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
    ) as s:
        streamed = "".join(s.text_stream)
    assert streamed == "Hello from the stand-in"
    upstream_headers_clean(si, token)
    last = [r for r in audit_rows(agent, "acme") if r["event"] == "response"][-1]
    assert last["provider"] == "anthropic" and last["output_tokens"] == 5


def test_denied_model_gets_403_with_rule(agent: Gateway, env: tuple[Gateway, StandIn]) -> None:
    _, si = env
    before = si.hits()
    client = openai.OpenAI(api_key=agent.token("acme", "support-1"), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    body = ei.value.body
    assert isinstance(body, dict)
    assert body["type"] == "policy_denied" and body["rule"] == "no-gpt-4o"
    assert "gpt-4o is not allowed here" in ei.value.message
    assert si.hits() == before
    deny = audit_rows(agent, "acme")[-1]
    assert deny["event"] == "deny" and deny["rule"] == "no-gpt-4o" and deny["status"] == 403
    assert ei.value.request_id == body["request_id"] == deny["request_id"]  # the SDK's field
    ac = anthropic.Anthropic(api_key=agent.token("acme", "support-1"), max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as ai:
        ac.messages.create(
            model="not-claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert ai.value.request_id == audit_rows(agent, "acme")[-1]["request_id"]


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("", id="empty"),
        pytest.param("not-a-token", id="garbage"),
        pytest.param(OPENAI_CANARY, id="raw-provider-key"),
        pytest.param("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", id="alg-none"),
    ],
)
def test_bad_tokens_get_401(agent: Gateway, env: tuple[Gateway, StandIn], key: str) -> None:
    _, si = env
    before = si.hits()
    client = openai.OpenAI(api_key=key or "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert ei.value.status_code == 401
    assert isinstance(ei.value.body, dict) and ei.value.body["type"] == "unauthenticated"
    assert si.hits() == before


def curl(gw: Gateway, *args: str) -> tuple[int, dict[str, str], str]:
    p = subprocess.run(
        [
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "20",
            "--proxy",
            gw.proxy,
            "--cacert",
            str(gw.ca),
            *args,
        ],
        capture_output=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    # skip the CONNECT response block
    blocks = p.stdout.decode("utf-8", "replace").split("\r\n\r\n")
    while blocks and "Connection established" in blocks[0]:
        blocks.pop(0)
    head, body = blocks[0], "\r\n\r\n".join(blocks[1:])
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_x_api_key_and_proxy_authorization(env: tuple[Gateway, StandIn]) -> None:
    gw, si = env
    token = gw.token("acme", "writer")
    body = json.dumps(
        {
            "model": "claude-3-5-haiku-latest",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}],
        }
    )
    status, headers, _ = curl(
        gw,
        "https://api.anthropic.com/v1/messages",
        "-H",
        f"x-api-key: {token}",
        "-H",
        "anthropic-version: 2023-06-01",
        "-H",
        "content-type: application/json",
        "-d",
        body,
    )
    assert status == 200 and headers["x-aiid-request-id"].startswith("req_")
    assert si.last().header("x-api-key") == ANTHROPIC_CANARY
    # Proxy-Authorization on the CONNECT identifies the agent; the SDK header is junk
    status, _, _ = curl(
        gw,
        "https://api.anthropic.com/v1/messages",
        "--proxy-user",
        f"agent:{token}",
        "-H",
        "x-api-key: whatever-the-sdk-sends",
        "-H",
        "content-type: application/json",
        "-d",
        body,
    )
    assert status == 200
    rec = si.last()
    assert rec.header("x-api-key") == ANTHROPIC_CANARY
    assert rec.header("proxy-authorization") is None
    upstream_headers_clean(si, token)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://example.com/", id="unknown-host"),
        pytest.param("https://api.github.com/repos/a/b", id="egress-not-for-this-agent"),
        pytest.param("https://api.openai.com/v1/files", id="unknown-provider-route"),
        pytest.param("http://api.openai.com/v1/chat/completions", id="plain-http"),
    ],
)
def test_unknown_destinations_never_forwarded(env: tuple[Gateway, StandIn], url: str) -> None:
    gw, si = env
    token = gw.token("acme", "support-1")
    before = si.hits()
    status, headers, body = curl(gw, url, "-H", f"authorization: Bearer {token}")
    assert status == 403, body
    assert json.loads(body)["error"]["type"] == "policy_denied"
    assert headers["x-aiid-request-id"].startswith("req_")
    assert si.hits() == before


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_connect_to_raw_ip_refused(env: tuple[Gateway, StandIn]) -> None:
    gw, si = env
    before = si.hits()
    p = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "--max-time",
            "10",
            "--proxy",
            gw.proxy,
            "-k",
            f"https://127.0.0.1:{si.port}/v1/models",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.stdout.strip() == "403"
    assert si.hits() == before


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_egress_rule_injects_tenant_secret(env: tuple[Gateway, StandIn]) -> None:
    gw, si = env
    token = gw.token("acme", "coder-1")
    status, _, body = curl(
        gw, "https://api.github.com/repos/a/b", "-H", f"authorization: Bearer {token}"
    )
    assert status == 200, body
    assert si.last().header("authorization") == f"Bearer {GITHUB_CANARY}"
    status, _, _ = curl(
        gw, "-X", "POST", "https://api.github.com/repos/a/b", "-H", f"authorization: Bearer {token}"
    )
    assert status == 403


def test_tenant_without_key_gets_clear_refusal(
    agent: Gateway, env: tuple[Gateway, StandIn]
) -> None:
    _, si = env
    before = si.hits()
    client = openai.OpenAI(api_key=agent.token("other", "support-1"), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(ei.value.body, dict) and ei.value.body["type"] == "policy_denied"
    assert "has no key" in ei.value.body["message"]
    assert si.hits() == before
    assert audit_rows(agent, "other")[-1]["event"] == "deny"


def assert_echo_error_scrubbed(client: openai.OpenAI) -> None:
    """The stand-in's 401 naming the key it received: the agent sees [REDACTED] instead."""
    with pytest.raises(openai.AuthenticationError) as ei:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert OPENAI_CANARY not in str(ei.value.body) and "[REDACTED]" in str(ei.value.body)
    assert OPENAI_CANARY not in json.dumps(dict(ei.value.response.headers))


def test_echoed_key_is_scrubbed(agent: Gateway, env: tuple[Gateway, StandIn]) -> None:
    client = openai.OpenAI(
        api_key=agent.token("acme", "support-1"),
        max_retries=0,
        default_headers={"x-standin-echo-key": "1"},
    )
    assert_echo_error_scrubbed(client)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert OPENAI_CANARY not in text and "[REDACTED]" in text


@pytest.mark.parametrize("mode", ["spelled", "escaped"])
def test_a_key_spelled_over_deltas_or_escaped_never_reaches_the_agent(
    agent: Gateway, env: tuple[Gateway, StandIn], mode: str
) -> None:
    """The key in no run of bytes the scrubber could see: over three stream deltas, or in JSON
    \\u escapes. A body is re-encoded without it; a stream is cut before it completes."""
    client = openai.OpenAI(
        api_key=agent.token("acme", "support-1"),
        max_retries=0,
        default_headers={"x-standin-echo-key": mode},
    )
    if mode == "escaped":
        assert_echo_error_scrubbed(client)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = ""
    with pytest.raises(openai.APIError) as si:
        for c in stream:
            text += "".join(ch.delta.content or "" for ch in c.choices)
    assert "spelled out the key" in str(si.value)
    assert OPENAI_CANARY[:4] not in text and OPENAI_CANARY not in str(si.value)
    rid = stream.response.headers["x-aiid-request-id"]
    rows = [r for r in audit_rows(agent, "acme") if r["request_id"] == rid]
    assert [r["event"] for r in rows] == ["request", "response"]
    assert "injected key in the output" in json.dumps(rows[1], default=str)


def wait_for(pred, seconds: float = 6.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_policy_edit_and_bad_edit_apply_live(agent: Gateway, env: tuple[Gateway, StandIn]) -> None:
    client = openai.OpenAI(api_key=agent.token("acme", "support-1"), max_retries=0)

    def gpt4o_allowed() -> bool:
        try:
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
            return True
        except openai.PermissionDeniedError:
            return False

    assert not gpt4o_allowed()
    relaxed = (
        POLICY.format(tenant="acme")
        .replace('models: ["gpt-4o"]', 'models: ["gpt-5"]')
        .replace('models: ["gpt-4o-mini*"]', 'models: ["gpt-4o*"]')
    )
    write_policy(agent.policies, "acme", relaxed)
    assert wait_for(gpt4o_allowed), "policy edit not applied within 6 s"
    write_policy(agent.policies, "acme", relaxed + "\nbogus_key: 1\n")
    assert wait_for(
        lambda: any(
            r["event"] == "policy" and "refused" in (r["reason"] or "")
            for r in audit_rows(agent, "acme")
        )
    )
    assert gpt4o_allowed(), "the last good policy must stay in force"
    write_policy(agent.policies, "acme", POLICY.format(tenant="acme"))
    assert wait_for(lambda: not gpt4o_allowed())


def test_revocation_applies_to_running_gateway(
    agent: Gateway, env: tuple[Gateway, StandIn]
) -> None:
    token = agent.token("acme", "support-2")
    client = openai.OpenAI(api_key=token, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    import jwt

    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    aiid(agent.home, "token", "revoke", "acme", jti)

    def refused() -> bool:
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
            return False
        except openai.AuthenticationError:
            return True

    assert wait_for(refused, 4.0), "revocation not applied within 4 s"


def test_sdk_as_separate_process(env: tuple[Gateway, StandIn]) -> None:
    """An agent process configured only through its environment."""
    gw, _ = env
    code = (
        "import openai; c = openai.OpenAI(max_retries=0); "
        "print(c.chat.completions.create(model='gpt-4o-mini', "
        "messages=[{'role': 'user', 'content': 'hi'}]).choices[0].message.content)"
    )
    import sys

    p = subprocess.run(
        [sys.executable, "-c", code],
        env=gw.agent_env(gw.token("acme", "bot")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "Hello from the stand-in"


def test_a_second_gateway_on_the_same_home_refuses_to_start(
    env: tuple[Gateway, StandIn],
) -> None:
    """Two would each enforce the tenants' rate limits and budgets alone: twice the limit."""
    gw, _ = env
    p = aiid(
        gw.home,
        "run",
        "--no-console",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--policies",
        str(gw.policies),
        check=False,
    )
    assert p.returncode == 1, p
    assert p.stderr.startswith(  # the home's lock, taken before anything listens
        "aiid: error: aiid-proxy cannot start: another gateway (pid "
    ), p.stderr
    assert "is running on the home" in p.stderr
    assert len(p.stderr.splitlines()) == 1


def test_zz_audit_verifies_then_detects_edit_and_no_canary_anywhere(
    agent: Gateway, env: tuple[Gateway, StandIn]
) -> None:
    gw, _ = env
    # its own traffic, so it holds whichever worker runs it and in whatever order
    client = openai.OpenAI(api_key=agent.token("acme", "support-1"), max_retries=0)
    for _ in range(4):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
    out = aiid(gw.home, "audit", "verify", "acme").stdout
    assert out.startswith("OK ")
    n = int(out.split()[1])
    assert n > 10
    # canaries: no provider key or token in any file the gateway wrote, nor its output
    for path in list(gw.home.rglob("*")) + [gw.log_path]:
        if path.is_file():
            data = path.read_bytes()
            for canary in (OPENAI_CANARY, ANTHROPIC_CANARY, GITHUB_CANARY):
                assert canary.encode() not in data, f"{canary} found in {path}"
    con = sqlite3.connect(gw.home / "tenants" / "acme" / "audit.db")
    con.execute("UPDATE audit SET model = 'gpt-4o-mini-x' WHERE seq = 3")
    con.commit()
    con.close()
    p = aiid(gw.home, "audit", "verify", "acme", check=False)
    assert p.returncode == 1
    assert "seq 3" in p.stdout + p.stderr


@pytest.mark.parametrize("same_home", [True, False], ids=["gateways-home", "a-copy"])
def test_same_addons_under_plain_mitmdump(env: tuple[Gateway, StandIn], same_home: bool) -> None:
    """Teams that already run mitmproxy load the same pipeline with `mitmdump -s`; not on a
    home whose gateway runs (each would enforce the limits and budgets alone)."""
    import os
    import shutil
    import socket
    import sys

    from e2e import free_port

    gw, si = env
    home = gw.home
    if not same_home:  # the same keys, tenants and vaults: the same tokens are accepted
        home = gw.home.parent / "home-copy"
        if not home.exists():
            shutil.copytree(gw.home, home, ignore=shutil.ignore_patterns("control"))
    port = free_port()
    script = Path(__file__).resolve().parent.parent / "addons" / "aiid.py"
    mitmdump = str(Path(sys.executable).parent / "mitmdump")
    log = gw.home.parent / f"mitmdump-{same_home}.log"
    proc = subprocess.Popen(
        [
            mitmdump,
            "-q",
            "-s",
            str(script),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "--set",
            f"confdir={home / 'certs'}",
            "--set",
            f"aiid_home={home}",
            "--set",
            f"aiid_policies={gw.policies}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={si.ca_path}",
            "--set",
            f"map_remote=|//api.openai.com/|//localhost:{si.port}/",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "AIID_HOME": str(home)},
    )
    try:
        assert wait_for(lambda: _connectable(socket, port), 20), log.read_text()
        proxy = f"http://127.0.0.1:{port}"
        body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
        for key, want in ((gw.token("acme", "bot"), 200), ("junk", 401)):
            if same_home:  # mitmdump keeps a script whose configure failed (the home is
                want = 0  # locked by the running gateway): no gateway, every connection killed
            p = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "20",
                    "--proxy",
                    proxy,
                    "--cacert",
                    str(gw.ca),
                    "https://api.openai.com/v1/chat/completions",
                    "-H",
                    f"authorization: Bearer {key}",
                    "-H",
                    "content-type: application/json",
                    "-d",
                    body,
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert p.stdout.strip() == f"{want:03d}", log.read_text()
        if same_home:
            assert "gateway is not configured" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _connectable(socket_mod, port: int) -> bool:  # type: ignore[no-untyped-def]
    try:
        socket_mod.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_closed_terminal_stops_the_gateway_as_a_clean_stop_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP (an ssh drop, a tmux kill): it died at once, left its control socket, and the
    stream in flight was closed only at the next start, as after a kill -9 (pass [W])."""
    import signal
    import threading

    from aiid_proxy.control import socket_path
    from aiid_proxy.home import Home

    si = StandIn(tmp_path)
    si.start()
    try:
        home = make_home(tmp_path, {"acme": {"openai": OPENAI_CANARY}})
        policies = tmp_path / "policies"
        policies.mkdir()
        write_policy(policies, "acme", POLICY.format(tenant="acme"))
        gw = start_gateway(home, policies, si.port, si.ca_path)
        try:
            point_agent_at(gw, monkeypatch)
            client = openai.OpenAI(
                api_key=gw.token("acme", "support-1"),
                max_retries=0,
                default_headers={"x-standin-events": "200", "x-standin-delay-ms": "50"},
            )
            first = threading.Event()

            def agent() -> None:
                with contextlib.suppress(Exception):  # the stream ends with the gateway
                    for _ in client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": "hi"}],
                        stream=True,
                    ):
                        first.set()

            t = threading.Thread(target=agent, daemon=True)
            t.start()
            assert first.wait(20), gw.log()
            assert socket_path(Home(home)).exists()
            gw.proc.send_signal(signal.SIGHUP)
            assert gw.proc.wait(timeout=30) == 0, gw.log()
            t.join(30)
        finally:
            gw.stop()
        assert not socket_path(Home(home)).exists()
        rows = read_audit(home, "acme")
        ends = [r for r in rows if r["event"] == "error"]
        assert [r["reason"] for r in ends] == ["gateway shut down before the request completed"]
        assert ends[0]["output_tokens"] > 0  # the pieces it carried, charged at the stop
    finally:
        si.stop()
