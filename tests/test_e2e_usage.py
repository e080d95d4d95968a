"""End to end, streaming and spend: a real `aiid run`, the official SDKs streaming through it to
the stand-in, usage in the audit records, token limits and budgets that trip at exactly the
right request (also with concurrent agents), a stream cut at its reservation, scrubbing inside
streams, Gemini's ``?key=``, and a non-LLM egress rule.

The stand-in's token counts are deterministic (input = len(request body) // 16, output = the
number of text pieces, ``x-standin-events``), so every expectation is computed, not guessed.
"""

from __future__ import annotations

import json
import math
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from e2e import (
    ANTHROPIC_CANARY,
    GITHUB_CANARY,
    OPENAI_CANARY,
    Gateway,
    make_home,
    point_agent_at,
    read_audit,
    start_gateway,
)
from standin import StandIn, prompt_tokens_for, standin_text

from aiid_proxy.budget import usd_to_pico
from aiid_proxy.providers import Registry, parse_request

pytestmark = pytest.mark.e2e

GEMINI_CANARY = "AIza-canary-gemini-5e1f0c9a7b3d"
KEYS = {
    "openai": OPENAI_CANARY,
    "anthropic": ANTHROPIC_CANARY,
    "github": GITHUB_CANARY,
    "gemini": GEMINI_CANARY,
}
TENANTS = ("strm", "tpma", "tpmt", "spend", "conc")

