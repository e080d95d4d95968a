"""The audit writer in its own process: the gateway's side.

In a thread, the writer shares the gateway's GIL: every SQLite call it makes (stat, BEGIN,
SELECT, one step per row, COMMIT) hands the GIL over and back, and each time the event loop
returns from a socket write it can find the writer holding it. ``AuditWriterProcess`` runs the
same :class:`~aiid_proxy.audit.log.AuditLog` in a child Python process instead
(:mod:`aiid_proxy.audit.child`, over the frames of :mod:`aiid_proxy.audit.frames`), and
:class:`RemoteAuditLog` is the gateway's handle on one tenant's log there, with the same
``append`` / ``head`` / ``checkpoint`` / ``close`` surface. The gateway's event loop reads
the replies itself once ``attach``-ed. The audit key travels in the ``open`` frame, never in
argv or the environment; the child's stderr is the gateway's.

Fail closed: a child that exits (or writes garbage) fails every pending append and every later
one with :class:`~aiid_proxy.errors.AuditError`, so the gateway refuses traffic until it is
restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Protocol

from aiid_proxy.audit.chain import GENESIS_MAC
from aiid_proxy.audit.frames import (
    APPEND,
    CHECKPOINT,
    CLOSE,
    LOG,
    OK,
    OPEN,
    STOP_TIMEOUT,
    FrameParser,
    frame,
    write_all,
)
from aiid_proxy.audit.record import AppendResult, format_ts, is_lazy, normalize
from aiid_proxy.audit.store import describe
from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import AuditError
from aiid_proxy.home import child_env, validate_name

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between checks for a writer gone or a closing flag (not for replies)
HOLD = 0.002  # seconds a `response` record may wait to travel with the next record


class AuditAppender(Protocol):
    """What the gateway needs of a tenant's audit log (``AuditLog`` or ``RemoteAuditLog``)."""

    path: Path
    tenant: str

    def append(self, event: str, **fields: object) -> Future[AppendResult]: ...

    def append_once(self, event: str, **fields: object) -> Future[AppendResult]: ...

    def write_once(self, event: str, timeout: float, **fields: object) -> AppendResult: ...

    def head(self) -> tuple[int, str]: ...

    def checkpoint(self) -> None: ...

    def close(self) -> None: ...


# -- the gateway's side ------------------------------------------------------------------------
_Convert = Callable[[object], object]


def _seq_mac(payload: object, what: str) -> tuple[int, str]:
    """A reply's ``(seq, mac)``; AuditError if it is anything else."""
    if not (
        isinstance(payload, tuple)
        and len(payload) == 2
        and isinstance(payload[0], int)
        and isinstance(payload[1], str)
    ):
        raise AuditError(f"audit writer: bad reply to {what}")
    return payload[0], payload[1]


def _same(payload: object) -> object:
    return payload


def _resolve(entry: tuple[Future[object], _Convert], msg: tuple[object, ...]) -> None:
    """Resolve a request's future with its reply; one cancelled meanwhile (by its caller, in
    any thread: the record may still be committed) is left alone. Never raises: the rest of
    the replies read with this one must be delivered too."""
    fut, convert = entry
    try:
        if msg[0] != OK:
            fut.set_exception(AuditError(str(msg[2])))
            return
        try:
            result = convert(msg[2])
        except AuditError as e:
            fut.set_exception(e)
            return
        fut.set_result(result)
    except InvalidStateError:
        pass


