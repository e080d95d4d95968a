"""YAML policy files -> :class:`Policy`, validated strictly, every error with ``file:line``.

The YAML is read by :mod:`aiid_proxy.policy.yamlsrc`, which keeps the line of every key, value
and list item, refuses duplicate keys and leaves timestamps as strings (so ``expires`` is parsed
here, with its time zone required).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiid_proxy.errors import PolicyError
from aiid_proxy.home import NAME_RE
from aiid_proxy.policy.engine import glob_to_regex
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
from aiid_proxy.policy.yamlsrc import Checker, YMap, YSeq, parse_yaml, type_name

POLICY_SUFFIXES = (".yaml", ".yml")
# Files in the policies directory that are not tenant policies (read by other components).
NON_POLICY_FILES = frozenset({"prices.yaml", "prices.yml", "providers.yaml", "providers.yml"})

RULE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_NAME_GLOB_RE = re.compile(r"^[a-z0-9_*?\[\]!^-]{1,200}$")
_HOST_GLOB_RE = re.compile(r"^[a-z0-9_.*?\[\]!^:-]{1,253}$")
_HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
_SCHEME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,50}$")
# Names in the zone database that stand for whatever zone the host is set to.
HOST_ZONES = frozenset({"localtime", "posixrules"})
_HOURS_RE = re.compile(r"^\s*([0-9]{2}):([0-9]{2})\s*-\s*([0-9]{2}):([0-9]{2})\s+(\S+)\s*$")
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
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
MAX_POLICY_BYTES = 256 * 1024
"""Parsing runs in the gateway (~0.7 s for 256 KiB, 3 s for 1 MiB on the 2-core host): a
bigger file would delay the edits after it past the 2 s the contract gives a reload."""


def parse_duration(text: str | float) -> float:
    """``"120s"``, ``"10m"``, ``"2h"``, ``"1d"`` or ``"90"`` (seconds) -> seconds (> 0)."""
    if isinstance(text, bool):
        raise PolicyError(f"invalid duration {text!r}: use e.g. 120s, 10m, 2h, 1d")
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise PolicyError(f"invalid duration {text!r}: use e.g. 120s, 10m, 2h, 1d")
        value = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise PolicyError(f"invalid duration {text!r}: must be positive")
    return value


# -- validation ----------------------------------------------------------------------------------


class _Validator(Checker):
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
        if rid in self.ids:
            self.fail(f"duplicate id {rid!r} (first on line {self.ids[rid]})", m.value_lines["id"])
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
        v = m["expires"]
        line = m.value_lines["expires"]
        bad = (
            f"{what}: expires {v!r} must be an ISO 8601 time with Z or an offset,"
            " e.g. 2026-12-01T00:00:00Z"
        )
        if not isinstance(v, str):
            self.fail(bad, line)
        try:
            dt = datetime.fromisoformat(v.strip())
        except ValueError:
            self.fail(bad, line)
        if dt.tzinfo is None or dt.utcoffset() is None:
            self.fail(bad, line)
        return dt.timestamp()

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
        v = m["hours"]
        line = m.value_lines["hours"]
        bad = f'{what}.hours {v!r} must look like "08:00-20:00 UTC" (zone: UTC or IANA name)'
        match = _HOURS_RE.fullmatch(v) if isinstance(v, str) else None
        if match is None:
            self.fail(bad, line)
        h1, m1, h2, m2 = (int(match.group(i)) for i in range(1, 5))
        tz = match.group(5)
        if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
            self.fail(bad, line)
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            self.fail(f"{what}.hours {v!r} is an empty window (start equals end)", line)
        if tz in HOST_ZONES:
            self.fail(
                f"{what}.hours: time zone {tz!r} is the host's own zone, which differs from "
                "machine to machine; name the zone (e.g. Europe/Berlin)",
                line,
            )
        if tz != "UTC":
            try:
                ZoneInfo(tz)
            # a directory of the zone database ("Europe") is an IsADirectoryError
            except (ZoneInfoNotFoundError, ValueError, OSError):
                self.fail(f"{what}.hours: unknown time zone {tz!r}", line)
        return Hours(
            start,
            end,
            tz,
            f"{match.group(1)}:{match.group(2)}-{match.group(3)}:{match.group(4)} {tz}",
        )

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


# -- public entry points -------------------------------------------------------------------------


def _load(text: str, filename: str, expected_tenant: str | None, source_hash: str) -> Policy:
    data = parse_yaml(text, filename)
    return _Validator(filename).policy(data, expected_tenant, source_hash)


def load_policy_text(text: str, filename: str, expected_tenant: str | None) -> Policy:
    """Validate and compile a policy from YAML text; ``filename`` is used in errors."""
    return _load(text, filename, expected_tenant, hashlib.sha256(text.encode()).hexdigest())


def load_policy_file(path: Path) -> Policy:
    """Load ``<tenant>.yaml``; the file name must be a valid tenant name equal to ``tenant:``."""
    path = Path(path)
    filename = str(path)
    if path.suffix not in POLICY_SUFFIXES:
        raise PolicyError("a policy file name must end in .yaml or .yml", filename)
    if NAME_RE.fullmatch(path.stem) is None:
        raise PolicyError(
            f"file name {path.stem!r} is not a valid tenant name (must match {NAME_RE.pattern})",
            filename,
        )
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)  # never more: a huge file is refused unread
    except OSError as e:
        raise PolicyError(f"cannot read policy file: {e.strerror}", filename) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(
            f"policy file is over {MAX_POLICY_BYTES // 1024} KiB (about 2,500 rules): refused",
            filename,
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PolicyError("policy file is not valid UTF-8", filename) from None
    return _load(text, filename, path.stem, hashlib.sha256(raw).hexdigest())


def load_policy_dir(directory: Path) -> tuple[dict[str, Policy], list[PolicyError]]:
    """Every ``*.yaml``/``*.yml`` directly in ``directory`` (not ``examples/``, not dotfiles, not
    ``prices.yaml`` nor ``providers.yaml``): the policies that load, by tenant, and the errors
    of those that do not."""
    directory = Path(directory)
    policies: dict[str, Policy] = {}
    errors: list[PolicyError] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        return {}, [PolicyError(f"cannot read policy directory: {e.strerror}", str(directory))]
    for path in entries:
        if (
            path.suffix not in POLICY_SUFFIXES
            or path.name.startswith(".")
            or path.name in NON_POLICY_FILES
            or not path.is_file()
        ):
            continue
        try:
            policy = load_policy_file(path)
        except PolicyError as e:
            errors.extend(e.all)
            continue
        if policy.tenant in policies:
            errors.append(
                PolicyError(
                    f"a second policy for tenant {policy.tenant!r} "
                    f"(already loaded from {policies[policy.tenant].source})",
                    str(path),
                )
            )
            continue
        policies[policy.tenant] = policy
    return policies, errors
