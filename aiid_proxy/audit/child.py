"""The audit writer process itself (``python -m aiid_proxy.audit.child``): it reads request
frames from stdin, commits them with :class:`~aiid_proxy.audit.log.AuditLog` (one per tenant,
``threaded=False``) and answers on stdout. It ignores SIGINT/SIGTERM (a Ctrl-C reaches the
whole process group) and stops at EOF on stdin, after committing what it was sent: the
gateway's orderly close, or the gateway's death, never cuts a batch short."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path

from aiid_proxy.audit.frames import (
    APPEND,
    CHECKPOINT,
    CLOSE,
    ERR,
    LOG,
    OK,
    OPEN,
    STOP_TIMEOUT,
    FrameParser,
    frame,
)
from aiid_proxy.audit.log import AuditLog
from aiid_proxy.audit.record import AppendResult
from aiid_proxy.audit.store import describe
from aiid_proxy.errors import AiidError, AuditError


def read_batches(
    fd: int, logs: Mapping[int, AuditLog] | None = None
) -> Iterator[list[tuple[object, ...]]]:
    """The frames read from blocking ``fd``, as the list each read completed, until EOF;
    AuditError on a torn or malformed frame. While one of ``logs`` has idle work (lazily
    committed records to fsync, a head to checkpoint: ``AuditLog.idle_timeout``), a quiet
    spell that long runs it (``AuditLog.idle``)."""
    parser = FrameParser()
    while True:
        while logs:
            waits = [t for lg in logs.values() if (t := lg.idle_timeout()) is not None]
            if not waits:
                break
            ready, _, _ = select.select([fd], [], [], min(waits))
            if ready:
                break
            for lg in list(logs.values()):
                if lg.idle_timeout() is not None:
                    lg.idle()  # quiet: sync lazy records, write a due checkpoint
        chunk = os.read(fd, 65536)
        if not chunk:
            if parser.partial:
                raise AuditError("audit writer channel closed inside a frame")
            return
        got = parser.feed(chunk)
        if got:
            yield got


class Replies:
    """Replies from the child, buffered per batch and written in one go.

    The write never blocks the child's reading: what the pipe cannot take at once goes to a
    thread that waits for the gateway to read it. (Were the child to block writing replies,
    it would stop reading requests; a gateway blocked writing requests then never reads the
    replies: both would wait forever.)"""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self._lock = threading.Lock()
        self._buf: list[bytes] = []
        self._backlog: list[bytes] = []
        self._ready = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None

    def send(self, msg: tuple[object, ...]) -> None:
        with self._lock:
            self._buf.append(frame(msg))
            self._flush_locked()

    def on_done(self, rid: int, fut: Future[AppendResult]) -> None:
        exc = fut.exception()
        if exc is None:
            r = fut.result()
            data = frame((OK, rid, (r.seq, r.mac)))
        else:
            data = frame((ERR, rid, _message(exc)))
        with self._lock:
            self._buf.append(data)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._buf or self._closed:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        if not self._backlog:
            with contextlib.suppress(BlockingIOError):
                data = data[os.write(self._fd, data) :]
            if not data:
                return
        self._backlog.append(data)
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="replies", daemon=True)
            self._thread.start()
        self._ready.notify()

    def _drain(self) -> None:
        """Write the backlog as the gateway reads; stop when the gateway is gone."""
        while True:
            with self._lock:
                while not self._backlog and not self._closed:
                    self._ready.wait()
                if not self._backlog:
                    return
                data = self._backlog[0]
            try:
                select.select([], [self._fd], [])
                n = os.write(self._fd, data)
            except BlockingIOError:
                continue
            except OSError:
                with self._lock:
                    self._closed = True
                    self._backlog.clear()
                return
            with self._lock:
                if n < len(data):
                    self._backlog[0] = data[n:]
                else:
                    self._backlog.pop(0)

    def close(self, timeout: float) -> None:
        """Write what is left (while the gateway reads, up to ``timeout``), then stop."""
        self.flush()
        with self._lock:
            self._closed = True
            self._ready.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


def _message(exc: BaseException) -> str:
    if isinstance(exc, AiidError):
        return exc.one_line()
    return f"audit write failed: {describe(exc)}"


def serve(rfd: int, wfd: int) -> int:
    """The child's loop: everything one read brings is queued, then committed as one batch per
    tenant (appends that arrive during a commit make up the next batch), then answered in one
    write. Requests of a tenant are handled in the order they were sent."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    out = Replies(wfd)
    root = logging.getLogger()
    logging.raiseExceptions = False  # a log line the gateway can no longer take is dropped
    root.addHandler(_LogToParent(out))
    root.setLevel(logging.INFO)
    logs: dict[int, AuditLog] = {}
    status = 0
    try:
        for msgs in read_batches(rfd, logs):
            dirty: dict[int, AuditLog] = {}
            for msg in msgs:
                _handle(msg, logs, dirty, out)
            for lg in dirty.values():
                lg.drain()
            out.flush()
            for lg in logs.values():  # one tenant's traffic does not delay another's fsync
                if lg.overdue():
                    lg.idle()
    except (AuditError, OSError) as e:  # a torn channel, or the gateway went away mid-write
        print(f"aiid audit writer: {_message(e)}", file=sys.stderr)
        status = 1
    finally:
        for lg in logs.values():
            lg.close()  # commits what was queued
        with contextlib.suppress(OSError):
            out.close(STOP_TIMEOUT)
    return status


