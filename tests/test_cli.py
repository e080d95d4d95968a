"""The `aiid` command line as users and scripts meet it: every contract command's happy path,
errors as one line on stderr with exit 1 (2 for usage), name validation, and the approval
commands over the real control channel. Runs `main()` in-process (`aiid run` is covered by the
end-to-end tests)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import NOKEY_TENANT, TENANT, audit_rows, write_policies

from addons.runtime import Runtime
from aiid_proxy.audit import AuditLog, tenant_key
from aiid_proxy.cli import main
from aiid_proxy.control import Answer, ControlServer, Pending
from aiid_proxy.home import Home
from aiid_proxy.identity import RevocationList
from aiid_proxy.vault import MasterKeyring, Vault


@dataclass
class Out:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


Run = Callable[..., Out]


@pytest.fixture
def aiid(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """aiid(*args, stdin=None, env={}) -> Out, with exit status, stdout and stderr."""
    for var in ("AIID_HOME", "AIID_POLICIES", "AIID_MASTER_KEY", "AIID_AUDIT_KEY"):
        monkeypatch.delenv(var, raising=False)

    def run(*args: str | Path, stdin: str | None = None, env: dict[str, str] | None = None) -> Out:
        capsys.readouterr()
        with monkeypatch.context() as m:
            m.setattr(sys, "stdin", io.StringIO(stdin or ""))
            for k, v in (env or {}).items():
                m.setenv(k, v)
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        cap = capsys.readouterr()
        return Out(code, cap.out, cap.err)

    return run


def one_line_error(r: Out, code: int, *needles: str) -> None:
    assert r.code == code, r
    assert r.out == ""
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiid: error: "), r.err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def home(gateway_home: Home) -> Home:
    """An initialised home with tenants acme (keys for every provider) and nokey."""
    return gateway_home


@pytest.fixture
def policies(policies_dir: Path) -> Path:
    return policies_dir


# -- init / tenant / vault / token --------------------------------------------------------------
def test_init_creates_the_home_and_never_overwrites_a_key(aiid: Run, tmp_path: Path) -> None:
    h = tmp_path / "new"
    r = aiid("--home", h, "init")
    assert r.code == 0 and "created" in r.out and "mitmproxy-ca-cert.pem" in r.out
    keys = {p: p.read_bytes() for p in (h / "admin").iterdir()} | {
        p: p.read_bytes() for p in (h / "runtime").iterdir() if p.is_file()
    }
    assert keys
    r = aiid("--home", h, "init")
    assert r.code == 0 and "nothing overwritten" in r.out
    assert {p: p.read_bytes() for p in keys} == keys


def test_a_lost_signing_key_has_a_way_out(aiid: Run, tmp_path: Path) -> None:
    """`aiid token issue` said "run `aiid init`", which then created nothing: a loop ([AA])."""
    h = tmp_path / "h"
    assert aiid("--home", h, "init").code == 0
    assert aiid("--home", h, "tenant", "add", "acme").code == 0
    (h / "admin" / "signing.key").unlink()
    r = aiid("--home", h, "token", "issue", "acme", "bot")
    one_line_error(r, 1, "token signing key missing", "remove token.pub and run `aiid init`")
    r = aiid("--home", h, "init")
    assert r.code == 0 and "remove token.pub and run `aiid init` again" in r.err
    (h / "runtime" / "token.pub").unlink()  # as told
    assert aiid("--home", h, "init").code == 0
    assert aiid("--home", h, "token", "issue", "acme", "bot").code == 0


def test_home_from_the_environment(aiid: Run, home: Home) -> None:
    r = aiid("tenant", "list", env={"AIID_HOME": str(home.root)})
    assert r.code == 0 and TENANT in r.out and NOKEY_TENANT in r.out


def test_tenant_add_and_list(aiid: Run, home: Home) -> None:
    r = aiid("--home", home.root, "tenant", "add", "globex", "--region", "eu")
    assert (r.code, r.out.strip()) == (0, "tenant globex added")
    assert home.audit_path("globex").exists() and home.vault_path("globex").exists()
    assert aiid("--home", home.root, "tenant", "add", "globex").out.strip() == (
        "tenant globex already exists"
    )
    listed = aiid("--home", home.root, "tenant", "list").lines
    assert "globex\tregion=eu" in listed and f"{TENANT}\tregion=-" in listed


def test_tenant_region_is_a_known_one_and_set_once(aiid: Run, home: Home) -> None:
    one_line_error(
        aiid("--home", home.root, "tenant", "add", "mars1", "--region", "mars"),
        2,
        "unknown region 'mars'",
        "known: eu, us",
    )
    assert not home.tenant_settings_path("mars1").exists()
    assert aiid("--home", home.root, "tenant", "add", "eu1", "--region", "eu").code == 0
    again = aiid("--home", home.root, "tenant", "add", "eu1", "--region", "eu")
    assert (again.code, again.out.strip()) == (0, "tenant eu1 already exists")
    one_line_error(
        aiid("--home", home.root, "tenant", "add", "eu1", "--region", "us"),
        1,
        "tenant eu1 already exists with region eu",
    )
    assert home.tenant_region("eu1") == "eu"


def test_vault_put_list_rotate_never_show_the_secret(aiid: Run, home: Home) -> None:
    secret = "sk-cli-test-0123456789abcdef"
    r = aiid("--home", home.root, "vault", "put", NOKEY_TENANT, "openai", stdin=secret + "\n")
    assert r.code == 0 and r.out.startswith(f"stored openai for {NOKEY_TENANT} (key id ")
    r = aiid(
        "--home",
        home.root,
        "vault",
        "put",
        NOKEY_TENANT,
        "mistral",
        "--from-env",
        "MY_KEY",
        env={"MY_KEY": secret + "-2"},
    )
    assert r.code == 0
    listed = aiid("--home", home.root, "vault", "list", NOKEY_TENANT)
    assert listed.code == 0 and listed.lines[0].split()[:2] == ["PROVIDER", "KEY"]
    assert {line.split()[0] for line in listed.lines[1:]} == {"openai", "mistral"}
    rot = aiid("--home", home.root, "vault", "rotate-master")
    assert rot.code == 0 and rot.out.startswith("re-wrapped ")
    for r in (listed, rot):
        assert secret not in r.out + r.err


@pytest.mark.parametrize(
    "typed",
    [
        pytest.param("sk-x-123\n", id="line"),
        pytest.param("  sk-x-123  \r\n", id="spaces-crlf"),
        pytest.param("\tsk-x-123", id="tab-no-newline"),
    ],
)
def test_vault_put_stores_the_key_without_surrounding_whitespace(
    aiid: Run, home: Home, typed: str
) -> None:
    # Spaces pasted around a key are never part of it; sent upstream they break the request.
    r = aiid("--home", home.root, "vault", "put", NOKEY_TENANT, "openai", stdin=typed)
    assert r.code == 0, r
    with Vault(home.vault_path(NOKEY_TENANT), NOKEY_TENANT, MasterKeyring.from_home(home, {})) as v:
        assert v.get("openai").reveal() == "sk-x-123"


def test_vault_put_under_a_stray_master_key_is_refused(aiid: Run, home: Home) -> None:
    stray = base64.b64encode(bytes(range(32))).decode()
    before = aiid("--home", home.root, "vault", "list", TENANT).out
    r = aiid(
        "--home", home.root, "vault", "put", TENANT, "openai", stdin="sk-new\n",
        env={"AIID_MASTER_KEY": stray},
    )  # fmt: skip
    one_line_error(r, 1, "does not open tenant", "wrong AIID_MASTER_KEY")
    assert aiid("--home", home.root, "vault", "list", TENANT).out == before  # nothing stored


def test_a_first_vault_entry_under_a_stray_master_key_is_refused(aiid: Run, home: Home) -> None:
    """A tenant's first entry has nothing of its own to check the key against: it was stored,
    and every request of the tenant then failed at the gateway (pass [W])."""
    stray = base64.b64encode(bytes(range(32))).decode()
    assert aiid("--home", home.root, "tenant", "add", "delta").code == 0
    r = aiid(
        "--home", home.root, "vault", "put", "delta", "openai", stdin="sk-new\n",
        env={"AIID_MASTER_KEY": stray},
    )  # fmt: skip
    one_line_error(r, 1, f"does not open tenant '{TENANT}'", "wrong AIID_MASTER_KEY")
    assert "openai" not in aiid("--home", home.root, "vault", "list", "delta").out
    assert aiid("--home", home.root, "vault", "put", "delta", "openai", stdin="sk-new\n").code == 0


def test_another_tenants_damaged_vault_does_not_block_a_vault_put(aiid: Run, home: Home) -> None:
    """It opened every other tenant's vault, and failed on the first it could not read."""
    assert aiid("--home", home.root, "tenant", "add", "broken").code == 0
    home.vault_path("broken").write_bytes(b"garbage, not a database")
    r = aiid("--home", home.root, "vault", "put", NOKEY_TENANT, "openai", stdin="sk-x-1\n")
    assert r.code == 0, r
    assert aiid("--home", home.root, "tenant", "add", "epsilon").code == 0
    r = aiid("--home", home.root, "vault", "put", "epsilon", "openai", stdin="sk-x-2\n")
    assert r.code == 0, r  # acme's vault still proves the key
    # read, never repaired: a truncated vault stays visibly damaged (pass [Y])
    home.vault_path("broken").write_bytes(b"")
    r = aiid("--home", home.root, "tenant", "add", "zeta")
    r = aiid("--home", home.root, "vault", "put", "zeta", "openai", stdin="sk-x-3\n")
    assert r.code == 0, r
    assert home.vault_path("broken").stat().st_size == 0
    one_line_error(aiid("--home", home.root, "vault", "list", "broken"), 1, "empty (truncated?)")


