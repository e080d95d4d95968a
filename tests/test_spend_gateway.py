"""The gateway's token limits, budgets and provider data, through the library pipeline, on a
FakeClock: reservations before the request, settlement with the real usage after, the audit
record's usage and cost, spend rebuilt at start, providers.yaml, and no ``?key=`` in audits."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CANARY_OPENAI, NOKEY_POLICY, audit_rows

from aiid_proxy.budget import PICO_PER_USD
from aiid_proxy.clock import FakeClock
from aiid_proxy.errors import ConfigError, RequestRefused
from aiid_proxy.gateway import DEFAULT_MAX_TOKENS_RESERVE, FlowState, Gateway, Target
from aiid_proxy.home import Home
from aiid_proxy.providers import Usage, parse_request

DAY_LEFT = 16 * 3600  # T0 = 2027-01-15T08:00:00Z

POLICY = """\
version: 1
tenant: acme
default: deny
rules:
  - id: openai
    providers: [openai]
    effect: allow
  - id: gemini
    providers: [gemini]
    effect: allow
  - id: own-endpoint
    providers: [acme-llm]
    effect: allow
limits:
  agents:
    "tpm-*": {tokens_per_minute: 1000}
    "both-*": {tokens_per_minute: 100000}
budgets:
  agents:
    "bud-*": {usd_per_day: 10}
    "both-*": {usd_per_day: 100000}
"""

# 1 USD per output token, input free: costs are whole dollars, easy to follow
PRICES = """\
version: 1
prices:
  openai:
    "gpt-4o-mini*": {input: 0, output: 1000000}
    "gpt-in*": {input: 1000000, output: 0}
"""


def body(model: str = "gpt-4o-mini", max_tokens: int | None = 3, **kw: Any) -> bytes:
    obj: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}
    if max_tokens is not None:
        obj["max_tokens"] = max_tokens
    return json.dumps(obj).encode()


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "acme.yaml").write_text(POLICY)
    (d / "nokey.yaml").write_text(NOKEY_POLICY)
    (d / "prices.yaml").write_text(PRICES)
    return d


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], policies: Path) -> Gateway:
    return make_gateway(policies)


def start(
    gw: Gateway,
    token: str,
    data: bytes,
    host: str = "api.openai.com",
    path: str = "/v1/chat/completions",
    query: str = "",
) -> FlowState:
    """identity -> route -> policy -> ratelimit (raises RequestRefused when refused)."""
    st = gw.new_flow(Target("https", host, 443, "POST", path, query))
    gw.identify(st, [("authorization", f"Bearer {token}")])
    gw.route(st, {"content-type": "application/json"}, data)
    gw.decide(st)
    try:
        gw.reserve(st)
    except RequestRefused as r:
        gw.record_refusal(st, r)
        raise
    return st


def finish(gw: Gateway, st: FlowState, usage: Usage | None) -> dict[str, Any]:
    """audit -> inject -> (upstream) -> response record; the record's row."""
    gw.audit_done(st, gw.audit_request(st).result(timeout=10))
    gw.inject(st)
    fut = gw.record_response(st, 200, usage)
    assert fut is not None
    fut.result(timeout=10)
    return next(
        r
        for r in audit_rows(gw.home, "acme")
        if r["request_id"] == st.request_id and r["event"] == "response"
    )


def estimate(data: bytes) -> int:
    from aiid_proxy.providers import Registry

    m = Registry.builtin().match("api.openai.com", "POST", "/v1/chat/completions")
    assert m is not None and m.route is not None
    return parse_request(m.route, data).estimated_input_tokens


