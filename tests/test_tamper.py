"""Tamper suite: hypothesis-driven mutations of real audit databases, every one detected with
the first bad seq named; truncation below a checkpoint; a stolen audit key against exported,
signed checkpoints.

The fast part mutates in-memory row lists read from one real database (``verify_rows``); a
smaller part mutates copies of the real files (SQL and raw byte flips) through ``verify_db``.
The oracle is exact: the chain holds up to the first row that differs from the original, so
verification must fail AT that position (seq p+1), or at the smaller seq the row there claims
(a duplicate or a record moved back), or at len+1 for a truncation the anchor catches.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import math
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiid_proxy.audit import (
    COLUMNS,
    GENESIS_MAC,
    AuditLog,
    canonical_bytes,
    read_rows,
    tenant_key,
    verify_db,
    verify_rows,
)
from aiid_proxy.audit.signed import (
    CheckpointError,
    load_or_create_key,
    read_exported,
    sign_checkpoint,
)
from aiid_proxy.cli import main as cli_main

ROOT = bytes(range(32))
KEY = tenant_key(ROOT, "acme")
OTHER_KEY = tenant_key(ROOT, "other")
N_ROWS = 40
Row = dict[str, Any]

# Hypothesis examples per in-memory property test, and the mutated row lists ("cases") each
# example verifies: every column, every structural kind, every splice kind, every guessed key
# (hypothesis' per-example overhead, not verification, is what costs: ~1 ms an example).
EXAMPLES = {"flip": 420, "structure": 320, "splice": 220, "guessed_key": 160, "stacked": 500}
PER_EXAMPLE = {"flip": 16, "structure": 10, "splice": 5, "guessed_key": 7, "stacked": 1}
MEMORY_CASES = {k: EXAMPLES[k] * PER_EXAMPLE[k] for k in EXAMPLES}
FILE_CASES = {"sql": 200, "raw": 150}
STOLEN_KEY_CASES = 400
assert sum(MEMORY_CASES.values()) >= 10_000


def _records(tenant: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(N_ROWS):
        rid = f"req_{tenant}_{i:04d}"
        kind = i % 5
        if kind == 0:
            out.append(
                (
                    "request",
                    {
                        "request_id": rid,
                        "agent": f"support-{i % 3}",
                        "provider": "openai",
                        "model": "gpt-4o-mini",
                        "rule": "small-models",
                        "detail": {"method": "POST", "path": "/v1/chat/completions", "n": i},
                    },
                )
            )
        elif kind == 1:
            out.append(
                (
                    "response",
                    {
                        "request_id": rid,
                        "agent": "support-1",
                        "provider": "anthropic",
                        "model": "claude-3-5-haiku-latest",
                        "rule": "haiku",
                        "status": 200,
                        "input_tokens": 10 + i,
                        "output_tokens": 5,
                        "latency_ms": 12.345 + i,
                    },
                )
            )
        elif kind == 2:
            out.append(
                (
                    "deny",
                    {
                        "request_id": rid,
                        "agent": "coder-ü",
                        "provider": "openai",
                        "model": "gpt-4o",
                        "rule": "no-gpt-4o",
                        "status": 403,
                        "reason": "policy_denied: gpt-4o ✗ not allowed\nhere",
                        "detail": {"emoji": "🔒", "list": [1, 2, 3]},
                    },
                )
            )
        elif kind == 3:
            out.append(("policy", {"reason": f"policy {tenant}: loaded", "detail": {"ok": True}}))
        else:
            out.append(
                (
                    "error",
                    {
                        "request_id": rid,
                        "agent": "support-2",
                        "status": 502,
                        "reason": "upstream reset",
                        "latency_ms": 0.1 + 0.2,
                    },
                )
            )
    return out


@dataclass(frozen=True)
class Corpus:
    dir: Path
    db: Path
    vacuumed: Path  # the same records, rewritten compactly (no stale copies in free space)
    ckpt: Path
    other_db: Path
    rows: list[Row]
    other_rows: list[Row]
    head: tuple[int, str]


def _build(directory: Path, tenant: str) -> tuple[Path, Path, tuple[int, str]]:
    db = directory / f"{tenant}.db"
    ckpt = directory / f"{tenant}.ckpt"
    with AuditLog(db, tenant, ROOT, checkpoint_path=ckpt) as log:
        for event, fields in _records(tenant):
            log.append_sync(event, **fields)
        head = log.head()
    return db, ckpt, head


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    d = tmp_path_factory.mktemp("tamper")
    db, ckpt, head = _build(d, "acme")
    other_db, _, _ = _build(d, "other")
    rows = read_rows(db)
    assert verify_rows(rows, KEY, head).ok
    assert verify_db(db, KEY, ckpt).ok
    vacuumed = d / "vacuumed.db"
    conn = sqlite3.connect(db)
    try:
        conn.execute("VACUUM INTO ?", (str(vacuumed),))
    finally:
        conn.close()
    assert verify_db(vacuumed, KEY, ckpt).ok
    return Corpus(d, db, vacuumed, ckpt, other_db, rows, read_rows(other_db), head)


# -- mutations of single values ("flip any byte of any column") ----------------------------
def flip_value(value: object, pos: int, bit: int) -> object:
    """Flip one bit of the value's stored representation (never returns an equal value)."""
    if isinstance(value, bool):  # pragma: no cover - SQLite has no booleans
        raise TypeError
    if isinstance(value, int):
        raw = bytearray(struct.pack("<q", value))
        raw[pos % 8] ^= 1 << bit
        return struct.unpack("<q", bytes(raw))[0]
    if isinstance(value, float):
        raw = bytearray(struct.pack("<d", value))
        raw[pos % 8] ^= 1 << bit
        return struct.unpack("<d", bytes(raw))[0]
    if isinstance(value, str):
        raw = bytearray(value.encode("utf-8", "surrogateescape"))  # may be flipped already
        if not raw:
            return chr(0x20 + bit)
        raw[pos % len(raw)] ^= 1 << bit
        # As the verifier's exact path reads TEXT that is no longer valid UTF-8.
        return bytes(raw).decode("utf-8", "surrogateescape")
    if value is None:
        return [0, "", 0.0, "null", -1, "0", " ", "None"][bit]
    raise TypeError(type(value))


