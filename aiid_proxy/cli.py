"""The ``aiid`` command line. Errors become one line on stderr (exit 1; 2 for usage)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import click

from aiid_proxy.errors import AiidError, ConfigError, UsageError
from aiid_proxy.home import Home, validate_name

F = TypeVar("F", bound=Callable[..., Any])


def _home(ctx: click.Context) -> Home:
    home: Home = ctx.obj["home"]
    return home


MAX_GRANT = 24 * 3600  # seconds an `approve --ttl` grant may last


def _registered_region(home: Home, tenant: str) -> str | None:
    """The region the tenant was registered with (``tenant add --region``), when the home
    knows the tenant; ``policy explain`` works from policy files alone otherwise."""
    if not home.tenant_settings_path(tenant).is_file():
        return None
    return home.tenant_region(tenant)


def _policies_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("AIID_POLICIES") or "policies").absolute()


def _name(kind: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    def check(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return validate_name(kind, value)
        except AiidError as e:
            raise click.BadParameter(str(e)) from None

    return check


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    "home",
    envvar="AIID_HOME",
    default=".aiid",
    show_default=True,
    help="aiid home directory ($AIID_HOME).",
)
@click.version_option(package_name="aiid-proxy")
@click.pass_context
def main_group(ctx: click.Context, home: str) -> None:
    """aiid-proxy: identity and access gateway between AI agents and LLM providers."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = Home.resolve(home)


# -- init / tenant ------------------------------------------------------------
@main_group.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the home: keys and CA. Never overwrites an existing key."""
    from aiid_proxy.admin import init_home

    home = _home(ctx)
    created = init_home(home)
    for item in created:
        click.echo(f"created {item}")
    if not created:
        click.echo(f"home {home.root} already initialised; nothing overwritten")
    click.echo(f"agents trust: {home.ca_cert_path}")


@main_group.group()
def tenant() -> None:
    """Manage tenants."""


@tenant.command("add")
@click.argument("name", callback=_name("tenant"))
@click.option("--region", default=None, help="tenant region, e.g. eu or us")
@click.pass_context
def tenant_add(ctx: click.Context, name: str, region: str | None) -> None:
    """Register tenant NAME and create its databases."""
    from aiid_proxy.admin import add_tenant

    home = _home(ctx)
    home.require()
    if region is not None:
        validate_name("region", region)
        known = _known_regions(_policies_dir(None))
        if region not in known:
            raise UsageError(
                f"unknown region {region!r}: no provider is in it (known: {', '.join(known)}; "
                "a providers.yaml in the policy directory can add providers)"
            )
    if add_tenant(home, name, region):
        click.echo(f"tenant {name} added")
        return
    current = home.tenant_region(name)
    if region is not None and region != current:
        raise ConfigError(
            f"tenant {name} already exists with region {current or 'none'}; its region is "
            "set when it is added and is not changed"
        )
    click.echo(f"tenant {name} already exists")


def _registry(policies: Path) -> Any:
    """The providers a gateway with this policy directory knows: built in, and its
    providers.yaml."""
    from aiid_proxy.providers import Registry

    path = policies / "providers.yaml"
    return Registry.load(path) if path.is_file() else Registry.builtin()


def _known_regions(policies: Path) -> list[str]:
    """The regions of the providers this gateway knows."""
    return sorted({p.region for p in _registry(policies).providers if p.region})


@tenant.command("list")
@click.pass_context
def tenant_list(ctx: click.Context) -> None:
    """List tenants."""
    home = _home(ctx)
    home.require()  # no home is an error, as for every other command, not an empty list
    for t in home.tenants():
        click.echo(f"{t}\tregion={home.tenant_region(t) or '-'}")


# -- vault ----------------------------------------------------------------------
@main_group.group()
def vault() -> None:
    """Provider keys, encrypted at rest."""


def _vault(home: Home, tenant_name: str) -> Any:
    from aiid_proxy.vault import MasterKeyring, Vault

    home.require()
    home.require_tenant(tenant_name)
    return Vault(home.vault_path(tenant_name), tenant_name, MasterKeyring(home.master_keys()))


@vault.command("put")
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.argument("provider", callback=_name("provider"))
@click.option("--from-env", "from_env", default=None, help="read the secret from this variable")
@click.pass_context
def vault_put(ctx: click.Context, tenant_name: str, provider: str, from_env: str | None) -> None:
    """Store PROVIDER's key for TENANT, read from stdin (or --from-env)."""
    if from_env is not None:
        secret = os.environ.get(from_env)
        if not secret:
            raise UsageError(f"environment variable {from_env} is not set or empty")
    else:
        if sys.stdin.isatty():
            click.echo("paste the secret, then Enter and Ctrl-D:", err=True)
        secret = sys.stdin.read()
    secret = secret.strip()  # a line end, or spaces pasted around the key: never part of it
    if not secret or "\n" in secret:
        raise UsageError("expected exactly one non-empty secret line")
    info = _vault(_home(ctx), tenant_name).put(provider, secret)
    click.echo(f"stored {provider} for {tenant_name} (key id {info.key_id})")


