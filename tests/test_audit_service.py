"""The audit writer process: the same chain as the in-process writer, committed in a child
process; a child that dies fails every append (closed), and the key never leaves the pipe."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from aiid_proxy.audit import AuditLog, durable, read_rows, service, tenant_key, verify_db
from aiid_proxy.audit.child import read_batches
from aiid_proxy.audit.frames import APPEND, ERR, OK, frame
from aiid_proxy.audit.record import normalize
from aiid_proxy.audit.service import AuditWriterProcess, RemoteAuditLog
from aiid_proxy.audit.writers import RESPAWN_AFTER, ProcessWriters, writer_factory
from aiid_proxy.clock import FakeClock
from aiid_proxy.errors import AuditError
from aiid_proxy.gateway import Gateway
from aiid_proxy.home import Home
from tests.test_gateway import BODY, URL, run_pipeline

ROOT = bytes(range(32))
WAIT = 30  # seconds a test waits on a future before declaring a hang


@pytest.fixture
def writer() -> Iterator[AuditWriterProcess]:
    w = AuditWriterProcess()
    yield w
    w.close()


def _open(w: AuditWriterProcess, tmp_path: Path, tenant: str = "acme") -> RemoteAuditLog:
    return w.open(
        tmp_path / f"{tenant}.db",
        tenant,
        ROOT,
        checkpoint_path=tmp_path / f"{tenant}.ckpt",
        clock=FakeClock(1_780_000_000.0),
    )


def test_records_chain_and_verify_like_the_thread_writer(
    writer: AuditWriterProcess, tmp_path: Path
) -> None:
    acme, beta = _open(writer, tmp_path), _open(writer, tmp_path, "beta")
    futs = [
        lg.append("request", request_id=f"r{i}", agent="bot", status=i)
        for i in range(300)
        for lg in (acme, beta)
    ]
    results = [f.result(WAIT) for f in futs]
    assert [r.seq for r in results[0::2]] == list(range(1, 301))
    assert [r.seq for r in results[1::2]] == list(range(1, 301))
    assert acme.head() == (results[-2].seq, results[-2].mac)
    acme.close()
    beta.close()
    for tenant in ("acme", "beta"):
        v = verify_db(tmp_path / f"{tenant}.db", tenant_key(ROOT, tenant))
        assert v.ok and v.count == 300, v.reason
    rows = list(read_rows(tmp_path / "acme.db"))
    assert rows[0]["ts"] == "2026-05-28T20:26:40.000000Z"  # the parent's clock, not the child's
    assert (tmp_path / "acme.ckpt").read_text().splitlines()[-1] == f"300:{results[-2].mac}"
    # the in-process writer continues the same chain
    with AuditLog(tmp_path / "acme.db", "acme", ROOT) as lg:
        assert lg.append_sync("policy").seq == 301


def test_reopen_continues_the_chain(writer: AuditWriterProcess, tmp_path: Path) -> None:
    with AuditLog(tmp_path / "acme.db", "acme", ROOT) as lg:
        head = lg.append_sync("policy")
    remote = _open(writer, tmp_path)
    assert remote.head() == (head.seq, head.mac)
    assert remote.append_sync("request").seq == head.seq + 1


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        pytest.param(
            lambda p: AuditLog(p, "acme", bytes(32)).append_sync("policy"),
            "head is invalid",
            id="wrong-key",
        ),
        pytest.param(lambda p: None, "audit database missing", id="missing-db"),
    ],
)
def test_open_errors_come_back_as_one_line(
    writer: AuditWriterProcess,
    tmp_path: Path,
    prepare: Callable[[Path], object],
    message: str,
) -> None:
    prepare(tmp_path / "acme.db")
    with pytest.raises(AuditError, match=message):
        writer.open(tmp_path / "acme.db", "acme", ROOT, create=False)
    # the child is still serving
    assert _open(writer, tmp_path, "beta").append_sync("policy").seq == 1


def test_a_dead_writer_fails_every_append(writer: AuditWriterProcess, tmp_path: Path) -> None:
    lg = _open(writer, tmp_path)
    assert lg.append_sync("request").seq == 1
    os.kill(writer.pid, signal.SIGKILL)
    with pytest.raises(AuditError, match="audit writer"):
        for _ in range(1000):  # bounded: the reply thread notices EOF within milliseconds
            lg.append("request").result(WAIT)
    with pytest.raises(AuditError, match="refused until it is restarted"):
        lg.append("request")


def test_interrupts_do_not_stop_the_writer(writer: AuditWriterProcess, tmp_path: Path) -> None:
    lg = _open(writer, tmp_path)
    os.kill(writer.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    os.kill(writer.pid, signal.SIGTERM)
    assert lg.append_sync("request").seq == 1


def test_close_commits_everything_sent(tmp_path: Path) -> None:
    w = AuditWriterProcess()
    lg = _open(w, tmp_path)
    futs = [lg.append("request", status=i) for i in range(2000)]
    w.close()  # EOF on the child's stdin, before the replies arrive
    assert all(f.done() for f in futs)
    assert verify_db(tmp_path / "acme.db", tenant_key(ROOT, "acme")).count == 2000
    with pytest.raises(AuditError):
        lg.append("request")


def test_appends_from_many_threads(writer: AuditWriterProcess, tmp_path: Path) -> None:
    lg = _open(writer, tmp_path)
    seqs: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(100):
            r = lg.append("request").result(WAIT)
            with lock:
                seqs.append(r.seq)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert sorted(seqs) == list(range(1, 801))


def test_a_waiting_thread_wakes_on_its_reply_not_on_its_poll(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The reader thread may take a reply before the waiting thread's select sees the pipe
    # readable. The waiter used to sleep out its poll slice then (50 ms on ~10% of appends);
    # with an hour-long slice, one lost wake-up would now hang this test.
    monkeypatch.setattr(service, "POLL", 3600.0)
    w = AuditWriterProcess()
    try:
        lg = _open(w, tmp_path)
        done = threading.Event()

        def work() -> None:
            for _ in range(300):
                lg.append_sync("request")
            done.set()

        threading.Thread(target=work, daemon=True).start()
        assert done.wait(WAIT * 2), "an append_sync waited for its poll slice"
        assert lg.head()[0] == 300
    finally:
        w.close()


def test_bad_records_are_refused_in_the_caller(writer: AuditWriterProcess, tmp_path: Path) -> None:
    lg = _open(writer, tmp_path)
    with pytest.raises(ValueError, match="unknown audit field"):
        lg.append("request", nonsense=1)
    with pytest.raises(AuditError, match="audit log is closed"):
        writer.submit(APPEND, 999, "2026-01-01T00:00:00.000000Z", ()).result(WAIT)
    assert lg.append_sync("request").seq == 1


def test_the_key_is_not_in_the_childs_argv_or_environment(
    writer: AuditWriterProcess, tmp_path: Path
) -> None:
    _open(writer, tmp_path)
    seen = Path(f"/proc/{writer.pid}/cmdline").read_bytes()
    seen += Path(f"/proc/{writer.pid}/environ").read_bytes()
    for form in (ROOT, ROOT.hex().encode(), base64.b64encode(ROOT)):
        assert form not in seen


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(struct.pack("!I", 10) + b"abc", "closed inside a frame", id="torn"),
        pytest.param(struct.pack("!I", 2**31), "oversized", id="oversized"),
        pytest.param(struct.pack("!I", 3) + b"zzz", "bad frame", id="garbage"),
        pytest.param(frame(("only",)), "bad frame", id="no-id"),
    ],
)
def test_frames_refuse_a_bad_channel(data: bytes, message: str) -> None:
    r, w = os.pipe()
    os.write(w, frame((APPEND, 1)) + data)
    os.close(w)
    got: list[tuple[object, ...]] = []
    with pytest.raises(AuditError, match=message):
        for msgs in read_batches(r):
            got += msgs
    os.close(r)
    assert got in ([(APPEND, 1)], [])  # a good frame before the bad one may have been read


def test_writer_factory_modes(tmp_path: Path) -> None:
    threads = writer_factory("thread")
    lg = threads.open(tmp_path / "t.db", "acme", ROOT)
    assert isinstance(lg, AuditLog)
    lg.close()
    threads.close()
    proc = writer_factory("process")
    try:
        lg2 = proc.open(tmp_path / "p.db", "acme", ROOT)
        assert isinstance(lg2, RemoteAuditLog) and lg2.append_sync("policy").seq == 1
    finally:
        proc.close()
    with pytest.raises(AuditError, match="unknown audit writer mode"):
        writer_factory("fork")


def test_replies_are_read_on_the_event_loop(writer: AuditWriterProcess, tmp_path: Path) -> None:
    lg = _open(writer, tmp_path)

    async def go() -> list[int]:
        writer.attach(asyncio.get_running_loop())
        cancelled = lg.append("request", status=0)
        cancelled.cancel()  # its caller gave up: the reply is dropped, the rest still resolve
        futs = [asyncio.wrap_future(lg.append("request", status=i)) for i in range(1, 200)]
        got = [r.seq for r in await asyncio.gather(*futs)]
        # a synchronous call from the loop's own thread pumps the replies itself
        lg.checkpoint()
        return got

    seqs = asyncio.run(asyncio.wait_for(go(), WAIT))
    assert seqs == list(range(2, 201))  # the cancelled record was sent, so it is seq 1
    reader = writer._reader  # its own reply thread stops once the loop reads
    reader.join(WAIT)
    assert not reader.is_alive()


def test_gateway_with_the_writer_process(
    make_gateway: Callable[..., Gateway],
    policies_dir: Path,
    gateway_home: Home,
    issue: Callable[..., str],
) -> None:
    gw = make_gateway(policies_dir, audit_writer="process")
    st = run_pipeline(gw, issue())
    gw.seal(st, "POST", URL, BODY)
    assert st.allows() and st.audit is not None
    rows = list(read_rows(gateway_home.audit_path("acme")))
    assert rows[-1]["seq"] == st.audit.seq and rows[-1]["event"] == "request"
    gw.close()
    audit_key = gateway_home.audit_key({})
    assert verify_db(gateway_home.audit_path("acme"), tenant_key(audit_key, "acme")).ok


def test_a_gateway_refuses_while_its_writer_is_dead_then_recovers(
    make_gateway: Callable[..., Gateway],
    policies_dir: Path,
    gateway_home: Home,
    issue: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = make_gateway(policies_dir, audit_writer="process")
    writers = gw._audit_writers
    assert isinstance(writers, ProcessWriters)
    token = issue()
    before = run_pipeline(gw, token).audit
    assert before is not None
    os.kill(writers.writer.pid, signal.SIGKILL)
    refused = 0
    for _ in range(1000):  # refused (AuditError), never allowed, until the replacement is in
        try:
            run_pipeline(gw, token)
        except AuditError:
            refused += 1
            break
    assert refused == 1
    with caplog.at_level(logging.WARNING, logger="aiid_proxy.audit.writers"):
        for _ in range(50):
            writers.join(WAIT)
            try:
                st = run_pipeline(gw, token)
                break
            except AuditError:
                continue
    assert st.audit is not None and st.audit.seq > before.seq
    assert "audit writer process restarted" in caplog.text
    gw.seal(st, "POST", URL, BODY)
    assert st.allows()
    gw.close()
    audit_key = gateway_home.audit_key({})
    assert verify_db(gateway_home.audit_path("acme"), tenant_key(audit_key, "acme")).ok


def test_the_childs_log_lines_reach_the_gateways_log(
    writer: AuditWriterProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    lg = writer.open(tmp_path / "a.db", "acme", ROOT, checkpoint_path=tmp_path / "file" / "c")
    with caplog.at_level(logging.INFO, logger="aiid_proxy.audit.service"):
        assert lg.append_sync("request").seq == 1  # committed; its checkpoint cannot be
        lg.close()  # a round trip: the log line was sent before its reply
    assert "audit writer: cannot write audit checkpoint" in caplog.text


def test_the_gateways_death_does_not_cut_a_batch_short(tmp_path: Path) -> None:
    code = f"""
