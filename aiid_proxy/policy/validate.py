"""Validation of a parsed policy document into a :class:`Policy`, every error with ``file:line``.

A bad setting or rule is recorded and checking goes on with the next one, so ``aiid policy
check`` names each. :mod:`aiid_proxy.policy.loader` reads the files and calls
:func:`compile_policy`; :mod:`aiid_proxy.policy.timespec` parses durations, hours and expiry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from aiid_proxy.errors import PolicyError
from aiid_proxy.home import NAME_RE
from aiid_proxy.policy.match import glob_to_regex
from aiid_proxy.policy.model import (
    DEFAULT_APPROVAL_TIMEOUT,
    DEFAULT_RULE_ID,
    EFFECTS,
    REGION_RULE_ID,
    BudgetSpec,
    Hours,
    InjectSpec,
    LimitSpec,
    Override,
    Policy,
    Range,
    Rule,
    When,
)
from aiid_proxy.policy.timespec import parse_duration, parse_expires, parse_hours
from aiid_proxy.policy.yamlsrc import Checker, YMap, YSeq, type_name

RULE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_NAME_GLOB_RE = re.compile(r"^[a-z0-9_*?\[\]!^-]{1,200}$")
_HOST_GLOB_RE = re.compile(r"^[a-z0-9_.*?\[\]!^:-]{1,253}$")
_HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
_SCHEME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,50}$")
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_FORBIDDEN_INJECT = frozenset({"host", "content-length", "transfer-encoding", "connection"})

_TOP_KEYS = (
    "version",
    "tenant",
    "default",
    "region",
    "audit",
    "approval",
    "rules",
    "limits",
    "budgets",
    "overrides",
)
_MATCH_KEYS = ("id", "agents", "providers", "models", "hosts", "methods", "paths", "when")
_RULE_KEYS = (*_MATCH_KEYS, "effect", "reason", "inject")
_OVERRIDE_KEYS = (*_RULE_KEYS, "approved_by", "expires")
_WHEN_KEYS = ("max_tokens", "temperature", "top_p", "n", "stream", "tools", "hours")
_RANGE_KEYS = ("max_tokens", "temperature", "top_p", "n")
_COUNT_KEYS = ("max_tokens", "n")
MAX_APPROVAL_TIMEOUT = 24 * 3600.0


# -- validation ----------------------------------------------------------------------------------


class Validator(Checker):
    """Validates a whole file: a bad setting or rule is recorded and checking goes on with the
    next one, so ``aiid policy check`` names each (the first error of each setting and rule)."""

    def __init__(self, file: str) -> None:
        super().__init__(file)
        self.ids: dict[str, int] = {}
        self.found: list[PolicyError] = []
        self.late: list[PolicyError] = []  # reported after every error found in the file
        self.valid_rules: tuple[Rule, ...] = ()

    def attempt[T](self, check: Callable[[], T], fallback: T) -> T:
        """``check()``, or ``fallback`` once its error is recorded."""
        try:
            return check()
        except PolicyError as e:
            self.found.append(e)
            return fallback

    def raise_found(self) -> None:
        found = [*sorted(self.found, key=lambda e: e.line or 0), *self.late]
        if found:
            first, *rest = found
            first.others = tuple(rest)
            first.rules = self.valid_rules
            raise first

    # -- globs -----------------------------------------------------------------------------------
    def glob(self, g: str, kind: str, line: int) -> str:
        try:
            glob_to_regex(g)
        except ValueError as e:
            self.fail(f"bad {kind} glob: {e}", line)
        return g

    def name_glob(self, g: str, kind: str, line: int) -> str:
        if not any(c in g for c in "*?["):
            if NAME_RE.fullmatch(g) is None:
                self.fail(
                    f"invalid {kind} name {g!r}: must match ^[a-z0-9][a-z0-9_-]{{0,62}}$", line
                )
            return g
        if _NAME_GLOB_RE.fullmatch(g) is None:
            self.fail(f"invalid {kind} glob {g!r}: names use a-z 0-9 _ - (and * ? [ ])", line)
        return self.glob(g, kind, line)

    def globs(self, m: YMap, key: str, what: str) -> tuple[str, ...] | None:
        if key not in m:
            return None
        out: list[str] = []
        for g, line in self.str_list(m, key, what):
            if key in ("agents", "providers"):
                out.append(self.name_glob(g, key[:-1], line))
            elif key == "models":
                if not g or any(c.isspace() or not c.isprintable() for c in g):
                    self.fail(f"bad model glob {g!r}: empty or contains whitespace", line)
                out.append(self.glob(g, "model", line))
            elif key == "hosts":
                if "/" in g or _HOST_GLOB_RE.fullmatch(g.lower()) is None:
                    self.fail(f"bad host glob {g!r}: a host name such as api.github.com", line)
                out.append(self.glob(g.lower(), "host", line))
            elif key == "methods":
                if g.upper() not in HTTP_METHODS:
                    self.fail(
                        f"{g!r} is not an HTTP method ({', '.join(sorted(HTTP_METHODS))})", line
                    )
                out.append(g.upper())
            else:  # paths
                if not g.startswith("/"):
                    self.fail(f"path glob {g!r} must start with '/'", line)
                out.append(self.glob(g, "path", line))
        return tuple(out)

    # -- rules -----------------------------------------------------------------------------------
    def rule(self, v: object, line: int, override: bool) -> Rule:
        kind = "override" if override else "rule"
        m = self.mapping(v, f"{kind} item", line)
        try:
            self.keys(
                m,
                _OVERRIDE_KEYS if override else _RULE_KEYS,
                kind,
                ("id", "effect", "approved_by", "expires") if override else ("id", "effect"),
            )
        except PolicyError:
            # This rule's error is its key; its id still counts, so that a later rule with
            # the same id is named as a duplicate too.
            rid = m.get("id")
            if isinstance(rid, str) and rid not in self.ids and "id" in m.value_lines:
                self.ids[rid] = m.value_lines["id"]
            raise
        rid = self.string(m, "id", kind)
        if RULE_ID_RE.fullmatch(rid) is None:
            self.fail(
                f"invalid {kind} id {rid!r}: must match {RULE_ID_RE.pattern}", m.value_lines["id"]
            )
        if rid in (DEFAULT_RULE_ID, REGION_RULE_ID):
            self.fail(f"{kind} id {rid!r} is reserved", m.value_lines["id"])
        if rid in self.ids:  # named where it is the second in the file (rules are read first)
            first, second = sorted((self.ids[rid], m.value_lines["id"]))
            self.fail(f"duplicate id {rid!r} (first on line {first})", second)
        self.ids[rid] = m.value_lines["id"]
        what = f"{kind} {rid!r}"
        effect = self.string(m, "effect", what)
        if effect not in EFFECTS:
            self.fail(
                f"{what}: effect {effect!r} must be allow, deny or approve", m.value_lines["effect"]
            )
        fields: dict[str, tuple[str, ...] | None] = {
            k: self.globs(m, k, what)
            for k in ("agents", "providers", "models", "hosts", "methods", "paths")
        }
        if "hosts" in m:
            for k in ("providers", "models"):
                if k in m:
                    self.fail(
                        f"{what}: hosts cannot be combined with {k} in one rule", m.key_lines[k]
                    )
        else:
            for k in ("methods", "paths", "inject"):
                if k in m:
                    self.fail(
                        f"{what}: {k} needs hosts (it applies to non-LLM egress)", m.key_lines[k]
                    )
        inject = self.inject(m, what) if "inject" in m else None
        if inject is not None and effect == "deny":
            self.fail(f"{what}: inject on a deny rule has no effect", m.key_lines["inject"])
        when = self.when(m["when"], what, m.value_lines["when"]) if "when" in m else None
        if "hosts" in m and "when" in m and isinstance(m["when"], YMap):
            # request parameters are read from LLM requests only: on egress such a condition
            # never held live, while `policy explain --param` said it did ([AL])
            wm = m["when"]
            for k in (k for k in wm if k != "hours"):
                line = wm.key_lines[k]
                if m.line is not None and line < m.line:  # a YAML alias: the anchor is above
                    line = m.key_lines["when"]  # ([AN]) named where this rule uses it
                self.attempt(
                    partial(
                        self.fail,
                        f"{what}.when.{k}: request parameters apply to providers/models rules; "
                        "a hosts rule can only use hours",
                        line,
                    ),
                    None,
                )
        reason = self.string(m, "reason", what) if "reason" in m else None
        common: dict[str, Any] = {
            "id": rid,
            "effect": effect,
            "reason": reason,
            "when": when,
            "inject": inject,
            "line": m.line,
            **fields,
        }
        if not override:
            return Rule(**common)
        approved_by = self.string(m, "approved_by", what)
        return Override(**common, approved_by=approved_by, expires=self.expires(m, what))

    def expires(self, m: YMap, what: str) -> float:
        try:
            return parse_expires(m["expires"], what)
        except PolicyError as e:
            self.fail(e.message, m.value_lines["expires"])

    def inject(self, m: YMap, what: str) -> InjectSpec:
        w = f"{what}.inject"
        im = self.mapping(m["inject"], w, m.value_lines["inject"])
        self.keys(im, ("header", "scheme", "secret"), w, ("header", "secret"))
        header = self.string(im, "header", w)
        if _HEADER_RE.fullmatch(header) is None:
            self.fail(f"{w}: {header!r} is not a valid header name", im.value_lines["header"])
        if header.lower() in _FORBIDDEN_INJECT:
            self.fail(f"{w}: header {header!r} cannot be injected", im.value_lines["header"])
        scheme = self.string(im, "scheme", w) if "scheme" in im else None
        if scheme is not None and _SCHEME_RE.fullmatch(scheme) is None:
            self.fail(f"{w}: bad scheme {scheme!r}", im.value_lines["scheme"])
        secret = self.string(im, "secret", w)
        if NAME_RE.fullmatch(secret) is None:
            self.fail(
                f"{w}: invalid secret name {secret!r}: must match {NAME_RE.pattern}",
                im.value_lines["secret"],
            )
        return InjectSpec(header, scheme, secret)

    def when(self, v: object, what: str, line: int) -> When | None:
        w = f"{what}.when"
        m = self.mapping(v, w, line)
        self.keys(m, _WHEN_KEYS, w)
        if not m:
            return None
        # each condition checked on its own (an error is recorded, the next one checked too)
        ranges: dict[str, Range] = {}
        for k in _RANGE_KEYS:
            if k in m:
                ranges[k] = self.attempt(partial(self.range, m, k, w), Range(None, None))
        return When(
            **ranges,
            stream=self.attempt(partial(self.boolean, m, "stream", w), None)
            if "stream" in m
            else None,
            tools=self.attempt(partial(self.boolean, m, "tools", w), None)
            if "tools" in m
            else None,
            hours=self.attempt(partial(self.hours, m, w), None) if "hours" in m else None,
        )

    def range(self, m: YMap, key: str, what: str) -> Range:
        w = f"{what}.{key}"
        rm = self.mapping(m[key], w, m.value_lines[key])
        self.keys(rm, ("min", "max"), w)
        if not rm:
            self.fail(f"{w} needs min and/or max", m.value_lines[key])
        lo = self.number(rm, "min", w) if "min" in rm else None
        hi = self.number(rm, "max", w) if "max" in rm else None

        def check(bound: str, value: float) -> None:
            if value < 0:  # no request carries a negative count, temperature or top_p
                self.fail(f"{w}.{bound} must be >= 0, got {value:g}", rm.value_lines[bound])
            if key in _COUNT_KEYS and value != int(value):
                self.fail(
                    f"{w}.{bound} must be a whole number, got {value:g}", rm.value_lines[bound]
                )

        for bound, value in (("min", lo), ("max", hi)):
            if value is not None:
                self.attempt(partial(check, bound, value), None)
        if lo is not None and hi is not None and lo > hi:
            self.fail(f"{w}: min {lo} > max {hi}", rm.value_lines["max"])
        return Range(lo, hi)

    def hours(self, m: YMap, what: str) -> Hours:
        try:
            return parse_hours(m["hours"], what)
        except PolicyError as e:
            self.fail(e.message, m.value_lines["hours"])

    # -- limits ----------------------------------------------------------------------------------
    def limit(self, v: object, what: str, line: int) -> LimitSpec:
        m = self.mapping(v, what, line)
        keys = ("requests_per_minute", "tokens_per_minute")
        self.keys(m, keys, what)
        if not m:
            self.fail(f"{what} needs requests_per_minute and/or tokens_per_minute", line)

        def count(k: str) -> int:
            n = self.number(m, k, what, positive=True)
            if not isinstance(n, int):
                self.fail(f"{what}.{k} must be a whole number, got {n}", m.value_lines[k])
            return n

        return LimitSpec(**{k: self.attempt(partial(count, k), 1) for k in keys if k in m})

    def budget(self, v: object, what: str, line: int) -> BudgetSpec:
        m = self.mapping(v, what, line)
        keys = ("usd_per_day", "usd_per_month")
        self.keys(m, keys, what)
        if not m:
            self.fail(f"{what} needs usd_per_day and/or usd_per_month", line)
        return BudgetSpec(
            **{
                k: float(self.attempt(partial(self.number, m, k, what, positive=True), 1.0))
                for k in keys
                if k in m
            }
        )

    def section[T](
        self, top: YMap, key: str, one: Callable[[object, str, int], T]
    ) -> tuple[T | None, tuple[tuple[str, T], ...]]:
        m = self.mapping(top[key], key, top.value_lines[key])
        self.keys(m, ("tenant", "agents"), key)
        tenant = (
            self.attempt(partial(one, m["tenant"], f"{key}.tenant", m.value_lines["tenant"]), None)
            if "tenant" in m
            else None
        )
        agents: list[tuple[str, T]] = []
        if "agents" in m:
            am = self.mapping(m["agents"], f"{key}.agents", m.value_lines["agents"])
            for glob, spec in am.items():

                def entry(glob: str = glob, spec: object = spec) -> tuple[str, T]:
                    self.name_glob(glob, "agent", am.key_lines[glob])
                    return glob, one(spec, f"{key}.agents[{glob!r}]", am.value_lines[glob])

                found = self.attempt(entry, None)
                if found is not None:
                    agents.append(found)
        return tenant, tuple(agents)

    # -- the file --------------------------------------------------------------------------------
    def policy(self, data: object, expected_tenant: str | None, source_hash: str) -> Policy:
        if data is None:
            self.fail("policy file is empty (expected version, tenant, default, rules)", 1)
        top = self.mapping(data, "a policy file", 1)
        for key in top:  # each unknown key is named, and checking goes on
            if key not in _TOP_KEYS:
                self.attempt(partial(self.unknown_key, top, key, _TOP_KEYS, "policy"), None)
        missing = [k for k in ("version", "tenant", "default") if k not in top]
        for key in missing:  # after an unknown key that may be its typo ("defualt")
            self.late.append(
                PolicyError(f"policy is missing required key {key!r}", self.file, top.line)
            )
        if missing:
            self.raise_found()
        version = top["version"]

        def check_version() -> None:
            if type(version) is not int or version != 1:
                self.fail(
                    f"unsupported policy version {version!r} (expected 1)",
                    top.value_lines["version"],
                )

        self.attempt(check_version, None)

        def check_tenant() -> str:
            tenant = self.string(top, "tenant", "policy")
            if NAME_RE.fullmatch(tenant) is None:
                self.fail(
                    f"invalid tenant name {tenant!r}: must match {NAME_RE.pattern}",
                    top.value_lines["tenant"],
                )
            if expected_tenant is not None and tenant != expected_tenant:
                self.fail(
                    f"tenant {tenant!r} does not match the file name "
                    f"(expected {expected_tenant!r})",
                    top.value_lines["tenant"],
                )
            return tenant

        tenant = self.attempt(check_tenant, expected_tenant or "")

        def check_default() -> None:
            if top["default"] != "deny":
                self.fail(
                    f"default must be 'deny' (the only accepted value), got {top['default']!r}",
                    top.value_lines["default"],
                )

        self.attempt(check_default, None)

        def check_region() -> str | None:
            if "region" not in top:
                return None
            region = self.string(top, "region", "policy")
            if NAME_RE.fullmatch(region) is None:
                self.fail(
                    f"invalid region {region!r}: must match {NAME_RE.pattern}",
                    top.value_lines["region"],
                )
            return region

        region = self.attempt(check_region, None)

        def check_audit() -> bool:
            if "audit" not in top:
                return False
            am = self.mapping(top["audit"], "audit", top.value_lines["audit"])
            self.keys(am, ("record_prompts",), "audit")
            return self.boolean(am, "record_prompts", "audit") if "record_prompts" in am else False

        record_prompts = self.attempt(check_audit, False)

        def check_approval() -> float:
            if "approval" not in top:
                return DEFAULT_APPROVAL_TIMEOUT
            ap = self.mapping(top["approval"], "approval", top.value_lines["approval"])
            self.keys(ap, ("timeout",), "approval")
            if "timeout" not in ap:
                return DEFAULT_APPROVAL_TIMEOUT
            try:
                timeout = parse_duration(ap["timeout"])
            except PolicyError as e:
                self.fail(f"approval.timeout: {e.message}", ap.value_lines["timeout"])
            if timeout > MAX_APPROVAL_TIMEOUT:  # an agent's connection held open for days
                self.fail(
                    f"approval.timeout {ap['timeout']!r} is over the maximum of 24h",
                    ap.value_lines["timeout"],
                )
            return timeout

        timeout = self.attempt(check_approval, DEFAULT_APPROVAL_TIMEOUT)
        rules = self.rules(top, "rules", override=False)
        overrides = cast(tuple[Override, ...], self.rules(top, "overrides", override=True))
        self.valid_rules = (*rules, *overrides)
        no_section: tuple[Any, tuple[tuple[str, Any], ...]] = (None, ())
        tenant_limit, agent_limits = (
            self.attempt(lambda: self.section(top, "limits", self.limit), no_section)
            if "limits" in top
            else no_section
        )
        tenant_budget, agent_budgets = (
            self.attempt(lambda: self.section(top, "budgets", self.budget), no_section)
            if "budgets" in top
            else no_section
        )
        self.raise_found()
        try:
            return Policy(
                tenant=tenant,
                version=1,
                region=region,
                record_prompts=record_prompts,
                approval_timeout=timeout,
                rules=rules,
                overrides=overrides,
                tenant_limit=tenant_limit,
                agent_limits=agent_limits,
                tenant_budget=tenant_budget,
                agent_budgets=agent_budgets,
                source_hash=source_hash,
                source=self.file,
            )
        except ValueError as e:  # the engine refused something validation let through
            self.fail(str(e), None)

    def rules(self, top: YMap, key: str, override: bool) -> tuple[Rule, ...]:
        if key not in top or top[key] is None:
            return ()
        seq = top[key]
        if not isinstance(seq, YSeq):
            self.found.append(
                PolicyError(
                    f"{key} must be a list, got {type_name(seq)}", self.file, top.value_lines[key]
                )
            )
            return ()
        out: list[Rule] = []
        for item, line in zip(seq, seq.lines, strict=True):
            try:
                out.append(self.rule(item, line, override))
            except PolicyError as e:  # the next rule is checked all the same
                self.found.append(e)
        return tuple(out)


def compile_policy(
    data: object, filename: str, expected_tenant: str | None, source_hash: str
) -> Policy:
    """The :class:`Policy` of a parsed YAML document (``yamlsrc.parse_yaml``); PolicyError
    listing every error found (``.all``)."""
    return Validator(filename).policy(data, expected_tenant, source_hash)