def _handle(
    msg: tuple[object, ...], logs: dict[int, AuditLog], dirty: dict[int, AuditLog], out: Replies
) -> None:
    op, rid, args = msg[0], msg[1], msg[2:]
    assert isinstance(rid, int)
    try:
        tid = args[0]
        if not isinstance(tid, int):
            raise AuditError("audit writer: bad request")
        if op == APPEND:
            lg = logs.get(tid)
            if lg is None:
                raise AuditError("audit log is closed")
            ts, values = args[1], args[2]
            once = len(args) > 3 and args[3] is True  # AuditLog.append_once
            if not (isinstance(ts, str) and isinstance(values, tuple)):
                raise AuditError("audit writer: bad request")
            fut = lg.submit(ts, values, once=once)
            fut.add_done_callback(lambda f: out.on_done(rid, f))
            dirty[tid] = lg
            return
        pending = dirty.pop(tid, None)
        if pending is not None:  # what was sent before this request is committed first
            pending.drain()
        if op == OPEN:
            path, tenant, key, ckpt, create = args[1:6]
            if not (isinstance(path, str) and isinstance(tenant, str) and isinstance(key, bytes)):
                raise AuditError("audit writer: bad request")
            lg = AuditLog(
                Path(path),
                tenant,
                key,
                checkpoint_path=Path(ckpt) if isinstance(ckpt, str) else None,
                create=bool(create),
                after_batch=out.flush,
                threaded=False,
            )
            logs[tid] = lg
            out.send((OK, rid, lg.head()))
        elif op == CHECKPOINT:
            lg = logs.get(tid)
            if lg is None:
                raise AuditError("audit log is closed")
            lg.checkpoint()
            out.send((OK, rid, None))
        elif op == CLOSE:
            lg = logs.pop(tid, None)
            if lg is not None:
                lg.close()
            out.send((OK, rid, None))
        else:
            raise AuditError(f"audit writer: unknown request {op!r}")
    except Exception as e:
        out.send((ERR, rid, _message(e)))


class _LogToParent(logging.Handler):
    """The child's log records go to the gateway's log (its terminal may be a live console)."""

    def __init__(self, out: Replies) -> None:
        super().__init__(logging.INFO)
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.send((LOG, 0, record.levelno, record.getMessage()))
        except Exception:
            self.handleError(record)


def main() -> int:
    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    # Nothing else may write to the reply channel.
    wfd = os.dup(wfd)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return serve(rfd, wfd)


if __name__ == "__main__":
    raise SystemExit(main())