import os, sys
from pathlib import Path
from typing import Any
from aiid_proxy.audit.service import AuditWriterProcess
w = AuditWriterProcess()
lg = w.open(Path({str(tmp_path / "a.db")!r}), "acme", bytes(range(32)))
for i in range(500):
    lg.append("request", status=i)
print(w.pid, flush=True)
os._exit(0)  # no close: as if killed
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    child = int(out.stdout.split()[0])
    for _ in range(WAIT * 20):  # the child sees EOF, commits, exits
        if not Path(f"/proc/{child}").exists() or "Z" in _state(child):
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "Z" in _state(child)
    v = verify_db(tmp_path / "a.db", tenant_key(ROOT, "acme"))
    assert v.ok and v.count == 500


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_the_child_fsyncs_lazy_records_when_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable, "LAZY_SYNC", 0.01)
    lg = AuditLog(tmp_path / "a.db", "acme", ROOT, threaded=False)
    lg.submit("2026-01-01T00:00:00.000000Z", normalize("response", {}))
    lg.drain()
    assert lg.unsynced
    r, w = os.pipe()
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.extend(read_batches(r, {1: lg})))
    reader.start()
    for _ in range(WAIT * 100):  # bounded wait for the child loop's quiet period
        if not lg.unsynced:
            break
        time.sleep(0.01)
    os.close(w)
    reader.join(WAIT)
    os.close(r)
    assert not lg.unsynced and got == []
    lg.close()


