"""`make run` helper: create the demo home if there is none, then print the agent lines.

Idempotent: an existing home, tenant or vault entry is kept. The demo tenant gets a placeholder
OpenAI/Anthropic key; $OPENAI_KEY_FOR_VAULT / $ANTHROPIC_KEY_FOR_VAULT, when set, are stored
every time (replacing a placeholder or an older key).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from aiid_proxy.home import Home

BIN = Path(sys.executable).parent
AIID = str(BIN / "aiid")


def aiid(*args: str, stdin: str | None = None) -> str:
    p = subprocess.run([AIID, *args], input=stdin, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"aiid {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def gateway_running(home: Path) -> bool:
    """Whether a gateway holds the home's lock (``aiid_proxy.control.HomeLock``)."""
    from aiid_proxy.control import HomeLock
    from aiid_proxy.errors import ConfigError

    try:
        HomeLock(Home(home)).release()
    except ConfigError:
        return True
    return False


def port_problem(listen: str) -> str | None:
    """Why the gateway could not listen on ``listen`` (HOST:PORT), checked before the agent
    lines are printed (they would point at nothing); None when it can."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mitmproxy binds
            s.bind((host, int(port)))
    except (OSError, ValueError) as e:
        return getattr(e, "strerror", None) or str(e)
    return None


def main() -> None:
    home = Path(os.environ.get("AIID_HOME") or ".aiid")
    listen = os.environ.get("AIID_LISTEN", "127.0.0.1:8080")
    aiid("init")
    if not (home / "tenants" / "demo" / "tenant.json").exists():
        aiid("tenant", "add", "demo")
    have = aiid("vault", "list", "demo")
    for provider, var in (
        ("openai", "OPENAI_KEY_FOR_VAULT"),
        ("anthropic", "ANTHROPIC_KEY_FOR_VAULT"),
    ):
        given = os.environ.get(var)
        if given or f"\n{provider} " not in "\n" + have:
            secret = given or f"sk-demo-placeholder-{provider}"
            aiid("vault", "put", "demo", provider, stdin=secret + "\n")
    if gateway_running(home):
        sys.exit(f"make run: a gateway is already running on {home}; stop it first")
    problem = port_problem(listen)
    if problem is not None:
        sys.exit(
            f"make run: cannot listen on {listen}: {problem}; pick another address, e.g. "
            "AIID_LISTEN=127.0.0.1:8081 make run"
        )
    token = aiid("token", "issue", "demo", "demo-agent", "--ttl", "24h").strip()
    # the console takes the screen: its hint points at this file for the same token
    token_file = Home(home).demo_token_path
    token_file.unlink(missing_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    ca = (home / "certs" / "mitmproxy-ca-cert.pem").absolute()
    print("Point an agent at the gateway with these three lines:")
    print(f"HTTPS_PROXY=http://{listen}")
    print(f"SSL_CERT_FILE={ca}")
    print(f"OPENAI_API_KEY={token}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
