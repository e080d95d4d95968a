"""Fault suite: a real `aiid run` under broken disks, keys, vaults, policies and databases.

Each fault must fail closed (nothing reaches the provider stand-in; the agent gets a refusal
or a killed connection, never a provider answer), say so in one clear log line, leak no secret,
and, where the fault goes away, recover without a restart and without a hole in the chain.

- audit disk full: a small tmpfs under the tenant directory (we are root), else ENOSPC from
  the LD_PRELOAD injector ``tests/faultfs.c``;
- audit I/O errors: EIO from the same injector on every write/fsync of ``audit.db*``;
- a corrupted vault entry (a byte flipped in ``vault.db``, in a ciphertext and in a wrapped
  data key), a wrong or malformed ``AIID_MASTER_KEY``, a missing or non-directory policy
  path, a missing ``audit.db`` or ``vault.db`` (at start, and ``audit.db`` deleted under a
  running gateway).

An exception injected into each hook is covered in-process by tests/test_addons.py.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from e2e import AIID, ANTHROPIC_CANARY, OPENAI_CANARY, aiid, free_port, make_home
from gatewayfork import ForkServer, GatewayProc, gateway_args, gateway_env
from standin import StandIn

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
POLICY = """\
version: 1
tenant: acme
default: deny
rules:
  - id: small
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
  - id: haiku
    providers: [anthropic]
    models: ["claude-*"]
    effect: allow
"""


@dataclass
class Reply:
    status: int | None  # None: the connection was killed (fail-closed)
    body: str
    headers: dict[str, str]
    error: str | None = None

    @property
    def refusal(self) -> dict[str, object]:
        obj = json.loads(self.body)
        assert obj["type"] == "error", obj
        err: dict[str, object] = obj["error"]
        return err


@dataclass
class Rig:
    root: Path
    template: Path
    policies: Path
    si: StandIn
    forks: ForkServer
    token: str
    ca: ssl.SSLContext
    shim: Path | None

    def home(self, name: str) -> Path:
        dest = self.root / name / "home"
        shutil.copytree(self.template, dest)
        return dest

    def start(
        self,
        home: Path,
        *,
        policies: Path | None = None,
        exec_real: bool = False,
        **env: str,
    ) -> GatewayProc:
        port = free_port()
        args = gateway_args(port, policies or self.policies, self.si.port, self.si.ca_path)
        log = home.parent / f"gateway-{port}.log"
        gw = GatewayProc(args, gateway_env(home, **env), log, None if exec_real else self.forks)
        gw.wait_listening()
        return gw

    def start_fails(
        self, home: Path, *, exec_real: bool = False, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """`aiid run` that must refuse to start: its exit status and output (stdout+stderr)."""
        port = free_port()
        args = gateway_args(port, self.policies, self.si.port, self.si.ca_path)
        if exec_real:
            return subprocess.run(
                [AIID, *args],
                env=gateway_env(home, **env),
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
        log = home.parent / f"gateway-{port}.log"
        gw = GatewayProc(args, gateway_env(home, **env), log, self.forks)
        deadline = time.monotonic() + 30
        while gw.alive() and time.monotonic() < deadline:
            if "listening on" in gw.output():
                break
            time.sleep(0.02)
        gw.kill9()  # reaps it (it has exited unless it wrongly started)
        assert gw.status is not None
        code = os.waitstatus_to_exitcode(gw.status)
        return subprocess.CompletedProcess(args, code, gw.output(), "")

    def call(self, gw: GatewayProc, provider: str = "openai") -> Reply:
        proxy = f"http://127.0.0.1:{gw.port}"
        if provider == "openai":
            url = "https://api.openai.com/v1/chat/completions"
            headers = {"authorization": f"Bearer {self.token}"}
            body: dict[str, object] = {"model": "gpt-4o-mini", "messages": [], "max_tokens": 8}
        else:
            url = "https://api.anthropic.com/v1/messages"
            headers = {"x-api-key": self.token, "anthropic-version": "2023-06-01"}
            body = {"model": "claude-3-5-haiku-latest", "messages": [], "max_tokens": 8}
        body["messages"] = [{"role": "user", "content": "fault test"}]
        with httpx2.Client(proxy=proxy, verify=self.ca, timeout=15.0, trust_env=False) as c:
            try:
                r = c.post(url, headers=headers, json=body)
            except httpx2.TransportError as e:
                return Reply(None, "", {}, type(e).__name__)
        return Reply(r.status_code, r.text, dict(r.headers))


def _build_shim(dest: Path) -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = dest / "faultfs.so"
    p = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "faultfs.c"), "-ldl"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out if p.returncode == 0 else None


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("faults")
    si = StandIn(root / "standin")
    si.start()
    forks: ForkServer | None = None
    try:
        template = make_home(
            root, {"acme": {"openai": OPENAI_CANARY, "anthropic": ANTHROPIC_CANARY}}
        )
        policies = root / "policies"
        policies.mkdir()
        (policies / "acme.yaml").write_text(POLICY)
        token = aiid(template, "token", "issue", "acme", "fault-bot", "--ttl", "2h").stdout.strip()
        forks = ForkServer(max_seconds=900)
        ca = ssl.create_default_context(cafile=str(template / "certs" / "mitmproxy-ca-cert.pem"))
        yield Rig(root, template, policies, si, forks, token, ca, _build_shim(root))
    finally:
        if forks is not None:
            forks.close()
        si.stop()


def _verify(home: Path) -> str:
    p = aiid(home, "audit", "verify", "acme", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def _wait_log(gw: GatewayProc, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = gw.output()
        if text in out:
            return out
        time.sleep(0.05)
    raise AssertionError(f"log never said {text!r}:\n{gw.output()[-3000:]}")


def _no_secret(*texts: str) -> None:
    for t in texts:
        assert OPENAI_CANARY not in t and ANTHROPIC_CANARY not in t, "a vault secret leaked"


def _assert_denied_while_broken(rig: Rig, gw: GatewayProc, n: int = 6) -> list[Reply]:
    """n requests, none reaching the provider, each killed or refused by the gateway."""
    before = rig.si.hits()
    replies = [rig.call(gw) for _ in range(n)]
    for r in replies:
        assert r.status is None or r.status >= 500, r
    assert rig.si.hits() == before, "a request reached the provider while the audit log failed"
    return replies


def _ok(rig: Rig, gw: GatewayProc, tries: int = 3) -> Reply:
    r = rig.call(gw)
    for _ in range(tries - 1):
        if r.status == 200:
            break
        time.sleep(0.2)
        r = rig.call(gw)
    assert r.status == 200, (r, gw.output()[-2000:])
    return r


# -- audit disk full ---------------------------------------------------------------------------
def _mount_tmpfs(where: Path, size: str) -> bool:
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        timeout=30,
    )
    return p.returncode == 0


def _fill(directory: Path) -> Path:
    """Take every free block of the file system holding ``directory``."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 16, 4096, 512, 1):
            block = b"\0" * chunk
            while True:
                try:
                    f.write(block)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    return filler