@vault.command("list")
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.pass_context
def vault_list(ctx: click.Context, tenant_name: str) -> None:
    """Providers, key ids, created/rotated times; never the secret."""
    rows = _vault(_home(ctx), tenant_name).list()
    click.echo(f"{'PROVIDER':<20} {'KEY ID':<18} {'CREATED':<28} ROTATED")
    for r in rows:
        click.echo(f"{r.provider:<20} {r.key_id:<18} {r.created:<28} {r.rotated or '-'}")


@vault.command("rotate-master")
@click.pass_context
def vault_rotate(ctx: click.Context) -> None:
    """Re-wrap every data key under a new master key."""
    from aiid_proxy.vault import rotate_master

    home = _home(ctx)
    home.require()
    n = rotate_master(home)
    click.echo(f"re-wrapped {n} secrets under a new master key")


# -- tokens ---------------------------------------------------------------------
@main_group.group()
def token() -> None:
    """Agent tokens."""


@token.command("issue")
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.argument("agent", callback=_name("agent"))
@click.option("--ttl", default="15m", show_default=True, help="lifetime, at most 24h")
@click.pass_context
def token_issue(ctx: click.Context, tenant_name: str, agent: str, ttl: str) -> None:
    """Print an agent token, alone, on stdout."""
    from aiid_proxy.admin import issue_token, parse_ttl

    home = _home(ctx)
    home.require()
    home.require_tenant(tenant_name)
    click.echo(issue_token(home, tenant_name, agent, parse_ttl(ttl)))


@token.command("revoke")
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.argument("jti")
@click.pass_context
def token_revoke(ctx: click.Context, tenant_name: str, jti: str) -> None:
    """Refuse token JTI from now on (a running gateway too, within 2 s). JTI may also be the
    token itself: it must then be one of this home's tokens for TENANT."""
    from aiid_proxy.admin import revocation_target, revoke_token, was_issued

    home = _home(ctx)
    home.require()
    home.require_tenant(tenant_name)
    jti, expires_at = revocation_target(home, tenant_name, jti)
    revoke_token(home, tenant_name, jti, expires_at)
    if expires_at is None and not was_issued(home, tenant_name, jti):
        # revoked all the same (the token may come from a copy of this home's admin key)
        click.echo(
            f"aiid: warning: this home issued no token {jti} for tenant {tenant_name} "
            "(mistyped?); revoked anyway",
            err=True,
        )
    click.echo(f"revoked {jti}")