@pytest.mark.parametrize(
    "cmd",
    [pytest.param(["list"], id="list"), pytest.param(["put", "--from-env", "K"], id="put")],
)
def test_a_missing_vault_database_is_named_never_recreated(
    aiid: Run, home: Home, cmd: list[str]
) -> None:
    """`vault list` used to create an empty vault.db in place of a lost one, and exit 0."""
    path = home.vault_path(NOKEY_TENANT)
    path.unlink()
    args = [cmd[0], NOKEY_TENANT] + (["openai", *cmd[1:]] if cmd[0] == "put" else [])
    r = aiid("--home", home.root, "vault", *args, env={"K": "sk-x-123"})
    one_line_error(r, 1, "vault database missing", str(path))
    assert not path.exists()


def test_token_issue_prints_only_the_token_and_revoke_refuses_it(aiid: Run, home: Home) -> None:
    r = aiid("--home", home.root, "token", "issue", TENANT, "support-1", "--ttl", "1h")
    assert r.code == 0 and r.err == "" and len(r.lines) == 1
    token = r.out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "support-1" and claims["tid"] == TENANT
    assert claims["iss"] == "aiid" and claims["aud"] == "aiid-gateway"
    assert 3600 <= claims["exp"] - claims["iat"] <= 3601  # exp rounded up from the real time
    r = aiid("--home", home.root, "token", "revoke", TENANT, claims["jti"])
    assert (r.code, r.out.strip(), r.err) == (0, f"revoked {claims['jti']}", "")
    assert RevocationList(home).is_revoked(TENANT, claims["jti"])
    # [AL] again: said "revoked" again and appended a second line
    lines = home.revoked_path(TENANT).read_text()
    r = aiid("--home", home.root, "token", "revoke", TENANT, claims["jti"])
    assert (r.code, r.out.strip(), r.err) == (0, f"already revoked {claims['jti']}", "")
    assert home.revoked_path(TENANT).read_text() == lines


def test_token_revoke_of_an_id_never_issued_warns_and_revokes(aiid: Run, home: Home) -> None:
    typo = "0123456789abcdef0123456789abcdef"
    r = aiid("--home", home.root, "token", "revoke", TENANT, typo)
    assert (r.code, r.out.strip()) == (0, f"revoked {typo}")
    assert r.err.splitlines() == [
        f"aiid: warning: this home issued no token {typo} for tenant {TENANT} (mistyped?); "
        "revoked anyway"
    ]
    assert RevocationList(home).is_revoked(TENANT, typo)


