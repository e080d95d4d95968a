"""Property tests: the compiled engine against a plain reference implementation."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiid_proxy.policy import (
    Hours,
    Override,
    Policy,
    Range,
    RequestContext,
    Rule,
    When,
    load_policy_text,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC).timestamp()

AGENTS = ["a1", "a2", "support-1", "support-22", "coder-x"]
AGENT_GLOBS = ["*", "a*", "support-*", "a?", "[ab]1", "[!a]*", "coder-*", "a1", "support-?"]
PROVIDERS = ["openai", "anthropic", "google"]
PROVIDER_GLOBS = ["openai", "anthropic", "*", "open*", "*i"]
MODELS = ["gpt-4o", "gpt-4o-mini", "o1", "o1-mini", "claude-3-haiku", "models/gemini-1.5"]
MODEL_GLOBS = ["gpt-4o", "gpt-4o*", "o1*", "claude-*", "*mini*", "*", "models/*", "o?"]
HOSTS = ["api.github.com", "example.com", "raw.githubusercontent.com", "API.GitHub.com"]
HOST_GLOBS = ["api.github.com", "*.github.com", "*", "example.*", "*github*"]
PATHS = ["/repos/x", "/user", "/repos/a/b", "/repos/x?page=2", "/"]
PATH_GLOBS = ["/repos/*", "/user", "/*", "/repos/?"]
METHODS = ["GET", "POST", "DELETE", "get"]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]
REGIONS = ["eu", "us"]


def globs(pool: list[str]) -> st.SearchStrategy[tuple[str, ...] | None]:
    return st.none() | st.lists(st.sampled_from(pool), min_size=1, max_size=3).map(tuple)


ranges = st.builds(
    Range,
    st.none() | st.integers(0, 3000),
    st.none() | st.integers(0, 3000),
).filter(
    lambda r: (
        (r.min is not None or r.max is not None)
        and (r.min is None or r.max is None or r.min <= r.max)
    )
)


@st.composite
def hours(draw: st.DrawFn) -> Hours:
    start = draw(st.integers(0, 1439))
    end = draw(st.integers(1, 1440).filter(lambda e: e != start))
    tz = draw(st.sampled_from(ZONES))
    text = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d} {tz}"
    return Hours(start, end, tz, text)


whens = st.none() | st.builds(
    When,
    max_tokens=st.none() | ranges,
    temperature=st.none(),
    top_p=st.none(),
    n=st.none() | ranges,
    stream=st.none() | st.booleans(),
    tools=st.none() | st.booleans(),
    hours=st.none() | hours(),
)
effects = st.sampled_from(["allow", "deny", "approve"])


@st.composite
def rule_fields(draw: st.DrawFn, allow: bool = True) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "effect": draw(effects if allow else st.just("deny")),
        "agents": draw(globs(AGENT_GLOBS)),
        "when": draw(whens),
    }
    if draw(st.booleans()):
        fields["providers"] = draw(globs(PROVIDER_GLOBS))
        fields["models"] = draw(globs(MODEL_GLOBS))
    else:
        # request parameters are an LLM request's: an egress rule's when holds hours only
        fields["when"] = draw(st.none() | st.builds(When, hours=hours()))
        fields["hosts"] = draw(
            st.lists(st.sampled_from(HOST_GLOBS), min_size=1, max_size=2).map(tuple)
        )
        fields["methods"] = draw(
            st.none()
            | st.lists(st.sampled_from(["GET", "POST", "DELETE"]), min_size=1, max_size=2).map(
                tuple
            )
        )
        fields["paths"] = draw(globs(PATH_GLOBS))
    return fields


@st.composite
def policies(draw: st.DrawFn, allow: bool = True) -> Policy:
    n_rules = draw(st.integers(0, 8))
    rules = tuple(Rule(id=f"r{i}", **draw(rule_fields(allow))) for i in range(n_rules))
    n_over = draw(st.integers(0, 3))
    overrides = tuple(
        Override(
            id=f"INC-{i}",
            **draw(rule_fields(allow)),
            approved_by="alice",
            expires=T0 + draw(st.integers(-3 * 86400, 3 * 86400)),
        )
        for i in range(n_over)
    )
    return Policy(
        tenant="t",
        region=draw(st.none() | st.sampled_from(REGIONS)),
        rules=rules,
        overrides=overrides,
    )


@st.composite
def contexts(draw: st.DrawFn) -> RequestContext:
    llm = draw(st.booleans())
    return RequestContext(
        tenant="t",
        agent=draw(st.sampled_from(AGENTS)),
        provider=draw(st.sampled_from(PROVIDERS)) if llm else None,
        model=draw(st.none() | st.sampled_from(MODELS)) if llm else None,
        host=draw(st.sampled_from(HOSTS)),
        method=draw(st.sampled_from(METHODS)),
        path=draw(st.sampled_from(PATHS)),
        now=T0 + draw(st.integers(-4 * 86400, 4 * 86400)),
        region=draw(st.none() | st.sampled_from(REGIONS)),
        max_tokens=draw(st.none() | st.integers(0, 4000)),
        n=draw(st.none() | st.integers(0, 4000)),
        stream=draw(st.booleans()),
        tools=draw(st.booleans()),
    )


# -- the reference, written plainly --------------------------------------------------------------


def any_glob(value: str, patterns: tuple[str, ...] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(value, p) for p in patterns)


def in_range(value: float | None, r: Range | None) -> bool:
    if r is None:
        return True
    if value is None:
        return False
    return (r.min is None or value >= r.min) and (r.max is None or value <= r.max)


def when_holds(w: When | None, ctx: RequestContext) -> bool:
    if w is None:
        return True
    if not (in_range(ctx.max_tokens, w.max_tokens) and in_range(ctx.n, w.n)):
        return False
    if w.stream is not None and ctx.stream != w.stream:
        return False
    if w.tools is not None and ctx.tools != w.tools:
        return False
    if w.hours is not None:
        local = datetime.fromtimestamp(ctx.now, ZoneInfo(w.hours.tz))
        minute = local.hour * 60 + local.minute
        if w.hours.start < w.hours.end:
            return w.hours.start <= minute < w.hours.end
        return minute >= w.hours.start or minute < w.hours.end
    return True


def rule_matches(r: Rule, ctx: RequestContext) -> bool:
    if not any_glob(ctx.agent, r.agents):
        return False
    if ctx.provider is None:
        if r.hosts is None:
            return False
        path = ctx.path.split("?")[0]
        return (
            any_glob(ctx.host.lower(), r.hosts)
            and (r.methods is None or ctx.method.upper() in r.methods)
            and any_glob(path, r.paths)
            and when_holds(r.when, ctx)
        )
    if r.hosts is not None:
        return False
    if r.models is not None and ctx.model is None:
        return False
    return (
        any_glob(ctx.provider, r.providers)
        and (ctx.model is None or any_glob(ctx.model, r.models))
        and when_holds(r.when, ctx)
    )


def reference(p: Policy, ctx: RequestContext) -> tuple[str, str]:
    # the contract: providers outside the region are denied; one of unknown region (None)
    # counts as outside; non-LLM egress (no provider) has no region
    if p.region is not None and ctx.provider is not None and ctx.region != p.region:
        return ("deny", "region")
    for o in p.overrides:
        if ctx.now < o.expires and rule_matches(o, ctx):
            return (o.effect, o.id)
    for r in p.rules:
        if r.effect == "deny" and rule_matches(r, ctx):
            return ("deny", r.id)
    for r in p.rules:
        if r.effect != "deny" and rule_matches(r, ctx):
            return (r.effect, r.id)
    return ("deny", "default")


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(policies(), st.lists(contexts(), min_size=1, max_size=12))
def test_decide_equals_reference_and_explain(p: Policy, ctxs: list[RequestContext]) -> None:
    for ctx in ctxs + ctxs:  # the second pass is served from the candidate cache
        d = p.decide(ctx)
        assert (d.effect, d.rule_id) == reference(p, ctx)
        assert p.explain(ctx).decision == d


@SETTINGS
@given(policies(allow=False), st.lists(contexts(), min_size=1, max_size=8))
def test_no_allow_rules_never_allows(p: Policy, ctxs: list[RequestContext]) -> None:
    for ctx in ctxs:
        assert p.decide(ctx).effect == "deny"


def to_yaml_rule(r: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {"id": r.id, "effect": r.effect}
    for key in ("agents", "providers", "models", "hosts", "methods", "paths"):
        if getattr(r, key) is not None:
            out[key] = list(getattr(r, key))
    if r.when is not None:
        w: dict[str, Any] = {}
        for key in ("max_tokens", "n"):
            rng = getattr(r.when, key)
            if rng is not None:
                w[key] = {k: v for k, v in (("min", rng.min), ("max", rng.max)) if v is not None}
        for key in ("stream", "tools"):
            if getattr(r.when, key) is not None:
                w[key] = getattr(r.when, key)
        if r.when.hours is not None:
            w["hours"] = r.when.hours.text
        out["when"] = w
    if isinstance(r, Override):
        out["approved_by"] = r.approved_by
        out["expires"] = datetime.fromtimestamp(r.expires, UTC).isoformat()
    return out


@settings(max_examples=100, deadline=None)
@given(policies())
def test_yaml_round_trip_loads_the_same_policy(p: Policy) -> None:
    doc: dict[str, Any] = {"version": 1, "tenant": "t", "default": "deny"}
    if p.region is not None:
        doc["region"] = p.region
    doc["rules"] = [to_yaml_rule(r) for r in p.rules]
    doc["overrides"] = [to_yaml_rule(o) for o in p.overrides]
    loaded = load_policy_text(yaml.safe_dump(doc, sort_keys=False), "t.yaml", "t")
    expect_when = tuple(r.when if r.when != When() else None for r in p.rules)
    assert loaded.rules == tuple(
        Rule(**{**r.__dict__, "when": w}) for r, w in zip(p.rules, expect_when, strict=True)
    )
    assert [(o.id, o.expires, o.approved_by) for o in loaded.overrides] == [
        (o.id, o.expires, o.approved_by) for o in p.overrides
    ]
    assert loaded.region == p.region
