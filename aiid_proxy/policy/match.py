"""What a rule's conditions compile to: globs as anchored regexes, request paths as servers read
them, ``hours`` as minute ranges in their zone, ``when`` as plain comparisons. Used by
:mod:`aiid_proxy.policy.engine` (and by whoever matches globs as policies do: prices, lint)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from urllib.parse import unquote
from zoneinfo import ZoneInfo

from aiid_proxy.policy.model import Hours, Range, RequestContext, When

# -- globs ---------------------------------------------------------------------------------------


def glob_to_regex(glob: str) -> str:
    """Translate a glob (``*`` any run, may cross ``/``; ``?`` one char; ``[a-z]``/``[!x]``
    classes) to a regex body. Raises ValueError on an empty glob or unbalanced brackets."""
    if not glob:
        raise ValueError("empty glob")
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = glob.find("]", i + 1)
            if j == -1:
                raise ValueError(f"unbalanced '[' in glob {glob!r}")
            body = glob[i + 1 : j]
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            if not body:
                raise ValueError(f"empty character class in glob {glob!r}")
            if "[" in body:
                raise ValueError(f"nested '[' in glob {glob!r}")
            members = "".join("-" if ch == "-" else re.escape(ch) for ch in body)
            out.append(f"[{'^' if negate else ''}{members}]")
            i = j
        elif c == "]":
            raise ValueError(f"unbalanced ']' in glob {glob!r}")
        else:
            out.append(re.escape(c))
        i += 1
    body = "".join(out)
    try:
        re.compile(body)
    except re.error as e:
        raise ValueError(f"bad glob {glob!r}: {e}") from None
    return body


def compile_globs(
    globs: tuple[str, ...], *, lower: bool = False, any_case: bool = False
) -> re.Pattern[str]:
    """One anchored-by-fullmatch regex matching any of ``globs`` (``any_case``: ASCII letters
    match in either case)."""
    parts = [glob_to_regex(g.lower() if lower else g) for g in globs]
    flags = re.DOTALL | (re.IGNORECASE | re.ASCII if any_case else 0)
    return re.compile("|".join(f"(?:{p})" for p in parts), flags)


# -- paths and time ------------------------------------------------------------------------------


_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


def upper_escapes(text: str) -> str:
    """Percent-escapes in upper case, as normalize_path spells them in paths and the
    engine in path globs."""
    return _ESCAPE.sub(lambda m: m.group().upper(), text)


def normalize_path(path: str) -> str:
    """The path a server would route: query and fragment dropped, ``.``/``..`` segments resolved
    (also percent-encoded ones) and empty segments dropped, so ``/repos/../admin`` cannot pass
    for ``/repos/*`` and ``//admin`` cannot slip past a deny on ``/admin*``."""
    path = path.partition("?")[0].partition("#")[0]
    if not path.startswith("/") or ("." not in path and "%" not in path and "//" not in path):
        return path
    if "%" in path:  # %2f and %2F are the same character (RFC 3986): one spelling
        path = upper_escapes(path)
    segments = path.split("/")[1:]
    last = len(segments) - 1
    out: list[str] = []
    for i, seg in enumerate(segments):
        decoded = unquote(seg)
        if decoded in (".", ".."):
            if decoded == ".." and out:
                out.pop()
            if i == last:
                out.append("")  # "/a/b/.." is the directory "/a/"
        elif seg or i == last:
            out.append(seg)
    return "/" + "/".join(out)


# '/' and '\\' percent-encoded: many servers decode them before routing (wsgiref's PATH_INFO,
# IIS), others do not, so a path holding them has two readings.
_ENCODED_SEPARATOR = re.compile(r"%(?:2[Ff]|5[Cc])")


def decode_separators(text: str) -> str:
    """``text`` as a server that decodes ``%2F`` and ``%5C`` before routing reads it: ``/``
    there, also double- or triple-encoded (``%252F``), as the path checks decode dot segments
    up to three times."""
    for _ in range(3):
        decoded = _ENCODED_SEPARATOR.sub("/", text).replace("%25", "%")
        if decoded == text:
            break
        text = decoded
    return _ENCODED_SEPARATOR.sub("/", text)


def path_readings(path: str) -> tuple[str, ...]:
    """The path as the policy matches it (:func:`normalize_path`) and, when it percent-encodes
    ``/`` or ``\\``, also as a server that decodes them before routing reads it
    (:func:`decode_separators`): ``/repos/a/b/admin%2Fc`` is ``/repos/a/b/admin/c`` there.
    A rule must hold for both; its own globs are read the same way for the second."""
    first = normalize_path(path)
    if "%" not in path:
        return (first,)
    bare = path.partition("?")[0].partition("#")[0]
    if _ENCODED_SEPARATOR.search(bare) is None and "%25" not in bare:
        return (first,)
    alt = normalize_path(decode_separators(bare))
    return (first,) if alt == first else (first, alt)


def fmt_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


class CompiledHours:
    __slots__ = ("_cache", "_zone", "end", "start", "text", "tz")

    def __init__(self, hours: Hours) -> None:
        self.start = hours.start
        self.end = hours.end
        self.tz = hours.tz
        self.text = hours.text
        self._zone = None if hours.tz == "UTC" else ZoneInfo(hours.tz)
        self._cache: tuple[int, int] = (-1, 0)  # (epoch minute, local minute of day)

    def local_minute(self, now: float) -> int:
        epoch_minute = int(now // 60)
        if self._zone is None:
            return epoch_minute % 1440
        cached = self._cache
        if cached[0] == epoch_minute:
            return cached[1]
        dt = datetime.fromtimestamp(now, self._zone)
        minute = dt.hour * 60 + dt.minute
        self._cache = (epoch_minute, minute)
        return minute

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


# -- when ----------------------------------------------------------------------------------------

_RANGE_FIELDS = ("max_tokens", "temperature", "top_p", "n")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


class CompiledWhen:
    __slots__ = ("hours", "ranges", "stream", "tools")

    def __init__(self, when: When) -> None:
        self.ranges: tuple[tuple[str, float, float, Range], ...] = tuple(
            (
                name,
                float("-inf") if r.min is None else r.min,
                float("inf") if r.max is None else r.max,
                r,
            )
            for name in _RANGE_FIELDS
            if (r := getattr(when, name)) is not None
        )
        self.stream = when.stream
        self.tools = when.tools
        self.hours = None if when.hours is None else CompiledHours(when.hours)

    def holds(self, ctx: RequestContext) -> bool:
        for name, lo, hi, _ in self.ranges:
            v = getattr(ctx, name)
            if v is None or not lo <= v <= hi:
                return False
        if self.stream is not None and ctx.stream != self.stream:
            return False
        if self.tools is not None and ctx.tools != self.tools:
            return False
        h = self.hours
        return h is None or h.contains(h.local_minute(ctx.now))

    def failures(self, ctx: RequestContext) -> list[str]:
        out: list[str] = []
        for name, lo, hi, r in self.ranges:
            v = getattr(ctx, name)
            if v is None:
                want = " and ".join(
                    f"{side} {_num(b)}"
                    for side, b in (("min", r.min), ("max", r.max))
                    if b is not None
                )
                out.append(f"{name} not set (rule needs {want})")
            elif v < lo:
                out.append(f"{name} {_num(v)} < min {_num(lo)}")
            elif v > hi:
                out.append(f"{name} {_num(v)} > max {_num(hi)}")
            elif not lo <= v <= hi:  # NaN compares false both ways; `holds` refuses it too
                out.append(f"{name} {v} is not a number")
        for name, want_flag in (("stream", self.stream), ("tools", self.tools)):
            have = getattr(ctx, name)
            if want_flag is not None and bool(have) is not want_flag:
                out.append(
                    f"{name} is {str(bool(have)).lower()}, rule needs {str(want_flag).lower()}"
                )
        h = self.hours
        if h is not None:
            minute = h.local_minute(ctx.now)
            if not h.contains(minute):
                out.append(f"time {_hhmm(minute)} {h.tz} outside hours {h.text}")
        return out
