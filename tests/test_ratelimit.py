from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiid_proxy.clock import FakeClock
from aiid_proxy.ratelimit import (
    PRUNE_EVERY,
    PRUNE_IDLE_SECONDS,
    LimitSpec,
    RateDecision,
    RateLimiter,
    Reservation,
    TokenBucket,
)

T = "acme"


def rpm(n: int) -> LimitSpec:
    return LimitSpec(requests_per_minute=n)


def tpm(n: int) -> LimitSpec:
    return LimitSpec(tokens_per_minute=n)


def acquire(
    rl: RateLimiter,
    agent: str = "a1",
    tenant_limit: LimitSpec | None = None,
    agent_limit: LimitSpec | None = None,
    tokens: int = 0,
) -> tuple[RateDecision, Reservation | None]:
    return rl.acquire(T, agent, tenant_limit, agent_limit, tokens)


# -- LimitSpec ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"requests_per_minute": -1}, id="negative"),
        pytest.param({"tokens_per_minute": 1.5}, id="float"),
        pytest.param({"requests_per_minute": True}, id="bool"),
        pytest.param({"tokens_per_minute": "100"}, id="string"),
    ],
)
def test_limit_spec_refuses(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        LimitSpec(**kwargs)  # type: ignore[arg-type]


def test_limit_spec_defaults_are_unlimited() -> None:
    assert LimitSpec() == LimitSpec(None, None)


# -- TokenBucket ----------------------------------------------------------------------------------
def test_bucket_take_refill_and_wait() -> None:
    clock = FakeClock()
    b = TokenBucket(10, 2.0, clock)
    assert b.try_take(10)
    assert not b.try_take(1)
    assert b.time_until(1) == pytest.approx(0.5)
    assert b.time_until(4) == pytest.approx(2.0)
    assert b.time_until(11) == math.inf
    clock.advance(0.5)
    assert b.try_take(1)
    assert not b.try_take(1)
    clock.advance(100)
    assert b.tokens == 10  # capped at capacity


def test_bucket_give_back_caps_and_debt_goes_negative() -> None:
    clock = FakeClock()
    b = TokenBucket(10, 1.0, clock)
    b.try_take(4)
    b.give_back(100)
    assert b.tokens == 10
    b.take_debt(15)
    assert b.tokens == -5
    assert b.time_until(1) == pytest.approx(6.0)
    assert not b.try_take(1)
    clock.advance(6)
    assert b.try_take(1)


def test_bucket_zero_take_passes_even_in_debt() -> None:
    b = TokenBucket(10, 1.0, FakeClock())
    b.take_debt(50)
    assert b.time_until(0) == 0
    assert b.try_take(0)
    assert not b.try_take(1)
    assert b.tokens == -40


def test_bucket_failed_take_takes_nothing() -> None:
    b = TokenBucket(10, 1.0, FakeClock())
    assert b.try_take(7)
    assert not b.try_take(4)
    assert b.tokens == 3


# -- exact boundaries -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scope", "label"),
    [
        pytest.param("agent", "agent requests_per_minute", id="agent"),
        pytest.param("tenant", "tenant requests_per_minute", id="tenant"),
    ],
)
def test_60_rpm_boundary(scope: str, label: str) -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    limits = {"tenant_limit": rpm(60)} if scope == "tenant" else {"agent_limit": rpm(60)}
    for i in range(60):
        d, r = acquire(rl, **limits)
        assert d.allowed and r is not None, i
        assert d.remaining_requests == 59 - i
    d, r = acquire(rl, **limits)
    assert (d.allowed, d.limit, d.retry_after, r) == (False, label, 1, None)
    assert d.remaining_requests == 0 and d.limit_requests == 60
    clock.advance(0.5)
    d, _ = acquire(rl, **limits)
    assert (d.allowed, d.retry_after) == (False, 1)
    clock.advance(0.5)
    d, _ = acquire(rl, **limits)
    assert d.allowed
    d, _ = acquire(rl, **limits)
    assert (d.allowed, d.retry_after) == (False, 1)


