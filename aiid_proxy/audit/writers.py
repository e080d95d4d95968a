"""Where a gateway's audit logs are written: writer threads here, or a supervised child process.

``writer_factory("process")`` gives :class:`ProcessWriters`: one
:class:`~aiid_proxy.audit.service.AuditWriterProcess` at a time. When it dies (killed, out of
memory, a broken pipe) every record sent to it fails and its requests are refused: fail closed.
The next record a log is asked for starts a replacement in the background, at most once per
:data:`RESPAWN_AFTER` seconds; the new child reopens every tenant's log where the database's
chain ends, and the logs move over to it. Requests are refused until then, never let through.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiid_proxy.audit.frames import STOP_TIMEOUT
from aiid_proxy.audit.log import AuditLog
from aiid_proxy.audit.service import (
    AuditAppender,
    AuditWriterProcess,
    RemoteAuditLog,
)
from aiid_proxy.audit.store import describe
from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import AiidError, AuditError

log = logging.getLogger(__name__)


def log_unwritten(fut: concurrent.futures.Future[Any]) -> None:
    """A done-callback for a record nobody awaits: a failure to write it is logged."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("audit record not written: %s", fut.exception())


RESPAWN_AFTER = 1.0  # seconds between two attempts to replace a dead writer process


class ThreadWriters:
    """The "thread" mode: each tenant's AuditLog has its own writer thread here."""

    def open(self, path: Path, tenant: str, root_key: bytes, **kw: object) -> AuditAppender:
        return AuditLog(path, tenant, root_key, **kw)  # type: ignore[arg-type]

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def close(self) -> None:
        pass


class ProcessWriters:
    """The "process" mode: one writer process, replaced when it dies."""

    def __init__(self, keep_fds: tuple[int, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._keep_fds = keep_fds
        self._writer = AuditWriterProcess(keep_fds=keep_fds)
        self._logs: weakref.WeakSet[RemoteAuditLog] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_attempt: float | None = None
        self._reviving: threading.Thread | None = None
        self._closed = False
        self.restarts = 0

    def __repr__(self) -> str:
        return f"ProcessWriters({self._writer!r}, restarts={self.restarts})"

    @property
    def writer(self) -> AuditWriterProcess:
        return self._writer

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
        writer = self._writer
        if writer.dead:
            self.revive(clock.monotonic())
        lg = writer.open(
            path, tenant, root_key, checkpoint_path=checkpoint_path, clock=clock, create=create
        )
        lg.owner = self
        with self._lock:
            self._logs.add(lg)
        return lg

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read replies on ``loop`` (call from its thread), this writer's and its successors'."""
        self._loop = loop
        self._writer.attach(loop)

    def revive(self, now: float) -> None:
        """Called by a log whose writer is dead: replace the writer, or move the logs still
        bound to a dead one, in the background; at most one attempt per RESPAWN_AFTER s."""
        with self._lock:
            if self._closed or self._reviving is not None:
                return
            if not self._writer.dead and not any(_stranded(lg) for lg in self._logs):
                return
            if self._last_attempt is not None and now - self._last_attempt < RESPAWN_AFTER:
                return
            self._last_attempt = now
            self._reviving = threading.Thread(
                target=self._replace, name="aiid-audit-revive", daemon=True
            )
            self._reviving.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for a replacement under way (tests, shutdown)."""
        thread = self._reviving
        if thread is not None:
            thread.join(timeout)

    def _replace(self) -> None:
        try:
            self._replace_once()
        except Exception as e:  # whatever it was: the next attempt must stay possible
            log.error(
                "audit writer process could not be restarted (next try in %.0f s): %s",
                RESPAWN_AFTER,
                e.one_line() if isinstance(e, AiidError) else describe(e),
            )
        finally:
            with self._lock:
                self._reviving = None

    def _replace_once(self) -> None:
        with self._lock:
            current = self._writer
            logs = [lg for lg in self._logs if _stranded(lg)]
        target = AuditWriterProcess(keep_fds=self._keep_fds) if current.dead else current
        installed = False
        try:
            moved = []
            for lg in logs:
                tid, head = lg.reopen_in(target)
                acked = lg.head()
                if head[0] < acked[0] or (head[0] == acked[0] and head[1] != acked[1]):
                    # Committed records do not vanish when a process dies: this database was
                    # truncated or rewritten. The tenant stays refused; verify will name it.
                    log.critical(
                        "audit log of %s now ends at seq %d, before seq %d this gateway saw "
                        "committed: not reopened, its requests stay refused",
                        lg.tenant,
                        head[0],
                        acked[0],
                    )
                    continue
                moved.append((lg, tid, head))
            with self._lock:
                if self._closed:
                    return
                self._writer = target
                for lg, tid, head in moved:
                    lg.rebind(target, tid, head)
                installed = True
        finally:
            if target is not current and not installed:
                target.close()
        if target is current:
            log.warning("audit logs moved to the running writer process: %d", len(moved))
            return
        self.restarts += 1
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(target.attach, loop)
        current.close()
        log.warning(
            "audit writer process restarted (pid %d): %d tenant logs reopened",
            target.pid,
            len(moved),
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._reviving
        if thread is not None:
            thread.join(STOP_TIMEOUT)
        self._writer.close()


def _stranded(lg: RemoteAuditLog) -> bool:
    return not lg.closed and lg.service.dead


def writer_factory(mode: str, keep_fds: tuple[int, ...] = ()) -> ThreadWriters | ProcessWriters:
    """The audit writers for ``mode``: "thread" (in-process) or "process" (a child, which
    keeps ``keep_fds`` open: see AuditWriterProcess)."""
    if mode == "thread":
        return ThreadWriters()
    if mode == "process":
        return ProcessWriters(keep_fds)
    raise AuditError(f"unknown audit writer mode {mode!r} (thread or process)")


WRITER_MODES: Mapping[str, str] = {
    "process": "a child process holds the audit logs (no GIL shared with the event loop); "
    "restarted when it dies",
    "thread": "a writer thread in the gateway process",
}