def test_audit_disk_full_denies_every_request_then_recovers(rig: Rig) -> None:
    home = rig.home("diskfull")
    tdir = home / "tenants" / "acme"
    saved = tdir.with_name("acme.saved")
    tdir.rename(saved)
    tdir.mkdir(mode=0o700)
    mounted = _mount_tmpfs(tdir, "2m")
    if not mounted and rig.shim is None:
        pytest.skip("neither a tmpfs mount nor the LD_PRELOAD injector is available")
    for p in saved.iterdir():
        shutil.copy2(p, tdir / p.name)
    flag = home.parent / "enospc"
    extra = {}
    if not mounted:  # ENOSPC injected on the audit files instead of a full file system
        assert rig.shim is not None
        extra = {
            "LD_PRELOAD": str(rig.shim),
            "AIID_FAULT_FLAG": str(flag),
            "AIID_FAULT_MATCH": "/tenants/acme/audit.db",
            "AIID_FAULT_ERRNO": str(errno.ENOSPC),
        }
    try:
        gw = rig.start(home, exec_real=not mounted, **extra)
        try:
            _ok(rig, gw)
            filler = _fill(tdir) if mounted else None
            flag.touch()
            _assert_denied_while_broken(rig, gw)
            out = _wait_log(gw, "killed: request record not written: audit write failed")
            assert "database or disk is full" in out
            assert "Traceback" not in out  # one clear line per refused request, no noise
            if filler is not None:
                filler.unlink()
            flag.unlink()
            _ok(rig, gw)  # space is back: no restart needed
        finally:
            gw.stop()
        _no_secret(gw.output())
        assert "OK " in _verify(home)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(tdir)], capture_output=True, timeout=30)


