"""The operator console: the pure renderer at every size, the state it is fed from real gateway
events, the keys, and the redraw policy that keeps an idle gateway idle."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TENANT, write_policies
from rich.cells import cell_len
from rich.console import Console

from addons.console import ConsoleAddon, KeyReader
from addons.runtime import Runtime
from aiid_proxy.clock import FakeClock
from aiid_proxy.console import (
    MAX_FLOWS,
    ConsoleState,
    FlowRow,
    OverrideRow,
    PendingRow,
    TenantInfo,
    parse_keys,
    render,
    tenant_info,
)
from aiid_proxy.control import Answer
from aiid_proxy.errors import RequestRefused
from aiid_proxy.gateway import FlowState, Gateway, Target
from aiid_proxy.providers import Usage

NOW = 1_800_000_000.0
RID = "req_0123456789abcdef01234567"  # the length of a real request id


# -- states -------------------------------------------------------------------------------------
def full_state(n_flows: int = 60, n_pending: int = 3) -> ConsoleState:
    """Everything the console can show, more of it than fits on any screen."""
    s = ConsoleState(listen="127.0.0.1:8080", started=NOW - 600)
    s.tenants = {
        "acme": tenant_info("3f2a9c1b2d4e5f60718293a4", NOW - 300, (42, "9ab3c4d5e6f70819" * 4)),
        "other": tenant_info(None, None, (0, "0" * 64)),
    }
    for i in range(n_flows):
        decision = ("allow", "deny", "approved", "error")[i % 4]
        s.add_flow(
            FlowRow(
                NOW - 100 + i,
                f"req_{i:024x}",
                "acme",
                f"support-{i % 5}",
                "openai",
                "gpt-4o-mini-2024-07-18",
                decision,
                "support-small-models",
                "403" if decision == "deny" else "200",
                123.4,
                "812/64",
                0.00042,
            )
        )
    for i in range(8):
        s.add_denial(NOW - 50 + i, "acme", f"support-{i}", "no-gpt-4o", "gpt-4o is not allowed")
    s.add_policy_event(NOW - 30, True, "acme: loaded 3f2a9c1b2d4e")
    s.add_policy_event(NOW - 20, False, "acme: edit refused: acme.yaml:12: unknown key 'efect'")
    for i in range(n_pending):
        s.add_pending(
            PendingRow(
                RID[:-1] + str(i),
                "acme",
                f"coder-{i}",
                "openai/o1-mini",
                "big-needs-human",
                NOW - 5,
                NOW + 42 + i,
            )
        )
    s.overrides = [
        OverrideRow(
            "acme", "INC-4711", "allow", "agents=support-7 models=gpt-4o", NOW + 86400, "alice"
        )
    ]
    for i in range(6):
        c = s.counters("acme", f"support-{i}")
        c.requests, c.denials, c.tokens, c.rate_limited = 10 * i + 1, i, 100 * i, i % 2
        if i == 3:
            c.last_limited = NOW - 5
    return s


def screen(state: ConsoleState, width: int, height: int, *, color: bool = False) -> list[str]:
    con = Console(
        file=io.StringIO(),
        width=width,
        height=height,
        color_system="truecolor" if color else None,
        force_terminal=color,
        legacy_windows=False,
    )
    con.print(render(state, width, height, now=NOW))
    out = con.file.getvalue()  # type: ignore[attr-defined]
    return out.splitlines()


SIZES = [
    pytest.param(80, 24, id="80x24"),
    pytest.param(100, 30, id="100x30"),
    pytest.param(120, 24, id="120x24"),
    pytest.param(160, 40, id="160x40"),
    pytest.param(200, 60, id="200x60"),
    pytest.param(40, 10, id="40x10"),
    pytest.param(60, 12, id="60x12"),
    pytest.param(20, 4, id="20x4"),
    pytest.param(19, 3, id="19x3-too-small"),
    pytest.param(5, 1, id="5x1"),
]
STATES = [
    pytest.param(lambda: ConsoleState(listen="127.0.0.1:8080", started=NOW), id="empty"),
    pytest.param(full_state, id="full"),
    pytest.param(lambda: full_state(n_flows=1, n_pending=12), id="many-pending"),
    pytest.param(lambda: full_state(n_flows=MAX_FLOWS + 50, n_pending=0), id="many-flows"),
]


@pytest.mark.parametrize(("width", "height"), SIZES)
@pytest.mark.parametrize("make", STATES)
@pytest.mark.parametrize("color", [False, True], ids=["plain", "color"])
def test_render_fits_the_terminal_exactly(
    make: Callable[[], ConsoleState], width: int, height: int, color: bool
) -> None:
    lines = screen(make(), width, height, color=color)
    assert 1 <= len(lines) <= height
    if not color:
        assert max(cell_len(line) for line in lines) <= width
        if width >= 20 and height >= 4:
            assert len(lines) == height  # the panel fills the screen: nothing below scrolls


@pytest.mark.parametrize(
    ("width", "height", "must_show"),
    [
        pytest.param(
            80,
            24,
            [
                "127.0.0.1:8080",
                "acme",
                "3f2a9c1b2d4e",  # policy hash
                "42:9ab3c4d5e6f7",  # audit head
                "pending approvals (3)",
                RID[:-1] + "0",  # whole request id, to copy into `aiid approve`
                "43s",  # time left
                "INC-4711",
                "gpt-4o-mini",
                "approved",
                "support-small",
                "812/64",
                "refused",
                "unknown key",
                "gpt-4o is not allowed",
                "LIMITED",
            ],
            id="80x24",
        ),
        pytest.param(
            160,
            40,
            [
                "pending approvals (3)",
                RID[:-1] + "2",
                "override INC-4711 acme allow agents=support-7 models=gpt-4o",
                "support-small-models",
                "provider",
                "$0.0004",  # spend per flow
                "req_00000000000000000000003b",  # request ids in the flows table
                "acme/support-5",  # per-agent counters beside the events
                "LIMITED (1x429)",
                "ok (1x429)",
                "unknown key 'efect'",
            ],
            id="160x40",
        ),
        pytest.param(40, 10, [RID[:-1] + "0", "pending approvals"], id="40x10"),
    ],
)
def test_render_shows_what_an_operator_needs(width: int, height: int, must_show: list[str]) -> None:
    text = "\n".join(screen(full_state(), width, height))
    missing = [m for m in must_show if m not in text]
    assert not missing, f"missing {missing} in\n{text}"


def test_wide_screen_shows_more_than_the_narrow_one() -> None:
    narrow = "\n".join(screen(full_state(), 80, 24))
    wide = "\n".join(screen(full_state(), 160, 24))
    for only_wide in ("provider", "request", "spend", "req_00000000000000000000003b"):
        assert only_wide in wide and only_wide not in narrow


def test_the_newest_flows_are_shown() -> None:
    text = "\n".join(screen(full_state(n_flows=60, n_pending=0), 160, 40))
    assert "req_00000000000000000000003b" in text  # the last of 60
    assert "req_000000000000000000000000" not in text  # the first scrolled off


def test_selected_pending_is_marked_and_more_than_fit_are_counted() -> None:
    s = full_state(n_pending=12)
    s.move_selection(1)
    lines = screen(s, 80, 24)
    marked = [line for line in lines if "> " in line and "req_" in line]
    assert len(marked) == 1 and RID[:-1] + "1" in marked[0]
    assert any("and" in line and "more" in line for line in lines)


def test_empty_state_tells_how_to_connect_an_agent() -> None:
    s = ConsoleState(listen="127.0.0.1:9999", started=NOW)
    s.hints = ["no requests yet. Agents need:", "  HTTPS_PROXY=http://127.0.0.1:9999"]
    text = "\n".join(screen(s, 80, 24))
    assert "HTTPS_PROXY=http://127.0.0.1:9999" in text and "no tenants" in text
    s.add_flow(FlowRow(NOW, RID, "acme", "bot", "openai", "gpt-4o-mini", "allow", "r", "200"))
    assert "HTTPS_PROXY" not in "\n".join(screen(s, 80, 24))


@pytest.mark.parametrize("width", [80, 120])
def test_a_tenant_whose_edit_was_refused_says_so_until_it_validates(width: int) -> None:
    s = ConsoleState(listen="127.0.0.1:8080", started=NOW)
    s.tenants["acme"] = TenantInfo(policy="abc123def456", loaded=NOW, head="3:aa", refused=True)
    s.tenants["beta"] = TenantInfo(policy="0123456789ab", loaded=NOW, head="1:bb")
    lines = screen(s, width, 24)
    assert any("acme" in line and "EDIT REFUSED" in line for line in lines), lines
    assert not any("beta" in line and "EDIT REFUSED" in line for line in lines)
    # [AL] the load time of the policy in force sits by its hash, not after "EDIT REFUSED",
    # where it read as the time of the refusal
    (acme,) = [line for line in lines if "acme" in line and "EDIT REFUSED" in line]
    assert acme.index("abc123def456") < acme.index("@") < acme.index("EDIT REFUSED")


@pytest.mark.parametrize("width", [60, 80, 120, 160])
def test_a_killed_flow_says_kill_in_its_status_column(width: int) -> None:
    s = ConsoleState(listen="127.0.0.1:8080", started=NOW)
    s.add_flow(FlowRow(NOW, RID, "acme", "bot", "openai", "gpt-4o-mini", "error", "-", "kill"))
    row = [line for line in screen(s, width, 24) if " error " in line]
    assert len(row) == 1 and " kill" in row[0], row


@pytest.mark.parametrize(("width", "height"), [(80, 24), (160, 40)])
def test_control_characters_from_agents_never_reach_the_terminal(width: int, height: int) -> None:
    """Model names come from agents' requests: an escape sequence in one must not drive the
    operator's terminal."""
    evil = "gpt\x1b]0;pwned\x07\x1b[2J\rx"
    s = ConsoleState(listen="127.0.0.1:8080", started=NOW)
    s.add_flow(FlowRow(NOW, RID, "acme", "bot", "openai", evil, "allow", "r", "200"))
    s.add_pending(PendingRow(RID, "acme", "bot", f"openai/{evil}", "r", NOW, NOW + 9))
    s.add_denial(NOW, "acme", "bot", "r", f"model {evil} is not allowed")
    text = "\n".join(screen(s, width, height, color=True))
    assert "\x1b]" not in text and "\x07" not in text and "\x1b[2J" not in text
    assert "\r" not in text and "pwned" in text