def test_tokens_per_minute_retry_after() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    d, _ = acquire(rl, agent_limit=tpm(1000), tokens=600)
    assert d.allowed and d.remaining_tokens == 400 and d.limit_tokens == 1000
    d, _ = acquire(rl, agent_limit=tpm(1000), tokens=600)
    # 200 tokens missing at 1000/60 per second: 12 seconds.
    assert (d.allowed, d.limit, d.retry_after) == (False, "agent tokens_per_minute", 12)
    clock.advance(11.9)
    assert not acquire(rl, agent_limit=tpm(1000), tokens=600)[0].allowed
    clock.advance(0.1)
    assert acquire(rl, agent_limit=tpm(1000), tokens=600)[0].allowed


@pytest.mark.parametrize(
    ("tenant_limit", "agent_limit", "label"),
    [
        pytest.param(tpm(100), None, "tenant tokens_per_minute", id="tenant"),
        pytest.param(None, tpm(100), "agent tokens_per_minute", id="agent"),
        pytest.param(tpm(1000), tpm(100), "agent tokens_per_minute", id="agent-smaller"),
    ],
)
def test_reservation_above_capacity_can_never_pass(
    tenant_limit: LimitSpec | None, agent_limit: LimitSpec | None, label: str
) -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    d, r = acquire(rl, tenant_limit=tenant_limit, agent_limit=agent_limit, tokens=101)
    assert (d.allowed, d.limit, d.retry_after, r, d.never) == (False, label, 60, None, True)
    clock.advance(3600)
    assert not acquire(rl, tenant_limit=tenant_limit, agent_limit=agent_limit, tokens=101)[
        0
    ].allowed
    assert acquire(rl, tenant_limit=tenant_limit, agent_limit=agent_limit, tokens=100)[0].allowed


def test_a_wait_is_not_never() -> None:
    rl = RateLimiter(FakeClock())
    assert acquire(rl, agent_limit=tpm(100), tokens=100)[0].allowed
    d, _ = acquire(rl, agent_limit=tpm(100), tokens=100)
    assert (d.allowed, d.never) == (False, False) and 1 <= d.retry_after <= 60


def test_no_limits_always_allowed() -> None:
    rl = RateLimiter(FakeClock())
    for _ in range(1000):
        d, r = acquire(rl, tokens=10**9)
        assert d.allowed and r is not None
    assert (d.remaining_requests, d.remaining_tokens, d.limit_requests, d.reset_tokens_s) == (
        None,
    ) * 4


def test_headers_fields() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    spec = LimitSpec(requests_per_minute=60, tokens_per_minute=6000)
    d, _ = acquire(rl, agent_limit=spec, tokens=1500)
    assert d == RateDecision(
        allowed=True,
        limit=None,
        retry_after=0,
        remaining_requests=59,
        remaining_tokens=4500,
        limit_requests=60,
        limit_tokens=6000,
        reset_requests_s=pytest.approx(1.0),
        reset_tokens_s=pytest.approx(15.0),
    )


def test_headers_report_the_tightest_scope() -> None:
    rl = RateLimiter(FakeClock())
    d, _ = acquire(
        rl,
        tenant_limit=LimitSpec(requests_per_minute=5, tokens_per_minute=10_000),
        agent_limit=LimitSpec(requests_per_minute=100, tokens_per_minute=1_000),
        tokens=100,
    )
    assert (d.remaining_requests, d.limit_requests) == (4, 5)  # tenant is tighter on requests
    assert (d.remaining_tokens, d.limit_tokens) == (900, 1000)  # agent is tighter on tokens