def test_token_revoke_takes_the_token_itself(aiid: Run, home: Home) -> None:
    token = aiid("--home", home.root, "token", "issue", TENANT, "bot").out.strip()
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    one_line_error(
        aiid("--home", home.root, "token", "revoke", NOKEY_TENANT, token),
        1,
        f"that token belongs to tenant {TENANT!r}, not {NOKEY_TENANT!r}",
    )
    forged = token[: token.rindex(".") + 1] + "A" * 86
    one_line_error(aiid("--home", home.root, "token", "revoke", TENANT, forged), 2, "not a token")
    assert not RevocationList(home).is_revoked(TENANT, jti)
    r = aiid("--home", home.root, "token", "revoke", TENANT, token)
    assert (r.code, r.out.strip()) == (0, f"revoked {jti}")
    assert RevocationList(home).is_revoked(TENANT, jti)


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        pytest.param(["frobnicate"], 2, ["frobnicate"], id="unknown-command"),
        pytest.param(["token", "issue", TENANT], 2, ["AGENT"], id="missing-argument"),
        pytest.param(["vault", "list", "ghost"], 1, ["ghost"], id="unknown-tenant"),
        pytest.param(
            ["token", "issue", TENANT, "bot", "--ttl", "forever"], 2, ["forever"], id="bad-ttl"
        ),
        pytest.param(["token", "issue", TENANT, "bot", "--ttl", "25h"], 2, ["24h"], id="ttl-max"),
        pytest.param(["run", "--listen", "nope"], 2, ["HOST:PORT"], id="run-bad-listen"),
        pytest.param(["run", "--set", "=1"], 2, ["OPTION=VALUE"], id="run-bad-set"),
        pytest.param(["policy", "check", "/nonexistent/dir"], 1, ["does not exist"], id="no-dir"),
        pytest.param(
            ["run", "--no-console", "--policies", "/dev/null"],
            1,
            ["/dev/null", "not a directory"],
            id="run-policies-file",
        ),
        pytest.param(
            ["policy", "explain", "ghost", "--agent", "a", "--provider", "openai"],
            1,
            ["no policy file", "ghost.yaml"],
            id="explain-no-policy",
        ),
        pytest.param(
            ["policy", "explain", TENANT, "--agent", "a"], 2, ["--provider"], id="explain-what"
        ),
        pytest.param(
            ["policy", "explain", TENANT, "--agent", "a", "--provider", "openai", "--param", "x=1"],
            2,
            ["unknown --param"],
            id="explain-bad-param",
        ),
        pytest.param(
            ["policy", "explain", TENANT, "--agent", "a", "--provider", "nope"],
            2,
            ["unknown provider"],
            id="explain-bad-provider",
        ),
        *(
            pytest.param(
                ["policy", "explain", TENANT, "--agent", "a", *extra], 2, [needle], id=name
            )
            for name, extra, needle in [
                ("explain-nan", ["--provider", "openai", "--param", "temperature=nan"], "finite"),
                ("explain-inf", ["--provider", "openai", "--param", "top_p=inf"], "finite"),
                ("explain-negative", ["--provider", "openai", "--param", "max_tokens=-5"], "0 or"),
                ("explain-both", ["--provider", "openai", "--host", "api.github.com"], "not both"),
                ("explain-method", ["--host", "api.github.com", "--method", "G-T"], "HTTP method"),
                # read in the shell's zone, the same --at would explain another hour elsewhere
                ("explain-at-naive", ["--provider", "openai", "--at", "2026-11-26T23:00"], "Z or"),
                ("explain-at-date", ["--provider", "openai", "--at", "2026-11-26"], "Z or"),
                ("explain-at-junk", ["--provider", "openai", "--at", "tomorrow"], "Z or"),
            ]
        ),
        pytest.param(
            ["audit", "verify", TENANT, "--expect-head", "12:zz"], 2, ["SEQ:MAC"], id="bad-head"
        ),
        pytest.param(
            ["audit", "verify", TENANT, "--expect-head", ""], 2, ["SEQ:MAC"], id="empty-head"
        ),
        pytest.param(
            ["audit", "verify", TENANT, "--checkpoint-key", "/nonexistent/k.pem"],
            1,
            ["checkpoint key not found", "/nonexistent/k.pem"],
            id="missing-checkpoint-key",
        ),
        pytest.param(["audit", "export", TENANT, "--format", "csv"], 2, ["csv"], id="bad-format"),
        pytest.param(["audit", "tail", TENANT, "-n", "-1"], 2, ["-n", "-1"], id="tail-negative"),
        pytest.param(
            ["audit", "tail", TENANT, "-f", "--interval", "0"], 2, ["--interval"], id="tail-busy"
        ),
        pytest.param(
            ["vault", "put", TENANT, "openai", "--from-env", "AIID_TEST_UNSET"],
            2,
            ["AIID_TEST_UNSET"],
            id="vault-env-unset",
        ),
        pytest.param(["vault", "put", TENANT, "openai"], 2, ["secret"], id="vault-empty-stdin"),
        pytest.param(["approve", TENANT, "req_1"], 1, ["no running gateway"], id="no-gateway"),
        pytest.param(["deny", TENANT, "req_1"], 1, ["no running gateway"], id="deny-no-gw"),
        pytest.param(
            ["deny", TENANT, "req_1", "--reason", "x" * 5000],
            2,
            ["--reason is at most 1000 characters"],
            id="deny-reason-too-long",
        ),
        pytest.param(  # 1000 characters, 6000 bytes as JSON escapes: over the channel's limit
            ["deny", TENANT, "req_1", "--reason", "é" * 1000],
            2,
            ["the answer is over 4096 bytes: shorten --reason or --as"],
            id="deny-reason-too-many-bytes",
        ),
        pytest.param(
            ["approve", TENANT, "req_1", "--as", "x" * 5000],
            2,
            ["the answer is over 4096 bytes"],
            id="approve-as-too-long",
        ),
        pytest.param(
            ["approve", TENANT, "req_1", "--ttl", ""], 2, ["--ttl"], id="approve-ttl-empty"
        ),
    ],
)
def test_errors_are_one_line_with_the_right_status(
    aiid: Run, home: Home, policies: Path, args: list[str], code: int, needles: list[str]
) -> None:
    r = aiid("--home", home.root, *args, env={"AIID_POLICIES": str(policies)})
    one_line_error(r, code, *needles)


def test_an_unreadable_checkpoint_file_fails_verify_on_stdout_and_stderr(
    aiid: Run, home: Home
) -> None:
    r = aiid("--home", home.root, "audit", "verify", TENANT, "--checkpoint", "/nonexistent/cp")
    assert r.code == 1 and r.out.startswith("FAILED: cannot read checkpoint file"), r
    assert r.err.startswith("aiid: error: audit chain FAILED: cannot read checkpoint file"), r


