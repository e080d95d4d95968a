from __future__ import annotations

import ast
import dataclasses
import hashlib
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import aiid_proxy.policy.engine as engine_mod
from aiid_proxy.errors import PolicyError
from aiid_proxy.policy import (
    MAX_POLICY_BYTES,
    BudgetSpec,
    Decision,
    InjectSpec,
    LimitSpec,
    Policy,
    RequestContext,
    Rule,
    load_policy_dir,
    load_policy_file,
    load_policy_text,
    normalize_path,
    parse_duration,
)

ROOT = Path(__file__).resolve().parent.parent
HEAD = "version: 1\ntenant: acme\ndefault: deny\n"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def llm(
    agent: str = "support-1",
    provider: str = "openai",
    model: str | None = "gpt-4o-mini",
    now: float = NOW,
    **kw: Any,
) -> RequestContext:
    """A provider request, by default from inside the test policies' region (eu)."""
    kw.setdefault("region", "eu")
    return RequestContext(
        "acme", agent, provider, model, "api.openai.com", "POST", "/v1/chat", now, **kw
    )


def egress(
    host: str = "api.github.com",
    method: str = "GET",
    path: str = "/repos/x",
    agent: str = "coder-1",
    now: float = NOW,
) -> RequestContext:
    return RequestContext("acme", agent, None, None, host, method, path, now)


def policy(body: str, head: str = HEAD) -> Policy:
    return load_policy_text(head + body, "acme.yaml", "acme")


# -- decisions -----------------------------------------------------------------------------------

PRECEDENCE_POLICY = """
region: eu
approval: {timeout: 5m}
rules:
  - id: allow-support
    agents: ["support-*"]
    providers: [openai]
    effect: allow
  - id: deny-gpt4o
    models: ["gpt-4o"]
    effect: deny
    reason: "gpt-4o is too expensive"
  - id: approve-o1
    models: ["o1*"]
    effect: approve
  - id: allow-o1-for-research
    agents: ["research-*"]
    models: ["o1*"]
    effect: allow
  - id: allow-anthropic-no-model
    providers: [anthropic]
    effect: allow
  - id: github-read
    agents: ["coder-*"]
    hosts: ["api.github.com", "*.githubusercontent.com"]
    methods: [GET]
    paths: ["/repos/*"]
    inject: {header: Authorization, scheme: Bearer, secret: github}
    effect: allow
  - id: github-no-admin
    hosts: ["api.github.com"]
    paths: ["/repos/*/admin*"]
    effect: deny
overrides:
  - id: INC-1
    agents: [support-7]
    models: [gpt-4o]
    effect: allow
    approved_by: alice@example.com
    expires: 2026-07-01T00:00:00Z
  - id: INC-0
    agents: [support-8]
    models: [gpt-4o]
    effect: allow
    approved_by: bob@example.com
    expires: 2026-05-01T00:00:00+02:00
"""


@pytest.mark.parametrize(
    ("ctx", "effect", "rule_id"),
    [
        pytest.param(llm(), "allow", "allow-support", id="first-allow"),
        pytest.param(llm(model="gpt-4o"), "deny", "deny-gpt4o", id="deny-wins-over-earlier-allow"),
        pytest.param(llm(model="GPT-4o"), "deny", "deny-gpt4o", id="deny-model-in-any-case"),
        pytest.param(
            llm(model="O1-mini", agent="x"), "approve", "approve-o1", id="model-glob-any-case"
        ),
        pytest.param(llm(agent="ops-1"), "deny", "default", id="default"),
        pytest.param(
            llm(model="o1-mini", agent="research-1"), "approve", "approve-o1", id="approve-first"
        ),
        pytest.param(llm(model="o1-mini", agent="x"), "approve", "approve-o1", id="approve"),
        pytest.param(
            llm(provider="anthropic", model=None),
            "allow",
            "allow-anthropic-no-model",
            id="no-model",
        ),
        pytest.param(
            llm(model=None, agent="x"), "deny", "default", id="no-model-needs-models-omitted"
        ),
        pytest.param(llm(region="us"), "deny", "region", id="region-outside"),
        pytest.param(llm(region="eu"), "allow", "allow-support", id="region-inside"),
        pytest.param(
            llm(agent="support-7", model="gpt-4o", region="us"),
            "deny",
            "region",
            id="region-before-override",
        ),
        pytest.param(
            llm(agent="support-7", model="gpt-4o"), "allow", "INC-1", id="override-active"
        ),
        pytest.param(
            llm(agent="support-7", model="gpt-4o", now=ts("2026-07-01T00:00:00+00:00")),
            "deny",
            "deny-gpt4o",
            id="override-expired-at-expiry",
        ),
        pytest.param(
            llm(agent="support-8", model="gpt-4o"), "deny", "deny-gpt4o", id="override-expired"
        ),
        pytest.param(egress(), "allow", "github-read", id="host-allow"),
        pytest.param(
            egress(host="API.GitHub.com."), "allow", "github-read", id="host-case-and-dot"
        ),
        pytest.param(
            egress(host="raw.githubusercontent.com"), "allow", "github-read", id="host-glob"
        ),
        pytest.param(egress(method="post"), "deny", "default", id="host-method"),
        pytest.param(egress(path="/user"), "deny", "default", id="host-path"),
        pytest.param(egress(path="/repos/a/b?x=1"), "allow", "github-read", id="host-path-query"),
        pytest.param(egress(path="/repos/a/admin/x"), "deny", "github-no-admin", id="host-deny"),
        pytest.param(egress(path="/repos/../admin"), "deny", "default", id="host-dot-segments"),
        pytest.param(egress(path="/repos/%2e%2e/user"), "deny", "default", id="host-encoded-dots"),
        pytest.param(egress(path="//repos/a//admin"), "deny", "github-no-admin", id="host-slashes"),
        pytest.param(egress(agent="support-1"), "deny", "default", id="host-agent"),
        pytest.param(
            RequestContext(
                "acme", "support-1", None, None, "api.openai.com", "POST", "/v1/chat", NOW
            ),
            "deny",
            "default",
            id="provider-rules-skip-egress",
        ),
        pytest.param(
            RequestContext(
                "acme",
                "coder-1",
                "openai",
                "x",
                "api.github.com",
                "GET",
                "/repos/x",
                NOW,
                region="eu",
            ),
            "deny",
            "default",
            id="host-rules-skip-llm",
        ),
    ],
)
def test_precedence(ctx: RequestContext, effect: str, rule_id: str) -> None:
    p = policy(PRECEDENCE_POLICY)
    d = p.decide(ctx)
    assert (d.effect, d.rule_id) == (effect, rule_id)
    assert d.approval_timeout == 300.0
    assert p.explain(ctx).decision == d
    assert p.decide(ctx) == d  # served from the candidate cache