def test_response_records_travel_with_the_next_record(
    writer: AuditWriterProcess, tmp_path: Path
) -> None:
    lg = _open(writer, tmp_path)
    held = writer._held

    async def go() -> list[int]:
        writer.attach(asyncio.get_running_loop())
        response = lg.append("response", status=200)
        assert len(held) == 1  # waits for company
        request = lg.append("request")
        assert held == []  # both went in one write, in order
        alone = lg.append("response", status=201)
        assert len(held) == 1  # nobody follows: the hold timer sends it
        futs = [asyncio.wrap_future(f) for f in (response, request, alone)]
        return [r.seq for r in await asyncio.gather(*futs)]

    assert asyncio.run(asyncio.wait_for(go(), WAIT)) == [1, 2, 3]
    last = lg.append("response")  # no loop any more: sent at once, nothing is held
    assert held == [] and last.result(WAIT).seq == 4
    lg.close()
    assert [r["status"] for r in read_rows(tmp_path / "acme.db")] == [200, None, 201, None]


def test_a_burst_bigger_than_the_pipes_does_not_deadlock(
    writer: AuditWriterProcess, tmp_path: Path
) -> None:
    # The loop writes requests while it is the only reader of the replies: the child must keep
    # reading even when the reply pipe is full (else both sides wait on each other forever).
    lg = _open(writer, tmp_path)
    reason = "r" * 2000

    async def go() -> int:
        writer.attach(asyncio.get_running_loop())
        futs = [lg.append("request", reason=reason, status=i) for i in range(1500)]
        done = await asyncio.gather(*(asyncio.wrap_future(f) for f in futs))
        return done[-1].seq

    assert asyncio.run(asyncio.wait_for(go(), WAIT)) == 1500


