"""Verify an audit database on disk, streaming, against its chain and its checkpoints.

Speed (pristine schema only): SQLite renders each record as the JSON array of its 15 maced
columns (``json_array``) and Python only HMACs those bytes. The exact, pure
:class:`~aiid_proxy.audit.chain.ChainState` decides every failure and names it: a record whose
fast rendering does not reproduce its mac is fetched again and checked exactly.

Why a fast match is sound: a matching HMAC (keyed, chained on the verified previous mac) means
the rendered bytes are an authentic record's canonical bytes. SQLite's JSON of integers and
text is lossless (and, for every code point, byte-identical to Python's), and a REAL never
renders like an integer, text or null token, so those stored values equal the authentic ones.
The one lossy rendering is a REAL's (15 significant digits), so the fast path takes a
``latency_ms`` only when it is the double nearest a 3-decimal number below 1e9 (at most 12
significant digits, as the writer stores it): two such doubles cannot share a 15-digit
rendering, so the stored value is the authentic one too. Anything else (another float, a
BLOB, invalid UTF-8, an altered schema) takes the exact path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from aiid_proxy.audit.chain import MACED, Anchors, ChainState, VerifyResult, parse_head
from aiid_proxy.audit.signed import Anchor
from aiid_proxy.audit.store import (
    COLS_SQL,
    FETCH_BATCH,
    SELECT_SQL,
    describe,
    lenient_text,
    open_existing,
    schema_state,
)
from aiid_proxy.errors import AuditError, UsageError

# The record's canonical JSON rendered by SQLite, with latency_ms raw to check its rendering.
FAST_SQL = (  # built from the COLUMNS constant only
    f"SELECT seq, CAST(json_array({', '.join(MACED)}) AS BLOB), latency_ms, mac "  # noqa: S608
    "FROM audit WHERE seq >= ? ORDER BY seq"
)
LAT_BOUND = 1e9  # |latency_ms| below this has at most 12 significant digits at 3 decimals
# Where a pass from the start begins: rows someone numbered 0 or below come first and fail.
FIRST_SEQ = -(2**63)
_ROW_SQL = f"{SELECT_SQL} WHERE seq = ?"
_EXACT_SQL = {  # insertion order (rowid) when there is one, else seq
    (key, resume): f"SELECT {key}, {COLS_SQL} FROM audit "  # noqa: S608
    + (f"WHERE {key} > ? " if resume else "")
    + f"ORDER BY {key}"
    for key in ("rowid", "seq")
    for resume in (False, True)
}


class CheckpointError(Exception):
    pass


def read_checkpoints(path: Path, anchors: Anchors) -> None:
    """Add every ``seq:mac`` line of an append-only checkpoint file to ``anchors``.

    A final line without its newline is a write cut short by a crash: used if it parses,
    ignored otherwise. Any other malformed line raises CheckpointError.
    """
    try:
        with path.open("rb") as f:
            line_no = 0
            for raw in f:
                line_no += 1
                complete = raw.endswith(b"\n")
                try:
                    seq, mac = parse_head(raw.decode("ascii"))
                    if not raw.rstrip(b"\n") or raw.rstrip(b"\n") != raw.strip():
                        raise UsageError("whitespace")
                except (UnicodeDecodeError, UsageError):
                    if complete:
                        raise CheckpointError(
                            f"checkpoint file {path.name} line {line_no} is malformed"
                        ) from None
                    continue
                anchors.add(seq, mac, line_no)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {describe(e)}") from None


def verify_db(
    path: Path,
    key: bytes,
    checkpoint_path: Path | None = None,
    expect_head: tuple[int, str] | None = None,
    exported: Iterable[Anchor] = (),
) -> VerifyResult:
    """Verify the audit database at ``path`` with the tenant key ``key``.

    Every line of ``checkpoint_path`` (if the file exists), ``expect_head`` and every
    ``exported`` anchor (see :func:`aiid_proxy.audit.signed.read_exported`) must be reached by
    the chain with the same mac. Raises AuditError if the file or table is missing.
    """
    anchors = Anchors()
    if expect_head is not None:
        anchors.add(expect_head[0], expect_head[1].lower())
    for a in exported:
        anchors.add(a.seq, a.mac.lower(), source=a.source)
    if checkpoint_path is not None and checkpoint_path.exists():
        # Read before the database snapshot: every line then names a committed record.
        try:
            read_checkpoints(checkpoint_path, anchors)
        except CheckpointError as e:
            return VerifyResult(False, 0, None, None, str(e))
    conn = open_existing(path)
    try:
        try:
            schema = schema_state(conn)
        except sqlite3.Error as e:
            raise AuditError(f"cannot read audit database {path}: {describe(e)}") from None
        if schema == "missing":
            raise AuditError(f"audit database {path} has no audit table")
        state = ChainState(key, anchors)
        if schema == "pristine":
            done = _fast(conn, state)
            if not done:
                _exact(conn, state, "seq", state.expected - 1 if state.expected > 1 else None)
        else:
            _exact(conn, state, _order_key(conn), None)
        return state.result()
    finally:
        conn.close()


def _order_key(conn: sqlite3.Connection) -> str:
    """Insertion order when the table has a rowid, so moved rows show up as out of order."""
    try:
        conn.execute("SELECT rowid FROM audit LIMIT 0")
    except sqlite3.OperationalError:
        return "seq"
    return "rowid"


def _fetch_row(conn: sqlite3.Connection, seq: int) -> tuple[object, ...] | None:
    conn.text_factory = lenient_text
    try:
        row: tuple[object, ...] | None = conn.execute(_ROW_SQL, (seq,)).fetchone()
        return row
    finally:
        conn.text_factory = str


def _fast(conn: sqlite3.Connection, state: ChainState) -> bool:
    """Fast pass over a pristine table. True when finished (ok or a failure recorded); False
    when SQLite cannot render a row (a BLOB, invalid UTF-8): the caller goes on exactly."""
    copy = state.base.copy
    anchor = state.anchors.next_seq
    expected = state.expected
    prev = state.prev_bytes
    try:
        # From the start, from the lowest seq: a record numbered 0 or below is a tamper too.
        cur = conn.execute(FAST_SQL, (expected if expected > 1 else FIRST_SEQ,))
    except sqlite3.Error:
        return False
    while True:
        try:
            batch = cur.fetchmany(FETCH_BATCH)
        except sqlite3.Error:
            return False
        if not batch:
            return True
        for seq, rendered, lat, mac in batch:
            if seq == expected and (
                lat is None
                or (
                    lat.__class__ is float
                    and -LAT_BOUND < lat < LAT_BOUND
                    and round(lat * 1000.0) / 1000.0 == lat
                )
            ):
                h = copy()
                h.update(prev)
                h.update(rendered)
                digest = h.digest()
                hexed = digest.hex()
                if hexed == mac:
                    if seq == anchor:
                        if not state.accept(seq, digest, hexed):
                            return True
                        anchor = state.anchors.next_seq
                    expected = seq + 1
                    prev = digest
                    continue
            # Not verified by the fast rendering: decide exactly (and name the failure).
            state.expected, state.prev_bytes, state.prev_hex = expected, prev, prev.hex()
            try:
                values = _fetch_row(conn, seq)
            except sqlite3.Error:
                return False
            if values is None or not state.check_row(values):
                if values is None:
                    state.fail(expected, f"seq {seq} vanished while verifying")
                return True
            expected, prev, anchor = state.expected, state.prev_bytes, state.anchors.next_seq
        state.expected, state.prev_bytes, state.prev_hex = expected, prev, prev.hex()


def _rows_after(
    conn: sqlite3.Connection, key: str, after: int | None
) -> Iterator[tuple[object, ...]]:
    sql = _EXACT_SQL[key, after is not None]
    cur = conn.execute(sql, () if after is None else (after,))
    while batch := cur.fetchmany(FETCH_BATCH):
        yield from batch


def _exact(conn: sqlite3.Connection, state: ChainState, key: str, after: int | None) -> None:
    """Exact pass in ``key`` order from just after ``after``, tolerant of undecodable text."""
    conn.text_factory = lenient_text
    try:
        for row in _rows_after(conn, key, after):
            if not state.check_row(row[1:]):
                return
    except sqlite3.Error as e:
        state.fail(
            state.expected,
            f"audit database unreadable after seq {state.expected - 1}: {describe(e)}",
        )
    finally:
        conn.text_factory = str
