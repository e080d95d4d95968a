"""The HMAC-chained audit log: chain rules, tamper detection, group commit, failure recovery."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aiid_proxy.audit import (
    COLUMNS,
    GENESIS_MAC,
    AppendResult,
    AuditLog,
    canonical_bytes,
    compute_mac,
    create_db,
    export_jsonl,
    format_row,
    parse_head,
    read_rows,
    tenant_key,
    verify_db,
    verify_rows,
)
from aiid_proxy.audit import durable as durable_mod
from aiid_proxy.audit import verify as verify_mod
from aiid_proxy.audit.record import format_ts
from aiid_proxy.clock import FakeClock
from aiid_proxy.errors import AuditError, InvalidName, UsageError

ROOT = bytes(range(32))
KEY = tenant_key(ROOT, "acme")
WAIT = 30  # seconds a test waits on an event before declaring a hang

RECORDS: list[tuple[str, dict[str, object]]] = [
    ("request", {"request_id": "r1", "agent": "support-7", "provider": "openai",
                 "model": "gpt-4o-mini", "rule": "small-models"}),
    ("response", {"request_id": "r1", "agent": "support-7", "provider": "openai",
                  "model": "gpt-4o-mini", "rule": "small-models", "status": 200,
                  "input_tokens": 12, "output_tokens": 34, "latency_ms": 123.456}),
    ("deny", {"request_id": "r2", "agent": "coder-1", "provider": "anthropic",
              "model": "claude-3-opus", "rule": "no-opus", "status": 403,
              "reason": "opus is not allowed", "detail": {"b": [1, 2], "a": "é\n"}}),
    ("policy", {"reason": "policy reloaded", "detail": {"file": "acme.yaml", "ok": True}}),
    ("request", {"request_id": "r3", "agent": "support-7", "provider": "openai",
                 "model": "gpt-4o", "rule": "small-models"}),
    ("error", {"request_id": "r3", "agent": "support-7", "status": 502,
               "reason": "upstream reset", "latency_ms": 0.1 + 0.2}),
    ("response", {"request_id": "r4", "agent": "support-8", "provider": "openai",
                  "model": "gpt-4o-mini", "status": 200, "input_tokens": 0,
                  "output_tokens": 5, "latency_ms": 7.0}),
    ("request", {"request_id": "r5", "agent": "support-8", "provider": "openai",
                 "model": "gpt-4o-mini"}),
]  # fmt: skip
N = len(RECORDS)


def make_log(path: Path, tenant: str = "acme", **kw: object) -> AuditLog:
    kw.setdefault("clock", FakeClock())
    return AuditLog(path, tenant, ROOT, **kw)  # type: ignore[arg-type]


def fill(path: Path, tenant: str = "acme", ckpt: Path | None = None) -> list[AppendResult]:
    clock = FakeClock()
    with make_log(path, tenant, clock=clock, checkpoint_path=ckpt) as log:
        out = []
        for event, fields in RECORDS:
            out.append(log.append_sync(event, **fields))
            clock.advance(0.25)
        return out


def sql(path: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for s in statements:
            conn.execute(s, params if "?" in s else ())
    finally:
        conn.close()


def row_of(path: Path, seq: int) -> tuple[object, ...]:
    conn = sqlite3.connect(path)
    try:
        row: tuple[object, ...] = conn.execute(
            "SELECT * FROM audit WHERE seq = ?", (seq,)
        ).fetchone()
        return row
    finally:
        conn.close()


@pytest.fixture(params=["fast", "exact"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """verify_db's fast SQLite-rendered path and its exact fallback must agree everywhere."""
    if request.param == "exact":
        monkeypatch.setattr(verify_mod, "_fast", lambda conn, state: False)
    return str(request.param)


# -- keys, canonical bytes, macs, heads ------------------------------------------------------
def test_tenant_key_is_hkdf_bound_to_tenant() -> None:
    want = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"aiid-audit-v1:acme").derive(ROOT)  # fmt: skip
    assert tenant_key(ROOT, "acme") == want
    assert tenant_key(ROOT, "acme2") != want
    with pytest.raises(ValueError, match="at least 16 bytes"):
        tenant_key(b"short", "acme")
    with pytest.raises(InvalidName):
        tenant_key(ROOT, "../acme")


def test_canonical_bytes_and_mac_follow_the_spec(tmp_path: Path) -> None:
    fill(tmp_path / "a.db")
    rows = read_rows(tmp_path / "a.db")
    prev = GENESIS_MAC
    for row in rows:
        spec = json.dumps([row[c] for c in COLUMNS[:-1]], separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False).encode()  # fmt: skip
        assert canonical_bytes(row) == spec
        want = hmac.new(KEY, bytes.fromhex(prev) + spec, hashlib.sha256).hexdigest()
        assert compute_mac(KEY, prev, row) == want == row["mac"]
        assert row["prev_mac"] == prev
        prev = str(row["mac"])


@pytest.mark.parametrize(
    ("text", "want"),
    [
        pytest.param("5:" + "ab" * 32, (5, "ab" * 32), id="plain"),
        pytest.param(" 7:" + "AB" * 32 + "\n", (7, "ab" * 32), id="upper-and-spaces"),
        pytest.param("0:" + GENESIS_MAC, (0, GENESIS_MAC), id="empty-chain"),
    ],
)
def test_parse_head_accepts(text: str, want: tuple[int, str]) -> None:
    assert parse_head(text) == want


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("5", id="no-mac"),
        pytest.param("5:" + "ab" * 31, id="short-mac"),
        pytest.param("5:" + "zz" * 32, id="not-hex"),
        pytest.param("-5:" + "ab" * 32, id="negative"),
        pytest.param("x:" + "ab" * 32, id="seq-not-int"),
        pytest.param("0:" + "ab" * 32, id="seq0-not-genesis"),
        pytest.param("99999999999999999999:" + "ab" * 32, id="seq-too-big"),
        pytest.param("5:" + "ab" * 32 + ":1", id="trailing"),
    ],
)
def test_parse_head_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_head(text)


