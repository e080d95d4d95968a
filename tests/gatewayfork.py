"""Start, kill -9 and stop `aiid run` fast: a fork server, and a client for tests.

The server (``python tests/gatewayfork.py MAX_SECONDS``) imports the gateway once, then forks
a fresh gateway per request, so a crash test can restart it hundreds of times in seconds. Each
child runs exactly what the ``aiid`` console script runs (``aiid_proxy.cli.main``) with its
stdout and stderr in a log file; only the interpreter start-up and imports (about 1 s) are
shared. Protocol, one JSON object a line on stdin, one JSON reply a line on stdout:

    {"op": "spawn", "args": [...], "env": {...}, "log": PATH}  -> {"pid": N}
    {"op": "kill", "pid": N}                   -> {"status": S}   SIGKILL, reaped
    {"op": "term", "pid": N, "timeout": T}     -> {"status": S}   SIGTERM, SIGKILL after T s
    {"op": "exit"}                             -> kills every child, exits

Self-stopping: the server exits (killing its children) on EOF of stdin, on "exit" or after
MAX_SECONDS (SIGALRM); its children get SIGKILL if it dies (PR_SET_PDEATHSIG).

:class:`GatewayProc` runs a gateway either way (fork, or exec of the real ``aiid`` binary,
needed when the environment must apply at exec, e.g. ``LD_PRELOAD``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
HERE = Path(__file__).resolve().parent
AIID = str(Path(sys.executable).parent / "aiid")


# -- server ----------------------------------------------------------------------------------
def _child(args: list[str], env: dict[str, str], log: str) -> None:
    code = 70
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setpgid(0, 0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.alarm(0)
        from aiid_proxy.cli import main

        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # reported in the log
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)


def _reap(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def serve() -> None:
    max_seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1800.0
    signal.alarm(int(max_seconds))
    # Everything `aiid run` imports, loaded once here and shared copy-on-write by the children.
    import addons.pipeline  # noqa: F401
    import addons.runner  # noqa: F401
    import aiid_proxy.cli  # noqa: F401

    children: set[int] = set()

    def reply(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def end(pid: int, sig: int, timeout: float) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        status = _reap(pid, timeout)
        if status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        children.discard(pid)
        return status

    reply({"ready": True})
    try:
        for line in sys.stdin:
            msg = json.loads(line)
            op = msg.get("op")
            if op == "spawn":
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(list(msg["args"]), dict(msg["env"]), str(msg["log"]))
                children.add(pid)
                reply({"pid": pid})
            elif op == "kill":
                reply({"status": end(int(msg["pid"]), signal.SIGKILL, 10.0)})
            elif op == "term":
                reply({"status": end(int(msg["pid"]), signal.SIGTERM, float(msg["timeout"]))})
            elif op == "exit":
                break
            else:
                reply({"error": f"unknown op {op!r}"})
    finally:
        for pid in list(children):
            end(pid, signal.SIGKILL, 10.0)


# -- client ----------------------------------------------------------------------------------
class ForkServer:
    """Client of the server above (use from one thread)."""

    def __init__(self, max_seconds: float = 1800.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "gatewayfork.py"), str(int(max_seconds))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=HERE.parent,
        )
        assert json.loads(self._read()) == {"ready": True}

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"fork server died ({self.proc.poll()})")
        return line

    def call(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self._read())
        return reply

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=15)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)


def gateway_args(
    port: int, policies: Path, standin_port: int, standin_ca: Path, *extra: str
) -> list[str]:
    args = [
        "run",
        "--no-console",
        "--listen",
        f"127.0.0.1:{port}",
        "--policies",
        str(policies),
        "--set",
        f"ssl_verify_upstream_trusted_ca={standin_ca}",
    ]
    for host in ("api.openai.com", "api.anthropic.com"):
        args += ["--set", f"map_remote=|//{host}/|//localhost:{standin_port}/"]
    return [*args, *extra]


def gateway_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.pop("AIID_MASTER_KEY", None)
    env.pop("AIID_AUDIT_KEY", None)
    env["AIID_HOME"] = str(home)
    env.update(extra)
    return env


class GatewayProc:
    """One `aiid run`: forked by ``forks`` (None: exec'd), always ended by :meth:`kill9` or
    :meth:`stop`."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log: Path,
        forks: ForkServer | None,
    ) -> None:
        self.log = log
        self.forks = forks
        listen = args[args.index("--listen") + 1] if "--listen" in args else "127.0.0.1:8080"
        self.port = int(listen.rpartition(":")[2])
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.status: int | None = None
        if forks is None:
            with log.open("ab") as f:
                self.proc = subprocess.Popen(
                    [AIID, *args],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
        else:
            self.pid = int(forks.call(op="spawn", args=args, env=env, log=str(log))["pid"])

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        if self.pid is None:
            return False
        try:  # a zombie answers until the fork server reaps it: look at its state
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if "listening on" in out:
                return
            if "aiid: error" in out or not self.alive():
                break
            time.sleep(0.01)
        self.kill9()
        raise AssertionError(f"gateway did not start:\n{self.output()[-3000:]}")

    def kill9(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.status = self.proc.wait(timeout=10)
        elif self.pid is not None and self.forks is not None:
            self.status = int(self.forks.call(op="kill", pid=self.pid)["status"])
            self.pid = None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout``."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            self.status = self.proc.wait(timeout=10)
        elif self.pid is not None and self.forks is not None:
            reply = self.forks.call(op="term", pid=self.pid, timeout=timeout)
            self.status = int(reply["status"])
            self.pid = None


if __name__ == "__main__":
    serve()