def retype_value(value: object, choice: int) -> object:
    """The "same" value under another type: 5 -> "5" / 5.0, "5" -> 5, None -> "" ..."""
    if value is None:
        return ["", 0, "null"][choice % 3]
    if isinstance(value, int):
        return [str(value), float(value), None][choice % 3]
    if isinstance(value, float):
        return [repr(value), int(value) if math.isfinite(value) else 0, None][choice % 3]
    if isinstance(value, str):
        return [value.encode(), None, value + "\0"][choice % 3]
    raise TypeError(type(value))


def same_value(a: object, b: object) -> bool:
    return type(a) is type(b) and (a == b or (a != a and b != b))


def same_row(a: Row, b: Row) -> bool:
    if a != b:  # the common case, decided in C
        return False
    return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)


def expected_first_bad(orig: list[Row], mutated: list[Row]) -> int | None:
    """Where the verifier must stop (see the module docstring); None if nothing changed."""
    n = min(len(orig), len(mutated))
    p = next((i for i in range(n) if not same_row(orig[i], mutated[i])), None)
    if p is None:
        if len(mutated) == len(orig):
            return None
        if len(mutated) < len(orig):
            return len(mutated) + 1  # truncated: only the anchor (expected head) sees it
        p = len(orig)
    seq = mutated[p].get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq <= p:
        return seq  # a duplicate or a record moved back is named by its own seq
    return p + 1


def first_difference(orig: list[Row], mutated: list[Row]) -> int | None:
    n = min(len(orig), len(mutated))
    p = next((i for i in range(n) if not same_row(orig[i], mutated[i])), None)
    if p is None and len(mutated) != len(orig):
        p = n
    return p


def check(orig: list[Row], mutated: list[Row], head: tuple[int, str], what: str = "") -> None:
    want = expected_first_bad(orig, mutated)
    assert want is not None, f"{what}: mutation changed nothing"
    res = verify_rows(mutated, KEY, head)
    assert not res.ok, f"{what}: undetected mutation (want seq {want})"
    assert res.first_bad_seq == want, (what, res.first_bad_seq, want, res.reason)
    assert res.count == first_difference(orig, mutated), what  # all before it verified


def remac(rows: list[Row], start: int, key: bytes) -> None:
    """Rewrite prev_mac/mac from index ``start`` on, as an attacker holding ``key`` would."""
    prev = rows[start - 1]["mac"] if start > 0 else GENESIS_MAC
    for r in rows[start:]:
        r["prev_mac"] = prev
        data = bytes.fromhex(prev) + canonical_bytes(r) if _is_hex(prev) else b""
        r["mac"] = hmac.new(key, data, hashlib.sha256).hexdigest()
        prev = r["mac"]


def _is_hex(s: object) -> bool:
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def renumber(rows: list[Row], start: int) -> None:
    for i in range(start, len(rows)):
        rows[i]["seq"] = i + 1


def copy_rows(rows: list[Row]) -> list[Row]:
    return [dict(r) for r in rows]


GUESSED_KEYS: list[Callable[[], bytes]] = [
    lambda: os.urandom(32),
    lambda: ROOT,  # the root key instead of the derived tenant key
    lambda: OTHER_KEY,  # another tenant's key
    lambda: tenant_key(ROOT[::-1], "acme"),
    lambda: bytes([KEY[0] ^ 1]) + KEY[1:],  # one bit off
    lambda: b"",
    lambda: hashlib.sha256(b"acme").digest(),
]

MEMSETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def _count(store: dict[str, int], name: str, n: int = 1) -> None:
    store[name] = store.get(name, 0) + n


RAN: dict[str, int] = {}


# -- the in-memory property tests ------------------------------------------------------------
@settings(max_examples=EXAMPLES["flip"], **MEMSETTINGS)
@given(
    idx=st.integers(0, N_ROWS - 1),
    pos=st.integers(0, 200),
    bit=st.integers(0, 7),
    retype=st.integers(0, 5),
)
def test_flip_any_byte_of_any_column(
    corpus: Corpus, idx: int, pos: int, bit: int, retype: int
) -> None:
    """One bit of the stored value flipped (or its type changed), in each column in turn."""
    for col in COLUMNS:
        rows = copy_rows(corpus.rows)
        value = rows[idx][col]
        if retype < 3 or value is None:
            rows[idx][col] = flip_value(value, pos, bit)
        else:
            rows[idx][col] = retype_value(value, retype)
        check(corpus.rows, rows, corpus.head, col)
    _count(RAN, "flip", len(COLUMNS))


STRUCTURE = [
    "delete",
    "delete_renumber",
    "insert",
    "insert_renumber",
    "duplicate",
    "swap",
    "move",
    "truncate",
    "append",
    "reverse_range",
]


def apply_structure(rows: list[Row], kind: str, i: int, j: int, key: bytes) -> list[Row]:
    n = len(rows)
    i, j = i % max(n, 1), j % max(n, 1)
    if kind in ("delete", "delete_renumber") and n:
        del rows[i]
        if kind == "delete_renumber":
            renumber(rows, i)
            remac(rows, i, key)
    elif kind in ("insert", "insert_renumber"):
        forged = dict(rows[j]) if n else {c: None for c in COLUMNS}
        forged["model"] = "gpt-4o-forged"
        forged["seq"] = i + 1
        rows.insert(i, forged)
        if kind == "insert_renumber":
            renumber(rows, i)
        remac(rows, i, key)
    elif kind == "duplicate" and n:
        rows.insert(i + 1, dict(rows[i]))
    elif kind == "swap" and n > 1:
        if i == j:
            j = (i + 1) % n
        rows[i], rows[j] = rows[j], rows[i]
    elif kind == "move" and n > 1:
        r = rows.pop(i)
        if j == i:
            j = (i + 1) % n
        rows.insert(j, r)
    elif kind == "truncate":
        del rows[i:]
    elif kind == "append":
        extra = dict(rows[-1]) if n else {c: None for c in COLUMNS}
        extra["seq"] = n + 1
        extra["event"] = "request"
        rows.append(extra)
        remac(rows, n, key)
    elif kind == "reverse_range" and n > 1:
        a, b = sorted((i, j))
        if a == b:
            b = min(n - 1, a + 1) if a + 1 < n else a
            a = b - 1
        rows[a : b + 1] = rows[a : b + 1][::-1]
    return rows


@settings(max_examples=EXAMPLES["structure"], **MEMSETTINGS)
@given(
    i=st.integers(0, N_ROWS),
    j=st.integers(0, N_ROWS),
    guess=st.integers(0, len(GUESSED_KEYS) - 1),
)
def test_delete_insert_duplicate_reorder_truncate(
    corpus: Corpus, i: int, j: int, guess: int
) -> None:
    """Each structural kind in turn at the same positions (forged rows MACed with a guess)."""
    for kind in STRUCTURE:
        rows = apply_structure(copy_rows(corpus.rows), kind, i, j, GUESSED_KEYS[guess]())
        check(corpus.rows, rows, corpus.head, kind)
    _count(RAN, "structure", len(STRUCTURE))


SPLICES = ["row", "range", "whole", "prefix", "tail"]


@settings(max_examples=EXAMPLES["splice"], **MEMSETTINGS)
@given(i=st.integers(0, N_ROWS - 1), length=st.integers(1, N_ROWS))
def test_splice_rows_from_another_tenant(corpus: Corpus, i: int, length: int) -> None:
    for kind in SPLICES:
        rows = copy_rows(corpus.rows)
        other = copy_rows(corpus.other_rows)
        if kind == "row":  # the other tenant's record with the same seq
            rows[i] = other[i]
        elif kind == "range":
            rows[i : i + length] = other[i : i + length]
        elif kind == "whole":
            rows = other
        elif kind == "prefix":  # their first records, then ours: the chain must not continue
            rows[:length] = other[:length]
        else:  # our records, then theirs from that seq on
            rows[i:] = other[i:]
        check(corpus.rows, rows, corpus.head, kind)
    _count(RAN, "splice", len(SPLICES))


