"""Spend: what a request costs, what each tenant and agent spent, and the budgets over it.

* :class:`PriceTable` -- USD per million tokens per provider and model glob: the built-in list
  (``aiid_proxy/data/prices.yaml``) with ``<policies dir>/prices.yaml`` on top (an entry there
  replaces the built-in entry of the same provider and glob). :class:`PriceBook` re-reads the
  file when it changes; a bad edit keeps the last good table.
* :class:`Ledger` -- spend per (tenant, agent) and per tenant, per UTC day and UTC month, in
  integer pico-USD (1e-12 USD) so sums are exact. Rebuilt at start from the tenant's audit
  records (``detail.cost_usd``), then kept up to date as responses settle.
* Budgets (``budgets:`` in a policy, see :class:`aiid_proxy.policy.BudgetSpec`) are enforced
  before a request leaves by *holding* its worst-case cost -- estimated input plus the whole
  output reservation, at the model's price -- so concurrent requests can never together spend
  past a budget: a request is refused when spent + held + its own worst case would exceed it.
  When the response reports its usage the hold is replaced by the real cost.

Models without a price: a tenant with any budget that applies to the request refuses it (403
``policy_denied``: "no price for model X; budgets need prices.yaml"), because its spend could not
be counted; a tenant without budgets is not affected (nothing is recorded as its cost).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from importlib import resources
from pathlib import Path

from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import PolicyError
from aiid_proxy.home import NAME_RE
from aiid_proxy.policy.engine import glob_to_regex
from aiid_proxy.policy.model import BudgetSpec, Policy
from aiid_proxy.policy.yamlsrc import Checker, parse_yaml

log = logging.getLogger("aiid.budget")

PICO_PER_USD = 10**12
"""Spend is counted in pico-USD: integers, so that sums and comparisons are exact."""
MAX_USD_PER_MTOK = 1_000_000
RELOAD_EVERY = 2.0
"""Seconds between checks of ``prices.yaml`` for changes."""
ANY_PROVIDER = "*"
PRICES_FILE = "prices.yaml"

_PRICE_KEYS = ("input", "output")
_LITERAL = re.compile(r"[^*?\[\]]")


# -- money ------------------------------------------------------------------------------------
def usd_to_pico(usd: float | int | str | Decimal) -> int:
    """USD -> integer pico-USD, rounded half-even. ``float`` goes through its shortest repr, so
    ``5.1`` is 5.1, not 5.0999999999999996447."""
    try:
        d = Decimal(str(usd)) if not isinstance(usd, Decimal) else usd
        return int((d * PICO_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))
    except (InvalidOperation, ValueError) as e:
        raise ValueError(f"not an amount of USD: {usd!r}") from e


def pico_to_usd(pico: int) -> float:
    """For display and for ``detail.cost_usd``; :func:`usd_to_pico` gives the integer back."""
    return round(pico / PICO_PER_USD, 12)


def format_usd(usd: float) -> str:
    """Dollars to the micro-dollar, trailing zeros dropped, at least cents: "0.05", "0.048",
    "12.50", "0.000213" (so that spent and left add up to the budget in a refusal)."""
    whole, _, frac = f"{usd:.6f}".partition(".")
    return f"{whole}.{frac.rstrip('0').ljust(2, '0')}"


# -- prices -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Price:
    """The price of one provider + model glob, per token in pico-USD."""

    provider: str  # a provider name, or "*"
    model: str  # a glob over model names
    input_pico: int  # per input token
    output_pico: int  # per output token
    source: str  # "builtin" or the file it came from
    rank: int  # higher wins a tie between equally specific globs

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        """Pico-USD for this many tokens (negative counts count as zero)."""
        return max(0, input_tokens) * self.input_pico + max(0, output_tokens) * self.output_pico

    @property
    def input_usd_per_mtok(self) -> float:
        return self.input_pico / 1_000_000

    @property
    def output_usd_per_mtok(self) -> float:
        return self.output_pico / 1_000_000


def _specificity(glob: str) -> tuple[int, int]:
    exact = not any(c in glob for c in "*?[")
    return (1 if exact else 0, len(_LITERAL.findall(re.sub(r"\[[^\]]*\]", "?", glob))))


class PriceTable:
    """Prices by provider; :meth:`lookup` picks the most specific matching glob."""

    def __init__(self, prices: Iterable[Price]) -> None:
        self._by_provider: dict[str, list[tuple[re.Pattern[str], Price]]] = {}
        self._entries: dict[tuple[str, str], Price] = {}
        for p in prices:
            self._entries[(p.provider, p.model)] = p
        for (provider, glob), p in self._entries.items():
            # in any letter case, as rules match models: a model a rule allows has its price
            pattern = re.compile(glob_to_regex(glob), re.DOTALL | re.IGNORECASE | re.ASCII)
            self._by_provider.setdefault(provider, []).append((pattern, p))
        for entries in self._by_provider.values():
            entries.sort(key=lambda e: (*_specificity(e[1].model), e[1].rank), reverse=True)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[Price, ...]:
        return tuple(self._entries.values())

    def lookup(self, provider: str | None, model: str | None) -> Price | None:
        """The price of ``model`` at ``provider``: its own entries first, then ``"*"``."""
        if provider is None or model is None:
            return None
        for key in (provider, ANY_PROVIDER):
            for pattern, price in self._by_provider.get(key, ()):
                if pattern.fullmatch(model) is not None:
                    return price
        return None

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, source: str, rank: int = 0) -> dict[tuple[str, str], Price | None]:
        """The entries of one prices file; ``None`` marks an entry removed (``glob: null``).
        Raises PolicyError with ``file:line``."""
        data = parse_yaml(text, source)
        c = Checker(source)
        if data is None:
            return {}
        top = c.mapping(data, "a prices file", 1)
        for k in top:
            if k not in ("version", "prices") and not k.startswith("x-"):
                c.fail(f"unknown key {k!r} in prices (expected: version, prices)", top.key_lines[k])
        if "version" in top and (type(top["version"]) is not int or top["version"] != 1):
            c.fail(
                f"unsupported version {top['version']!r} (expected 1)", top.value_lines["version"]
            )
        if "prices" not in top or top["prices"] is None:
            return {}
        providers = c.mapping(top["prices"], "prices", top.value_lines["prices"])
        out: dict[tuple[str, str], Price | None] = {}
        for provider, models_v in providers.items():
            pline = providers.key_lines[provider]
            if provider != ANY_PROVIDER and NAME_RE.fullmatch(provider) is None:
                c.fail(f"invalid provider name {provider!r} (or '*' for any provider)", pline)
            if models_v is None:
                continue
            models = c.mapping(models_v, f"prices.{provider}", providers.value_lines[provider])
            for glob, spec in models.items():
                line = models.key_lines[glob]
                if not glob or any(ch.isspace() or not ch.isprintable() for ch in glob):
                    c.fail(f"bad model glob {glob!r}: empty or contains whitespace", line)
                try:
                    glob_to_regex(glob)
                except ValueError as e:
                    c.fail(f"bad model glob {glob!r}: {e}", line)
                if spec is None:
                    out[(provider, glob)] = None
                    continue
                what = f"prices.{provider}[{glob!r}]"
                m = c.mapping(spec, what, models.value_lines[glob])
                c.keys(m, _PRICE_KEYS, what, _PRICE_KEYS)
                per_token: list[int] = []
                for k in _PRICE_KEYS:
                    v = m[k]
                    vline = m.value_lines[k]
                    if (
                        isinstance(v, bool)
                        or not isinstance(v, int | float)
                        or not math.isfinite(v)
                    ):
                        c.fail(f"{what}.{k} must be a number, USD per 1M tokens", vline)
                    if v < 0 or v > MAX_USD_PER_MTOK:
                        c.fail(
                            f"{what}.{k} must be between 0 and {MAX_USD_PER_MTOK}, got {v}", vline
                        )
                    # USD per 1e6 tokens -> pico-USD per token: * 1e12 / 1e6
                    per_token.append(usd_to_pico(Decimal(str(v)) / 1_000_000))
                out[(provider, glob)] = Price(
                    provider, glob, per_token[0], per_token[1], source, rank
                )
        return out

    @classmethod
    def builtin(cls) -> PriceTable:
        return cls([p for p in _builtin_entries().values() if p is not None])

    @classmethod
    def load(cls, path: Path | None) -> PriceTable:
        """The built-in prices with ``path`` (if given and present) on top."""
        merged: dict[tuple[str, str], Price | None] = dict(_builtin_entries())
        if path is not None and path.exists():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise PolicyError(f"cannot read prices: {e}", str(path)) from None
            merged.update(cls.parse(text, str(path), rank=1))
        return cls([p for p in merged.values() if p is not None])


_builtin_cache: dict[tuple[str, str], Price | None] | None = None


def _builtin_entries() -> dict[tuple[str, str], Price | None]:
    global _builtin_cache
    if _builtin_cache is None:
        text = resources.files("aiid_proxy").joinpath("data/prices.yaml").read_text("utf-8")
        _builtin_cache = PriceTable.parse(text, "builtin prices.yaml", rank=0)
    return _builtin_cache


class PriceBook:
    """The current :class:`PriceTable` for a policies directory, re-read when ``prices.yaml``
    changes (checked at most every :data:`RELOAD_EVERY` seconds). The first load raises on a bad
    file; a later bad edit is logged and the last good table stays."""

    def __init__(self, path: Path | None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._table = PriceTable.load(path)
        self._checked = clock.monotonic()
        self.last_error: str | None = None

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> PriceTable:
        now = self._clock.monotonic()
        if now - self._checked < RELOAD_EVERY:
            return self._table
        with self._lock:
            if now - self._checked < RELOAD_EVERY:
                return self._table
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._table = PriceTable.load(self.path)
                    self.last_error = None
                    log.info("prices reloaded from %s (%d entries)", self.path, len(self._table))
                except PolicyError as e:
                    self.last_error = e.one_line()
                    log.error("prices edit refused, the last good prices stay: %s", e.one_line())
        return self._table


# -- periods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Periods:
    day: str  # "2027-01-15" (UTC)
    month: str  # "2027-01"
    next_day: float  # unix time of the next UTC midnight
    next_month: float  # unix time of the first of the next UTC month


_periods_cache: tuple[float, float, Periods] | None = None


def periods(now: float) -> Periods:
    """The UTC day and month ``now`` falls in; the answer is reused within the same day."""
    global _periods_cache
    cached = _periods_cache
    # Away from midnight (where datetime rounds microseconds), the same day gives the same answer.
    if cached is not None and cached[0] <= now < cached[1]:
        return cached[2]
    p = _periods(now)
    day_start = p.next_day - 86400.0
    _periods_cache = (day_start + 0.001, p.next_day - 0.001, p)
    return p


def _periods(now: float) -> Periods:
    t = datetime.fromtimestamp(now, UTC)
    day0 = t.replace(hour=0, minute=0, second=0, microsecond=0)
    month0 = day0.replace(day=1)
    nm = (month0 + timedelta(days=32)).replace(day=1)
    return Periods(
        day=day0.strftime("%Y-%m-%d"),
        month=month0.strftime("%Y-%m"),
        next_day=(day0 + timedelta(days=1)).timestamp(),
        next_month=nm.timestamp(),
    )


def month_start_ts(now: float) -> str:
    """The audit ``ts`` (ISO-8601 UTC) of the start of ``now``'s UTC month."""
    return periods(now).month + "-01T00:00:00"


