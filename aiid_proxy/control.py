"""Human-in-the-loop approvals: the broker that holds `approve` flows, and the local control
channel (`aiid approve` / `aiid deny`) that answers them.

The channel is a Unix socket in ``runtime/control/`` (directory 0700, socket 0600), and the
server also checks the peer's uid (SO_PEERCRED): only the gateway's own user can answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import AiidError, ConfigError
from aiid_proxy.home import Home

log = logging.getLogger("aiid.control")
SOCKET_NAME = "aiid.sock"
MAX_MESSAGE = 4096
MAX_GRANT = 24 * 3600  # seconds an approval's ttl may cover (`aiid approve --ttl`)


MAX_SOCKET_PATH = 100  # bytes: a Unix socket's path must fit in 108 (107 and a NUL)


def socket_path(home: Home) -> Path:
    """``runtime/control/aiid.sock``; when that path is too long for a Unix socket (a home
    path of ~80 characters and more), a socket named after the home in a private directory
    of this user's under the system's temp directory."""
    p = home.control_dir / SOCKET_NAME
    if len(os.fsencode(p)) <= MAX_SOCKET_PATH:
        return p
    digest = hashlib.sha256(os.fsencode(home.root.resolve())).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"aiid-{os.getuid()}" / f"{digest}.sock"


def _private_dir(d: Path, *, create: bool) -> None:
    """``d`` is a directory of this user's that nobody else may enter (created so when
    ``create``); OSError otherwise: another user's socket there could take the answers."""
    if create:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"{d} is not a directory of this user's")
    if st.st_mode & 0o077:
        if not create:
            raise OSError(f"{d} is open to other users")
        d.chmod(0o700)


@dataclass(frozen=True)
class Answer:
    approved: bool
    by: str
    reason: str = ""
    ttl: float | None = None


@dataclass
class Pending:
    tenant: str
    request_id: str
    key: tuple[str, ...]
    deadline: float
    future: asyncio.Future[Answer] = field(repr=False)


class ApprovalBroker:
    """Pending approvals by request id, plus TTL grants (approve once or for a while)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self.pending: dict[str, Pending] = {}
        self.grants: dict[tuple[str, ...], tuple[float, str]] = {}

    def granted(self, key: tuple[str, ...]) -> str | None:
        g = self.grants.get(key)
        if g is None:
            return None
        until, by = g
        if self.clock.now() >= until:
            del self.grants[key]
            return None
        return by

    def hold(self, tenant: str, request_id: str, key: tuple[str, ...], timeout: float) -> Pending:
        loop = asyncio.get_running_loop()
        p = Pending(tenant, request_id, key, self.clock.now() + timeout, loop.create_future())
        self.pending[request_id] = p
        return p

    def release(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def answer(self, tenant: str, request_id: str, ans: Answer) -> str:
        """Answer one held request. An approval with a TTL also grants every later request
        with the same key, and releases the ones already waiting with that key."""
        if ans.ttl is not None and not (math.isfinite(ans.ttl) and 0 < ans.ttl <= MAX_GRANT):
            # checked before anything is answered: a NaN made a grant no clock ever ended
            raise AiidError(f"an approval's ttl must be over 0 and at most {MAX_GRANT} s")
        p = self.pending.get(request_id)
        if p is None or p.tenant != tenant:
            raise AiidError(f"no pending request {request_id} for tenant {tenant}")
        if p.future.done():
            raise AiidError(f"request {request_id} was already answered")
        p.future.set_result(ans)
        if not (ans.approved and ans.ttl):
            return f"{'approved' if ans.approved else 'denied'} {request_id}"
        self.grants[p.key] = (self.clock.now() + ans.ttl, ans.by)
        also = 0
        for other in list(self.pending.values()):
            if other.key == p.key and not other.future.done():
                other.future.set_result(
                    Answer(True, ans.by, f"covered by the approval of {request_id}")
                )
                also += 1
        more = f" and {also} more waiting" if also else ""
        return f"approved {request_id}{more}, and matching requests for {int(ans.ttl)} s"


def operator_name() -> str:
    """Who decides: $USER, else the login name of this process's user."""
    import getpass

    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


LOCK_WAIT = 3.0  # seconds a gateway waits for the home lock before it refuses to start