@settings(max_examples=EXAMPLES["guessed_key"], **MEMSETTINGS)
@given(
    i=st.integers(0, N_ROWS - 1),
    col=st.sampled_from([c for c in COLUMNS if c not in ("seq", "prev_mac", "mac")]),
    edit=st.booleans(),
    drop=st.integers(0, 3),
)
def test_rebuild_the_tail_with_a_guessed_key(
    corpus: Corpus, i: int, col: str, edit: bool, drop: int
) -> None:
    """Edit a record (or not), drop some after it, renumber and re-MAC the rest with each
    guessed key (not the tenant's): detected at the first rewritten record."""
    for guess in GUESSED_KEYS:
        rows = copy_rows(corpus.rows)
        if edit:
            rows[i][col] = retype_value(rows[i][col], 1) if rows[i][col] is None else None
        del rows[i + 1 : i + 1 + drop]
        renumber(rows, i)
        key = guess()
        assert key != KEY
        remac(rows, i, key)
        check(corpus.rows, rows, corpus.head, f"key {key.hex()[:8]}")
    _count(RAN, "guessed_key", len(GUESSED_KEYS))


@settings(max_examples=EXAMPLES["stacked"], **MEMSETTINGS)
@given(data=st.data())
def test_stacked_mutations(corpus: Corpus, data: st.DataObject) -> None:
    rows = copy_rows(corpus.rows)
    for _ in range(data.draw(st.integers(2, 4))):
        what = data.draw(st.sampled_from(["flip", "structure", "splice"]))
        if what == "flip" and rows:
            idx = data.draw(st.integers(0, len(rows) - 1))
            col = data.draw(st.sampled_from(COLUMNS))
            rows[idx][col] = flip_value(rows[idx][col], data.draw(st.integers(0, 99)), 3)
        elif what == "structure":
            kind = data.draw(st.sampled_from(STRUCTURE))
            i, j = data.draw(st.integers(0, N_ROWS)), data.draw(st.integers(0, N_ROWS))
            rows = apply_structure(rows, kind, i, j, os.urandom(32))
        elif rows:
            i = data.draw(st.integers(0, min(len(rows), N_ROWS) - 1))
            rows[i] = dict(corpus.other_rows[i])
    if expected_first_bad(corpus.rows, rows) is None:  # e.g. swapped twice back
        assert verify_rows(rows, KEY, corpus.head).ok
    else:
        check(corpus.rows, rows, corpus.head)
    _count(RAN, "stacked")


def test_zz_every_quota_ran() -> None:
    """Every property test that ran in this process ran its full quota (under xdist the
    others ran, and were checked, in the other worker)."""
    quotas = {**MEMORY_CASES, **FILE_CASES}
    print(f"tamper cases run in this process: {RAN} (total {sum(RAN.values())})")
    for name, done in RAN.items():
        assert done >= quotas[name], (name, done)


# -- real files through verify_db ------------------------------------------------------------
def _sql_rows(db: Path) -> list[Row]:
    """The table as the verifier's exact path reads it (BLOBs stay bytes)."""
    conn = sqlite3.connect(db)
    conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
    try:
        cols = ", ".join(COLUMNS)
        return [
            dict(zip(COLUMNS, r)) for r in conn.execute(f"SELECT {cols} FROM audit ORDER BY seq")
        ]
    finally:
        conn.close()


