"""The operator console: state fed by gateway events, rendered with rich.

Rendering is a pure function of :class:`ConsoleState` (and the time), so it is tested into a
StringIO console at any size. The screen is laid out by line budget: every section renders one
line per item (no wrapping), and the sections share the terminal's height in priority order
(tenants, pending approvals, overrides, events, agents, then the flows table fills the rest),
so the view fits any terminal from 40x10 up and never scrolls. The state is bounded (recent rows
only) and is updated from the event loop thread (policy events from the watcher thread only
append to a deque).
"""

from __future__ import annotations

from aiid_proxy.console.keys import KEYS, parse_keys
from aiid_proxy.console.render import render
from aiid_proxy.console.state import (
    MAX_EVENTS,
    MAX_FLOWS,
    AgentCounters,
    ConsoleState,
    EventRow,
    FlowRow,
    OverrideRow,
    PendingRow,
    TenantInfo,
    tenant_info,
)

__all__ = [
    "KEYS",
    "MAX_EVENTS",
    "MAX_FLOWS",
    "AgentCounters",
    "ConsoleState",
    "EventRow",
    "FlowRow",
    "OverrideRow",
    "PendingRow",
    "TenantInfo",
    "parse_keys",
    "render",
    "tenant_info",
]
