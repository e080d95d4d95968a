"""Helpers for end-to-end tests: a real `aiid run` subprocess in front of the stand-in."""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
AIID = str(BIN / "aiid")

OPENAI_CANARY = "sk-canary-openai-7f3a9c2e51b84d06a1c3"
ANTHROPIC_CANARY = "sk-ant-canary-b81d4e0f92c6477aa5e2"
GITHUB_CANARY = "ghp_canary9d2f61a0c7e84b3f95"


# Below the kernel's ephemeral range (32768-60999 here): a port the OS handed out with bind(0)
# can be taken as the source port of any outgoing connection (the other xdist worker's
# clients) before the gateway binds it, and a gateway that waits for the home lock binds
# seconds later ("address already in use" in test_crash).
_PORTS = random.Random(os.getpid())


def free_port() -> int:
    """A port free now, outside the ephemeral range; bounded tries, then any free port."""
    for _ in range(200):
        port = _PORTS.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def aiid(
    home: Path,
    *args: str,
    input: str | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "AIID_HOME": str(home), **(env or {})}
    p = subprocess.run(
        [AIID, *args], input=input, capture_output=True, text=True, env=e, timeout=60
    )
    if check and p.returncode != 0:
        raise AssertionError(f"aiid {' '.join(args)} failed ({p.returncode}): {p.stderr}")
    return p


def make_home(root: Path, tenants: dict[str, dict[str, str]]) -> Path:
    """`aiid init`, then each tenant with its vault secrets {provider: secret}."""
    home = root / "home"
    aiid(home, "init")
    for t, secrets in tenants.items():
        aiid(home, "tenant", "add", t)
        for provider, secret in secrets.items():
            aiid(home, "vault", "put", t, provider, input=secret + "\n")
    return home


