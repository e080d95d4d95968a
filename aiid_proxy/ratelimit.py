"""Per-tenant and per-agent rate limits: token buckets over requests and LLM tokens.

Each limit is a bucket holding one minute's worth (``capacity = per-minute value``, so the
burst is a minute's allowance) that refills continuously at ``value / 60`` per second. A request
reserves one request and its estimated tokens (input estimate + ``max_tokens``) from every
bucket that applies -- the agent's and the tenant's -- all or nothing, under one lock. When the
response reports its real usage, :meth:`RateLimiter.settle` gives back the unused part of the
reservation or takes the excess as debt; :meth:`RateLimiter.release` undoes a reservation whose
request never went out.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from aiid_proxy.clock import SYSTEM_CLOCK, Clock

_EPSILON = 1e-9
PRUNE_EVERY = 1024
"""Idle buckets are pruned on every this-many-th :meth:`RateLimiter.acquire`."""
PRUNE_IDLE_SECONDS = 600.0
MAX_OUTSTANDING = 100_000
"""Reservations never settled nor released beyond this many are forgotten, oldest first
(their tokens simply stay spent)."""
UNSATISFIABLE_RETRY_AFTER = 60


@dataclass(frozen=True)
class LimitSpec:
    """Per-minute limits; None = unlimited. Imported by the policy package."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            v = getattr(self, name)
            if v is not None and (type(v) is not int or v < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {v!r}")


class Limits(Protocol):
    """Anything shaped like :class:`LimitSpec` (read-only attributes are enough)."""

    @property
    def requests_per_minute(self) -> int | None: ...

    @property
    def tokens_per_minute(self) -> int | None: ...


class TokenBucket:
    """A bucket of ``capacity`` that refills at ``refill_per_second``, on an injected clock.

    Not thread-safe by itself: :class:`RateLimiter` calls it under its lock.
    """

    def __init__(
        self,
        capacity: float,
        refill_per_second: float,
        clock: Clock = SYSTEM_CLOCK,
        tokens: float | None = None,
    ) -> None:
        if capacity < 0 or refill_per_second < 0:
            raise ValueError("capacity and refill rate must be non-negative")
        self.capacity = float(capacity)
        self.refill_per_second = float(refill_per_second)
        self._clock = clock
        self._tokens = self.capacity if tokens is None else min(float(tokens), self.capacity)
        self._stamp = clock.monotonic()
        self.last_used = self._stamp

    def _refill(self) -> None:
        now = self._clock.monotonic()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.capacity, self._tokens + elapsed * self.refill_per_second)
            self._stamp = now

    @property
    def tokens(self) -> float:
        """What the bucket holds now (negative while in debt)."""
        self._refill()
        return self._tokens

    def is_full(self) -> bool:
        return self.tokens >= self.capacity - _EPSILON

    def try_take(self, n: float) -> bool:
        """Take ``n`` if the bucket holds that much; else take nothing. Taking 0 always
        succeeds, even from a bucket in debt."""
        self._refill()
        self.last_used = self._stamp
        if n <= 0 or self._tokens + _EPSILON >= n:
            self._tokens -= n
            return True
        return False

    def time_until(self, n: float) -> float:
        """Seconds until ``n`` can be taken: 0 if now, ``math.inf`` if never (n > capacity).

        Uses the same tolerance as :meth:`try_take`, so a take after exactly this long passes.
        """
        self._refill()
        missing = n - self._tokens
        if n <= 0 or missing <= _EPSILON:
            return 0.0
        if n > self.capacity + _EPSILON or self.refill_per_second <= 0:
            return math.inf
        return (missing - _EPSILON) / self.refill_per_second

    def time_until_full(self) -> float:
        self._refill()
        missing = self.capacity - self._tokens
        if missing <= _EPSILON:
            return 0.0
        if self.refill_per_second <= 0:
            return math.inf
        return missing / self.refill_per_second

    def give_back(self, n: float) -> None:
        """Return ``n`` (never above capacity)."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens + max(0.0, n))

    def take_debt(self, n: float) -> None:
        """Take ``n`` even if that leaves the bucket negative (real usage over the estimate)."""
        self._refill()
        self._tokens -= max(0.0, n)


@dataclass(frozen=True)
class RateDecision:
    """The outcome of :meth:`RateLimiter.acquire`, with enough for ``x-ratelimit-*`` headers.

    ``limit`` names the limit that refused (``"agent requests_per_minute"``, ``"tenant
    tokens_per_minute"``, ...). The remaining/limit/reset fields describe, for requests and for
    tokens separately, the scope (agent or tenant) with the least left; None when no limit
    applies.
    """

    allowed: bool
    limit: str | None
    retry_after: int
    remaining_requests: int | None
    remaining_tokens: int | None
    limit_requests: int | None
    limit_tokens: int | None
    reset_requests_s: float | None
    reset_tokens_s: float | None
    never: bool = False  # the request needs more tokens than the limit ever holds


@dataclass(frozen=True)
class Reservation:
    tenant: str
    agent: str
    tokens: int
    id: int


@dataclass
class _Slot:
    limit: int
    bucket: TokenBucket


@dataclass(frozen=True)
class _Check:
    label: str
    limit: int
    bucket: TokenBucket
    amount: int
    is_tokens: bool


@dataclass(frozen=True)
class _Held:
    request_buckets: tuple[TokenBucket, ...]
    token_buckets: tuple[TokenBucket, ...]


_Key = tuple[str, ...]


class RateLimiter:
    """Thread-safe rate limiting for every tenant and agent of one gateway."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: dict[_Key, _Slot] = {}
        self._held: OrderedDict[int, _Held] = OrderedDict()
        self._ids = itertools.count(1)
        self._calls = 0

    def _slot(self, key: _Key, limit: int) -> TokenBucket:
        """The bucket for ``key``; re-created when the limit changed (a policy reload).

        A re-created bucket keeps what was already used this minute: lowering a limit takes
        effect at once and raising it does not hand out a fresh burst on top of the old one.
        """
        slot = self._slots.get(key)
        if slot is not None and slot.limit == limit:
            return slot.bucket
        tokens: float | None = None
        if slot is not None:
            used = slot.bucket.capacity - slot.bucket.tokens
            tokens = limit - used
        bucket = TokenBucket(limit, limit / 60.0, self._clock, tokens)
        self._slots[key] = _Slot(limit, bucket)
        return bucket

    def _checks(
        self,
        tenant: str,
        agent: str,
        tenant_limit: Limits | None,
        agent_limit: Limits | None,
        tokens: int,
    ) -> list[_Check]:
        checks: list[_Check] = []
        scopes = (
            ("agent", ("agent", tenant, agent), agent_limit),
            ("tenant", ("tenant", tenant), tenant_limit),
        )
        for scope, key, spec in scopes:
            if spec is None:
                continue
            if spec.requests_per_minute is not None:
                rpm = spec.requests_per_minute
                bucket = self._slot((*key, "requests"), rpm)
                checks.append(_Check(f"{scope} requests_per_minute", rpm, bucket, 1, False))
            if spec.tokens_per_minute is not None:
                tpm = spec.tokens_per_minute
                bucket = self._slot((*key, "tokens"), tpm)
                checks.append(_Check(f"{scope} tokens_per_minute", tpm, bucket, tokens, True))
        return checks

    def acquire(
        self,
        tenant: str,
        agent: str,
        tenant_limit: Limits | None,
        agent_limit: Limits | None,
        tokens: int,
    ) -> tuple[RateDecision, Reservation | None]:
        """Reserve one request and ``tokens`` from the agent's and the tenant's buckets.

        All or nothing: if any bucket refuses, nothing is taken and the decision names the
        limit with the longest wait (agent before tenant, requests before tokens on a tie);
        ``retry_after`` is that wait in whole seconds, at least 1, or 60 when the token
        reservation exceeds the limit itself and can never pass.
        """
        if type(tokens) is not int or tokens < 0:
            raise ValueError(f"tokens must be a non-negative integer, got {tokens!r}")
        with self._lock:
            self._calls += 1
            if self._calls % PRUNE_EVERY == 0:
                self._prune()
            checks = self._checks(tenant, agent, tenant_limit, agent_limit, tokens)
            worst: _Check | None = None
            worst_wait = 0.0
            for check in checks:
                wait = check.bucket.time_until(check.amount)
                if wait > worst_wait:
                    worst, worst_wait = check, wait
            if worst is not None:
                never = math.isinf(worst_wait)
                retry = UNSATISFIABLE_RETRY_AFTER if never else max(1, math.ceil(worst_wait))
                decision = self._decision(checks, False, worst.label, retry)
                return (dataclasses.replace(decision, never=True) if never else decision), None
            for check in checks:
                taken = check.bucket.try_take(check.amount)
                assert taken, "checked under the same lock"
            rid = next(self._ids)
            self._held[rid] = _Held(
                tuple(c.bucket for c in checks if not c.is_tokens),
                tuple(c.bucket for c in checks if c.is_tokens),
            )
            while len(self._held) > MAX_OUTSTANDING:
                self._held.popitem(last=False)
            decision = self._decision(checks, True, None, 0)
            return decision, Reservation(tenant, agent, tokens, rid)

    @staticmethod
    def _decision(
        checks: list[_Check], allowed: bool, limit: str | None, retry_after: int
    ) -> RateDecision:
        def tightest(is_tokens: bool) -> tuple[int | None, int | None, float | None]:
            best: _Check | None = None
            best_left = math.inf
            for c in checks:
                if c.is_tokens == is_tokens and c.bucket.tokens < best_left:
                    best, best_left = c, c.bucket.tokens
            if best is None:
                return None, None, None
            left = max(0, math.floor(best_left + _EPSILON))
            return left, best.limit, best.bucket.time_until_full()

        rem_r, lim_r, reset_r = tightest(False)
        rem_t, lim_t, reset_t = tightest(True)
        return RateDecision(
            allowed=allowed,
            limit=limit,
            retry_after=retry_after,
            remaining_requests=rem_r,
            remaining_tokens=rem_t,
            limit_requests=lim_r,
            limit_tokens=lim_t,
            reset_requests_s=reset_r,
            reset_tokens_s=reset_t,
        )

    def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """The request is done and used ``actual_tokens``: give back the unused reservation,
        or take the excess as debt. A reservation settles (or releases) once; later calls
        are no-ops."""
        with self._lock:
            held = self._held.pop(reservation.id, None)
            if held is None:
                return
            diff = reservation.tokens - max(0, actual_tokens)
            for bucket in held.token_buckets:
                if diff > 0:
                    bucket.give_back(diff)
                elif diff < 0:
                    bucket.take_debt(-diff)

    def release(self, reservation: Reservation) -> None:
        """The request never went out: give back its request and all its tokens."""
        with self._lock:
            held = self._held.pop(reservation.id, None)
            if held is None:
                return
            for bucket in held.request_buckets:
                bucket.give_back(1)
            for bucket in held.token_buckets:
                bucket.give_back(reservation.tokens)

    def _prune(self) -> None:
        """Forget buckets that are full and unused for :data:`PRUNE_IDLE_SECONDS`: they are
        indistinguishable from new ones."""
        now = self._clock.monotonic()
        stale = [
            key
            for key, slot in self._slots.items()
            if slot.bucket.is_full() and now - slot.bucket.last_used > PRUNE_IDLE_SECONDS
        ]
        for key in stale:
            del self._slots[key]

    def bucket_count(self) -> int:
        with self._lock:
            return len(self._slots)
