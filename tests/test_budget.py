"""Prices, the spend ledger and budget holds (aiid_proxy.budget), on a FakeClock."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aiid_proxy.audit import AuditLog
from aiid_proxy.budget import (
    PICO_PER_USD,
    RELOAD_EVERY,
    BudgetRefusal,
    Hold,
    Ledger,
    Price,
    PriceBook,
    PriceTable,
    format_usd,
    month_start_ts,
    periods,
    pico_to_usd,
    reservation_tokens,
    spend_records,
    usd_to_pico,
)
from aiid_proxy.clock import FakeClock
from aiid_proxy.errors import PolicyError
from aiid_proxy.policy import BudgetSpec

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
DAY_LEFT = 16 * 3600  # seconds from T0 to the next UTC midnight
MONTH_LEFT = (16 * 24 + 16) * 3600  # to 2027-02-01T00:00:00Z
ROOT_KEY = b"k" * 32


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()


def price(inp: int = 0, out: int = PICO_PER_USD) -> Price:
    """Per-token prices in pico-USD (default: output 1 USD a token)."""
    return Price("openai", "m*", inp, out, "test", 0)


# -- money ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("usd", "pico"),
    [
        pytest.param(0, 0, id="zero"),
        pytest.param(5, 5 * PICO_PER_USD, id="int"),
        pytest.param(5.1, 5_100_000_000_000, id="float-shortest-repr"),
        pytest.param(0.15e-6, 150_000, id="gpt-4o-mini-input-per-token"),
        pytest.param(1e-12, 1, id="one-pico"),
        pytest.param(4e-13, 0, id="below-a-pico-rounds-half-even"),
    ],
)
def test_usd_to_pico(usd: float, pico: int) -> None:
    assert usd_to_pico(usd) == pico


@pytest.mark.parametrize("pico", [0, 1, 150_000, 5_100_000_000_000, 123_456_789_012_345])
def test_pico_round_trips_through_cost_usd(pico: int) -> None:
    assert usd_to_pico(pico_to_usd(pico)) == pico


# -- prices --------------------------------------------------------------------------------------
def table(text: str) -> PriceTable:
    entries = PriceTable.parse(text, "prices.yaml", rank=1)
    return PriceTable([p for p in entries.values() if p is not None])


@pytest.mark.parametrize(
    ("provider", "model", "expected_glob"),
    [
        pytest.param("openai", "gpt-4o-mini", "gpt-4o-mini*", id="longer-literal-beats-shorter"),
        pytest.param("openai", "gpt-4o", "gpt-4o", id="exact"),
        # rules match models in any case: a model they allow must find its price
        pytest.param("openai", "GPT-4O-MINI", "gpt-4o-mini*", id="any-letter-case"),
        pytest.param("openai", "gpt-4o-2024-08-06", "gpt-4o-20*", id="snapshot"),
        pytest.param("openai-eu", "gpt-4o-mini", "gpt-4o-mini*", id="eu-same-list"),
        pytest.param("anthropic", "claude-3-5-haiku-latest", "claude-3-5-haiku*", id="anthropic"),
        pytest.param("anthropic", "claude-opus-4-5-20251101", "claude-opus-4-5*", id="opus-45"),
        pytest.param("anthropic", "claude-opus-4-1", "claude-opus-4*", id="opus-4"),
        pytest.param("openai", "gpt-unknown", None, id="unpriced"),
        pytest.param("azure-openai", "gpt-4o", None, id="azure-deployments-unpriced"),
        pytest.param("openai", None, None, id="no-model"),
    ],
)
def test_builtin_lookup(provider: str, model: str | None, expected_glob: str | None) -> None:
    p = PriceTable.builtin().lookup(provider, model)
    assert (p.model if p else None) == expected_glob


def test_builtin_known_price() -> None:
    p = PriceTable.builtin().lookup("openai", "gpt-4o-mini")
    assert p is not None
    # 1M in + 1M out = 0.15 + 0.60 USD
    assert p.cost(1_000_000, 1_000_000) == usd_to_pico("0.75")


OVERRIDES = """
version: 1
prices:
  openai:
    "gpt-4o-mini*": {input: 1000, output: 100000}
    "gpt-4o*": null
    "my-*": {input: 1, output: 2}
  "*":
    "llama-*": {input: 0.5, output: 0.5}
    "my-model": {input: 9, output: 9}