RULES = """
version: 1
tenant: {tenant}
default: deny
rules:
  - id: openai-mini
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
  - id: claude
    providers: [anthropic]
    models: ["claude-*"]
    effect: allow
  - id: gemini
    providers: [gemini]
    effect: allow
  - id: github-for-coders
    agents: ["coder-*"]
    hosts: ["api.github.com"]
    methods: [GET]
    paths: ["/repos/*"]
    inject: {{header: Authorization, scheme: Bearer, secret: github}}
    effect: allow
"""
EXTRA = {
    # cut-* agents are under a (generous) token limit, so their reservation is enforced
    "strm": 'limits:\n  agents:\n    "cut-*": {tokens_per_minute: 1000000}\n',
    "tpma": 'limits:\n  agents:\n    "tpm-*": {tokens_per_minute: 1200}\n',
    "tpmt": "limits:\n  tenant: {tokens_per_minute: 1200}\n",
    "spend": 'budgets:\n  agents:\n    "bud-*": {usd_per_day: 5}\n',
    "conc": "budgets:\n  tenant: {usd_per_day: 7.5}\n",
}
# big prices, so that a few requests exhaust a budget
PRICES = """
version: 1
prices:
  openai:
    "gpt-4o-mini-bud*": {input: 1000, output: 100000}     # 0.001 / 0.1 USD a token
    "gpt-4o-mini-conc*": {input: 0, output: 1000000}      # 1 USD an output token
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, StandIn]]:
    root = tmp_path_factory.mktemp("e2e-usage")
    si = StandIn(root)
    si.start()
    home = make_home(root, {t: KEYS for t in TENANTS})
    policies = root / "policies"
    policies.mkdir()
    for t in TENANTS:
        (policies / f"{t}.yaml").write_text(RULES.format(tenant=t) + EXTRA.get(t, ""))
    (policies / "prices.yaml").write_text(PRICES)
    gemini = "generativelanguage.googleapis.com"
    extra = ["--set", f"map_remote=|//{gemini}/|//localhost:{si.port}/"]
    gw = start_gateway(home, policies, si.port, si.ca_path, extra)
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


def rows(gw: Gateway, tenant: str) -> list[dict[str, Any]]:
    return read_audit(gw.home, tenant)


def record(gw: Gateway, tenant: str, rid: str, event: str = "response") -> dict[str, Any]:
    """The audit record of a request; the response record is written just after the body."""
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in rows(gw, tenant) if r["request_id"] == rid and r["event"] == event]
        if found or time.monotonic() > deadline:
            assert found, f"no {event} record for {rid}"
            return found[0]
        time.sleep(0.05)


def detail(row: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(row["detail"]))


def estimate(body: bytes, path: str = "/v1/chat/completions") -> int:
    m = Registry.builtin().match("api.openai.com", "POST", path)
    assert m is not None and m.route is not None
    return parse_request(m.route, body).estimated_input_tokens


def oai(gw: Gateway, tenant: str, agent_name: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=gw.token(tenant, agent_name), max_retries=0, default_headers=headers or None
    )


def ant(gw: Gateway, tenant: str, agent_name: str, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=gw.token(tenant, agent_name), max_retries=0, default_headers=headers or None
    )


HI = [{"role": "user", "content": "hi"}]


# -- streaming with the SDKs: text intact, usage in the audit record ----------------------------
def stream_chat(c: openai.OpenAI, usage: bool, **kw: Any) -> tuple[str, str]:
    with c.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=HI,
        stream=True,
        stream_options={"include_usage": True} if usage else None,
        **kw,
    ) as raw:
        rid = raw.headers["x-aiid-request-id"]
        text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    return rid, text


def stream_responses(c: openai.OpenAI, **kw: Any) -> tuple[str, str]:
    with c.responses.with_streaming_response.create(
        model="gpt-4o-mini", input="hi", stream=True, **kw
    ) as raw:
        rid = raw.headers["x-aiid-request-id"]
        text = "".join(e.delta for e in raw.parse() if e.type == "response.output_text.delta")
    return rid, text


def stream_messages(c: anthropic.Anthropic, **kw: Any) -> tuple[str, str]:
    kw.setdefault("max_tokens", 100)
    with c.messages.with_streaming_response.create(
        model="claude-3-5-haiku-latest", messages=HI, stream=True, **kw
    ) as raw:
        rid = raw.headers["x-aiid-request-id"]
        text = "".join(
            e.delta.text
            for e in raw.parse()
            if e.type == "content_block_delta" and e.delta.type == "text_delta"
        )
    return rid, text


@pytest.mark.parametrize(
    "api", [pytest.param("chat", id="chat"), pytest.param("responses", id="responses"),
            pytest.param("messages", id="anthropic-messages")],
)  # fmt: skip
@pytest.mark.parametrize(
    ("usage_on", "events"),
    [pytest.param(True, 5, id="usage-reported"), pytest.param(False, 9, id="no-usage-estimated")],
)
def test_sdk_streams_arrive_intact_with_usage_audited(
    agent: Gateway, env: tuple[Gateway, StandIn], api: str, usage_on: bool, events: int
) -> None:
    _, si = env
    h = {"x-standin-events": str(events)}
    if not usage_on:
        h["x-standin-usage"] = "0"
    if api == "chat":
        rid, text = stream_chat(oai(agent, "strm", "writer", **h), usage_on)
    elif api == "responses":
        rid, text = stream_responses(oai(agent, "strm", "writer", **h))
    else:
        rid, text = stream_messages(ant(agent, "strm", "writer", **h))
    assert text == standin_text(events)
    row = record(agent, "strm", rid)
    if usage_on:
        assert (row["input_tokens"], row["output_tokens"]) == (
            prompt_tokens_for(si.last().body),
            events,
        )
        assert "usage_estimated" not in detail(row)
    else:
        assert detail(row)["usage_estimated"] is True
        # one token at least per text piece, never zero; input from the gateway's estimate
        assert row["output_tokens"] >= events and row["input_tokens"] > 0


@pytest.mark.parametrize(
    "usage_on", [pytest.param(True, id="usage-reported"), pytest.param(False, id="estimated")]
)
def test_non_streamed_usage_is_audited_too(
    agent: Gateway, env: tuple[Gateway, StandIn], usage_on: bool
) -> None:
    _, si = env
    h = {} if usage_on else {"x-standin-usage": "0"}
    r = oai(agent, "strm", "writer", **h).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI
    )
    assert r.parse().choices[0].message.content == standin_text(5)
    row = record(agent, "strm", r.headers["x-aiid-request-id"])
    if usage_on:
        assert (row["input_tokens"], row["output_tokens"]) == (
            prompt_tokens_for(si.last().body),
            5,
        )
    else:
        assert detail(row)["usage_estimated"] is True
        assert row["output_tokens"] == math.ceil(len(standin_text(5)) / 4)


def test_events_are_passed_on_as_they_arrive(agent: Gateway) -> None:
    """Three events one second apart: a buffering gateway would hand them over together."""
    c = oai(agent, "strm", "writer", **{"x-standin-events": "3", "x-standin-delay-ms": "1000"})
    seen: list[float] = []
    stream = c.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            seen.append(time.monotonic())
    assert len(seen) == 3
    assert seen[-1] - seen[0] >= 1.5  # they arrived spread out, as they were sent


def test_gemini_stream_key_in_query_stripped_and_never_recorded(
    env: tuple[Gateway, StandIn],
) -> None:
    gw, si = env
    secret = "AIza-agent-query-key-7d2b9e"
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    with httpx2.Client(proxy=gw.proxy, verify=ctx, trust_env=False, timeout=20) as c:
        r = c.post(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:"
            f"streamGenerateContent?alt=sse&key={secret}",
            headers={"x-goog-api-key": gw.token("strm", "writer")},
            json={"contents": [{"parts": [{"text": "hi"}]}]},
        )
    assert r.status_code == 200, r.text
    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: "):
            text += json.loads(line[6:])["candidates"][0]["content"]["parts"][0]["text"]
    assert text == standin_text(5)
    up = si.last()
    assert "key=" not in up.path and secret not in up.path and "alt=sse" in up.path
    assert up.header("x-goog-api-key") == GEMINI_CANARY
    row = record(gw, "strm", r.headers["x-aiid-request-id"])
    assert row["provider"] == "gemini" and row["output_tokens"] == 5
    assert detail(row)["path"] == "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    assert secret.encode() not in (gw.home / "tenants" / "strm" / "audit.db").read_bytes()
    assert secret not in gw.log()


# -- the cut -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "api", [pytest.param("chat", id="chat"), pytest.param("responses", id="responses"),
            pytest.param("messages", id="anthropic-messages")],
)  # fmt: skip
def test_stream_past_its_reservation_is_cut(agent: Gateway, api: str) -> None:
    """max_tokens 7, but the stand-in ignores it and sends 400 pieces, 30 ms apart: the agent
    gets exactly 7, then an API error; the provider connection is closed (so the record is
    written long before the 12 s the stand-in would take), and the cut is audited."""
    h = {"x-standin-events": "400", "x-standin-delay-ms": "30"}
    got: list[str] = []
    rid = ""
    with pytest.raises((openai.APIError, anthropic.APIError)) as e:
        if api == "chat":
            c = oai(agent, "strm", "cut-1", **h)
            with c.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=HI, stream=True, max_tokens=7
            ) as raw:
                rid = raw.headers["x-aiid-request-id"]
                for ch in raw.parse():
                    got.append(ch.choices[0].delta.content or "" if ch.choices else "")
        elif api == "responses":
            c = oai(agent, "strm", "cut-1", **h)
            with c.responses.with_streaming_response.create(
                model="gpt-4o-mini", input="hi", stream=True, max_output_tokens=7
            ) as raw:
                rid = raw.headers["x-aiid-request-id"]
                for ev in raw.parse():
                    if ev.type == "response.output_text.delta":
                        got.append(ev.delta)
        else:
            a = ant(agent, "strm", "cut-1", **h)
            with a.messages.with_streaming_response.create(
                model="claude-3-5-haiku-latest", messages=HI, stream=True, max_tokens=7
            ) as raw:
                rid = raw.headers["x-aiid-request-id"]
                for ev in raw.parse():
                    if ev.type == "content_block_delta" and ev.delta.type == "text_delta":
                        got.append(ev.delta.text)
    assert "reservation" in str(e.value)
    assert "".join(got) == standin_text(7)
    row = record(agent, "strm", rid)
    d = detail(row)
    assert d["cut"] == "reservation exceeded" and d["usage_estimated"] is True
    # estimated (no usage reported) from what passed, but never above max_tokens: no
    # provider bills past it, and a budget must not count more than it held
    assert row["output_tokens"] == 7


# -- scrubbing inside streams --------------------------------------------------------------------
@pytest.mark.parametrize(
    "api", [pytest.param("chat", id="openai"), pytest.param("messages", id="anthropic")]
)
def test_key_echoed_inside_a_stream_is_scrubbed(agent: Gateway, api: str) -> None:
    h = {"x-standin-echo-key": "1"}
    if api == "chat":
        _, text = stream_chat(oai(agent, "strm", "writer", **h), True)
        canary = OPENAI_CANARY
    else:
        _, text = stream_messages(ant(agent, "strm", "writer", **h))
        canary = ANTHROPIC_CANARY
    assert canary not in text and "[REDACTED]" in text


# -- tokens per minute ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tenant", "agents"),
    [
        pytest.param("tpma", ["tpm-1"], id="agent-limit"),
        pytest.param("tpmt", ["x-1", "x-2"], id="tenant-limit-shared-by-agents"),
    ],
)
def test_tpm_limit_trips_at_exactly_the_right_request(
    agent: Gateway, env: tuple[Gateway, StandIn], tenant: str, agents: list[str]
) -> None:
    """Limit 1200/min. Each request reserves estimate + max_tokens 300 and really uses
    len(body)//16 + 200. Expected from that arithmetic: admitted while left >= reservation.
    (The bucket refills 20 tokens/s; the margin at the trip is over 100 tokens, seconds of
    refill, far more than the test takes.)"""
    _, si = env
    clients = [oai(agent, tenant, a, **{"x-standin-events": "200"}) for a in agents]
    left, admitted, refused_at = 1200, 0, None
    for i in range(12):
        c = clients[i % len(clients)]
        try:
            r = c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=HI, max_tokens=300
            )
        except openai.RateLimitError as e:
            refused_at = i
            body = si.last().body
            assert left < estimate(body) + 300  # refused exactly when it no longer fits
            assert e.response.headers["x-ratelimit-limit-tokens"] == "1200"
            assert int(e.response.headers["x-ratelimit-remaining-tokens"]) >= left
            assert int(e.response.headers["retry-after"]) >= 1
            assert e.response.headers["x-ratelimit-reset-tokens"].endswith("s")
            assert isinstance(e.body, dict) and e.body["type"] == "rate_limited"
            assert "tokens_per_minute" in e.body["rule"]
            break
        body = si.last().body
        assert left >= estimate(body) + 300, "admitted although the reservation did not fit"
        assert r.headers["x-ratelimit-limit-tokens"] == "1200"
        left -= prompt_tokens_for(body) + 200
        admitted += 1
        row = record(agent, tenant, r.headers["x-aiid-request-id"])
        assert row["output_tokens"] == 200
    assert refused_at is not None and refused_at == admitted
    assert admitted == 5  # 1200 - 5 * 205 = 175 < 305; charging 305 each would stop at 3


# -- budgets -------------------------------------------------------------------------------------
def seconds_to_utc_midnight() -> float:
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


def test_daily_budget_trips_at_exactly_the_right_request(
    agent: Gateway, env: tuple[Gateway, StandIn]
) -> None:
    """5 USD a day; each streamed request may cost estimate * 0.001 + 20 * 0.1 (max_tokens 20)
    and costs len(body)//16 * 0.001 + 5 * 0.1 (5 pieces, counted from the stream's usage)."""
    _, si = env
    c = oai(agent, "spend", "bud-1")
    cap = usd_to_pico(5)
    spent = 0
    admitted = 0
    for _ in range(12):
        try:
            rid, text = stream_chat_model(c, "gpt-4o-mini-bud", max_tokens=20)
        except openai.RateLimitError as e:
            body = si.last().body
            hold = usd_to_pico(0.001) * estimate(body) + usd_to_pico(0.1) * 20
            assert spent + hold > cap
            assert isinstance(e.body, dict) and e.body["type"] == "budget_exceeded"
            assert e.body["rule"] == "agent usd_per_day"
            assert "agent budget usd_per_day 5.00 for bud-*" in e.body["message"]
            assert abs(int(e.response.headers["retry-after"]) - seconds_to_utc_midnight()) < 30
            break
        assert text == standin_text(5)
        body = si.last().body
        hold = usd_to_pico(0.001) * estimate(body) + usd_to_pico(0.1) * 20
        assert spent + hold <= cap, "admitted past the budget"
        cost = usd_to_pico(0.001) * prompt_tokens_for(body) + usd_to_pico(0.1) * 5
        row = record(agent, "spend", rid)
        assert usd_to_pico(detail(row)["cost_usd"]) == cost
        spent += cost
        admitted += 1
    assert admitted == 6  # 6 * ~0.507 = 3.04 spent; + ~2.005 held > 5
    deny = [r for r in rows(agent, "spend") if r["event"] == "deny"]
    assert deny[-1]["status"] == 429 and deny[-1]["rule"] == "agent usd_per_day"