# -- round trip -------------------------------------------------------------------------------
def test_round_trip(tmp_path: Path, mode: str) -> None:
    db, ckpt = tmp_path / "a.db", tmp_path / "ck"
    results = fill(db, ckpt=ckpt)
    assert [r.seq for r in results] == list(range(1, N + 1))
    res = verify_db(db, KEY, ckpt, expect_head=(N, results[-1].mac))
    assert (res.ok, res.count, res.head, res.first_bad_seq) == (True, N, (N, results[-1].mac), None)
    assert res.reason == f"OK {N} records"
    rows = read_rows(db)
    assert [r["mac"] for r in rows] == [r.mac for r in results]
    assert rows[0]["ts"] == "2027-01-15T08:00:00.000000Z"
    assert rows[1]["ts"] == "2027-01-15T08:00:00.250000Z"
    assert json.loads(str(rows[2]["detail"])) == {"a": "é\n", "b": [1, 2]}
    assert rows[2]["detail"] == '{"a":"é\\n","b":[1,2]}'  # compact, sorted keys
    assert rows[5]["latency_ms"] == 0.3  # kept to the microsecond
    assert verify_rows(rows, KEY).ok
    assert verify_db(tmp_path / "a.db", tenant_key(ROOT, "other")).first_bad_seq == 1


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    first = fill(db)
    with make_log(db) as log:
        assert log.head() == (N, first[-1].mac)
        again = log.append_sync("request", agent="x")
    assert again.seq == N + 1
    assert row_of(db, N + 1)[14] == first[-1].mac
    assert verify_db(db, KEY).count == N + 1


def test_export_jsonl_round_trips_through_verify_rows(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    fill(db)
    out = io.StringIO()
    assert export_jsonl(db, out) == N
    lines = out.getvalue().splitlines()
    assert len(lines) == N
    objs = [json.loads(line) for line in lines]
    assert list(objs[0]) == list(COLUMNS)
    assert objs[2]["detail"] == {"a": "é\n", "b": [1, 2]}  # parsed back to an object
    assert verify_rows(objs, KEY).ok
    objs[3]["detail"]["ok"] = False
    assert verify_rows(objs, KEY).first_bad_seq == 4


# -- tampering ----------------------------------------------------------------------------------
def _swap(db: Path, a: int, b: int) -> None:
    ra, rb = row_of(db, a), row_of(db, b)
    sets = ", ".join(f"{c} = ?" for c in COLUMNS[1:])
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"UPDATE audit SET {sets} WHERE seq = ?", (*rb[1:], a))
    conn.execute(f"UPDATE audit SET {sets} WHERE seq = ?", (*ra[1:], b))
    conn.close()


def _rebuild(db: Path, order: list[int]) -> None:
    """Recreate the table without the primary key, rows inserted in ``order`` (by seq)."""
    cols = ", ".join(COLUMNS)
    stmts = [f"CREATE TABLE audit2 AS SELECT {cols} FROM audit WHERE 0"]
    stmts += [f"INSERT INTO audit2 SELECT {cols} FROM audit WHERE seq = {s}" for s in order]
    stmts += ["DROP TABLE audit", "ALTER TABLE audit2 RENAME TO audit"]
    sql(db, *stmts)


def _splice_other_tenant(db: Path, seqs: list[int]) -> None:
    other = db.with_name("other.db")
    fill(other, tenant="other")
    sets = ", ".join(f"{c} = ?" for c in COLUMNS[1:])
    conn = sqlite3.connect(db, isolation_level=None)
    for s in seqs:
        conn.execute(f"UPDATE audit SET {sets} WHERE seq = ?", (*row_of(other, s)[1:], s))
    conn.close()


def _replace_with_other_tenant(db: Path) -> None:
    db.unlink()
    fill(db, tenant="other")


def _forge_append(db: Path) -> None:
    """Append a record chained correctly but MACed with a guessed key."""
    last = read_rows(db)[-1]
    row: dict[str, object] = dict.fromkeys(COLUMNS)
    row.update(seq=N + 1, ts=last["ts"], event="response", agent="support-7",
               status=200, prev_mac=last["mac"])  # fmt: skip
    row["mac"] = compute_mac(tenant_key(b"\x01" * 32, "acme"), str(last["mac"]), row)
    sql(db, f"INSERT INTO audit VALUES ({', '.join('?' * len(COLUMNS))})",
        params=tuple(row[c] for c in COLUMNS))  # fmt: skip


def _one_ulp(db: Path) -> None:
    lat = float(str(row_of(db, 2)[11]))
    import math

    sql(db, "UPDATE audit SET latency_ms = ? WHERE seq = 2", params=(math.nextafter(lat, 1e9),))


def _renumber_after_delete(db: Path) -> None:
    sql(db, "DELETE FROM audit WHERE seq = 4")
    for s in range(5, N + 1):
        sql(db, f"UPDATE audit SET seq = {s - 1} WHERE seq = {s}")


