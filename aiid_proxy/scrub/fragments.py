"""Pieces of a secret: every run of :data:`FRAGMENT` or more of its characters, found in text
(:class:`Fragments`) or, in any letter case, around aligned pieces in a body (:func:`_anchors`,
used by :meth:`~aiid_proxy.scrub.scrubber.Scrubber.scrub_fragments`); and the known public
starts of keys, which are no leak."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

REDACTED = b"[REDACTED]"

FRAGMENT = 12
"""Characters of a secret that, found anywhere together, count as the secret: a piece of a key
(all of it but its last character, say) is as good as the key to whoever reads it."""


_HEX_RUN = re.compile(f"[0-9A-Fa-f]{{{FRAGMENT}}}")


def _grams(texts: Iterable[str]) -> frozenset[str]:
    """Every run of FRAGMENT characters of ``texts``."""
    return frozenset(
        t[i : i + FRAGMENT]
        for t in texts
        if len(t) >= FRAGMENT
        for i in range(len(t) - FRAGMENT + 1)
    )


def _slid(text: str, grams: frozenset[str]) -> bool:
    """Whether a window of ``text`` is one of ``grams``."""
    return any(text[i : i + FRAGMENT] in grams for i in range(len(text) - FRAGMENT + 1))


_ANCHOR = FRAGMENT // 2
MAX_FRAGMENT_SCAN = 1 << 20
"""Bodies over 1 MiB are scrubbed of whole keys only: a provider quotes a key in an error, a
small body."""
SCAN_BUDGET = 200_000
"""Steps a fragment scan may take around the pieces it finds (~20 ms), over a whole body (all
the strings of a JSON one): past it, the body is withheld whole."""
PUBLIC_PREFIXES = (
    "sk-ant-api03-", "sk-ant-admin01-", "sk-proj-", "sk-svcacct-", "sk-admin-", "sk-or-v1-",
    "github_pat_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "glpat-", "xai-", "gsk_", "hf_",
    "pplx-", "r8_", "AIza", "sk-",
)  # fmt: skip
"""Starts that every key of a kind shares: a body naming one is no leak."""


def public_prefix(secret: str) -> int:
    """How many leading characters of ``secret`` every key of its kind shares: the longest of
    :data:`PUBLIC_PREFIXES` it starts with (``sk-ant-api03-`` 13, ``sk-proj-`` 8), else 0.
    Only known starts: the ``-`` and ``_`` of a base64url key are random."""
    return max((len(p) for p in PUBLIC_PREFIXES if secret.startswith(p)), default=0)


@functools.lru_cache(maxsize=256)
def _anchors(
    secrets: tuple[str, ...],
) -> tuple[tuple[bytes, tuple[tuple[bytes, int, int], ...]], ...]:
    """Each lower-cased piece ``s[6k:6k+6]`` of the secrets, with every (secret, offset, public
    prefix) it is found at: any run of FRAGMENT (12) characters of a secret holds a whole
    piece, so a text without any piece holds no run, and a run is found around its piece."""
    lowered = [(s.lower().encode("utf-8", "surrogateescape"), public_prefix(s)) for s in secrets]
    pieces = {
        t[i : i + _ANCHOR] for t, _ in lowered for i in range(0, len(t) - _ANCHOR + 1, _ANCHOR)
    }
    return tuple(
        (
            piece,
            tuple(
                (t, k, public)
                for t, public in lowered
                for k in range(len(t) - _ANCHOR + 1)
                if t[k : k + _ANCHOR] == piece
            ),
        )
        for piece in sorted(pieces)
    )


@functools.lru_cache(maxsize=256)  # a flow's scrubber asks for its key's on every response
def _fragments(secrets: tuple[str, ...]) -> Fragments:
    return Fragments(secrets)


class Fragments:
    """Every run of :data:`FRAGMENT` or more characters of the given secrets, in short text:
    log lines, error pages, response headers. (Bodies are scrubbed for whole secrets, their
    escapes and, in streams, their spelling over events: a scan of every body for fragments
    would cost every response its length in lookups.)"""

    def __init__(self, secrets: Iterable[str]) -> None:
        secrets = tuple(secrets)
        self._grams = _grams(secrets)
        self._few = len(self._grams) <= 64
        # and their hex, either case: h2 quotes a GOAWAY's debug data as hex, which a server
        # may fill with the key it was sent ("additional_data:62796520736b2d..."). Looked for
        # only in text with a run of hex digits that long: header values pay nothing.
        self._hex = _grams(h for s in secrets for h in (s.encode().hex(), s.encode().hex().upper()))

    def __bool__(self) -> bool:
        return bool(self._grams)

    def found(self, text: str) -> bool:
        if not self._grams or len(text) < FRAGMENT:
            return False
        if self._few:  # a handful of str.find: C speed over the text
            if any(g in text for g in self._grams):
                return True
        elif _slid(text, self._grams):
            return True
        return _HEX_RUN.search(text) is not None and _slid(text, self._hex)

    def redact(self, text: str) -> str:
        """``text`` with every run of fragments replaced by ``[REDACTED]``."""
        if not self.found(text):
            return text
        return _redacted(text, self.spans(text))

    def spans(self, text: str) -> list[list[int]]:
        """``[start, end)`` of every run of fragments in ``text``."""
        grams = self._grams | self._hex if _HEX_RUN.search(text) else self._grams
        spans: list[list[int]] = []
        for i in range(len(text) - FRAGMENT + 1):
            if text[i : i + FRAGMENT] in grams:
                if spans and i <= spans[-1][1]:
                    spans[-1][1] = i + FRAGMENT
                else:
                    spans.append([i, i + FRAGMENT])
        return spans


def _merged(spans: list[list[int]]) -> list[list[int]]:
    """Overlapping or touching ``[start, end)`` spans joined, in order."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _redacted(text: str, spans: list[list[int]]) -> str:
    out, pos = [], 0
    for a, b in spans:
        out += [text[pos:a], REDACTED.decode()]
        pos = b
    out.append(text[pos:])
    return "".join(out)