def test_decision_details() -> None:
    p = policy(PRECEDENCE_POLICY)
    other = dataclasses.replace(llm(), tenant="beta")
    assert p.decide(other).effect == p.explain(other).decision.effect == "deny"
    assert "tenant 'beta'" in p.decide(other).reason
    assert p.decide(llm(model="gpt-4o")).reason == "gpt-4o is too expensive"
    assert p.decide(llm(agent="x")).reason == "no rule allows this request"
    ov = p.decide(llm(agent="support-7", model="gpt-4o"))
    assert ov.override == "INC-1"
    assert "alice@example.com" in ov.reason and "2026-07-01T00:00:00Z" in ov.reason
    assert p.decide(llm()).override is None
    assert p.decide(egress()).inject == InjectSpec("Authorization", "Bearer", "github")
    assert p.decide(egress(path="/repos/x/admin")).inject is None
    assert "'us'" in p.decide(llm(region="us")).reason


@pytest.mark.parametrize(
    ("when", "ctx", "holds"),
    [
        pytest.param("max_tokens: {max: 1024}", llm(max_tokens=1024), True, id="max-inclusive"),
        pytest.param("max_tokens: {max: 1024}", llm(max_tokens=1025), False, id="over-max"),
        pytest.param("max_tokens: {max: 1024}", llm(), False, id="max-unset-fails"),
        pytest.param("max_tokens: {min: 10}", llm(max_tokens=9), False, id="under-min"),
        pytest.param("temperature: {min: 0.2, max: 0.8}", llm(temperature=0.5), True, id="temp-in"),
        pytest.param(
            "temperature: {min: 0.2, max: 0.8}", llm(temperature=0.9), False, id="temp-out"
        ),
        pytest.param("top_p: {max: 0.9}", llm(top_p=0.95), False, id="top-p"),
        pytest.param("temperature: {max: 2}", llm(temperature=float("nan")), False, id="nan"),
        pytest.param("n: {max: 1}", llm(n=1), True, id="n"),
        pytest.param("stream: true", llm(stream=True), True, id="stream-true"),
        pytest.param("stream: true", llm(), False, id="stream-false"),
        pytest.param("stream: false", llm(), True, id="stream-false-ok"),
        pytest.param("tools: false", llm(tools=True), False, id="tools"),
        pytest.param("tools: true", llm(tools=True), True, id="tools-true"),
    ],
)
def test_when_conditions(when: str, ctx: RequestContext, holds: bool) -> None:
    p = policy(f"rules:\n  - id: r\n    effect: allow\n    when:\n      {when}\n")
    assert (p.decide(ctx).effect == "allow") is holds
    assert (p.explain(ctx).traces[0].matched) is holds