def test_tiny_terminal_still_says_something_useful() -> None:
    assert "3 pending" in screen(full_state(), 19, 3)[0]


# -- state --------------------------------------------------------------------------------------
def test_selection_moves_within_the_pending_and_falls_back_to_the_oldest() -> None:
    s = full_state(n_pending=3)
    ids = list(s.pending)
    assert s.selected_pending() is not None and s.selected_pending().request_id == ids[0]
    for delta, want in [(1, 1), (1, 2), (1, 2), (-5, 0)]:
        s.move_selection(delta)
        assert s.selected == ids[want]
    s.move_selection(2)
    s.resolve(ids[2], NOW, True, "alice")
    assert s.selected is None and s.selected_pending().request_id == ids[0]
    assert s.events[-1].kind == "approval" and "approved by alice" in s.events[-1].text


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: s.set_tenants({"acme": tenant_info("ff", 1.0, (1, "aa"))}), id="t"),
        pytest.param(lambda s: s.set_overrides([]), id="overrides"),
    ],
)
def test_unchanged_static_parts_do_not_count_as_changes(change: Callable[..., None]) -> None:
    s = full_state()
    change(s)
    v = s.version
    change(s)  # the same again: nothing to redraw
    assert s.version == v


@pytest.mark.parametrize(
    ("data", "keys"),
    [
        pytest.param(b"a", ["a"], id="a"),
        pytest.param(b"Ad", ["A", "d"], id="A-d"),
        pytest.param(b"\x1b[A\x1b[Bjk", ["up", "down", "j", "k"], id="arrows"),
        pytest.param(b"\x1bOA", ["up"], id="app-mode-arrow"),
        pytest.param(b"\x1b[1;5Cq", ["q"], id="other-escape-skipped"),
        pytest.param(b"xyz\n\x03 ", [], id="others-ignored"),
        pytest.param(b"\xff\xfea", ["a"], id="junk-bytes"),
    ],
)
def test_parse_keys(data: bytes, keys: list[str]) -> None:
    assert parse_keys(data) == keys