def _cancelled() -> Future[object]:
    f: Future[object] = Future()
    f.cancel()
    return f


def _bad_convert(payload: object) -> object:
    raise AuditError("audit writer: bad reply to append")


@pytest.mark.parametrize(
    ("fut", "convert", "msg", "want"),
    [
        pytest.param(Future(), lambda p: p, (OK, 1, 7), 7, id="ok"),
        pytest.param(Future(), lambda p: p, (ERR, 1, "disk full"), "disk full", id="error"),
        pytest.param(Future(), _bad_convert, (OK, 1, 7), "bad reply", id="bad-reply"),
        pytest.param(_cancelled(), lambda p: p, (OK, 1, 7), None, id="cancelled-meanwhile"),
    ],
)
def test_resolving_a_reply_never_raises(
    fut: Future[object], convert: Callable[[object], object], msg: tuple[object, ...], want: object
) -> None:
    service._resolve((fut, convert), msg)  # a raise here would strand the replies after it
    if want is None:
        assert fut.cancelled()
    elif isinstance(want, str):
        with pytest.raises(AuditError, match=want):
            fut.result(0)
    else:
        assert fut.result(0) == want


def test_the_gateways_key_variables_are_not_passed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = base64.b64encode(b"k" * 32).decode()
    monkeypatch.setenv("AIID_AUDIT_KEY", canary)
    monkeypatch.setenv("AIID_MASTER_KEY", canary)
    with AuditWriterProcess() as w:
        environ = Path(f"/proc/{w.pid}/environ").read_bytes()
    assert canary.encode() not in environ and b"AIID_MASTER_KEY" not in environ