def _fresh_copy(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.iterdir():
        p.unlink()
    db = dest / "a.db"
    shutil.copyfile(source, db)
    return db


SQL_KINDS = [
    "update_text",
    "update_blob",
    "update_invalid_text",
    "update_int",
    "delete",
    "swap_seq",
    "truncate",
    "replace_other",
    "rebuild_guessed",
    "insert_tail",
    "insert_head",
    "move_below",
]


@settings(max_examples=FILE_CASES["sql"], **MEMSETTINGS)
@given(
    kind=st.sampled_from(SQL_KINDS),
    seq=st.integers(1, N_ROWS),
    seq2=st.integers(1, N_ROWS),
    col=st.sampled_from(COLUMNS[1:]),
    pos=st.integers(0, 100),
    bit=st.integers(0, 7),
)
def test_sql_mutations_of_real_files(
    corpus: Corpus,
    kind: str,
    seq: int,
    seq2: int,
    col: str,
    pos: int,
    bit: int,
) -> None:
    db = _fresh_copy(corpus.db, corpus.dir / f"sql-{os.getpid()}")
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        cur = conn.execute(f"SELECT {col} FROM audit WHERE seq = ?", (seq,)).fetchone()[0]
        if kind == "update_text":
            new = flip_value(cur if isinstance(cur, str) else str(cur), pos, bit)
            if isinstance(new, str) and new.encode("utf-8", "surrogateescape") != new.encode(
                "utf-8", "replace"
            ):
                new = new.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            conn.execute(f"UPDATE audit SET {col} = ? WHERE seq = ?", (new, seq))
        elif kind == "update_blob":
            raw = (cur if isinstance(cur, str) else str(cur)).encode()
            conn.execute(f"UPDATE audit SET {col} = ? WHERE seq = ?", (raw + b"\x00", seq))
        elif kind == "update_invalid_text":
            raw = bytearray((cur if isinstance(cur, str) else str(cur) or "x").encode() or b"x")
            raw[pos % len(raw)] = 0xFF
            conn.execute(
                f"UPDATE audit SET {col} = CAST(? AS TEXT) WHERE seq = ?", (bytes(raw), seq)
            )
        elif kind == "update_int":
            conn.execute(f"UPDATE audit SET {col} = ? WHERE seq = ?", (1 << bit, seq))
            if cur == 1 << bit:
                conn.execute(f"UPDATE audit SET {col} = ? WHERE seq = ?", (-1, seq))
        elif kind == "delete":
            conn.execute("DELETE FROM audit WHERE seq = ?", (seq,))
        elif kind == "swap_seq":
            b = seq2 if seq2 != seq else seq % N_ROWS + 1
            conn.execute("UPDATE audit SET seq = -7 WHERE seq = ?", (seq,))
            conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (seq, b))
            conn.execute("UPDATE audit SET seq = ? WHERE seq = -7", (b,))
        elif kind == "truncate":
            conn.execute("DELETE FROM audit WHERE seq >= ?", (seq,))
        elif kind == "replace_other":
            conn.execute("ATTACH DATABASE ? AS o", (str(corpus.other_db),))
            conn.execute("DELETE FROM audit WHERE seq BETWEEN ? AND ?", (seq, max(seq, seq2)))
            conn.execute(
                "INSERT INTO audit SELECT * FROM o.audit WHERE seq BETWEEN ? AND ?",
                (seq, max(seq, seq2)),
            )
        elif kind == "rebuild_guessed":
            rows = _sql_rows(db)
            rows[seq - 1]["model"] = "forged"
            remac(rows, seq - 1, GUESSED_KEYS[bit % len(GUESSED_KEYS)]())
            for r in rows[seq - 1 :]:
                conn.execute(
                    "UPDATE audit SET model = ?, prev_mac = ?, mac = ? WHERE seq = ?",
                    (r["model"], r["prev_mac"], r["mac"], r["seq"]),
                )
        elif kind == "insert_head":  # a copy numbered before seq 1 (0 or below)
            conn.execute(
                f"INSERT INTO audit SELECT -?, {', '.join(COLUMNS[1:])} FROM audit WHERE seq = ?",
                (pos, seq),
            )
        elif kind == "move_below":  # a record renumbered out of the chain's range
            conn.execute("UPDATE audit SET seq = -? WHERE seq = ?", (pos, seq))
        else:  # insert_tail: a forged record after the head
            rows = _sql_rows(db)
            extra = dict(rows[-1], seq=N_ROWS + 1, event="request")
            rows.append(extra)
            remac(rows, N_ROWS, os.urandom(32))
            conn.execute(
                f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 16)})",
                [rows[-1][c] for c in COLUMNS],
            )
    finally:
        conn.close()
    mutated = _sql_rows(db)
    want = expected_first_bad(corpus.rows, mutated)
    res = verify_db(db, KEY, checkpoint_path=corpus.ckpt)
    if want is None:  # e.g. an UPDATE that wrote back the same value
        assert res.ok
    else:
        assert not res.ok, (kind, seq, col)
        assert res.first_bad_seq == want, (kind, seq, col, res.reason, want)
    _count(RAN, "sql")


@settings(max_examples=FILE_CASES["raw"], **MEMSETTINGS)
@given(
    seq=st.integers(1, N_ROWS),
    which=st.integers(0, 1),
    pos=st.integers(0, 63),
    bit=st.integers(0, 7),
)
def test_raw_byte_flips_in_the_file(
    corpus: Corpus, seq: int, which: int, pos: int, bit: int
) -> None:
    """Flip one bit of a stored mac (as the record's mac or as the next one's prev_mac)
    directly in the database file, no SQL involved."""
    db = _fresh_copy(corpus.vacuumed, corpus.dir / f"raw-{os.getpid()}")
    data = bytearray(db.read_bytes())
    needle = corpus.rows[seq - 1]["mac"].encode()
    hits = []
    start = 0
    while (k := data.find(needle, start)) >= 0:
        hits.append(k)
        start = k + 1
    assert len(hits) == (1 if seq == N_ROWS else 2), len(hits)
    at = hits[which % len(hits)]
    data[at + pos] ^= 1 << bit
    db.write_bytes(bytes(data))
    try:
        res = verify_db(db, KEY, checkpoint_path=corpus.ckpt)
    except Exception as e:  # a flip that breaks SQLite's own structure is detected too
        pytest.fail(f"verify_db raised {e!r}")
    assert not res.ok
    assert res.first_bad_seq in (seq, seq + 1), res.reason
    _count(RAN, "raw")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("'forged'", id="text"),
        pytest.param("X'00'", id="blob-the-fast-rendering-cannot-take"),
    ],
)
@pytest.mark.parametrize("seq", [pytest.param(0, id="seq-0"), pytest.param(-5, id="negative")])
def test_a_record_numbered_below_1_is_named(
    corpus: Corpus, tmp_path: Path, value: str, seq: int
) -> None:
    # The fast pass reads from the lowest seq, and when it hands over to the exact pass before
    # any row verified, that pass starts there too (it used to resume "after seq 0").
    db = tmp_path / "a.db"
    shutil.copyfile(corpus.db, db)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            f"INSERT INTO audit SELECT ?, {', '.join(COLUMNS[1:6])}, {value}, "
            f"{', '.join(COLUMNS[7:])} FROM audit WHERE seq = 3",
            (seq,),
        )
    conn.close()
    res = verify_db(db, KEY, checkpoint_path=corpus.ckpt)
    assert (res.ok, res.first_bad_seq, res.count) == (False, 1, 0), res.reason
    assert f"invalid seq {seq}" in res.reason