# -- audit I/O errors ----------------------------------------------------------------------------
def test_audit_io_errors_deny_every_request_then_recover(rig: Rig) -> None:
    if rig.shim is None:
        pytest.skip("no C compiler for the LD_PRELOAD fault injector")
    home = rig.home("eio")
    flag = home.parent / "eio"
    gw = rig.start(
        home,
        exec_real=True,  # LD_PRELOAD applies at exec
        LD_PRELOAD=str(rig.shim),
        AIID_FAULT_FLAG=str(flag),
        AIID_FAULT_MATCH="/tenants/acme/audit.db",
    )
    try:
        _ok(rig, gw)
        flag.touch()
        _assert_denied_while_broken(rig, gw)
        out = _wait_log(gw, "killed: request record not written: audit write failed")
        assert "disk I/O error" in out
        assert "Traceback" not in out
        flag.unlink()
        _ok(rig, gw)
        _ok(rig, gw)
    finally:
        flag.unlink(missing_ok=True)
        gw.stop()
    _no_secret(gw.output())
    assert "OK " in _verify(home)


# -- vault ------------------------------------------------------------------------------------
def _flip_in_file(db: Path, provider: str, column: str) -> None:
    conn = sqlite3.connect(db)
    try:
        (blob,) = conn.execute(
            f"SELECT {column} FROM secrets WHERE provider = ?", (provider,)
        ).fetchone()
    finally:
        conn.close()
    for suffix in ("-wal", "-shm"):
        assert not Path(f"{db}{suffix}").exists() or Path(f"{db}{suffix}").stat().st_size == 0
    data = bytearray(db.read_bytes())
    assert data.count(blob) == 1
    data[data.index(blob) + len(blob) // 2] ^= 0x01
    db.write_bytes(bytes(data))


def test_corrupted_vault_entry_kills_the_flow_on_record_and_leaks_nothing(rig: Rig) -> None:
    """An error inside the gateway (the contract): the flow is killed and an `error` record
    written; it was a 503 `vault_error` refusal, a type the contract does not have (pass [W])."""
    home = rig.home("vault")
    vault = home / "tenants" / "acme" / "vault.db"
    _flip_in_file(vault, "openai", "ciphertext")
    _flip_in_file(vault, "anthropic", "wrapped_dek")
    gw = rig.start(home)
    try:
        before = rig.si.hits()
        for provider in ("openai", "anthropic"):
            r = rig.call(gw, provider)
            assert r.status is None or r.status >= 500, r
            _no_secret(r.body, json.dumps(r.headers))
        assert rig.si.hits() == before
        out = _wait_log(gw, "vault entry 'anthropic' cannot be decrypted")
        assert "tenant 'acme': vault entry 'openai' cannot be decrypted" in out
    finally:
        gw.stop()
    _no_secret(gw.output())
    assert "OK " in _verify(home)
    rows = sqlite3.connect(home / "tenants" / "acme" / "audit.db").execute(
        "SELECT event, provider, reason FROM audit WHERE event IN ('deny', 'error')"
    )
    assert [tuple(r) for r in rows] == [
        ("error", p, f"tenant 'acme': vault entry '{p}' cannot be decrypted (corrupted entry "
         "or wrong master key)")
        for p in ("openai", "anthropic")
    ]  # fmt: skip


def test_wrong_or_malformed_master_key_refuses_to_start(rig: Rig) -> None:
    home = rig.home("masterkey")
    wrong = base64.b64encode(os.urandom(32)).decode()
    p = rig.start_fails(home, exec_real=True, AIID_MASTER_KEY=wrong)  # the real binary
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    line = [x for x in out.splitlines() if x.startswith("aiid: error:")]
    assert len(line) == 1, out
    assert "the vault master key does not open tenant 'acme'" in line[0]
    assert "wrong AIID_MASTER_KEY or runtime/master.key?" in line[0]
    # That line is all: mitmproxy's rollback of the refused options once re-entered configure
    # until a RecursionError (~15 s, hundreds of traceback lines, a gateway built each time).
    assert "Traceback" not in out and "RecursionError" not in out, out
    assert out.count("master key id") == 1, out
    assert wrong not in out
    _no_secret(out)
    bad = "not-base64!" + wrong
    p = rig.start_fails(home, AIID_MASTER_KEY=bad)
    assert p.returncode == 1
    assert "AIID_MASTER_KEY is not valid base64" in p.stdout + p.stderr
    assert bad not in p.stdout + p.stderr
    # The right key in the environment (the file's) starts fine and serves.
    right = (home / "runtime" / "master.key").read_text().split()[0]
    gw = rig.start(home, AIID_MASTER_KEY=right)
    try:
        _ok(rig, gw)
    finally:
        gw.stop()


def test_a_refused_start_never_falls_back_to_the_default_home(tmp_path: Path) -> None:
    # mitmproxy's rollback of the refused options re-entered configure with the defaults:
    # ./.aiid and ./policies. From a folder holding another home, the error then described
    # that home (its key id), and a policy record landed in its audit log.
    decoy = make_home(tmp_path / "cwd", {"acme": {"openai": OPENAI_CANARY}}).rename(
        tmp_path / "cwd" / ".aiid"
    )
    (tmp_path / "cwd" / "policies").mkdir()
    (tmp_path / "cwd" / "policies" / "acme.yaml").write_text(POLICY)
    decoy_rows = (
        sqlite3.connect(decoy / "tenants" / "acme" / "audit.db")
        .execute("SELECT count(*) FROM audit")
        .fetchone()[0]
    )
    home = make_home(tmp_path / "mine", {"acme": {"openai": OPENAI_CANARY}})
    listed = subprocess.run(
        [AIID, "--home", str(home), "vault", "list", "acme"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    mine_id = listed.stdout.splitlines()[1].split()[1]  # PROVIDER KEY-ID CREATED ROTATED
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIID_")}
    env["AIID_MASTER_KEY"] = base64.b64encode(os.urandom(32)).decode()
    p = subprocess.run(
        [AIID, "--home", str(home), "run", "--no-console", "--listen", f"127.0.0.1:{free_port()}",
         "--policies", str(tmp_path / "cwd" / "policies")],
        cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.count("aiid: error:") == 1, p.stderr
    assert f"under master key id {mine_id}" in p.stderr  # this home's entry, not the decoy's
    after = (
        sqlite3.connect(decoy / "tenants" / "acme" / "audit.db")
        .execute("SELECT count(*) FROM audit")
        .fetchone()[0]
    )
    assert after == decoy_rows  # nothing written into the other home


# -- policies ---------------------------------------------------------------------------------
def test_missing_policy_directory_denies_by_default(rig: Rig) -> None:
    """A missing directory may be created later (it is watched): the gateway starts, deny-all."""
    home = rig.home("policies")
    where = home.parent / "no-such-dir"
    gw = rig.start(home, policies=where)
    try:
        before = rig.si.hits()
        r = rig.call(gw)
        assert r.status == 403, r
        assert r.refusal["type"] == "policy_denied" and r.refusal["rule"] == "default"
        assert rig.si.hits() == before
        _wait_log(gw, f"policy directory {where} is missing or not a directory")
    finally:
        gw.stop()


def test_a_policy_path_that_is_a_file_refuses_to_start(rig: Rig) -> None:
    home = rig.home("policies-file")
    not_a_dir = home.parent / "policies.yaml"
    not_a_dir.write_text(POLICY)
    p = subprocess.run(
        [
            AIID,
            "run",
            "--no-console",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--policies",
            str(not_a_dir),
        ],
        env=gateway_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 1 and p.stdout == "", p
    assert p.stderr == f"aiid: error: policy directory {not_a_dir} is not a directory\n"


def test_policy_directory_removed_at_runtime_keeps_last_good_and_says_so(rig: Rig) -> None:
    home = rig.home("policies-runtime")
    pdir = home.parent / "policies"
    shutil.copytree(rig.policies, pdir)
    gw = rig.start(home, policies=pdir)
    try:
        _ok(rig, gw)
        pdir.rename(home.parent / "policies.gone")
        out = _wait_log(gw, f"policy directory {pdir} is missing or not a directory")
        assert "file removed, last good policy stays in force" in out
        _ok(rig, gw)  # as for a removed file: the last good policy stays (contract choice)
    finally:
        gw.stop()


# -- missing tenant databases --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["audit.db", "vault.db"])
def test_missing_tenant_database_refuses_to_start(rig: Rig, name: str) -> None:
    home = rig.home(f"missing-{name}")
    (home / "tenants" / "acme" / name).unlink()
    p = rig.start_fails(home)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    kind = name.split(".")[0]
    assert f"{kind} database missing: {home / 'tenants' / 'acme' / name}" in out, out
    assert not (home / "tenants" / "acme" / name).exists(), "the gateway re-created it"


def test_audit_database_deleted_under_a_running_gateway_fails_closed(rig: Rig) -> None:
    home = rig.home("deleted")
    gw = rig.start(home)
    try:
        _ok(rig, gw)
        db = home / "tenants" / "acme" / "audit.db"
        db.rename(home.parent / "audit.db.moved")
        _assert_denied_while_broken(rig, gw, n=3)
        _wait_log(gw, "was removed or replaced while in use; refusing to write")
    finally:
        gw.stop()


# -- the same faults in-process (no mount, compiler or subprocess needed) ------------------------
class _FaultyConnection(sqlite3.Connection):
    fail_with: str | None = None

    def executemany(self, sql: str, rows: object) -> sqlite3.Cursor:  # type: ignore[override]
        if self.fail_with is not None:
            raise sqlite3.OperationalError(self.fail_with)
        return super().executemany(sql, rows)  # type: ignore[arg-type]


def test_audit_log_write_errors_fail_the_append_and_recover(tmp_path: Path) -> None:
    from aiid_proxy.audit import AuditLog, tenant_key, verify_db
    from aiid_proxy.errors import AuditError

    conns: list[_FaultyConnection] = []

    def connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, factory=_FaultyConnection, check_same_thread=False)
        assert isinstance(conn, _FaultyConnection)
        conns.append(conn)
        return conn

    root = bytes(range(32))
    db = tmp_path / "a.db"
    with AuditLog(db, "acme", root, _connect=connect) as log:
        assert log.append_sync("request", request_id="r1").seq == 1
        for message in ("disk I/O error", "database or disk is full"):
            conns[0].fail_with = message
            with pytest.raises(
                AuditError, match=f"audit write failed: OperationalError: {message}"
            ):
                log.append_sync("request", request_id="lost")
            conns[0].fail_with = None
            assert log.append_sync("request", request_id="r2").seq == log.head()[0]
        # SQLite's own page limit: a real SQLITE_FULL from the engine, then room again.
        (pages,) = conns[0].execute("PRAGMA page_count").fetchone()
        conns[0].execute(f"PRAGMA max_page_count = {pages}")
        big = "x" * 20000
        with pytest.raises(AuditError, match="database or disk is full"):
            log.append_sync("request", request_id="big", reason=big)
        conns[0].execute("PRAGMA max_page_count = 1073741823")
        assert log.append_sync("request", request_id="big", reason=big).seq == 4
    res = verify_db(db, tenant_key(root, "acme"))
    assert (res.ok, res.count) == (True, 4)


def test_audit_log_never_creates_a_missing_database_when_told_not_to(tmp_path: Path) -> None:
    from aiid_proxy.audit import AuditLog
    from aiid_proxy.errors import AuditError

    db = tmp_path / "audit.db"
    with pytest.raises(AuditError, match="audit database missing"):
        AuditLog(db, "acme", bytes(32), create=False)
    assert not db.exists()
    AuditLog(db, "acme", bytes(32)).close()  # the default still creates it
    with AuditLog(db, "acme", bytes(32), create=False) as log:
        log.append_sync("request")
        db.rename(tmp_path / "moved.db")
        with pytest.raises(AuditError, match="was removed or replaced while in use"):
            log.append_sync("request")
        shutil.copyfile(tmp_path / "moved.db", db)  # a restored copy is another file
        with pytest.raises(AuditError, match="was removed or replaced while in use"):
            log.append_sync("request")


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "writer-thread"])
@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_removed_or_replaced_wal_is_saved_into_the_database_and_renewed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, threaded: bool, how: str
) -> None:
    """`rm audit.db-wal` under a running gateway: SQLite would go on writing to the unlinked
    file, and a crash then lost the records in it (found by a fault-injection pass: 23
    forwarded requests without their record). The next commit saves them into the database
    and starts a new log; a copy of the files on disk (a crash) holds every record."""
    from aiid_proxy.audit import AuditLog, tenant_key, verify_db

    root = bytes(range(32))
    db = tmp_path / "audit.db"
    wal = tmp_path / "audit.db-wal"
    with AuditLog(db, "acme", root, threaded=threaded) as log:
        for i in range(5):
            log.append_sync("request", request_id=f"req_{i}")
        assert wal.stat().st_size > 0  # the records are in the WAL, not yet in the database
        wal.unlink()
        if how == "replaced":
            wal.write_bytes(b"garbage")
        with caplog.at_level("ERROR"):
            assert log.append_sync("request", request_id="req_5").seq == 6
        assert "was removed or replaced while in use" in caplog.text
        caplog.clear()
        with caplog.at_level("ERROR"):
            assert log.append_sync("response", request_id="req_5").seq == 7
            assert log.append_sync("request", request_id="req_6").seq == 8
        # once renewed, the new WAL is the one in use: not renewed again at every commit
        # ([AE]: it was, once a record, until a restart)
        assert "was removed or replaced while in use" not in caplog.text
        crash = tmp_path / "crash"
        crash.mkdir()
        for f in tmp_path.glob("audit.db*"):
            shutil.copyfile(f, crash / f.name)  # what a kill -9 now would leave
    for where in (crash / "audit.db", db):
        res = verify_db(where, tenant_key(root, "acme"))
        assert (res.ok, res.count) == (True, 8), where