# -- run ------------------------------------------------------------------------
@main_group.command(context_settings={"ignore_unknown_options": False})
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT")
@click.option("--policies", default=None, help="policy directory ($AIID_POLICIES, ./policies)")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="OPTION[=VALUE]",
    help="mitmproxy option, as mitmdump --set",
)
@click.option("--no-console", is_flag=True, help="plain log lines instead of the live console")
@click.pass_context
def run(
    ctx: click.Context, listen: str, policies: str | None, sets: Sequence[str], no_console: bool
) -> None:
    """Run the gateway (mitmproxy with the aiid addons)."""
    host, sep, port_s = listen.rpartition(":")
    if not sep or not port_s.isdigit() or not (0 < int(port_s) < 65536):
        raise UsageError(f"--listen must be HOST:PORT, got {listen!r}")
    for s in sets:
        if not s.partition("=")[0].strip():
            raise UsageError(f"--set expects OPTION=VALUE (or OPTION for true), got {s!r}")
    home = _home(ctx)
    home.require()
    policy_dir = _policies_dir(policies)
    if policy_dir.exists() and not policy_dir.is_dir():
        # A missing directory may come later (it is watched); a file never becomes one.
        raise ConfigError(f"policy directory {policy_dir} is not a directory")
    # The gateway's mitmproxy side lives in addons/; imported here only, never by the library.
    import importlib

    runner = importlib.import_module("addons.runner")
    code = runner.run_gateway(
        home=home,
        policies=policy_dir,
        host=host.strip("[]") or "127.0.0.1",
        port=int(port_s),
        sets=list(sets),
        console=not no_console,
    )
    sys.exit(code)


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

    d = Path(directory).absolute() if directory else _policies_dir(policies)
    if not d.is_dir():
        raise ConfigError(f"policy directory {d} does not exist")
    loaded, errors = load_policy_dir(d)
    extras = _check_data_files(d)
    if not any("providers.yaml" in line for line in extras):
        sources = [(p.source, (*p.rules, *p.overrides)) for _, p in sorted(loaded.items())]
        sources += [(e.file, e.rules) for e in errors if e.file and e.rules]
        extras += _region_problems(d, loaded) + _rule_problems(d, sources)
        extras += _shadowed_entries(loaded)
    for e in errors:
        click.echo(e.one_line(), err=True)
    for line in extras:
        click.echo(line, err=True)
    if errors or extras:
        sys.exit(1)
    for name, p in sorted(loaded.items()):
        click.echo(f"ok {name}: {len(p.rules)} rules, {len(p.overrides)} overrides")
    click.echo(f"OK {len(loaded)} policies")


def _region_problems(d: Path, loaded: Mapping[str, Any]) -> list[str]:
    """``region:`` values no provider is in: every provider with a region would be denied."""
    known = _known_regions(d)
    out: list[str] = []
    for _tenant, pol in sorted(loaded.items()):
        if pol.region is None or pol.region in known:
            continue
        try:
            text = Path(pol.source).read_text(encoding="utf-8-sig")
        except OSError:
            text = ""
        line = next(
            (n for n, row in enumerate(text.splitlines(), 1) if row.startswith("region")), None
        )
        where = f"{pol.source}:{line}" if line is not None else str(pol.source)
        out.append(
            f"{where}: unknown region {pol.region!r}: no provider is in it "
            f"(known: {', '.join(known)}; providers.yaml can add providers)"
        )
    return out


def _rule_problems(d: Path, sources: Sequence[tuple[str, Sequence[Any]]]) -> list[str]:
    """Rules that can never match: a provider name no provider has, or a ``hosts`` rule for a
    provider's own host (provider hosts are governed by ``providers``/``models`` rules). Of
    every file: the rules that validated in a file with errors too."""
    registry = _registry(d)
    known = registry.names()
    out: list[str] = []
    for source, rules in sources:
        for rule in rules:
            where = f"{source}:{rule.line}" if rule.line is not None else str(source)
            for name in rule.providers or ():
                if not any(c in name for c in "*?[") and name not in known:
                    out.append(
                        f"{where}: rule {rule.id!r}: unknown provider {name!r}, so the rule "
                        f"never matches (known: {', '.join(known)}; providers.yaml can add more)"
                    )
            for host in rule.hosts or ():
                p = registry.match_host(host) if not any(c in host for c in "*?[") else None
                if p is not None:
                    out.append(
                        f"{where}: rule {rule.id!r}: {host} is provider {p.name!r}'s host, "
                        f"governed by providers/models rules: this hosts rule never matches"
                    )
    return out


def _shadowed_entries(loaded: Mapping[str, Any]) -> list[str]:
    """``limits.agents`` / ``budgets.agents`` entries that never apply: the first glob that
    matches an agent gives its limit, so an entry after ``"*"``, or a name after a glob that
    matches it, is dead."""
    from aiid_proxy.policy.engine import glob_to_regex

    out: list[str] = []
    for _tenant, pol in sorted(loaded.items()):
        try:
            lines = Path(pol.source).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        for section, entries in (("limits", pol.agent_limits), ("budgets", pol.agent_budgets)):
            globs = [g for g, _ in entries]
            for i, glob in enumerate(globs):
                literal = not any(c in glob for c in "*?[")
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
                line = _key_line(lines, section, glob)
                where = f"{pol.source}:{line}" if line else str(pol.source)
                out.append(
                    f"{where}: {section}.agents[{glob!r}] never applies: the earlier "
                    f"{earlier!r} matches first (the first matching glob gives an agent's "
                    f"{'limit' if section == 'limits' else 'budget'}; put specific names first)"
                )
    return out


