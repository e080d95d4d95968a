"""An audit record's fields, validated into their stored form before they are queued.

``normalize`` gives each value the exact type SQLite gives back (int, float, str), so the mac the
writer computes matches the one recomputed from the stored row; ``format_ts`` stamps a record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from aiid_proxy.audit.chain import COLUMNS, dump_detail
from aiid_proxy.errors import AuditFieldError

# Events whose records need not be fsync'd before their future resolves. A `response` record
# is written after the response was released (the contract asks durability of the `request`
# record, before the request leaves); committing it with synchronous=NORMAL keeps it safe from
# a gateway crash (it is in the WAL) and leaves the next fsync of the WAL (the next record of
# any other kind, a checkpoint, or LAZY_SYNC seconds of quiet) to make it power-safe too. So a
# request record no longer waits behind the fsync of the previous response record.
LAZY_EVENTS = frozenset({"response"})

# The fields append() takes, in COLUMNS order (event is its positional argument).
FIELDS: tuple[str, ...] = COLUMNS[2:14]
_INT = frozenset({"status", "input_tokens", "output_tokens"})
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class AppendResult:
    seq: int
    mac: str


_ts_cache: tuple[int, str] = (-1, "")


def format_ts(now: float) -> str:
    """ISO-8601 UTC with microseconds, e.g. ``2026-11-25T21:35:07.123456Z``."""
    global _ts_cache
    micros = round(now * 1_000_000)
    secs, us = divmod(micros, 1_000_000)
    cached_secs, prefix = _ts_cache
    if secs != cached_secs:
        prefix = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _ts_cache = (secs, prefix)
    return f"{prefix}.{us:06d}Z"


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise AuditFieldError(f"audit field {name} must be a string, not {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AuditFieldError(f"audit field {name} is not valid UTF-8 text") from None
    return str(value)


def _integer(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise AuditFieldError(f"audit field {name} must be an integer")
    if not _INT_MIN <= value <= _INT_MAX:
        raise AuditFieldError(f"audit field {name} is out of range")
    return int(value)


def _latency(name: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AuditFieldError(f"audit field {name} must be a number")
    ms = round(float(value), 3)
    if not math.isfinite(ms) or abs(ms) >= 1e15:
        raise AuditFieldError(f"audit field {name} is out of range")
    return ms + 0.0  # never -0.0: SQLite would give back 0.0


def _detail(name: str, value: object) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise AuditFieldError(f"audit field {name} must be a JSON object") from None
    if not isinstance(value, Mapping):
        raise AuditFieldError(f"audit field {name} must be a JSON object")
    try:
        return _text(name, dump_detail(value))
    except (TypeError, ValueError, RecursionError) as e:
        raise AuditFieldError(f"audit field {name} is not JSON-serialisable: {e}") from None


_CHECKS: dict[str, tuple[int, Callable[[str, object], object]]] = {
    name: (
        i,
        _integer
        if name in _INT
        else _latency
        if name == "latency_ms"
        else _detail
        if name == "detail"
        else _text,
    )
    for i, name in enumerate(FIELDS)
    if name != "event"
}
_EVENT = FIELDS.index("event")


def is_lazy(values: tuple[object, ...]) -> bool:
    """Whether a normalized record may commit without an fsync of its own (LAZY_EVENTS)."""
    return values[_EVENT] in LAZY_EVENTS


def normalize(event: str, fields: Mapping[str, object]) -> tuple[object, ...]:
    """Validate an append's fields into their stored form (COLUMNS[2:14] order).

    Each value gets the exact type SQLite gives back (int, float, str), so the mac computed now
    matches the one recomputed from the stored row. ``latency_ms`` is kept to the microsecond.
    """
    out: list[object] = [None] * len(FIELDS)
    event = _text("event", event)
    if not event:
        raise AuditFieldError("audit event must not be empty")
    out[_EVENT] = event
    for name, value in fields.items():
        check = _CHECKS.get(name)
        if check is None:
            raise AuditFieldError(f"unknown audit field {name!r}")
        if value is not None:
            out[check[0]] = check[1](name, value)
    return tuple(out)