# -- the addon, fed by a real gateway --------------------------------------------------------------
CHAT = "/v1/chat/completions"


def _chat(model: str) -> bytes:
    return (
        b'{"model": "' + model.encode() + b'", "max_tokens": 16, '
        b'"messages": [{"role": "user", "content": "hi"}]}'
    )


class Fed:
    """A ConsoleAddon on a real library gateway; requests go through the real stages."""

    def __init__(self, gw: Gateway, issue: Callable[..., str], console: Console) -> None:
        self.gw = gw
        self.issue = issue
        self.rt = Runtime(gateway=gw)
        self.stopped = 0
        self.addon = ConsoleAddon(
            self.rt,
            gw.home,
            "127.0.0.1:8080",
            console=console,
            user="tester",
            shutdown=self._stop,
        )

    def _stop(self) -> None:
        self.stopped += 1

    def flow(self, agent: str, model: str) -> FlowState:
        st = self.gw.new_flow(Target("https", "api.openai.com", 443, "POST", CHAT))
        self.gw.identify(st, [("authorization", f"Bearer {self.issue(agent)}")])
        self.gw.route(st, {"content-type": "application/json"}, _chat(model))
        return st

    def request(self, agent: str, model: str) -> FlowState:
        """Through every stage to the response; a refusal is recorded like the addons do."""
        st = self.flow(agent, model)
        try:
            self.gw.decide(st)
            self.gw.reserve(st)
        except RequestRefused as r:
            fut = self.gw.record_refusal(st, r)
            assert fut is not None
            fut.result(10)
            return st
        self.gw.audit_done(st, self.gw.audit_request(st).result(10))
        self.gw.inject(st)
        fut = self.gw.record_response(st, 200, Usage(7, 5))
        assert fut is not None
        fut.result(10)
        return st


