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

A long table is split into seq ranges, one per extra core, each checked by a worker process
(:mod:`aiid_proxy.audit.verify_range`) chained on the stored mac before its range. When every
range verifies, the stored macs are the chain's, and only the anchors in that span are
checked here; anything less and the sequential pass above decides from seq 1.
"""

from __future__ import annotations

import marshal
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from aiid_proxy.audit import verify_range
from aiid_proxy.audit.chain import (
    COLUMNS,
    GENESIS_BYTES,
    GENESIS_MAC,
    MACED,
    Anchors,
    ChainState,
    VerifyResult,
    parse_head,
)
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
from aiid_proxy.audit.verify_range import clean, open_files, run_range
from aiid_proxy.errors import AuditError, UsageError
from aiid_proxy.home import child_env

# The record's canonical JSON rendered by SQLite, with latency_ms raw to check its rendering.
_RENDER = (  # built from the COLUMNS constant only
    f"SELECT seq, CAST(json_array({', '.join(MACED)}) AS BLOB), latency_ms, mac "  # noqa: S608
    "FROM audit WHERE seq >= ?"
)
FAST_SQL = f"{_RENDER} ORDER BY seq"
RANGE_SQL = f"{_RENDER} AND seq < ? ORDER BY seq"
# A table this long is split across processes (one per extra core, a worker starts in ~25 ms).
PARALLEL_MIN = 50_000
MAX_WORKERS = 3
WORKER_TIMEOUT = 600.0  # seconds; a worker past it is killed and the sequential pass decides
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
            done = _parallel(path, conn, key, state, _worker_count()) or _fast(conn, state)
            if not done:
                _exact(conn, state, "seq", state.expected - 1 if state.expected > 1 else None)
        else:
            _exact(conn, state, _order_key(conn), None)
        result = state.result()
        if result.ok and schema != "pristine":
            return _uncovered(conn, result) or result
        return result
    finally:
        conn.close()


def _uncovered(conn: sqlite3.Connection, result: VerifyResult) -> VerifyResult | None:
    """A failure if a column the chain does not cover (added to the table) holds a value:
    the chain vouches for every column of a record, so such data was put there after it."""
    names = [str(r[1]) for r in conn.execute("PRAGMA table_info(audit)").fetchall()]
    for name in names:
        if name in COLUMNS:
            continue
        quoted = '"' + name.replace('"', '""') + '"'
        row = conn.execute(
            f"SELECT seq FROM audit WHERE {quoted} IS NOT NULL ORDER BY seq LIMIT 1"  # noqa: S608
        ).fetchone()
        if row is not None:
            seq = row[0] if isinstance(row[0], int) else None
            why = f"column {name!r}, which the chain does not cover, holds data at seq {seq}"
            return VerifyResult(False, result.count, result.head, seq, why + " (added later?)")
    return None


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
    """Fast pass over a pristine table from ``state.expected``. True when finished (ok or a
    failure recorded); False when SQLite cannot render a row (a BLOB, invalid UTF-8): the
    caller goes on exactly. Anchor rows and rows the rendering does not verify are decided by
    the exact check, which names any failure."""
    copy = state.base.copy
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
        i, n = 0, len(batch)
        while True:
            i, expected, prev = clean(batch, i, copy, expected, prev, state.anchors.next_seq)
            state.expected, state.prev_bytes, state.prev_hex = expected, prev, prev.hex()
            if i == n:
                break
            seq = batch[i][0]
            try:
                values = _fetch_row(conn, seq)
            except sqlite3.Error:
                return False
            if values is None or not state.check_row(values):
                if values is None:
                    state.fail(expected, f"seq {seq} vanished while verifying")
                return True
            expected, prev = state.expected, state.prev_bytes
            i += 1


def _worker_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return min(cpus, MAX_WORKERS + 1) - 1


def _parallel(
    path: Path, conn: sqlite3.Connection, key: bytes, state: ChainState, workers: int
) -> bool:
    """Verify seqs 1..last split into ranges, the first here and one per worker process.

    Only an accelerator: when every range verifies, the chain holds from seq 1 to the table's
    last seq (each range starts from the stored mac its predecessor verified), so ``state``
    moves there after checking the anchors in that span. Anything else (a range that stops
    early, a worker that fails, a table not starting at seq 1) leaves ``state`` untouched and
    the sequential pass decides and names it. True when an anchor disagreed (failure recorded).
    """
    if workers < 1 or state.expected != 1:
        return False
    try:
        first, last = conn.execute("SELECT min(seq), max(seq) FROM audit").fetchone()
        if first != 1 or not isinstance(last, int) or last < PARALLEL_MIN:
            return False
        bounds = [1 + last * k // (workers + 1) for k in range(workers + 1)] + [last + 1]
        befores = [_stored_mac(conn, start - 1) for start in bounds[1:-1]]
    except sqlite3.Error:
        return False
    if None in befores:
        return False
    uri = f"{path.resolve().as_uri()}?mode=rw"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for k, before in enumerate(befores, start=1):
            job = (uri, str(path), RANGE_SQL, key, bounds[k], bounds[k + 1], before)
            procs.append(_start_worker())
            _send(procs[-1], marshal.dumps(job))
        try:
            reached = run_range(conn, RANGE_SQL, state.base.copy, 1, bounds[1], GENESIS_BYTES)
        except sqlite3.Error:
            return False
        # The files this connection reads. A worker that read others (a copy renamed over the
        # path after we opened it) verified something else: its word counts for nothing.
        ours = open_files(str(path))
        if reached != bounds[1] or not ours:
            return False
        for k, proc in enumerate(procs, start=1):
            if _worker_result(proc) != (bounds[k + 1], ours):
                return False
    except OSError:
        return False
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    # Every row in 1..last verified: its stored mac is the chain's mac there.
    try:
        for seq in (*state.anchors.pending(last), last):
            before = _stored_mac(conn, seq - 1) if seq > 1 else GENESIS_MAC
            mac = _stored_mac(conn, seq)
            if before is None or mac is None:  # verified a moment ago: being rewritten
                return state.fail(seq, f"seq {seq} changed while verifying")
            state.expected, state.prev_bytes, state.prev_hex = seq, bytes.fromhex(before), before
            if not state.accept(seq, bytes.fromhex(mac), mac):
                return True
    except sqlite3.Error as e:
        why = f"audit database unreadable after seq {state.expected - 1}: {describe(e)}"
        return state.fail(state.expected, why)
    return False


def _stored_mac(conn: sqlite3.Connection, seq: int) -> str | None:
    row = conn.execute("SELECT mac FROM audit WHERE seq = ?", (seq,)).fetchone()
    mac = row[0] if row else None
    return mac if isinstance(mac, str) and len(mac) == 64 else None


def _start_worker() -> subprocess.Popen[bytes]:
    # -I: no environment-driven imports, no user site, no script directory on the path; the
    # key travels in the job on stdin, never in argv or the environment.
    return subprocess.Popen(
        [sys.executable, "-I", "-S", verify_range.__file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env(),
        close_fds=True,
    )


def _send(proc: subprocess.Popen[bytes], job: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(job)
        proc.stdin.close()
    finally:
        proc.stdin = None  # sent (or failed): communicate() only reads from here on


def _worker_result(proc: subprocess.Popen[bytes]) -> object:
    """What the worker answered: (first seq not verified, the files it read); None if it
    failed."""
    try:
        out, _ = proc.communicate(timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    try:
        return marshal.loads(out)  # noqa: S302 - our own worker, over a pipe only we hold
    except (EOFError, ValueError, TypeError):
        return None


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