@pytest.mark.parametrize(
    ("hours", "at", "inside"),
    [
        pytest.param("08:00-20:00 UTC", "2026-06-01T08:00:00+00:00", True, id="start-inclusive"),
        pytest.param("08:00-20:00 UTC", "2026-06-01T19:59:59+00:00", True, id="before-end"),
        pytest.param("08:00-20:00 UTC", "2026-06-01T20:00:00+00:00", False, id="end-exclusive"),
        pytest.param("08:00-20:00 UTC", "2026-06-01T07:59:59+00:00", False, id="before-start"),
        pytest.param("22:00-06:00 UTC", "2026-06-01T23:30:00+00:00", True, id="wrap-evening"),
        pytest.param("22:00-06:00 UTC", "2026-06-01T00:00:00+00:00", True, id="wrap-midnight"),
        pytest.param("22:00-06:00 UTC", "2026-06-01T05:59:00+00:00", True, id="wrap-morning"),
        pytest.param("22:00-06:00 UTC", "2026-06-01T06:00:00+00:00", False, id="wrap-end"),
        pytest.param("22:00-06:00 UTC", "2026-06-01T12:00:00+00:00", False, id="wrap-midday"),
        pytest.param("00:00-24:00 UTC", "2026-06-01T23:59:59+00:00", True, id="whole-day"),
        # Berlin is UTC+2 in summer, UTC+1 in winter.
        pytest.param(
            "08:00-20:00 Europe/Berlin", "2026-06-01T06:30:00+00:00", True, id="berlin-summer-in"
        ),
        pytest.param(
            "08:00-20:00 Europe/Berlin", "2026-06-01T18:30:00+00:00", False, id="berlin-summer-out"
        ),
        pytest.param(
            "08:00-20:00 Europe/Berlin", "2026-01-15T06:30:00+00:00", False, id="berlin-winter-out"
        ),
        pytest.param(
            "08:00-20:00 Europe/Berlin", "2026-01-15T18:30:00+00:00", True, id="berlin-winter-in"
        ),
        pytest.param(
            "22:00-06:00 America/New_York", "2026-06-02T03:00:00+00:00", True, id="ny-wrap-in"
        ),
        pytest.param(
            "22:00-06:00 America/New_York", "2026-06-01T23:00:00+00:00", False, id="ny-wrap-out"
        ),
        pytest.param(
            "09:30-10:00 Asia/Kolkata", "2026-06-01T04:15:00+00:00", True, id="half-hour-zone"
        ),
    ],
)
def test_hours(hours: str, at: str, inside: bool) -> None:
    p = policy(f"rules:\n  - id: r\n    effect: allow\n    when: {{hours: '{hours}'}}\n")
    ctx = llm(now=ts(at))
    assert (p.decide(ctx).effect == "allow") is inside
    assert p.explain(ctx).decision == p.decide(ctx)


def test_explain_traces_every_rule_with_reasons() -> None:
    p = policy(
        """
region: eu
rules:
  - id: small
    agents: ["support-*"]
    providers: [openai]
    models: ["gpt-4o-mini*"]
    when:
      max_tokens: {max: 1024}
      stream: true
      hours: "08:00-09:00 UTC"
    effect: allow
  - id: gh
    hosts: [api.github.com]
    effect: allow
  - id: no-o1
    models: ["o1*"]
    effect: deny
overrides:
  - id: INC-9
    agents: [bot-1]
    effect: allow
    approved_by: carol
    expires: 2026-01-01T00:00:00Z
"""
    )
    ctx = llm(agent="bot-1", model="gpt-4", max_tokens=5000, region="eu")
    ex = p.explain(ctx)
    assert ex.decision == Decision("deny", "default", "no rule allows this request")
    why = {t.rule_id: (t.kind, t.matched, t.effect, t.why) for t in ex.traces}
    assert [t.rule_id for t in ex.traces] == ["region", "INC-9", "small", "gh", "no-o1"]
    assert why["region"] == ("region", False, "deny", "provider region 'eu' is the tenant region")
    assert why["INC-9"] == ("override", False, "allow", "override expired at 2026-01-01T00:00:00Z")
    assert why["small"][:3] == ("rule", False, "allow")
    assert why["small"][3] == (
        "agent 'bot-1' not in ['support-*']; model 'gpt-4' not in ['gpt-4o-mini*']; "
        "max_tokens 5000 > max 1024; stream is false, rule needs true; "
        "time 12:00 UTC outside hours 08:00-09:00 UTC"
    )
    assert why["gh"][3] == "host rule; request is an LLM call to provider 'openai'"
    assert why["no-o1"][3] == "model 'gpt-4' not in ['o1*']"
    ok = p.explain(llm(model="o1"))
    assert ok.decision.rule_id == "no-o1"
    assert [t.matched for t in ok.traces] == [False, False, False, False, True]
    assert ok.traces[-1].why == "all conditions hold"
    assert p.explain(llm(region="us")).traces[0].matched is True
    assert "max_tokens not set (rule needs max 1024)" in p.explain(llm()).traces[2].why
    lines = ok.lines()
    assert lines[0] == "decision: deny (rule no-o1): denied by rule no-o1"
    assert len(lines) == 6 and "MATCH" in lines[-1]