@pytest.fixture
def fed(gateway: Gateway, issue: Callable[..., str]) -> Iterator[Fed]:
    yield Fed(gateway, issue, Console(file=io.StringIO(), width=100, height=30))


def test_a_chain_that_fails_its_check_at_start_is_shown(fed: Fed) -> None:
    text = (
        "audit log of tenant acme does not verify: mac mismatch at seq 2 (aiid audit verify acme)"
    )
    fed.gw.emit("audit", {"tenant": "acme", "text": text})
    assert [(e.kind, e.text) for e in fed.addon.state.events] == [("refused", text)]
    assert any("does not verify" in line for line in screen(fed.addon.state, 140, 30))


def test_events_from_the_gateway_fill_flows_counters_and_denials(fed: Fed) -> None:
    fed.request("support-1", "gpt-4o-mini")
    denied = fed.request("support-1", "gpt-4o")
    s = fed.addon.state
    assert [(r.agent, r.model, r.decision, r.rule, r.status) for r in s.flows] == [
        ("support-1", "gpt-4o-mini", "allow", "small-models", "200"),
        ("support-1", "gpt-4o", "deny", "no-gpt-4o", "403"),
    ]
    assert s.flows[0].tokens == "7/5" and s.flows[1].request_id == denied.request_id
    c = s.agents[(TENANT, "support-1")]
    assert (c.requests, c.denials, c.tokens, c.rate_limited) == (2, 1, 12, 0)
    assert s.events[-1].kind == "deny" and "gpt-4o is not enabled" in s.events[-1].text


def test_a_429_marks_the_agent_rate_limited(fed: Fed) -> None:
    for _ in range(3):  # limited-* may make 2 requests a minute
        fed.request("limited-1", "gpt-4o-mini")
    c = fed.addon.state.agents[(TENANT, "limited-1")]
    assert (c.requests, c.denials, c.rate_limited) == (3, 1, 1)
    assert c.last_limited is not None
    assert fed.addon.state.flows[-1].status == "429"
    assert "LIMITED" in "\n".join(screen(fed.addon.state, 100, 30))


def test_policy_reload_and_refused_edit_are_shown_with_the_error(
    fed: Fed, policies_dir: Path
) -> None:
    s = fed.addon.state
    (policies_dir / f"{TENANT}.yaml").write_text("version: 1\ntenant: acme\nbogus: 1\n")
    fed.gw.policies.refresh()
    assert s.policy_events[-1].kind == "refused"
    assert "bogus" in s.policy_events[-1].text and "last good policy" in s.policy_events[-1].text
    text = "\n".join(screen(s, 100, 30))
    assert "refused" in text and "bogus" in text
    write_policies(policies_dir, approval_timeout="5s")
    fed.gw.policies.refresh()
    assert s.policy_events[-1].kind == "policy" and "loaded" in s.policy_events[-1].text