# -- the ledger -------------------------------------------------------------------------------
@dataclass
class _Account:
    day_key: str = ""
    day: int = 0
    month_key: str = ""
    month: int = 0
    held: int = 0

    def roll(self, p: Periods) -> None:
        if self.day_key != p.day:
            self.day_key, self.day = p.day, 0
        if self.month_key != p.month:
            self.month_key, self.month = p.month, 0

    def add(self, p: Periods, pico: int) -> None:
        self.roll(p)
        self.day += pico
        self.month += pico


@dataclass(frozen=True)
class Hold:
    """A request's worst-case cost, held against its tenant's and agent's budgets."""

    tenant: str
    agent: str
    amount: int  # pico-USD
    price: Price | None  # None: unpriced, nothing is counted
    id: int


@dataclass(frozen=True)
class BudgetRefusal:
    """Why a request would exceed a budget: ``message`` names the budget."""

    message: str
    budget: str  # "agent usd_per_day" | "tenant usd_per_month" | ...
    retry_after: int


@dataclass(frozen=True)
class Spent:
    day: int
    month: int
    held: int


class Ledger:
    """Thread-safe spend per (tenant, agent) and per tenant, per UTC day and month."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._accounts: dict[tuple[str, ...], _Account] = {}
        self._holds: dict[int, Hold] = {}
        self._ids = itertools.count(1)

    def _account(self, key: tuple[str, ...]) -> _Account:
        acc = self._accounts.get(key)
        if acc is None:
            acc = self._accounts[key] = _Account()
        return acc

    # -- rebuilding ---------------------------------------------------------------------------
    def load(self, tenant: str, records: Iterable[tuple[str, str | None, int]]) -> int:
        """Replace ``tenant``'s spend with ``records`` (audit ``ts``, agent, pico-USD); records
        outside the current UTC day/month count only where they fall. Outstanding holds stay.
        Returns how many records counted."""
        p = periods(self._clock.now())
        n = 0
        with self._lock:
            for key in [k for k in self._accounts if k[1] == tenant]:
                acc = self._accounts[key]
                acc.day = acc.month = 0
                acc.day_key, acc.month_key = p.day, p.month
            for ts, agent, pico in records:
                if not ts.startswith(p.month):
                    continue
                n += 1
                keys: list[tuple[str, ...]] = [("tenant", tenant)]
                if agent is not None:
                    keys.append(("agent", tenant, agent))
                for key in keys:
                    acc = self._account(key)
                    acc.roll(p)
                    acc.month += pico
                    if ts.startswith(p.day):
                        acc.day += pico
        return n

    # -- queries ------------------------------------------------------------------------------
    def spent(self, tenant: str, agent: str | None = None) -> Spent:
        p = periods(self._clock.now())
        key = ("tenant", tenant) if agent is None else ("agent", tenant, agent)
        with self._lock:
            acc = self._accounts.get(key)
            if acc is None:
                return Spent(0, 0, 0)
            acc.roll(p)
            return Spent(acc.day, acc.month, acc.held)

    # -- holds --------------------------------------------------------------------------------
    def hold(
        self,
        tenant: str,
        agent: str,
        amount: int,
        price: Price | None,
        tenant_budget: BudgetSpec | None,
        agent_budget: tuple[str, BudgetSpec] | None,
    ) -> Hold | BudgetRefusal:
        """Hold ``amount`` pico-USD unless that would take any budget past its cap: all or
        nothing, under one lock. The refusal names the first budget that would be exceeded
        (agent before tenant, day before month) and retries when its period rolls over (the
        latest such roll-over when several are exceeded)."""
        if amount < 0:
            raise ValueError("a hold must not be negative")
        now = self._clock.now()
        p = periods(now)
        with self._lock:
            scopes: list[tuple[str, str, BudgetSpec | None, _Account]] = [
                (
                    "agent",
                    f" for {agent_budget[0]}" if agent_budget else "",
                    agent_budget[1] if agent_budget else None,
                    self._account(("agent", tenant, agent)),
                ),
                ("tenant", "", tenant_budget, self._account(("tenant", tenant))),
            ]
            first: BudgetRefusal | None = None
            retry = 0
            for scope, suffix, spec, acc in scopes:
                acc.roll(p)
                if spec is None:
                    continue
                for period, cap, spent, reset in (
                    ("usd_per_day", spec.usd_per_day, acc.day, p.next_day),
                    ("usd_per_month", spec.usd_per_month, acc.month, p.next_month),
                ):
                    if cap is None:
                        continue
                    cap_pico = usd_to_pico(cap)
                    if spent + acc.held + amount <= cap_pico:
                        continue
                    wait = max(1, math.ceil(reset - now))
                    retry = max(retry, wait)
                    if first is None:
                        left = max(0, cap_pico - spent - acc.held)
                        first = BudgetRefusal(
                            message=(
                                f"{scope} budget {period} {format_usd(cap)}{suffix} exceeded: "
                                f"spent {format_usd(pico_to_usd(spent))}"
                                + (
                                    f" + {format_usd(pico_to_usd(acc.held))} in flight"
                                    if acc.held
                                    else ""
                                )
                                + f", {format_usd(pico_to_usd(left))} left, this request may "
                                f"cost up to {format_usd(pico_to_usd(amount))}"
                            ),
                            budget=f"{scope} {period}",
                            retry_after=0,
                        )
            if first is not None:
                return BudgetRefusal(first.message, first.budget, retry)
            for _, _, _, acc in scopes:
                acc.held += amount
            h = Hold(tenant, agent, amount, price, next(self._ids))
            self._holds[h.id] = h
            return h

    def settle(self, hold: Hold, actual: int) -> bool:
        """Replace the hold by the real cost (pico-USD), counted in the current period. Once
        per hold; later calls (and calls after :meth:`release`) do nothing and return False."""
        p = periods(self._clock.now())
        with self._lock:
            if self._holds.pop(hold.id, None) is None:
                return False
            for key in (("agent", hold.tenant, hold.agent), ("tenant", hold.tenant)):
                acc = self._account(key)
                acc.held -= hold.amount
                acc.add(p, max(0, actual))
            return True

    def release(self, hold: Hold) -> None:
        """The request never went out: drop the hold, nothing is spent."""
        with self._lock:
            if self._holds.pop(hold.id, None) is None:
                return
            for key in (("agent", hold.tenant, hold.agent), ("tenant", hold.tenant)):
                self._account(key).held -= hold.amount

    def outstanding(self) -> int:
        with self._lock:
            return len(self._holds)


# -- the audit log as the source of truth -----------------------------------------------------
def spend_records(audit_db: Path, since_ts: str) -> list[tuple[str, str | None, int]]:
    """(ts, agent, pico-USD) of every record at or after ``since_ts`` whose detail carries a
    ``cost_usd``. A missing or unreadable database yields nothing (a new tenant)."""
    import json

    if not audit_db.is_file():
        return []
    out: list[tuple[str, str | None, int]] = []
    try:
        conn = sqlite3.connect(f"{audit_db.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as e:
        log.error("cannot read %s to rebuild spend: %s", audit_db, e)
        return []
    try:
        rows = conn.execute(
            "SELECT ts, agent, detail FROM audit WHERE ts >= ? AND detail LIKE '%\"cost_usd\"%'",
            (since_ts,),
        )
        for ts, agent, detail in rows:
            try:
                cost = json.loads(detail).get("cost_usd")
            except (ValueError, AttributeError, TypeError):
                continue
            if isinstance(cost, bool) or not isinstance(cost, int | float) or cost < 0:
                continue
            out.append((str(ts), agent if isinstance(agent, str) else None, usd_to_pico(cost)))
    except sqlite3.Error as e:
        log.error("cannot read %s to rebuild spend: %s", audit_db, e)
    finally:
        conn.close()
    return out


NON_GENERATING_KINDS = frozenset({"embeddings", "models", "count_tokens", "moderations"})
"""Route kinds that produce no output tokens: nothing is reserved for output."""
COSTLESS_KINDS = frozenset({"models", "count_tokens"})
"""Route kinds that cost nothing: no price needed, no budget hold."""


def reservation_tokens(
    kind: str | None, max_tokens: int | None, n: int | None, input_estimate: int, default: int
) -> tuple[int, int]:
    """(input, output) tokens to reserve before a request leaves: the input estimate, and for a
    generating route ``max_tokens`` times ``n`` (choices / candidates), or ``default`` times
    ``n`` when the request sets no ``max_tokens``."""
    if kind is None:
        return 0, 0
    if kind in NON_GENERATING_KINDS:
        return max(0, input_estimate), 0
    per_choice = max_tokens if max_tokens is not None else default
    return max(0, input_estimate), per_choice * max(1, n or 1)


def agent_budget_of(policy: Policy, agent: str) -> tuple[str, BudgetSpec] | None:
    """The agent's budget with the glob that gave it (for the refusal message)."""
    spec = policy.agent_budget(agent)
    if spec is None:
        return None
    for glob, s in policy.agent_budgets:
        if s is spec:
            return glob, spec
    for glob, s in policy.agent_budgets:  # pragma: no cover - engine returns the same object
        if s == spec:
            return glob, spec
    return "?", spec


def budgets_apply(policy: Policy | None, agent: str) -> bool:
    return policy is not None and (
        policy.tenant_budget is not None or policy.agent_budget(agent) is not None
    )


__all__ = [
    "COSTLESS_KINDS",
    "NON_GENERATING_KINDS",
    "PICO_PER_USD",
    "PRICES_FILE",
    "BudgetRefusal",
    "Hold",
    "Ledger",
    "Periods",
    "Price",
    "PriceBook",
    "PriceTable",
    "Spent",
    "agent_budget_of",
    "budgets_apply",
    "format_usd",
    "month_start_ts",
    "periods",
    "pico_to_usd",
    "reservation_tokens",
    "spend_records",
    "usd_to_pico",
]