@pytest.mark.parametrize(
    ("policy_region", "tenant_region", "provider_region", "effect", "reason"),
    [
        pytest.param(None, "eu", "us", "deny", "outside the tenant region 'eu' (aiid tenant add)",
                     id="tenant-region-alone"),
        pytest.param(None, "eu", "eu", "allow", None, id="tenant-region-inside"),
        pytest.param("eu", "us", "eu", "deny", "outside the tenant region 'us' (aiid tenant add)",
                     id="both-set-both-hold"),
        pytest.param("eu", "eu", "us", "deny", "outside the tenant region 'eu'",
                     id="both-agree"),
        pytest.param(None, "eu", None, "deny",
                     "provider 'openai' has no known region, so it counts as outside the tenant "
                     "region 'eu' (aiid tenant add)", id="provider-without-region"),
        pytest.param("eu", None, None, "deny", "has no known region",
                     id="provider-without-region-policy"),
        pytest.param(None, None, None, "allow", None, id="no-region-at-all"),
        pytest.param(None, None, "us", "allow", None, id="no-region-anywhere"),
    ],
)  # fmt: skip
def test_the_tenants_registered_region_holds_with_the_policys(
    policy_region: str | None,
    tenant_region: str | None,
    provider_region: str | None,
    effect: str,
    reason: str | None,
) -> None:
    head = HEAD + (f"region: {policy_region}\n" if policy_region else "")
    p = policy("rules:\n  - {id: all, effect: allow}\n", head)
    ctx = llm(region=provider_region, tenant_region=tenant_region)
    d, ex = p.decide(ctx), p.explain(ctx)
    assert (d.effect, ex.decision.effect) == (effect, effect)
    if reason is None:
        assert d.rule_id == "all"
    else:
        assert d.rule_id == ex.decision.rule_id == "region"
        assert reason in d.reason and d.reason == ex.decision.reason


def test_explain_egress_reasons() -> None:
    p = policy(PRECEDENCE_POLICY)
    why = {t.rule_id: t.why for t in p.explain(egress(method="DELETE", path="/user")).traces}
    assert why["github-read"] == "method 'DELETE' not in ['GET']; path '/user' not in ['/repos/*']"
    assert why["allow-support"] == "LLM rule; request is non-LLM egress to host 'api.github.com'"
    assert why["region"] == "non-LLM egress: no provider region applies"


GITHUB_POLICY = """\
rules:
  - id: gh-coders
    agents: ["coder-*"]
    hosts: [api.github.com]
    methods: [GET, POST]
    paths: ["/repos/*", "/user"]
    effect: allow
  - id: gh-no-admin
    hosts: [api.github.com]
    paths: ["/repos/*/admin/*", "/orgs/*"]
    effect: deny
    reason: no admin
  - id: gitlab-project
    agents: ["coder-*"]
    hosts: [api.github.com]
    paths: ["/api/v4/projects/mygroup%2Fmyproj", "/api/v4/projects/mygroup%2Fmyproj/*"]
    effect: allow
  - id: double-encoded-escape
    agents: ["coder-*"]
    hosts: [api.github.com]
    paths: ["/dbl/a%253a"]
    effect: allow
  - id: secret-deny
    hosts: [api.github.com]
    paths: ["/repos/x/sec%2Fret"]
    effect: deny
"""


@pytest.mark.parametrize(
    ("path", "rule_id"),
    [
        pytest.param("/repos/a/b/admin/c", "gh-no-admin", id="plain"),
        # [AB] a server that decodes %2F before routing (wsgiref, many frameworks) serves
        # /repos/a/b/admin/c: the deny must hold for that reading too
        pytest.param("/repos/a/b/admin%2Fc", "gh-no-admin", id="encoded-slash"),
        pytest.param("/repos/a/b%2Fadmin%2fc", "gh-no-admin", id="encoded-slashes-any-case"),
        pytest.param("/repos/a/b/admin%5Cc", "gh-no-admin", id="encoded-backslash"),
        pytest.param("/repos/a/b/admin%2Fc?x=%2F", "gh-no-admin", id="with-query"),
        # ... and in any letter case, which many servers ignore in paths
        pytest.param("/repos/a/b/ADMIN/c", "gh-no-admin", id="upper-case"),
        pytest.param("/Orgs/x", "gh-no-admin", id="upper-case-prefix"),
        # both readings allowed (GitLab-style encoded ids): allowed
        pytest.param("/repos/group%2Fproject/issues", "gh-coders", id="both-readings-allow"),
        pytest.param("/user%2Fx", "default", id="decoded-reading-unmatched"),
        pytest.param("/repos/a/b/issues", "gh-coders", id="allowed"),
        # [AE] a rule naming the encoded id is read alike for the decoded reading: GitLab's
        # "/projects/group%2Fproject" was refused by the default deny of the other reading
        pytest.param(
            "/api/v4/projects/mygroup%2Fmyproj/issues",
            "gitlab-project",
            id="rule-names-the-encoded-id",
        ),
        pytest.param("/api/v4/projects/mygroup%2fmyproj", "gitlab-project", id="id-lower-case"),
        # ... and a separator encoded twice or three times is decoded as the dot segments are
        pytest.param("/repos/a/b/admin%252Fc", "gh-no-admin", id="double-encoded"),
        pytest.param("/repos/a/b/admin%25252Fc", "gh-no-admin", id="triple-encoded"),
        # [AG] a rule's own double-encoded escape in lower case matches the request it names
        pytest.param("/dbl/a%253a", "double-encoded-escape", id="rule-double-encoded-lower"),
        # [AH] a deny naming "%2F" also stops the same path spelled with "/"
        pytest.param("/repos/x/sec/ret", "secret-deny", id="deny-names-encoded-literal-slash"),
        pytest.param("/repos/x/sec%2Fret", "secret-deny", id="deny-names-encoded"),
    ],
)
def test_an_egress_path_is_decided_as_every_server_may_read_it(path: str, rule_id: str) -> None:
    p = policy(GITHUB_POLICY)
    ctx = egress(path=path)
    assert p.decide(ctx).rule_id == rule_id
    assert p.explain(ctx).decision.rule_id == rule_id


