"""A hook table for mitmproxy's AddonManager: same semantics, a fraction of the cost.

mitmproxy dispatches every event by walking the whole addon chain: for each of the ~45 addons
of ``aiid run`` it builds a ``safecall`` context manager, an ``invoke_addon`` coroutine, two
generators and an ``args()`` list (``dataclasses.fields``), whether or not the addon has the
hook, and ``handle_lifecycle`` does it twice per flow event (the event, then ``update``). That
is ~1.9 µs per addon per event, ~0.7 ms of a request's ~1.6 ms in plain mitmdump here.

:class:`HookTable` keeps, per hook name, the top-level addons that implement it, computed on
first use and again whenever the chain changes (``add`` grows ``chain``, ``remove`` and
``clear`` replace it: the table remembers the list object itself and its length). What it
does not change:

- order: the chain's order, each top-level addon's subtree in ``traverse`` order;
- errors: an exception in one addon is logged as mitmproxy logs it and the next addon runs
  (``LastGate`` always sees the flow), ``OptionsError`` escapes, ``AddonHalt`` stops the
  event except for addons marked :data:`ALWAYS` (``LastGate``: nothing halts past it);
- dynamic addons: a top-level addon with an ``addons`` attribute (script loader, scripts)
  is walked at every event by mitmproxy's own ``invoke_addon``, as before;
- sync ``trigger`` (configure, done) is mitmproxy's own.

``tests/test_dispatch.py`` runs the same scenarios through both managers and compares.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import AddonManager, cut_traceback

logger = logging.getLogger("mitmproxy.addonmanager")

# An addon with this attribute true still gets an event after an earlier addon raised
# AddonHalt (mitmproxy would skip it): the gateway's last gate, so that a script loaded with
# `--set scripts=...` cannot halt a request past it.
ALWAYS = "aiid_always"

# (addon, bound hook) for a static addon; (addon, None) for one mitmproxy must walk itself
_Entry = tuple[Any, Callable[..., Any] | None]


class HookTable(AddonManager):
    """Drop-in for :class:`mitmproxy.addonmanager.AddonManager` (see the module doc)."""

    _hook_chain: list[Any] | None = None  # the chain list the table was built from (held,
    _hook_len = -1  # so its id is never reused) and its length then
    _hook_table: dict[str, list[_Entry]]

    def _entries(self, name: str) -> list[_Entry]:
        chain = self.chain
        if chain is not self._hook_chain or len(chain) != self._hook_len:
            self._hook_table = {}
            self._hook_chain = chain
            self._hook_len = len(chain)
        entries = self._hook_table.get(name)
        if entries is None:
            entries = []
            for addon in chain:
                if hasattr(addon, "addons"):
                    entries.append((addon, None))
                    continue
                func = getattr(addon, name, None)
                if not func or isinstance(func, types.ModuleType):
                    continue  # no hook; a module of that name is skipped as mitmproxy does
                entries.append((addon, func if callable(func) else None))
            self._hook_table[name] = entries
        return entries

    async def trigger_event(self, event: hooks.Hook) -> None:
        entries = self._entries(event.name)
        if not entries:
            return
        args: list[Any] | None = None
        halted = False
        for addon, func in entries:
            if halted and not getattr(addon, ALWAYS, False):
                continue
            try:
                if func is None:
                    await self.invoke_addon(addon, event)
                    continue
                if args is None:
                    args = event.args()
                res = func(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
            except exceptions.AddonHalt:
                halted = True  # the rest is skipped, as mitmproxy does, but for ALWAYS addons
            except exceptions.OptionsError:
                raise
            except Exception:
                _log_addon_error()


def _log_addon_error() -> None:
    # exactly mitmproxy's safecall() report
    etype, value, tb = sys.exc_info()
    tb = cut_traceback(tb, "invoke_addon_sync")
    tb = cut_traceback(tb, "invoke_addon")
    assert etype is not None and value is not None
    logger.error(f"Addon error: {value}", exc_info=(etype, value, tb))


def install(manager: AddonManager) -> HookTable:
    """Turns a master's existing manager (its addons, its options subscription) into a
    :class:`HookTable` in place; the class adds behaviour only, no state to initialise."""
    manager.__class__ = HookTable
    assert isinstance(manager, HookTable)
    return manager
