"""End to end in a real terminal: `aiid run` with its live console in tmux, agents (the openai
SDK, from background threads) through it, the screen read back with `tmux capture-pane`, held
requests answered with `aiid approve`, with console keys, and by the approval timeout."""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import openai
import pytest
from e2e import (
    OPENAI_CANARY,
    TMUX,
    TmuxGateway,
    aiid,
    make_home,
    read_audit,
    start_console_gateway,
)
from standin import StandIn

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed"),
]

WIDTH, HEIGHT = 100, 30
ACME = """\
version: 1
tenant: acme
default: deny
approval: {timeout: 60s}
rules:
  - id: no-gpt-4o
    providers: [openai]
    models: ["gpt-4o"]
    effect: deny
    reason: "gpt-4o is not allowed here"
  - id: small-models
    providers: [openai]
    models: ["gpt-4o-mini*"]
    effect: allow
  - id: o1-needs-human
    providers: [openai]
    models: ["o1*"]
    effect: approve
    reason: "o1 needs a human"
overrides:
  - id: INC-4711
    agents: [support-7]
    models: [gpt-4o]
    effect: allow
    approved_by: alice@example.com
    expires: 2099-01-01T00:00:00Z
"""
QUICK = """\
version: 1
tenant: quick
default: deny
approval: {timeout: 2s}
rules:
  - id: o1-needs-human
    providers: [openai]
    models: ["o1*"]
    effect: approve
"""
# a row of the pending approvals: "│ >  41s req_...  acme/ttl-bot openai/o1-mini [rule]"
PENDING_ROW = re.compile(r"^│ [> ]\s*\d+(?:m\d+)?s (req_[0-9a-f]{24})\s+([^/\s]+)/(\S+)\s")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TmuxGateway]:
    root = tmp_path_factory.mktemp("con")
    si = StandIn(root)
    si.start()
    home = make_home(root, {"acme": {"openai": OPENAI_CANARY}, "quick": {"openai": OPENAI_CANARY}})
    policies = root / "policies"
    policies.mkdir()
    (policies / "acme.yaml").write_text(ACME)
    (policies / "quick.yaml").write_text(QUICK)
    g = start_console_gateway(home, policies, si.port, si.ca_path, width=WIDTH, height=HEIGHT)
    try:
        yield g
    finally:
        g.stop()
        si.stop()


@pytest.fixture(scope="module")
def agents(gw: TmuxGateway) -> Iterator[Callable[[str, str, str], Future[tuple[int, str]]]]:
    """agents(tenant, agent, model) -> a Future of (HTTP status, request id) from a thread."""
    pool = ThreadPoolExecutor(max_workers=8)
    tls = ssl.create_default_context(cafile=str(gw.ca))
    http_client = openai.DefaultHttpxClient(proxy=gw.proxy, verify=tls, trust_env=False)

    def call(tenant: str, agent: str, model: str) -> tuple[int, str]:
        client = openai.OpenAI(
            api_key=gw.token(tenant, agent), max_retries=0, timeout=90, http_client=http_client
        )
        try:
            r = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}]
            )
            return r.status_code, r.headers["x-aiid-request-id"]
        except openai.APIStatusError as e:
            return e.status_code, e.response.headers.get("x-aiid-request-id", "")

    def submit(tenant: str, agent: str, model: str) -> Future[tuple[int, str]]:
        return pool.submit(call, tenant, agent, model)

    try:
        yield submit
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        http_client.close()


def pending_on_screen(screen: str) -> dict[str, str]:
    """{"tenant/agent": request id} for every pending approval the console shows."""
    out = {}
    for line in screen.splitlines():
        m = PENDING_ROW.search(line)
        if m:
            out[f"{m.group(2)}/{m.group(3)}"] = m.group(1)
    return out


def wait_pending(gw: TmuxGateway, who: str, not_: frozenset[str] = frozenset()) -> str:
    """The request id of ``who``'s pending approval once it is on screen (not one of ``not_``,
    answered ones a frame may still show)."""
    screen = gw.wait_screen(
        lambda s: pending_on_screen(s).get(who, "") not in {"", *not_}, what=f"{who} pending"
    )
    return pending_on_screen(screen)[who]


def whole_frame(screen: str, width: int, height: int) -> bool:
    """The console's frame exactly fills a width x height screen (it has drawn completely)."""
    lines = screen.splitlines()
    return (
        len(lines) == height
        and lines[0].startswith("╭")
        and lines[0].endswith("╮")
        and lines[-1].startswith("╰")
        and lines[-1].endswith("╯")
        and all(len(line) == width for line in lines)
    )


def audit(gw: TmuxGateway, tenant: str, request_id: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(gw.home, tenant) if r["request_id"] == request_id]