# -- tenant vs agent ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tenant_limit", "agent_limit", "passes", "label"),
    [
        pytest.param(rpm(2), rpm(10), 2, "tenant requests_per_minute", id="tenant-tighter"),
        pytest.param(rpm(10), rpm(2), 2, "agent requests_per_minute", id="agent-tighter"),
        pytest.param(rpm(2), rpm(2), 2, "agent requests_per_minute", id="tie-names-agent"),
        pytest.param(tpm(250), rpm(10), 2, "tenant tokens_per_minute", id="tenant-tokens"),
        pytest.param(rpm(10), tpm(250), 2, "agent tokens_per_minute", id="agent-tokens"),
        # agent tokens wait 20 s, tenant requests 60 s: the longer wait is named
        pytest.param(rpm(1), tpm(150), 1, "tenant requests_per_minute", id="longest-wait-wins"),
    ],
)
def test_which_limit_refuses(
    tenant_limit: LimitSpec, agent_limit: LimitSpec, passes: int, label: str
) -> None:
    rl = RateLimiter(FakeClock())
    for _ in range(passes):
        assert acquire(rl, tenant_limit=tenant_limit, agent_limit=agent_limit, tokens=100)[
            0
        ].allowed
    d, _ = acquire(rl, tenant_limit=tenant_limit, agent_limit=agent_limit, tokens=100)
    assert (d.allowed, d.limit) == (False, label)


def test_retry_after_is_the_longest_wait_across_scopes() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    tenant, agent = rpm(3), rpm(2)
    assert acquire(rl, "a", tenant, agent)[0].allowed
    assert acquire(rl, "a", tenant, agent)[0].allowed
    assert acquire(rl, "b", tenant, agent)[0].allowed
    # a: own bucket needs 30 s (2/min), tenant bucket 20 s (3/min): the longer wait is named.
    d, _ = acquire(rl, "a", tenant, agent)
    assert (d.allowed, d.limit, d.retry_after) == (False, "agent requests_per_minute", 30)
    # b still has its own allowance, but the tenant is out for 20 s.
    d, _ = acquire(rl, "b", tenant, agent)
    assert (d.allowed, d.limit, d.retry_after) == (False, "tenant requests_per_minute", 20)
    clock.advance(20)
    assert acquire(rl, "b", tenant, agent)[0].allowed
    assert not acquire(rl, "a", tenant, agent)[0].allowed


def test_agents_have_separate_buckets_and_share_the_tenant() -> None:
    rl = RateLimiter(FakeClock())
    for agent in ("a", "b", "c"):
        assert acquire(rl, agent, rpm(3), rpm(1))[0].allowed
        d, _ = acquire(rl, agent, rpm(3), rpm(1))
        assert (d.allowed, d.limit) == (False, "agent requests_per_minute")
    d, _ = acquire(rl, "d", rpm(3), rpm(1))
    assert (d.allowed, d.limit) == (False, "tenant requests_per_minute")
    assert rl.acquire("other-tenant", "a", rpm(3), rpm(1), 0)[0].allowed


def test_no_partial_takes() -> None:
    rl = RateLimiter(FakeClock())
    agent = LimitSpec(requests_per_minute=10, tokens_per_minute=10_000)
    tenant = LimitSpec(requests_per_minute=100, tokens_per_minute=500)
    d, _ = acquire(rl, tenant_limit=tenant, agent_limit=agent, tokens=400)
    assert d.allowed and d.remaining_requests == 9
    # The tenant's tokens refuse: neither the agent's request nor its tokens may be spent.
    for _ in range(20):
        d, r = acquire(rl, tenant_limit=tenant, agent_limit=agent, tokens=200)
        assert (d.allowed, d.limit, r) == (False, "tenant tokens_per_minute", None)
    d, _ = acquire(rl, tenant_limit=tenant, agent_limit=agent, tokens=100)
    assert d.allowed
    assert d.remaining_requests == 8
    assert d.remaining_tokens == 0  # tenant: 500 - 400 - 100
    d, _ = acquire(rl, tenant_limit=None, agent_limit=agent, tokens=0)
    assert d.remaining_tokens == 10_000 - 500  # the agent's tokens: only the two passes


# -- settle and release ---------------------------------------------------------------------------
def remaining_tokens(rl: RateLimiter, spec: LimitSpec) -> int | None:
    d, r = acquire(rl, agent_limit=spec, tokens=0)
    assert r is not None
    rl.release(r)
    return d.remaining_tokens


