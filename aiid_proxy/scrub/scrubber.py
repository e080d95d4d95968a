"""The byte scrubber of bodies, headers and streams (:class:`Scrubber`) and the watch on the
decoded text of streamed events (:class:`TextWatch`)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from aiid_proxy.scrub.fragments import (
    _ANCHOR,
    FRAGMENT,
    MAX_FRAGMENT_SCAN,
    REDACTED,
    SCAN_BUDGET,
    Fragments,
    _anchors,
    _fragments,
    _merged,
    _redacted,
    public_prefix,
)

_POSITION = re.compile(r"\[[^\]]*\]|\d+")


@functools.lru_cache(maxsize=4096)  # a stream's channels repeat every event
def _field(channel: str) -> str:
    """The channel of a piece's field at any position (no tracker names one so: NUL)."""
    return "\x00" + _POSITION.sub("", channel.rsplit(".", 1)[-1])


MIN_WATCHED = 8
"""Secrets shorter than this are scrubbed as bytes only: as text they would match words."""
MAX_CHANNELS = 4096
"""Interleaved texts (choices, blocks, candidates, tool calls and their fields) a TextWatch
keeps apart; past that it is :attr:`TextWatch.overflowed` (the stream is cut: text of several
channels run together would hide a key spelled over one)."""


def _variants(secret: str) -> list[bytes]:
    raw = secret.encode()
    out = {raw, secret.replace("/", "\\/").encode()}
    return sorted((v for v in out if v), key=len, reverse=True)


@functools.lru_cache(maxsize=256)  # a Scrubber is made per flow, twice: compiled once a key
def _slashed(secret: str) -> re.Pattern[bytes] | None:
    """A secret with two or more ``/`` spelled with any of them JSON-escaped (``\\/``), as
    a JSON reader reads it whatever the mix; None for fewer (its two spellings are needles)."""
    if secret.count("/") < 2:
        return None
    return re.compile(rb"\\?/".join(re.escape(part.encode()) for part in secret.split("/")))