def test_allowed_denied_approved_and_timed_out(
    gw: TmuxGateway, agents: Callable[..., Future[tuple[int, str]]]
) -> None:
    allowed = agents("acme", "support-1", "gpt-4o-mini")
    denied = agents("acme", "support-1", "gpt-4o")
    held = agents("acme", "coder-1", "o1-mini")
    timed_out = agents("quick", "coder-2", "o1-mini")
    rid = wait_pending(gw, "acme/coder-1")
    assert rid in gw.screen()  # the id to copy is on screen, whole
    r = aiid(gw.home, "approve", "acme", rid, "--as", "alice")
    assert r.stdout.strip() == f"approved {rid}"
    results = [f.result(timeout=60) for f in (allowed, denied, held, timed_out)]
    assert [status for status, _ in results] == [200, 403, 200, 403]
    assert results[2][1] == rid
    screen = gw.wait_screen(
        lambda s: "approved" in s and "denied by timeout" in s and "pending" not in s,
        what="the answered approvals",
    )
    flows = [line for line in screen.splitlines() if "gpt-4o" in line or "o1-mini" in line]
    assert any("support-1" in f and "allow" in f and "200" in f for f in flows), screen
    assert any("support-1" in f and "deny" in f and "no-gpt-4o" in f for f in flows), screen
    assert "gpt-4o is not allowed here" in screen  # the denial's reason
    # audited, with who decided
    held, approval = audit(gw, "acme", rid)[:2]
    assert held["event"] == "held"
    assert approval["event"] == "approval" and approval["status"] == 200
    assert json.loads(approval["detail"])["decided_by"] == "alice"
    quick = audit(gw, "quick", results[3][1])
    assert [r["event"] for r in quick] == ["held", "approval", "deny"]
    assert json.loads(quick[1]["detail"])["decided_by"] == "timeout"


def test_approval_for_a_ttl_lets_the_next_request_through_without_asking(
    gw: TmuxGateway, agents: Callable[..., Future[tuple[int, str]]]
) -> None:
    first = agents("acme", "ttl-bot", "o1-mini")
    rid = wait_pending(gw, "acme/ttl-bot")
    aiid(gw.home, "approve", "acme", rid, "--ttl", "10m", "--as", "alice")
    assert first.result(timeout=60)[0] == 200
    status, rid2 = agents("acme", "ttl-bot", "o1-mini").result(timeout=60)
    assert status == 200
    rows = audit(gw, "acme", rid2)
    assert [r["event"] for r in rows] == ["request", "response"]  # never held
    assert json.loads(rows[0]["detail"])["approved_by"] == "alice"
    # another model is a different approval
    other = agents("acme", "ttl-bot", "o1-preview")
    rid3 = wait_pending(gw, "acme/ttl-bot", not_=frozenset({rid}))
    aiid(gw.home, "deny", "acme", rid3, "--reason", "not this one")
    assert other.result(timeout=60)[0] == 403


@pytest.mark.parametrize(
    ("keys", "status", "verdict"),
    [
        pytest.param(["a"], 200, "approved", id="a-approves"),
        pytest.param(["d"], 403, "denied", id="d-denies"),
    ],
)
def test_console_keys_answer_the_pending_request(
    gw: TmuxGateway,
    agents: Callable[..., Future[tuple[int, str]]],
    keys: list[str],
    status: int,
    verdict: str,
) -> None:
    agent = f"key-bot-{verdict}"
    fut = agents("acme", agent, "o1-mini")
    rid = wait_pending(gw, f"acme/{agent}")
    gw.send_keys(*keys)
    assert fut.result(timeout=60) == (status, rid)
    held, approval = audit(gw, "acme", rid)[:2]
    assert (held["event"], approval["event"]) == ("held", "approval")
    assert json.loads(approval["detail"])["decided_by"].endswith("(console)")
    assert verdict in approval["reason"]


def test_override_decides_is_shown_and_named_in_the_audit_record(
    gw: TmuxGateway, agents: Callable[..., Future[tuple[int, str]]]
) -> None:
    assert "override INC-4711" in gw.screen()
    status, rid = agents("acme", "support-7", "gpt-4o").result(timeout=60)
    assert status == 200
    assert agents("acme", "support-8", "gpt-4o").result(timeout=60)[0] == 403
    rows = audit(gw, "acme", rid)
    assert [r["event"] for r in rows] == ["request", "response"]
    assert all(json.loads(r["detail"])["override"] == "INC-4711" for r in rows)
    assert all(r["rule"] == "INC-4711" for r in rows)


def test_console_follows_the_terminal_size(gw: TmuxGateway) -> None:
    for width, height in ((80, 24), (160, 40), (WIDTH, HEIGHT)):
        gw.resize(width, height)
        screen = gw.wait_screen(
            lambda s, w=width, h=height: whole_frame(s, w, h), what=f"a {width}x{height} frame"
        )
        lines = screen.splitlines()
        assert len(lines) <= height and max(len(line) for line in lines) <= width


def test_zz_log_lines_go_to_the_file_audit_verifies_and_q_quits(
    gw: TmuxGateway, agents: Callable[..., Future[tuple[int, str]]]
) -> None:
    """Last: it stops the gateway."""
    assert agents("quick", "log-bot", "o1-mini").result(timeout=60)[0] == 403  # times out
    for tenant in ("acme", "quick"):
        out = aiid(gw.home, "audit", "verify", tenant).stdout
        assert out.startswith("OK "), out
    log = gw.log()
    assert "console on" in log and "held for approval" in log
    assert "held for approval" not in gw.screen()  # log lines never scroll over the view
    pid = gw.pid()
    assert pid is not None
    gw.send_keys("q")
    assert gw.wait_exit(20), gw.screen()
    assert gw.exit_status(pid) == 0
    # back on the normal screen: the view is gone
    gw.wait_screen(lambda s: "╭" not in s and "╰" not in s, what="the normal screen")