TAMPER: list[object] = [
    pytest.param("UPDATE audit SET ts = '2027-01-15T08:00:00.000001Z' WHERE seq = 3", 3, id="ts"),
    pytest.param("UPDATE audit SET request_id = 'rX' WHERE seq = 2", 2, id="request_id"),
    pytest.param("UPDATE audit SET agent = 'support-9' WHERE seq = 5", 5, id="agent"),
    pytest.param("UPDATE audit SET event = 'response' WHERE seq = 1", 1, id="event"),
    pytest.param(
        "UPDATE audit SET provider = 'azure' WHERE seq = 6", 6, id="provider-null-to-text"
    ),
    pytest.param("UPDATE audit SET model = 'gpt-4o' WHERE seq = 8", 8, id="model-last-row"),
    pytest.param("UPDATE audit SET rule = NULL WHERE seq = 1", 1, id="rule-to-null"),
    pytest.param("UPDATE audit SET status = 201 WHERE seq = 2", 2, id="status-int"),
    pytest.param("UPDATE audit SET status = 'ok' WHERE seq = 2", 2, id="status-to-text"),
    pytest.param("UPDATE audit SET status = 200.5 WHERE seq = 2", 2, id="status-to-real"),
    pytest.param("UPDATE audit SET input_tokens = 1 WHERE seq = 7", 7, id="tokens-zero-to-one"),
    pytest.param("UPDATE audit SET output_tokens = NULL WHERE seq = 2", 2, id="tokens-to-null"),
    pytest.param("UPDATE audit SET latency_ms = 123.457 WHERE seq = 2", 2, id="latency"),
    pytest.param(_one_ulp, 2, id="latency-one-ulp"),
    pytest.param("UPDATE audit SET latency_ms = 'fast' WHERE seq = 2", 2, id="latency-to-text"),
    pytest.param("UPDATE audit SET latency_ms = 9e999 WHERE seq = 7", 7, id="latency-infinite"),
    pytest.param("UPDATE audit SET reason = 'allowed' WHERE seq = 3", 3, id="reason"),
    pytest.param(
        """UPDATE audit SET detail = '{"b":[1,2],"a":"é\\n"}' WHERE seq = 3""",
        3,
        id="detail-key-order",
    ),  # fmt: skip
    pytest.param("UPDATE audit SET reason = x'00' WHERE seq = 4", 4, id="blob"),
    pytest.param("UPDATE audit SET ts = x'' WHERE seq = 1", 1, id="blob-first-row"),
    pytest.param("UPDATE audit SET agent = CAST(x'ff' AS TEXT) WHERE seq = 5", 5, id="bad-utf8"),
    pytest.param("UPDATE audit SET prev_mac = mac WHERE seq = 3", 3, id="prev_mac"),
    pytest.param("UPDATE audit SET mac = upper(mac) WHERE seq = 6", 6, id="mac"),
    pytest.param("UPDATE audit SET seq = 20 WHERE seq = 8", 8, id="seq-moved"),
    pytest.param("DELETE FROM audit WHERE seq = 4", 4, id="delete-middle"),
    pytest.param("DELETE FROM audit WHERE seq = 1", 1, id="delete-first"),
    pytest.param(_renumber_after_delete, 4, id="delete-and-renumber"),
    pytest.param(_forge_append, N + 1, id="insert-forged"),
    pytest.param(lambda db: _swap(db, 3, 6), 3, id="swap-contents"),
    pytest.param(
        lambda db: sql(
            db,
            f"INSERT INTO audit SELECT {N + 1}, "
            + ", ".join(COLUMNS[1:])
            + " FROM audit WHERE seq = 3",
        ),
        N + 1,
        id="replay-row",
    ),  # fmt: skip
    pytest.param(lambda db: _rebuild(db, [1, 2, 3, 4, 4, 5, 6, 7, 8]), 4, id="duplicate-seq"),
    pytest.param(lambda db: _rebuild(db, [1, 2, 3, 4, 5, 6, 7, 8, 2]), 2, id="duplicate-at-end"),
    pytest.param(lambda db: _rebuild(db, [1, 2, 3, 5, 4, 6, 7, 8]), 4, id="reordered"),
    pytest.param(lambda db: _splice_other_tenant(db, [4, 5]), 4, id="other-tenant-rows"),
    pytest.param(_replace_with_other_tenant, 1, id="other-tenant-db"),
]


@pytest.mark.parametrize(("tamper", "first_bad"), TAMPER)
def test_tampering_is_detected(tmp_path: Path, mode: str, tamper: object, first_bad: int) -> None:
    db = tmp_path / "a.db"
    fill(db)
    assert verify_db(db, KEY).ok
    if isinstance(tamper, str):
        sql(db, tamper)
    else:
        assert callable(tamper)
        tamper(db)
    res = verify_db(db, KEY)
    assert not res.ok
    assert res.first_bad_seq == first_bad, res.reason
    assert str(first_bad) in res.reason and "\n" not in res.reason
    assert res.head is None or res.head[0] == res.count
    if "duplicate" not in res.reason and "out of order" not in res.reason:
        assert res.count == min(first_bad - 1, N)  # everything before it verified


