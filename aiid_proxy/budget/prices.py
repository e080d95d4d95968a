"""Prices: USD per million tokens per provider and model glob, and money in pico-USD."""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from importlib import resources
from pathlib import Path

from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import PolicyError
from aiid_proxy.home import NAME_RE
from aiid_proxy.policy.match import glob_to_regex
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