@pytest.mark.parametrize(
    ("reserved", "actual", "left"),
    [
        pytest.param(600, 100, 900, id="under-gives-back"),
        pytest.param(600, 600, 400, id="exact"),
        pytest.param(600, 800, 200, id="over-takes-debt"),
        pytest.param(600, 1500, 0, id="into-debt"),
        pytest.param(600, -5, 1000, id="negative-actual-is-zero"),
    ],
)
def test_settle(reserved: int, actual: int, left: int) -> None:
    rl = RateLimiter(FakeClock())
    spec = tpm(1000)
    _, r = acquire(rl, agent_limit=spec, tokens=reserved)
    assert r is not None and r.tokens == reserved
    rl.settle(r, actual)
    assert remaining_tokens(rl, spec) == left
    rl.settle(r, 0)  # settles once
    assert remaining_tokens(rl, spec) == left


def test_debt_delays_the_next_request() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    spec = tpm(600)  # 10 tokens a second
    _, r = acquire(rl, agent_limit=spec, tokens=100)
    assert r is not None
    rl.settle(r, 1100)  # 500 over capacity
    d, _ = acquire(rl, agent_limit=spec, tokens=100)
    # bucket at -500, needs 100: 600 tokens at 10/s
    assert (d.allowed, d.retry_after) == (False, 60)
    clock.advance(60)
    assert acquire(rl, agent_limit=spec, tokens=100)[0].allowed


def test_release_gives_everything_back() -> None:
    rl = RateLimiter(FakeClock())
    spec = LimitSpec(requests_per_minute=2, tokens_per_minute=1000)
    tenant = LimitSpec(requests_per_minute=2, tokens_per_minute=1000)
    for _ in range(10):
        d, r = acquire(rl, tenant_limit=tenant, agent_limit=spec, tokens=1000)
        assert d.allowed and r is not None
        rl.release(r)
        rl.release(r)  # twice is harmless, not a double refund
    d, _ = acquire(rl, tenant_limit=tenant, agent_limit=spec, tokens=1000)
    assert (d.remaining_requests, d.remaining_tokens) == (1, 0)


def test_settle_after_release_is_noop() -> None:
    rl = RateLimiter(FakeClock())
    _, r = acquire(rl, agent_limit=tpm(1000), tokens=500)
    assert r is not None
    rl.release(r)
    rl.settle(r, 900)
    assert remaining_tokens(rl, tpm(1000)) == 1000


def test_reservation_ids_are_unique() -> None:
    rl = RateLimiter(FakeClock())
    ids = {r.id for _ in range(100) if (r := acquire(rl)[1]) is not None}
    assert len(ids) == 100


def test_negative_tokens_is_a_bug() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        acquire(RateLimiter(FakeClock()), tokens=-1)


# -- policy reload --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("new_limit", "allowed", "remaining", "retry_after"),
    [
        pytest.param(100, True, 100 - 50 - 1, 0, id="raised-keeps-usage"),
        pytest.param(60, True, 60 - 50 - 1, 0, id="unchanged"),
        pytest.param(10, False, 0, 246, id="lowered-below-usage"),
    ],
)
def test_limit_change_on_reload(
    new_limit: int, allowed: bool, remaining: int, retry_after: int
) -> None:
    rl = RateLimiter(FakeClock())
    for _ in range(50):
        assert acquire(rl, agent_limit=rpm(60))[0].allowed
    d, _ = acquire(rl, agent_limit=rpm(new_limit))
    assert (d.allowed, d.remaining_requests, d.limit_requests) == (allowed, remaining, new_limit)
    # lowered to 10 with 50 used: 10 - 50 = -40, one request needs 41 at 10/60 per second
    assert d.retry_after == retry_after


