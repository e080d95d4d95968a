"""The audit writer's wire: each frame is a 4-byte big-endian length and a ``marshal``-ed
tuple, over the child's stdin (requests) and stdout (replies). Requests carry an id; every
request gets exactly one reply ``(OK, id, payload)`` or ``(ERR, id, message)``."""

from __future__ import annotations

import marshal
import os
import struct

from aiid_proxy.errors import AuditError

OPEN, APPEND, CHECKPOINT, CLOSE = "open", "append", "checkpoint", "close"
OK, ERR, LOG = "ok", "err", "log"  # LOG: (LOG, 0, level, message), the child's logging
_LEN = struct.Struct("!I")
MAX_FRAME = 16 * 1024 * 1024
STOP_TIMEOUT = 30.0  # seconds the child gets to commit what is queued after its stdin closes


def frame(msg: tuple[object, ...]) -> bytes:
    body = marshal.dumps(msg)  # type: ignore[arg-type]  # a tuple of plain values
    return _LEN.pack(len(body)) + body


class FrameParser:
    """Frames out of a byte stream, fed as it arrives."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        return bool(self._buf)

    def feed(self, chunk: bytes) -> list[tuple[object, ...]]:
        buf = self._buf
        buf += chunk
        pos = 0
        got: list[tuple[object, ...]] = []
        while len(buf) - pos >= _LEN.size:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_FRAME:
                raise AuditError("audit writer channel: oversized frame")
            if len(buf) - pos - _LEN.size < n:
                break
            start = pos + _LEN.size
            try:
                # Our own pipe to/from our own child: nobody else can write to it.
                msg = marshal.loads(bytes(buf[start : start + n]))  # noqa: S302
            except (EOFError, ValueError, TypeError) as e:
                raise AuditError(f"audit writer channel: bad frame ({e})") from None
            if not isinstance(msg, tuple) or len(msg) < 2 or not isinstance(msg[1], int):
                raise AuditError("audit writer channel: bad frame")
            pos = start + n
            got.append(msg)
        del buf[:pos]
        return got


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