def stream_chat_model(c: openai.OpenAI, model: str, **kw: Any) -> tuple[str, str]:
    with c.chat.completions.with_streaming_response.create(
        model=model, messages=HI, stream=True, stream_options={"include_usage": True}, **kw
    ) as raw:
        rid = raw.headers["x-aiid-request-id"]
        text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    return rid, text


def test_budget_with_concurrent_agents_never_overshoots(agent: Gateway) -> None:
    """Tenant budget 7.5 USD; every request holds and costs exactly 1 USD (1 piece, max_tokens
    1, output at 1 USD a token, input free): 20 requests from 4 agents at once -> exactly 7."""
    clients = [oai(agent, "conc", f"agent-{i}", **{"x-standin-events": "1"}) for i in range(4)]
    outcome: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def one(i: int) -> None:
        barrier.wait()
        try:
            _, text = stream_chat_model(clients[i % 4], "gpt-4o-mini-conc", max_tokens=1)
            got = "ok" if text == standin_text(1) else f"bad text {text!r}"
        except openai.RateLimitError as e:
            got = e.body["type"] if isinstance(e.body, dict) else "?"
        with lock:
            outcome.append(got)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcome) == ["budget_exceeded"] * 13 + ["ok"] * 7
    deadline = time.monotonic() + 10
    while True:
        costs = [detail(r).get("cost_usd") for r in rows(agent, "conc") if r["event"] == "response"]
        if len(costs) == 7 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert costs == [1.0] * 7 and sum(costs) <= 7.5