def test_limit_removed_then_restored() -> None:
    rl = RateLimiter(FakeClock())
    assert acquire(rl, agent_limit=rpm(1))[0].allowed
    assert not acquire(rl, agent_limit=rpm(1))[0].allowed
    assert acquire(rl, agent_limit=None)[0].allowed  # no limit now
    assert not acquire(rl, agent_limit=rpm(1))[0].allowed  # same value: same bucket


# -- concurrency ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tenant_limit", "agent_limit", "tokens", "expected"),
    [
        pytest.param(None, rpm(100), 0, 100, id="agent-rpm"),
        pytest.param(rpm(77), rpm(1000), 0, 77, id="tenant-rpm"),
        pytest.param(None, tpm(1000), 7, 1000 // 7, id="agent-tpm"),
        pytest.param(
            tpm(5000),
            LimitSpec(requests_per_minute=90, tokens_per_minute=10**6),
            50,
            90,
            id="mixed",
        ),
    ],
)
def test_threads_never_exceed_the_limit(
    tenant_limit: LimitSpec | None, agent_limit: LimitSpec | None, tokens: int, expected: int
) -> None:
    rl = RateLimiter(FakeClock())
    allowed: list[int] = []
    start = threading.Barrier(16)

    def hammer() -> None:
        start.wait()
        n = 0
        for _ in range(100):
            if rl.acquire(T, "a1", tenant_limit, agent_limit, tokens)[0].allowed:
                n += 1
        allowed.append(n)

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == expected


# -- memory ---------------------------------------------------------------------------------------
def test_idle_full_buckets_are_pruned() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    _, r = acquire(rl, "debtor", agent_limit=tpm(10), tokens=10)
    assert r is not None
    rl.settle(r, 10_000)  # deep in debt: not full for a long time
    for i in range(PRUNE_EVERY - 2):
        acquire(rl, f"idle-{i}", agent_limit=rpm(600))
    assert rl.bucket_count() == PRUNE_EVERY - 1
    clock.advance(PRUNE_IDLE_SECONDS + 1)
    # Calls that create no bucket, until the next pruning pass.
    for _ in range(PRUNE_EVERY):
        acquire(rl, "driver")
    assert rl.bucket_count() == 1  # only the idle but not full debtor survives
    assert not acquire(rl, "debtor", agent_limit=tpm(10), tokens=1)[0].allowed


def test_recent_buckets_survive_pruning() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    for i in range(PRUNE_EVERY * 2):
        acquire(rl, f"agent-{i % 10}", agent_limit=rpm(600))
        clock.advance(0.01)
    assert rl.bucket_count() == 10


# -- properties -----------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 500),
    steps=st.lists(st.tuples(st.floats(0, 30), st.integers(0, 600)), min_size=1, max_size=60),
)
def test_retry_after_is_exact_in_whole_seconds(limit: int, steps: list[tuple[float, int]]) -> None:
    """After a refusal, waiting retry_after seconds is enough and one second less is not."""
    clock = FakeClock()
    rl = RateLimiter(clock)
    spec = tpm(limit)
    for dt, tokens in steps:
        clock.advance(dt)
        tokens = min(tokens, limit)
        d, r = acquire(rl, agent_limit=spec, tokens=tokens)
        if d.allowed:
            assert r is not None
            continue
        assert d.retry_after >= 1
        if d.retry_after > 1:
            clock.advance(d.retry_after - 1)
            assert not acquire(rl, agent_limit=spec, tokens=tokens)[0].allowed
            clock.advance(1)
        else:
            clock.advance(1)
        assert acquire(rl, agent_limit=spec, tokens=tokens)[0].allowed


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 120), gaps=st.lists(st.floats(0, 5), min_size=1, max_size=200))
def test_never_more_than_burst_plus_refill(limit: int, gaps: list[float]) -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    allowed = 0
    for gap in gaps:
        clock.advance(gap)
        allowed += acquire(rl, agent_limit=rpm(limit))[0].allowed
    elapsed = sum(gaps)
    assert allowed <= limit + math.floor(elapsed * limit / 60 + 1e-6)
    if elapsed == 0:
        assert allowed == min(limit, len(gaps))