def test_fast_path_accepts_authentic_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's JSON of authentic records is byte-identical to the canonical bytes, so the
    fast path never falls back to fetching a record again (which is correct but slow)."""
    db = tmp_path / "a.db"
    fill(db)
    odd = '\x00\x01\x1f\x7f\u2028\u2029"\\/é😀\ufeff'
    with make_log(db) as log:
        log.append_sync(
            "request", agent=odd, reason=odd, detail={odd: [odd, 1.5, None]},
            latency_ms=987654321.123, status=-(2**63), input_tokens=2**63 - 1,
        )  # fmt: skip

    def refetch(*args: object) -> None:
        raise AssertionError("fast path fell back")

    monkeypatch.setattr(verify_mod, "_fetch_row", refetch)
    assert verify_db(db, KEY).count == N + 1


def test_truncation(tmp_path: Path, mode: str) -> None:
    db, ckpt = tmp_path / "a.db", tmp_path / "ck"
    results = fill(db, ckpt=ckpt)
    sql(db, "DELETE FROM audit WHERE seq >= 7")
    # Without a checkpoint or an expected head a cut tail is undetectable by design: what
    # remains is a valid chain. Checkpoints and --expect-head exist for exactly this.
    plain = verify_db(db, KEY)
    assert (plain.ok, plain.count) == (True, 6)
    with_head = verify_db(db, KEY, expect_head=(N, results[-1].mac))
    assert (with_head.ok, with_head.first_bad_seq) == (False, 7)
    assert "truncated" in with_head.reason
    with_ckpt = verify_db(db, KEY, checkpoint_path=ckpt)
    assert (with_ckpt.ok, with_ckpt.first_bad_seq) == (False, 7)
    assert "checkpoint line" in with_ckpt.reason


def test_expect_head_mac_mismatch(tmp_path: Path, mode: str) -> None:
    db = tmp_path / "a.db"
    fill(db)
    res = verify_db(db, KEY, expect_head=(5, "ab" * 32))
    assert (res.ok, res.first_bad_seq) == (False, 5)
    assert "differs from the expected head" in res.reason


@pytest.mark.parametrize(
    ("content", "ok", "first_bad", "why"),
    [
        pytest.param("{3}\n{8}\n", True, None, "OK", id="good"),
        pytest.param("{8}\n{3}\n", True, None, "OK", id="out-of-order-lines"),
        pytest.param("{3}\n{8}\n8:abc", True, None, "OK", id="cut-last-line-ignored"),
        pytest.param("{3}\n{8}", True, None, "OK", id="last-line-without-newline"),
        pytest.param("{3}\n5:" + "ab" * 32 + "\n", False, 5, "checkpoint line 2", id="mac-differs"),
        pytest.param("{3}\n12:" + "ab" * 32 + "\n", False, N + 1, "truncated", id="beyond-head"),
        pytest.param("{3}\nnonsense\n{8}\n", False, None, "line 2 is malformed", id="malformed"),
        pytest.param("\n", False, None, "line 1 is malformed", id="blank-line"),
        pytest.param(" {3}\n", False, None, "line 1 is malformed", id="leading-space"),
    ],
)
def test_checkpoint_file(
    tmp_path: Path, content: str, ok: bool, first_bad: int | None, why: str
) -> None:
    db, ckpt = tmp_path / "a.db", tmp_path / "ck"
    results = fill(db)
    heads = {s: f"{s}:{results[s - 1].mac}" for s in (3, 8)}
    ckpt.write_text(content.format(*[heads.get(i, "") for i in range(9)]))
    res = verify_db(db, KEY, checkpoint_path=ckpt)
    assert (res.ok, res.first_bad_seq) == (ok, first_bad), res.reason
    assert why in res.reason


@pytest.mark.parametrize(
    "threaded", [pytest.param(True, id="thread"), pytest.param(False, id="drain")]
)
def test_the_writer_checkpoints_the_wal_itself(tmp_path: Path, threaded: bool) -> None:
    # SQLite's automatic WAL checkpoint would run inside a COMMIT, on a request's way out: the
    # writer turns it off and runs one after answering, every WAL_CHECKPOINT_RECORDS records.
    from aiid_proxy.audit.log import WAL_CHECKPOINT_RECORDS

    log = make_log(tmp_path / "a.db", threaded=threaded)
    wal = tmp_path / "a.db-wal"
    sizes = []
    for i in range(4 * WAL_CHECKPOINT_RECORDS):
        fut = log.append("request", request_id=f"r{i}", detail={"pad": "x" * 400})
        if not threaded:
            log.drain()
        fut.result(10)
        sizes.append(wal.stat().st_size)
    conn = sqlite3.connect(tmp_path / "a.db")
    try:
        assert (
            conn.execute("SELECT count(*) FROM audit").fetchone()[0] == 4 * WAL_CHECKPOINT_RECORDS
        )
    finally:
        conn.close()
    if not threaded:  # SQLite's own, inside COMMIT, is off on the writer's connection
        assert log._conn is not None
        assert log._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    log.close()
    # Checkpointed and restarted from its start: it stops growing after the first round.
    one_round = sizes[WAL_CHECKPOINT_RECORDS + 10]
    assert max(sizes) <= one_round * 1.5, (one_round, max(sizes))
    assert verify_db(tmp_path / "a.db", KEY).ok


def test_checkpoints_written_by_the_log(tmp_path: Path) -> None:
    clock = FakeClock()
    ckpt = tmp_path / "ck"
    log = make_log(tmp_path / "a.db", clock=clock, checkpoint_path=ckpt)
    log.checkpoint()  # empty log: nothing to record
    assert not ckpt.exists()

    # The writer checkpoints after answering (no request waits for it): a line shows up once
    # its thread gets there, and it is there before the writer commits the next batch.
    def lines(want: int) -> list[str]:
        for _ in range(2000):  # bounded
            got = ckpt.read_text().splitlines() if ckpt.exists() else []
            if len(got) >= want:
                return got
            threading.Event().wait(0.005)
        raise AssertionError(f"checkpoint line {want} never written")

    r1 = log.append_sync("request")
    assert lines(1) == [f"1:{r1.mac}"]  # the first commit checkpoints at once
    log.append_sync("request")  # less than 0.5 s later: not yet...
    clock.advance(0.5)
    r3 = log.append_sync("request")  # ... (its batch came after the second one's) but now
    assert lines(2) == [f"1:{r1.mac}", f"3:{r3.mac}"]
    r4 = log.append_sync("request")
    log.checkpoint()
    log.checkpoint()  # unchanged head: no duplicate line
    assert ckpt.read_text().splitlines()[-1] == f"4:{r4.mac}"
    r5 = log.append_sync("request")
    log.close()  # closing records the final head
    assert ckpt.read_text().splitlines() == [f"1:{r1.mac}", f"3:{r3.mac}", f"4:{r4.mac}",
                                             f"5:{r5.mac}"]  # fmt: skip
    assert verify_db(tmp_path / "a.db", KEY, ckpt).ok


# -- property: any single mutation is caught at or before the mutated record ------------------
TEXT = st.text(max_size=12)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "request_id": TEXT, "agent": TEXT, "provider": TEXT, "model": TEXT, "rule": TEXT,
        "reason": TEXT, "status": st.integers(-(2**63), 2**63 - 1),
        "input_tokens": st.integers(0, 10**9), "output_tokens": st.none() | st.integers(0, 99),
        "latency_ms": st.floats(-1e12, 1e12, allow_nan=False),
        "detail": st.dictionaries(TEXT, st.none() | st.booleans() | st.integers() | TEXT,
                                  max_size=3),
    },
)  # fmt: skip
VALUES = (st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
          | st.floats(allow_nan=False) | st.binary(max_size=3))  # fmt: skip
MUTATION = st.one_of(
    st.tuples(st.just("set"), st.integers(1, 12), st.sampled_from(COLUMNS), VALUES),
    st.tuples(st.just("delete"), st.integers(1, 12)),
    st.tuples(st.just("replay"), st.integers(1, 12)),
    st.tuples(st.just("swap"), st.integers(1, 12), st.integers(1, 12)),
)


def _snapshot(db: Path) -> list[tuple[object, ...]]:
    """The table exactly as stored: every value quoted, so types count (1 vs 1.0 vs '1')."""
    conn = sqlite3.connect(db)
    try:
        q = ", ".join(f"quote({c})" for c in COLUMNS)
        return conn.execute(f"SELECT {q} FROM audit ORDER BY rowid").fetchall()
    finally:
        conn.close()


def _mutate(db: Path, mutation: tuple[object, ...], n: int) -> int:
    """Apply one mutation; return the seq it touched first (or reject the example)."""
    kind, s = mutation[0], (int(str(mutation[1])) - 1) % n + 1
    if kind == "set":
        col, value = str(mutation[2]), mutation[3]
        before = _snapshot(db)
        try:
            sql(db, f"UPDATE audit SET {col} = ? WHERE seq = ?", params=(value, s))
        except sqlite3.Error:  # a seq that exists already, or is not an integer
            assume(False)
        assume(_snapshot(db) != before)
        return s
    if kind == "delete":
        sql(db, "DELETE FROM audit WHERE seq = ?", params=(s,))
        return s
    if kind == "replay":
        cols = ", ".join(COLUMNS[1:])
        sql(db, f"INSERT INTO audit SELECT {n + 1}, {cols} FROM audit WHERE seq = {s}")
        return n + 1
    t = (int(str(mutation[2])) - 1) % n + 1
    assume(t != s)
    _swap(db, s, t)
    return min(s, t)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(appends=st.lists(st.tuples(st.sampled_from(["request", "response", "deny"]), FIELDS),
                        min_size=1, max_size=8),
       mutation=st.none() | MUTATION)  # fmt: skip
def test_any_single_mutation_is_detected(
    appends: list[tuple[str, dict[str, object]]], mutation: tuple[object, ...] | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "a.db"
        with make_log(db) as log:
            for event, fields in appends:
                log.append_sync(event, **fields)
            head = log.head()
        n = len(appends)
        if mutation is None:
            res = verify_db(db, KEY, expect_head=head)
            assert (res.ok, res.count, res.head) == (True, n, head)
            assert verify_rows(read_rows(db), KEY, head).ok
            return
        touched = _mutate(db, mutation, n)
        res = verify_db(db, KEY, expect_head=head)
        assert not res.ok
        assert res.first_bad_seq is not None and res.first_bad_seq <= touched, res.reason


# -- verify_rows on its own ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("order", "first_bad", "why"),
    [
        pytest.param([1, 2, 3, 3, 4], 3, "duplicate seq 3", id="duplicate"),
        pytest.param([2, 3], 1, "does not start at seq 1", id="starts-late"),
        pytest.param([1, 2, 4], 3, "missing seq 3", id="gap"),
        pytest.param([1, 2, 3, 4, 2], 2, "out of order", id="moved-back"),
    ],
)
def test_verify_rows_seq_rules(tmp_path: Path, order: list[int], first_bad: int, why: str) -> None:
    fill(tmp_path / "a.db")
    rows = {int(str(r["seq"])): r for r in read_rows(tmp_path / "a.db")}
    res = verify_rows([rows[s] for s in order], KEY)
    assert (res.ok, res.first_bad_seq) == (False, first_bad)
    assert why in res.reason


def test_verify_rows_row_lacking_a_column(tmp_path: Path) -> None:
    fill(tmp_path / "a.db")
    rows = read_rows(tmp_path / "a.db")
    del rows[2]["model"]
    res = verify_rows(rows, KEY)
    assert (res.ok, res.first_bad_seq, res.count) == (False, 3, 2)
    assert "lacks column" in res.reason


# -- group commit, failures, recovery -----------------------------------------------------------
def test_group_commit_16_threads(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = make_log(db, checkpoint_path=tmp_path / "ck")
    barrier = threading.Barrier(16)
    seqs: list[list[int]] = [[] for _ in range(16)]

    def worker(t: int) -> None:
        barrier.wait()
        futures = [log.append("request", agent=f"a{t}", input_tokens=i) for i in range(200)]
        seqs[t] = [f.result().seq for f in futures]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    flat = [s for lst in seqs for s in lst]
    assert sorted(flat) == list(range(1, 3201))
    assert all(lst == sorted(lst) for lst in seqs)  # each thread's records stay in its order
    assert log.committed_batches < 3200  # records shared transactions
    res = verify_db(db, KEY, checkpoint_path=tmp_path / "ck")
    assert (res.ok, res.count) == (True, 3200)


def test_verify_while_appending(tmp_path: Path) -> None:
    """Checkpoint lines are read before the database snapshot, so a verification racing the
    writer never mistakes a record committed after its snapshot for a truncation."""
    db, ckpt = tmp_path / "a.db", tmp_path / "ck"
    log = make_log(db, checkpoint_path=ckpt)
    log.append_sync("request")
    stop = threading.Event()
    first_batch = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            for f in [log.append("request", input_tokens=i) for i in range(20)]:
                f.result()
            log.checkpoint()
            first_batch.set()

    th = threading.Thread(target=writer)
    th.start()
    try:
        results = []
        for i in range(20):
            if i == 10:  # the later verifications must see the writer's records
                assert first_batch.wait(30)
            results.append(verify_db(db, KEY, checkpoint_path=ckpt))
    finally:
        stop.set()
        th.join()
        log.close()
    assert all(r.ok for r in results), [r.reason for r in results if not r.ok]
    assert results[-1].count > 1


class Hooks:
    def __init__(self) -> None:
        self.block_begin = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.commit_fails: list[bool] = []


class FaultyConnection(sqlite3.Connection):
    hooks: Hooks

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        h = self.hooks
        if sql == "BEGIN IMMEDIATE" and h.block_begin:
            h.block_begin = False
            h.entered.set()
            assert h.release.wait(WAIT)
        if sql == "COMMIT" and h.commit_fails and h.commit_fails.pop(0):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, parameters)


def faulty(hooks: Hooks) -> Callable[[Path], sqlite3.Connection]:
    def connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, factory=FaultyConnection, check_same_thread=False)
        assert isinstance(conn, FaultyConnection)
        conn.hooks = hooks
        return conn

    return connect


def test_pending_appends_share_one_transaction(tmp_path: Path) -> None:
    hooks = Hooks()
    log = make_log(tmp_path / "a.db", _connect=faulty(hooks))
    hooks.block_begin = True
    first = log.append("request")
    assert hooks.entered.wait(WAIT)  # the writer holds [first] and is blocked
    rest = [log.append("request", input_tokens=i) for i in range(50)]
    hooks.release.set()
    assert first.result().seq == 1
    assert [f.result().seq for f in rest] == list(range(2, 52))
    # Appends queued while the writer was taking the write lock joined its transaction.
    assert log.committed_batches == 1
    log.close()


def test_commit_failure_fails_exactly_that_batch(tmp_path: Path) -> None:
    hooks = Hooks()
    db = tmp_path / "a.db"
    log = make_log(db, _connect=faulty(hooks))
    good = log.append_sync("request")
    hooks.block_begin = True
    hooks.commit_fails = [True]  # the next transaction's COMMIT fails (disk full)
    first = log.append("request")
    assert hooks.entered.wait(WAIT)
    batch = [first] + [log.append("request", input_tokens=i) for i in range(5)]
    hooks.release.set()
    for f in batch:
        with pytest.raises(AuditError, match="audit write failed: OperationalError: database or "):
            f.result()
    assert log.head() == (1, good.mac)  # still the last committed record
    after = log.append_sync("request", agent="next")
    assert after.seq == 2  # no gap, chained on the last committed record
    assert row_of(db, 2)[14] == good.mac
    later = [log.append("response", input_tokens=i) for i in range(3)]
    assert [f.result().seq for f in later] == [3, 4, 5]
    log.close()
    res = verify_db(db, KEY)
    assert (res.ok, res.count) == (True, 5)
    assert [r["input_tokens"] for r in read_rows(db)] == [None, None, 0, 1, 2]


def test_disk_full_then_space_again(tmp_path: Path) -> None:
    conns: list[sqlite3.Connection] = []

    def connect(path: Path) -> sqlite3.Connection:
        conns.append(sqlite3.connect(path, check_same_thread=False))
        return conns[-1]

    db = tmp_path / "a.db"
    log = make_log(db, _connect=connect)
    for _ in range(3):
        log.append_sync("request")
    conn = conns[0]  # the writer is idle between batches: safe to set a pragma on it
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # a real SQLITE_FULL on growth
    big = {"blob": "x" * 50_000}
    with pytest.raises(AuditError, match="database or disk is full"):
        log.append_sync("request", detail=big)
    assert log.head()[0] == 3
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert log.append_sync("request", detail=big).seq == 4
    log.close()
    assert verify_db(db, KEY).count == 4


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        pytest.param(
            "UPDATE audit SET reason = 'x' WHERE seq = 8",
            "head is invalid at seq 8",
            id="last-row-modified",
        ),  # fmt: skip
        pytest.param(
            "DELETE FROM audit WHERE seq = 7",
            "head is invalid at seq 8",
            id="row-before-head-deleted",
        ),  # fmt: skip
        pytest.param(
            "UPDATE audit SET mac = 'zz' WHERE seq = 7",
            "head is invalid at seq 8",
            id="prev-mac-malformed",
        ),  # fmt: skip
        pytest.param("ALTER TABLE audit ADD COLUMN extra TEXT", "unexpected schema", id="schema"),
    ],
)
def test_open_refuses_a_tampered_head(tmp_path: Path, tamper: str, why: str) -> None:
    db = tmp_path / "a.db"
    fill(db)
    sql(db, tamper)
    with pytest.raises(AuditError, match=why):
        make_log(db)


def test_open_refuses_the_wrong_key(tmp_path: Path) -> None:
    fill(tmp_path / "a.db")
    with pytest.raises(AuditError, match="head is invalid") as exc:
        AuditLog(tmp_path / "a.db", "acme", b"\x07" * 32)
    text = str(exc.value)
    assert ROOT.hex() not in text and KEY.hex() not in text


def test_close_drains_and_is_idempotent(tmp_path: Path) -> None:
    log = make_log(tmp_path / "a.db")
    futures = [log.append("request", input_tokens=i) for i in range(300)]
    log.close()
    assert [f.result().seq for f in futures] == list(range(1, 301))
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append("request")


def test_append_sync_from_the_writer_thread_refuses(tmp_path: Path) -> None:
    log = make_log(tmp_path / "a.db")
    seen: list[BaseException] = []
    done = threading.Event()

    def callback(_: object) -> None:
        try:
            log.append_sync("request")
        except AuditError as e:
            seen.append(e)
        done.set()

    log.append("request").add_done_callback(callback)
    assert done.wait(WAIT)
    log.close()
    assert len(seen) == 1 and "writer thread" in str(seen[0])


def test_cancelled_append_is_not_written(tmp_path: Path) -> None:
    hooks = Hooks()
    log = make_log(tmp_path / "a.db", _connect=faulty(hooks))
    hooks.block_begin = True
    first = log.append("request")
    assert hooks.entered.wait(WAIT)
    cancelled = log.append("deny")
    kept = log.append("response")
    assert cancelled.cancel()
    hooks.release.set()
    assert (first.result().seq, kept.result().seq) == (1, 2)
    log.close()
    assert [r["event"] for r in read_rows(tmp_path / "a.db")] == ["request", "response"]


# -- append validation, secrets ---------------------------------------------------------------
SECRET = "sk-live-DO-NOT-LEAK-123"


@pytest.mark.parametrize(
    ("event", "fields", "match"),
    [
        pytest.param("request", {"api_key": SECRET}, "unknown audit field 'api_key'", id="unknown"),
        pytest.param("request", {"seq": 5}, "unknown audit field 'seq'", id="seq"),
        pytest.param("request", {"mac": "00"}, "unknown audit field 'mac'", id="mac"),
        pytest.param("", {}, "must not be empty", id="empty-event"),
        pytest.param("request", {"agent": 5}, "agent must be a string", id="agent-int"),
        pytest.param("request", {"status": "200"}, "status must be an integer", id="status-str"),
        pytest.param("request", {"status": True}, "status must be an integer", id="status-bool"),
        pytest.param("request", {"status": 2**63}, "out of range", id="status-range"),
        pytest.param("request", {"latency_ms": float("nan")}, "out of range", id="latency-nan"),
        pytest.param("request", {"latency_ms": SECRET}, "must be a number", id="latency-str"),
        pytest.param("request", {"detail": [1]}, "JSON object", id="detail-list"),
        pytest.param("request", {"detail": "[1]"}, "JSON object", id="detail-json-list"),
        pytest.param("request", {"detail": {"k": b"x"}}, "JSON-serialisable", id="detail-bytes"),
        pytest.param("request", {"reason": "\ud800" + SECRET}, "not valid UTF-8", id="surrogate"),
    ],
)
def test_append_refuses_bad_fields(
    tmp_path: Path, event: str, fields: dict[str, object], match: str
) -> None:
    with make_log(tmp_path / "a.db") as log:
        with pytest.raises(ValueError, match=match) as exc:
            log.append(event, **fields)
        assert SECRET not in str(exc.value)
        # in the hierarchy callers catch (a refusal's record failing must not go unhandled)
        assert isinstance(exc.value, AuditError)
        assert log.append_sync("ok").seq == 1  # nothing was queued


def test_repr_holds_no_key(tmp_path: Path) -> None:
    with make_log(tmp_path / "a.db") as log:
        text = repr(log)
    assert "acme" in text and ROOT.hex() not in text and KEY.hex() not in text
    assert repr(ROOT)[2:-1] not in text


@pytest.mark.parametrize(
    ("now", "want"),
    [
        pytest.param(1_800_000_000.0, "2027-01-15T08:00:00.000000Z", id="whole"),
        pytest.param(1_764_106_507.123456, "2025-11-25T21:35:07.123456Z", id="micros"),
        pytest.param(1_800_000_000.9999996, "2027-01-15T08:00:01.000000Z", id="rounds-up"),
        pytest.param(0.0, "1970-01-01T00:00:00.000000Z", id="epoch"),
    ],
)
def test_format_ts(now: float, want: str) -> None:
    assert format_ts(now) == want


# -- readers ------------------------------------------------------------------------------------
def test_read_rows_windows(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    fill(db)

    def seqs(**kw: int) -> list[object]:
        return [r["seq"] for r in read_rows(db, **kw)]

    assert seqs() == list(range(1, N + 1))
    assert seqs(after_seq=5) == [6, 7, 8]
    assert seqs(limit=2) == [1, 2]
    assert seqs(after_seq=2, limit=2) == [3, 4]
    assert seqs(last=3) == [6, 7, 8]
    assert seqs(after_seq=7, last=3) == [8]
    with pytest.raises(ValueError):
        read_rows(db, limit=1, last=1)


def test_format_row(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    fill(db)
    rows = read_rows(db)
    line = format_row(rows[1])
    assert line == ("2027-01-15T08:00:00.250000Z #2 response agent=support-7 "
                    "openai/gpt-4o-mini rule=small-models status=200 tokens=12/34 "
                    "latency=123.456ms req=r1")  # fmt: skip
    evil = dict(rows[0], model="gpt\x1b[31m\nX", reason="a\r\nb")
    out = format_row(evil)
    assert "\n" not in out and "\x1b" not in out and "\r" not in out
    assert "\\x1b" in out and 'reason="a\\r\\nb"' in out
    quoted = format_row(dict(rows[0], reason='say "hi" \\o/'))
    assert quoted.endswith('reason="say \\"hi\\" \\\\o/"')


def test_missing_database_or_table(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="not found"):
        verify_db(tmp_path / "nope.db", KEY)
    assert not (tmp_path / "nope.db").exists()
    sql(tmp_path / "empty.db", "CREATE TABLE other (x)")
    with pytest.raises(AuditError, match="no audit table"):
        verify_db(tmp_path / "empty.db", KEY)
    with pytest.raises(AuditError, match="no audit table"):
        read_rows(tmp_path / "empty.db")


def test_create_db_then_open(tmp_path: Path) -> None:
    db = tmp_path / "t" / "audit.db"
    create_db(db)
    res = verify_db(db, KEY)
    assert (res.ok, res.count, res.head) == (True, 0, None)
    with make_log(db) as log:
        assert log.head() == (0, GENESIS_MAC)
        assert log.append_sync("request").seq == 1


def _traced(statements: list[str]) -> Callable[[Path], sqlite3.Connection]:
    def connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.set_trace_callback(statements.append)
        return conn

    return connect


@pytest.mark.parametrize(
    ("events", "modes", "unsynced"),
    [
        pytest.param(["request"], [], False, id="request-stays-full"),
        pytest.param(["response"], ["NORMAL"], True, id="response-alone-is-lazy"),
        pytest.param(["response", "request"], ["NORMAL", "FULL"], False, id="next-fsync-covers"),
        pytest.param(["response", "response"], ["NORMAL"], True, id="no-switch-per-batch"),
        pytest.param(["deny", "error", "policy"], [], False, id="others-stay-full"),
    ],
)
def test_response_records_commit_without_their_own_fsync(
    tmp_path: Path, events: list[str], modes: list[str], unsynced: bool
) -> None:
    statements: list[str] = []
    log = make_log(tmp_path / "a.db", _connect=_traced(statements))
    statements.clear()
    for event in events:
        log.append_sync(event)
    switches = [s.split("=")[1].strip() for s in statements if "synchronous" in s]
    assert switches == modes
    assert log.unsynced is unsynced
    log.close()
    assert verify_db(tmp_path / "a.db", KEY).count == len(events)


def test_lazy_records_are_fsynced_before_a_checkpoint_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync
    wal = str(tmp_path / "a.db-wal")

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == wal:
            synced.append("wal")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = make_log(tmp_path / "a.db", checkpoint_path=tmp_path / "ckpt")
    log.append_sync("request")  # FULL: SQLite syncs it (not through os.fsync)
    assert synced == []
    log.append_sync("response")
    assert log.unsynced
    log.checkpoint()
    assert synced == ["wal"] and not log.unsynced
    assert (tmp_path / "ckpt").read_text().splitlines()[-1].startswith("2:")
    log.close()


def test_a_quiet_writer_fsyncs_lazy_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable_mod, "LAZY_SYNC", 0.01)
    log = make_log(tmp_path / "a.db")
    log.append_sync("response")
    for _ in range(WAIT * 100):  # bounded wait for the writer's quiet period
        if not log.unsynced:
            break
        threading.Event().wait(0.01)
    assert not log.unsynced
    log.close()


def test_lazy_records_do_not_wait_for_quiet_forever(tmp_path: Path) -> None:
    clock = FakeClock()
    log = make_log(tmp_path / "a.db", clock=clock)
    log.append_sync("response")
    assert log.unsynced and not log.overdue()
    clock.advance(durable_mod.LAZY_SYNC)
    assert log.overdue()
    log.append_sync("response")  # still busy, never quiet: synced anyway once overdue
    for _ in range(WAIT * 100):
        if not log.unsynced:
            break
        threading.Event().wait(0.01)
    assert not log.unsynced
    log.close()


def test_the_audit_database_is_private_like_the_vault(tmp_path: Path) -> None:
    path = tmp_path / "t" / "audit.db"
    with make_log(path) as log:
        log.append_sync("request")
        modes = {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir() if p.is_file()}
    assert modes == {"audit.db": 0o600, "audit.db-wal": 0o600, "audit.db-shm": 0o600}, modes


# -- pass [AD]: the head is anchored after a quiet spell; a chain cut under the writer -----------
def test_the_last_records_before_a_quiet_spell_are_checkpointed(tmp_path: Path) -> None:
    """A burst's last records were only checkpointed by the next commit (55 s later on a quiet
    tenant): deleting them meanwhile went unnoticed by `aiid audit verify`."""
    clock = FakeClock()
    ckpt = tmp_path / "ck"
    log = make_log(tmp_path / "a.db", clock=clock, checkpoint_path=ckpt, threaded=False)
    log.append("request")
    log.drain()
    assert ckpt.read_text().splitlines()[-1].startswith("1:")
    assert log.idle_timeout() is None  # nothing waits
    clock.advance(0.1)
    log.append("deny")
    log.drain()
    r3 = log.append("deny")
    log.drain()
    assert len(ckpt.read_text().splitlines()) == 1  # within the interval: not yet
    assert log.idle_timeout() == pytest.approx(0.4)  # ... but the owner is told when
    clock.advance(0.4)
    assert log.idle_timeout() == 0.0
    log.idle()
    assert ckpt.read_text().splitlines()[-1] == f"3:{r3.result().mac}"
    assert log.idle_timeout() is None
    log.close()


def test_the_writer_thread_checkpoints_when_quiet(tmp_path: Path) -> None:
    clock = FakeClock()
    ckpt = tmp_path / "ck"
    log = make_log(tmp_path / "a.db", clock=clock, checkpoint_path=ckpt)
    log.append_sync("request")
    r2 = log.append_sync("deny")  # within the interval of the first checkpoint
    clock.advance(0.5)  # then quiet: the writer wakes for the head on its own
    for _ in range(1000):  # bounded
        if ckpt.read_text().splitlines()[-1] == f"2:{r2.mac}":
            break
        threading.Event().wait(0.01)
    assert ckpt.read_text().splitlines()[-1] == f"2:{r2.mac}"
    log.close()


def test_a_failing_checkpoint_is_retried_an_interval_later(tmp_path: Path) -> None:
    clock = FakeClock()
    ckpt = tmp_path / "file"
    ckpt.write_text("")
    log = make_log(
        tmp_path / "a.db", clock=clock, checkpoint_path=ckpt / "under-a-file", threaded=False
    )
    log.append("request")
    log.drain()  # the checkpoint fails (logged)
    assert log.idle_timeout() == pytest.approx(0.5)  # not 0: the owner would spin
    log.close()


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param("DELETE FROM audit WHERE seq > 2", id="tail-deleted"),
        pytest.param("DELETE FROM audit", id="all-deleted"),
        pytest.param("UPDATE audit SET seq = 9 WHERE seq = 4", id="head-renumbered"),
    ],
)
def test_a_chain_cut_under_the_running_writer_is_refused(tmp_path: Path, cut: str) -> None:
    """The writer carried on from the shorter chain (even at seq 1) and its checkpoints then
    vouched for the cut."""
    db = tmp_path / "a.db"
    log = make_log(db, checkpoint_path=tmp_path / "ck")
    for _ in range(4):
        log.append_sync("deny")
    sql(db, cut)
    with pytest.raises(AuditError, match="changed under the running gateway"):
        log.append_sync("request")
    with pytest.raises(AuditError, match="changed under the running gateway"):
        log.append_sync("request")  # and stays refused
    log.close()


def test_records_that_extend_the_writers_head_are_adopted(tmp_path: Path) -> None:
    """A COMMIT that reported an error yet landed leaves records past the writer's head: they
    chain on from it under the key, so the writer goes on after them."""
    db = tmp_path / "a.db"
    log = make_log(db)
    log.append_sync("request")
    with make_log(db) as other:  # the same key: a genuine extension of the chain
        other.append_sync("response")
    r = log.append_sync("request")
    assert r.seq == 3
    log.close()
    assert verify_db(db, KEY).ok


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda db: db.write_bytes(b""), id="emptied"),
        pytest.param(lambda db: sql(db, "DROP TABLE audit"), id="table-dropped"),
    ],
)
def test_a_log_that_must_exist_is_not_recreated(tmp_path: Path, damage: object) -> None:
    """`aiid run` opens logs with create=False: a 0-byte file or a dropped table restarted the
    tenant's chain at seq 1 (docs/audit-integrity.md says it refuses)."""
    db = tmp_path / "a.db"
    fill(db)
    damage(db)  # type: ignore[operator]
    with pytest.raises(AuditError, match="has no audit table"):
        make_log(db, create=False)