class Scrubber:
    """Replaces every occurrence of the given secrets, also across chunk boundaries.

    Only the longest suffix of the pending data that could start a secret is held back, so an
    SSE event that ends in ``\\n\\n`` is released at once: streaming adds no latency.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(s for s in secrets if s)
        # longest first over every secret: one may be a prefix of another (the log's)
        self._needles = sorted(
            {v for s in self.secrets for v in _variants(s)}, key=len, reverse=True
        )
        self._slashed = [p for s in self.secrets if (p := _slashed(s)) is not None]
        self._pending = b""
        self.hits = 0

    @property
    def active(self) -> bool:
        return bool(self._needles)

    def anywhere(self, data: bytes, low: str | None = None) -> bool:
        """Whether a secret is in ``data`` as :meth:`scrub` replaces it, or in its lowercased
        text ``low`` (as :meth:`in_name` finds it; decoded from ``data`` if not given); no hit
        is counted."""
        if any(n in data for n in self._needles):
            return True
        if self._slashed and b"\\/" in data and any(p.search(data) for p in self._slashed):
            return True
        if low is None:
            low = data.decode("utf-8", "surrogateescape").lower()
        return any(s.lower() in low for s in self.secrets)

    def in_name(self, name: bytes) -> bool:
        """A secret, or a :data:`FRAGMENT` of one, in a header name, in any case (HTTP/2
        lowercases names): such a header cannot be scrubbed into a valid name and is dropped;
        counted as a hit."""
        text = name.decode("utf-8", "surrogateescape")
        low = text.lower()
        found = (
            any(s.lower() in low for s in self.secrets)
            or self.lower_fragments.found(low)
            or self.fragments.found(text)  # the hex of the secret's own bytes
        )
        self.hits += found
        return found

    @property
    def fragments(self) -> Fragments:
        return _fragments(self.secrets)

    @property
    def lower_fragments(self) -> Fragments:
        return _fragments(tuple(s.lower() for s in self.secrets))

    def redact_any_case(self, text: str) -> str:
        """``text`` with every run of a secret's fragments, in any letter case, replaced by
        ``[REDACTED]``, the hex of the secret's own bytes too (the lower-cased secret's hex is
        another string). Both searches run on the same text and their spans are merged: one
        redacting first would cut the other's runs into pieces too short to be found. When
        lower-casing changes the text's length (non-ASCII letters), a run found in any case
        redacts the whole text."""
        spans = self.fragments.spans(text) if self.fragments.found(text) else []
        low = text.lower()
        frags = self.lower_fragments
        if frags.found(low):
            if len(low) != len(text):  # spans would not line up
                return REDACTED.decode()
            spans = _merged(spans + frags.spans(low))
        return _redacted(text, spans) if spans else text

    def scrub_fragments(self, body: bytes, budget: list[int] | None = None) -> bytes:
        """A complete body with every run of :data:`FRAGMENT` or more characters of a secret,
        in any letter case, replaced by ``[REDACTED]``: the key one character short,
        upper-cased, split over two lines, or percent- or entity-encoded between its letters.
        Counted as hits. A run within the secret's public start (:func:`public_prefix`) is left:
        every key of a provider starts alike (``sk-ant-api03-``), and a reply naming that is no
        leak. Bodies over :data:`MAX_FRAGMENT_SCAN` bytes are not scanned.

        Cost: one search of the ASCII-lowercased body per aligned piece of the secret
        (:func:`_anchors`: every run of 12 holds one, ~1.6 us per piece and 2 KB), then a look
        around each piece found, so the gateway runs it on error bodies only (a provider
        quotes the key it was sent in an error), not on every response."""
        if not self.secrets or len(body) > MAX_FRAGMENT_SCAN:
            return body
        low = body.lower()  # ASCII letters only: every offset stays
        spans: list[list[int]] = []
        left = budget if budget is not None else [SCAN_BUDGET]  # shared by a body's strings
        for anchor, where in _anchors(self.secrets):
            covered = -1  # the end of the last run looked at from this piece: not again
            i = low.find(anchor)
            while i >= 0:
                if i + _ANCHOR > covered:
                    if left[0] < 0:  # a body made to be slow: withheld whole (fail closed)
                        self.hits += 1
                        return REDACTED
                    for secret, k, public in where:  # the piece sits at k in this secret
                        a = i - k  # where the secret's first character would be in the body
                        lo = k  # extend the match left and right of the piece
                        while lo > 0 and a + lo > 0 and low[a + lo - 1] == secret[lo - 1]:
                            lo -= 1
                        hi = k + _ANCHOR
                        while hi < len(secret) and a + hi < len(low) and low[a + hi] == secret[hi]:
                            hi += 1
                        covered = max(covered, a + hi)
                        left[0] -= 1 + hi - lo  # the steps it took
                        if hi - lo >= FRAGMENT and hi > public:
                            spans.append([a + lo, a + hi])
                i = low.find(anchor, i + 1)
        if not spans:
            return body
        spans = _merged([_whole(body, a, b) for a, b in spans])
        self.hits += len(spans)
        return _redacted(body.decode("latin-1"), spans).encode("latin-1")

    def scrub(self, data: bytes) -> bytes:
        """Scrub a complete body."""
        if self._pending or not self._needles:
            out = self.feed(data)
            return out + self.flush()
        # Nothing held back: feed + flush would return exactly the replaced data, so skip the
        # held-suffix search (this runs on every response header value).
        for n in self._needles:
            if n in data:
                self.hits += data.count(n)
                data = data.replace(n, REDACTED)
        return self._unslash(data)

    def _unslash(self, data: bytes) -> bytes:
        """``data`` with a secret spelled with some of its ``/`` escaped replaced."""
        if self._slashed and b"\\/" in data:
            for p in self._slashed:
                data, n = p.subn(REDACTED, data)
                self.hits += n
        return data

    def scrub_text(self, text: str) -> str:
        return self.scrub(text.encode("utf-8", "surrogateescape")).decode(
            "utf-8", "surrogateescape"
        )

    def feed(self, chunk: bytes) -> bytes:
        if not self._needles:
            return chunk
        data = self._pending + chunk
        for n in self._needles:
            if n in data:
                self.hits += data.count(n)
                data = data.replace(n, REDACTED)
        data = self._unslash(data)
        hold = self._held_suffix(data)
        if hold:
            self._pending = data[-hold:]
            return data[:-hold]
        self._pending = b""
        return data

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return data

    def _held_suffix(self, data: bytes) -> int:
        """The longest k < len(needle) such that ``data`` ends with a needle's first k bytes."""
        best = 0
        size = len(data)
        for n in self._needles:
            # A held suffix starts at an occurrence of the needle's first byte within the last
            # len(n) - 1 bytes; the leftmost one that is a prefix of the needle is the longest.
            first = n[:1]
            i = data.find(first, max(0, size - (len(n) - 1)))
            while i != -1 and size - i > best:
                if n.startswith(data[i:]):
                    best = size - i
                    break
                i = data.find(first, i + 1)
        return best