def test_a_closed_writer_refuses_requests(tmp_path: Path) -> None:
    w = AuditWriterProcess()
    lg = _open(w, tmp_path)
    w.close()
    with pytest.raises(AuditError):
        lg.append("request")
    with pytest.raises(AuditError, match="closed"):
        w.submit(APPEND, 1, "2026-01-01T00:00:00.000000Z", ())


# -- a dead writer process is replaced ---------------------------------------------------------
def _until_refused(lg: RemoteAuditLog) -> None:
    """Append until the death of the writer shows (bounded: EOF is noticed in milliseconds)."""
    for _ in range(1000):
        try:
            lg.append("request").result(WAIT)
        except AuditError:
            return
    raise AssertionError("appends kept succeeding after the writer was killed")


def _until_accepted(lg: RemoteAuditLog, writers: ProcessWriters) -> int:
    """Append until one commits again, joining the replacement under way between tries."""
    for _ in range(50):
        writers.join(WAIT)
        try:
            return lg.append_sync("request").seq
        except AuditError:
            continue
    raise AssertionError("the writer process was never replaced")


def test_a_dead_writer_process_is_replaced_and_the_chain_goes_on(tmp_path: Path) -> None:
    writers = ProcessWriters()
    try:
        logs = {t: _open(writers, tmp_path, t) for t in ("acme", "globex")}  # type: ignore[arg-type]
        for lg in logs.values():
            assert [lg.append_sync("request").seq for _ in range(3)] == [1, 2, 3]
        first = writers.writer
        os.kill(first.pid, signal.SIGKILL)
        _until_refused(logs["acme"])  # fail closed: refused, never let through
        seq = _until_accepted(logs["acme"], writers)
        assert writers.writer is not first and writers.writer.pid != first.pid
        assert writers.restarts == 1
        assert first._proc.returncode is not None  # the dead child was reaped
        # Both tenants moved over; each chain goes on where its database ends.
        assert logs["globex"].append_sync("request").seq == 4
        assert seq == logs["acme"].head()[0]
    finally:
        writers.close()
    key = tenant_key(ROOT, "acme")
    res = verify_db(tmp_path / "acme.db", key, checkpoint_path=tmp_path / "acme.ckpt")
    assert res.ok, res.reason
    assert res.count == seq


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(AuditError("cannot start the audit writer process: test"), id="audit-error"),
        pytest.param(RuntimeError("can't start new thread"), id="any-other-error"),
    ],
)
def test_replacements_are_at_most_one_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    writers = ProcessWriters()
    clock = FakeClock(1_780_000_000.0)
    try:
        lg = writers.open(tmp_path / "a.db", "acme", ROOT, clock=clock)
        starts: list[int] = []
        real = service.AuditWriterProcess

        def failing(*a: object, **kw: object) -> AuditWriterProcess:
            starts.append(1)
            raise failure

        monkeypatch.setattr("aiid_proxy.audit.writers.AuditWriterProcess", failing)
        os.kill(writers.writer.pid, signal.SIGKILL)
        _until_refused(lg)
        with pytest.raises(AuditError, match="refused until it is restarted"):
            lg.append("request")  # sees it dead: one attempt starts, in the background
        writers.join(WAIT)
        assert len(starts) == 1  # ... and failed
        for _ in range(5):
            with pytest.raises(AuditError):
                lg.append("request").result(WAIT)
            writers.join(WAIT)
        assert len(starts) == 1  # not again within RESPAWN_AFTER
        clock.advance(RESPAWN_AFTER)
        monkeypatch.setattr("aiid_proxy.audit.writers.AuditWriterProcess", real)
        assert _until_accepted(lg, writers) == 1
        assert len(starts) == 1 and writers.restarts == 1
    finally:
        writers.close()