# -- non-LLM egress ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("who", "url", "status"),
    [
        pytest.param("coder-1", "https://api.github.com/repos/a/b", 200, id="allowed-agent"),
        pytest.param("writer", "https://api.github.com/repos/a/b", 403, id="other-agent"),
        pytest.param("coder-1", "https://api.mistral.ai/repos/a/b", 403, id="other-host"),
        pytest.param("coder-1", "https://api.github.com/user", 403, id="other-path"),
    ],
)
def test_egress_rule_for_one_agent_one_api(
    env: tuple[Gateway, StandIn], who: str, url: str, status: int
) -> None:
    gw, si = env
    before = si.hits()
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    with httpx2.Client(proxy=gw.proxy, verify=ctx, trust_env=False, timeout=20) as c:
        r = c.get(url, headers={"authorization": f"Bearer {gw.token('strm', who)}"})
    assert r.status_code == status, r.text
    assert GITHUB_CANARY not in r.text and GITHUB_CANARY not in json.dumps(dict(r.headers))
    if status == 200:
        assert si.last().header("authorization") == f"Bearer {GITHUB_CANARY}"
        assert si.hits() == before + 1
    else:
        assert r.json()["error"]["type"] == "policy_denied"
        assert si.hits() == before


def test_zz_audit_chains_verify_and_no_secret_anywhere(env: tuple[Gateway, StandIn]) -> None:
    from e2e import aiid

    gw, _ = env
    for t in TENANTS:
        assert aiid(gw.home, "audit", "verify", t).stdout.startswith("OK ")
    for path in [*gw.home.rglob("*"), gw.log_path]:
        if path.is_file():
            data = path.read_bytes()
            for canary in KEYS.values():
                assert canary.encode() not in data, f"{canary} found in {path}"
