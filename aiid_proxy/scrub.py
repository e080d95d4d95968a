"""Removing injected secrets from what flows back to the agent, streamed bodies included."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from typing import Any

REDACTED = b"[REDACTED]"
MIN_WATCHED = 8
"""Secrets shorter than this are scrubbed as bytes only: as text they would match words."""


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
        self.secrets = tuple(s for s in secrets if s)
        # longest first over every secret: one may be a prefix of another (the log's)
        self._needles = sorted(
            {v for s in self.secrets for v in _variants(s)}, key=len, reverse=True
        )
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
        spans = _merged(spans)
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


class TextWatch:
    """Secrets spelled out in decoded text, where :class:`Scrubber` cannot see them as bytes: a
    model's streamed output split over several events (``"sk-pr"`` in one delta, the rest in
    the next), or written with JSON escapes (``"\\u0073k-..."``).

    Feed it the text pieces of each event in order. :meth:`feed` counts the secrets the text
    completes; :attr:`holding` says the text ends in the first :data:`HOLD` or more characters
    of one, so that the event should wait for the next to show whether a secret follows. Text
    rarely ends that way, so streaming is held up (by one event) only where a key may follow;
    at most ``HOLD - 1`` of a secret's first characters pass before it is recognised.
    """

    HOLD = 4

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_WATCHED}, key=len, reverse=True)
        self._keep = max((len(s) for s in self._secrets), default=1) - 1
        self._tails: dict[str, str] = {}  # per channel: choices, blocks, candidates interleave
        self.holding = False

    @property
    def active(self) -> bool:
        return bool(self._secrets)

    def feed(self, pieces: Iterable[str | tuple[str, str]]) -> int:
        """Add one event's text pieces (``(channel, text)``, or text on the one channel)."""
        found = 0
        for piece in pieces:
            channel, text = piece if isinstance(piece, tuple) else ("", piece)
            if channel not in self._tails and len(self._tails) >= MAX_CHANNELS:
                channel = ""  # bounded work per event, whatever indexes a provider sends
            text = self._tails.get(channel, "") + text
            for s in self._secrets:
                if s in text:
                    found += text.count(s)
                    text = text.replace(s, "\0")
            self._tails[channel] = text[-self._keep :]
        self.holding = any(self._ends_in_a_prefix(t) for t in self._tails.values())
        return found

    def _ends_in_a_prefix(self, t: str) -> bool:
        for s in self._secrets:
            start = s[: self.HOLD]
            i = t.find(start, max(0, len(t) - (len(s) - 1)))
            while i != -1:
                if s.startswith(t[i:]):
                    return True
                i = t.find(start, i + 1)
        return False


_DATA_LINE = re.compile(rb"^data:[ ]?(.*?)\r?$", re.MULTILINE)


def escaped_secrets(blob: bytes, secrets: Iterable[str], *, sse: bool = False) -> int:
    """How many times the secrets occur in the strings of ``blob`` decoded as JSON (for ``sse``,
    the JSON of each ``data:`` line) that its bytes do not show: written with ``\\u`` escapes.
    Only a blob with such an escape is decoded; one that is not JSON counts 0."""
    watched = [s for s in secrets if len(s) >= MIN_WATCHED]
    if not watched or b"\\u" not in blob:
        return 0
    docs = [m.group(1) for m in _DATA_LINE.finditer(blob)] if sse else [blob]
    found = 0
    for doc in docs:
        if b"\\u" in doc:
            try:
                found += _count_in_strings(json.loads(doc), watched)
            except (ValueError, RecursionError):
                continue
    return found


def redact_escaped(body: bytes, secrets: Iterable[str]) -> tuple[bytes, int]:
    """A JSON body whose strings spell a secret with ``\\u`` escapes, re-encoded with the secret
    replaced (compact, UTF-8); any other body unchanged. Returns the body and the count."""
    watched = [s for s in secrets if len(s) >= MIN_WATCHED]
    if not watched or b"\\u" not in body:
        return body, 0
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body, 0
    try:
        found = _count_in_strings(doc, watched)
        if not found:
            return body, 0
        clean = _replace_in_strings(doc, watched)
    except RecursionError:  # too deep to walk: escaped_anywhere looks at it as text
        return body, 0
    return _dump_json(clean), found


