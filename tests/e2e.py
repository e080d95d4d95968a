"""Helpers for end-to-end tests: a real `aiid run` subprocess in front of the stand-in."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
AIID = str(BIN / "aiid")

OPENAI_CANARY = "sk-canary-openai-7f3a9c2e51b84d06a1c3"
ANTHROPIC_CANARY = "sk-ant-canary-b81d4e0f92c6477aa5e2"
GITHUB_CANARY = "ghp_canary9d2f61a0c7e84b3f95"


def free_port() -> int:
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
