"""What a policy that validates may still get wrong against the providers a gateway knows.

Errors, which would weaken or void the policy: a ``region:`` no provider is in (every provider
with a region would be denied), a ``deny`` rule naming a provider that does not exist or a
provider's own host in ``hosts`` (the deny never matches: what it meant to stop passes), and a
``limits.agents`` / ``budgets.agents`` entry after a glob that already matches it (it never
applies). ``aiid policy check`` exits 1 on them and a running gateway refuses such an edit (the
last good policy stays), so the two never disagree. Warnings: the same never-matching names in
an ``allow``/``approve`` rule, which only denies more than meant; checked and logged, not fatal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from aiid_proxy.policy.match import glob_to_regex
from aiid_proxy.policy.model import Override, Policy, Rule
from aiid_proxy.providers.registry import Registry

_GLOB_CHARS = "*?["


def policy_problems(policy: Policy, registry: Registry) -> tuple[list[str], list[str]]:
    """The errors and the warnings of ``policy``, as ``file:line: reason`` lines."""
    lines = _source_lines(policy.source)
    errors, warnings = rule_problems(policy.source, (*policy.rules, *policy.overrides), registry)
    errors = region_problem(policy, registry, lines) + errors + shadowed_entries(policy, lines)
    return errors, warnings


def _source_lines(source: str) -> list[str]:
    try:
        return Path(source).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def region_problem(policy: Policy, registry: Registry, lines: Sequence[str]) -> list[str]:
    """``region:`` that no provider is in."""
    known = sorted({p.region for p in registry.providers if p.region})
    if policy.region is None or policy.region in known:
        return []
    line = next((n for n, row in enumerate(lines, 1) if row.startswith("region")), None)
    where = f"{policy.source}:{line}" if line is not None else str(policy.source)
    return [
        f"{where}: unknown region {policy.region!r}: no provider is in it "
        f"(known: {', '.join(known)}; providers.yaml can add providers)"
    ]


def rule_problems(
    source: str, rules: Sequence[Rule | Override], registry: Registry
) -> tuple[list[str], list[str]]:
    """Rules that can never match: a provider name no provider has, or a ``hosts`` rule for a
    provider's own host (provider hosts are governed by ``providers``/``models`` rules). Of a
    ``deny`` an error, else a warning."""
    known = registry.names()
    errors: list[str] = []
    warnings: list[str] = []
    for rule in rules:
        where = f"{source}:{rule.line}" if rule.line is not None else str(source)
        if rule.effect != "deny":
            where += ": warning"
        out = errors if rule.effect == "deny" else warnings
        for name in rule.providers or ():
            if not any(c in name for c in _GLOB_CHARS) and name not in known:
                out.append(
                    f"{where}: rule {rule.id!r}: unknown provider {name!r}, a name that never "
                    f"matches (known: {', '.join(known)}; providers.yaml can add more)"
                )
        for host in rule.hosts or ():
            if host == "*" and rule.effect != "deny":
                warnings.append(
                    f"{where}: rule {rule.id!r}: hosts '*' lets the agent name any host, "
                    "internal names included (localhost, metadata.google.internal): name the "
                    "hosts instead"
                )
            p = registry.match_host(host) if not any(c in host for c in _GLOB_CHARS) else None
            if p is not None:
                out.append(
                    f"{where}: rule {rule.id!r}: {host} is provider {p.name!r}'s host, "
                    f"governed by providers/models rules: a hosts entry never matches it"
                )
    return errors, warnings


def shadowed_entries(policy: Policy, lines: Sequence[str]) -> list[str]:
    """``limits.agents`` / ``budgets.agents`` entries that never apply: the first glob that
    matches an agent gives its limit, so an entry after ``"*"``, or a name after a glob that
    matches it, is dead."""
    out: list[str] = []
    for section, entries in (("limits", policy.agent_limits), ("budgets", policy.agent_budgets)):
        globs = [g for g, _ in entries]
        for i, glob in enumerate(globs):
            literal = not any(c in glob for c in _GLOB_CHARS)
            earlier = next(
                (
                    g
                    for g in globs[:i]
                    if g == "*" or (literal and re.fullmatch(glob_to_regex(g), glob))
                ),
                None,
            )
            if earlier is None:
                continue
            line = key_line(lines, section, glob)
            where = f"{policy.source}:{line}" if line else str(policy.source)
            out.append(
                f"{where}: {section}.agents[{glob!r}] never applies: the earlier "
                f"{earlier!r} matches first (the first matching glob gives an agent's "
                f"{'limit' if section == 'limits' else 'budget'}; put specific names first)"
            )
    return out


def key_line(lines: Sequence[str], section: str, key: str) -> int | None:
    """The line of ``key`` inside the top-level ``section`` (else the section's own line)."""
    start = next((n for n, t in enumerate(lines) if t.startswith(f"{section}:")), None)
    if start is None:
        return None
    pat = re.compile(rf"""(^|[{{,\s])['"]?{re.escape(key)}['"]?\s*:""")
    for n in range(start + 1, len(lines)):
        if lines[n] and not lines[n][0].isspace() and not lines[n].startswith("#"):
            break  # the next top-level key
        if pat.search(lines[n]):
            return n + 1
    return start + 1


class GatewayLint:
    """The lint of a running gateway: :func:`policy_problems` against the providers it read
    at its start, and, once ``providers_file`` changed since, a hint on the problems a
    restart would change (an unknown region or provider, a provider's host)."""

    def __init__(self, registry: Registry, providers_file: Path) -> None:
        self.registry = registry
        self.providers_file = providers_file
        self._stamp = _stamp(providers_file)

    def __call__(self, policy: Policy) -> tuple[list[str], list[str]]:
        errors, warnings = policy_problems(policy, self.registry)
        if _stamp(self.providers_file) != self._stamp:
            hint = (
                f" (this gateway read {self.providers_file.name} at its start: restart it to "
                "use the edited one)"
            )
            errors = [e + hint if _about_providers(e) else e for e in errors]
            warnings = [w + hint if _about_providers(w) else w for w in warnings]
        return errors, warnings


def _about_providers(problem: str) -> bool:
    """Whether a lint problem depends on the providers the gateway knows."""
    return "unknown region" in problem or "unknown provider" in problem or "'s host" in problem


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of ``path``; None if there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)
