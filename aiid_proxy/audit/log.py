"""The audit writer: group-committed, HMAC-chained, durable appends.

``append`` queues a record and returns a future; one writer (a thread of ours, or the caller
of ``drain`` when ``threaded=False``, as in the audit writer process of ``service``) takes
everything pending, chains it after the committed head and inserts it in ONE
``BEGIN IMMEDIATE ... COMMIT`` with ``synchronous=FULL``, then resolves the futures. Concurrent
writers so share fsyncs. A batch of only ``response`` records (LAZY_EVENTS) commits with
``synchronous=NORMAL``: in the WAL, safe from a crash of the process, fsync'd by the next FULL
commit, before a checkpoint names it, or after LAZY_SYNC seconds of quiet. A failed
transaction is rolled back and fails exactly that batch; the next batch re-reads the committed
head inside its own transaction, so there is never a seq gap or a fork of the chain.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from aiid_proxy.audit.chain import (
    GENESIS_MAC,
    ChainState,
    canonical_values,
    tenant_key,
)
from aiid_proxy.audit.durable import Durability
from aiid_proxy.audit.record import FIELDS, AppendResult, format_ts, is_lazy, normalize
from aiid_proxy.audit.store import (
    BUSY_TIMEOUT_MS,
    INSERT_SQL,
    SELECT_SQL,
    committed_head,
    describe,
    ensure_schema,
    schema_state,
)
from aiid_proxy.audit.verify_range import keyed_mac
from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import AuditError
from aiid_proxy.home import validate_name

log = logging.getLogger(__name__)

MAX_BATCH = 1024
_REQUEST_ID, _EVENT = FIELDS.index("request_id"), FIELDS.index("event")
# Records between two WAL checkpoints (~3 pages each: SQLite's own default is 1,000 pages). The
# writer runs them after a batch's answers are out: SQLite's automatic one would run inside a
# COMMIT, on a request's way out (copying ~4 MB and an fsync: p99.9 1.5 ms against 0.6 ms).
WAL_CHECKPOINT_RECORDS = 300


class _Pending:
    __slots__ = ("future", "once", "ts", "values")

    def __init__(
        self,
        ts: str,
        values: tuple[object, ...],
        future: Future[AppendResult],
        once: bool = False,
    ):
        self.ts = ts
        self.values = values
        self.future = future
        self.once = once


_STOP = object()


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None if there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class AuditLog(Durability):
    """The tenant's audit log, opened for appending by one gateway process."""

    def __init__(
        self,
        path: Path,
        tenant: str,
        root_key: bytes,
        *,
        checkpoint_path: Path | None = None,
        clock: Clock = SYSTEM_CLOCK,
        create: bool = True,
        after_batch: Callable[[], None] | None = None,
        threaded: bool = True,
        _connect: Callable[[Path], sqlite3.Connection] | None = None,
    ) -> None:
        """``after_batch``, if given, is called by the writer once every future of a batch is
        resolved (committed or refused), and after the pending ones fail at close.

        ``threaded=False``: no writer thread; the owner calls :meth:`drain` to commit what was
        submitted, in its own thread (the audit writer process does, one batch per read)."""
        self.path = Path(path)
        self._after_batch = after_batch
        self._create = create
        self._file_id: tuple[int, int] | None = None
        self._wal_path = Path(f"{self.path}-wal")
        self._wal_id: tuple[int, int] | None = None
        self.tenant = validate_name("tenant", tenant)
        self._key = tenant_key(root_key, tenant)
        self._base = keyed_mac(self._key)
        self._checkpoint_path = checkpoint_path
        self._clock = clock
        self._connect = _connect
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # append/close ordering
        self._head_lock = threading.Lock()
        self._ckpt_lock = threading.Lock()
        self._closed = False
        self._head: tuple[int, str] = (0, GENESIS_MAC)
        self._full: bool | None = None  # the connection's synchronous setting (FULL?)
        # Lazy commits (synchronous=NORMAL) so far, and how many of them an fsync covers.
        self._lazy_gen = self._synced_gen = 0
        self._unsynced_at = 0.0  # clock.monotonic() of the first lazy commit not yet synced
        self._last_ckpt: tuple[int, str] | None = None
        self._last_ckpt_at = -math.inf
        self.committed_batches = 0
        self._since_wal_checkpoint = 0
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        if not threaded:
            try:
                self._conn = self._open()
            except BaseException as e:
                self._closed = True
                if isinstance(e, AuditError):
                    raise
                raise AuditError(f"cannot open audit log {self.path}: {describe(e)}") from None
            return
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"aiid-audit-{tenant}", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._closed = True
            self._thread.join()
            raise

    def __repr__(self) -> str:
        return f"AuditLog(path={str(self.path)!r}, tenant={self.tenant!r}, head={self.head()!r})"

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ---------------------------------------------------------
    def append(self, event: str, **fields: object) -> Future[AppendResult]:
        """Queue a record; the future resolves once it is durably committed.

        Unknown or ill-typed fields raise ValueError at once; a closed log raises AuditError.
        """
        return self.submit(format_ts(self._clock.now()), normalize(event, fields))

    def append_once(self, event: str, **fields: object) -> Future[AppendResult]:
        """As :meth:`append`, unless the log holds a record of this ``event`` for this
        ``request_id`` already: then that one's (seq, mac). For writing again a record whose
        first attempt failed without saying whether it committed (its writer died)."""
        return self.submit(format_ts(self._clock.now()), normalize(event, fields), once=True)

    def write_once(self, event: str, timeout: float, **fields: object) -> AppendResult:
        """:meth:`append_once`, waited for (at most ``timeout`` s: TimeoutError)."""
        return self.append_once(event, **fields).result(timeout)

    def submit(
        self, ts: str, values: tuple[object, ...], *, once: bool = False
    ) -> Future[AppendResult]:
        """Queue an already normalized record (``normalize``) stamped ``ts`` (``format_ts``);
        ``once``: see :meth:`append_once`."""
        future: Future[AppendResult] = Future()
        with self._lock:
            if self._closed:
                raise AuditError("audit log is closed")
            self._queue.put(_Pending(ts, values, future, once))
        return future

    def append_sync(self, event: str, **fields: object) -> AppendResult:
        if threading.current_thread() is self._thread:
            raise AuditError("append_sync called from the audit writer thread")
        fut = self.append(event, **fields)
        if self._thread is None:
            self.drain()
        return fut.result()

    def drain(self) -> None:
        """Without a writer thread: commit everything submitted so far, in group commits."""
        if self._conn is not None:
            self._drain(self._conn)

    def _drain(self, conn: sqlite3.Connection) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            batch: list[_Pending] = []
            self._take(batch, item)
            if batch:
                self._commit(conn, batch)

    def close(self) -> None:
        """Commit everything pending, write a last checkpoint and stop the writer. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if self._thread is None:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    self._drain(conn)  # nothing can be queued after the stop marker
                    self.idle()
                    self._auto_checkpoint(force=True)
                finally:
                    conn.close()
                    self._fail_pending()
        elif threading.current_thread() is not self._thread:
            self._thread.join()

    # -- writer thread ------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if not self._create and not self.path.is_file():
            raise AuditError(
                f"audit database missing: {self.path} (never created here: restore it from "
                "backup; the tenant's requests cannot be recorded, so none is let through)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Private like the vault (SQLite gives -wal and -shm the same mode): the records
            # name agents and models, and prompts where the tenant asks for them.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        if self._connect is not None:
            conn = self._connect(self.path)
        else:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.isolation_level = None
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # ours, after the answers
            self._full = True
            conn.execute("BEGIN IMMEDIATE")
            try:
                if not self._create and schema_state(conn) == "missing":
                    # emptied (a 0-byte file), or its table dropped: as good as deleted
                    raise AuditError(
                        f"audit database {self.path} has no audit table (emptied or replaced?): "
                        "restore it from backup; every request of this tenant is refused "
                        "meanwhile"
                    )
                ensure_schema(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if schema_state(conn) != "pristine":
                raise AuditError(f"audit table in {self.path} has an unexpected schema")
            self._head = committed_head(conn, self._key)
            self._file_id = _file_id(self.path)
            self._wal_id = _file_id(self._wal_path)
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, ready: Future[None]) -> None:
        try:
            conn = self._open()
        except BaseException as e:
            err = e if isinstance(e, AuditError) else None
            ready.set_exception(
                err or AuditError(f"cannot open audit log {self.path}: {describe(e)}")
            )
            return
        ready.set_result(None)
        try:
            stop = False
            while not stop:
                batch: list[_Pending] = []
                try:
                    item = self._queue.get(timeout=self.idle_timeout())
                except queue.Empty:
                    self.idle()
                    continue
                stop = self._take(batch, item)
                if batch:
                    stop = self._commit(conn, batch) or stop
                if self.overdue():  # busy with lazy records alone: sync them all the same
                    self.idle()
            self.idle()
            self._auto_checkpoint(force=True)
        except BaseException as e:  # pragma: no cover - a bug; never leave a caller hanging
            log.exception("audit writer stopped: %s", describe(e))
            with self._lock:
                self._closed = True
        finally:
            conn.close()
            self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Pending) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(AuditError("audit log is closed"))
        self._batch_done()

    def _batch_done(self) -> None:
        if self._after_batch is not None:
            try:
                self._after_batch()
            except Exception:
                log.exception("audit after_batch callback failed")

    def _take(self, batch: list[_Pending], item: object) -> bool:
        """Move ``item`` and whatever else is pending into ``batch`` (cancelled appends are
        dropped); True once the stop marker is reached."""
        while True:
            if item is _STOP:
                return True
            assert isinstance(item, _Pending)
            if item.future.set_running_or_notify_cancel():
                batch.append(item)
            if len(batch) >= MAX_BATCH:
                return False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False

    def _commit(self, conn: sqlite3.Connection, live: list[_Pending]) -> bool:
        """Commit one batch; True if the stop marker was taken along the way."""
        stop = False
        rows: list[tuple[object, ...]] = []
        results: list[AppendResult] = []
        try:
            if self._file_id is not None and _file_id(self.path) != self._file_id:
                # Deleted or replaced under us: records would go to a file nobody reads.
                raise AuditError(
                    f"audit database {self.path} was removed or replaced while in use; "
                    "refusing to write (restore it and restart the gateway)"
                )
            if _file_id(self._wal_path) != self._wal_id:
                self._new_wal(conn)
            full = not all(is_lazy(p.values) for p in live)
            if full is not self._full:  # may not change inside a transaction
                conn.execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
                self._full = full
            conn.execute("BEGIN IMMEDIATE")
            # Appends queued while the write lock was being taken (writers woken by the last
            # commit) join this transaction instead of waiting for the next fsync (a lazy
            # batch does not take them: they may need the fsync it does not do).
            try:
                more = self._queue.get_nowait() if full and len(live) < MAX_BATCH else None
            except queue.Empty:
                more = None
            if more is not None:
                stop = self._take(live, more)
            head = conn.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev_hex = (int(head[0]), str(head[1])) if head else (0, GENESIS_MAC)
            if (seq, prev_hex) != self._head:
                self._check_extends(conn, seq)
            prev = bytes.fromhex(prev_hex)
            copy = self._base.copy
            once = any(p.once for p in live)
            there = self._already(conn, live) if once else {}
            batch: dict[tuple[object, object], AppendResult] = {}  # this batch's, for once
            for i, p in enumerate(live):
                key = (p.values[_REQUEST_ID], p.values[_EVENT])
                if i in there or (p.once and key in batch):
                    # ([AO]) the first attempt may travel in the same batch as its retry
                    results.append(there[i] if i in there else batch[key])
                    continue
                seq += 1
                values = (seq, p.ts, *p.values, prev_hex)
                h = copy()
                h.update(prev)
                h.update(canonical_values(values))
                prev = h.digest()
                prev_hex = prev.hex()
                rows.append((*values, prev_hex))
                results.append(AppendResult(seq, prev_hex))
                if once and key[0] is not None:
                    batch.setdefault(key, results[-1])
            conn.executemany(INSERT_SQL, rows)
            conn.execute("COMMIT")
        except Exception as e:
            self._rollback(conn)
            message = f"audit write failed: {describe(e)}"
            log.error("%s (%d records refused)", message, len(live))
            for p in live:
                p.future.set_exception(AuditError(message))
            self._batch_done()
            return stop
        if self._wal_id is None:  # a WAL renewed by _new_wal exists from its first commit on
            self._wal_id = _file_id(self._wal_path)
        with self._head_lock:
            self._head = (seq, prev_hex)
            if full:  # its fsync also covers the WAL frames of earlier lazy commits
                self._synced_gen = self._lazy_gen
            else:
                if self._lazy_gen == self._synced_gen:
                    self._unsynced_at = self._clock.monotonic()
                self._lazy_gen += 1
        self.committed_batches += 1
        for p, result in zip(live, results, strict=True):
            p.future.set_result(result)
        self._batch_done()
        # After the answers are out: a due checkpoint (an fsync or two, every
        # CHECKPOINT_INTERVAL) is not on any request's way out. It names a committed head.
        self._auto_checkpoint(force=False)
        self._since_wal_checkpoint += len(live)
        if self._since_wal_checkpoint >= WAL_CHECKPOINT_RECORDS:
            self._since_wal_checkpoint = 0
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as e:  # the records are committed; the WAL just grows
                log.warning("audit WAL checkpoint failed: %s", describe(e))
        return stop

    @staticmethod
    def _already(conn: sqlite3.Connection, live: list[_Pending]) -> dict[int, AppendResult]:
        """The records of ``live`` sent ``once`` that the log holds already, by position."""
        out: dict[int, AppendResult] = {}
        for i, p in enumerate(live):
            if p.once and p.values[_REQUEST_ID] is not None:
                row = conn.execute(
                    "SELECT seq, mac FROM audit WHERE request_id = ? AND event = ? LIMIT 1",
                    (p.values[_REQUEST_ID], p.values[_EVENT]),
                ).fetchone()
                if row is not None:
                    out[i] = AppendResult(int(row[0]), str(row[1]))
        return out

    def _check_extends(self, conn: sqlite3.Connection, seq: int) -> None:
        """The file's head is not the one this writer last committed: accept it only if the
        records after ours chain on from our head under the tenant key (a COMMIT that reported
        an error yet landed). Records deleted, cut or rewritten under the running gateway
        raise AuditError: extending that chain would hide the cut."""
        known_seq, known_mac = self._head
        if seq > known_seq:
            row = conn.execute("SELECT mac FROM audit WHERE seq = ?", (known_seq,)).fetchone()
            if known_seq == 0 or (row is not None and row[0] == known_mac):
                state = ChainState(self._key)
                state.expected, state.prev_hex = known_seq + 1, known_mac
                state.prev_bytes = bytes.fromhex(known_mac)
                rows = conn.execute(f"{SELECT_SQL} WHERE seq > ? ORDER BY seq", (known_seq,))
                if all(state.check_row(r) for r in rows) and state.expected == seq + 1:
                    log.warning(
                        "audit log %s: adopting records %d-%d", self.path, known_seq + 1, seq
                    )
                    return
        raise AuditError(
            f"audit database {self.path} changed under the running gateway: its chain ended at "
            f"seq {known_seq}, the file now ends at seq {seq} (records deleted or rewritten?); "
            "refusing to write: run `aiid audit verify`, restore it and restart the gateway"
        )

    def _new_wal(self, conn: sqlite3.Connection) -> None:
        """The write-ahead log was removed or replaced under the open connection, which
        still writes to the old file: records committed there would be lost in a crash (and
        unlinked, nobody reads them). Copy them into the database (a checkpoint reads the
        old file through SQLite's descriptor and syncs the database), then leave WAL mode and
        enter it again, which starts a new log at the path. Raises AuditError if it cannot."""
        log.error(
            "audit write-ahead log %s was removed or replaced while in use: saving its "
            "records into the database and starting a new one",
            self._wal_path,
        )
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            mode = busy == 0 and conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            mode = mode == "delete" and conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.Error as e:
            mode = describe(e)
        if mode != "wal":
            raise AuditError(
                f"audit write-ahead log {self._wal_path} was removed or replaced while in use "
                f"and could not be renewed ({mode or 'busy'}); refusing to write (restart the "
                "gateway)"
            )
        self._wal_id = _file_id(self._wal_path)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:  # SQLite may already have rolled back (SQLITE_FULL, IOERR)
            pass
