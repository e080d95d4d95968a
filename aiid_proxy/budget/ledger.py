"""The ledger: spend per tenant and agent per UTC day and month, budget holds, and the
audit log as the source of truth it is rebuilt from."""

from __future__ import annotations

import itertools
import logging
import math
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiid_proxy.budget.prices import Price, format_usd, pico_to_usd, usd_to_pico
from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.policy.model import BudgetSpec

log = logging.getLogger("aiid.budget")


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
    never: bool = False  # the request alone costs more than that whole budget


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
        with self._lock:
            for key in [k for k in self._accounts if k[1] == tenant]:
                acc = self._accounts[key]
                acc.day = acc.month = 0
                acc.day_key, acc.month_key = p.day, p.month
            return self._count(p, tenant, records)

    def count(self, tenant: str, records: Iterable[tuple[str, str | None, int]]) -> int:
        """Add ``records`` (audit ``ts``, agent, pico-USD) to ``tenant``'s spend, as
        :meth:`load` counts them; returns how many counted."""
        p = periods(self._clock.now())
        with self._lock:
            return self._count(p, tenant, records)

    def _count(
        self, p: Periods, tenant: str, records: Iterable[tuple[str, str | None, int]]
    ) -> int:
        """Under the lock."""
        n = 0
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
                            never=amount > cap_pico,
                        )
            if first is not None:
                return BudgetRefusal(first.message, first.budget, retry, first.never)
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