def _key_line(lines: Sequence[str], section: str, key: str) -> int | None:
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


def _check_data_files(d: Path) -> list[str]:
    """Errors in the policy directory's ``prices.yaml`` and ``providers.yaml``, if present."""
    from aiid_proxy.budget import PRICES_FILE, PriceTable
    from aiid_proxy.errors import ConfigError, PolicyError
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
                known = set(_registry(d).names()) | {"*"}
            except ConfigError:  # providers.yaml is broken: said below, prices not judged
                known = {p.provider for p in table.entries}
            unknown = sorted({p.provider for p in table.entries if p.source != "builtin"} - known)
            try:
                lines = prices.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError):
                lines = []
            for name in unknown:
                line = _key_line(lines, "prices", name)
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
        elif k in ("temperature", "top_p"):
            try:
                out[k] = float(v)
            except ValueError:
                raise UsageError(f"--param {k} must be a number") from None
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
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.option("--agent", required=True, callback=_name("agent"))
@click.option("--provider", default=None, callback=_name("provider"))
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
    d = _policies_dir(policies)
    f = d / f"{tenant_name}.yaml"
    if not f.exists():
        raise ConfigError(f"no policy file {f}")
    pol = load_policy_file(f)
    now = time.time()
    if at is not None:
        try:
            now = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise UsageError(f"--at must be an ISO 8601 time, got {at!r}") from None
    region = None
    registry = _registry(d)
    if provider is not None:
        try:
            prov = registry.get(provider)
        except (AiidError, KeyError):
            raise UsageError(f"unknown provider {provider!r}") from None
        region = prov.region
        host = host or (prov.hosts[0] if prov.hosts else provider)
    else:
        # what the gateway decides before any rule: the path, and a provider's own host
        # (governed by providers/models rules, never by hosts rules)
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
        if refused is not None:
            click.echo("decision: deny")
            click.echo(f"rule: {refused[0]}")
            click.echo(f"reason: {refused[1]} (refused before any rule is looked at)")
            return
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
        tenant_region=_registered_region(_home(ctx), tenant_name),
        **_param(params),
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
    if dec.reason:
        click.echo(f"reason: {dec.reason}")
    if dec.override:
        click.echo(f"override: {dec.override}")
    click.echo("considered:")
    for tr in ex.traces:
        mark = "match" if tr.matched else "skip "
        click.echo(f"  {mark} {tr.kind:<8} {tr.rule_id:<28} {tr.effect or '':<8} {tr.why}")


# -- audit ----------------------------------------------------------------------
@main_group.group()
def audit() -> None:
    """The tenant's tamper-evident audit log."""


def _exported_anchors(
    home: Home, tenant_name: str, files: Sequence[str], key_file: str | None
) -> list[Any]:
    """Anchors from ``admin/checkpoints/<t>`` (if present) and every ``--checkpoint FILE``;
    a forged, altered or other tenant's signed line fails the verification (exit 1)."""
    from aiid_proxy.admin import checkpoint_key_paths, checkpoint_log_path
    from aiid_proxy.audit.signed import CheckpointError, load_public_key, read_exported

    paths = [Path(f) for f in files]

    def present(path: Path) -> bool:  # admin/ may be closed to whoever runs verify
        try:
            return path.exists()
        except OSError:
            return False

    own = checkpoint_log_path(home, tenant_name)
    if present(own):
        paths.insert(0, own)
    if not paths:
        return []
    pub_path = Path(key_file) if key_file else checkpoint_key_paths(home)[1]
    public_key = load_public_key(pub_path) if key_file or present(pub_path) else None
    anchors: list[Any] = []
    for p in paths:
        try:
            anchors += read_exported(p, tenant_name, public_key)
        except CheckpointError as e:
            click.echo(f"FAILED: {e}")
            sys.exit(1)
    return anchors


def _verify_failed(res: Any, suffix: str = "") -> NoReturn:
    where = f" at seq {res.first_bad_seq}" if res.first_bad_seq is not None else ""
    line = f"FAILED{where}: {res.reason}{suffix}"
    click.echo(line)  # the command's result, for scripts reading stdout
    click.echo(f"aiid: error: audit chain {line}", err=True)
    sys.exit(1)


