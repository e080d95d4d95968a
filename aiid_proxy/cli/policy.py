"""``aiid policy check`` and ``aiid policy explain``."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from aiid_proxy.cli.base import (
    checked_name,
    home_of,
    main_group,
    policies_dir,
    provider_registry,
    registered_region,
)
from aiid_proxy.clock import SYSTEM_CLOCK
from aiid_proxy.errors import AiidError, ConfigError, UsageError


# -- policy ---------------------------------------------------------------------
@main_group.group()
def policy() -> None:
    """Policy files."""


@policy.command("check")
@click.argument("directory", required=False)
@click.option("--policies", default=None, help="policy directory ($AIID_POLICIES, ./policies)")
def policy_check(directory: str | None, policies: str | None) -> None:
    """Validate every policy file; exit 1 with file:line: reason on any error."""
    from aiid_proxy.policy import load_policy_dir
    from aiid_proxy.policy.lint import policy_problems, rule_problems

    d = Path(directory).absolute() if directory else policies_dir(policies)
    if not d.is_dir():
        what = "is not a directory" if d.exists() else "does not exist"
        raise ConfigError(f"policy directory {d} {what}")
    loaded, errors = load_policy_dir(d)
    extras = _check_data_files(d)
    warnings: list[str] = []  # printed, not fatal (policy/lint.py)
    if not any("providers.yaml" in line for line in extras):
        # what a running gateway would refuse too (policy/lint.py); of a file with errors,
        # the rules that did validate
        registry = provider_registry(d)
        for _, pol in sorted(loaded.items()):
            errs, warns = policy_problems(pol, registry)
            extras += errs
            warnings += warns
        for e in errors:
            if e.file and e.rules:
                errs, warns = rule_problems(e.file, e.rules, registry)
                extras += errs
                warnings += warns
    for e in errors:
        click.echo(e.one_line(), err=True)
    for line in extras + warnings:
        click.echo(line, err=True)
    if errors or extras:
        sys.exit(1)
    for name, p in sorted(loaded.items()):
        click.echo(f"ok {name}: {len(p.rules)} rules, {len(p.overrides)} overrides")
    click.echo(f"OK {len(loaded)} policies")


def _check_data_files(d: Path) -> list[str]:
    """Errors in the policy directory's ``prices.yaml`` and ``providers.yaml``, if present."""
    from aiid_proxy.budget import PRICES_FILE, PriceTable
    from aiid_proxy.errors import ConfigError, PolicyError
    from aiid_proxy.policy.lint import key_line
    from aiid_proxy.providers import Registry

    out: list[str] = []
    prices = d / PRICES_FILE
    if prices.exists():
        try:
            table = PriceTable.load(prices)
        except PolicyError as e:
            out.append(e.one_line())
        else:
            # a provider no registry knows: its prices never apply (a typo, like "opnai")
            try:
                known = set(provider_registry(d).names()) | {"*"}
            except ConfigError:  # providers.yaml is broken: said below, prices not judged
                known = {p.provider for p in table.entries}
            unknown = sorted({p.provider for p in table.entries if p.source != "builtin"} - known)
            try:
                lines = prices.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError):
                lines = []
            for name in unknown:
                line = key_line(lines, "prices", name)
                where = f"{prices}:{line}" if line else str(prices)
                out.append(
                    f"{where}: unknown provider {name!r}, so its prices never apply (known: "
                    f"{', '.join(sorted(known - {'*'}))}; providers.yaml can add more)"
                )
            if not unknown:
                click.echo(f"ok {PRICES_FILE}: {len(table)} prices (built-in included)")
    providers = d / "providers.yaml"
    if providers.exists():
        try:
            reg = Registry.load(providers)
            click.echo(f"ok providers.yaml: {len(reg.providers)} providers (built-in included)")
        except ConfigError as e:
            out.append(_with_line(providers, e.one_line()))
    return out


