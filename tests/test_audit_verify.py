"""``verify_db`` split across worker processes: the same verdict as the sequential pass.

The parallel pass is an accelerator only: it may move the verification forward when every
range verifies, and must leave everything else to the sequential pass. The oracle here is that
pass itself (the tamper suite holds it to the exact first bad seq): for every mutation, at and
around every range boundary, the verdict with 1 or 3 workers equals the verdict with none.
"""

from __future__ import annotations

import base64
import marshal
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiid_proxy.audit import AuditLog, VerifyResult, tenant_key, verify_db, verify_range
from aiid_proxy.audit import verify as verify_mod

ROOT = bytes(range(1, 33))
TENANT = "acme"
KEY = tenant_key(ROOT, TENANT)
N = 120
CKPT_EVERY = 10
# Range starts with 1 worker: 1, 61; with 3 workers: 1, 31, 61, 91.
EDGES = [1, 30, 31, 60, 61, 91, 120]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("verify")
    db, ckpt = d / "a.db", d / "a.ckpt"
    with AuditLog(db, TENANT, ROOT, checkpoint_path=ckpt) as log:
        for i in range(1, N + 1):
            kind = i % 3
            if kind == 0:
                log.append_sync("request", request_id=f"req_{i}", agent="a", model="gpt-4o")
            elif kind == 1:
                log.append_sync(
                    "response",
                    request_id=f"req_{i}",
                    status=200,
                    input_tokens=i,
                    output_tokens=2 * i,
                    latency_ms=i * 1.037,
                )
            else:
                log.append_sync("deny", request_id=f"req_{i}", rule="r", reason="no", status=403)
            if i % CKPT_EVERY == 0:
                log.checkpoint()
    return db, ckpt


@pytest.fixture
def copy(pristine: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    db, ckpt = tmp_path / "a.db", tmp_path / "a.ckpt"
    shutil.copyfile(pristine[0], db)
    shutil.copyfile(pristine[1], ckpt)
    return db, ckpt


class Spawned:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], Spawned]]:
    """Force the parallel pass on small tables with ``n`` workers; records the processes."""
    spawned = Spawned()
    start = verify_mod._start_worker

    def counting() -> subprocess.Popen[bytes]:
        proc = start()
        spawned.procs.append(proc)
        return proc

    def use(n: int) -> Spawned:
        spawned.procs.clear()
        monkeypatch.setattr(verify_mod, "PARALLEL_MIN", 1)
        monkeypatch.setattr(verify_mod, "_worker_count", lambda: n)
        monkeypatch.setattr(verify_mod, "_start_worker", counting)
        return spawned

    yield use
    for proc in spawned.procs:  # every worker was waited for: none left running
        assert proc.returncode is not None


def verdicts(db: Path, ckpt: Path, use: Callable[[int], Spawned]) -> dict[int, VerifyResult]:
    out = {}
    for n in (0, 1, 3):
        use(n)
        out[n] = verify_db(db, KEY, checkpoint_path=ckpt)
    return out


def test_a_clean_table_verifies_in_every_range(
    pristine: tuple[Path, Path], workers: Callable[[int], Spawned]
) -> None:
    db, ckpt = pristine
    for n in (0, 1, 2, 3):
        spawned = workers(n)
        res = verify_db(db, KEY, checkpoint_path=ckpt)
        assert (res.ok, res.count, res.reason) == (True, N, f"OK {N} records")
        assert len(spawned.procs) == n
        assert all(p.returncode == 0 for p in spawned.procs)
    workers(0)
    assert verify_db(db, KEY, checkpoint_path=ckpt).head == res.head


