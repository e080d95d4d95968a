"""addons/dispatch.py: the hook table must behave exactly as mitmproxy's AddonManager.

Every scenario runs through a stock manager and through one turned into a HookTable; the
recorded calls (and logged errors) must be identical.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from mitmproxy import exceptions, hooks, master, options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow

from addons import dispatch


@dataclass
class PingHook(hooks.Hook):
    name = "ping"  # type: ignore[misc]
    value: Any


class Rec:
    def __init__(self, log: list[str], tag: str) -> None:
        self.log, self.tag = log, tag
        self.name = tag

    def ping(self, value: Any) -> None:
        self.log.append(f"{self.tag}:{value}")


class AsyncRec(Rec):
    async def ping(self, value: Any) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.log.append(f"{self.tag}:async:{value}")


class Boom(Rec):
    def ping(self, value: Any) -> None:
        self.log.append(f"{self.tag}:boom")
        raise RuntimeError("kaput")


class Halt(Rec):
    def ping(self, value: Any) -> None:
        self.log.append(f"{self.tag}:halt")
        raise exceptions.AddonHalt()


class BadOption(Rec):
    def ping(self, value: Any) -> None:
        self.log.append(f"{self.tag}:options")
        raise exceptions.OptionsError("bad option")


class NoHook:
    def __init__(self, tag: str) -> None:
        self.name = tag


class Container(Rec):
    """Has children, like mitmproxy's script loader: walked at every event."""

    def __init__(self, log: list[str], tag: str, children: list[Any]) -> None:
        super().__init__(log, tag)
        self.addons = children


class ModuleNamed:
    def __init__(self, tag: str) -> None:
        self.name = tag
        self.ping = types.ModuleType("ping")


class NotCallable:
    def __init__(self, tag: str) -> None:
        self.name = tag
        self.ping = 42

    def __repr__(self) -> str:
        return f"NotCallable({self.name})"


Scenario = Callable[[AddonManager, list[str]], Any]


async def _fire(m: AddonManager, value: Any = 1) -> None:
    await m.trigger_event(PingHook(value))


async def basic(m: AddonManager, log: list[str]) -> None:
    m.add(Rec(log, "a"), NoHook("n"), AsyncRec(log, "b"), Rec(log, "c"))
    await _fire(m)
    await _fire(m, 2)


async def error_then_next(m: AddonManager, log: list[str]) -> None:
    m.add(Rec(log, "a"), Boom(log, "b"), Rec(log, "c"))
    await _fire(m)


async def halt_stops(m: AddonManager, log: list[str]) -> None:
    m.add(Rec(log, "a"), Halt(log, "b"), Rec(log, "c"))
    await _fire(m)


async def options_error_escapes(m: AddonManager, log: list[str]) -> None:
    m.add(Rec(log, "a"), BadOption(log, "b"), Rec(log, "c"))
    try:
        await _fire(m)
    except exceptions.OptionsError as e:
        log.append(f"raised:{e}")


async def added_later(m: AddonManager, log: list[str]) -> None:
    m.add(Rec(log, "a"))
    await _fire(m)
    m.add(Rec(log, "b"))
    await _fire(m, 2)


async def removed_later(m: AddonManager, log: list[str]) -> None:
    b = Rec(log, "b")
    m.add(Rec(log, "a"), b, Rec(log, "c"))
    await _fire(m)
    m.remove(b)
    await _fire(m, 2)


async def remove_then_add_same_length(m: AddonManager, log: list[str]) -> None:
    b = Rec(log, "b")
    m.add(Rec(log, "a"), b)
    await _fire(m)
    m.remove(b)
    m.add(Rec(log, "z"))
    await _fire(m, 2)


async def nested_children_change(m: AddonManager, log: list[str]) -> None:
    kids: list[Any] = [Rec(log, "k1")]
    m.add(Rec(log, "a"), Container(log, "box", kids), Rec(log, "c"))
    await _fire(m)
    kids.append(AsyncRec(log, "k2"))
    await _fire(m, 2)
    kids.insert(0, Boom(log, "k0"))  # an error in a child ends that subtree only
    await _fire(m, 3)


async def module_and_non_callable(m: AddonManager, log: list[str]) -> None:
    m.add(Rec(log, "a"), ModuleNamed("mod"), NotCallable("nc"), Rec(log, "c"))
    await _fire(m)