@pytest.mark.parametrize("args", [pytest.param([], id="aiid"), pytest.param(["vault"], id="group")])
def test_a_command_without_its_subcommand_prints_the_help(aiid: Run, args: list[str]) -> None:
    r = aiid(*args)
    assert r.code == 2 and r.out == ""
    assert r.err.startswith(f"Usage: aiid {' '.join([*args, ''])}[OPTIONS] COMMAND")
    assert "Commands:" in r.err and "aiid: error" not in r.err


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        pytest.param(
            ["nosuchopt=1", "flow_detail=1"],
            "unknown option(s) for --set: flow_detail, nosuchopt",
            id="unknown",
        ),
        pytest.param(["listen_port=abc"], "--set listen_port: ", id="bad-int"),
        pytest.param(["ssl_insecure=maybe"], "--set ssl_insecure: ", id="bad-bool"),
        pytest.param(["tcp_timeout"], "--set tcp_timeout: ", id="no-value-for-an-int"),
        # [AL] a pair mistyped without "=" said only "unknown option"
        pytest.param(
            ["badformat"],
            "unknown option(s) for --set: badformat (expected OPTION=VALUE)",
            id="no-equals-sign",
        ),
    ],
)
def test_run_with_a_bad_set_is_a_usage_error_before_anything_starts(
    aiid: Run, home: Home, policies: Path, sets: list[str], needle: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = len(audit_rows(home))
    args = [a for spec in sets for a in ("--set", spec)]
    r = aiid(
        "--home", home.root, "run", "--no-console", "--listen", f"127.0.0.1:{port}",
        "--policies", policies, *args,
    )  # fmt: skip
    one_line_error(r, 2, needle)
    assert r.out == "" and len(audit_rows(home)) == before  # nothing loaded, nothing audited


def test_run_on_a_port_in_use_says_why_in_one_line(aiid: Run, home: Home, policies: Path) -> None:
    # mitmproxy alone logs the reason to stdout (the console's screen) and prints only
    # "Error logged during startup, exiting..." on stderr.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = aiid(
            "--home",
            home.root,
            "run",
            "--no-console",
            "--listen",
            f"127.0.0.1:{port}",
            "--policies",
            policies,
        )
    one_line_error(r, 1, f"cannot listen on 127.0.0.1:{port}", "address already in use")


@pytest.mark.parametrize(
    ("key", "args"),
    [
        pytest.param("runtime/master.key", ["vault", "list", TENANT], id="master-key"),
        pytest.param("runtime/audit.key", ["audit", "verify", TENANT], id="audit-key"),
        pytest.param("admin/signing.key", ["token", "issue", TENANT, "bot"], id="signing-key"),
    ],
)
def test_a_secret_key_open_to_other_users_is_refused(
    aiid: Run, home: Home, key: str, args: list[str]
) -> None:
    path = home.root / key
    path.chmod(0o644)
    try:
        one_line_error(
            aiid("--home", home.root, *args), 1, f"{path} is open to other users (mode 0644)",
            f"chmod 600 {path}",
        )  # fmt: skip
    finally:
        path.chmod(0o600)
    assert aiid("--home", home.root, *args).code == 0


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["vault", "list", TENANT], id="vault-list"),
        pytest.param(["tenant", "list"], id="tenant-list"),
    ],
)
def test_a_missing_home_is_a_clear_error(aiid: Run, tmp_path: Path, args: list[str]) -> None:
    one_line_error(aiid("--home", tmp_path / "none", *args), 1, "no aiid home", "aiid init")


BAD_NAMES = ["Acme", "a b", "../etc", "a" * 64, "x.y", "é", "_lead"]
GOOD_NAMES = ["a", "acme-1_x", "0day", "a" * 63]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["tenant", "add", "{}"], id="tenant-add"),
        pytest.param(["token", "issue", TENANT, "{}"], id="agent"),
        pytest.param(["vault", "list", "{}"], id="vault-tenant"),
        pytest.param(["audit", "verify", "{}"], id="audit-tenant"),
    ],
)
def test_bad_names_are_refused(aiid: Run, home: Home, name: str, args: list[str]) -> None:
    r = aiid("--home", home.root, *[a.format(name) for a in args])
    one_line_error(r, 2)
    assert not (home.root / "tenants" / name).exists()


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_are_accepted(aiid: Run, home: Home, name: str) -> None:
    assert aiid("--home", home.root, "tenant", "add", name).code == 0
    assert aiid("--home", home.root, "token", "issue", name, name).code == 0


# -- policy -------------------------------------------------------------------------------------
def test_policy_check_ok(aiid: Run, policies: Path) -> None:
    r = aiid("policy", "check", policies)
    assert r.code == 0 and r.lines[-1] == "OK 2 policies"
    assert f"ok {TENANT}: 5 rules, 0 overrides" in r.lines
    r = aiid("policy", "check", env={"AIID_POLICIES": str(policies)})
    assert r.code == 0 and r.lines[-1] == "OK 2 policies"


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        pytest.param("version: 1\ntenant: acme\ndefault: deny\nrulez: []\n", 4, "rulez", id="key"),
        pytest.param(
            "version: 1\ntenant: acme\ndefault: deny\nrules:\n  - id: x\n    effect: maybe\n",
            6,
            "maybe",
            id="effect",
        ),
        pytest.param("version: 1\ntenant: other\ndefault: deny\n", 2, "tenant", id="tenant"),
        pytest.param("version: 1\ntenant: acme\ndefault: allow\n", 3, "deny", id="default"),
    ],
)
def test_policy_check_names_file_and_line(
    aiid: Run, policies: Path, text: str, line: int, needle: str
) -> None:
    bad = policies / f"{TENANT}.yaml"
    bad.write_text(text)
    r = aiid("policy", "check", policies)
    assert r.code == 1 and "OK" not in r.out
    errs = r.err.splitlines()
    assert len(errs) == 1
    assert errs[0].startswith(f"{bad}:{line}:"), errs[0]
    assert needle in errs[0]


def test_policy_check_names_every_bad_setting_and_rule(aiid: Run, policies: Path) -> None:
    bad = policies / f"{TENANT}.yaml"
    bad.write_text(
        "version: 1\n"
        "tenant: other\n"  # 2
        "default: allow\n"  # 3
        "approval: {timeout: soon}\n"  # 4
        "rules:\n"
        "  - {id: a, effect: allow}\n"
        "  - {id: a, effect: allow}\n"  # 7: duplicate
        "  - {id: b, effect: maybe}\n"  # 8
        "  - {id: c, effect: deny, models: []}\n"  # 9
        "limits:\n"
        "  tenant: {requests_per_minute: -1}\n"  # 11
        "foo: 1\n"  # 12: an unknown top-level key stops nothing
    )
    r = aiid("policy", "check", policies)
    assert r.code == 1 and "OK" not in r.out
    lines = [int(e.split(":")[1]) for e in r.err.splitlines()]
    assert lines == [2, 3, 4, 7, 8, 9, 11, 12], r.err
    assert all(e.startswith(f"{bad}:") for e in r.err.splitlines())


def test_policy_check_names_a_duplicate_of_a_rule_that_failed_on_a_key(
    aiid: Run, policies: Path
) -> None:
    bad = policies / f"{TENANT}.yaml"
    bad.write_text(
        "version: 1\ntenant: acme\ndefault: deny\nrules:\n"
        "  - {id: a, effect: allow, agent: [x]}\n"  # 5: unknown key, the id still counts
        "  - {id: a, effect: allow}\n"  # 6: its duplicate
    )
    r = aiid("policy", "check", policies)
    errs = r.err.splitlines()
    assert r.code == 1 and len(errs) == 2, r.err
    assert errs[0].startswith(f"{bad}:5:") and "unknown key 'agent'" in errs[0]
    assert errs[1] == f"{bad}:6: duplicate id 'a' (first on line 5)"