@audit.command("verify")
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.option("--expect-head", default=None, metavar="SEQ:MAC")
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    metavar="FILE",
    help="exported checkpoints (`aiid audit checkpoint` lines or SEQ:MAC) the chain must reach",
)
@click.option(
    "--checkpoint-key",
    default=None,
    metavar="PEM",
    help="public key that signed the checkpoints (default admin/checkpoint.pub)",
)
@click.pass_context
def audit_verify(
    ctx: click.Context,
    tenant_name: str,
    expect_head: str | None,
    checkpoints: Sequence[str],
    checkpoint_key: str | None,
) -> None:
    """Exit 0 and `OK <n> records` when the chain holds; exit 1 naming the first bad seq."""
    from aiid_proxy.audit import parse_head, tenant_key, verify_db

    home = _home(ctx)
    home.require()
    home.require_tenant(tenant_name)
    head = parse_head(expect_head) if expect_head else None
    path = home.audit_path(tenant_name)
    if not path.exists():
        raise AiidError(f"no audit database for tenant {tenant_name} at {path}")
    exported = _exported_anchors(home, tenant_name, checkpoints, checkpoint_key)
    res = verify_db(
        path,
        tenant_key(home.audit_key(), tenant_name),
        checkpoint_path=home.checkpoint_path(tenant_name),
        expect_head=head,
        exported=exported,
    )
    if res.ok:
        click.echo(f"OK {res.count} records")  # exactly the contract's line on stdout
        if res.head:  # for a later `--expect-head`, without changing that line
            click.echo(f"head {res.head[0]}:{res.head[1]}", err=True)
        if exported:
            signed = sum(1 for a in exported if a.signed)
            last = max(a.seq for a in exported)
            click.echo(
                f"reached {len(exported)} exported checkpoint(s) ({signed} signed), "
                f"the latest at seq {last}"
            )
        return
    _verify_failed(res)


@audit.command("checkpoint")
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.option("--out", default=None, metavar="FILE", help="also append the line to FILE")
@click.pass_context
def audit_checkpoint(ctx: click.Context, tenant_name: str, out: str | None) -> None:
    """Verify the chain, then print its head signed with the admin checkpoint key.

    Keep the line where the gateway host cannot write: `aiid audit verify --checkpoint FILE`
    then detects any later rewrite of the records it covers, even with the audit key.
    """
    from aiid_proxy.admin import checkpoint_key_paths, checkpoint_log_path
    from aiid_proxy.audit import GENESIS_MAC, tenant_key, verify_db
    from aiid_proxy.audit.signed import append_line, load_or_create_key, sign_checkpoint

    home = _home(ctx)
    home.require()
    home.require_tenant(tenant_name)
    path = home.audit_path(tenant_name)
    if not path.exists():
        raise AiidError(f"no audit database for tenant {tenant_name} at {path}")
    res = verify_db(
        path,
        tenant_key(home.audit_key(), tenant_name),
        checkpoint_path=home.checkpoint_path(tenant_name),
        exported=_exported_anchors(home, tenant_name, (), None),
    )
    if not res.ok:
        _verify_failed(res, " (nothing signed)")
    private_path, public_path = checkpoint_key_paths(home)
    key, created = load_or_create_key(private_path, public_path)
    if created:
        click.echo(
            f"created the checkpoint signing key {private_path}; auditors need {public_path}",
            err=True,
        )
    line = sign_checkpoint(key, tenant_name, res.head or (0, GENESIS_MAC)).line()
    append_line(checkpoint_log_path(home, tenant_name), line)
    if out:
        append_line(Path(out), line)
    click.echo(line)


