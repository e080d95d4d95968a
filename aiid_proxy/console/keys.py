"""The console's keys, read from raw (cbreak) terminal input."""

from __future__ import annotations

_ESCAPES = {"\x1b[A": "up", "\x1b[B": "down", "\x1bOA": "up", "\x1bOB": "down"}
KEYS = frozenset({"a", "A", "d", "q", "j", "k", "up", "down"})


def parse_keys(data: bytes) -> list[str]:
    """Console key presses from raw (cbreak) terminal input; anything else is dropped."""
    text = data.decode("utf-8", "replace")
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\x1b":
            seq = text[i : i + 3]
            if seq in _ESCAPES:
                out.append(_ESCAPES[seq])
                i += 3
                continue
            # some other escape sequence: skip it up to its final byte
            j = i + 1
            if j < len(text) and text[j] in "[O":
                j += 1
                while j < len(text) and not ("@" <= text[j] <= "~"):
                    j += 1
            i = j + 1
            continue
        if text[i] in KEYS:
            out.append(text[i])
        i += 1
    return out