def test_explain_names_the_other_reading_of_a_path() -> None:
    ex = policy(GITHUB_POLICY).explain(egress(path="/repos/a/b/admin%2Fc"))
    (trace,) = [t for t in ex.traces if t.kind == "path"]
    assert trace.rule_id == "gh-no-admin" and "'/repos/a/b/admin/c'" in trace.why


def test_limits_and_budgets_first_matching_glob() -> None:
    p = policy(
        """
limits:
  tenant: {requests_per_minute: 600, tokens_per_minute: 200000}
  agents:
    "support-*": {requests_per_minute: 60}
    "*": {tokens_per_minute: 1000}
budgets:
  tenant: {usd_per_month: 1000}
  agents:
    "support-[0-4]": {usd_per_day: 5.5}
"""
    )
    assert p.tenant_limit == LimitSpec(600, 200000)
    assert p.agent_limit("support-1") == LimitSpec(60, None)
    assert p.agent_limit("coder") == LimitSpec(None, 1000)
    assert p.tenant_budget == BudgetSpec(None, 1000.0)
    assert p.agent_budget("support-3") == BudgetSpec(5.5, None)
    assert p.agent_budget("support-5") is None
    assert policy("").agent_limit("x") is None and policy("").tenant_limit is None


def test_policy_settings_and_immutability() -> None:
    p = policy("region: eu\naudit: {record_prompts: true}\napproval: {timeout: 2h}\n")
    assert (p.region, p.record_prompts, p.approval_timeout) == ("eu", True, 7200.0)
    assert isinstance(p.rules, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tenant = "x"  # type: ignore[misc]
    d = policy("").decide(llm())
    assert d.approval_timeout == 120.0


def test_policy_built_directly_compiles() -> None:
    p = Policy(tenant="acme", rules=(Rule("r", "allow", models=("gpt-*",)),))
    assert p.decide(llm()).rule_id == "r"
    with pytest.raises(ValueError, match="unbalanced"):
        Policy(tenant="t", rules=(Rule("r", "allow", models=("gpt-[",)),))


def test_candidate_cache_overflow_keeps_decisions_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "_CACHE_MAX", 3)
    p = policy(PRECEDENCE_POLICY)
    fresh = policy(PRECEDENCE_POLICY)
    ctxs = [llm(agent=f"support-{i}", model=m) for i in range(5) for m in ("gpt-4o", "gpt-4o-mini")]
    for ctx in ctxs * 2:
        assert p.decide(ctx) == fresh.explain(ctx).decision
    assert len(p._engine._llm_cache) <= 3 and len(p._engine._views) <= 3


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        pytest.param("/repos/x", "/repos/x", id="plain"),
        pytest.param("/repos/x?a=../b#f", "/repos/x", id="query-fragment"),
        pytest.param("/repos/../admin", "/admin", id="dotdot"),
        pytest.param("/a/./b/.", "/a/b/", id="dot"),
        pytest.param("/a/%2E%2e/b", "/b", id="encoded"),
        pytest.param("/../../x", "/x", id="above-root"),
        pytest.param("/v1/file.txt", "/v1/file.txt", id="dot-in-name"),
        pytest.param("*", "*", id="asterisk-form"),
        pytest.param("//admin//x/", "/admin/x/", id="empty-segments"),
        pytest.param("/", "/", id="root"),
        pytest.param("/a/b/..", "/a/", id="trailing-dotdot"),
    ],
)
def test_normalize_path(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("120s", 120.0, id="s"),
        pytest.param("10m", 600.0, id="m"),
        pytest.param("2h", 7200.0, id="h"),
        pytest.param("1d", 86400.0, id="d"),
        pytest.param("90", 90.0, id="bare"),
        pytest.param("1.5m", 90.0, id="fraction"),
        pytest.param(45, 45.0, id="int"),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "-5s", "0", "m", "1 d 2h", "inf", True, "\u0661s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_duration(text)


# -- files ---------------------------------------------------------------------------------------


def test_load_policy_file_hash_source_and_name(tmp_path: Path) -> None:
    path = tmp_path / "acme.yaml"
    path.write_bytes(HEAD.encode())
    p = load_policy_file(path)
    assert p.source == str(path)
    assert p.source_hash == hashlib.sha256(HEAD.encode()).hexdigest()
    bad = tmp_path / "Acme.yaml"
    bad.write_text(HEAD.replace("acme", "Acme"))
    with pytest.raises(PolicyError, match="not a valid tenant name"):
        load_policy_file(bad)
    other = tmp_path / "other.yaml"
    other.write_text(HEAD)
    with pytest.raises(PolicyError, match="does not match the file name") as info:
        load_policy_file(other)
    assert (info.value.file, info.value.line) == (str(other), 2)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="UTF-8"):
        load_policy_file(binary)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy_file(tmp_path / "missing.yaml")