def test_data_in_a_column_the_chain_does_not_cover_fails_verify(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    fill(db)
    sql(db, "ALTER TABLE audit ADD COLUMN extra TEXT")
    assert verify_db(db, KEY).ok  # an empty column hides nothing
    sql(db, "UPDATE audit SET extra = 'hidden' WHERE seq = 5")
    res = verify_db(db, KEY)
    assert not res.ok
    assert res.first_bad_seq == 5
    assert "'extra'" in res.reason


def test_a_failing_sync_is_retried_an_interval_later_not_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[AE] A WAL that could not be synced (EIO, EACCES, a symlink loop) made the writer spin:
    idle() gave up before the checkpoint, so idle_timeout() said 0 again at once (66,541 log
    lines in 10 s)."""
    clock = FakeClock()
    log = make_log(tmp_path / "a.db", clock=clock, checkpoint_path=tmp_path / "ck", threaded=False)
    log.append("request")
    log.drain()
    log.append("response")  # lazy: waits for a sync
    log.drain()
    clock.advance(0.5)  # and a checkpoint is due

    def broken(self: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable_mod.Durability, "_sync", broken)
    assert log.idle_timeout() == 0.0
    log.idle()  # fails: logged
    wait = log.idle_timeout()
    assert wait is not None and wait >= 0.4  # not 0: the owner waits before trying again
    monkeypatch.undo()
    log.close()


def test_append_once_writes_a_record_the_log_does_not_hold_yet(tmp_path: Path) -> None:
    """[AM] For a record written again after its writer died: not twice."""
    log = AuditLog(tmp_path / "a.db", "acme", b"k" * 32)
    try:
        first = log.append("response", request_id="r1", status=200).result(timeout=10)
        again = log.append_once("response", request_id="r1", status=200).result(timeout=10)
        other = log.append_once("response", request_id="r2", status=200).result(timeout=10)
        error = log.append_once("error", request_id="r1", reason="x").result(timeout=10)
    finally:
        log.close()
    assert again == first
    assert (other.seq, error.seq) == (2, 3)
    assert verify_db(tmp_path / "a.db", tenant_key(b"k" * 32, "acme")).ok


def test_append_once_in_the_batch_of_its_first_attempt_is_not_written_twice(
    tmp_path: Path,
) -> None:
    """[AO] At shutdown a held `response` record and its retry reached the writer in one read:
    append_once looked in the database only, and both were committed."""
    log = AuditLog(tmp_path / "a.db", "acme", b"k" * 32, threaded=False)
    try:
        first = log.append("response", request_id="r1", status=200)
        again = log.append_once("response", request_id="r1", status=200)
        other = log.append_once("response", request_id="r2", status=200)
        log.drain()  # one batch
        assert again.result(0) == first.result(0)
        assert other.result(0).seq == 2
    finally:
        log.close()
    assert verify_db(tmp_path / "a.db", tenant_key(b"k" * 32, "acme")).count == 2