def scrub_fragments_in_json(body: bytes, scrubber: Scrubber) -> bytes:
    """A JSON body whose strings hold a run of a secret only once decoded (``\\u`` escapes,
    ``\\/``), re-encoded with every such run replaced (:meth:`Scrubber.scrub_fragments` on each
    string); any other body unchanged."""
    if b"\\" not in body or not scrubber.secrets:
        return body
    budget = [SCAN_BUDGET]
    try:  # a duplicate key would hide all but its last value from the walk: not one document
        doc = json.loads(body, object_pairs_hook=_unique_pairs)
    except (ValueError, RecursionError):
        # not one JSON document (text, NDJSON, trailing bytes): undo the escapes as a reader
        # would; a run found then cannot be re-encoded away, so the body is withheld whole
        if body.count(b"\\u") > SCAN_BUDGET // 10:  # too many to undo in time
            scrubber.hits += 1
            return REDACTED
        text = _U_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), body.decode("latin-1"))
        # one byte a character (the key is ASCII): the scan's size cap sees the body's size
        plain = text.replace("\\/", "/").encode("latin-1", "replace")
        if plain != body and scrubber.scrub_fragments(plain, budget) is not plain:
            return REDACTED
        return body
    before = scrubber.hits
    cost = len(_anchors(scrubber.secrets))  # the searches a string of 12+ characters takes

    def walk(v: Any) -> Any:
        budget[0] -= 1  # every value visited counts: many small strings are work too
        if budget[0] < 0:
            scrubber.hits += 1
            raise _Withheld
        if isinstance(v, str):
            if len(v) < FRAGMENT:
                return v  # too short to hold a run
            budget[0] -= cost
            raw = v.encode("utf-8", "surrogatepass")
            clean = scrubber.scrub_fragments(raw, budget)
            if budget[0] < 0:  # withheld by the scan itself (counted there)
                raise _Withheld
            return v if clean is raw else clean.decode("utf-8", "surrogatepass")
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    try:
        clean = walk(doc)
    except RecursionError:  # nested as deep as the parser allows: not looked through, withheld
        scrubber.hits += 1
        return REDACTED
    except _Withheld:  # past the budget (the hit is counted where it ran out)
        return REDACTED
    if scrubber.hits == before:
        return body
    return _dump_json(clean)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


class _Withheld(Exception):
    """A JSON body's scan ran past its budget."""


_U_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _dump_json(doc: Any) -> bytes:
    """``doc`` as compact JSON, UTF-8; with ASCII escapes if it holds a lone surrogate (which
    UTF-8 cannot carry)."""
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(doc, separators=(",", ":")).encode()


def _count_in_strings(doc: Any, secrets: list[str]) -> int:
    found = 0
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            found += sum(x.count(s) for s in secrets)
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return found


def _replace_in_strings(doc: Any, secrets: list[str]) -> Any:
    if isinstance(doc, str):
        for s in secrets:
            doc = doc.replace(s, REDACTED.decode())
        return doc
    if isinstance(doc, dict):
        return {
            _replace_in_strings(k, secrets): _replace_in_strings(v, secrets) for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [_replace_in_strings(v, secrets) for v in doc]
    return doc


MAX_CHANNELS = 64
"""Interleaved texts (choices, blocks, candidates) a TextWatch keeps apart; more share one."""

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


_ESCAPE = re.compile(rb"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
# From an escape (aligned as _ESCAPE reads them: ``\\\\`` is one) up to the next quote or
# control character: the rest of a JSON string, escapes and all.
_ESCAPE_RUN = re.compile(
    rb'\\(?:u[0-9a-fA-F]{4}|.)(?:\\(?:u[0-9a-fA-F]{4}|.)|[^\\"\x00-\x1f]+)*', re.DOTALL
)


def _unescape_once(m: re.Match[bytes]) -> bytes:
    """One level of JSON string escapes, left to right (``\\\\u0073`` is ``\\u0073``)."""
    esc = m.group(1)
    if esc[:1] == b"u" and len(esc) == 5:
        return chr(int(esc[1:], 16)).encode("utf-8", "replace")
    return {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"b": b"\b", b"f": b"\f"}.get(esc, esc)


def _unescape_run(m: re.Match[bytes]) -> bytes:
    """The escapes of a run undone at once by the JSON decoder (a string of text in a
    non-Latin script, escaped, is one run: one call, not one a character); a run holding what
    JSON does not take (an escape it does not know, ``\\k``; bytes that are not UTF-8) one
    escape at a time. A surrogate pair is the character it encodes, as a reader sees it; a
    lone surrogate is ``?``."""
    run = m.group()
    try:
        text = json.loads(b'"' + run + b'"')
    except ValueError:
        return _ESCAPE.sub(_unescape_once, run)
    return str(text).encode("utf-8", "replace")


def escaped_anywhere(blob: bytes, secrets: Iterable[str]) -> bool:
    """A secret that shows once JSON escapes are undone, up to three levels deep (a JSON
    string holding JSON), without parsing: for bodies :func:`redact_escaped` cannot re-encode
    (NDJSON, nesting too deep to parse, escapes inside a string of JSON)."""
    watched = [s.encode() for s in secrets if len(s) >= MIN_WATCHED]
    if not watched or b"\\u" not in blob:  # no escape of any depth hides a secret otherwise
        return False
    view = blob
    for _ in range(3):
        if b"\\" not in view:
            break
        view = _ESCAPE_RUN.sub(_unescape_run, view)
        if any(w in view for w in watched):
            return True
    return False