def test_a_policy_file_over_the_size_cap_is_refused_unparsed(tmp_path: Path) -> None:
    rule = '  - {id: r%d, agents: ["a%d-*"], providers: [openai], effect: allow}\n'
    path = tmp_path / "acme.yaml"
    text = HEAD + "rules:\n"
    n = 0
    while len(text.encode()) <= MAX_POLICY_BYTES - 100:
        text += rule % (n, n)
        n += 1
    path.write_text(text)
    assert len(load_policy_file(path).rules) == n  # just under the cap: loads
    path.write_text(text + rule % (n, n) * 2)
    with pytest.raises(PolicyError, match="over 256 KiB") as info:
        load_policy_file(path)
    assert info.value.file == str(path)


def test_load_policy_dir(tmp_path: Path) -> None:
    (tmp_path / "acme.yaml").write_text(HEAD)
    (tmp_path / "beta.yml").write_text(HEAD.replace("acme", "beta"))
    (tmp_path / "broken.yaml").write_text(HEAD.replace("acme", "broken") + "rules: 7\n")
    (tmp_path / "acme.yml").write_text(HEAD)  # a second file for the same tenant
    (tmp_path / "prices.yaml").write_text("openai: {}\n")  # not a policy
    (tmp_path / ".acme.yaml.swp").write_text("junk")
    (tmp_path / ".hidden.yaml").write_text("junk")
    (tmp_path / "notes.txt").write_text("junk")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "gamma.yaml").write_text(HEAD.replace("acme", "gamma"))
    policies, errors = load_policy_dir(tmp_path)
    assert sorted(policies) == ["acme", "beta"]
    assert sorted((Path(e.file or "").name, e.line) for e in errors) == [
        ("acme.yml", None),
        ("broken.yaml", 4),
    ]
    assert load_policy_dir(tmp_path / "nope")[1][0].message.startswith("cannot read")


def test_shipped_policies_load() -> None:
    policies, errors = load_policy_dir(ROOT / "policies")
    assert errors == []
    assert "demo" in policies
    acme = load_policy_file(ROOT / "policies" / "examples" / "acme.yaml")
    assert acme.region == "us" and acme.overrides and acme.agent_limits and acme.agent_budgets
    kinds = {r.effect for r in acme.rules} | {"host" for r in acme.rules if r.hosts}
    assert kinds == {"allow", "deny", "approve", "host"}


@pytest.mark.parametrize(
    ("ctx", "effect", "rule_id"),
    [
        pytest.param(llm(agent="any", model="gpt-4o-mini"), "allow", "openai-small", id="mini"),
        pytest.param(
            llm(model="gpt-4o-mini-2024-07-18"), "allow", "openai-small", id="mini-snapshot"
        ),
        pytest.param(llm(model="gpt-4o"), "deny", "no-gpt-4o", id="gpt-4o"),
        pytest.param(llm(model="o1-preview"), "deny", "no-o1", id="o1"),
        pytest.param(llm(model="gpt-4o-mini", max_tokens=4097), "deny", "max-tokens-cap", id="cap"),
        pytest.param(
            llm(model="gpt-4o-mini", max_tokens=4096), "allow", "openai-small", id="at-cap"
        ),
        pytest.param(
            llm(provider="anthropic", model="claude-3-5-haiku-latest", max_tokens=1024),
            "allow",
            "anthropic-haiku-sonnet",
            id="haiku",
        ),
        pytest.param(
            llm(provider="anthropic", model="claude-sonnet-4-5", max_tokens=4096),
            "allow",
            "anthropic-haiku-sonnet",
            id="sonnet",
        ),
        pytest.param(
            llm(provider="anthropic", model="claude-3-opus-latest", max_tokens=100),
            "deny",
            "default",
            id="opus",
        ),
        pytest.param(egress(), "deny", "default", id="no-egress"),
    ],
)
def test_demo_policy(ctx: RequestContext, effect: str, rule_id: str) -> None:
    demo = load_policy_file(ROOT / "policies" / "demo.yaml")
    d = demo.decide(dataclasses.replace(ctx, tenant="demo"))
    assert (d.effect, d.rule_id) == (effect, rule_id)