def test_a_replacement_is_read_on_the_event_loop(tmp_path: Path) -> None:
    writers = ProcessWriters()
    lg = writers.open(tmp_path / "a.db", "acme", ROOT)

    async def go() -> list[int]:
        writers.attach(asyncio.get_running_loop())
        assert (await asyncio.wrap_future(lg.append("request"))).seq == 1
        os.kill(writers.writer.pid, signal.SIGKILL)
        for _ in range(1000):
            try:
                await asyncio.wrap_future(lg.append("request"))
            except AuditError:
                break
        for _ in range(200):
            await asyncio.sleep(0.01)  # the loop must run to attach the replacement
            try:
                return [(await asyncio.wrap_future(lg.append("request"))).seq for _ in range(3)]
            except AuditError:
                continue
        raise AssertionError("never replaced")

    try:
        seqs = asyncio.run(asyncio.wait_for(go(), WAIT))
        assert seqs[1:] == [seqs[0] + 1, seqs[0] + 2]
        reader = writers.writer._reader  # the replacement's replies are read on the loop
        reader.join(WAIT)
        assert not reader.is_alive()
    finally:
        writers.close()


def _dead(lg: RemoteAuditLog) -> None:
    os.kill(lg.service.pid, signal.SIGKILL)
    _until_refused(lg)


def test_a_log_left_on_a_dead_writer_is_moved_to_the_live_one(tmp_path: Path) -> None:
    # A log opened just as its writer died, after the replacement took its list of logs: it
    # is still bound to the dead writer. Its next record moves it to the live one.
    writers = ProcessWriters()
    clock = FakeClock(1_780_000_000.0)
    try:
        a = writers.open(tmp_path / "a.db", "acme", ROOT, clock=clock)
        b = writers.open(tmp_path / "b.db", "globex", ROOT, clock=clock)
        assert b.append_sync("request").seq == 1
        writers._logs.discard(b)  # not in the list the replacement will read
        _dead(a)
        assert _until_accepted(a, writers) == 1
        writers._logs.add(b)
        assert b.service.dead and not writers.writer.dead
        clock.advance(RESPAWN_AFTER)  # one attempt per interval, moves included
        with pytest.raises(AuditError):
            b.append("request")  # still on the dead one: refused, and a move starts
        writers.join(WAIT)
        assert b.service is writers.writer
        assert b.append_sync("request").seq == 2
        assert writers.restarts == 1  # moved, not another process
    finally:
        writers.close()


def test_a_log_that_went_backwards_is_not_reopened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writers = ProcessWriters()
    try:
        lg = writers.open(tmp_path / "a.db", "acme", ROOT)
        assert [lg.append_sync("request").seq for _ in range(3)] == [1, 2, 3]
        _dead(lg)
        conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
        conn.execute("DELETE FROM audit WHERE seq > 1")  # while nobody writes: a rollback
        conn.close()
        with caplog.at_level(logging.CRITICAL, logger="aiid_proxy.audit.writers"):
            with pytest.raises(AuditError):
                lg.append("request")
            writers.join(WAIT)
        assert "now ends at seq 1, before seq 3" in caplog.text
        assert lg.service.dead  # not moved: its requests stay refused
        with pytest.raises(AuditError):
            lg.append("request")
    finally:
        writers.close()


# -- the whole product: kill the writer of a running `aiid run` --------------------------------
SMALL_ONLY = (
    "version: 1\ntenant: acme\ndefault: deny\nrules:\n"
    "  - id: small\n    providers: [openai]\n    models: ['gpt-4o-mini']\n    effect: allow\n"
)


