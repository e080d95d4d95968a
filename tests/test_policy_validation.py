"""Policy validation: every error is a PolicyError naming the file and the offending line."""

from __future__ import annotations

import pytest

from aiid_proxy.errors import PolicyError
from aiid_proxy.policy import load_policy_text

HEAD = "version: 1\ntenant: acme\ndefault: deny\n"

# -- validation errors, each with its line -------------------------------------------------------
# The expected line is the one marked "# <-" in the text.

ERRORS = [
    pytest.param("rules:\n  - id: a\n    reason: a: b  # <-\n", "YAML syntax", id="yaml-syntax"),
    pytest.param("rulez: []  # <-\n", "unknown key 'rulez'", id="unknown-top-key"),
    pytest.param(
        "rules:\n  - id: a\n    agent: [x]  # <-\n    effect: allow\n",
        "did you mean 'agents'",
        id="unknown-rule-key",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      max_token: {max: 1}  # <-\n",
        "unknown key 'max_token'",
        id="unknown-when-key",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n"
        "      max_tokens: {max: 1, mx: 2}  # <-\n",
        "unknown key 'mx'",
        id="unknown-range-key",
    ),
    pytest.param(
        "audit: {record_prompt: true}  # <-\n", "unknown key 'record_prompt'", id="unknown-audit"
    ),
    pytest.param(
        "rules:\n  - id: a\n    agents: support-*  # <-\n    effect: allow\n",
        "must be a list",
        id="agents-not-list",
    ),
    pytest.param(
        "rules:\n  - id: a\n    agents: [support-1, 7]  # <-\n    effect: allow\n",
        "items must be strings",
        id="agents-item-not-string",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      stream: 'yes'  # <-\n",
        "true or false",
        id="stream-not-bool",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      max_tokens: {max: .inf}  # <-\n",
        "must be a finite number, got inf",  # was "must be a number, got a number" ([AB])
        id="bound-infinite",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when: [stream]  # <-\n",
        "must be a mapping",
        id="when-not-mapping",
    ),
    pytest.param("rules: {a: 1}  # <-\n", "must be a list", id="rules-not-list"),
    pytest.param("version: 2  # <-\ntenant: acme\ndefault: deny\n", "version", id="version-2"),
    pytest.param(
        "version: 1.0  # <-\ntenant: acme\ndefault: deny\n", "version", id="version-float"
    ),
    pytest.param(
        "version: true  # <-\ntenant: acme\ndefault: deny\n", "version", id="version-bool"
    ),
    pytest.param("tenant: acme  # <-\ndefault: deny\n", "'version'", id="version-missing"),
    pytest.param("version: 1  # <-\ntenant: acme\n", "'default'", id="default-missing"),
    pytest.param("version: 1\ntenant: acme\ndefault: allow  # <-\n", "'deny'", id="default-allow"),
    pytest.param("version: 1  # <-\ndefault: deny\n", "'tenant'", id="tenant-missing"),
    pytest.param(
        "version: 1\ntenant: other  # <-\ndefault: deny\n", "file name", id="tenant-mismatch"
    ),
    pytest.param(
        "version: 1\ntenant: Acme  # <-\ndefault: deny\n", "invalid tenant", id="tenant-bad-name"
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n  - id: a  # <-\n    effect: deny\n",
        "duplicate id 'a' (first on line 5)",
        id="duplicate-rule-id",
    ),
    pytest.param(
        "rules:\n  - id: INC-1\n    effect: allow\noverrides:\n  - id: INC-1  # <-\n"
        "    effect: allow\n    approved_by: bob\n    expires: 2026-01-01T00:00:00Z\n",
        "duplicate id 'INC-1'",
        id="duplicate-rule-override-id",
    ),
    # [AL] an override above its rule was named as the first and the rule as the second
    pytest.param(
        "overrides:\n  - id: INC-1\n"
        "    effect: allow\n    approved_by: bob\n    expires: 2026-01-01T00:00:00Z\n"
        "rules:\n  - id: INC-1  # <-\n    effect: allow\n",
        "duplicate id 'INC-1' (first on line 5)",
        id="duplicate-override-above-rule-id",
    ),
    pytest.param(
        "rules:\n  - id: ''  # <-\n    effect: allow\n",
        "must be a non-empty string, got an empty string",
        id="rule-id-empty",
    ),
    pytest.param(
        "rules:\n  - id: a b  # <-\n    effect: allow\n", "invalid rule id", id="rule-id-charset"
    ),
    pytest.param(
        "rules:\n  - id: default  # <-\n    effect: allow\n", "reserved", id="rule-id-reserved"
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    models:\n      - gpt-4o\n      - ''  # <-\n",
        "bad model glob '': empty",
        id="model-glob-empty",
    ),
    pytest.param(
        "rules:\n  - id: a\n    agents: ['support-[ab']  # <-\n    effect: allow\n",
        "unbalanced '['",
        id="agent-glob-unbalanced",
    ),
    pytest.param(
        "rules:\n  - id: a\n    models: ['gpt-[4']  # <-\n    effect: allow\n",
        "unbalanced '['",
        id="model-glob-unbalanced",
    ),
    pytest.param(
        "rules:\n  - id: a\n    agents: [Support-1]  # <-\n    effect: allow\n",
        "invalid agent name",
        id="agent-name-uppercase",
    ),
    pytest.param(
        "rules:\n  - id: a\n    providers: [open.ai]  # <-\n    effect: allow\n",
        "invalid provider name",
        id="provider-name-dot",
    ),
    pytest.param(
        "rules:\n  - id: a\n    agents: []  # <-\n    effect: allow\n",
        "is empty",
        id="agents-empty",
    ),
    pytest.param(
        "rules:\n  - id: a\n    agents:  # <-\n    effect: allow\n", "is empty", id="agents-null"
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: permit  # <-\n", "allow, deny or approve", id="effect"
    ),
    pytest.param("rules:\n  - id: a  # <-\n    reason: x\n", "'effect'", id="effect-missing"),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when: {hours: '8-20'}  # <-\n",
        "must look like",
        id="hours-format",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      hours: 08:00-25:00 UTC  # <-\n",
        "must look like",
        id="hours-25",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n"
        "      hours: \u06608:00-20:00 UTC  # <-\n",
        "must look like",
        id="hours-non-ascii-digit",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n"
        "      hours: 08:00-20:00 Mars/Olympus  # <-\n",
        "unknown time zone",
        id="hours-zone",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      hours: 08:00-20:00 Europe  # <-\n",
        "unknown time zone 'Europe'",
        id="hours-zone-directory",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n"
        "      hours: 08:00-20:00 America/Argentina  # <-\n",
        "unknown time zone",
        id="hours-zone-subdirectory",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n"
        "      hours: 08:00-20:00 localtime  # <-\n",
        "the host's own zone",
        id="hours-zone-localtime",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n"
        "      hours: 08:00-20:00 posixrules  # <-\n",
        "the host's own zone",
        id="hours-zone-posixrules",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      hours: 08:00-08:00 UTC  # <-\n",
        "empty window",
        id="hours-empty",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      max_tokens:\n        min: 10\n"
        "        max: 5  # <-\n",
        "min 10 > max 5",
        id="range-min-gt-max",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      temperature: {max: hot}  # <-\n",
        "must be a number",
        id="range-non-numeric",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      top_p: {}  # <-\n",
        "min and/or max",
        id="range-empty",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: [api.github.com]\n    providers: [openai]  # <-\n"
        "    effect: allow\n",
        "hosts cannot be combined with providers",
        id="hosts-with-providers",
    ),
    pytest.param(
        "rules:\n  - id: a\n    models: [x]  # <-\n"
        "    hosts: [api.github.com]\n    effect: allow\n",
        "hosts cannot be combined with models",
        id="hosts-with-models",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: ['https://api.github.com']  # <-\n    effect: allow\n",
        "bad host glob",
        id="host-is-url",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    inject: {header: X, secret: s}  # <-\n",
        "inject needs hosts",
        id="inject-without-hosts",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: [h.example]\n    effect: deny\n"
        "    inject: {header: X, secret: s}  # <-\n",
        "inject on a deny rule",
        id="inject-on-deny",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: [h.example]\n    effect: allow\n"
        "    inject: {header: X, secret: s, scheme: Bearer, value: v}  # <-\n",
        "unknown key 'value'",
        id="inject-unknown-key",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: [h.example]\n    effect: allow\n"
        "    inject: {header: Host, secret: s}  # <-\n",
        "cannot be injected",
        id="inject-host-header",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: [h.example]\n    effect: allow\n"
        "    inject:\n      header: X\n      secret: ../etc  # <-\n",
        "invalid secret name",
        id="inject-secret-name",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: [h.example]\n    methods: [GET, FETCH]  # <-\n"
        "    effect: allow\n",
        "not an HTTP method",
        id="method-unknown",
    ),
    pytest.param(
        "rules:\n  - id: a\n    methods: [GET]  # <-\n    effect: allow\n",
        "methods needs hosts",
        id="methods-without-hosts",
    ),
    # [AL] never held on egress, while `policy explain --param` said it did
    pytest.param(
        "rules:\n  - id: a\n    hosts: [h.example]\n    effect: deny\n"
        "    when:\n      max_tokens: {min: 100}  # <-\n",
        "a hosts rule can only use hours",
        id="hosts-when-max-tokens",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: [h.example]\n    effect: deny\n"
        "    when:\n      hours: 08:00-20:00 UTC\n      stream: true  # <-\n",
        "a hosts rule can only use hours",
        id="hosts-when-stream",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: [h.example]\n    effect: allow\n"
        "    when: {tools: false}  # <-\n",
        "a hosts rule can only use hours",
        id="hosts-when-tools",
    ),
    pytest.param(
        "rules:\n  - id: llm\n    providers: [openai]\n    effect: allow\n"
        "    when: &w {stream: true}\n"
        "  - id: gh\n    hosts: [h.example]\n    effect: deny\n    when: *w  # <-\n",
        "a hosts rule can only use hours",
        id="hosts-when-from-an-alias",
    ),
    pytest.param(
        "rules:\n  - id: a\n    hosts: [h.example]\n"
        "    paths:\n      - /ok\n      - repos/*  # <-\n"
        "    effect: allow\n",
        "must start with '/'",
        id="path-no-slash",
    ),
    pytest.param(
        "overrides:\n  - id: INC-1  # <-\n    effect: allow\n    approved_by: bob\n",
        "'expires'",
        id="override-no-expires",
    ),
    pytest.param(
        "overrides:\n  - id: INC-1  # <-\n    effect: allow\n    expires: 2026-01-01T00:00:00Z\n",
        "'approved_by'",
        id="override-no-approver",
    ),
    pytest.param(
        "overrides:\n  - id: INC-1\n    effect: allow\n    approved_by: bob\n"
        "    expires: next tuesday  # <-\n",
        "ISO 8601",
        id="override-expires-garbage",
    ),
    pytest.param(
        "overrides:\n  - id: INC-1\n    effect: allow\n    approved_by: bob\n"
        "    expires: 2026-12-01T00:00:00  # <-\n",
        "ISO 8601",
        id="override-expires-naive",
    ),
    pytest.param(
        "overrides:\n  - id: INC-1\n    effect: allow\n    approved_by: bob\n"
        "    expires: 2026-12-01  # <-\n",
        "ISO 8601",
        id="override-expires-date-only",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    reason: x\n    effect: deny  # <-\n",
        "duplicate key 'effect' (first on line 6)",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        "region: eu\nregion: us  # <-\n", "duplicate key 'region'", id="duplicate-top-key"
    ),
    pytest.param(
        "base: &b {id: a, effect: allow}\nrules:\n  - <<: *b  # <-\n",
        "merge keys",
        id="yaml-merge-key",
    ),
    pytest.param(
        "limits:\n  tenant: {requests_per_minute: 0}  # <-\n", "must be positive", id="limit-zero"
    ),
    pytest.param(
        "limits:\n  tenant: {requests_per_minute: 1.5}  # <-\n",
        "whole number",
        id="limit-fraction",
    ),
    pytest.param("limits:\n  tenant: {}  # <-\n", "requests_per_minute and/or", id="limit-empty"),
    pytest.param(
        "limits:\n  agents:\n    'Support-*': {requests_per_minute: 5}  # <-\n",
        "invalid agent glob",
        id="limit-agent-glob",
    ),
    pytest.param(
        "limits:\n  agent:  # <-\n    '*': {requests_per_minute: 5}\n",
        "did you mean 'agents'",
        id="limits-unknown-key",
    ),
    pytest.param(
        "budgets:\n  tenant: {usd_per_day: 5}\n  agents:\n    '*': {usd_per_day: -1}  # <-\n",
        "must be positive",
        id="budget-negative",
    ),
    pytest.param(
        "budgets:\n  tenant: {usd_per_week: 5}  # <-\n",
        "unknown key 'usd_per_week'",
        id="budget-key",
    ),
    pytest.param("limits:  # <-\n", "must be a mapping", id="limits-null"),
    pytest.param("region: EU West  # <-\n", "invalid region", id="region-name"),
    pytest.param("approval: {timeout: soon}  # <-\n", "invalid duration", id="approval-timeout"),
    pytest.param("approval: {timeout: 0}  # <-\n", "positive", id="approval-timeout-zero"),
    pytest.param("approval: {timeout: 25h}  # <-\n", "maximum of 24h", id="approval-timeout-max"),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      max_tokens: {max: -1}  # <-\n",
        "must be >= 0",
        id="range-negative",
    ),
    pytest.param(
        "rules:\n  - id: a\n    effect: allow\n    when:\n      n: {min: 0.5}  # <-\n",
        "whole number",
        id="count-not-whole",
    ),
    pytest.param("audit:\n  record_prompts: 1  # <-\n", "true or false", id="record-prompts"),
    pytest.param("reason: x\n1: y  # <-\n", "must be a string", id="non-string-key"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_validation_error_names_file_and_line(text: str, message: str) -> None:
    full = text if text.startswith("version") or text.startswith("tenant") else HEAD + text
    expected = next(i for i, ln in enumerate(full.splitlines(), 1) if "# <-" in ln)
    with pytest.raises(PolicyError) as info:
        load_policy_text(full, "policies/acme.yaml", "acme")
    err = info.value
    assert message in err.message
    assert (err.file, err.line) == ("policies/acme.yaml", expected)
    assert str(err).startswith(f"policies/acme.yaml:{expected}: ")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("", 1, id="empty"),
        pytest.param("# only a comment\n", 1, id="comment-only"),
        pytest.param("- a\n- b\n", 1, id="a-list"),
        pytest.param(HEAD + "---\n" + HEAD, 4, id="two-documents"),
    ],
)
def test_not_a_policy_document(text: str, line: int) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "acme.yaml", "acme")
    assert info.value.line == line


def test_expected_tenant_none_accepts_any_valid_tenant() -> None:
    p = load_policy_text("version: 1\ntenant: other\ndefault: deny\n", "x.yaml", None)
    assert p.tenant == "other"
    assert p.rules == () and p.overrides == ()