def test_policy_package_never_imports_mitmproxy() -> None:
    pkg = ROOT / "aiid_proxy" / "policy"
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "mitmproxy" for n in names), path
    code = "import sys, aiid_proxy.policy; assert 'mitmproxy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_reload_with_several_errors_keeps_the_last_good_policy_and_counts_them(
    tmp_path: Path,
) -> None:
    from aiid_proxy.clock import FakeClock
    from aiid_proxy.policystore import PolicyStore

    f = tmp_path / "acme.yaml"
    f.write_text(HEAD + "rules:\n  - {id: a, effect: allow}\n")
    store = PolicyStore(tmp_path, clock=FakeClock())
    store.refresh()
    good = store.get("acme")
    assert good is not None
    f.write_text("version: 1\ntenant: other\ndefault: allow\nrules:\n  - {id: b, effect: maybe}\n")
    (ev,) = store.refresh()
    assert not ev.ok and store.get("acme") is good
    assert ev.error is not None
    assert ev.error.startswith(f"{f}:2: tenant 'other' does not match the file name")
    assert ev.error.endswith("(and 2 more: aiid policy check)")


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        pytest.param("region: mars\nrules:\n  - {id: a, effect: allow}\n",
                     ":4: unknown region 'mars'", id="unknown-region"),
        pytest.param("rules:\n  - {id: a, providers: [anthropc], effect: deny}\n"
                     "  - {id: b, effect: allow}\n", ":5: rule 'a': unknown provider 'anthropc'",
                     id="dead-deny"),
        pytest.param("rules:\n  - {id: a, effect: allow}\nlimits:\n  agents:\n"
                     "    '*': {requests_per_minute: 500}\n    edit-1: {requests_per_minute: 1}\n",
                     ":9: limits.agents['edit-1'] never applies", id="dead-limit"),
        pytest.param("rules:\n  - {id: a, providers: [opnai], effect: allow}\n", None,
                     id="dead-allow-only-warned"),
    ],
)  # fmt: skip
def test_a_live_edit_is_refused_as_policy_check_refuses_it(
    tmp_path: Path, body: str, refused: str | None
) -> None:
    """`aiid policy check` failed files that a running gateway loaded: region: mars cut the
    tenant off, a dead limit entry silently did not apply (pass [AB])."""
    from aiid_proxy.clock import FakeClock
    from aiid_proxy.policy.lint import policy_problems
    from aiid_proxy.policystore import PolicyStore
    from aiid_proxy.providers import Registry

    reg = Registry.builtin()
    f = tmp_path / "acme.yaml"
    f.write_text(HEAD + "rules:\n  - {id: good, effect: allow}\n")
    store = PolicyStore(tmp_path, clock=FakeClock(), lint=lambda p: policy_problems(p, reg))
    store.refresh()
    good = store.get("acme")
    assert good is not None
    f.write_text(HEAD + body)
    (ev,) = store.refresh()
    if refused is None:
        assert ev.ok and store.get("acme") is not good
        return
    assert not ev.ok and store.get("acme") is good
    assert ev.error is not None and ev.error.startswith(f"{f}{refused}"), ev.error


def test_with_a_yaml_and_a_yml_file_the_yaml_is_in_force(tmp_path: Path) -> None:
    """The gateway read the .yml (it sorts after) while `policy explain` read the .yaml: an
    allow-all .yml kept a tenant open after its .yaml was emptied to cut it off."""
    from aiid_proxy.clock import FakeClock
    from aiid_proxy.policystore import PolicyStore

    (tmp_path / "acme.yml").write_text(HEAD + "rules:\n  - {id: yml-all, effect: allow}\n")
    store = PolicyStore(tmp_path, clock=FakeClock())
    store.refresh()
    only_yml = store.get("acme")
    assert only_yml is not None and [r.id for r in only_yml.rules] == ["yml-all"]
    (tmp_path / "acme.yaml").write_text(HEAD + "rules: []\n")
    store.refresh()
    now = store.get("acme")
    assert now is not None and not now.rules
    # the .yaml deleted (an editor's delete-and-rewrite): the last good policy stays, as
    # for any vanished file; the stray allow-all .yml is not swapped in
    (tmp_path / "acme.yaml").unlink()
    (ev,) = store.refresh()
    assert ev.removed and store.get("acme") is now
    assert store.refresh() == []  # said once
    (tmp_path / "acme.yaml").write_text(HEAD + "rules:\n  - {id: back, effect: allow}\n")
    store.refresh()
    back = store.get("acme")
    assert back is not None and [r.id for r in back.rules] == ["back"]


