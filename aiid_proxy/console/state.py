"""The console's state: bounded recent rows fed by gateway events (see the package doc)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

MAX_FLOWS = 200
MAX_EVENTS = 50
WIDE = 120  # from this many columns: more flow columns, agents beside the events
LIMITED_FOR_S = 60.0  # an agent shows as rate-limited this long after its last 429
MIN_WIDTH = 20
MIN_HEIGHT = 4
KEYS_HELP = " a approve | A approve 10m | d deny | up/down select | q quit "


@dataclass
class FlowRow:
    at: float
    request_id: str
    tenant: str
    agent: str
    provider: str
    model: str
    decision: str  # allow | approved | deny | error
    rule: str
    status: str
    latency_ms: float | None = None
    tokens: str = ""
    spend_usd: float | None = None


@dataclass
class AgentCounters:
    requests: int = 0
    denials: int = 0
    tokens: int = 0
    rate_limited: int = 0
    spend_usd: float = 0.0
    last_limited: float | None = None


@dataclass(frozen=True)
class PendingRow:
    request_id: str
    tenant: str
    agent: str
    target: str  # provider/model
    rule: str
    since: float
    deadline: float


@dataclass(frozen=True)
class OverrideRow:
    tenant: str
    id: str
    effect: str
    scope: str  # "agents=support-7 models=gpt-4o"
    until: float
    approved_by: str


@dataclass(frozen=True)
class EventRow:
    at: float
    kind: str  # deny | error | approval | policy | refused | console
    text: str


@dataclass(frozen=True)
class TenantInfo:
    policy: str | None = None  # short source hash of the policy in force
    loaded: float | None = None
    head: str | None = None  # "seq:mac-prefix"
    refused: bool = False  # the file's latest edit was refused: an older policy is in force


@dataclass
class ConsoleState:
    listen: str
    started: float = field(default_factory=time.time)
    tenants: dict[str, TenantInfo] = field(default_factory=dict)
    flows: deque[FlowRow] = field(default_factory=lambda: deque(maxlen=MAX_FLOWS))
    events: deque[EventRow] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    policy_events: deque[EventRow] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    pending: dict[str, PendingRow] = field(default_factory=dict)
    answered: dict[str, PendingRow] = field(default_factory=dict)  # until `resolved` comes
    selected: str | None = None
    agents: dict[tuple[str, str], AgentCounters] = field(default_factory=dict)
    overrides: list[OverrideRow] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)  # shown until the first request
    version: int = 0

    def changed(self) -> None:
        self.version += 1

    def counters(self, tenant: str, agent: str) -> AgentCounters:
        key = (tenant, agent)
        c = self.agents.get(key)
        if c is None:
            c = self.agents[key] = AgentCounters()
        return c

    def add_flow(self, row: FlowRow) -> None:
        self.flows.append(row)
        self.changed()

    def add_event(self, at: float, kind: str, text: str) -> None:
        self.events.append(EventRow(at, kind, text))
        self.changed()

    def add_denial(self, at: float, tenant: str, agent: str, rule: str, reason: str) -> None:
        self.add_event(at, "deny", f"{tenant}/{agent} [{rule}] {reason}")

    def add_policy_event(self, at: float, ok: bool, text: str) -> None:
        self.policy_events.append(EventRow(at, "policy" if ok else "refused", text))
        self.changed()

    def add_pending(self, row: PendingRow) -> None:
        self.pending[row.request_id] = row
        self.changed()

    def mark_answered(self, request_id: str) -> None:
        """Answered from here: off the list at once (the gateway's `resolved` event follows)."""
        row = self.pending.pop(request_id, None)
        if row is not None:
            self.answered[request_id] = row
            while len(self.answered) > MAX_EVENTS:
                del self.answered[next(iter(self.answered))]
        if self.selected == request_id:
            self.selected = None
        self.changed()

    def resolve(self, request_id: str, at: float, approved: bool, by: str) -> None:
        row = self.pending.pop(request_id, None) or self.answered.pop(request_id, None)
        if self.selected == request_id:
            self.selected = None
        who = f" {row.tenant}/{row.agent} {row.target}" if row else ""
        verdict = "approved" if approved else "denied"
        self.add_event(at, "approval", f"{request_id}{who} {verdict} by {by}")

    def selected_pending(self) -> PendingRow | None:
        """The selected pending approval, else the oldest one."""
        if self.selected is not None and self.selected in self.pending:
            return self.pending[self.selected]
        return next(iter(self.pending.values()), None)

    def move_selection(self, delta: int) -> None:
        ids = list(self.pending)
        if not ids:
            self.selected = None
            return
        cur = self.selected_pending()
        i = ids.index(cur.request_id) if cur is not None else 0
        self.selected = ids[max(0, min(len(ids) - 1, i + delta))]
        self.changed()

    def set_tenants(self, tenants: dict[str, TenantInfo]) -> None:
        if tenants != self.tenants:
            self.tenants = tenants
            self.changed()

    def set_overrides(self, overrides: list[OverrideRow]) -> None:
        if overrides != self.overrides:
            self.overrides = overrides
            self.changed()


def tenant_info(
    policy_hash: str | None,
    loaded_at: float | None,
    head: tuple[int, str] | None,
    refused: bool = False,
) -> TenantInfo:
    return TenantInfo(
        policy=policy_hash[:12] if policy_hash else None,
        loaded=loaded_at,
        head=f"{head[0]}:{head[1][:12]}" if head else None,
        refused=refused,
    )