def test_pending_and_resolved_come_from_the_gateway(fed: Fed) -> None:
    st = fed.flow("coder-1", "o1-mini")
    fed.gw.decide(st)
    fed.gw.emit("pending", {"state": st, "deadline": NOW + 60})
    row = fed.addon.state.pending[st.request_id]
    assert (row.tenant, row.agent, row.target, row.rule) == (
        TENANT,
        "coder-1",
        "openai/o1-mini",
        "big-needs-human",
    )
    assert st.request_id in "\n".join(screen(fed.addon.state, 80, 24))
    fut = fed.gw.record_approval(st, False, "timeout", "denied by timeout")
    assert fut is not None
    fut.result(10)
    assert st.request_id not in fed.addon.state.pending
    assert "denied by timeout" in fed.addon.state.events[-1].text


OVERRIDES = """\
overrides:
  - id: INC-1
    agents: [support-7]
    models: [gpt-4o]
    effect: allow
    approved_by: alice@example.com
    expires: 2027-02-01T00:00:00Z
  - id: OLD-2
    agents: [support-8]
    effect: allow
    approved_by: bob@example.com
    expires: 2027-01-01T00:00:00Z
"""


def test_active_overrides_are_shown_until_they_expire(
    make_gateway: Callable[..., Gateway],
    issue: Callable[..., str],
    fake_clock: FakeClock,
    tmp_path: Path,
) -> None:
    pol = write_policies(tmp_path / "pol")
    p = pol / f"{TENANT}.yaml"
    p.write_text(p.read_text() + OVERRIDES)
    f = Fed(make_gateway(pol), issue, Console(file=io.StringIO(), width=100, height=30))
    f.addon.refresh_static()
    s = f.addon.state
    assert [(o.id, o.scope, o.approved_by) for o in s.overrides] == [
        ("INC-1", "agents=support-7 models=gpt-4o", "alice@example.com")
    ]
    text = "\n".join(screen(s, 100, 30))
    assert "INC-1" in text and "2027-02-01 00:00Z" in text and "OLD-2" not in text
    v = s.version
    fake_clock.advance(17 * 86400)  # past 2027-02-01
    f.addon.refresh_static()
    assert s.overrides == [] and s.version > v


def test_header_has_policy_hash_load_time_and_audit_head(fed: Fed) -> None:
    fed.request("support-1", "gpt-4o-mini")
    fed.addon.refresh_static()
    info = fed.addon.state.tenants[TENANT]
    pol = fed.gw.policy_for(TENANT)
    assert pol is not None and info.policy == pol.source_hash[:12]
    seq, mac = fed.gw.tenant(TENANT).audit.head()
    assert info.head == f"{seq}:{mac[:12]}" and seq >= 2
    assert info.loaded == fed.gw.policies.loaded_at(TENANT)
    assert any(e.kind == "policy" for e in fed.addon.state.policy_events)  # loaded at start


# -- keys -----------------------------------------------------------------------------------------
async def _hold_two(fed: Fed) -> list[Any]:
    """Two held requests, as the policy stage holds them, shown as pending in the console."""
    held = []
    for agent in ("coder-1", "coder-2"):
        st = fed.flow(agent, "o1-mini")
        d = fed.gw.decide(st)
        key = (TENANT, agent, "openai", "o1-mini", d.rule_id)
        held.append(fed.rt.broker.hold(TENANT, st.request_id, key, 60))
        fed.gw.emit("pending", {"state": st, "deadline": time.time() + 60})
    return held


@pytest.mark.parametrize(
    ("keys", "answered", "approved", "ttl"),
    [
        pytest.param(["a"], 0, True, None, id="a-approves-the-oldest"),
        pytest.param(["d"], 0, False, None, id="d-denies-the-oldest"),
        pytest.param(["down", "a"], 1, True, None, id="select-then-approve"),
        pytest.param(["j", "j", "k", "d"], 0, False, None, id="select-back-then-deny"),
        pytest.param(["A"], 0, True, 600.0, id="A-approves-for-10m"),
        pytest.param(["d", "a"], 0, False, None, id="d-then-a-answers-the-next"),
    ],
)
def test_keys_answer_the_selected_or_oldest_pending_approval(
    fed: Fed, keys: list[str], answered: int, approved: bool, ttl: float | None
) -> None:
    async def go() -> list[Any]:
        held = await _hold_two(fed)
        fed.addon.handle_keys(keys)
        return held

    held = asyncio.run(go())
    ans: Answer = held[answered].future.result()
    assert (ans.approved, ans.by, ans.ttl) == (approved, "tester (console)", ttl)
    assert held[answered].request_id not in fed.addon.state.pending  # off the list at once
    other = held[1 - answered]
    if len([k for k in keys if k in "aAd"]) == 1:
        assert not other.future.done()
    else:  # the second answer went to the next request, not to the answered one again
        assert other.future.result().approved is True
    if ttl:
        assert fed.rt.broker.granted(held[answered].key) == "tester (console)"
        assert "approved for 10m" in fed.addon.state.events[-1].text