# -- budgets -------------------------------------------------------------------------------------
def test_daily_budget_trips_at_exactly_the_right_request(
    gw: Gateway, issue: Callable[..., str], fake_clock: FakeClock
) -> None:
    """Budget 10 USD; each request holds 3 USD (max_tokens 3) and costs 2 (2 tokens out):
    spent 0, 2, 4, 6 admit a hold of 3; at 8 the hold would reach 11 -> the 5th is refused."""
    token = issue("bud-1")
    for i in range(4):
        row = finish(gw, start(gw, token, body()), Usage(5, 2))
        assert json.loads(row["detail"])["cost_usd"] == 2.0, i
    with pytest.raises(RequestRefused) as e:
        start(gw, token, body())
    r = e.value
    assert (r.status, r.type, r.rule) == (429, "budget_exceeded", "agent usd_per_day")
    # hours until the budget resets: the anthropic SDK slept out such a Retry-After
    assert r.headers["x-should-retry"] == "false" and int(r.headers["retry-after"]) > 0
    assert "agent budget usd_per_day 10.00 for bud-* exceeded: spent 8.00" in r.message
    assert r.headers["retry-after"] == str(DAY_LEFT)
    assert f"retry after {DAY_LEFT} s" in r.message
    # a 2-token request still fits exactly (8 + 2 = 10)
    finish(gw, start(gw, token, body(max_tokens=2)), Usage(5, 2))
    with pytest.raises(RequestRefused):
        start(gw, token, body(max_tokens=0 + 1))
    # another agent of the same glob has its own budget; the next UTC day starts afresh
    start(gw, issue("bud-2"), body())
    fake_clock.advance(DAY_LEFT)
    start(gw, issue("bud-1"), body())
    deny = [r for r in audit_rows(gw.home, "acme") if r["event"] == "deny"]
    assert deny and deny[0]["status"] == 429 and "budget_exceeded" in deny[0]["reason"]


def test_without_max_tokens_the_default_cap_is_held(gw: Gateway, issue: Callable[..., str]) -> None:
    with pytest.raises(RequestRefused) as e:
        start(gw, issue("bud-1"), body(max_tokens=None))
    assert f"may cost up to {DEFAULT_MAX_TOKENS_RESERVE}.00" in e.value.message
    # more than the whole 10 USD budget: it can never pass, so no "retry after" ([AB])
    assert "it can never pass; lower max_tokens" in e.value.message
    assert "retry after" not in e.value.message


def test_spend_is_rebuilt_when_the_gateway_starts(
    gw: Gateway, make_gateway: Callable[..., Gateway], policies: Path, issue: Callable[..., str]
) -> None:
    token = issue("bud-1")
    for _ in range(4):
        finish(gw, start(gw, token, body()), Usage(5, 2))
    gw.close()
    again = make_gateway(policies)
    assert again.ledger.spent("acme", "bud-1").day == 8 * PICO_PER_USD
    with pytest.raises(RequestRefused) as e:
        start(again, token, body())
    assert e.value.type == "budget_exceeded"


def test_unpriced_model_is_refused_only_under_a_budget(
    gw: Gateway, issue: Callable[..., str]
) -> None:
    with pytest.raises(RequestRefused) as e:
        start(gw, issue("bud-1"), body("gpt-nobody-prices"))
    assert (e.value.status, e.value.type) == (403, "policy_denied")
    assert "no price for model 'gpt-nobody-prices'" in e.value.message
    assert "budgets need prices.yaml" in e.value.message
    st = start(gw, issue("free-1"), body("gpt-nobody-prices"))
    assert st.hold is None
    row = finish(gw, st, Usage(5, 2))
    assert "cost_usd" not in json.loads(row["detail"])


def test_a_request_naming_no_model_under_a_budget_is_told_so(
    gw: Gateway, issue: Callable[..., str]
) -> None:
    """A stored prompt names the model elsewhere: the refusal said "no price for model
    '(none)'; budgets need prices.yaml", which no price can fix."""
    data = json.dumps({"prompt": {"id": "pmpt_abc", "version": "2"}, "input": "hi"}).encode()
    with pytest.raises(RequestRefused) as e:
        start(gw, issue("bud-1"), data, path="/v1/responses")
    assert (e.value.status, e.value.type, e.value.rule) == (403, "policy_denied", "budgets")
    assert "the request names no model (responses at 'openai')" in e.value.message
    assert "prices.yaml" not in e.value.message


def test_prompt_cache_writes_are_costed_at_twice_the_input_price(
    gw: Gateway, issue: Callable[..., str]
) -> None:
    """Anthropic bills cache writes at 1.25x or 2x the input price: costed at the full price,
    spend was no upper bound any more (a budget could be overrun by half)."""
    st = start(gw, issue("bud-1"), body("gpt-in-x", max_tokens=1))
    row = finish(gw, st, Usage(5, 0, cache_write_tokens=2))  # $1 an input token
    assert row["input_tokens"] == 5  # the tokens as they were
    assert json.loads(row["detail"])["cost_usd"] == 7.0  # 3 at $1, 2 written at $2


def test_cost_is_recorded_for_tenants_without_budgets(
    gw: Gateway, issue: Callable[..., str]
) -> None:
    row = finish(gw, start(gw, issue("free-1"), body("gpt-in-x")), Usage(7, 100))
    assert json.loads(row["detail"])["cost_usd"] == 7.0  # 1 USD per input token
    assert gw.ledger.spent("acme", "free-1").day == 7 * PICO_PER_USD