@dataclass
class Gateway:
    home: Path
    policies: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: list[str] = field(default_factory=list)

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.home / "certs" / "mitmproxy-ca-cert.pem"

    def agent_env(self, key: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(
            HTTPS_PROXY=self.proxy,
            https_proxy=self.proxy,
            SSL_CERT_FILE=str(self.ca),
            OPENAI_API_KEY=key,
            ANTHROPIC_API_KEY=key,
            NO_PROXY="",
        )
        return env

    def token(self, tenant: str, agent: str, ttl: str = "15m") -> str:
        return aiid(self.home, "token", "issue", tenant, agent, "--ttl", ttl).stdout.strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def point_agent_at(gw: Gateway, monkeypatch: Any) -> None:
    """Configure this process's SDK clients as an agent: only HTTPS_PROXY and SSL_CERT_FILE."""
    for k in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", gw.proxy)
    monkeypatch.setenv("SSL_CERT_FILE", str(gw.ca))


def start_gateway(
    home: Path, policies: Path, standin_port: int, standin_ca: Path, extra: list[str] | None = None
) -> Gateway:
    port = free_port()
    log_path = home.parent / f"gateway-{port}.log"
    maps = []
    for host in ("api.openai.com", "api.anthropic.com", "api.github.com", "api.mistral.ai"):
        maps += ["--set", f"map_remote=|//{host}/|//localhost:{standin_port}/"]
    args = [
        AIID,
        "run",
        "--no-console",
        "--listen",
        f"127.0.0.1:{port}",
        "--policies",
        str(policies),
        "--set",
        f"ssl_verify_upstream_trusted_ca={standin_ca}",
        *maps,
        *(extra or []),
    ]
    env = {**os.environ, "AIID_HOME": str(home)}
    logf = log_path.open("wb")
    proc = subprocess.Popen(
        args, stdout=logf, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
    )
    gw = Gateway(home, policies, port, proc, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited {proc.returncode}: {gw.log()}")
        if "listening on" in gw.log():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return gw
            except OSError:
                pass
        time.sleep(0.05)
    gw.stop()
    raise AssertionError(f"gateway did not start: {gw.log()}")


# -- the console in a real terminal (tmux) -------------------------------------------------------
TMUX = shutil.which("tmux")


@dataclass
class TmuxGateway:
    """`aiid run` with its live console, in a detached tmux session on a private tmux server."""

    home: Path
    policies: Path
    port: int
    tmux_socket: Path
    session: str = "aiid"

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.home / "certs" / "mitmproxy-ca-cert.pem"

    @property
    def log_path(self) -> Path:
        return self.home / "gateway.log"

    def token(self, tenant: str, agent: str, ttl: str = "15m") -> str:
        return aiid(self.home, "token", "issue", tenant, agent, "--ttl", ttl).stdout.strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert TMUX is not None
        return subprocess.run(
            [TMUX, "-S", str(self.tmux_socket), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=check,
        )

    def screen(self) -> str:
        """What the terminal shows now (tmux capture-pane, no colours)."""
        return self.tmux("capture-pane", "-p", "-t", self.session).stdout

    def send_keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def resize(self, width: int, height: int) -> None:
        self.tmux("resize-window", "-t", self.session, "-x", str(width), "-y", str(height))

    def pid(self) -> int | None:
        p = self.tmux(
            "list-panes", "-t", self.session, "-F", "#{pane_dead} #{pane_pid}", check=False
        )
        dead, _, pid = p.stdout.strip().partition(" ")
        return int(pid) if p.returncode == 0 and dead == "0" and pid.isdigit() else None

    def wait_screen(
        self, predicate: Callable[[str], bool], timeout: float = 20.0, what: str = ""
    ) -> str:
        """Poll the screen until ``predicate`` holds (bounded)."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        size = self.tmux(
            "display-message",
            "-p",
            "-t",
            self.session,
            "#{window_width}x#{window_height} pane_dead=#{pane_dead} #{pane_dead_status}",
            check=False,
        ).stdout.strip()
        raise AssertionError(
            f"screen ({size}) never showed {what}:\n{screen}\nlog:\n{self.log()[-3000:]}"
        )

    def exit_status(self, pid: int) -> int | None:
        """The exit status of the gateway that ran as ``pid``: from /proc while it is a zombie
        (tmux may be slow to reap it), else as tmux reports it."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                return (int(fields[49]) >> 8) & 0xFF
        except (OSError, IndexError, ValueError):
            pass
        out = self.tmux("display-message", "-p", "-t", self.session, "#{pane_dead_status}")
        status = out.stdout.strip()
        return int(status) if status.isdigit() else None

    def wait_exit(self, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() is None:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM the gateway, then end this test's own tmux server."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not self.wait_exit(15):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.tmux("kill-server", check=False)


def start_console_gateway(
    home: Path,
    policies: Path,
    standin_port: int,
    standin_ca: Path,
    *,
    width: int = 100,
    height: int = 30,
    extra: list[str] | None = None,
) -> TmuxGateway:
    """`aiid run` WITH the console in a width x height tmux pane; ready when it listens and its
    control socket is up. Needs tmux (callers skip when :data:`TMUX` is None)."""
    if TMUX is None:
        raise AssertionError("tmux is not installed")
    port = free_port()
    sock = home.parent / f"tmux-{port}.sock"
    conf = home.parent / f"tmux-{port}.conf"
    conf.write_text("set -g remain-on-exit on\nset -g status off\nset -g history-limit 100\n")
    maps: list[str] = []
    for host in ("api.openai.com", "api.anthropic.com", "api.github.com", "api.mistral.ai"):
        maps += ["--set", f"map_remote=|//{host}/|//localhost:{standin_port}/"]
    args = [
        AIID,
        "run",
        "--listen",
        f"127.0.0.1:{port}",
        "--policies",
        str(policies),
        "--set",
        f"ssl_verify_upstream_trusted_ca={standin_ca}",
        *maps,
        *(extra or []),
    ]
    command = "exec " + " ".join(shlex.quote(a) for a in args)
    # COLUMNS/LINES (pytest-xdist workers export them) would pin the console's size
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TMUX") and k not in ("COLUMNS", "LINES")
    }
    env.update(AIID_HOME=str(home), LANG="C.UTF-8", LC_ALL="C.UTF-8")
    subprocess.run(
        [TMUX, "-S", str(sock), "-f", str(conf), "-u", "new-session", "-d", "-s", "aiid"]
        + ["-x", str(width), "-y", str(height), command],
        env=env,
        check=True,
        timeout=20,
        capture_output=True,
    )
    gw = TmuxGateway(home, policies, port, sock)
    control = home / "runtime" / "control" / "aiid.sock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if gw.pid() is None:
            screen = gw.screen()
            gw.stop()
            raise AssertionError(f"gateway exited:\n{screen}\n{gw.log()}")
        if control.exists():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return gw
            except OSError:
                pass
        time.sleep(0.05)
    screen = gw.screen()
    gw.stop()
    raise AssertionError(f"gateway did not start:\n{screen}\n{gw.log()}")


CLOSING_EVENTS = ("response", "error")


def read_audit(home: Path, tenant: str, *, settle: float = 10.0) -> list[dict[str, Any]]:
    """Every audit row of a running gateway's tenant, in seq order.

    The gateway releases a response before its ``response`` record is committed (only the
    ``request`` record must be durable before anything leaves), so a test that has just
    received a response first waits, bounded by ``settle`` seconds, until every forwarded
    request has its closing record (``response`` or ``error``)."""
    import sqlite3

    deadline = time.monotonic() + settle
    while True:
        con = sqlite3.connect(f"file:{home / 'tenants' / tenant / 'audit.db'}?mode=ro", uri=True)
        con.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in con.execute("SELECT * FROM audit ORDER BY seq")]
        finally:
            con.close()
        sent = {r["request_id"] for r in rows if r["event"] == "request"}
        closed = {r["request_id"] for r in rows if r["event"] in CLOSING_EVENTS}
        if sent <= closed or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


class LoopbackServer:
    """A loopback TCP server accepting on its own thread, for upstream doubles that need the
    raw bytes: each connection goes to ``_accepted`` (by default ``_conn`` on a thread of its
    own). Subclasses set their own attributes before calling ``__init__`` (it starts at once)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            self._accepted(raw)

    def _accepted(self, raw: socket.socket) -> None:
        threading.Thread(target=self._conn, args=(raw,), daemon=True).start()

    def _conn(self, raw: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


class TLSServer(LoopbackServer):
    """A LoopbackServer whose connections ``_conn`` wraps in TLS with ``self.ctx``."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["http/1.1"])
        super().__init__()