def test_a_key_with_nothing_pending_or_an_answered_request_says_so(fed: Fed) -> None:
    fed.addon.handle_key("a")
    assert fed.addon.state.events[-1].text == "nothing is waiting for approval"

    async def go() -> None:
        held = await _hold_two(fed)
        held[0].future.set_result(Answer(False, "timeout"))  # timed out meanwhile
        fed.addon.handle_key("a")

    asyncio.run(go())
    s = fed.addon.state
    assert s.events[-1].kind == "console" and "already answered" in s.events[-1].text
    assert len(s.pending) == 1  # the stale row is gone, the other one stays


def test_q_stops_the_gateway(fed: Fed) -> None:
    fed.addon.handle_keys(parse_keys(b"q"))
    assert fed.stopped == 1


def test_key_reader_uses_cbreak_and_restores_the_terminal() -> None:
    master, slave = os.openpty()
    got: list[list[str]] = []
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON

    async def go() -> tuple[int, int]:
        reader = KeyReader(got.append, fd=slave)
        assert reader.start(asyncio.get_running_loop())
        during = termios.tcgetattr(slave)[3]
        os.write(master, b"a\x1b[B")
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        reader.stop()
        return during, termios.tcgetattr(slave)[3]

    try:
        during, after = asyncio.run(go())
    finally:
        os.close(master)
        os.close(slave)
    assert got == [["a", "down"]]
    assert not during & termios.ICANON and not during & termios.ECHO
    assert after == before[3]


def test_key_reader_is_off_without_a_terminal(tmp_path: Path) -> None:
    with (tmp_path / "f").open("w+") as f:

        async def go() -> bool:
            return KeyReader(lambda keys: None, fd=f.fileno()).start(asyncio.get_running_loop())

        assert asyncio.run(go()) is False


# -- redraw policy: no work when idle ----------------------------------------------------------
def test_idle_console_does_not_redraw_and_changes_do(fed: Fed) -> None:
    a = fed.addon
    assert a.tick(0.0)  # the first frame
    # half a minute of ticks at the refresh rate with nothing happening: no redraw
    assert not any(a.tick(0.5 * i) for i in range(1, 60))
    fed.request("support-1", "gpt-4o-mini")
    assert a.tick(30.0)  # a flow: redraw
    assert not a.tick(30.5)
    assert a.tick(30.0 + 60.0)  # the slow heartbeat (overrides may have expired)
    assert a.draws == 3


def test_pending_countdown_redraws_once_a_second(fed: Fed) -> None:
    a = fed.addon
    a.state.add_pending(PendingRow(RID, TENANT, "bot", "openai/o1", "r", NOW, NOW + 60))
    assert a.tick(0.0)
    assert [a.tick(t) for t in (0.5, 1.0, 1.5, 2.0)] == [False, True, False, True]


def test_resize_redraws(gateway: Gateway, issue: Callable[..., str]) -> None:
    con = Console(file=io.StringIO(), width=100, height=30)
    f = Fed(gateway, issue, con)
    assert f.addon.tick(0.0) and not f.addon.tick(0.5)
    con.size = (80, 24)  # type: ignore[assignment]
    assert f.addon.tick(1.0)


# -- lifecycle ----------------------------------------------------------------------------------
@pytest.fixture
def root_handlers() -> Iterator[None]:
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for h in list(root.handlers):
        if h not in before:
            root.removeHandler(h)
            h.close()
    for h in before:
        if h not in root.handlers:
            root.addHandler(h)
    logging.captureWarnings(False)


def test_with_a_terminal_the_view_runs_and_logs_go_to_a_file(
    gateway: Gateway, issue: Callable[..., str], root_handlers: None
) -> None:
    out = io.StringIO()
    con = Console(file=out, width=80, height=24, force_terminal=True)
    f = Fed(gateway, issue, con)

    async def go() -> None:
        f.addon.running()
        assert f.addon._live is not None
        logging.getLogger("aiid.test").warning("a line for the log file")
        f.addon.done()
        assert f.addon._live is None

    asyncio.run(go())
    log = (gateway.home.root / "gateway.log").read_text()
    assert "a line for the log file" in log
    assert (gateway.home.root / "gateway.log").stat().st_mode & 0o777 == 0o600  # private
    assert "a line for the log file" not in out.getvalue()
    assert "127.0.0.1:8080" in out.getvalue()  # the view was drawn


