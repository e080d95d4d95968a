"""scripts/demo_home.py, the first half of `make run`: the demo home and the agent's lines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from aiid_proxy.home import Home
from aiid_proxy.vault import MasterKeyring, Vault

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo_home.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(home: Path, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.endswith("_KEY_FOR_VAULT")}
    base.pop("AIID_MASTER_KEY", None)
    base["AIID_LISTEN"] = f"127.0.0.1:{_free_port()}"  # 8080 may be taken on this machine
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={**base, "AIID_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.splitlines()


def _key(home: Path, provider: str) -> str:
    h = Home(home)
    with Vault(h.vault_path("demo"), "demo", MasterKeyring.from_home(h, {})) as v:
        return v.get(provider).reveal()


def test_the_demo_home_and_a_real_key_given_later(tmp_path: Path) -> None:
    home = tmp_path / "home"
    lines = _run(home, AIID_LISTEN="127.0.0.1:18080")
    assert lines[1] == "HTTPS_PROXY=http://127.0.0.1:18080"
    assert lines[2] == f"SSL_CERT_FILE={home / 'certs' / 'mitmproxy-ca-cert.pem'}"
    assert lines[3].startswith("OPENAI_API_KEY=ey")
    # the same token, for the console's hint while it holds the screen
    token_file = Home(home).demo_token_path
    assert token_file.read_text() == lines[3].removeprefix("OPENAI_API_KEY=") + "\n"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert _key(home, "openai") == "sk-demo-placeholder-openai"
    # `OPENAI_KEY_FOR_VAULT=sk-... make run` on a home that already has the placeholder
    _run(home, OPENAI_KEY_FOR_VAULT="sk-real-key-for-the-demo")
    assert _key(home, "openai") == "sk-real-key-for-the-demo"
    assert _key(home, "anthropic") == "sk-demo-placeholder-anthropic"
    _run(home)  # and a run without it keeps the real key
    assert _key(home, "openai") == "sk-real-key-for-the-demo"


def test_a_second_make_run_on_a_running_home_stops_before_issuing_a_token(
    tmp_path: Path,
) -> None:
    """It printed the lines with a fresh 24 h token, then failed: address in use (pass [W])."""
    from aiid_proxy.control import HomeLock

    home = tmp_path / "home"
    _run(home)
    issued = (Home(home).root / "admin" / "issued" / "demo").read_text()
    lock = HomeLock(Home(home))  # as a running gateway holds it
    try:
        base = {k: v for k, v in os.environ.items() if not k.endswith("_KEY_FOR_VAULT")}
        done = subprocess.run(
            [sys.executable, str(SCRIPT)],
            env={**base, "AIID_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        lock.release()
    assert done.returncode != 0 and done.stdout == ""
    assert "already running" in done.stderr
    assert (Home(home).root / "admin" / "issued" / "demo").read_text() == issued


def test_a_busy_address_stops_make_run_before_the_agent_lines(tmp_path: Path) -> None:
    """The three lines (and a new 24 h token) were printed, then `aiid run` failed: address
    in use, with no word of AIID_LISTEN (pass [AA])."""
    home = tmp_path / "home"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        base = {k: v for k, v in os.environ.items() if not k.endswith("_KEY_FOR_VAULT")}
        done = subprocess.run(
            [sys.executable, str(SCRIPT)],
            env={**base, "AIID_HOME": str(home), "AIID_LISTEN": listen},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode != 0 and done.stdout == ""
    assert f"cannot listen on {listen}" in done.stderr and "AIID_LISTEN=" in done.stderr
    assert not (home / "admin" / "issued" / "demo").exists()  # no token issued