def test_a_record_without_a_seq_is_named(corpus: Corpus, tmp_path: Path) -> None:
    # Rebuilt with "seq INTEGER PRIMARY KEY DESC", seq is no longer the rowid and may be NULL:
    # table_info cannot tell, `seq >= ?` skips the row. The table counts as altered and takes
    # the exact pass in rowid order, which names the row.
    db = tmp_path / "a.db"
    shutil.copyfile(corpus.db, db)
    conn = sqlite3.connect(db, isolation_level=None)
    cols = ", ".join(COLUMNS)
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'audit'").fetchone()[0]
    conn.execute("ALTER TABLE audit RENAME TO old")
    conn.execute(sql.replace("seq INTEGER PRIMARY KEY", "seq INTEGER PRIMARY KEY DESC"))
    conn.execute(f"INSERT INTO audit ({cols}) SELECT {cols} FROM old ORDER BY seq")
    conn.execute(
        f"INSERT INTO audit ({cols}) SELECT NULL, {', '.join(COLUMNS[1:])} FROM old WHERE seq = 3"
    )
    conn.execute("DROP TABLE old")
    conn.close()
    res = verify_db(db, KEY, checkpoint_path=corpus.ckpt)
    assert not res.ok
    assert (res.first_bad_seq, res.count) == (N_ROWS + 1, N_ROWS), res.reason
    assert "malformed seq" in res.reason


