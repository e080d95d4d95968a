"""Shared fixtures: a real gateway home (keys, tenants, vault secrets) and a Gateway on it.

The home is built once per session (key and CA generation are the slow part) and copied for
every test, so each test owns its databases. Everything runs on one FakeClock: tokens are
issued with it and the gateway checks them with it, so no test ever sleeps.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiid_proxy.admin import add_tenant, init_home, issue_token
from aiid_proxy.clock import FakeClock
from aiid_proxy.gateway import Gateway
from aiid_proxy.home import Home
from aiid_proxy.vault import MasterKeyring, Vault

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z: inside any "office hours" window

# Canary secrets: never real keys, easy to grep for in anything sent back to an agent.
CANARY_OPENAI = "sk-canary-openai-XYZ0123456789abcdefghij"
CANARY_ANTHROPIC = "sk-ant-canary-0123456789ABCDEFGHIJ"
CANARY_GITHUB = "ghp_canary/github+token0123456789"

TENANT = "acme"  # has a vault key for every provider its policy allows
NOKEY_TENANT = "nokey"  # policy allows openai, but its vault is empty

ACME_POLICY = """\
version: 1
tenant: acme
default: deny
approval: {{timeout: {approval_timeout}}}
rules:
  - id: no-gpt-4o
    providers: [openai]
    models: ["gpt-4o"]
    effect: deny
    reason: "gpt-4o is not enabled"
  - id: small-models
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
  - id: haiku
    providers: [anthropic]
    models: ["claude-*haiku*"]
    effect: allow
  - id: big-needs-human
    providers: [openai]
    models: ["o1*"]
    effect: approve
    reason: "o1 needs a human"
  - id: github-read
    hosts: ["api.github.com"]
    methods: [GET]
    paths: ["/repos/*"]
    inject: {{header: Authorization, scheme: Bearer, secret: github}}
    effect: allow
limits:
  tenant: {{requests_per_minute: 10000, tokens_per_minute: 100000000}}
  agents:
    "limited-*": {{requests_per_minute: 2}}
"""

NOKEY_POLICY = """\
version: 1
tenant: nokey
default: deny
rules:
  - id: everything-openai
    providers: [openai]
    effect: allow
"""


@pytest.fixture(scope="session")
def home_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "home"
    clock = FakeClock(T0)
    home = Home(root)
    init_home(home, clock)
    for t in (TENANT, NOKEY_TENANT):
        assert add_tenant(home, t, None, clock)
    keyring = MasterKeyring(home.master_keys())
    with Vault(home.vault_path(TENANT), TENANT, keyring, clock=clock) as v:
        v.put("openai", CANARY_OPENAI)
        v.put("anthropic", CANARY_ANTHROPIC)
        v.put("github", CANARY_GITHUB)
    return root


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def gateway_home(home_template: Path, tmp_path: Path) -> Home:
    root = tmp_path / "home"
    shutil.copytree(home_template, root)
    return Home(root)


def write_policies(directory: Path, approval_timeout: str = "120s") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{TENANT}.yaml").write_text(
        ACME_POLICY.format(approval_timeout=approval_timeout), encoding="utf-8"
    )
    (directory / f"{NOKEY_TENANT}.yaml").write_text(NOKEY_POLICY, encoding="utf-8")
    return directory


@pytest.fixture
def policies_dir(tmp_path: Path) -> Path:
    return write_policies(tmp_path / "policies")


@pytest.fixture
def make_gateway(gateway_home: Home, fake_clock: FakeClock) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(policies: Path, **kw: Any) -> Gateway:
        gw = Gateway(gateway_home, policies, clock=fake_clock, watch=False, env={}, **kw)
        made.append(gw)
        for name in (TENANT, NOKEY_TENANT):
            assert gw.policy_for(name) is not None, f"policy {name} did not load"
        return gw

    yield make
    for gw in made:
        gw.close()


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway], policies_dir: Path) -> Gateway:
    return make_gateway(policies_dir)


@pytest.fixture
def issue(gateway_home: Home, fake_clock: FakeClock) -> Callable[..., str]:
    """issue(agent="bot", tenant="acme", ttl=900) -> a signed agent token."""

    def _issue(agent: str = "bot", tenant: str = TENANT, ttl: float = 900) -> str:
        return issue_token(gateway_home, tenant, agent, ttl, clock=fake_clock)

    return _issue


def audit_rows(home: Home, tenant: str = TENANT) -> list[dict[str, Any]]:
    """Every committed audit row, read with a fresh sqlite3 connection."""
    conn = sqlite3.connect(f"file:{home.audit_path(tenant)}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        conn.close()
