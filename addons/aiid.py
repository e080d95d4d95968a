"""Entry point for teams that already run mitmproxy::

    mitmdump -s addons/aiid.py --set aiid_home=/path/.aiid --set aiid_policies=/path/policies

Each stage is added as a top-level addon (not as a child of this script), so an exception in
one stage can never skip the last gate.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx, hooks

from addons.pipeline import make_addons


class _Install:
    def __init__(self) -> None:
        self.parts = make_addons()

    def load(self, loader: Any) -> None:
        manager = ctx.master.addons
        manager.add(*self.parts)
        # The chain was configured before these were added: configure them now, once.
        everything = set(ctx.options.keys())
        for part in self.parts:
            manager.invoke_addon_sync(part, hooks.ConfigureHook(everything))


addons = [_Install()]