def test_without_a_terminal_there_is_no_view(
    gateway: Gateway, issue: Callable[..., str], root_handlers: None
) -> None:
    f = Fed(gateway, issue, Console(file=io.StringIO(), width=80, height=24))

    async def go() -> None:
        f.addon.running()
        assert f.addon._live is None and f.addon._task is None
        f.addon.done()

    asyncio.run(go())
    assert not (gateway.home.root / "gateway.log").exists()


# -- cost -----------------------------------------------------------------------------------------
def test_full_state_render_is_bounded_work() -> None:
    """The state is bounded, so a frame is too (timing is measured by the bench script)."""
    s = full_state(n_flows=5 * MAX_FLOWS, n_pending=50)
    assert len(s.flows) == MAX_FLOWS
    for _ in range(500):
        s.add_denial(NOW, "acme", "x", "r", "why")
    assert len(s.events) <= 50
    assert len(screen(s, 160, 50)) == 50


def test_the_first_screen_gives_an_agent_all_three_lines(tmp_path: Path) -> None:
    from addons.console import agent_hints
    from aiid_proxy.admin import add_tenant, init_home
    from aiid_proxy.home import Home

    home = Home(tmp_path / "h")
    init_home(home, env={})
    assert add_tenant(home, "demo")
    hints = agent_hints(home, "127.0.0.1:8080")
    assert hints[1:] == [
        "  HTTPS_PROXY=http://127.0.0.1:8080",
        f"  SSL_CERT_FILE={home.ca_cert_path}",
        "  OPENAI_API_KEY=$(aiid token issue demo demo-agent)   (an agent token, not a key)",
    ]
    # `make run` left the token it printed in a file: the hint names that file, and never
    # shows the token (the console took the screen the token was printed on) (pass [W])
    home.demo_token_path.write_text("eyJ.secret.sig\n")
    hints = agent_hints(home, "127.0.0.1:8080")
    assert hints[3] == (
        f"  OPENAI_API_KEY=$(cat {home.demo_token_path})   (the token `make run` printed)"
    )
    assert "eyJ" not in "".join(hints)
    assert add_tenant(home, "acme")  # several tenants: the user picks one
    assert agent_hints(home, "h:1")[3].startswith(
        "  OPENAI_API_KEY=$(aiid token issue TENANT AGENT)"
    )


@pytest.mark.parametrize("width", [120, 130, 140, 150])
def test_agent_names_stay_readable_beside_the_events(width: int) -> None:
    # Between 115 and 150 columns the counters took the agents table's two fifths: the
    # agent's name got 6 cells ("dem…"), or none with spend shown.
    s = full_state(n_flows=4, n_pending=0)
    for i in range(3):
        c = s.counters("acme", f"support-{i}")
        c.requests, c.denials, c.tokens, c.spend_usd = 10 + i, i, 1234, 0.5
    lines = screen(s, width, 40)
    header = next(line for line in lines if " req " in line and " deny" in line)
    assert header.index(" req ") - header.index("agent") >= 16, header
    assert any("acme/support-1 " in line and " 11 " in line for line in lines), "\n".join(lines)


def test_the_flows_table_keeps_tenant_and_agent_whole_at_120_columns() -> None:
    # the request id (28 cells) and spend squeezed them to "ac…" and "suppo…"
    lines = screen(full_state(), 120, 40)
    rows = [line for line in lines if " approved " in line]
    assert rows and all(" acme " in r and " support-" in r for r in rows), "\n".join(lines)
    wide = screen(full_state(), 160, 40)
    assert any("req_0000" in line for line in wide)  # room enough: the id is back


@pytest.mark.parametrize(
    ("ts", "shown"),
    [
        pytest.param(1_800_000_000.0, "2027-01-15 08:00Z", id="whole-minute"),
        pytest.param(1_800_000_000.0 + 48, "2027-01-15 08:00:48Z", id="seconds-shown"),
    ],
)
def test_an_override_ending_within_a_minute_is_shown_to_the_second(ts: float, shown: str) -> None:
    from aiid_proxy.console.render import _date

    assert _date(ts) == shown
