"""The policy's times: durations (``120s``), daily windows (``08:00-20:00 UTC``) and expiry
instants (ISO 8601 with a zone). Each parser raises PolicyError with a message naming ``what``;
the validator adds the file and line."""

from __future__ import annotations

import math
import re
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiid_proxy.errors import PolicyError
from aiid_proxy.policy.model import Hours

# Names in the zone database that stand for whatever zone the host is set to.
HOST_ZONES = frozenset({"localtime", "posixrules"})
_HOURS_RE = re.compile(r"^\s*([0-9]{2}):([0-9]{2})\s*-\s*([0-9]{2}):([0-9]{2})\s+(\S+)\s*$")
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float) -> float:
    """``"120s"``, ``"10m"``, ``"2h"``, ``"1d"`` or ``"90"`` (seconds) -> seconds (> 0)."""
    if isinstance(text, bool):
        raise PolicyError(f"invalid duration {text!r}: use e.g. 120s, 10m, 2h, 1d")
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise PolicyError(f"invalid duration {text!r}: use e.g. 120s, 10m, 2h, 1d")
        value = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise PolicyError(f"invalid duration {text!r}: must be positive")
    return value


def parse_expires(v: object, what: str) -> float:
    """An override's ``expires``: an ISO 8601 time with ``Z`` or an offset -> POSIX seconds."""
    bad = (
        f"{what}: expires {v!r} must be an ISO 8601 time with Z or an offset,"
        " e.g. 2026-12-01T00:00:00Z"
    )
    if not isinstance(v, str):
        raise PolicyError(bad)
    try:
        dt = datetime.fromisoformat(v.strip())
    except ValueError:
        raise PolicyError(bad) from None
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise PolicyError(bad)
    return dt.timestamp()


def parse_hours(v: object, what: str) -> Hours:
    """``when.hours``: ``"HH:MM-HH:MM ZONE"`` (UTC or an IANA name; the end may be 24:00; a
    window whose end is before its start crosses midnight)."""
    bad = f'{what}.hours {v!r} must look like "08:00-20:00 UTC" (zone: UTC or IANA name)'
    match = _HOURS_RE.fullmatch(v) if isinstance(v, str) else None
    if match is None:
        raise PolicyError(bad)
    h1, m1, h2, m2 = (int(match.group(i)) for i in range(1, 5))
    tz = match.group(5)
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise PolicyError(bad)
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise PolicyError(f"{what}.hours {v!r} is an empty window (start equals end)")
    if tz in HOST_ZONES:
        raise PolicyError(
            f"{what}.hours: time zone {tz!r} is the host's own zone, which differs from "
            "machine to machine; name the zone (e.g. Europe/Berlin)"
        )
    if tz != "UTC":
        try:
            ZoneInfo(tz)
        # a directory of the zone database ("Europe") is an IsADirectoryError
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise PolicyError(f"{what}.hours: unknown time zone {tz!r}") from None
    return Hours(
        start,
        end,
        tz,
        f"{match.group(1)}:{match.group(2)}-{match.group(3)}:{match.group(4)} {tz}",
    )