class HomeLock:
    """One gateway per home: an exclusive lock (``flock``) on ``runtime/control/gateway.lock``
    for the process's lifetime. Two gateways would each enforce the tenants' rate limits and
    budgets alone, and approvals would reach only one. Atomic where a check of the control
    socket is not (two gateways started at the same moment both passed it)."""

    def __init__(self, home: Home) -> None:
        d = home.control_dir
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        self.root = home.root
        path = d / "gateway.lock"
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _pid_in(self._fd)
                # A live gateway holds it: refused at once. Else the audit writer of one that
                # was killed (it keeps the lock while it commits what it was sent, which takes
                # milliseconds): waited for, a few seconds.
                if (holder is not None and _alive(holder)) or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
                continue
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
            return
        os.close(self._fd)
        self._fd = None
        if holder is not None and _alive(holder):
            raise ConfigError(
                f"another gateway (pid {holder}) is running on the home {home.root}: two would "
                "each enforce the rate limits and budgets alone, and write the same audit "
                "logs; stop it first"
            )
        gone = f" (pid {holder})" if holder is not None else ""
        raise ConfigError(
            f"the audit writer process of a gateway that was killed{gone} still holds the home "
            f"{home.root}: it exits once it has committed what it was sent; a stopped one "
            f"must be continued (kill -CONT) or killed (`fuser {path}` names it)"
        )

    @property
    def fds(self) -> tuple[int, ...]:
        """The lock's descriptor, for a child that must hold the home with this process."""
        return () if self._fd is None else (self._fd,)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # no gateway holds it any more (a writer may)
            os.close(self._fd)  # the last descriptor closed (the writer's too) releases it
            self._fd = None


def _pid_in(fd: int) -> int | None:
    """The pid the lock file names (the gateway that took it), if any."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    """``pid`` runs: not gone, and not a zombie its parent has yet to reap ([AP]: a killed
    gateway whose parent had not waited for it was taken for a live one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def _answers(path: Path) -> bool:
    """Whether something listens on the socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class ControlServer:
    def __init__(self, home: Home, handler: Callable[[dict[str, Any]], str]) -> None:
        self.home = home
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        d = self.home.control_dir
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        path = socket_path(self.home)
        if path.parent != d:  # the home's path is too long for a socket in it
            _private_dir(path.parent, create=True)
        if path.is_socket() and _answers(path):
            raise OSError(f"another gateway is running on this home ({path} answers)")
        if path.exists() or path.is_symlink():
            path.unlink()  # left over by a gateway that did not stop cleanly
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=MAX_MESSAGE
            )
        finally:
            os.umask(old)
        path.chmod(0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = _peer_uid(sock) if sock is not None else None
            if uid != os.getuid():
                log.warning("control channel: refused a connection from uid %s", uid)
                # take what it sent (unread), so the refusal reaches the client
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.read(MAX_MESSAGE), 1)
                reply: dict[str, Any] = {"ok": False, "message": "refused: not the gateway user"}
            else:
                reply = {"ok": True, "message": self.handler(await self._read(reader))}
        except (AiidError, ValueError, TimeoutError) as e:
            reply = {"ok": False, "message": " ".join(str(e).split())}
        except Exception as e:  # answer the client, keep serving
            log.exception("control request failed")
            reply = {"ok": False, "message": f"internal error: {type(e).__name__}"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout=5)
        except asyncio.LimitOverrunError:
            raise AiidError("message too large") from None
        except asyncio.IncompleteReadError as e:
            line = e.partial
        if len(line) > MAX_MESSAGE:
            raise AiidError("message too large")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise AiidError("expected a JSON object")
        return msg

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        with contextlib.suppress(OSError):
            socket_path(self.home).unlink()


def send_answer(home: Home, payload: dict[str, Any], timeout: float = 10.0) -> str:
    path = socket_path(home)
    if path.parent != home.control_dir:
        try:
            _private_dir(path.parent, create=False)
        except FileNotFoundError:
            pass  # no gateway ever served this home: said below
        except OSError as e:
            raise AiidError(f"the gateway's control socket is not safe to use: {e}") from None
    if not path.exists():
        raise AiidError(f"no running gateway for home {home.root} (no {path})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as e:
            raise AiidError(f"cannot reach the gateway: {e.strerror or e}") from None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(json.dumps(payload).encode() + b"\n")  # a refusal may come first
        data = b""
        try:
            while not data.endswith(b"\n") and len(data) < MAX_MESSAGE:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            raise AiidError(f"no reply from the gateway: {e.strerror or e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise AiidError("the gateway sent no valid reply") from None
    if not reply.get("ok"):
        raise AiidError(str(reply.get("message")))
    return str(reply.get("message"))