def _with_line(path: Path, message: str) -> str:
    """``providers.yaml: provider 'x': ...`` as ``providers.yaml:LINE: provider 'x': ...``,
    the line where provider ``x`` starts (errors there name the provider, not the line)."""
    prefix = f"{path}: "
    m = re.match(r"provider '([^']+)'", message.removeprefix(prefix))
    if not message.startswith(prefix) or m is None:
        return message
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return message
    key = re.compile(rf"^\s+['\"]?{re.escape(m.group(1))}['\"]?\s*:")
    line = next((n for n, text in enumerate(lines, 1) if key.match(text)), None)
    return message if line is None else f"{path}:{line}: {message.removeprefix(prefix)}"


def _param(values: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        k, sep, v = item.partition("=")
        if not sep:
            raise UsageError(f"--param expects k=v, got {item!r}")
        k = k.strip()
        if k in ("max_tokens", "n"):
            try:
                out[k] = int(v)
            except ValueError:
                raise UsageError(f"--param {k} must be an integer") from None
            low = 1 if k == "n" else 0  # as the gateway reads a body: n >= 1
            if out[k] < low:
                raise UsageError(f"--param {k} must be {low} or more")
        elif k in ("temperature", "top_p"):
            try:
                out[k] = float(v)
            except ValueError:
                raise UsageError(f"--param {k} must be a number") from None
            if not math.isfinite(out[k]):  # a JSON body cannot carry nan or inf either
                raise UsageError(f"--param {k} must be a finite number")
        elif k in ("stream", "tools"):
            if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UsageError(f"--param {k} must be true or false")
            out[k] = v.lower() in ("true", "1", "yes")
        else:
            raise UsageError(
                f"unknown --param {k!r} (max_tokens, temperature, top_p, n, stream, tools)"
            )
    return out


@policy.command("explain")
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
@click.option("--agent", required=True, callback=checked_name("agent"))
@click.option("--provider", default=None, callback=checked_name("provider"))
@click.option("--model", default=None)
@click.option("--host", default=None, help="for non-LLM egress rules")
@click.option("--method", default="POST", show_default=True)
@click.option("--path", "path_", default="/", show_default=True)
@click.option("--param", "params", multiple=True, metavar="K=V")
@click.option("--at", "at", default=None, help="evaluate at this ISO time (default now)")
@click.option("--policies", default=None, help="policy directory ($AIID_POLICIES, ./policies)")
@click.pass_context
def policy_explain(
    ctx: click.Context,
    tenant_name: str,
    agent: str,
    provider: str | None,
    model: str | None,
    host: str | None,
    method: str,
    path_: str,
    params: Sequence[str],
    at: str | None,
    policies: str | None,
) -> None:
    """Print the decision and the rule that made it, without traffic."""
    from datetime import datetime

    from aiid_proxy.policy import RequestContext, load_policy_file

    if provider is None and host is None:
        raise UsageError("give --provider (and --model) or --host")
    if provider is not None and host is not None:
        raise UsageError("give --provider (and --model) or --host, not both")
    if re.fullmatch(r"[A-Za-z]+", method) is None:
        raise UsageError(f"--method must be an HTTP method (GET, POST...), got {method!r}")
    method = method.upper()  # as a policy's methods are read ([AL]: `get` there, refused here)
    d = policies_dir(policies)
    f = d / f"{tenant_name}.yaml"
    if not f.exists() and (d / f"{tenant_name}.yml").exists():
        f = d / f"{tenant_name}.yml"  # what the gateway reads when there is no .yaml
        click.echo(
            f"note: reading {f.name}; a running gateway that read {tenant_name}.yaml keeps "
            "that policy until it restarts",
            err=True,
        )
    if not f.exists():
        home = home_of(ctx)
        if home.root.is_dir() and tenant_name in home.tenants():
            # a registered tenant without a policy: the gateway denies it everything
            click.echo("decision: deny")
            click.echo("rule: default")
            click.echo(f"reason: no policy file {f}: every request of this tenant is denied")
            return
        raise ConfigError(f"no policy file {f}")
    pol = load_policy_file(f)
    now = SYSTEM_CLOCK.now()
    if at is not None:
        bad = (
            "--at must be an ISO 8601 time with Z or an offset (e.g. 2026-12-01T09:30:00Z), "
            f"got {at!r}"
        )
        try:
            when = datetime.fromisoformat(at.strip())
        except ValueError:
            raise UsageError(bad) from None
        if when.tzinfo is None or when.utcoffset() is None:
            # read in this shell's zone, the same --at would explain another hour elsewhere
            raise UsageError(bad)
        now = when.timestamp()
    region = None
    streamed = False
    registry = provider_registry(d)
    if provider is not None:
        try:
            prov = registry.get(provider)
        except (AiidError, KeyError):
            raise UsageError(f"unknown provider {provider!r}") from None
        region = prov.region
        host = host or (prov.hosts[0] if prov.hosts else provider)
    if provider is None or path_ != "/":
        # what the gateway decides before any rule: the path, and a provider's own host
        # (governed by providers/models rules, never by hosts rules); with --provider, only
        # when a --path names the route
        from aiid_proxy.gateway import path_problem

        refused = None
        problem = path_problem(path_)
        match = registry.match(host or "", method.upper(), path_)
        if problem is not None:
            refused = ("-", f"400 bad_request: the request path {problem}")
        elif match is not None and match.route is None:
            refused = (
                "default",
                f"{method.upper()} {path_} is not a known {match.provider.name} API route",
            )
        elif match is not None:
            provider, region = match.provider.name, match.provider.region
            model = model or match.params.get("model")
            if match.route is not None and match.route.kind == "stream_generate_content":
                streamed = True
        if refused is not None:
            click.echo("decision: deny")
            click.echo(f"rule: {refused[0]}")
            click.echo(f"reason: {refused[1]} (refused before any rule is looked at)")
            return
    facts = _param(params)
    if streamed:
        if facts.get("stream") is False:
            raise UsageError(f"{path_} streams: --param stream=false does not apply to it")
        facts["stream"] = True
    ctxt = RequestContext(
        tenant=tenant_name,
        agent=agent,
        provider=provider,
        model=model,
        host=(host or "").lower(),
        method=method.upper(),
        path=path_,
        now=now,
        region=region,
        tenant_region=registered_region(home_of(ctx), tenant_name),
        **facts,
    )
    ex = pol.explain(ctxt)
    dec = ex.decision
    if dec.effect != "deny" and provider is not None and model is not None:
        # what the gateway refuses after the rules, whatever they say: an unpriced model
        # under a budget (checked before any hold for approval too)
        from aiid_proxy.budget import PRICES_FILE, PriceTable, budgets_apply

        if (
            budgets_apply(pol, agent)
            and PriceTable.load(d / PRICES_FILE).lookup(provider, model) is None
        ):
            click.echo("decision: deny")
            click.echo("rule: budgets")
            click.echo(
                f"reason: no price for model {model!r} of provider {provider!r}; budgets need "
                f"prices.yaml (the rules alone say {dec.effect}, rule {dec.rule_id})"
            )
            return
    click.echo(f"decision: {dec.effect}")
    click.echo(f"rule: {dec.rule_id}")
    if dec.reason and (dec.effect != "allow" or dec.override):
        # a rule's `reason` is what a refused agent is shown: not the reason of an allow
        click.echo(f"reason: {dec.reason}")
    if dec.override:
        click.echo(f"override: {dec.override}")
    click.echo("considered:")
    for tr in ex.traces:
        mark = "match" if tr.matched else "skip "
        click.echo(f"  {mark} {tr.kind:<8} {tr.rule_id:<28} {tr.effect or '':<8} {tr.why}")