@audit.command("tail")
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.option(
    "-n",
    "count",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="records to show first",
)
@click.option("-f", "follow", is_flag=True, help="keep printing new records")
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line")
@click.option(
    "--interval",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0.05, max=3600),
    help="poll interval with -f, seconds",
)
@click.pass_context
def audit_tail(
    ctx: click.Context, tenant_name: str, count: int, follow: bool, as_json: bool, interval: float
) -> None:
    """The latest records, human-readable; -f follows."""
    from aiid_proxy.audit import format_row, read_rows

    home = _home(ctx)
    home.require()
    home.require_tenant(tenant_name)
    path = home.audit_path(tenant_name)
    if not path.exists():
        raise AiidError(f"no audit database for tenant {tenant_name}")
    color = sys.stdout.isatty() and not as_json

    def show(rows: list[dict[str, Any]]) -> int:
        last = 0
        for r in rows:
            if as_json:
                d = dict(r)
                if isinstance(d.get("detail"), str):
                    d["detail"] = json.loads(d["detail"])
                click.echo(json.dumps(d, separators=(",", ":")))
            else:
                line = format_row(r)
                if color:
                    fg = {
                        "deny": "red",
                        "error": "magenta",
                        "response": "green",
                        "approval": "yellow",
                        "held": "yellow",
                        "policy": "cyan",
                    }.get(str(r.get("event")))
                    line = click.style(line, fg=fg)
                click.echo(line)
            last = int(r["seq"])
        return last

    last = show(read_rows(path, last=count)) if count else 0
    if not follow:
        return
    if not last:  # -n 0, or nothing to show: follow from the current end, not from seq 1
        head = read_rows(path, last=1)
        last = int(cast(int, head[0]["seq"])) if head else 0
    try:
        while True:
            time.sleep(interval)
            rows = read_rows(path, after_seq=last)
            if rows:
                last = show(rows)
    except KeyboardInterrupt:
        return


@audit.command("export")
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.pass_context
def audit_export(ctx: click.Context, tenant_name: str, fmt: str) -> None:
    """Every record, one JSON object a line, with its mac."""
    from aiid_proxy.audit import export_jsonl

    home = _home(ctx)
    home.require()
    home.require_tenant(tenant_name)
    path = home.audit_path(tenant_name)
    if not path.exists():
        raise AiidError(f"no audit database for tenant {tenant_name}")
    export_jsonl(path, sys.stdout)


# -- approvals ------------------------------------------------------------------
def _operator() -> str:
    from aiid_proxy.control import operator_name

    return operator_name()


def _answer(home: Home, tenant_name: str, request_id: str, payload: dict[str, Any]) -> None:
    from aiid_proxy.control import send_answer

    home.require()
    home.require_tenant(tenant_name)
    reply = send_answer(home, {"tenant": tenant_name, "request_id": request_id, **payload})
    click.echo(reply)


@main_group.command()
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.argument("request_id")
@click.option(
    "--ttl", default=None, help="also approve matching requests for this long (at most 24h)"
)
@click.option("--as", "who", default=None, help="who decided (default $USER)")
@click.pass_context
def approve(
    ctx: click.Context, tenant_name: str, request_id: str, ttl: str | None, who: str | None
) -> None:
    """Approve a request held by an `approve` rule."""
    from aiid_proxy.admin import parse_ttl

    seconds = parse_ttl(ttl) if ttl else None
    if seconds is not None and not 0 < seconds <= MAX_GRANT:
        raise UsageError(
            f"--ttl must be more than 0 and at most 24h, got {ttl!r} (a standing approval "
            "belongs in the policy's overrides, which expire and are audited)"
        )
    by = who or _operator()
    _answer(_home(ctx), tenant_name, request_id, {"answer": "approve", "ttl": seconds, "by": by})


@main_group.command()
@click.argument("tenant_name", metavar="TENANT", callback=_name("tenant"))
@click.argument("request_id")
@click.option("--reason", default="denied by operator")
@click.option("--as", "who", default=None, help="who decided (default $USER)")
@click.pass_context
def deny(
    ctx: click.Context, tenant_name: str, request_id: str, reason: str, who: str | None
) -> None:
    """Deny a request held by an `approve` rule."""
    by = who or _operator()
    _answer(_home(ctx), tenant_name, request_id, {"answer": "deny", "reason": reason, "by": by})


def _fail(msg: str, code: int) -> NoReturn:
    click.echo(f"aiid: error: {msg}", err=True)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        main_group.main(args=argv, prog_name="aiid", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        _fail("aborted", 1)
    except click.exceptions.NoArgsIsHelpError as e:  # `aiid`, `aiid vault`: the help, whole
        click.echo(e.format_message(), err=True)
        sys.exit(2)
    except click.UsageError as e:
        _fail(" ".join(e.format_message().split()), 2)
    except click.ClickException as e:
        _fail(" ".join(e.format_message().split()), 1)
    except UsageError as e:
        _fail(e.one_line(), 2)
    except AiidError as e:
        _fail(e.one_line(), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as e:
        _fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", 1)
    except sqlite3.Error as e:
        _fail(f"database error: {' '.join(str(e).split())}", 1)


if __name__ == "__main__":
    main()