def test_policy_check_names_rules_that_can_never_match(aiid: Run, policies: Path) -> None:
    """A dead deny lets through what it meant to stop: an error, as a running gateway refuses
    the file ([AB]). A dead allow only denies more than meant: a warning, exit 0."""
    bad = policies / f"{TENANT}.yaml"
    bad.write_text(
        "version: 1\ntenant: acme\ndefault: deny\nrules:\n"
        "  - {id: a, providers: [opnai], effect: allow}\n"  # 5
        "  - {id: b, providers: [open*], effect: allow}\n"  # a glob: may match
        "  - {id: c, hosts: [api.openai.com], effect: allow}\n"  # 7
        "  - {id: d, hosts: [api.github.com], effect: allow}\n"
        "  - {id: e, agents: [eg-*], hosts: ['*'], effect: allow}\n"  # 9: [AL] any host
        "  - {id: f, hosts: ['*'], effect: deny}\n"  # a deny of every host: no warning
    )
    r = aiid("policy", "check", policies)
    assert r.code == 0 and "OK 2 policies" in r.out
    warns = r.err.splitlines()
    assert len(warns) == 3, r.err
    assert warns[0].startswith(f"{bad}:5: warning: rule 'a': unknown provider 'opnai'")
    assert warns[1].startswith(f"{bad}:7: warning: rule 'c': api.openai.com is provider 'openai'")
    assert warns[2].startswith(f"{bad}:9: warning: rule 'e': hosts '*' lets the agent name any")
    bad.write_text(
        "version: 1\ntenant: acme\ndefault: deny\nrules:\n"
        "  - {id: a, providers: [opnai], effect: deny}\n"  # 5
        "  - {id: c, hosts: [api.openai.com], effect: deny}\n"  # 6
        "  - {id: d, providers: [openai], effect: allow}\n"
    )
    r = aiid("policy", "check", policies)
    assert r.code == 1 and "OK" not in r.out
    errs = r.err.splitlines()
    assert len(errs) == 2, r.err
    assert errs[0].startswith(f"{bad}:5: rule 'a': unknown provider 'opnai'")
    assert errs[1].startswith(f"{bad}:6: rule 'c': api.openai.com is provider 'openai'")


def test_policy_check_names_each_bad_condition_limit_and_budget_and_dead_rules_too(
    aiid: Run, policies: Path
) -> None:
    bad = policies / f"{TENANT}.yaml"
    bad.write_text(
        "version: 1\ntenant: acme\ndefault: deny\n"
        "colour: blue\n"  # 4
        "rules:\n"
        "  - id: a\n"
        "    providers: [openia]\n"  # the rule (line 6) can never match
        "    effect: allow\n"
        "    when:\n"
        "      max_tokens: {max: -5}\n"  # 10
        "      temperature: {min: -0.5}\n"  # 11
        "      n: {max: 1.5}\n"  # 12
        "  - {id: b, providers: [openai], effect: allow}\n"
        "limits:\n"
        "  tenant: {tokens_per_minute: -100}\n"  # 15
        "  agents: {'a-*': {requests_per_minute: -3}}\n"  # 16
        "budgets:\n"
        "  tenant: {usd_per_day: -5, usd_per_month: -9}\n"  # 18, twice
    )
    r = aiid("policy", "check", policies)
    assert r.code == 1
    lines = [int(e.split(":")[1]) for e in r.err.splitlines()]
    assert sorted(lines) == [4, 6, 10, 11, 12, 15, 16, 18, 18], r.err
    assert any("unknown provider 'openia'" in e for e in r.err.splitlines())


def test_policy_check_names_agent_limits_and_budgets_that_never_apply(
    aiid: Run, policies: Path
) -> None:
    bad = policies / f"{TENANT}.yaml"
    bad.write_text(
        "version: 1\ntenant: acme\ndefault: deny\n"
        "limits:\n"
        "  agents:\n"
        '    "*": {tokens_per_minute: 60}\n'
        '    "support-7": {requests_per_minute: 1}\n'  # 7: after "*"
        "budgets:\n"
        "  agents:\n"
        '    "support-*": {usd_per_day: 5}\n'
        "    support-7: {usd_per_day: 1}\n"  # 11: a name the glob before matches
        '    "coder-*": {usd_per_day: 2}\n'  # fine
    )
    r = aiid("policy", "check", policies)
    assert r.code == 1
    assert r.err.splitlines() == [
        f"{bad}:7: limits.agents['support-7'] never applies: the earlier '*' matches first "
        "(the first matching glob gives an agent's limit; put specific names first)",
        f"{bad}:11: budgets.agents['support-7'] never applies: the earlier 'support-*' matches "
        "first (the first matching glob gives an agent's budget; put specific names first)",
    ]


def test_policy_check_names_prices_for_an_unknown_provider(aiid: Run, policies: Path) -> None:
    prices = policies / "prices.yaml"
    prices.write_text(
        'version: 1\nprices:\n  openai:\n    "gpt-x*": {input: 1, output: 2}\n'
        '  opnai:\n    "gpt-4o*": {input: 1, output: 2}\n'  # 5
    )
    r = aiid("policy", "check", policies)
    assert r.code == 1
    (line,) = r.err.splitlines()
    assert line.startswith(f"{prices}:5: unknown provider 'opnai', so its prices never apply")


def test_policy_check_gives_the_line_of_a_bad_provider_in_providers_yaml(
    aiid: Run, policies: Path
) -> None:
    bad = policies / "providers.yaml"
    bad.write_text(
        "version: 1\nproviders:\n  ok-one:\n    openai_compatible: true\n"
        "    hosts: [a.example.com]\n"
        "  my-prov:\n"  # 6
        "    hosts: [api.myprov.example]\n    usage_format: openai\n"
    )
    r = aiid("policy", "check", policies)
    assert r.code == 1
    assert r.err.splitlines() == [f"{bad}:6: provider 'my-prov': missing 'auth'"]