# -- truncation below the last checkpoint (real file + checkpoint file) --------------------
def test_truncation_below_the_last_checkpoint_is_detected(corpus: Corpus, tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    shutil.copyfile(corpus.db, db)
    ckpt = tmp_path / "ckpt"
    mac20 = corpus.rows[19]["mac"]
    ckpt.write_text(f"10:{corpus.rows[9]['mac']}\n20:{mac20}\n")
    assert verify_db(db, KEY, ckpt).ok
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM audit WHERE seq > 25")
    conn.close()
    res = verify_db(db, KEY, ckpt)
    assert res.ok and res.count == 25  # above the last checkpoint: only an anchor sees it
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM audit WHERE seq > 15")
    conn.close()
    res = verify_db(db, KEY, ckpt)
    assert (res.ok, res.first_bad_seq, res.count) == (False, 16, 15)
    assert "checkpoint line 2 records seq 20" in res.reason
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM audit")
    conn.close()
    res = verify_db(db, KEY, ckpt)
    assert (res.ok, res.first_bad_seq) == (False, 1)
    # The checkpoint the writer itself keeps (runtime/checkpoints/<t>) catches it too.
    db.unlink()
    shutil.copyfile(corpus.db, db)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(f"DELETE FROM audit WHERE seq > {N_ROWS - 1}")
    conn.close()
    res = verify_db(db, KEY, corpus.ckpt)
    assert (res.ok, res.first_bad_seq) == (False, N_ROWS)


# -- a stolen audit key against exported checkpoints -----------------------------------------
@settings(max_examples=STOLEN_KEY_CASES, **MEMSETTINGS)
@given(
    exported=st.integers(1, N_ROWS),
    edit=st.integers(1, N_ROWS),
    col=st.sampled_from([c for c in COLUMNS if c not in ("seq", "prev_mac", "mac")]),
    truncate=st.booleans(),
)
def test_stolen_key_rewrite_is_caught_by_the_exported_head(
    corpus: Corpus, exported: int, edit: int, col: str, truncate: bool
) -> None:
    """With the real tenant key an attacker edits record ``edit`` and re-MACs everything
    after it (or drops the tail): the chain alone verifies, but not against a head exported
    at seq ``exported`` >= ``edit``, which fails exactly at that seq."""
    anchor = (exported, corpus.rows[exported - 1]["mac"])
    rows = copy_rows(corpus.rows)
    if truncate:
        del rows[edit - 1 :]
    else:
        rows[edit - 1][col] = "rewritten" if rows[edit - 1][col] != "rewritten" else None
        remac(rows, edit - 1, KEY)
    assert verify_rows(rows, KEY).ok  # the thief's chain is self-consistent
    res = verify_rows(rows, KEY, anchor)
    if edit <= exported:
        assert not res.ok
        assert res.first_bad_seq == (edit if truncate else exported), res.reason
    else:  # after the last export: not protected (documented)
        assert res.ok


def _aiid(
    home: Path, *args: str, check: bool = True, real: bool = False
) -> subprocess.CompletedProcess[str]:
    """`aiid --home HOME ARGS...`: the CLI's main() in-process (fast), or the real console
    script in a subprocess with ``real=True``."""
    argv = ["--home", str(home), *args]
    if real:
        env = {k: v for k, v in os.environ.items() if k != "AIID_AUDIT_KEY"}
        p = subprocess.run(
            [str(Path(sys.executable).parent / "aiid"), *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    else:
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        p = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check and p.returncode != 0:
        raise AssertionError(f"aiid {args} -> {p.returncode}: {p.stdout} {p.stderr}")
    return p


def _thief_rewrites(home: Path, tenant: str, seq: int, start_fresh_ckpt: bool = True) -> None:
    """Everything an attacker holding runtime/ can do: read the audit key, edit record
    ``seq``, re-MAC the rest of the chain and rewrite runtime/checkpoints/<t> to match."""
    root = base64.b64decode((home / "runtime" / "audit.key").read_text().strip())
    key = tenant_key(root, tenant)
    db = home / "tenants" / tenant / "audit.db"
    rows = _sql_rows(db)
    rows[seq - 1]["model"] = "innocent-model"
    rows[seq - 1]["reason"] = None
    remac(rows, seq - 1, key)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for r in rows[seq - 1 :]:
            conn.execute(
                "UPDATE audit SET model = ?, reason = ?, prev_mac = ?, mac = ? WHERE seq = ?",
                (r["model"], r["reason"], r["prev_mac"], r["mac"], r["seq"]),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()
    if start_fresh_ckpt:
        (home / "runtime" / "checkpoints" / tenant).write_text(
            "".join(f"{r['seq']}:{r['mac']}\n" for r in rows[::7])
        )


def _write_records(home: Path, tenant: str, n: int) -> tuple[int, str]:
    root = base64.b64decode((home / "runtime" / "audit.key").read_text().strip())
    with AuditLog(
        home / "tenants" / tenant / "audit.db",
        tenant,
        root,
        checkpoint_path=home / "runtime" / "checkpoints" / tenant,
    ) as log:
        for i in range(n):
            log.append_sync("request", request_id=f"r{i}", model="gpt-4o", reason="denied!")
        return log.head()


def test_stolen_audit_key_cannot_rewrite_history_before_an_exported_checkpoint(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    _aiid(home, "init")
    _aiid(home, "tenant", "add", "acme")
    _write_records(home, "acme", 30)
    out = _aiid(home, "audit", "checkpoint", "acme", "--out", str(tmp_path / "exported"))
    line = out.stdout.strip()
    assert line.startswith("aiid-checkpoint/1 acme 30:")
    _write_records(home, "acme", 10)  # seq 31..40, after the export
    assert _aiid(home, "audit", "verify", "acme").stdout.startswith("OK 40 records")
    # the same checkpoint in admin/checkpoints and in the exported file: counted once; on
    # stderr ([AL]): stdout is exactly the contract's `OK <n> records`
    out = _aiid(home, "audit", "verify", "acme", "--checkpoint", str(tmp_path / "exported"))
    assert "reached 1 exported checkpoint(s) (1 signed), the latest at seq 30" in out.stderr
    assert out.stdout == "OK 40 records\n"

    # The thief edits record 5 and re-MACs 5..40 with the stolen key; runtime/ is theirs.
    _thief_rewrites(home, "acme", 5)
    admin_copy = home / "admin" / "checkpoints" / "acme"
    assert admin_copy.exists()
    p = _aiid(home, "audit", "verify", "acme", check=False)  # admin/ copy still there
    assert p.returncode == 1 and "FAILED at seq 30" in p.stdout, p.stdout
    admin_copy.unlink()  # even if they could remove the copy in admin/ ...
    p = _aiid(home, "audit", "verify", "acme", check=False)
    assert p.returncode == 0 and p.stdout.startswith("OK 40"), p.stdout  # chain alone: fooled
    # ... the exported line, kept elsewhere, names the rewrite.
    p = _aiid(
        home,
        "audit",
        "verify",
        "acme",
        "--checkpoint",
        str(tmp_path / "exported"),
        check=False,
        real=True,  # the installed `aiid`, its exit status and output
    )
    assert p.returncode == 1, p.stdout
    assert (
        "FAILED at seq 30: mac at seq 30 differs from signed checkpoint file exported" in p.stdout
    )
    # So does the plain SEQ:MAC form of the same head.
    seq_mac = line.split()[2]
    p = _aiid(home, "audit", "verify", "acme", "--expect-head", seq_mac, check=False)
    assert p.returncode == 1 and "FAILED at seq 30" in p.stdout

    # They cannot make a matching checkpoint: editing the line breaks its signature ...
    new_mac = _sql_rows(home / "tenants" / "acme" / "audit.db")[29]["mac"]
    forged = tmp_path / "forged"
    forged.write_text(line.replace(seq_mac, f"30:{new_mac}") + "\n")
    p = _aiid(home, "audit", "verify", "acme", "--checkpoint", str(forged), check=False)
    assert p.returncode == 1 and "signature invalid" in p.stdout
    # ... and a line signed with their own key is refused the same way.
    own_key, _ = load_or_create_key(tmp_path / "thief.key", tmp_path / "thief.pub")
    theirs = sign_checkpoint(own_key, "acme", (30, new_mac)).line()
    forged.write_text(theirs + "\n")
    p = _aiid(home, "audit", "verify", "acme", "--checkpoint", str(forged), check=False)
    assert p.returncode == 1 and "signature invalid" in p.stdout
    # Unless the verifier is handed the thief's public key: the key is the trust root.
    p = _aiid(
        home,
        "audit",
        "verify",
        "acme",
        "--checkpoint",
        str(forged),
        "--checkpoint-key",
        str(tmp_path / "thief.pub"),
        check=False,
    )
    assert p.returncode == 0


def test_truncation_below_an_exported_checkpoint_and_other_tenants_lines(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _aiid(home, "init")
    _aiid(home, "tenant", "add", "acme")
    _aiid(home, "tenant", "add", "other")
    _write_records(home, "acme", 12)
    _write_records(home, "other", 12)
    exported = tmp_path / "exported"
    _aiid(home, "audit", "checkpoint", "acme", "--out", str(exported))
    other_line = _aiid(home, "audit", "checkpoint", "other").stdout.strip()
    # Truncate acme below its export, and its runtime checkpoint file with it.
    conn = sqlite3.connect(home / "tenants" / "acme" / "audit.db")
    with conn:
        conn.execute("DELETE FROM audit WHERE seq > 8")
    conn.close()
    (home / "runtime" / "checkpoints" / "acme").unlink()
    (home / "admin" / "checkpoints" / "acme").unlink()
    p = _aiid(home, "audit", "verify", "acme", "--checkpoint", str(exported), check=False)
    assert p.returncode == 1
    assert "FAILED at seq 9: log ends at seq 8 but signed checkpoint file exported" in p.stdout
    # A genuine, signed line for another tenant is no anchor for this one.
    mixed = tmp_path / "mixed"
    mixed.write_text(other_line + "\n")
    p = _aiid(home, "audit", "verify", "acme", "--checkpoint", str(mixed), check=False)
    assert p.returncode == 1 and "is for tenant 'other', not 'acme'" in p.stdout
    # A broken chain is never signed.
    p = _aiid(home, "audit", "checkpoint", "acme", check=False)
    assert p.returncode == 0  # truncation with every anchor removed: nothing left to see
    conn = sqlite3.connect(home / "tenants" / "acme" / "audit.db")
    with conn:
        conn.execute("UPDATE audit SET model = 'x' WHERE seq = 3")
    conn.close()
    p = _aiid(home, "audit", "checkpoint", "acme", check=False)
    assert p.returncode == 1 and "FAILED at seq 3" in p.stdout and "nothing signed" in p.stdout


def test_read_exported_rejects_malformed_lines(tmp_path: Path) -> None:
    key, _ = load_or_create_key(tmp_path / "k", tmp_path / "k.pub")
    good = sign_checkpoint(key, "acme", (3, "ab" * 32)).line()
    f = tmp_path / "f"
    for text, why in [
        (good[:-10] + ("B" if good[-10] != "B" else "C") + good[-9:], "signature invalid"),
        (good.replace("acme", "acmf"), "signature invalid"),
        (good + " trailing", "not a signed checkpoint line"),
        ("3:" + "zz" * 32, "malformed"),
        ("hello", "malformed"),
        ("é", "not ASCII"),
    ]:
        f.write_text(text + "\n")
        with pytest.raises(CheckpointError, match=why):
            read_exported(f, "acme", key.public_key())
    f.write_text(f"# exported by cron\n\n{good}\n3:{'ab' * 32}\n")
    anchors = read_exported(f, "acme", key.public_key())
    assert [(a.seq, a.signed) for a in anchors] == [(3, True), (3, False)]
    with pytest.raises(CheckpointError, match="no checkpoint public key"):
        read_exported(f, "acme", None)
