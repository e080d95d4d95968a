"""Tenant policies: the YAML model, its loader and the compiled decision engine.

``load_policy_file``/``load_policy_dir`` turn ``policies/<tenant>.yaml`` into a frozen
:class:`Policy`; :meth:`Policy.decide` answers a :class:`RequestContext` with a
:class:`Decision` and :meth:`Policy.explain` says why. This package never imports mitmproxy.
"""

from __future__ import annotations

from aiid_proxy.policy.loader import (
    MAX_POLICY_BYTES,
    NON_POLICY_FILES,
    load_policy_dir,
    load_policy_file,
    load_policy_text,
)
from aiid_proxy.policy.match import normalize_path
from aiid_proxy.policy.model import (
    DEFAULT_RULE_ID,
    REGION_RULE_ID,
    BudgetSpec,
    Decision,
    Effect,
    Explanation,
    Hours,
    InjectSpec,
    LimitSpec,
    Override,
    Policy,
    Range,
    RequestContext,
    Rule,
    RuleTrace,
    When,
)
from aiid_proxy.policy.timespec import parse_duration

__all__ = [
    "DEFAULT_RULE_ID",
    "MAX_POLICY_BYTES",
    "NON_POLICY_FILES",
    "REGION_RULE_ID",
    "BudgetSpec",
    "Decision",
    "Effect",
    "Explanation",
    "Hours",
    "InjectSpec",
    "LimitSpec",
    "Override",
    "Policy",
    "Range",
    "RequestContext",
    "Rule",
    "RuleTrace",
    "When",
    "load_policy_dir",
    "load_policy_file",
    "load_policy_text",
    "normalize_path",
    "parse_duration",
]
