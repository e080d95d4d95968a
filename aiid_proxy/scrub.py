"""Removing injected secrets from what flows back to the agent, streamed bodies included."""

from __future__ import annotations

from collections.abc import Iterable

REDACTED = b"[REDACTED]"


def _variants(secret: str) -> list[bytes]:
    raw = secret.encode()
    out = {raw, secret.replace("/", "\\/").encode()}
    return sorted((v for v in out if v), key=len, reverse=True)


class Scrubber:
    """Replaces every occurrence of the given secrets, also across chunk boundaries.

    Only the longest suffix of the pending data that could start a secret is held back, so an
    SSE event that ends in ``\\n\\n`` is released at once: streaming adds no latency.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self._needles = [v for s in secrets if s for v in _variants(s)]
        self._pending = b""
        self.hits = 0

    @property
    def active(self) -> bool:
        return bool(self._needles)

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