class AuditWriterProcess:
    """A child process holding the tenants' audit logs; ``open`` gives a RemoteAuditLog."""

    def __init__(self, *, python: str = sys.executable, keep_fds: tuple[int, ...] = ()) -> None:
        """``keep_fds``: descriptors the child keeps open, the gateway's home lock: a writer
        that outlives a killed gateway (still committing what it was sent, or stopped) holds
        the home until it exits, so no new gateway starts writing the same logs meanwhile."""
        self._lock = threading.Lock()  # one frame at a time on the request pipe
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Future[object], _Convert]] = {}
        self._dead: str | None = None
        self._closing = False
        self._held: list[bytes] = []  # frames held back to travel with the next one
        self._loop_thread = 0
        self._removal_pending = False
        # The keys a gateway may take from its environment are not the writer's business.
        env = child_env(package=True)
        try:
            self._proc = subprocess.Popen(
                # -P: not the working directory first on sys.path (this process gets the key)
                [python, "-P", "-m", "aiid_proxy.audit.child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
                pass_fds=keep_fds,
            )
        except OSError as e:
            raise AuditError(f"cannot start the audit writer process: {describe(e)}") from None
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._wfd = self._proc.stdin.fileno()
        self._rfd = self._proc.stdout.fileno()
        os.set_blocking(self._rfd, False)
        self._rlock = threading.Lock()  # one reader of the reply pipe at a time
        self._parser = FrameParser()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader = threading.Thread(target=self._read, name="aiid-audit-replies", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"AuditWriterProcess(pid={self._proc.pid}, dead={self._dead is not None})"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def open(
        self,
        path: Path,
        tenant: str,
        root_key: bytes,
        *,
        checkpoint_path: Path | None = None,
        clock: Clock = SYSTEM_CLOCK,
        create: bool = True,
    ) -> RemoteAuditLog:
        validate_name("tenant", tenant)
        tid, head = self.open_log(Path(path), tenant, root_key, checkpoint_path, create)
        return RemoteAuditLog(
            self, tid, Path(path), tenant, clock, head, root_key=root_key, ckpt=checkpoint_path
        )

    def open_log(
        self,
        path: Path,
        tenant: str,
        root_key: bytes,
        checkpoint_path: Path | None,
        create: bool,
    ) -> tuple[int, tuple[int, str]]:
        """Open a tenant's log in the child: its id here and its head."""
        tid = next(self._ids)
        ckpt = str(checkpoint_path) if checkpoint_path is not None else None
        reply = self.call(OPEN, tid, str(path), tenant, bytes(root_key), ckpt, create)
        return tid, _seq_mac(reply, OPEN)

    @property
    def dead(self) -> bool:
        """The child is gone (or the channel broke): every request fails."""
        return self._dead is not None

    # -- requests -----------------------------------------------------------
    def submit(
        self, op: str, *args: object, convert: _Convert = _same, hold: bool = False
    ) -> Future[object]:
        """Send one request; the future resolves with ``convert`` of the child's reply (in
        the thread that reads replies), or fails with AuditError.

        ``hold``: sent from the thread of the running loop it is attached to, the request may
        wait up to HOLD seconds to travel with the next one (a `response` record with the next
        `request` record: one wake-up of the writer and one commit for both, instead of a
        commit the next request record would queue behind)."""
        rid = next(self._ids)
        fut: Future[object] = Future()
        data = frame((op, rid, *args))
        with self._lock:
            if self._closing and self._dead is None:
                raise AuditError("audit writer is closed")
            if self._dead is None:
                self._pending[rid] = (fut, convert)
                loop = self._loop
                if loop is not None and loop.is_closed():  # the loop ended before us
                    loop = self._loop = None
                    self._reader = threading.Thread(
                        target=self._read, name="aiid-audit-replies", daemon=True
                    )
                    self._reader.start()
                if (
                    hold
                    and loop is not None
                    and threading.get_ident() == self._loop_thread
                    and loop.is_running()
                ):
                    if not self._held:
                        loop.call_later(HOLD, self.release)
                    self._held.append(data)
                    return fut
                if self._held:
                    self._held.append(data)
                    data = b"".join(self._held)
                    self._held.clear()
                try:
                    write_all(self._wfd, data)
                    return fut
                except OSError as e:
                    self._pending.pop(rid, None)
                    why = f"audit writer process is gone ({describe(e)})"
            else:
                why = self._dead
        self._die(why)
        raise AuditError(self._dead or why)

    def release(self) -> None:
        """Send the requests held back (``submit(hold=True)``) now."""
        with self._lock:
            if not self._held or self._dead is not None:
                return
            data = b"".join(self._held)
            self._held.clear()
            try:
                write_all(self._wfd, data)
                return
            except OSError as e:
                why = f"audit writer process is gone ({describe(e)})"
        self._die(why)

    def call(self, op: str, *args: object, timeout: float | None = None) -> object:
        return self.wait(self.submit(op, *args), timeout)

    # -- replies ------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read replies on ``loop`` (call from its thread) instead of a thread of our own:
        no thread wake-up, and no GIL hand-over, per commit."""
        if self._loop is not None or self._dead is not None:
            return
        self._loop = loop
        self._loop_thread = threading.get_ident()
        loop.add_reader(self._rfd, self.pump)

    def _detach(self) -> bool:
        """Stop reading on the loop; False if that is left to the loop's thread (the pipe
        must then stay open: its descriptor number is the loop's key)."""
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return True
        try:
            running = asyncio.get_running_loop() is loop
        except RuntimeError:
            running = False
        if running:
            loop.remove_reader(self._rfd)
            return True
        self._removal_pending = True  # the descriptor stays open: it is the loop's key
        loop.call_soon_threadsafe(loop.remove_reader, self._rfd)
        return False

    def _read(self) -> None:
        """Until attached to an event loop: wait for replies and pump them."""
        while self._loop is None and self._dead is None and not self._closing:
            try:
                ready, _, _ = select.select([self._rfd], [], [], POLL)
            except (OSError, ValueError):
                return
            if ready:
                self.pump()

    def pump(self) -> None:
        """Resolve the futures of every reply that has arrived; never blocks."""
        with self._rlock:
            while True:
                try:
                    chunk = os.read(self._rfd, 65536)
                except BlockingIOError:
                    return
                except OSError as e:
                    why = f"audit writer channel failed: {describe(e)}"
                    break
                if not chunk:
                    why = "audit writer process exited"
                    break
                try:
                    msgs = self._parser.feed(chunk)
                except AuditError as e:
                    why = e.one_line()
                    break
                for msg in msgs:
                    if msg[0] == LOG:
                        level = msg[2] if isinstance(msg[2], int) else logging.ERROR
                        log.log(level, "audit writer: %s", msg[3] if len(msg) > 3 else "?")
                        continue
                    entry = self._pending.pop(msg[1], None)  # type: ignore[call-overload]
                    if entry is None:
                        continue
                    _resolve(entry, msg)
                if len(chunk) < 65536:
                    return
        self._detach()
        code = self._proc.poll()  # never blocks: this may be the event loop
        if self._closing:
            self._die("audit writer is closed")
        else:
            self._die(f"{why} (status {code}); every request is refused until it is restarted")

    def wait[T](self, fut: Future[T], timeout: float | None) -> T:
        """fut's result, pumping replies meanwhile (the caller may be the loop's thread)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # On the loop's thread nobody else reads replies: wait for the pipe. Elsewhere the
        # reader thread or the loop does, and may take the reply before this thread's select
        # sees it (a lost wake-up worth the whole slice): wait for the future itself.
        own = self._loop is not None and threading.get_ident() == self._loop_thread
        while not fut.done():
            left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if left <= 0:
                break
            if own:
                try:
                    select.select([self._rfd], [], [], left)
                except (OSError, ValueError):
                    break
            else:
                futures_wait([fut], left)
            self.pump()
        return fut.result(0 if fut.done() else timeout)

    def _die(self, why: str) -> None:
        with self._lock:
            if self._dead is not None:
                return
            self._dead = why
            pending, self._pending = self._pending, {}
            self._held.clear()
        if self._proc.poll() is None and not self._closing:
            self._proc.kill()  # a broken channel: nobody may write with that child any more
        for fut, _ in pending.values():
            with contextlib.suppress(InvalidStateError):
                if not fut.done():
                    fut.set_exception(AuditError(why))
        if not self._closing:
            log.error("%s", why)

    def close(self) -> None:
        """Let the child commit what it holds and exit (EOF on its stdin), and resolve the
        futures of what it committed. Idempotent."""
        self.release()
        with self._lock:
            self._closing = True
            stdin = self._proc.stdin
            if stdin is not None and not stdin.closed:
                with contextlib.suppress(OSError):
                    stdin.close()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._dead is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                select.select([self._rfd], [], [], POLL)
            self.pump()  # reads the last replies, then EOF
        if self._dead is None:
            log.error("audit writer process did not stop in %.0f s; killing it", STOP_TIMEOUT)
            self._proc.kill()
            self._die("audit writer process killed")
        try:
            self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(STOP_TIMEOUT)
        if self._detach() and not self._removal_pending and self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> AuditWriterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteAuditLog:
    """One tenant's audit log in an :class:`AuditWriterProcess`; same surface as AuditLog.

    ``owner`` (a :class:`~aiid_proxy.audit.writers.ProcessWriters`) restarts a writer process
    that died and moves this log to the new one (:meth:`rebind`): records sent to the dead one
    failed, the chain goes on from the database's head."""

    def __init__(
        self,
        service: AuditWriterProcess,
        tid: int,
        path: Path,
        tenant: str,
        clock: Clock,
        head: tuple[int, str],
        *,
        root_key: bytes,
        ckpt: Path | None,
    ) -> None:
        self.path = path
        self.tenant = tenant
        self.checkpoint_path = ckpt
        self.owner: Reviver | None = None
        self._root_key = bytes(root_key)  # to reopen in a restarted writer
        self._bound = (service, tid)  # one attribute: read and replaced atomically
        self._clock = clock
        self._head = head
        self._head_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RemoteAuditLog(path={str(self.path)!r}, tenant={self.tenant!r})"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def service(self) -> AuditWriterProcess:
        return self._bound[0]

    def reopen_in(self, service: AuditWriterProcess) -> tuple[int, tuple[int, str]]:
        """Open this log in another writer process (not yet used: see :meth:`rebind`)."""
        return service.open_log(self.path, self.tenant, self._root_key, self.checkpoint_path, False)

    def rebind(self, service: AuditWriterProcess, tid: int, head: tuple[int, str]) -> None:
        """From now on, send records to ``service`` as its log ``tid``."""
        with self._head_lock:
            if head[0] >= self._head[0]:
                self._head = head
        self._bound = (service, tid)

    def append(self, event: str, **fields: object) -> Future[AppendResult]:
        """Queue a record; the future resolves once the child has durably committed it."""
        return self._append(event, fields)[1]

    def append_once(self, event: str, **fields: object) -> Future[AppendResult]:
        """As AuditLog.append_once: not written again if the log holds it already."""
        return self._append(event, fields, once=True)[1]

    def write_once(self, event: str, timeout: float, **fields: object) -> AppendResult:
        """:meth:`append_once`, sent at once and waited for (at most ``timeout`` s), reading
        the replies itself: the caller may be the loop's thread, blocked (the shutdown)."""
        service, fut = self._append(event, fields, once=True)
        service.release()
        return service.wait(fut, timeout)

    def _append(
        self, event: str, fields: dict[str, object], *, once: bool = False
    ) -> tuple[AuditWriterProcess, Future[AppendResult]]:
        values = normalize(event, fields)
        if self._closed:
            raise AuditError("audit log is closed")
        service, tid = self._bound
        if service.dead and self.owner is not None:
            self.owner.revive(self._clock.monotonic())  # in the background; this one fails
        ts = format_ts(self._clock.now())
        fut = service.submit(
            APPEND,
            tid,
            ts,
            values,
            *((True,) if once else ()),
            convert=self._committed,
            hold=is_lazy(values) and not once,  # a retry does not wait for company
        )
        return service, fut  # type: ignore[return-value]  # resolved with an AppendResult

    def _committed(self, payload: object) -> AppendResult:
        result = AppendResult(*_seq_mac(payload, APPEND))
        with self._head_lock:
            if result.seq > self._head[0]:
                self._head = (result.seq, result.mac)
        return result

    def append_sync(self, event: str, **fields: object) -> AppendResult:
        service, fut = self._append(event, fields)
        service.release()  # nothing held back: this caller waits
        return service.wait(fut, None)

    def head(self) -> tuple[int, str]:
        """The last (seq, mac) this gateway saw committed; (0, GENESIS_MAC) for an empty log."""
        with self._head_lock:
            return self._head if self._head[0] else (0, GENESIS_MAC)

    def checkpoint(self) -> None:
        service, tid = self._bound
        service.call(CHECKPOINT, tid)

    def close(self) -> None:
        """Commit everything pending and write a last checkpoint. Idempotent."""
        if self._closed:
            return
        self._closed = True
        service, tid = self._bound
        if service.dead:
            return  # nothing it could commit: what it held failed already
        try:
            service.call(CLOSE, tid)
        except AuditError as e:
            log.error("closing audit log of %s: %s", self.tenant, e.one_line())


class Reviver(Protocol):
    def revive(self, now: float) -> None: ...
