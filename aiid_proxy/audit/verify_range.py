"""The fast chain check over one seq range, shared by ``verify`` and its worker processes.

Stdlib only, on purpose: ``aiid audit verify`` runs this file as a script
(``python -I -S verify_range.py``) in one worker process per extra core, and a worker that
imports nothing of ours starts in ~25 ms. The job arrives on stdin as one ``marshal`` frame
(the database URI and path, the range query, the tenant key, the range and the mac before it),
never in the argument list or the environment; the reply on stdout is the first seq the range
did not verify (its end when every row verified) and the identity of the files it read
(:func:`open_files`): a file swapped in under the same path meanwhile must not pass.

A row verifies when it has the seq expected next, a ``latency_ms`` whose rendering is exact
(see :mod:`aiid_proxy.audit.verify`), and SQLite's rendering of its maced columns, HMACed
after the previous row's mac, reproduces its stored mac. Anything else stops the run: the
caller decides that row exactly, or falls back to the sequential pass.
"""

from __future__ import annotations

import hmac
import marshal
import sqlite3
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

LAT_BOUND = 1e9  # |latency_ms| below this has at most 12 significant digits at 3 decimals
FETCH_BATCH = 4096
BUSY_TIMEOUT = 5.0

Row = tuple[int, bytes, Any, str]  # seq, rendered maced columns, raw latency_ms, stored mac


class Mac(Protocol):
    """A keyed HMAC-SHA256 state (``hmac.HMAC`` or OpenSSL's)."""

    def copy(self) -> Mac: ...
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


def keyed_mac(key: bytes) -> Mac:
    """A keyed HMAC-SHA256 to ``.copy()`` per record (the key schedule runs once)."""
    try:
        import _hashlib  # the C object: its copy() skips hmac.HMAC's Python wrapper

        mac: Mac = _hashlib.hmac_new(key, digestmod="sha256")
        return mac
    except (ImportError, ValueError):  # pragma: no cover - OpenSSL always present in CPython
        return hmac.new(key, digestmod="sha256")


def clean(
    batch: Sequence[Row],
    i: int,
    copy: Callable[[], Mac],
    expected: int,
    prev: bytes,
    stop: int,
) -> tuple[int, int, bytes]:
    """Verify ``batch[i:]`` while rows chain on, stopping before the row numbered ``stop``.

    Returns ``(index, expected, prev)``: the index of the first row not verified
    (``len(batch)`` if all were), the seq expected next and the last verified mac.
    """
    n = len(batch)
    while i < n:
        seq, rendered, lat, mac = batch[i]
        if seq != expected or seq == stop:
            break
        if lat is not None and not (
            lat.__class__ is float
            and -LAT_BOUND < lat < LAT_BOUND
            and round(lat * 1000.0) / 1000.0 == lat
        ):
            break
        h = copy()
        h.update(prev + rendered)
        digest: bytes = h.digest()
        if digest.hex() != mac:
            break
        prev = digest
        expected = seq + 1
        i += 1
    return i, expected, prev


def run_range(
    conn: sqlite3.Connection,
    sql: str,
    copy: Callable[[], Mac],
    start: int,
    end: int,
    prev: bytes,
) -> int:
    """Verify seqs ``[start, end)`` with ``sql`` (bound to start and end); the first seq that
    did not verify, ``end`` if every one did."""
    cur = conn.execute(sql, (start, end))
    expected = start
    while batch := cur.fetchmany(FETCH_BATCH):
        i, expected, prev = clean(batch, 0, copy, expected, prev, -1)
        if i < len(batch):
            return expected
    return expected


def open_files(path: str) -> dict[str, tuple[int, int]] | None:
    """(device, inode) of each file of the database at ``path`` this process has open (the
    database itself under "", its "-wal" and "-shm"), as the kernel holds them: what was read,
    whatever the path names now. None where that cannot be known (no /proc)."""
    real = str(Path(path).resolve())
    names = {real: "", real + "-wal": "-wal", real + "-shm": "-shm"}
    out: dict[str, tuple[int, int]] = {}
    try:
        fds = list(Path("/proc/self/fd").iterdir())
    except OSError:
        return None
    for link in fds:
        try:
            suffix = names.get(str(link.readlink()))
            if suffix is None:
                continue
            st = link.stat()  # the open file itself, not what the path names now
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out[suffix] = (st.st_dev, st.st_ino)
    return out


def _worker() -> int:
    # From our own parent, over a pipe only it holds.
    uri, path, sql, key, start, end, prev_hex = marshal.load(sys.stdin.buffer)  # noqa: S302
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT)
    try:
        copy = keyed_mac(key).copy
        reached = run_range(conn, sql, copy, start, end, bytes.fromhex(prev_hex))
        files = open_files(path)  # while still open: the files this range was read from
    finally:
        conn.close()
    sys.stdout.buffer.write(marshal.dumps((reached, files)))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker())