def test_policy_check_names_a_region_no_provider_is_in(aiid: Run, policies: Path) -> None:
    bad = policies / f"{TENANT}.yaml"
    bad.write_text("version: 1\ntenant: acme\ndefault: deny\nregion: mars\n")
    r = aiid("policy", "check", policies)
    assert r.code == 1
    assert r.err.splitlines() == [
        f"{bad}:4: unknown region 'mars': no provider is in it (known: eu, us; providers.yaml "
        "can add providers)"
    ]
    bad.write_text("version: 1\ntenant: acme\ndefault: deny\nregion: eu\n")
    assert aiid("policy", "check", policies).code == 0


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        pytest.param(
            ["--agent", "bot", "--provider", "openai", "--model", "gpt-4o-mini"],
            ["decision: allow", "rule: small-models"],
            id="allow",
        ),
        pytest.param(
            ["--agent", "bot", "--provider", "openai", "--model", "gpt-4o"],
            ["decision: deny", "rule: no-gpt-4o", "reason: gpt-4o is not enabled"],
            id="deny",
        ),
        pytest.param(
            ["--agent", "bot", "--provider", "openai", "--model", "o1-preview"],
            ["decision: approve", "rule: big-needs-human"],
            id="approve",
        ),
        pytest.param(
            ["--agent", "bot", "--host", "api.github.com", "--method", "GET", "--path", "/repos/x"],
            ["decision: allow", "rule: github-read"],
            id="egress",
        ),
        pytest.param(  # [AL] a policy's methods take `get`: explain does too
            ["--agent", "bot", "--host", "api.github.com", "--method", "get", "--path", "/repos/x"],
            ["decision: allow", "rule: github-read"],
            id="egress-method-lower-case",
        ),
        pytest.param(
            ["--agent", "bot", "--provider", "mistral", "--model", "mistral-large"],
            ["decision: deny", "rule: default"],
            id="default",
        ),
    ],
)
def test_policy_explain(aiid: Run, policies: Path, args: list[str], expect: list[str]) -> None:
    r = aiid("policy", "explain", TENANT, *args, "--policies", policies)
    assert r.code == 0, r
    for e in expect:
        assert e in r.lines
    assert "considered:" in r.lines and any("no-gpt-4o" in line for line in r.lines)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        pytest.param(
            ["--host", "api.openai.com", "--method", "GET", "--path", "/v2/x"],
            ["decision: deny", "rule: default",
             "reason: GET /v2/x is not a known openai API route (refused before any rule is "
             "looked at)"],
            id="provider-host-unknown-route",
        ),
        # with --provider too: explain said allow for routes the gateway refuses
        pytest.param(
            ["--provider", "openai", "--model", "gpt-4o-mini", "--path", "/v1/moderations"],
            ["decision: deny", "rule: default",
             "reason: POST /v1/moderations is not a known openai API route (refused before "
             "any rule is looked at)"],
            id="provider-unknown-route",
        ),
        pytest.param(
            ["--provider", "openai", "--model", "gpt-4o-mini", "--path", "/v1/chat/completions"],
            ["decision: allow", "rule: small-models"],
            id="provider-known-route",
        ),
        pytest.param(
            ["--host", "api.github.com", "--method", "GET", "--path", "/repos/a/../b"],
            ["decision: deny", "rule: -"],
            id="dot-segments-400",
        ),
        pytest.param(
            ["--host", "api.openai.com", "--method", "POST", "--path", "/v1/chat/completions",
             "--model", "gpt-4o"],
            ["decision: deny", "rule: no-gpt-4o"],
            id="provider-host-is-a-provider-request",
        ),
    ],
)  # fmt: skip
def test_policy_explain_decides_what_the_gateway_decides_before_rules(
    aiid: Run, policies: Path, args: list[str], expect: list[str]
) -> None:
    """A provider's host is no `hosts` rule's business, and a path the gateway refuses
    (400) is refused here too: explain said allow for both."""
    r = aiid("policy", "explain", TENANT, "--agent", "bot", *args, "--policies", policies)
    assert r.code == 0, r
    for e in expect:
        assert e in r.lines, r.lines


def test_policy_explain_says_an_unpriced_model_under_a_budget_is_refused(
    aiid: Run, tmp_path: Path
) -> None:
    pol = write_policies(tmp_path / "p")
    f = pol / f"{TENANT}.yaml"
    f.write_text(f.read_text() + "budgets:\n  tenant: {usd_per_day: 5}\n")
    args = ["policy", "explain", TENANT, "--agent", "bot", "--provider", "anthropic"]
    r = aiid(*args, "--model", "claude-zz-haiku-x", "--policies", str(pol))
    assert r.code == 0 and r.lines[:2] == ["decision: deny", "rule: budgets"], r.lines
    assert "no price for model 'claude-zz-haiku-x'" in r.lines[2]
    r = aiid(*args, "--model", "claude-3-5-haiku-latest", "--policies", str(pol))  # priced
    assert "decision: allow" in r.lines


def test_policy_explain_names_an_active_override(aiid: Run, tmp_path: Path) -> None:
    pol = write_policies(tmp_path / "p")
    p = pol / f"{TENANT}.yaml"
    p.write_text(
        p.read_text()
        + "overrides:\n  - id: INC-1\n    agents: [bot]\n    models: [gpt-4o]\n"
        + "    effect: allow\n    approved_by: alice\n    expires: 2030-01-01T00:00:00Z\n"
    )
    args = ["policy", "explain", TENANT, "--agent", "bot", "--provider", "openai"]
    args += ["--model", "gpt-4o", "--policies", str(pol)]
    r = aiid(*args, "--at", "2029-01-01T00:00:00Z")
    assert "decision: allow" in r.lines and "override: INC-1" in r.lines
    r = aiid(*args, "--at", "2031-01-01T00:00:00Z")
    assert "decision: deny" in r.lines and "override: INC-1" not in r.lines


# -- audit ----------------------------------------------------------------------------------------
@pytest.fixture
def audited(home: Home) -> Iterator[Home]:
    """acme's audit log with a few records of each kind."""
    log = AuditLog(
        home.audit_path(TENANT),
        TENANT,
        home.audit_key(),
        checkpoint_path=home.checkpoint_path(TENANT),
    )
    try:
        for i in range(3):
            rid = f"req_{i:024x}"
            fields: dict[str, Any] = {"agent": "support-1", "provider": "openai"}
            fields |= {"model": "gpt-4o-mini", "rule": "small-models", "request_id": rid}
            log.append("request", detail={"method": "POST"}, **fields).result(10)
            log.append("response", status=200, input_tokens=7, output_tokens=5, **fields).result(10)
        log.append(
            "approval",
            status=200,
            agent="coder-1",
            rule="big-needs-human",
            request_id="req_approved",
            reason="approved by alice",
            detail={"decided_by": "alice"},
        ).result(10)
        log.append(
            "deny",
            status=403,
            agent="support-1",
            model="gpt-4o",
            rule="no-gpt-4o",
            reason="policy_denied: gpt-4o is not enabled",
        ).result(10)
    finally:
        log.close()
    yield home


def _count(home: Home) -> int:
    con = sqlite3.connect(home.audit_path(TENANT))
    try:
        return int(con.execute("SELECT COUNT(*) FROM audit").fetchone()[0])
    finally:
        con.close()


