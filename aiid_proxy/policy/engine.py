"""The compiled decision engine behind :class:`~aiid_proxy.policy.model.Policy`.

Everything is compiled once, when a policy is built: globs become anchored regexes, hours become
minute ranges, every rule's :class:`Decision` is built in advance. :meth:`Engine.decide` parses
nothing; it caches which rules can match a given agent, (agent, provider) and
(agent, provider, model), so a decision only evaluates the dynamic parts (``when``, override
expiry; host, method and path for egress) of a handful of candidate rules.

:meth:`Engine.explain` is a deliberately separate, plain walk over every rule that says why each
one did or did not match; tests check that it always reaches the same decision as ``decide``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from aiid_proxy.policy.match import (
    CompiledWhen,
    compile_globs,
    decode_separators,
    fmt_ts,
    normalize_path,
    path_readings,
    upper_escapes,
)
from aiid_proxy.policy.model import (
    DEFAULT_RULE_ID,
    REGION_RULE_ID,
    BudgetSpec,
    Decision,
    Explanation,
    LimitSpec,
    Override,
    RequestContext,
    Rule,
    RuleTrace,
)

if TYPE_CHECKING:
    from aiid_proxy.policy.model import Policy

DEFAULT_REASON = "no rule allows this request"
_CACHE_MAX = 8192

# The stricter of two decisions: deny, then approve, then allow.
_STRICTNESS = {"deny": 0, "approve": 1, "allow": 2}


# -- rules ---------------------------------------------------------------------------------------


def _opt(
    globs: tuple[str, ...] | None, *, lower: bool = False, any_case: bool = False
) -> re.Pattern[str] | None:
    return None if globs is None else compile_globs(globs, lower=lower, any_case=any_case)


def _listed(globs: tuple[str, ...] | None) -> str:
    return "[" + ", ".join(repr(g) for g in globs or ()) + "]"


class _CompiledRule:
    """A rule (or override) with its globs compiled and its decision built in advance."""

    __slots__ = (
        "agents",
        "decision",
        "decoded_paths",
        "expires",
        "hosts",
        "is_host",
        "methods",
        "models",
        "paths",
        "providers",
        "rule",
        "when",
    )

    def __init__(self, rule: Rule, approval_timeout: float) -> None:
        self.rule = rule
        self.is_host = rule.hosts is not None
        self.agents = _opt(rule.agents)
        self.providers = _opt(rule.providers)
        # Model names in any case: a deny of "gpt-4o" must also stop "GPT-4o", which a
        # provider (or an OpenAI-compatible server) may well treat as the same model.
        self.models = _opt(rule.models, any_case=True)
        self.hosts = _opt(rule.hosts, lower=True)
        self.methods = None if rule.methods is None else frozenset(m.upper() for m in rule.methods)
        # A deny's paths match in any letter case: a server that ignores case in paths
        # (many do) would otherwise serve /ADMIN past a deny of /admin*.
        # escapes spelled in upper case, as normalize_path spells them in a request's path
        paths = None if rule.paths is None else tuple(upper_escapes(g) for g in rule.paths)
        self.paths = _opt(paths, any_case=rule.effect == "deny")
        # for the reading of a server that decodes %2F: a glob naming "%2F" means "/" there
        # (GitLab's "/api/v4/projects/group%2Fproject" must still match it)
        decoded = (  # upper-cased again: decoding "%253a" leaves "%3a", a request "%3A"
            None if paths is None else tuple(upper_escapes(decode_separators(g)) for g in paths)
        )
        self.decoded_paths = (
            self.paths if decoded == paths else _opt(decoded, any_case=rule.effect == "deny")
        )
        if rule.effect == "deny" and decoded is not None and decoded != paths:
            # a deny naming "%2F" also stops the path spelled with "/" (the same resource to
            # a server that decodes it)
            self.paths = _opt((*(paths or ()), *decoded), any_case=True)
        self.when = None if rule.when is None else CompiledWhen(rule.when)
        self.expires = rule.expires if isinstance(rule, Override) else float("inf")
        self.decision = _decision_for(rule, approval_timeout)

    def agent_match(self, agent: str) -> bool:
        return self.agents is None or self.agents.fullmatch(agent) is not None

    def provider_match(self, provider: str) -> bool:
        return self.providers is None or self.providers.fullmatch(provider) is not None

    def model_match(self, model: str | None) -> bool:
        """A request without a model matches only rules that leave ``models`` out."""
        return self.models is None or (
            model is not None and self.models.fullmatch(model) is not None
        )

    def host_match(self, host: str, method: str, path: str, decoded: bool = False) -> bool:
        """Host, method and path, for a host rule (checked on every request); ``decoded``: the
        path is the second reading (path_readings), matched by the globs read alike."""
        paths = self.decoded_paths if decoded else self.paths
        return (
            self.hosts is not None
            and self.hosts.fullmatch(host) is not None
            and (self.methods is None or method in self.methods)
            and (paths is None or paths.fullmatch(path) is not None)
        )

    def failures(self, ctx: RequestContext, host: str, method: str, path: str) -> list[str]:
        """Why this rule does not match ``ctx`` (empty = it matches). For explain only."""
        r = self.rule
        out: list[str] = []
        if isinstance(r, Override) and ctx.now >= r.expires:
            out.append(f"override expired at {fmt_ts(r.expires)}")
        if ctx.provider is None and not self.is_host:
            return [*out, f"LLM rule; request is non-LLM egress to host {host!r}"]
        if ctx.provider is not None and self.is_host:
            return [*out, f"host rule; request is an LLM call to provider {ctx.provider!r}"]
        if self.agents is not None and self.agents.fullmatch(ctx.agent) is None:
            out.append(f"agent {ctx.agent!r} not in {_listed(r.agents)}")
        if ctx.provider is None:
            if self.hosts is not None and self.hosts.fullmatch(host) is None:
                out.append(f"host {host!r} not in {_listed(r.hosts)}")
            if self.methods is not None and method not in self.methods:
                out.append(f"method {method!r} not in {_listed(r.methods)}")
            if self.paths is not None and self.paths.fullmatch(path) is None:
                out.append(f"path {path!r} not in {_listed(r.paths)}")
        else:
            if self.providers is not None and self.providers.fullmatch(ctx.provider) is None:
                out.append(f"provider {ctx.provider!r} not in {_listed(r.providers)}")
            if self.models is not None:
                if ctx.model is None:
                    out.append(f"request names no model; rule needs one of {_listed(r.models)}")
                elif self.models.fullmatch(ctx.model) is None:
                    out.append(f"model {ctx.model!r} not in {_listed(r.models)}")
        if self.when is not None:
            out.extend(self.when.failures(ctx))
        return out


def _decision_for(rule: Rule, approval_timeout: float) -> Decision:
    inject = rule.inject if rule.effect != "deny" else None
    if isinstance(rule, Override):
        reason = f"override {rule.id} approved by {rule.approved_by} until {fmt_ts(rule.expires)}"
        if rule.reason:
            reason = f"{reason}: {rule.reason}"
        return Decision(rule.effect, rule.id, reason, rule.id, inject, approval_timeout)
    verb = {"allow": "allowed", "deny": "denied", "approve": "held for approval"}[rule.effect]
    reason = rule.reason or f"{verb} by rule {rule.id}"
    return Decision(rule.effect, rule.id, reason, None, inject, approval_timeout)


_Group = tuple[_CompiledRule, ...]
_Candidates = tuple[_Group, _Group, _Group]  # overrides, deny rules, allow/approve rules


def _split(overrides: list[_CompiledRule], rules: list[_CompiledRule]) -> _Candidates:
    return (
        tuple(overrides),
        tuple(r for r in rules if r.rule.effect == "deny"),
        tuple(r for r in rules if r.rule.effect != "deny"),
    )


class Engine:
    """The compiled form of one policy; built by ``Policy.__post_init__``.

    Three caches, each bounded (cleared when full): per agent, the rules whose ``agents`` globs
    match it, split into LLM and host rules; per (agent, provider) and per (agent, provider,
    model), the LLM rules that also match those. A decision then evaluates only ``when`` and
    expiry (LLM) or host/method/path/``when`` (egress) of its candidates. The caches hold only
    results derived from the immutable policy, so a race between threads at worst recomputes.
    """

    def __init__(self, policy: Policy) -> None:
        timeout = policy.approval_timeout
        self._tenant = policy.tenant
        self._region = policy.region
        self._timeout = timeout
        self._overrides = tuple(_CompiledRule(o, timeout) for o in policy.overrides)
        self._rules = tuple(_CompiledRule(r, timeout) for r in policy.rules)
        self._default = Decision("deny", DEFAULT_RULE_ID, DEFAULT_REASON, approval_timeout=timeout)
        self._views: dict[str, tuple[_Candidates, _Candidates]] = {}
        self._provider_cache: dict[tuple[str, str], _Candidates] = {}
        self._llm_cache: dict[tuple[str, str, str | None], _Candidates] = {}
        self._agent_limits = tuple((compile_globs((g,)), s) for g, s in policy.agent_limits)
        self._agent_budgets = tuple((compile_globs((g,)), s) for g, s in policy.agent_budgets)

    # -- decide ----------------------------------------------------------------------------------
    def _wrong_tenant(self, tenant: str) -> Decision:
        """A caller bug (a tenant's request checked against another tenant's policy): deny."""
        return Decision(
            "deny",
            DEFAULT_RULE_ID,
            f"policy of tenant {self._tenant!r} does not apply to tenant {tenant!r}",
            approval_timeout=self._timeout,
        )

    def _region_deny(self, ctx: RequestContext) -> Decision | None:
        """Deny a provider outside the policy's region or the tenant's registered region
        (``aiid tenant add --region``): both hold where both are set. A provider of unknown
        region (none in providers.yaml) counts as outside. Non-LLM egress has no region."""
        if ctx.provider is None:
            return None
        for want, where in ((self._region, ""), (ctx.tenant_region, " (aiid tenant add)")):
            if want is not None and ctx.region != want:
                why = (
                    f"provider {ctx.provider!r} has no known region, so it counts as outside "
                    f"the tenant region {want!r}{where}"
                    if ctx.region is None
                    else f"provider region {ctx.region!r} is outside the tenant region "
                    f"{want!r}{where}"
                )
                return Decision("deny", REGION_RULE_ID, why, approval_timeout=self._timeout)
        return None

    def _view(self, agent: str) -> tuple[_Candidates, _Candidates]:
        """(LLM candidates, host candidates) for ``agent``."""
        ovs = [o for o in self._overrides if o.agent_match(agent)]
        rules = [r for r in self._rules if r.agent_match(agent)]
        view = (
            _split([o for o in ovs if not o.is_host], [r for r in rules if not r.is_host]),
            _split([o for o in ovs if o.is_host], [r for r in rules if r.is_host]),
        )
        if len(self._views) >= _CACHE_MAX:
            self._views.clear()
        self._views[agent] = view
        return view

    def _llm_candidates(self, key: tuple[str, str, str | None], view: _Candidates) -> _Candidates:
        agent, provider, model = key
        by_provider = self._provider_cache.get((agent, provider))
        if by_provider is None:
            by_provider = (
                tuple(o for o in view[0] if o.provider_match(provider)),
                tuple(r for r in view[1] if r.provider_match(provider)),
                tuple(r for r in view[2] if r.provider_match(provider)),
            )
            if len(self._provider_cache) >= _CACHE_MAX:
                self._provider_cache.clear()
            self._provider_cache[(agent, provider)] = by_provider
        found = (
            tuple(o for o in by_provider[0] if o.model_match(model)),
            tuple(r for r in by_provider[1] if r.model_match(model)),
            tuple(r for r in by_provider[2] if r.model_match(model)),
        )
        if len(self._llm_cache) >= _CACHE_MAX:
            self._llm_cache.clear()
        self._llm_cache[key] = found
        return found

    def decide(self, ctx: RequestContext) -> Decision:
        if ctx.tenant != self._tenant:
            return self._wrong_tenant(ctx.tenant)
        if ctx.provider is not None and (self._region is not None or ctx.tenant_region is not None):
            denied = self._region_deny(ctx)
            if denied is not None:
                return denied
        agent = ctx.agent
        view = self._views.get(agent) or self._view(agent)
        now = ctx.now
        provider = ctx.provider
        if provider is None:
            host = ctx.host.lower().rstrip(".")
            method = ctx.method.upper()
            first, *alts = path_readings(ctx.path)
            decision = self._egress(view[1], ctx, host, method, first)
            for alt in alts:  # the stricter of the two readings holds
                other = self._egress(view[1], ctx, host, method, alt, decoded=True)
                if _STRICTNESS[other.effect] < _STRICTNESS[decision.effect]:
                    decision = other
            return decision
        key = (agent, provider, ctx.model)
        overrides, denies, others = self._llm_cache.get(key) or self._llm_candidates(key, view[0])
        for r in overrides:
            if now < r.expires and (r.when is None or r.when.holds(ctx)):
                return r.decision
        for group in (denies, others):
            for r in group:
                if r.when is None or r.when.holds(ctx):
                    return r.decision
        return self._default

    def _egress(
        self,
        rules: _Candidates,
        ctx: RequestContext,
        host: str,
        method: str,
        path: str,
        decoded: bool = False,
    ) -> Decision:
        overrides, denies, others = rules
        now = ctx.now
        for r in overrides:
            if (
                now < r.expires
                and r.host_match(host, method, path, decoded)
                and (r.when is None or r.when.holds(ctx))
            ):
                return r.decision
        for group in (denies, others):
            for r in group:
                if r.host_match(host, method, path, decoded) and (
                    r.when is None or r.when.holds(ctx)
                ):
                    return r.decision
        return self._default

    # -- explain ---------------------------------------------------------------------------------
    def explain(self, ctx: RequestContext) -> Explanation:
        host = ctx.host.lower().rstrip(".")
        method = ctx.method.upper()
        path = normalize_path(ctx.path)
        traces: list[RuleTrace] = []
        decision: Decision | None = None
        if self._region is not None or ctx.tenant_region is not None:
            region = self._region_deny(ctx)
            if region is not None:
                why = region.reason
            elif ctx.provider is None:
                why = "non-LLM egress: no provider region applies"
            else:
                why = f"provider region {ctx.region!r} is the tenant region"
            traces.append(RuleTrace(REGION_RULE_ID, "region", region is not None, "deny", why))
            decision = region
        for o in self._overrides:
            fails = o.failures(ctx, host, method, path)
            ov = o.rule
            assert isinstance(ov, Override)
            why = (
                "; ".join(fails)
                if fails
                else f"active until {fmt_ts(ov.expires)}, approved by {ov.approved_by}"
            )
            traces.append(RuleTrace(ov.id, "override", not fails, ov.effect, why))
            if not fails and decision is None:
                decision = o.decision
        first_deny: Decision | None = None
        first_other: Decision | None = None
        for r in self._rules:
            fails = r.failures(ctx, host, method, path)
            why = "; ".join(fails) if fails else "all conditions hold"
            traces.append(RuleTrace(r.rule.id, "rule", not fails, r.rule.effect, why))
            if not fails:
                if r.rule.effect == "deny" and first_deny is None:
                    first_deny = r.decision
                elif r.rule.effect != "deny" and first_other is None:
                    first_other = r.decision
        decision = decision or first_deny or first_other or self._default
        if ctx.provider is None and decision.rule_id != REGION_RULE_ID:
            view = self._views.get(ctx.agent) or self._view(ctx.agent)
            host, method = ctx.host.lower().rstrip("."), ctx.method.upper()
            for alt in path_readings(ctx.path)[1:]:
                other = self._egress(view[1], ctx, host, method, alt, decoded=True)
                stricter = _STRICTNESS[other.effect] < _STRICTNESS[decision.effect]
                why = f"a server that decodes %2F reads the path as {alt!r}: " + (
                    "this stricter decision holds" if stricter else "no stricter decision"
                )
                traces.append(RuleTrace(other.rule_id, "path", True, other.effect, why))
                if stricter:
                    decision = other
        if ctx.tenant != self._tenant:
            decision = self._wrong_tenant(ctx.tenant)
        return Explanation(decision, tuple(traces))

    # -- limits ----------------------------------------------------------------------------------
    def agent_limit(self, agent: str) -> LimitSpec | None:
        for pattern, spec in self._agent_limits:
            if pattern.fullmatch(agent) is not None:
                return spec
        return None

    def agent_budget(self, agent: str) -> BudgetSpec | None:
        for pattern, spec in self._agent_budgets:
            if pattern.fullmatch(agent) is not None:
                return spec
        return None
