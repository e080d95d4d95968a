"""The operator console: state fed by gateway events, rendered with rich.

Rendering is a pure function of :class:`ConsoleState`, so it is tested into a StringIO console
at any width. The state is bounded (recent rows only) and updated from the event loop thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

MAX_FLOWS = 200
MAX_EVENTS = 50


@dataclass
class FlowRow:
    at: float
    request_id: str
    tenant: str
    agent: str
    provider: str
    model: str
    decision: str
    rule: str
    status: str
    latency_ms: float | None = None
    tokens: str = ""


@dataclass
class AgentCounters:
    requests: int = 0
    denials: int = 0
    tokens: int = 0
    rate_limited: int = 0


@dataclass
class ConsoleState:
    listen: str
    started: float = field(default_factory=time.time)
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    flows: deque[FlowRow] = field(default_factory=lambda: deque(maxlen=MAX_FLOWS))
    denials: deque[tuple[float, str, str, str, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_EVENTS)
    )
    policy_events: deque[tuple[float, bool, str]] = field(
        default_factory=lambda: deque(maxlen=MAX_EVENTS)
    )
    pending: dict[str, tuple[float, str, str, str, float]] = field(default_factory=dict)
    agents: dict[tuple[str, str], AgentCounters] = field(default_factory=dict)
    overrides: list[tuple[str, str, str]] = field(default_factory=list)
    version: int = 0

    def counters(self, tenant: str, agent: str) -> AgentCounters:
        key = (tenant, agent)
        c = self.agents.get(key)
        if c is None:
            c = self.agents[key] = AgentCounters()
        return c

    def add_flow(self, row: FlowRow) -> None:
        self.flows.append(row)
        self.version += 1

    def add_denial(self, at: float, tenant: str, agent: str, rule: str, reason: str) -> None:
        self.denials.append((at, tenant, agent, rule, reason))
        self.version += 1

    def add_policy_event(self, at: float, ok: bool, text: str) -> None:
        self.policy_events.append((at, ok, text))
        self.version += 1


def _t(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


_STYLE = {"allow": "green", "deny": "bold red", "error": "magenta", "approve": "yellow"}


def render(state: ConsoleState, width: int = 80, height: int = 24) -> RenderableType:
    """The whole screen. Row counts adapt to ``height`` so it never scrolls."""
    wide = width >= 120
    head = Table.grid(expand=True)
    head.add_column()
    head.add_column(justify="right")
    head.add_row(
        Text.assemble(("aiid-proxy ", "bold cyan"), f"listening {state.listen}"),
        Text(f"up {int(time.time() - state.started)}s"),
    )
    for name, info in sorted(state.tenants.items()):
        pol = info.get("policy") or "no policy"
        head_s = info.get("head") or "-"
        loaded = info.get("loaded")
        loaded_s = f" @{_t(loaded)}" if isinstance(loaded, (int, float)) else ""
        head.add_row(
            Text(f"tenant {name}: policy {pol}{loaded_s}", overflow="ellipsis"),
            Text(f"audit head {head_s}", overflow="ellipsis"),
        )

    budget = max(3, height - 8 - len(state.tenants))
    n_pending = min(len(state.pending), 4)
    n_events = min(len(state.denials) + len(state.policy_events), 4 if wide else 3)
    n_flows = max(1, budget - n_pending - n_events - (2 if n_pending else 0) - 2)

    flows = Table(expand=True, box=None, pad_edge=False, header_style="bold")
    flows.add_column("time", no_wrap=True)
    if wide:
        flows.add_column("tenant", no_wrap=True)
    flows.add_column("agent", no_wrap=True, overflow="ellipsis", max_width=14)
    flows.add_column("model", no_wrap=True, overflow="ellipsis", max_width=22)
    flows.add_column("decision", no_wrap=True)
    flows.add_column("rule", no_wrap=True, overflow="ellipsis", max_width=18)
    flows.add_column("st", no_wrap=True, justify="right")
    flows.add_column("ms", no_wrap=True, justify="right")
    if wide:
        flows.add_column("tokens", no_wrap=True, justify="right")
        flows.add_column("request", no_wrap=True)
    for r in list(state.flows)[-n_flows:]:
        model = f"{r.provider}/{r.model}" if r.model else r.provider
        cells: list[RenderableType] = [_t(r.at)]
        if wide:
            cells.append(r.tenant)
        cells += [
            r.agent,
            model,
            Text(r.decision, style=_STYLE.get(r.decision, "")),
            r.rule,
            r.status,
            "" if r.latency_ms is None else f"{r.latency_ms:.0f}",
        ]
        if wide:
            cells += [r.tokens, r.request_id]
        flows.add_row(*cells)

    parts: list[RenderableType] = [head, flows]
    if state.pending:
        pend = Table(
            expand=True,
            box=None,
            title="pending approvals",
            title_justify="left",
            title_style="bold yellow",
        )
        pend.add_column("request")
        pend.add_column("agent")
        pend.add_column("model")
        pend.add_column("left", justify="right")
        now = time.time()
        for rid, (_at, tenant, agent, model, deadline) in list(state.pending.items())[:4]:
            pend.add_row(rid, f"{tenant}/{agent}", model, f"{max(0, int(deadline - now))}s")
        parts.append(pend)
    lines: list[Text] = []
    for at, tenant, agent, rule, reason in list(state.denials)[-n_events:]:
        lines.append(
            Text.assemble(
                (f"{_t(at)} deny ", "red"),
                f"{tenant}/{agent} [{rule}] {reason}",
                overflow="ellipsis",
                no_wrap=True,
            )
        )
    for at, ok, text in list(state.policy_events)[-2:]:
        lines.append(
            Text(
                f"{_t(at)} {text}",
                style="green" if ok else "bold red",
                overflow="ellipsis",
                no_wrap=True,
            )
        )
    if wide and state.agents:
        ag = Table(expand=True, box=None, title="agents", title_justify="left", title_style="bold")
        for col in ("agent", "requests", "denials", "tokens", "429s"):
            ag.add_column(col, justify="right" if col != "agent" else "left")
        for (tenant, agent), c in sorted(state.agents.items())[:6]:
            ag.add_row(
                f"{tenant}/{agent}",
                str(c.requests),
                str(c.denials),
                str(c.tokens),
                str(c.rate_limited),
            )
        parts.append(ag)
    if state.overrides:
        lines.append(
            Text(
                "overrides: " + ", ".join(f"{o[0]} until {o[2]}" for o in state.overrides),
                style="yellow",
                overflow="ellipsis",
                no_wrap=True,
            )
        )
    if lines:
        parts.append(Group(*lines[-(n_events + 2) :]))
    return Panel(Group(*parts), padding=(0, 1), height=height, width=width)


def tenant_info(
    policy_hash: str | None, loaded_at: float | None, head: tuple[int, str] | None
) -> Mapping[str, Any]:
    return {
        "policy": policy_hash[:12] if policy_hash else None,
        "loaded": loaded_at,
        "head": f"{head[0]}:{head[1][:12]}" if head else None,
    }