def test_a_clean_split_is_taken_and_only_the_tail_is_read_again(
    pristine: tuple[Path, Path], workers: Callable[[int], Spawned], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, ckpt = pristine
    starts: list[int] = []
    real = verify_mod._fast

    def fast(conn: sqlite3.Connection, state: Any) -> bool:
        starts.append(state.expected)
        return real(conn, state)

    monkeypatch.setattr(verify_mod, "_fast", fast)
    workers(2)
    assert verify_db(db, KEY, checkpoint_path=ckpt).ok
    assert starts == [N + 1]  # the workers' verdicts were taken: nothing before N re-read


def test_a_worker_that_read_another_file_is_not_believed(
    copy: tuple[Path, Path], workers: Callable[[int], Spawned], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An authentic copy renamed over the path once this process has the tampered file open,
    # and renamed back once the workers have read it: every process saw the same path, the
    # workers another file. Their OK must not count.
    db, ckpt = copy
    authentic, live = db.with_name("authentic.db"), db.with_name("live.db")
    shutil.copyfile(db, authentic)
    _mutate(db, "update", 100)
    sent, ranged = verify_mod._send, verify_mod.run_range
    spawned = workers(1)

    def swap_in(proc: subprocess.Popen[bytes], job: bytes) -> None:
        db.rename(live)
        authentic.rename(db)
        sent(proc, job)

    def swap_back(*args: Any) -> int:
        reached = ranged(*args)
        for proc in spawned.procs:
            proc.wait(60)  # it has read (and named) the authentic copy
        db.rename(authentic)
        live.rename(db)
        return reached

    monkeypatch.setattr(verify_mod, "_send", swap_in)
    monkeypatch.setattr(verify_mod, "run_range", swap_back)
    res = verify_db(db, KEY, checkpoint_path=ckpt)
    assert (res.ok, res.first_bad_seq) == (False, 100), res.reason


def test_rows_appended_past_the_split_are_verified_sequentially(
    copy: tuple[Path, Path], workers: Callable[[int], Spawned], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, ckpt = copy
    workers(3)
    # The table grows between the split and the sequential tail: the tail is verified too.
    real = verify_mod.run_range

    def growing(*args: Any) -> int:
        reached = real(*args)
        with AuditLog(db, TENANT, ROOT, checkpoint_path=ckpt) as log:
            log.append_sync("request", request_id="late")
        return reached

    monkeypatch.setattr(verify_mod, "run_range", growing)
    res = verify_db(db, KEY, checkpoint_path=ckpt)
    assert (res.ok, res.count) == (True, N + 1)


def _mutate(db: Path, kind: str, seq: int) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        if kind == "update":
            conn.execute("UPDATE audit SET agent = 'forged' WHERE seq = ?", (seq,))
        elif kind == "delete":
            conn.execute("DELETE FROM audit WHERE seq = ?", (seq,))
        elif kind == "swap":
            other = seq + 1 if seq < N else seq - 1
            conn.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (seq,))
            conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (seq, other))
            conn.execute("UPDATE audit SET seq = ? WHERE seq = -1", (other,))
        elif kind == "truncate":
            conn.execute("DELETE FROM audit WHERE seq >= ?", (seq,))
        elif kind == "blob":  # the fast rendering cannot take it: a worker's query fails
            conn.execute("UPDATE audit SET reason = X'00ff' WHERE seq = ?", (seq,))
        elif kind == "mac_case":  # the same mac in capitals: not the stored chain
            conn.execute("UPDATE audit SET mac = upper(mac) WHERE seq = ?", (seq,))
        elif kind == "odd_latency":  # a float the writer never stores: decided exactly
            conn.execute("UPDATE audit SET latency_ms = 1.0000001 WHERE seq = ?", (seq,))
        elif kind == "below_one":
            conn.execute("UPDATE audit SET seq = 0 WHERE seq = ?", (seq,))
        else:
            raise AssertionError(kind)
    finally:
        conn.close()


KINDS = ["update", "delete", "swap", "truncate", "blob", "mac_case", "odd_latency", "below_one"]


@pytest.mark.parametrize("seq", [pytest.param(s, id=f"seq{s}") for s in EDGES])
@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in KINDS])
def test_every_mutation_gets_the_sequential_verdict(
    copy: tuple[Path, Path], workers: Callable[[int], Spawned], kind: str, seq: int
) -> None:
    db, ckpt = copy
    _mutate(db, kind, seq)
    got = verdicts(db, ckpt, workers)
    assert not got[0].ok, got[0]
    assert got[1] == got[0]
    assert got[3] == got[0]