async def flow_event_and_update(m: AddonManager, log: list[str]) -> None:
    class Flowy:
        name = "flowy"

        def request(self, flow: Any) -> None:
            log.append(f"request:{flow.request.path}")

        def update(self, flows: Any) -> None:
            log.append(f"update:{len(flows)}")

    m.add(Flowy())
    f = tflow.tflow()
    await m.handle_lifecycle(HttpRequestHook(f))


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(basic, id="order-sync-async-missing"),
        pytest.param(error_then_next, id="error-logged-next-runs"),
        pytest.param(halt_stops, id="addon-halt-stops"),
        pytest.param(options_error_escapes, id="options-error-escapes"),
        pytest.param(added_later, id="added-after-first-event"),
        pytest.param(removed_later, id="removed-after-first-event"),
        pytest.param(remove_then_add_same_length, id="same-length-new-chain"),
        pytest.param(nested_children_change, id="nested-addons-walked-live"),
        pytest.param(module_and_non_callable, id="module-skipped-non-callable-error"),
        pytest.param(flow_event_and_update, id="lifecycle-update"),
    ],
)
def test_same_as_mitmproxy(scenario: Scenario, caplog: pytest.LogCaptureFixture) -> None:
    def run(fast: bool) -> tuple[list[str], list[str]]:
        async def go() -> list[str]:
            m = master.Master(options.Options())
            if fast:
                assert isinstance(dispatch.install(m.addons), dispatch.HookTable)
            log: list[str] = []
            try:
                await scenario(m.addons, log)
            finally:
                m._legacy_log_events.uninstall()
            return log

        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
            calls = asyncio.run(go())
        errors = [r.getMessage() for r in caplog.records if r.name == "mitmproxy.addonmanager"]
        return calls, errors

    stock = run(False)
    fast = run(True)
    assert stock[0], "the scenario called nothing: it tests nothing"
    assert fast == stock


def test_error_is_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        m = master.Master(options.Options())
        dispatch.install(m.addons)
        log: list[str] = []
        m.addons.add(Boom(log, "b"))
        try:
            await _fire(m.addons)
        finally:
            m._legacy_log_events.uninstall()

    with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
        asyncio.run(go())
    (rec,) = [r for r in caplog.records if r.name == "mitmproxy.addonmanager"]
    assert rec.getMessage() == "Addon error: kaput"
    assert rec.exc_info is not None and rec.exc_info[0] is RuntimeError


def test_runner_master_uses_the_table(tmp_path: Any) -> None:
    from addons.runner import build_master
    from aiid_proxy.admin import init_home
    from aiid_proxy.home import Home

    home = Home(tmp_path / "home")
    init_home(home)
    (tmp_path / "pol").mkdir()

    async def go() -> list[str]:
        m, rt, _view = build_master(home, tmp_path / "pol", "127.0.0.1", 0, [], console=False)
        try:
            assert isinstance(m.addons, dispatch.HookTable)
            return [type(a).__name__ for a, _f in m.addons._entries("request")]
        finally:
            await rt.done()
            m._legacy_log_events.uninstall()

    # the gateway's own stages are in the table for `request`, LastGate after them
    names = asyncio.run(go())
    assert "LastGate" in names and names.index("LastGate") > names.index("InjectStage")


def test_gateway_freezes_its_start_up_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """`aiid run` collects, then freezes what start-up built (full collections skip it)."""
    import gc

    from addons import runner

    calls: list[str] = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect") or 0)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    runner.tune_gc()
    assert calls == ["collect", "freeze"]


class Always(Rec):
    aiid_always = True


def test_addon_halt_never_skips_an_always_addon(caplog: pytest.LogCaptureFixture) -> None:
    """mitmproxy skips every addon after an AddonHalt; the table still runs those marked
    ALWAYS (the gateway's last gate), and only those."""

    async def go() -> list[str]:
        m = master.Master(options.Options())
        dispatch.install(m.addons)
        log: list[str] = []
        m.addons.add(Rec(log, "a"), Halt(log, "h"), Rec(log, "skipped"), Always(log, "gate"))
        try:
            await _fire(m.addons)
        finally:
            m._legacy_log_events.uninstall()
        return log

    assert asyncio.run(go()) == ["a:1", "h:halt", "gate:1"]


def test_a_halting_script_cannot_take_a_request_past_the_last_gate() -> None:
    """A script (`--set scripts=...` loads before the pipeline) that raises AddonHalt on
    `request`: the gate still runs and kills the flow, which carries no verdict."""
    from mitmproxy.proxy.layers.http import HttpRequestHook

    from addons.pipeline import LastGate
    from addons.runtime import Runtime

    class HaltingScript:
        name = "halting"

        def request(self, flow: Any) -> None:
            raise exceptions.AddonHalt()

    async def go() -> Any:
        m = master.Master(options.Options())
        dispatch.install(m.addons)
        m.addons.add(HaltingScript(), LastGate(Runtime()))
        f = tflow.tflow()
        f.live = True
        try:
            await m.addons.handle_lifecycle(HttpRequestHook(f))
        finally:
            m._legacy_log_events.uninstall()
        return f

    f = asyncio.run(go())
    assert f.error is not None and f.error.msg == "Connection killed."


def test_the_gates_a_halt_must_not_skip_are_marked() -> None:
    from addons.pipeline import LastGate
    from addons.response import ResponseFilter

    for cls in (LastGate, ResponseFilter):  # the way out, and the scrub of what comes back
        assert getattr(cls, dispatch.ALWAYS) is True