def test_audit_verify_ok_then_names_the_first_bad_seq(aiid: Run, audited: Home) -> None:
    n = _count(audited)
    r = aiid("--home", audited.root, "audit", "verify", TENANT)
    assert r.code == 0 and r.out.startswith(f"OK {n} records")
    con = sqlite3.connect(audited.audit_path(TENANT))
    with con:
        con.execute("UPDATE audit SET status = 200 WHERE event = 'deny'")
    con.close()
    r = aiid("--home", audited.root, "audit", "verify", TENANT)
    assert r.code == 1 and r.out.startswith(f"FAILED at seq {n}")


def test_audit_verify_with_another_key_says_the_key_may_be_wrong(aiid: Run, audited: Home) -> None:
    other = base64.b64encode(b"k" * 32).decode()
    r = aiid("--home", audited.root, "audit", "verify", TENANT, env={"AIID_AUDIT_KEY": other})
    assert r.code == 1 and r.out.startswith("FAILED at seq 1")
    assert "not the audit key it was written with" in r.out


def test_audit_tail_human_and_json(aiid: Run, audited: Home) -> None:
    n = _count(audited)
    r = aiid("--home", audited.root, "audit", "tail", TENANT)
    assert r.code == 0 and len(r.lines) == n
    assert "deny" in r.lines[-1] and "no-gpt-4o" in r.lines[-1]
    assert "\x1b[" not in r.out  # no colour when not on a terminal
    r = aiid("--home", audited.root, "audit", "tail", TENANT, "-n", "2", "--json")
    recs = [json.loads(line) for line in r.lines]
    assert [x["seq"] for x in recs] == [n - 1, n]
    assert recs[-1]["event"] == "deny" and recs[-1]["reason"].startswith("policy_denied")
    assert isinstance(recs[0]["detail"], (dict, type(None))) and len(recs[0]["mac"]) == 64


@pytest.mark.parametrize(
    ("event", "colour"),
    [
        pytest.param("deny", "\x1b[31m", id="deny-red"),
        pytest.param("approval", "\x1b[33m", id="approval-yellow"),
        pytest.param("response", "\x1b[32m", id="response-green"),
    ],
)
def test_audit_tail_colours_events_on_a_terminal(
    aiid: Run, audited: Home, monkeypatch: pytest.MonkeyPatch, event: str, colour: str
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    r = aiid("--home", audited.root, "audit", "tail", TENANT)
    lines = [line for line in r.lines if f" {event} " in line]
    assert lines and all(line.startswith(colour) for line in lines), r.out


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        pytest.param("1", ["deny", "policy"], id="n1"),
        pytest.param("0", ["policy"], id="n0-only-new-records"),
    ],
)
def test_audit_tail_follow_prints_new_records(
    aiid: Run, audited: Home, monkeypatch: pytest.MonkeyPatch, count: str, shown: list[str]
) -> None:
    """-f: polls for records after the last one shown (with -n 0, after the current end);
    Ctrl-C ends it cleanly."""
    ticks = iter(range(10))

    def fake_sleep(_s: float) -> None:
        i = next(ticks)
        if i == 1:
            log = AuditLog(home.audit_path(TENANT), TENANT, home.audit_key())
            try:
                log.append("policy", reason="acme: loaded abc").result(10)
            finally:
                log.close()
        if i == 3:
            raise KeyboardInterrupt

    home = audited
    monkeypatch.setattr(time, "sleep", fake_sleep)
    r = aiid("--home", home.root, "audit", "tail", TENANT, "-n", count, "-f", "--json")
    assert r.code == 0
    recs = [json.loads(line) for line in r.lines]
    assert [x["event"] for x in recs] == shown
    assert recs[-1]["seq"] == _count(home)


def test_audit_export_jsonl_has_every_record_with_its_mac(aiid: Run, audited: Home) -> None:
    r = aiid("--home", audited.root, "audit", "export", TENANT, "--format", "jsonl")
    assert r.code == 0
    recs = [json.loads(line) for line in r.lines]
    assert [x["seq"] for x in recs] == list(range(1, _count(audited) + 1))
    for prev, cur in zip(recs, recs[1:], strict=False):
        assert cur["prev_mac"] == prev["mac"]
    assert all(len(x["mac"]) == 64 for x in recs)
    assert tenant_key(audited.audit_key(), TENANT)  # the key the macs are made with exists


