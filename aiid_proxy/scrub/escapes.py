"""Secrets that only show once JSON escapes are undone (``\\u0073k-...``): counted, re-encoded
away, or found as text in bodies that are not one JSON document."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from typing import Any

from aiid_proxy.scrub.fragments import FRAGMENT, REDACTED, SCAN_BUDGET, _anchors
from aiid_proxy.scrub.scrubber import MIN_WATCHED, Scrubber

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
    UTF-8 cannot carry). A number JSON cannot write (``1e999`` read as infinity) would come
    out as ``Infinity``, which is not JSON: such a body is withheld whole."""
    try:
        try:
            text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            return text.encode()
        except UnicodeEncodeError:
            return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        return REDACTED


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


_ESCAPE = re.compile(rb"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
_ONE = rb"(?>\\(?:u[0-9a-fA-F]{4}|.))"  # atomic: \u0041 is never \u then text
_GAP = rb'[^\\"\x00-\x1f]{0,16}+'
LONG_RUN = 4
"""Escapes that :func:`escaped_anywhere` undoes in one call of the JSON decoder: LONG_RUN or
more, each at most 16 characters from the next (escaped text in a non-Latin script: letters,
spaces, punctuation). Sparser or fewer escapes are undone one at a time, as a
decoder call (and its failure) would cost them more. The long branch never backtracks
(possessive, atomic) and gives up within LONG_RUN * 22 bytes: [AO] found a string of 7
escapes 1,000 characters apart re-read 128 ways (16 MiB: 5.8 s)."""
_ESCAPES = re.compile(
    rb"\\(?:(?P<run>(?>u[0-9a-fA-F]{4}|.)(?:"
    + _GAP
    + _ONE
    + rb"){%d}+(?:" % (LONG_RUN - 1)
    + _GAP
    + _ONE
    + rb")*+)|(?P<one>u[0-9a-fA-F]{4}|.))",
    re.DOTALL,
)  # aligned as _ESCAPE reads escapes (``\\\\`` is one); a literal start: searched fast.
# A run ends at its last dense escape ([AQ]: carried on to the quote, a few escapes before
# 16 MiB of plain text made the decoder and its check read all of it, three levels deep).
# Matches (from the start: ``match``) up to an escape JSON does not know (``\\k``,
# ``\\u12g4``), reading escapes aligned as _ESCAPE does; one pass, no backtracking.
_NOT_JSON = re.compile(rb'(?:\\["\\/bfnrt]|\\u[0-9a-fA-F]{4}|[^\\])*+\\', re.DOTALL)
_SIMPLE = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"b": b"\b", b"f": b"\f"}


def _undo(esc: bytes) -> bytes:
    """The escape ``\\`` + ``esc`` undone."""
    if esc[:1] == b"u" and len(esc) == 5:
        return chr(int(esc[1:], 16)).encode("utf-8", "replace")
    return _SIMPLE.get(esc, esc)


def _unescape_once(m: re.Match[bytes]) -> bytes:
    """One level of JSON string escapes, left to right (``\\\\u0073`` is ``\\u0073``)."""
    return _undo(m.group(1))


def _unescape(m: re.Match[bytes]) -> bytes:
    """An escape undone, or a long run of them by the JSON decoder; a run holding what JSON
    does not take (an escape it does not know, ``\\k``; bytes that are not UTF-8) one escape
    at a time. A surrogate pair in a run is the character it encodes, as a reader sees it; a
    lone surrogate is ``?``."""
    run = m.group("run")
    if run is None:
        return _undo(m.group("one"))
    run = b"\\" + run  # the match's first backslash, outside the group
    # ASCII with JSON's escapes only, else the decoder's failure would cost more than it saves
    if run.isascii() and _NOT_JSON.match(run) is None:
        with contextlib.suppress(ValueError):  # none known: one escape at a time then
            return str(json.loads(b'"' + run + b'"')).encode("utf-8", "replace")
    return _ESCAPE.sub(_unescape_once, run)


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
        view = _ESCAPES.sub(_unescape, view)
        if any(w in view for w in watched):
            return True
    return False