"""


@pytest.mark.parametrize(
    ("provider", "model", "pico_in", "pico_out"),
    [
        pytest.param("openai", "gpt-4o-mini", 1_000_000_000, 100_000_000_000, id="override-wins"),
        pytest.param("openai", "gpt-4o", 2_500_000, 10_000_000, id="exact-builtin-stays"),
        pytest.param("openai", "gpt-4o-2024-08-06", 2_500_000, 10_000_000, id="other-glob-stays"),
        pytest.param("groq", "llama-3-70b", 500_000, 500_000, id="any-provider"),
        pytest.param("openai", "my-model", 1_000_000, 2_000_000, id="own-provider-before-star"),
    ],
)
def test_file_overrides_builtin_by_provider_and_glob(
    tmp_path: Path, provider: str, model: str, pico_in: int, pico_out: int
) -> None:
    f = tmp_path / "prices.yaml"
    f.write_text(OVERRIDES)
    p = PriceTable.load(f).lookup(provider, model)
    assert p is not None and (p.input_pico, p.output_pico) == (pico_in, pico_out)


def test_null_removes_a_builtin_entry(tmp_path: Path) -> None:
    f = tmp_path / "prices.yaml"
    f.write_text('version: 1\nprices:\n  openai:\n    "gpt-4o-mini*": null\n')
    assert PriceTable.builtin().lookup("openai", "gpt-4o-mini") is not None
    assert PriceTable.load(f).lookup("openai", "gpt-4o-mini") is None


def one(spec: str) -> str:
    return f'prices:\n  openai:\n    "m": {spec}\n'


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        pytest.param("version: 2\nprices: {}\n", 1, "unsupported version", id="version"),
        pytest.param("version: 1\ncosts: {}\n", 2, "unknown key 'costs'", id="unknown-top"),
        pytest.param("prices:\n  Open AI: {}\n", 2, "invalid provider name", id="provider-name"),
        pytest.param(
            'prices:\n  openai:\n    "a[": {input: 1, output: 1}\n', 3, "bad model glob", id="glob"
        ),
        pytest.param(one("{input: 1}"), 3, "missing required key 'output'", id="missing-output"),
        pytest.param(one("{input: 1, output: 1, cached: 0}"), 3, "unknown key", id="extra-key"),
        pytest.param(one("{input: -1, output: 1}"), 3, "between 0", id="negative"),
        pytest.param(one('{input: "1", output: 1}'), 3, "must be a number", id="string"),
        pytest.param(one("{input: true, output: 1}"), 3, "must be a number", id="bool"),
        pytest.param(one("{input: 2000000, output: 1}"), 3, "between 0", id="absurd"),
        pytest.param(one("3"), 3, "must be a mapping", id="not-mapping"),
        pytest.param(
            one("{input: 1, output: 1}") + '    "m": {input: 1, output: 1}\n',
            4,
            "duplicate key",
            id="duplicate",
        ),
    ],
)
def test_bad_prices_file_names_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        PriceTable.parse(text, "prices.yaml")
    assert e.value.line == line, e.value
    assert message in e.value.message
    assert str(e.value).startswith(f"prices.yaml:{line}: ")


def test_price_book_reloads_on_change_and_keeps_last_good(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    f = tmp_path / "prices.yaml"
    f.write_text('prices:\n  openai:\n    "m*": {input: 1, output: 2}\n')
    book = PriceBook(f, clock)
    assert book.current().lookup("openai", "m1").output_pico == 2_000_000  # type: ignore[union-attr]
    f.write_text('prices:\n  openai:\n    "m*": {input: 1, output: 3}\n')
    assert book.current().lookup("openai", "m1").output_pico == 2_000_000  # type: ignore[union-attr]
    clock.advance(RELOAD_EVERY)
    assert book.current().lookup("openai", "m1").output_pico == 3_000_000  # type: ignore[union-attr]
    f.write_text('prices:\n  openai:\n    "m*": {input: 1}\n')
    clock.advance(RELOAD_EVERY)
    assert book.current().lookup("openai", "m1").output_pico == 3_000_000  # type: ignore[union-attr]
    assert book.last_error is not None and "output" in book.last_error


def test_price_book_first_load_fails_loudly(tmp_path: Path) -> None:
    f = tmp_path / "prices.yaml"
    f.write_text("prices: [1]\n")
    with pytest.raises(PolicyError):
        PriceBook(f, FakeClock(T0))


def test_price_book_without_file_is_builtin(tmp_path: Path) -> None:
    book = PriceBook(tmp_path / "prices.yaml", FakeClock(T0))
    assert len(book.current()) == len(PriceTable.builtin())


# -- periods -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("now", "day", "month", "to_day", "to_month"),
    [
        pytest.param(T0, "2027-01-15", "2027-01", DAY_LEFT, MONTH_LEFT, id="mid-month"),
        pytest.param(ts("2027-01-31T23:59:59"), "2027-01-31", "2027-01", 1, 1, id="last-second"),
        pytest.param(
            ts("2027-02-01T00:00:00"), "2027-02-01", "2027-02", 86400, 28 * 86400, id="first"
        ),
        pytest.param(
            ts("2028-02-28T12:00:00"), "2028-02-28", "2028-02", 43200, 129600, id="leap-year"
        ),
        pytest.param(ts("2027-12-31T00:00:00"), "2027-12-31", "2027-12", 86400, 86400, id="dec"),
    ],
)
def test_periods(now: float, day: str, month: str, to_day: int, to_month: int) -> None:
    p = periods(now)
    assert (p.day, p.month) == (day, month)
    assert (p.next_day - now, p.next_month - now) == (to_day, to_month)
    assert month_start_ts(now) == f"{month}-01T00:00:00"


# -- reservation sizes ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "max_tokens", "n", "expected"),
    [
        pytest.param("chat", 100, None, (10, 100), id="max-tokens"),
        pytest.param("chat", None, None, (10, 4096), id="default-cap"),
        pytest.param("chat", 100, 3, (10, 300), id="n-choices"),
        pytest.param("messages", 0, None, (10, 0), id="zero"),
        pytest.param("embeddings", 100, None, (10, 0), id="embeddings-no-output"),
        # costless: a model list or a token count consumes nothing, reserves nothing (counting
        # tokens before each call used to spend the agent's tokens_per_minute)
        pytest.param("models", None, None, (0, 0), id="models"),
        pytest.param("count_tokens", None, None, (0, 0), id="count-tokens"),
        pytest.param(None, 100, None, (0, 0), id="egress"),
    ],
)
def test_reservation_tokens(
    kind: str | None, max_tokens: int | None, n: int | None, expected: tuple[int, int]
) -> None:
    assert reservation_tokens(kind, max_tokens, n, 10, 4096) == expected


# -- the ledger ----------------------------------------------------------------------------------
USD = PICO_PER_USD


def hold(
    led: Ledger,
    amount: int,
    agent: str = "a1",
    tenant_budget: BudgetSpec | None = None,
    agent_budget: tuple[str, BudgetSpec] | None = None,
) -> Hold | BudgetRefusal:
    return led.hold("acme", agent, amount, price(), tenant_budget, agent_budget)


def test_holds_count_against_the_budget_until_settled() -> None:
    led = Ledger(FakeClock(T0))
    day5 = ("support-*", BudgetSpec(usd_per_day=5))
    h1 = hold(led, 3 * USD, agent_budget=day5)
    assert isinstance(h1, Hold)
    # 3 held + 3 more > 5: refused although nothing is spent yet
    r = hold(led, 3 * USD, agent_budget=day5)
    assert isinstance(r, BudgetRefusal)
    assert r.message.startswith("agent budget usd_per_day 5.00 for support-* exceeded")
    assert "3.00 in flight" in r.message and r.retry_after == DAY_LEFT
    assert not r.never  # it fits once the first settles
    # the real cost was 1: 4 left, a 3 fits again
    assert led.settle(h1, 1 * USD)
    assert isinstance(hold(led, 3 * USD, agent_budget=day5), Hold)
    assert led.spent("acme", "a1").day == 1 * USD


def test_exactly_at_the_cap_is_allowed_one_pico_more_is_not() -> None:
    led = Ledger(FakeClock(T0))
    spec = BudgetSpec(usd_per_day=5)
    assert isinstance(hold(led, 5 * USD, tenant_budget=spec), Hold)
    led2 = Ledger(FakeClock(T0))
    r = hold(led2, 5 * USD + 1, tenant_budget=spec)
    # more than the whole budget: told it can never pass, not to retry at the reset ([AB])
    assert isinstance(r, BudgetRefusal) and r.never


DAY1 = BudgetSpec(usd_per_day=1)
MONTH1 = BudgetSpec(usd_per_month=1)


@pytest.mark.parametrize(
    ("tenant_budget", "agent_budget", "name", "retry"),
    [
        pytest.param(DAY1, None, "tenant usd_per_day", DAY_LEFT, id="tenant-day"),
        pytest.param(MONTH1, None, "tenant usd_per_month", MONTH_LEFT, id="tenant-month"),
        pytest.param(
            None,
            ("*", BudgetSpec(usd_per_day=1, usd_per_month=1)),
            "agent usd_per_day",
            MONTH_LEFT,
            id="both-periods-retry-latest",
        ),
        pytest.param(MONTH1, ("a*", DAY1), "agent usd_per_day", MONTH_LEFT, id="agent-first"),
    ],
)
def test_refusal_names_the_budget_and_retries_at_the_period_end(
    tenant_budget: BudgetSpec | None,
    agent_budget: tuple[str, BudgetSpec] | None,
    name: str,
    retry: int,
) -> None:
    led = Ledger(FakeClock(T0))
    r = hold(led, 2 * USD, tenant_budget=tenant_budget, agent_budget=agent_budget)
    assert isinstance(r, BudgetRefusal)
    assert r.budget == name and r.retry_after == retry
    assert led.outstanding() == 0  # all or nothing


def test_day_rolls_over_month_keeps_counting() -> None:
    clock = FakeClock(T0)
    led = Ledger(clock)
    spec = BudgetSpec(usd_per_day=2, usd_per_month=3)
    h = hold(led, 2 * USD, tenant_budget=spec)
    assert isinstance(h, Hold)
    led.settle(h, 2 * USD)
    assert isinstance(hold(led, 1, tenant_budget=spec), BudgetRefusal)
    clock.advance(DAY_LEFT)  # next UTC day: the day budget is fresh, the month is not
    h2 = hold(led, 1 * USD, tenant_budget=spec)
    assert isinstance(h2, Hold)
    led.settle(h2, 1 * USD)
    r = hold(led, 1, tenant_budget=spec)
    assert isinstance(r, BudgetRefusal) and r.budget == "tenant usd_per_month"
    assert led.spent("acme").day == 1 * USD and led.spent("acme").month == 3 * USD


def test_settle_and_release_happen_once() -> None:
    led = Ledger(FakeClock(T0))
    h = hold(led, 5 * USD)
    assert isinstance(h, Hold)
    assert led.settle(h, 2 * USD)
    assert not led.settle(h, 2 * USD)
    led.release(h)
    s = led.spent("acme", "a1")
    assert (s.day, s.held) == (2 * USD, 0)
    h2 = hold(led, 5 * USD)
    assert isinstance(h2, Hold)
    led.release(h2)
    led.release(h2)
    assert led.spent("acme").held == 0 and led.spent("acme").day == 2 * USD


def test_negative_hold_is_a_bug() -> None:
    with pytest.raises(ValueError):
        hold(Ledger(FakeClock(T0)), -1)


@pytest.mark.parametrize("threads", [pytest.param(2, id="2"), pytest.param(16, id="16")])
def test_concurrent_holds_never_overshoot(threads: int) -> None:
    """Many agents at once: each request may cost 1 USD and does; budget 7.5 -> exactly 7."""
    led = Ledger(FakeClock(T0))
    spec = BudgetSpec(usd_per_day=7.5)
    start = threading.Barrier(threads)
    ok: list[int] = []

    def agent(i: int) -> None:
        start.wait()
        for _ in range(20):
            h = hold(led, 1 * USD, agent=f"a{i}", tenant_budget=spec)
            if isinstance(h, Hold):
                ok.append(i)
                led.settle(h, 1 * USD)

    ts_ = [threading.Thread(target=agent, args=(i,)) for i in range(threads)]
    for t in ts_:
        t.start()
    for t in ts_:
        t.join()
    assert len(ok) == 7
    assert led.spent("acme").day == 7 * USD and led.spent("acme").held == 0


# -- rebuilding from the audit log ---------------------------------------------------------------
def test_spend_is_rebuilt_from_audit_records(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    db = tmp_path / "audit.db"
    with AuditLog(db, "acme", ROOT_KEY, clock=clock) as log:
        at = [
            (ts("2026-12-31T23:00:00"), "a1", 100.0),  # last month: not counted
            (ts("2027-01-14T10:00:00"), "a1", 1.25),  # this month, yesterday
            (ts("2027-01-15T01:00:00"), "a1", 0.5),  # today
            (ts("2027-01-15T02:00:00"), "a2", 0.25),  # today, another agent
        ]
        for when, agent, usd in at:
            clock.set(when)
            log.append("response", agent=agent, detail={"cost_usd": usd}).result(5)
        clock.set(T0)
        log.append("response", agent="a1", detail={"path": "/x"}).result(5)  # no cost
        log.append("error", agent="a1", detail={"cost_usd": 0.125}).result(5)  # charged error
    records = spend_records(db, month_start_ts(T0))
    assert len(records) == 4
    led = Ledger(clock)
    assert led.load("acme", records) == 4
    a1 = led.spent("acme", "a1")
    assert (a1.day, a1.month) == (usd_to_pico(0.625), usd_to_pico(1.875))
    t = led.spent("acme")
    assert (t.day, t.month) == (usd_to_pico(0.875), usd_to_pico(2.125))
    # a rebuild replaces, it does not add
    led.load("acme", records)
    assert led.spent("acme").month == usd_to_pico(2.125)
    # count adds (a request an earlier run left unfinished, charged its hold)
    assert led.count("acme", [("2027-01-15T03:00:00.000000Z", "a2", usd_to_pico(1))]) == 1
    assert led.count("acme", [("2026-12-01T00:00:00.000000Z", "a2", usd_to_pico(9))]) == 0
    assert led.spent("acme").day == usd_to_pico(1.875)
    assert led.spent("acme", "a2").month == usd_to_pico(1.25)


def test_spend_records_of_a_missing_database_are_empty(tmp_path: Path) -> None:
    assert spend_records(tmp_path / "none.db", "2027-01-01T00:00:00") == []


# -- aiid policy check ---------------------------------------------------------------------------
GOOD_POLICY = "version: 1\ntenant: acme\ndefault: deny\nrules: []\n"


@pytest.mark.parametrize(
    ("files", "code", "expect"),
    [
        pytest.param({}, 0, "OK 1 policies", id="no-data-files"),
        pytest.param(
            {"prices.yaml": 'prices:\n  openai:\n    "m*": {input: 1, output: 2}\n'},
            0,
            "ok prices.yaml",
            id="good-prices",
        ),
        pytest.param(
            {"prices.yaml": 'prices:\n  openai:\n    "m*": {input: 1}\n'},
            1,
            "prices.yaml:3: ",
            id="bad-prices-file-line",
        ),
        pytest.param(
            {
                "providers.yaml": "providers:\n  x:\n    openai_compatible: true\n"
                "    hosts: [a.b.c]\n"
            },
            0,
            "ok providers.yaml",
            id="good-providers",
        ),
        pytest.param(
            {"providers.yaml": "providers:\n  x:\n    hosts: [a.b.c]\n"},
            1,
            "missing 'auth'",
            id="bad-providers",
        ),
    ],
)
def test_policy_check_validates_prices_and_providers(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    files: dict[str, str],
    code: int,
    expect: str,
) -> None:
    from aiid_proxy.cli import main

    (tmp_path / "acme.yaml").write_text(GOOD_POLICY)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    try:
        main(["policy", "check", str(tmp_path)])
        got = 0
    except SystemExit as e:
        got = e.code if isinstance(e.code, int) else 0
    out = capsys.readouterr()
    assert got == code, out
    assert expect in out.out + out.err


@pytest.mark.parametrize(
    ("usd", "text"),
    [
        pytest.param(0, "0.00", id="zero"),
        pytest.param(0.05, "0.05", id="cents"),
        pytest.param(0.048, "0.048", id="not-rounded-up-to-the-cap"),
        pytest.param(0.002, "0.002", id="what-is-left"),
        pytest.param(12.5, "12.50", id="at-least-cents"),
        pytest.param(0.000213, "0.000213", id="micro-dollars"),
        pytest.param(1000, "1000.00", id="large"),
    ],
)
def test_format_usd(usd: float, text: str) -> None:
    assert format_usd(usd) == text
