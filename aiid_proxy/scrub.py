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
        out = self.feed(data)
        return out + self.flush()

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
        best = 0
        for n in self._needles:
            upto = min(len(n) - 1, len(data))
            for k in range(upto, best, -1):
                if data.endswith(n[:k]):
                    best = k
                    break
        return best