def _real_gateway(tmp_path: Path, policy: str = SMALL_ONLY) -> tuple[Any, Any, Path, Any]:
    """A stand-in, a home with acme's openai key, a real `aiid run`, and an openai client
    pointed at it: (stand-in, gateway, home, client)."""
    import openai
    from e2e import OPENAI_CANARY, make_home, start_gateway
    from standin import StandIn

    si = StandIn(tmp_path)
    si.start()
    home = make_home(tmp_path, {"acme": {"openai": OPENAI_CANARY}})
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "acme.yaml").write_text(policy)
    gw = start_gateway(home, policies, si.port, si.ca_path)
    client = openai.OpenAI(
        api_key=gw.token("acme", "bot"),
        max_retries=0,
        http_client=openai.DefaultHttpxClient(proxy=gw.proxy, verify=str(gw.ca)),
    )
    return si, gw, home, client


@pytest.mark.e2e
def test_a_running_gateway_survives_its_writer_being_killed(tmp_path: Path) -> None:
    import openai

    si, gw, home, client = _real_gateway(tmp_path)
    try:

        def ask() -> int:
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
                return 200
            except openai.APIStatusError as e:
                return e.status_code
            except openai.APIConnectionError:
                return 0  # killed (fail closed): no answer at all

        assert ask() == 200
        children = subprocess.run(
            ["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(children) == 1
        os.kill(int(children[0]), signal.SIGKILL)
        forwarded_before = len(si.requests)
        statuses = [ask() for _ in range(3)]
        for _ in range(300):  # bounded: the replacement takes well under a second
            if statuses[-1] == 200:
                break
            statuses.append(ask())
        assert statuses[-1] == 200, statuses
        refused = [s for s in statuses if s != 200]
        assert refused and all(s in (0, 500, 502, 503) for s in refused), statuses
        # Nothing left without its durable record while the writer was down.
        assert len(si.requests) - forwarded_before == statuses.count(200)
        assert "audit writer process restarted" in gw.log()
        after = subprocess.run(
            ["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(after) == 1 and after != children
    finally:
        gw.stop()
        si.stop()
    rows = read_rows(home / "tenants" / "acme" / "audit.db")
    ids = {r["request_id"] for r in rows if r["event"] == "request"}
    assert all(r.header("x-aiid-request-id") in ids for r in si.requests)
    key = Home.resolve(home).audit_key({})
    assert verify_db(home / "tenants" / "acme" / "audit.db", tenant_key(key, "acme")).ok


# -- the whole product: SIGTERM while a stream is in flight ---------------------------------------
@pytest.mark.e2e
def test_a_stream_cut_by_shutdown_gets_its_error_record(tmp_path: Path) -> None:
    import openai

    si, gw, home, client = _real_gateway(tmp_path)
    got: list[str] = []
    try:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-standin-events": "100", "x-standin-delay-ms": "100"},
        )
        with pytest.raises(openai.APIConnectionError):  # ~10 s of stream: cut by the stop
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got.append(chunk.choices[0].delta.content)
                    if len(got) == 2:
                        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(30) == 0
    finally:
        gw.stop()
        si.stop()
    assert 2 <= len(got) < 100
    rows = [r for r in read_rows(home / "tenants" / "acme" / "audit.db") if r["request_id"]]
    assert [r["event"] for r in rows] == ["request", "error"], rows
    assert rows[1]["reason"] == "gateway shut down before the request completed"
    assert rows[0]["request_id"] == rows[1]["request_id"]
    assert "Traceback" not in gw.log() and "audit log is closed" not in gw.log(), gw.log()
    key = Home.resolve(home).audit_key({})
    assert verify_db(home / "tenants" / "acme" / "audit.db", tenant_key(key, "acme")).ok


@pytest.mark.e2e
def test_a_request_held_at_shutdown_is_refused_not_dropped(tmp_path: Path) -> None:
    import openai

    policy = (
        "version: 1\ntenant: acme\ndefault: deny\napproval: {timeout: 60s}\nrules:\n"
        "  - {id: human, providers: [openai], effect: approve}\n"
    )
    si, gw, home, client = _real_gateway(tmp_path, policy)
    got: list[object] = []

    def ask() -> None:
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            got.append(200)
        except openai.APIStatusError as e:
            got.append((e.status_code, e.message))
        except openai.APIConnectionError as e:
            got.append(repr(e))

    try:
        asker = threading.Thread(target=ask)
        asker.start()
        for _ in range(600):  # bounded: the hold starts within a second or two
            if "held for approval" in gw.log():
                break
            time.sleep(0.05)
        gw.proc.send_signal(signal.SIGTERM)
        asker.join(60)
        assert gw.proc.wait(30) == 0
    finally:
        gw.stop()
        si.stop()
    assert got == [
        (403, "Error code: 403 - approval denied by shutdown: the gateway is shutting down")
    ]
    rows = [r for r in read_rows(home / "tenants" / "acme" / "audit.db") if r["request_id"]]
    assert [(r["event"], r["status"]) for r in rows] == [
        ("held", None), ("approval", 403), ("deny", 403)
    ]  # fmt: skip
    assert not si.requests  # nothing reached the provider


def test_the_child_checkpoints_the_head_when_quiet(tmp_path: Path) -> None:
    """[AD] The last records before a quiet spell got into no checkpoint until the next commit:
    the child's read loop now wakes for a due checkpoint as for lazy records."""
    clock = FakeClock()
    ckpt = tmp_path / "ck"
    lg = AuditLog(
        tmp_path / "a.db", "acme", ROOT, threaded=False, clock=clock, checkpoint_path=ckpt
    )
    lg.submit("2026-01-01T00:00:00.000000Z", normalize("request", {}))
    lg.drain()
    lg.submit("2026-01-01T00:00:00.000001Z", normalize("deny", {}))
    lg.drain()
    assert ckpt.read_text().splitlines()[-1].startswith("1:")  # the second is within 0.5 s
    clock.advance(0.5)
    r, w = os.pipe()
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.extend(read_batches(r, {1: lg})))
    reader.start()
    for _ in range(WAIT * 100):  # bounded wait for the child loop's quiet period
        if ckpt.read_text().splitlines()[-1].startswith("2:"):
            break
        time.sleep(0.01)
    os.close(w)
    reader.join(WAIT)
    os.close(r)
    assert ckpt.read_text().splitlines()[-1] == f"2:{lg.head()[1]}"
    lg.close()


def test_append_once_through_the_writer_process(writer: AuditWriterProcess, tmp_path: Path) -> None:
    """[AM] The `once` flag travels in the append frame: the child does not write a record
    its log holds already."""
    acme = _open(writer, tmp_path)
    first = acme.append("response", request_id="r1", status=200).result(WAIT)
    assert acme.append_once("response", request_id="r1", status=200).result(WAIT) == first
    assert acme.append_once("response", request_id="r2", status=200).result(WAIT).seq == 2
    acme.close()


def test_write_once_from_the_blocked_loop_thread_is_sent_and_read(
    writer: AuditWriterProcess, tmp_path: Path
) -> None:
    """[AO] At shutdown (the loop's thread, blocked) a retried `response` record was held back
    to travel with the next record, as lazy ones are, and its reply was never read: it timed
    out, and was committed twice at close with the held first attempt."""

    acme = _open(writer, tmp_path)

    async def shutdown_like() -> tuple[Any, Any]:
        writer.attach(asyncio.get_running_loop())
        held = acme.append("response", request_id="r1", status=200)  # lazy: held back
        again = acme.write_once("response", 3.0, request_id="r1", status=200)
        return held, again

    held, again = asyncio.run(shutdown_like())
    assert held.result(0) == again  # the same record: sent in one batch, written once
    acme.close()
    db = sqlite3.connect(tmp_path / "acme.db")
    assert db.execute("SELECT count(*) FROM audit WHERE request_id = 'r1'").fetchone()[0] == 1
    db.close()