@pytest.mark.parametrize(
    ("max_tokens", "n", "usage", "billed"),
    [
        pytest.param(2, None, Usage(1, 3, estimated=True), 2, id="estimate-capped"),
        pytest.param(2, 2, Usage(1, 5, estimated=True), 4, id="capped-at-max-tokens-times-n"),
        pytest.param(2, None, Usage(1, 3), 3, id="reported-usage-is-the-bill"),
        pytest.param(None, None, Usage(1, 9000, estimated=True), 9000, id="no-max-tokens"),
    ],
)
def test_an_estimated_output_never_counts_more_than_max_tokens_allows(
    gw: Gateway,
    issue: Callable[..., str],
    max_tokens: int | None,
    n: int | None,
    usage: Usage,
    billed: int,
) -> None:
    """A provider that reports no usage: the estimate (chars / 4, one per piece) may run past
    max_tokens, and concurrent requests then spent past a budget ($9 of $7 in an acceptance
    run). Capped at max_tokens x n, which no provider bills past."""
    extra = {"n": n} if n is not None else {}
    row = finish(gw, start(gw, issue("free-1"), body(max_tokens=max_tokens, **extra)), usage)
    assert row["output_tokens"] == billed
    assert json.loads(row["detail"])["cost_usd"] == billed  # 1 USD per output token


@pytest.mark.parametrize(
    ("sent", "spent"),
    [
        pytest.param(False, 0, id="never-left-everything-back"),
        pytest.param(True, 1, id="left-input-charged"),
    ],
)
def test_error_settles_or_releases(
    gw: Gateway, issue: Callable[..., str], sent: bool, spent: int
) -> None:
    st = start(gw, issue("bud-1"), body("gpt-in-x", max_tokens=3))
    est = estimate(body("gpt-in-x", max_tokens=3))
    fut = gw.record_error(st, "upstream or connection error: reset", sent=sent)
    assert fut is not None
    fut.result(timeout=10)
    s = gw.ledger.spent("acme", "bud-1")
    assert (s.day, s.held) == (spent * est * PICO_PER_USD, 0)
    row = audit_rows(gw.home, "acme")[-1]
    assert row["event"] == "error"
    if sent:
        assert row["input_tokens"] == est and json.loads(row["detail"])["usage_estimated"]
    else:
        assert row["input_tokens"] is None


def test_refusal_after_the_hold_gives_it_back(gw: Gateway, issue: Callable[..., str]) -> None:
    st = start(gw, issue("bud-1"), body())
    assert gw.ledger.spent("acme", "bud-1").held == 3 * PICO_PER_USD
    gw.record_refusal(st, RequestRefused(403, "no_credential", "x"))
    assert gw.ledger.spent("acme", "bud-1").held == 0


def test_the_hold_counts_the_tools_the_request_sends(
    gw: Gateway, issue: Callable[..., str]
) -> None:
    """gpt-in costs 1 USD an input token. "hi" in one message holds 5; tool definitions are
    input the provider bills too (32 characters here: 8 more). Held as "hi" alone, requests
    with big tools passed a budget many times over when sent at once (pass [U])."""
    token = issue("bud-tools")
    tools = [{"type": "function", "function": {"name": "abcdefgh"}}]
    with pytest.raises(RequestRefused) as refused:
        start(gw, token, body("gpt-in", max_tokens=1, tools=tools))
    assert refused.value.status == 429 and "13" in refused.value.message
    st = start(gw, token, body("gpt-in", max_tokens=1))
    assert st.hold is not None and st.hold.amount == 5 * PICO_PER_USD


def test_concurrent_agents_never_overshoot_a_budget(gw: Gateway, issue: Callable[..., str]) -> None:
    """16 threads, each request holds 3 and costs 3: at most floor(10 / 3) = 3 per agent."""
    tokens = {i: issue(f"bud-{i}") for i in range(4)}
    admitted: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def agent(i: int) -> None:
        barrier.wait()
        for _ in range(5):
            try:
                st = start(gw, tokens[i % 4], body())
            except RequestRefused:
                continue
            with lock:
                admitted.append(i % 4)
            gw.record_response(st, 200, Usage(1, 3))

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert admitted.count(i) == 3
        assert gw.ledger.spent("acme", f"bud-{i}").day == 9 * PICO_PER_USD


