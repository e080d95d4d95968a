"""The policy model: frozen dataclasses, nothing mutable, nothing parsed at decision time.

A :class:`Policy` is built by :mod:`aiid_proxy.policy.loader` from a YAML file (or directly, in
tests); constructing one compiles it (globs into regexes, hours into minute ranges) through
:mod:`aiid_proxy.policy.engine`, so :meth:`Policy.decide` never parses anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from aiid_proxy.policy.engine import Engine

Effect = Literal["allow", "deny", "approve"]
EFFECTS: tuple[Effect, ...] = ("allow", "deny", "approve")
TraceKind = Literal["rule", "override", "region", "path"]

DEFAULT_RULE_ID = "default"
REGION_RULE_ID = "region"
DEFAULT_APPROVAL_TIMEOUT = 120.0


@dataclass(frozen=True)
class LimitSpec:
    """Rate limits over a sliding minute; ``None`` = that dimension is not limited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class BudgetSpec:
    """Spending caps in USD; ``None`` = that period is not capped."""

    usd_per_day: float | None = None
    usd_per_month: float | None = None


@dataclass(frozen=True)
class InjectSpec:
    """What an allowing host rule injects upstream: ``header: [scheme ]<vault secret>``."""

    header: str
    scheme: str | None
    secret: str


@dataclass(frozen=True)
class Range:
    """An inclusive numeric bound; a missing side is unbounded."""

    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Hours:
    """A daily window ``start``-``end`` (minutes after local midnight, end exclusive) in ``tz``.

    ``start > end`` wraps midnight. ``tz`` is ``"UTC"`` or an IANA zone name.
    """

    start: int
    end: int
    tz: str
    text: str


@dataclass(frozen=True)
class When:
    """Conditions that must all hold; ``None`` = no condition on that field."""

    max_tokens: Range | None = None
    temperature: Range | None = None
    top_p: Range | None = None
    n: Range | None = None
    stream: bool | None = None
    tools: bool | None = None
    hours: Hours | None = None


@dataclass(frozen=True)
class Rule:
    """One rule. Match lists are ``None`` when omitted (= match everything on that axis).

    A rule with ``hosts`` governs non-LLM egress only; one without governs LLM calls only.
    """

    id: str
    effect: Effect
    reason: str | None = None
    agents: tuple[str, ...] | None = None
    providers: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    hosts: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    when: When | None = None
    inject: InjectSpec | None = None
    line: int | None = field(default=None, compare=False)

    @property
    def is_host_rule(self) -> bool:
        return self.hosts is not None


@dataclass(frozen=True)
class Override(Rule):
    """A time-bounded human decision; active while ``now < expires`` (unix seconds)."""

    approved_by: str = field(default="", kw_only=True)
    expires: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class RequestContext:
    """Everything a decision looks at. ``provider is None`` means non-LLM egress.

    ``host`` is the host name without port (matched case-insensitively); ``path`` may carry a
    query string, which is ignored, and is matched after dot segments are resolved. A context
    whose ``tenant`` is not the policy's tenant is denied (rule ``default``).
    """

    tenant: str
    agent: str
    provider: str | None
    model: str | None
    host: str
    method: str
    path: str
    now: float
    region: str | None = None  # the provider's region
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    tools: bool = False
    tenant_region: str | None = None  # `aiid tenant add --region`: enforced with the policy's


@dataclass(frozen=True)
class Decision:
    effect: Effect
    rule_id: str
    reason: str
    override: str | None = None
    inject: InjectSpec | None = None
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT


@dataclass(frozen=True)
class RuleTrace:
    rule_id: str
    kind: TraceKind
    matched: bool
    effect: Effect
    why: str


@dataclass(frozen=True)
class Explanation:
    decision: Decision
    traces: tuple[RuleTrace, ...]

    def lines(self) -> list[str]:
        """A human-readable rendering, one line per trace, decision first."""
        d = self.decision
        out = [f"decision: {d.effect} (rule {d.rule_id}): {d.reason}"]
        for t in self.traces:
            mark = "MATCH" if t.matched else "skip "
            out.append(f"  {mark} {t.kind:<8} {t.rule_id:<24} {t.effect:<7} {t.why}")
        return out


@dataclass(frozen=True)
class Policy:
    """One tenant's compiled policy. Build with the loader or directly; both compile."""

    tenant: str
    version: int = 1
    region: str | None = None
    record_prompts: bool = False
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT
    rules: tuple[Rule, ...] = ()
    overrides: tuple[Override, ...] = ()
    tenant_limit: LimitSpec | None = None
    agent_limits: tuple[tuple[str, LimitSpec], ...] = ()
    tenant_budget: BudgetSpec | None = None
    agent_budgets: tuple[tuple[str, BudgetSpec], ...] = ()
    source_hash: str = ""
    source: str = ""
    _engine: Engine = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # imported here because the engine imports this module
        from aiid_proxy.policy.engine import Engine

        object.__setattr__(self, "_engine", Engine(self))

    def decide(self, ctx: RequestContext) -> Decision:
        """The decision for ``ctx``: region, active overrides, explicit deny, first allow/approve,
        default deny, in that order."""
        return self._engine.decide(ctx)

    def explain(self, ctx: RequestContext) -> Explanation:
        """The decision with a trace of every rule and override and why it (did not) match."""
        return self._engine.explain(ctx)

    def agent_limit(self, agent: str) -> LimitSpec | None:
        """The rate limit of the first ``limits.agents`` glob matching ``agent``."""
        return self._engine.agent_limit(agent)

    def agent_budget(self, agent: str) -> BudgetSpec | None:
        """The budget of the first ``budgets.agents`` glob matching ``agent``."""
        return self._engine.agent_budget(agent)