def test_one_event_that_cannot_be_reported_loses_none_of_the_others(tmp_path: Path) -> None:
    """A stray "Acme.yaml" sorts first: its report failing dropped every later event of the
    same refresh (acme's reload went unlogged and unaudited, yet was in force)."""
    from aiid_proxy.clock import FakeClock
    from aiid_proxy.policystore import PolicyEvent, PolicyStore

    seen: list[str] = []

    def report(ev: PolicyEvent) -> None:
        seen.append(ev.tenant)
        if ev.tenant == "Acme":
            raise RuntimeError("cannot report this one")

    (tmp_path / "Acme.yaml").write_text(HEAD + "rules: []\n")
    (tmp_path / "acme.yaml").write_text(HEAD + "rules:\n  - {id: a, effect: allow}\n")
    (tmp_path / "beta.yaml").write_text(HEAD.replace("acme", "beta") + "rules: []\n")
    events = PolicyStore(tmp_path, clock=FakeClock(), on_event=report).refresh()
    assert [(e.tenant, e.ok) for e in events] == [("Acme", False), ("acme", True), ("beta", True)]
    assert seen == ["Acme", "acme", "beta"]
    # not said as if it were a tenant's policy ("every request of this tenant is denied")
    assert events[0].describe().startswith("policy file 'Acme' ignored, no tenant has that name")


def test_a_policy_refused_at_start_says_no_policy_is_in_force(tmp_path: Path) -> None:
    from aiid_proxy.clock import FakeClock
    from aiid_proxy.policystore import PolicyStore

    (tmp_path / "acme.yaml").write_text("version: 1\ntenant: acme\ndefault: allow\n")
    (ev,) = PolicyStore(tmp_path, clock=FakeClock()).refresh()
    assert not ev.ok and not ev.kept
    assert ev.describe().startswith(
        "policy acme: refused, no policy in force: every request of this tenant is denied: "
    )


def test_an_edit_that_keeps_size_and_mtime_is_still_reloaded(tmp_path: Path) -> None:
    """`cp -p`, `rsync -t`, `touch -r`: same size, mtime restored. The inode's ctime moves."""
    import os

    from aiid_proxy.clock import FakeClock
    from aiid_proxy.policystore import PolicyStore

    f = tmp_path / "acme.yaml"
    f.write_text(HEAD + "rules:\n  - {id: k1, effect: allow}\n")
    store = PolicyStore(tmp_path, clock=FakeClock())
    store.refresh()
    st = f.stat()
    f.write_text(HEAD + "rules:\n  - {id: k2, effect: allow}\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    (ev,) = store.refresh()
    assert ev.ok and [r.id for r in store.get("acme").rules] == ["k2"]  # type: ignore[union-attr]


def test_a_file_saved_unchanged_is_no_new_load_but_a_fix_after_a_refusal_is(
    tmp_path: Path,
) -> None:
    import os

    from aiid_proxy.clock import FakeClock
    from aiid_proxy.policystore import PolicyStore

    f = tmp_path / "acme.yaml"
    good = HEAD + "rules:\n  - {id: a, effect: allow}\n"
    f.write_text(good)
    store = PolicyStore(tmp_path, clock=FakeClock())
    assert [e.ok for e in store.refresh()] == [True]
    os.utime(f, ns=(1, 1))  # touched: same content
    assert store.refresh() == []
    f.write_text(good + "bogus: 1\n")
    assert [e.ok for e in store.refresh()] == [False] and store.refused("acme")
    f.write_text(good)  # back to the policy in force: said, so the refusal is not the last word
    assert [e.ok for e in store.refresh()] == [True] and not store.refused("acme")


def test_an_override_running_out_is_an_event_once(tmp_path: Path) -> None:
    """Its end is on record like its start (the gateway audits policy events); one already
    expired when its policy is loaded is not news."""
    from aiid_proxy.clock import FakeClock
    from aiid_proxy.policystore import PolicyStore

    clock = FakeClock(1_800_000_000.0)  # 2027-01-15T08:00:00Z
    (tmp_path / "acme.yaml").write_text(
        HEAD + "overrides:\n"
        "  - {id: INC-1, models: [gpt-4o], effect: allow, approved_by: alice,\n"
        "     expires: '2027-01-15T08:00:10Z'}\n"
        "  - {id: OLD-1, models: [gpt-4o], effect: allow, approved_by: bob,\n"
        "     expires: '2027-01-01T00:00:00Z'}\n"
    )
    store = PolicyStore(tmp_path, clock=clock)
    assert [e.expired for e in store.refresh()] == [None]  # the load
    clock.advance(9)
    assert store.refresh() == []
    clock.advance(2)
    (ev,) = store.refresh()
    assert ev.describe() == (
        "policy acme: override INC-1 (approved by alice) expired; the rules decide again"
    )
    clock.advance(60)
    assert store.refresh() == []