@pytest.mark.parametrize("seq", [pytest.param(s, id=f"seq{s}") for s in (10, 40, 70, 100, 120)])
def test_a_checkpoint_the_chain_does_not_match_is_named(
    copy: tuple[Path, Path], workers: Callable[[int], Spawned], seq: int
) -> None:
    db, ckpt = copy
    line = len(ckpt.read_text().splitlines()) + 1
    with ckpt.open("a") as f:
        f.write(f"{seq}:{'ab' * 32}\n")
    got = verdicts(db, ckpt, workers)
    assert not got[0].ok and got[0].first_bad_seq == seq, got[0]
    assert f"differs from checkpoint line {line}" in got[0].reason
    assert got[1] == got[0] and got[3] == got[0]


def test_a_checkpoint_past_the_end_is_truncation(
    copy: tuple[Path, Path], workers: Callable[[int], Spawned]
) -> None:
    db, ckpt = copy
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DELETE FROM audit WHERE seq > 115")
    conn.close()
    got = verdicts(db, ckpt, workers)
    assert (got[0].ok, got[0].first_bad_seq, got[0].count) == (False, 116, 115)
    assert got[1] == got[0] and got[3] == got[0]


def test_a_worker_that_fails_leaves_the_verdict_to_the_sequential_pass(
    copy: tuple[Path, Path], workers: Callable[[int], Spawned], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, ckpt = copy
    workers(3)
    monkeypatch.setattr(verify_mod, "_worker_result", lambda proc: proc.kill() or None)
    assert verify_db(db, KEY, checkpoint_path=ckpt).count == N  # clean: still OK
    _mutate(db, "update", 100)
    res = verify_db(db, KEY, checkpoint_path=ckpt)
    assert (res.ok, res.first_bad_seq) == (False, 100)


def _run_worker(job: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-I", "-S", verify_range.__file__],
        input=job,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_the_worker_reports_how_far_its_range_verified(pristine: tuple[Path, Path]) -> None:
    db, _ = pristine
    uri = f"{db.resolve().as_uri()}?mode=rw"
    conn = sqlite3.connect(db)
    before = conn.execute("SELECT mac FROM audit WHERE seq = 40").fetchone()[0]
    conn.close()

    def job(key: bytes, before_mac: str) -> int:
        res = _run_worker(
            marshal.dumps((uri, str(db), verify_mod.RANGE_SQL, key, 41, 81, before_mac))
        )
        assert res.returncode == 0, res.stderr
        reached, files = marshal.loads(res.stdout)
        st = db.stat()
        assert files[""] == (st.st_dev, st.st_ino)  # the file it read
        return int(reached)

    assert job(KEY, before) == 81
    assert job(tenant_key(ROOT, "other"), before) == 41  # another tenant's key: nothing
    assert job(KEY, "00" * 32) == 41  # not chained on the row before: nothing
    assert _run_worker(b"garbage").returncode != 0


def test_the_key_reaches_a_worker_only_on_its_stdin(
    pristine: tuple[Path, Path], workers: Callable[[int], Spawned], monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "AIIDCANARY" + os.urandom(8).hex()
    monkeypatch.setenv("AIID_AUDIT_KEY", canary)
    monkeypatch.setenv("AIID_MASTER_KEY", canary)
    seen: list[tuple[list[str], dict[str, str]]] = []
    real = subprocess.Popen

    def spy(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        seen.append((args, kw["env"]))
        return real(args, **kw)

    monkeypatch.setattr(verify_mod.subprocess, "Popen", spy)
    workers(2)
    assert verify_db(pristine[0], KEY, checkpoint_path=pristine[1]).ok
    assert len(seen) == 2
    for args, env in seen:
        assert args[1:3] == ["-I", "-S"]
        text = repr((args, env))
        assert canary not in text and KEY.hex() not in text and repr(KEY) not in text
        assert "AIID_AUDIT_KEY" not in env and "AIID_MASTER_KEY" not in env


# -- the check `aiid run` makes at start (audit/startcheck.py) ----------------------------------
def test_the_start_check_verifies_in_a_child_that_gets_the_key_on_stdin_only(
    copy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiid_proxy.audit import startcheck

    canary = "AIIDCANARY" + os.urandom(8).hex()
    monkeypatch.setenv("AIID_AUDIT_KEY", canary)
    seen: list[tuple[list[str], dict[str, str], str]] = []
    real = subprocess.run

    def spy(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen.append((args, kw["env"], kw["input"]))
        return real(args, **kw)

    monkeypatch.setattr(startcheck.subprocess, "run", spy)
    db, ckpt = copy
    assert startcheck.check_chain(db, KEY, ckpt) == {
        "ok": True, "count": N, "seq": None, "reason": f"OK {N} records"
    }  # fmt: skip
    _mutate(db, "update", 7)
    bad = startcheck.check_chain(db, KEY, ckpt)
    assert (bad["ok"], bad["seq"]) == (False, 7)
    for args, env, stdin in seen:
        assert KEY.hex() in stdin  # on stdin, and nowhere else
        text = repr((args, env))
        assert canary not in text and KEY.hex() not in text
        assert "AIID_AUDIT_KEY" not in env


def test_the_documented_recipe_recomputes_every_mac(tmp_path: Path) -> None:
    """docs/audit-integrity.md tells how to verify a log without aiid: its snippet, run as
    written (paths adapted), against a real log with non-ASCII, a detail and a float."""
    doc = (Path(__file__).parent.parent / "docs" / "audit-integrity.md").read_text()
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    home = tmp_path / ".aiid"
    (home / "runtime").mkdir(parents=True)
    (home / "tenants" / "demo").mkdir(parents=True)
    (home / "runtime" / "audit.key").write_bytes(base64.b64encode(ROOT) + b"\n")
    with AuditLog(home / "tenants" / "demo" / "audit.db", "demo", ROOT) as log:
        log.append_sync("request", request_id="req_1", agent="a", model="gpt-4o", reason="é ✓")
        log.append_sync("response", request_id="req_1", status=200, latency_ms=1.25)
        log.append_sync("policy", reason="loaded", detail={"files": ["demo.yaml"], "n": 1})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(snippet, "audit-integrity.md", "exec"), {})  # noqa: S102 - our own docs
        con = sqlite3.connect(home / "tenants" / "demo" / "audit.db")
        con.execute("UPDATE audit SET reason = 'e' WHERE seq = 1")
        con.commit()
        con.close()
        with pytest.raises(AssertionError, match="chain broken at seq 1"):
            exec(compile(snippet, "audit-integrity.md", "exec"), {})  # noqa: S102
    finally:
        os.chdir(cwd)


def test_the_documented_export_recipe_recomputes_every_mac(tmp_path: Path) -> None:
    """The second snippet: the same from `aiid audit export --format jsonl` (whose detail is
    an object), run after the first one's set-up lines (key and imports)."""
    from aiid_proxy.audit import export_jsonl

    doc = (Path(__file__).parent.parent / "docs" / "audit-integrity.md").read_text()
    first, rest = doc.split("```python\n", 2)[1:]
    setup = first.split("```", 1)[0].split("prev = bytes(32)", 1)[0]  # imports, root, key
    snippet = rest.split("```", 1)[0]
    home = tmp_path / ".aiid"
    (home / "runtime").mkdir(parents=True)
    (home / "tenants" / "demo").mkdir(parents=True)
    (home / "runtime" / "audit.key").write_bytes(base64.b64encode(ROOT) + b"\n")
    db = home / "tenants" / "demo" / "audit.db"
    with AuditLog(db, "demo", ROOT) as log:
        log.append_sync("request", request_id="req_1", agent="a", model="gpt-4o", reason="é ✓")
        log.append_sync("response", request_id="req_1", status=200, latency_ms=1.25)
        log.append_sync("policy", reason="loaded", detail={"z": ["é"], "a": {"n": 1.5}})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with open("export.jsonl", "w", encoding="utf-8") as out:
            assert export_jsonl(db, out) == 3
        exec(compile(setup + snippet, "audit-integrity.md", "exec"), {})  # noqa: S102
        text = (tmp_path / "export.jsonl").read_text(encoding="utf-8")
        (tmp_path / "export.jsonl").write_text(text.replace('"n":1.5', '"n":2.5'))
        with pytest.raises(AssertionError, match="chain broken at seq 3"):
            exec(compile(setup + snippet, "audit-integrity.md", "exec"), {})  # noqa: S102
    finally:
        os.chdir(cwd)
