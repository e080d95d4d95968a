"""When the audit writer's records are power-safe and anchored: the fsync of lazily committed
records (``record.LAZY_EVENTS``) and the head written to the checkpoint file. A mixin of
:class:`~aiid_proxy.audit.log.AuditLog`, whose writer calls :meth:`Durability.idle` when quiet
for :meth:`Durability.idle_timeout` seconds and after each batch."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from aiid_proxy.audit.store import describe
from aiid_proxy.clock import Clock
from aiid_proxy.errors import AuditError
from aiid_proxy.home import append_durable

log = logging.getLogger("aiid_proxy.audit.log")

CHECKPOINT_INTERVAL = 0.5  # seconds of clock.monotonic() between automatic checkpoints
LAZY_SYNC = 0.5  # seconds of quiet after which lazily committed records are fsync'd


class Durability:
    """The fsync and checkpoint state of one audit log (set up by the log's constructor)."""

    path: Path
    _clock: Clock
    _head: tuple[int, str]
    _head_lock: threading.Lock
    _ckpt_lock: threading.Lock
    _checkpoint_path: Path | None
    _last_ckpt: tuple[int, str] | None
    _last_ckpt_at: float
    _lazy_gen: int
    _synced_gen: int
    _unsynced_at: float

    def head(self) -> tuple[int, str]:
        """The last committed (seq, mac); (0, GENESIS_MAC) for an empty log."""
        with self._head_lock:
            return self._head

    def checkpoint(self) -> None:
        """Append the current head as ``seq:mac`` to the checkpoint file (fsync'd)."""
        try:
            self._write_checkpoint(self.head(), force=True)
        except OSError as e:
            raise AuditError(f"cannot write audit checkpoint: {describe(e)}") from None

    # -- durability of lazily committed records -----------------------------
    @property
    def unsynced(self) -> bool:
        """Records committed with synchronous=NORMAL wait for an fsync (see LAZY_EVENTS)."""
        return self._lazy_gen != self._synced_gen

    def overdue(self) -> bool:
        """Lazily committed records have waited LAZY_SYNC seconds for an fsync."""
        return self.unsynced and self._clock.monotonic() - self._unsynced_at >= LAZY_SYNC

    def idle_timeout(self) -> float | None:
        """Seconds the owner may wait for more records before calling :meth:`idle`; None when
        nothing waits. Lazily committed records wait LAZY_SYNC seconds of quiet; a committed
        head not yet in the checkpoint file waits until CHECKPOINT_INTERVAL has passed since
        the last one, so the last records before a quiet spell are anchored within it."""
        waits: list[float] = []
        if self.unsynced:
            waits.append(LAZY_SYNC)
        if self._checkpoint_path is not None:
            head = self.head()
            if head[0] and head != self._last_ckpt:
                due = self._last_ckpt_at + CHECKPOINT_INTERVAL - self._clock.monotonic()
                waits.append(min(max(due, 0.0), CHECKPOINT_INTERVAL))
        return min(waits) if waits else None

    def idle(self) -> None:
        """Make lazily committed records durable now (the writer had LAZY_SYNC seconds of
        quiet, or they are overdue), then write a due checkpoint."""
        try:
            self._sync()
        except OSError as e:
            log.error("cannot sync the audit log: %s", describe(e))
            # retried an interval later: idle_timeout would otherwise say 0 at once, for a
            # checkpoint due, and the writer spin on the failing sync
            self._last_ckpt_at = self._clock.monotonic()
            return
        self._auto_checkpoint(force=False)

    def _sync(self) -> None:
        """fsync the WAL if records were committed without one. The WAL holds every frame
        not yet checkpointed into the database file, and SQLite syncs the database file at
        each checkpoint, so this makes every committed record durable."""
        with self._head_lock:
            gen = self._lazy_gen
            if gen == self._synced_gen:
                return
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            fd = -1  # checkpointed into the database file and removed: synced by SQLite
        if fd >= 0:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with self._head_lock:  # what was committed before the fsync started is covered
            self._synced_gen = max(self._synced_gen, gen)

    # -- checkpoints --------------------------------------------------------
    def _auto_checkpoint(self, force: bool) -> None:
        if self._checkpoint_path is None:
            return
        if not force and self._clock.monotonic() - self._last_ckpt_at < CHECKPOINT_INTERVAL:
            return
        try:
            self._write_checkpoint(self.head(), force=force)
        except OSError as e:
            log.error("cannot write audit checkpoint: %s", describe(e))
            self._last_ckpt_at = self._clock.monotonic()  # retried an interval later

    def _write_checkpoint(self, head: tuple[int, str], force: bool) -> None:
        path = self._checkpoint_path
        if path is None:
            return
        with self._ckpt_lock:
            if head[0] == 0 or head == self._last_ckpt:
                return
            if not force and self._clock.monotonic() - self._last_ckpt_at < CHECKPOINT_INTERVAL:
                return
            self._sync()  # a checkpoint names records that are on disk
            path.parent.mkdir(parents=True, exist_ok=True)
            append_durable(path, f"{head[0]}:{head[1]}\n")
            self._last_ckpt = head
            self._last_ckpt_at = self._clock.monotonic()