# -- approve / deny over the control channel ------------------------------------------------------
@pytest.fixture
def short_home(home_template: Path) -> Iterator[Home]:
    """A copy of the test home at a short path: the control socket path must fit 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="aiid-", dir="/tmp"))
    shutil.copytree(home_template, d / "h")
    try:
        yield Home(d / "h")
    finally:
        shutil.rmtree(d, ignore_errors=True)


class LiveControl:
    """The gateway side of approvals on a background event loop: broker + control server."""

    def __init__(self, home: Home) -> None:
        self.rt = Runtime()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ControlServer(home, self.rt._answer)
        self.on_loop(self.server.start())

    def on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def hold(self, request_id: str, agent: str = "bot") -> Pending:
        async def go() -> Pending:
            key = (TENANT, agent, "openai", "o1", "big-needs-human")
            return self.rt.broker.hold(TENANT, request_id, key, 60)

        p: Pending = self.on_loop(go())
        return p

    def close(self) -> None:
        self.on_loop(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def live(short_home: Home) -> Iterator[LiveControl]:
    lc = LiveControl(short_home)
    try:
        yield lc
    finally:
        lc.close()


@pytest.mark.parametrize(
    ("args", "env", "message", "answer"),
    [
        pytest.param(
            ["approve", TENANT, "req_a"],
            {"USER": "carol"},
            "approved req_a",
            Answer(True, "carol"),
            id="approve-once-as-USER",
        ),
        pytest.param(
            ["approve", TENANT, "req_a", "--ttl", "10m", "--as", "alice"],
            {"USER": "carol"},
            "approved req_a, and matching requests for 600 s",
            Answer(True, "alice", ttl=600.0),
            id="approve-for-ttl-as",
        ),
        pytest.param(
            ["deny", TENANT, "req_a", "--reason", "too expensive"],
            {"USER": "bob"},
            "denied req_a",
            Answer(False, "bob", "too expensive"),
            id="deny-with-reason",
        ),
        pytest.param(
            ["approve", TENANT, "req_a"],
            {"USER": "", "LOGNAME": ""},
            "approved req_a",
            Answer(True, pwd.getpwuid(os.getuid()).pw_name),
            id="approve-as-login-name-without-USER",
        ),
        pytest.param(
            ["deny", TENANT, "req_a", "--as", "dave"],
            {},
            "denied req_a",
            Answer(False, "dave", "denied by operator"),
            id="deny-default-reason",
        ),
    ],
)
def test_approve_and_deny_answer_the_held_request(
    aiid: Run,
    live: LiveControl,
    short_home: Home,
    args: list[str],
    env: dict[str, str],
    message: str,
    answer: Answer,
) -> None:
    held = live.hold("req_a")
    other = live.hold("req_b", agent="someone-else")  # a different key: untouched
    r = aiid("--home", short_home.root, *args, env=env)
    assert (r.code, r.out.strip(), r.err) == (0, message, "")
    assert held.future.done() and held.future.result() == answer
    assert not other.future.done()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["approve", TENANT, "req_zzz"], "no pending request req_zzz", id="unknown"),
        pytest.param(["approve", NOKEY_TENANT, "req_a"], "for tenant nokey", id="other-tenant"),
        pytest.param(["approve", TENANT, "req_a", "--ttl", "soon"], "soon", id="bad-ttl"),
        pytest.param(["approve", TENANT, "req_a", "--ttl", "48h"], "at most 24h", id="ttl-48h"),
    ],
)
def test_approve_errors_are_one_line(
    aiid: Run, live: LiveControl, short_home: Home, args: list[str], needle: str
) -> None:
    held = live.hold("req_a")
    r = aiid("--home", short_home.root, *args)
    one_line_error(r, 2 if "--ttl" in args else 1, needle)
    assert not held.future.done()


def test_answering_twice_is_refused(aiid: Run, live: LiveControl, short_home: Home) -> None:
    live.hold("req_a")
    assert aiid("--home", short_home.root, "approve", TENANT, "req_a").code == 0
    one_line_error(aiid("--home", short_home.root, "deny", TENANT, "req_a"), 1, "already answered")


def test_policy_explain_reads_a_stream_route_as_streaming(aiid: Run, tmp_path: Path) -> None:
    """The gateway takes streaming from Gemini's :streamGenerateContent route; explain took
    only --param stream, and allowed what a `stream: false` rule refuses live ([AB])."""
    pol = tmp_path / "p"
    pol.mkdir()
    (pol / f"{TENANT}.yaml").write_text(
        "version: 1\ntenant: acme\ndefault: deny\nrules:\n"
        "  - {id: no-stream, providers: [gemini], when: {stream: false}, effect: allow}\n"
    )
    base = ["policy", "explain", TENANT, "--agent", "g1", "--provider", "gemini"]
    path = "/v1beta/models/gemini-1.5-flash:{}"
    r = aiid(*base, "--method", "POST", "--path", path.format("streamGenerateContent"),
             "--policies", str(pol))  # fmt: skip
    assert r.code == 0 and r.lines[:2] == ["decision: deny", "rule: default"], r.lines
    r = aiid(*base, "--method", "POST", "--path", path.format("generateContent"),
             "--policies", str(pol))  # fmt: skip
    assert r.code == 0 and r.lines[:2] == ["decision: allow", "rule: no-stream"], r.lines


def test_policy_explain_refuses_n_zero_as_the_gateway_does(aiid: Run, policies: Path) -> None:
    r = aiid("policy", "explain", TENANT, "--agent", "bot", "--provider", "openai", "--model",
             "gpt-4o-mini", "--param", "n=0", "--policies", policies)  # fmt: skip
    assert r.code == 2 and "--param n must be 1 or more" in r.err


def test_vault_put_at_a_terminal_does_not_show_the_secret(home: Home) -> None:
    """Typed or pasted at a terminal, the secret was echoed on the screen ([AA])."""
    import pty
    import select

    secret = "sk-typed-SECRET-0123456789"
    aiid_bin = str(Path(sys.executable).parent / "aiid")
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.execve(
            aiid_bin,
            [aiid_bin, "--home", str(home.root), "vault", "put", TENANT, "mistral"],
            {k: v for k, v in os.environ.items() if k != "AIID_MASTER_KEY"},
        )
    seen = b""
    try:
        for _ in range(200):  # bounded: up to 20 s for the prompt
            if b"not shown" in seen:
                break
            if select.select([fd], [], [], 0.1)[0]:
                seen += os.read(fd, 4096)
        os.write(fd, secret.encode() + b"\n")
        for _ in range(200):
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    finally:
        status = None
        for _ in range(100):  # bounded: a child still waiting for input is killed
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            time.sleep(0.1)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert status is not None and os.waitstatus_to_exitcode(status) == 0, seen
    assert b"stored mistral for acme" in seen
    assert secret.encode() not in seen
    with Vault(home.vault_path(TENANT), TENANT, MasterKeyring.from_home(home, {})) as v:
        assert v.get("mistral").reveal() == secret


def test_policy_explain_for_a_tenant_without_a_policy_says_deny(
    aiid: Run, home: Home, tmp_path: Path
) -> None:
    """The gateway denies such a tenant everything (rule default); explain exited 1 ([AA])."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = aiid("--home", home.root, "policy", "explain", TENANT, "--agent", "a", "--provider",
             "openai", "--model", "gpt-4o-mini", "--policies", empty)  # fmt: skip
    assert r.code == 0 and r.lines[:2] == ["decision: deny", "rule: default"], r
    assert "every request of this tenant is denied" in r.lines[2]


def test_policy_check_on_a_file_says_it_is_not_a_directory(aiid: Run, policies: Path) -> None:
    f = policies / f"{TENANT}.yaml"
    one_line_error(aiid("policy", "check", f), 1, f"policy directory {f} is not a directory")


def test_policy_explain_gives_no_deny_text_as_the_reason_of_an_allow(
    aiid: Run, tmp_path: Path
) -> None:
    """The contract's example rule has `reason: "shown to the agent on deny"`: explain printed
    it as the reason of an allow ([AF])."""
    pol = tmp_path / "p"
    pol.mkdir()
    (pol / f"{TENANT}.yaml").write_text(
        "version: 1\ntenant: acme\ndefault: deny\nrules:\n"
        "  - {id: small, models: ['gpt-4o-mini*'], effect: allow, reason: shown on deny}\n"
    )
    r = aiid("policy", "explain", TENANT, "--agent", "a", "--provider", "openai", "--model",
             "gpt-4o-mini", "--policies", str(pol))  # fmt: skip
    assert r.code == 0 and r.lines[:2] == ["decision: allow", "rule: small"], r.lines
    assert not any(line.startswith("reason:") for line in r.lines), r.lines


def test_vault_put_for_an_unknown_tenant_says_so_before_reading_a_secret(
    aiid: Run, home: Home
) -> None:
    """[AL] With no input it said "expected exactly one non-empty secret line" (exit 2)."""
    r = aiid("--home", home.root, "vault", "put", "nosuch", "openai", stdin="")
    assert r.code == 1 and "unknown tenant 'nosuch'" in r.err
    assert len(r.err.splitlines()) == 1
