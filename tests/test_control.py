"""Human decisions: the approval broker, the local control channel that `aiid approve` / `aiid
deny` use (only the gateway's own user gets through), and overrides named in the audit log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TENANT, audit_rows, write_policies

from aiid_proxy import control
from aiid_proxy.clock import FakeClock
from aiid_proxy.control import Answer, ApprovalBroker, ControlServer, send_answer, socket_path
from aiid_proxy.errors import AiidError, RequestRefused
from aiid_proxy.gateway import FlowState, Gateway, Target
from aiid_proxy.home import Home
from aiid_proxy.providers import Usage

KEY = ("acme", "bot", "openai", "o1", "needs-human")
OTHER_KEY = ("acme", "bot", "openai", "o1-mini", "needs-human")


# -- broker ---------------------------------------------------------------------------------------
def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize(
    ("tenant", "request_id", "first", "error"),
    [
        pytest.param("acme", "req_missing", False, "no pending request req_missing", id="unknown"),
        pytest.param("other", "req_1", False, "no pending request req_1 for tenant other", id="t"),
        pytest.param("acme", "req_1", True, "already answered", id="twice"),
    ],
)
def test_broker_refuses_answers_that_do_not_fit(
    tenant: str, request_id: str, first: bool, error: str
) -> None:
    async def go() -> None:
        b = ApprovalBroker(FakeClock(1000.0))
        b.hold("acme", "req_1", KEY, 60)
        if first:
            b.answer("acme", "req_1", Answer(True, "alice"))
        with pytest.raises(AiidError, match=error):
            b.answer(tenant, request_id, Answer(True, "mallory"))

    _run(go())


@pytest.mark.parametrize(
    "ttl",
    [
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param(0.0, id="zero"),
        pytest.param(-5.0, id="negative"),
        pytest.param(24 * 3600 + 1.0, id="over-24h"),
    ],
)
def test_an_approval_ttl_out_of_bounds_is_refused_before_anything_is_answered(
    ttl: float,
) -> None:
    """The control socket takes JSON (NaN, Infinity, 1e12): a NaN ttl approved the request,
    then made a grant no clock ever ended, and the reply said the answer had failed."""

    async def go() -> None:
        b = ApprovalBroker(FakeClock(1000.0))
        p = b.hold("acme", "req_1", KEY, 60)
        with pytest.raises(AiidError, match="ttl must be over 0 and at most 86400 s"):
            b.answer("acme", "req_1", Answer(True, "alice", ttl=ttl))
        assert not p.future.done() and b.grants == {}  # still held, nothing granted

    _run(go())


def test_broker_ttl_grant_holds_until_it_expires() -> None:
    clock = FakeClock(1000.0)

    async def go() -> str:
        b = ApprovalBroker(clock)
        p = b.hold("acme", "req_1", KEY, 60)
        msg = b.answer("acme", "req_1", Answer(True, "alice", ttl=600))
        assert p.future.result() == Answer(True, "alice", ttl=600)
        assert b.granted(KEY) == "alice" and b.granted(OTHER_KEY) is None
        clock.advance(599)
        assert b.granted(KEY) == "alice"
        clock.advance(1)
        assert b.granted(KEY) is None and KEY not in b.grants
        return msg

    assert "600 s" in _run(go())


@pytest.mark.parametrize(
    ("answer", "grants"),
    [
        pytest.param(Answer(True, "alice"), False, id="approve-once"),
        pytest.param(Answer(False, "alice", ttl=600), False, id="deny-with-ttl"),
        pytest.param(Answer(True, "alice", ttl=600), True, id="approve-for-ttl"),
    ],
)
def test_only_an_approval_with_ttl_grants_and_releases_the_same_key(
    answer: Answer, grants: bool
) -> None:
    async def go() -> tuple[bool, bool, Answer | None]:
        b = ApprovalBroker(FakeClock(1000.0))
        b.hold("acme", "req_1", KEY, 60)
        same = b.hold("acme", "req_2", KEY, 60)
        other = b.hold("acme", "req_3", OTHER_KEY, 60)
        b.answer("acme", "req_1", answer)
        got = same.future.result() if same.future.done() else None
        return b.granted(KEY) is not None, other.future.done(), got

    granted, other_done, same_answer = _run(go())
    assert granted is grants and not other_done
    if grants:
        assert same_answer is not None and same_answer.approved and same_answer.by == "alice"
        assert "req_1" in same_answer.reason
    else:
        assert same_answer is None


# -- the control channel ------------------------------------------------------------------------
@pytest.fixture
def short_home() -> Iterator[Home]:
    """A home with a short path: a Unix socket path must fit in 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="aiid-", dir="/tmp"))
    try:
        yield Home(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Served:
    """A ControlServer on its own event loop in the test, with a recording handler."""

    def __init__(self, home: Home, reply: Callable[[dict[str, Any]], str] | None = None) -> None:
        self.home = home
        self.seen: list[dict[str, Any]] = []
        self.reply = reply or (lambda msg: f"ok {msg.get('request_id')}")
        self.server = ControlServer(home, self._handle)

    def _handle(self, msg: dict[str, Any]) -> str:
        self.seen.append(msg)
        return self.reply(msg)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Start the server, run blocking ``fn`` in a thread (like the CLI), stop the server."""

        async def go() -> Any:
            await self.server.start()
            try:
                return await asyncio.wait_for(asyncio.to_thread(fn), 20)
            finally:
                await self.server.stop()

        return _run(go())


def test_socket_is_0600_in_a_0700_directory(short_home: Home) -> None:
    s = Served(short_home)

    def modes() -> tuple[int, int, bool]:
        path = socket_path(short_home)
        return (
            stat.S_IMODE(path.stat().st_mode),
            stat.S_IMODE(path.parent.stat().st_mode),
            stat.S_ISSOCK(path.stat().st_mode),
        )

    assert s.call(modes) == (0o600, 0o700, True)
    assert not socket_path(short_home).exists()  # removed on stop


def test_a_loose_control_directory_is_tightened(short_home: Home) -> None:
    short_home.control_dir.mkdir(parents=True)
    short_home.control_dir.chmod(0o777)
    s = Served(short_home)
    assert s.call(lambda: stat.S_IMODE(short_home.control_dir.stat().st_mode)) == 0o700


def test_answer_round_trip(short_home: Home) -> None:
    s = Served(short_home)
    payload = {"tenant": "acme", "request_id": "req_1", "answer": "approve", "by": "alice"}
    assert s.call(lambda: send_answer(short_home, payload)) == "ok req_1"
    assert s.seen == [payload]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        pytest.param(b"not json\n", "Expecting value", id="not-json"),
        pytest.param(b"[1, 2]\n", "expected a JSON object", id="not-an-object"),
        pytest.param(b'{"x": "' + b"a" * 5000 + b'"}\n', "message too large", id="too-large"),
    ],
)
def test_bad_messages_get_an_error_reply_and_reach_no_handler(
    short_home: Home, raw: bytes, error: str
) -> None:
    s = Served(short_home)

    def send() -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(str(socket_path(short_home)))
            c.sendall(raw)
            data = b""
            while not data.endswith(b"\n"):
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
        reply: dict[str, Any] = json.loads(data)
        return reply

    reply = s.call(send)
    assert reply["ok"] is False and error in reply["message"]
    assert s.seen == []


def test_handler_errors_come_back_as_one_line(short_home: Home) -> None:
    def refuse(msg: dict[str, Any]) -> str:
        raise AiidError("no pending request req_9\nfor tenant acme")

    s = Served(short_home, refuse)
    with pytest.raises(AiidError, match="^no pending request req_9 for tenant acme$"):
        s.call(lambda: send_answer(short_home, {"request_id": "req_9"}))


@pytest.mark.parametrize(
    "peer",
    [
        pytest.param(lambda: os.getuid() + 1, id="another-user"),
        pytest.param(lambda: 0 if os.getuid() else 1, id="root-vs-user"),
        pytest.param(lambda: None, id="unknown-peer"),
    ],
)
def test_other_users_are_refused(
    short_home: Home, monkeypatch: pytest.MonkeyPatch, peer: Callable[[], int | None]
) -> None:
    uid = peer()
    monkeypatch.setattr(control, "_peer_uid", lambda sock: uid)
    s = Served(short_home)
    with pytest.raises(AiidError, match="refused: not the gateway user"):
        s.call(lambda: send_answer(short_home, {"request_id": "req_1", "answer": "approve"}))
    assert s.seen == []


def test_peer_uid_reads_the_kernel_credentials() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert control._peer_uid(a) == os.getuid()


class _NoCreds:
    def getsockopt(self, *args: Any) -> bytes:
        raise OSError("not a unix socket")


def test_peer_uid_is_unknown_without_credentials() -> None:
    assert control._peer_uid(_NoCreds()) is None  # type: ignore[arg-type]


def test_no_gateway_running_is_a_clear_error(short_home: Home) -> None:
    with pytest.raises(AiidError, match="no running gateway"):
        send_answer(short_home, {"request_id": "req_1"})


def test_a_stale_socket_is_replaced_but_a_live_one_is_not_stolen(short_home: Home) -> None:
    # a socket file left by a gateway that died: nothing listens, so it is replaced
    short_home.control_dir.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path(short_home)))
    stale.close()
    first = Served(short_home)

    def second_start() -> str:
        async def go() -> str:
            try:
                await ControlServer(short_home, lambda m: "x").start()
            except OSError as e:
                return str(e)
            return "started"

        return asyncio.run(go())

    assert "another gateway is running" in first.call(second_start)


# -- overrides in the audit log -------------------------------------------------------------------
OVERRIDE_POLICY = """\
overrides:
  - id: INC-4711
    agents: [support-7]
    models: [gpt-4o]
    effect: allow
    approved_by: alice@example.com
    expires: 2027-02-01T00:00:00Z
  - id: INC-9
    agents: [support-9]
    models: [gpt-4o-mini]
    effect: deny
    reason: "incident 9: this agent is suspended"
    approved_by: bob@example.com
    expires: 2027-02-01T00:00:00Z
"""


@pytest.fixture
def override_gateway(make_gateway: Callable[..., Gateway], tmp_path: Path) -> Gateway:
    pol = write_policies(tmp_path / "ovr")
    p = pol / f"{TENANT}.yaml"
    p.write_text(p.read_text() + OVERRIDE_POLICY)
    return make_gateway(pol)


def _through(gw: Gateway, token: str, model: str) -> FlowState:
    """One request through the library stages, recorded like the addons do."""
    st = gw.new_flow(Target("https", "api.openai.com", 443, "POST", "/v1/chat/completions"))
    gw.identify(st, [("authorization", f"Bearer {token}")])
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})
    gw.route(st, {"content-type": "application/json"}, body.encode())
    try:
        gw.decide(st)
        gw.reserve(st)
    except RequestRefused as r:
        fut = gw.record_refusal(st, r)
        assert fut is not None
        fut.result(10)
        return st
    gw.audit_done(st, gw.audit_request(st).result(10))
    gw.inject(st)
    fut = gw.record_response(st, 200, Usage(3, 5))
    assert fut is not None
    fut.result(10)
    return st


@pytest.mark.parametrize(
    ("agent", "model", "events", "override"),
    [
        pytest.param("support-7", "gpt-4o", ["request", "response"], "INC-4711", id="allow"),
        pytest.param("support-9", "gpt-4o-mini", ["deny"], "INC-9", id="deny"),
        pytest.param("support-1", "gpt-4o", ["deny"], None, id="not-covered"),
    ],
)
def test_every_record_of_a_request_an_override_decides_names_it(
    override_gateway: Gateway,
    gateway_home: Home,
    issue: Callable[..., str],
    agent: str,
    model: str,
    events: list[str],
    override: str | None,
) -> None:
    st = _through(override_gateway, issue(agent), model)
    rows = [r for r in audit_rows(gateway_home) if r["request_id"] == st.request_id]
    assert [r["event"] for r in rows] == events
    for r in rows:
        assert json.loads(r["detail"]).get("override") == override
        if override is not None:
            assert r["rule"] == override


def test_an_expired_override_decides_nothing(
    override_gateway: Gateway, gateway_home: Home, issue: Callable[..., str], fake_clock: FakeClock
) -> None:
    fake_clock.advance(30 * 86400)  # past 2027-02-01
    st = _through(override_gateway, issue("support-7", ttl=900), "gpt-4o")
    (row,) = [r for r in audit_rows(gateway_home) if r["request_id"] == st.request_id]
    assert row["event"] == "deny" and row["rule"] == "no-gpt-4o"
    assert "override" not in json.loads(row["detail"])


def test_one_gateway_per_home_is_an_exclusive_lock(short_home: Home) -> None:
    """Two gateways started at the same moment both passed the control-socket check."""
    from aiid_proxy.control import HomeLock
    from aiid_proxy.errors import ConfigError

    first = HomeLock(short_home)
    with pytest.raises(ConfigError, match=r"another gateway \(pid \d+\) is running on the home"):
        HomeLock(short_home)
    first.release()
    HomeLock(short_home).release()  # free again


@pytest.fixture
def long_home(tmp_path: Path) -> Iterator[Home]:
    """A home whose runtime/control/aiid.sock is too long for a Unix socket."""
    root = tmp_path / ("h" * 90)
    root.mkdir()
    yield Home(root)
    with contextlib.suppress(OSError):
        socket_path(Home(root)).unlink()


def test_a_home_too_long_for_a_socket_gets_one_in_a_private_temp_directory(
    long_home: Home,
) -> None:
    """`AF_UNIX path too long`: approvals were impossible for a home of ~82+ characters."""
    path = socket_path(long_home)
    assert len(os.fsencode(long_home.control_dir / "aiid.sock")) > 107
    assert path.parent == Path(tempfile.gettempdir()) / f"aiid-{os.getuid()}"
    s = Served(long_home)
    payload = {"tenant": "acme", "request_id": "req_1", "answer": "approve", "by": "alice"}
    assert s.call(lambda: send_answer(long_home, payload)) == "ok req_1"
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert socket_path(Home(long_home.root.parent / ("g" * 90))) != path  # one per home


def test_a_socket_directory_open_to_others_is_not_used(long_home: Home) -> None:
    s = Served(long_home)
    d = socket_path(long_home).parent

    def loosen_then_answer() -> str:
        d.chmod(0o777)
        try:
            return send_answer(long_home, {"tenant": "acme", "request_id": "req_1"})
        finally:
            d.chmod(0o700)

    with pytest.raises(AiidError, match="not safe to use: .* is open to other users"):
        s.call(loosen_then_answer)
    assert s.seen == []


def test_an_audit_writer_holds_the_home_until_it_exits(
    short_home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[AM] A writer process that outlived its killed gateway (stopped, or still committing)
    went on appending to the logs a new gateway had opened: records of requests never sent,
    adopted and never closed. The writer keeps the home lock's descriptor: no gateway starts
    until it has exited."""
    from aiid_proxy import control
    from aiid_proxy.audit.service import AuditWriterProcess
    from aiid_proxy.control import HomeLock
    from aiid_proxy.errors import ConfigError

    monkeypatch.setattr(control, "LOCK_WAIT", 0.2)
    gateway = HomeLock(short_home)
    writer = AuditWriterProcess(keep_fds=gateway.fds)
    try:
        gateway.release()  # the gateway is gone; its writer is not
        with pytest.raises(ConfigError, match="audit writer process of a gateway that was killed"):
            HomeLock(short_home)
    finally:
        writer.close()
    HomeLock(short_home).release()  # the writer exited: free again


def test_a_zombie_gateway_is_not_a_running_one() -> None:
    """[AP] A killed gateway its parent had not reaped yet was named as running."""
    import subprocess
    import time

    from aiid_proxy.control import _alive

    p = subprocess.Popen(["true"])
    try:
        for _ in range(3000):  # bounded (30 s): until it has exited, not waited for
            with open(f"/proc/{p.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        else:
            pytest.fail("the child never exited")
        assert not _alive(p.pid)  # a zombie
    finally:
        p.wait()
    assert not _alive(p.pid)
    assert _alive(os.getpid())