# -- tokens per minute ---------------------------------------------------------------------------
def test_tpm_reserves_before_and_settles_after_exactly(
    gw: Gateway, issue: Callable[..., str]
) -> None:
    """TPM 1000; reservation R = estimate + 300; real use 206. Admitted while 1000 - 206k >= R.
    Charging the reservation instead would refuse the 4th; checking only after the fact would
    admit a 6th."""
    data = body(max_tokens=300)
    r = estimate(data) + 300
    token = issue("tpm-1")
    expect_admitted = max(k + 1 for k in range(10) if 1000 - 206 * k >= r)
    admitted = 0
    for _ in range(10):
        try:
            st = start(gw, token, data)
        except RequestRefused as e:
            assert (e.status, e.type, e.rule) == (429, "rate_limited", "agent tokens_per_minute")
            h = e.headers
            assert h["x-ratelimit-limit-tokens"] == "1000"
            assert int(h["x-ratelimit-remaining-tokens"]) == 1000 - 206 * admitted
            assert int(h["retry-after"]) >= 1
            break
        admitted += 1
        finish(gw, st, Usage(6, 200))
    assert admitted == expect_admitted == 4


def test_concurrent_reservations_never_exceed_the_limit(
    gw: Gateway, issue: Callable[..., str]
) -> None:
    data = body(max_tokens=90)
    r = estimate(data) + 90
    token = issue("tpm-2")
    held: list[FlowState] = []
    lock = threading.Lock()

    def agent() -> None:
        for _ in range(10):
            try:
                st = start(gw, token, data)
            except RequestRefused:
                continue
            with lock:
                held.append(st)

    threads = [threading.Thread(target=agent) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) == 1000 // r


@pytest.mark.parametrize(
    ("agent", "data", "cap"),
    [
        pytest.param("tpm-1", body(max_tokens=50), 50, id="tpm-max-tokens"),
        pytest.param("bud-1", body(max_tokens=5), 5, id="budget-max-tokens"),
        pytest.param("both-1", body(max_tokens=None), DEFAULT_MAX_TOKENS_RESERVE, id="default"),
        pytest.param("both-1", body(max_tokens=50, n=3), 150, id="n-choices"),
        pytest.param("free-1", body(max_tokens=50), None, id="no-limit-no-cut"),
    ],
)
def test_output_cap_only_where_a_limit_or_budget_applies(
    gw: Gateway, issue: Callable[..., str], agent: str, data: bytes, cap: int | None
) -> None:
    assert start(gw, issue(agent), data).output_cap == cap


# -- providers as data; ?key= never recorded ----------------------------------------------------
def test_providers_file_in_the_policy_directory_is_loaded(
    make_gateway: Callable[..., Gateway], policies: Path, issue: Callable[..., str]
) -> None:
    (policies / "providers.yaml").write_text(
        "version: 1\nproviders:\n  acme-llm:\n    openai_compatible: true\n"
        "    hosts: [llm.acme.example]\n    region: eu\n"
    )
    gw = make_gateway(policies)
    st = start(
        gw, issue("free-1"), body("any-model"), host="llm.acme.example", path="/v1/chat/completions"
    )
    assert st.provider_name == "acme-llm" and st.route is not None
    assert st.route.provider is not None and st.route.provider.region == "eu"


def test_a_broken_providers_file_stops_the_start(
    gateway_home: Home, fake_clock: FakeClock, policies: Path
) -> None:
    (policies / "providers.yaml").write_text("version: 1\nproviders:\n  x: {hosts: []}\n")
    with pytest.raises(ConfigError):
        Gateway(gateway_home, policies, clock=fake_clock, watch=False, env={})


def test_gemini_key_in_the_query_is_never_recorded(gw: Gateway, issue: Callable[..., str]) -> None:
    secret = "AIzaSy-agent-sent-this-0123456789"
    data = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
    path = "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    st = start(
        gw, issue("free-1"), data, "generativelanguage.googleapis.com", path, f"key={secret}"
    )
    gw.audit_done(st, gw.audit_request(st).result(timeout=10))
    fut = gw.record_error(st, "test", sent=False)
    assert fut is not None
    fut.result(timeout=10)
    rows = [r for r in audit_rows(gw.home, "acme") if r["request_id"] == st.request_id]
    assert [r["event"] for r in rows] == ["request", "error"]
    assert json.loads(rows[0]["detail"])["path"] == path
    assert secret not in json.dumps(rows)
    assert secret.encode() not in gw.home.audit_path("acme").read_bytes()
    assert CANARY_OPENAI not in json.dumps(rows)