class TextWatch:
    """Secrets spelled out in decoded text, where :class:`Scrubber` cannot see them as bytes: a
    model's streamed output split over several events (``"sk-pr"`` in one delta, the rest in
    the next), or written with JSON escapes (``"\\u0073k-..."``).

    Feed it the text pieces of each event in order. :meth:`feed` counts the secrets the text
    completes; :attr:`holding` says the text ends in the first :data:`HOLD` or more characters
    of one, beyond its known public start (``sk-proj-``: every key of its kind starts so, no
    leak), so that the event should wait for the next to show whether a secret follows. Text
    rarely ends that way, so streaming is held up (by one event) only where a key may follow;
    at most ``HOLD - 1`` of a secret's first characters past its public start pass before it
    is recognised.
    """

    HOLD = 4

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_WATCHED}, key=len, reverse=True)
        self._known = {s: public_prefix(s) for s in self._secrets}  # its known public start
        self._public = {s: max(self._known[s], self.HOLD - 1) for s in self._secrets}
        self._keep = max((len(s) for s in self._secrets), default=1) - 1
        self._tails: dict[str, str] = {}  # per channel: choices, blocks, candidates interleave
        self._fields: dict[str, str] = {}  # per field at any position (see feed)
        # the channels (and fields) whose text ends in a secret's start: how many characters
        # of it past its public start
        self._holding: dict[str, int] = {}
        self._field_holding: dict[str, int] = {}
        self.holding = False
        self.overflowed = False
        """More than MAX_CHANNELS channels: text past that was not kept apart, nor watched."""

    @property
    def active(self) -> bool:
        return bool(self._secrets)

    @property
    def holding_at_end(self) -> bool:
        """At the stream's end: a channel's text ends in a secret's start (what follows the
        public start is not let out), or a field's ends in more than HOLD - 1 characters past
        it ([AT]: "...sk-proj-" in one choice and "a" in the next is no key, and the usual
        HOLD - 1 characters may pass)."""
        return bool(self._holding) or any(n >= self.HOLD for n in self._field_holding.values())

    def feed(self, pieces: Iterable[str | tuple[str, str]]) -> int:
        """Add one event's text pieces (``(channel, text)``, or text on the one channel).

        Each piece is also read on a channel of its field, whatever its position (the name
        after the channel's last dot, without indexes: ``b3.text`` and ``b0.text`` are both
        ``text``), in the order the pieces came: an SDK may join text the tracker named apart
        (a block started under one index and continued under another; a list item whose index
        it reads as another position, [AS]). Found there, a secret counts once with the
        channels' finds; held there, the event waits as for a channel (so that no more of a
        secret passes), but at the stream's end see :attr:`holding_at_end`. Fields do not
        count towards MAX_CHANNELS."""
        found = found_by_field = 0
        for piece in pieces:
            channel, text = piece if isinstance(piece, tuple) else ("", piece)
            if channel not in self._tails and len(self._tails) >= MAX_CHANNELS:
                self.overflowed = True  # bounded memory and work: the caller cuts the stream
                continue
            found += self._add(self._tails, self._holding, channel, text)
            found_by_field += self._add(self._fields, self._field_holding, _field(channel), text)
        found = max(found, found_by_field)
        self.holding = bool(self._holding) or bool(self._field_holding)
        return found

    def _add(self, tails: dict[str, str], holding: dict[str, int], channel: str, text: str) -> int:
        """``text`` after the channel's tail: the secrets it completes (replaced, so never
        counted twice), and whether it now ends in a secret's start."""
        found = 0
        text = tails.get(channel, "") + text
        for s in self._secrets:
            if s in text:
                found += text.count(s)
                text = text.replace(s, "\0")
        tail = tails[channel] = text[-self._keep :]
        past = self._past_public(tail)
        if past:
            holding[channel] = past
        else:
            holding.pop(channel, None)
        return found

    def _past_public(self, t: str) -> int:
        """When ``t`` ends in a secret's first characters, more than HOLD - 1 past its known
        public start (or than its public start): how many past the known start; else 0."""
        best = 0
        for s in self._secrets:
            start = s[: self._public[s] + 1]
            i = t.find(start, max(0, len(t) - (len(s) - 1)))
            while i != -1:
                if s.startswith(t[i:]):
                    best = max(best, len(t) - i - self._known[s])
                    break  # the leftmost is the longest
                i = t.find(start, i + 1)
        return best


def _whole(body: bytes, a: int, b: int) -> list[int]:
    """The span ``[a, b)`` of ``body`` widened to whole characters of UTF-8 and to the
    backslash of an escape it starts inside (``\\/``): what replaces it leaves valid UTF-8 and
    no dangling ``\\`` in a JSON string."""
    while a > 0 and 0x80 <= body[a] < 0xC0:
        a -= 1
    while b < len(body) and 0x80 <= body[b] < 0xC0:
        b += 1
    k = a
    while k > 0 and body[k - 1] == 0x5C:
        k -= 1
    if (a - k) % 2:  # an odd run of backslashes before it: the last escapes the span's start
        a -= 1
    return [a, b]
