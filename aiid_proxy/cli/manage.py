"""``aiid init``, ``tenant``, ``vault``, ``token``, ``run``, ``approve`` and ``deny``."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from aiid_proxy.cli.base import checked_name, home_of, known_regions, main_group, policies_dir
from aiid_proxy.control import MAX_GRANT, MAX_MESSAGE
from aiid_proxy.errors import ConfigError, UsageError
from aiid_proxy.home import Home, validate_name

if TYPE_CHECKING:
    from aiid_proxy.vault import MasterKeyring

MAX_REASON = 1000  # characters of a `deny --reason` (the agent is shown it)


# -- init / tenant ------------------------------------------------------------
@main_group.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the home: keys and CA. Never overwrites an existing key."""
    from aiid_proxy.admin import init_home, signing_key_path

    home = home_of(ctx)
    created = init_home(home)
    for item in created:
        click.echo(f"created {item}")
    if not created:
        click.echo(f"home {home.root} already initialised; nothing overwritten")
    if not signing_key_path(home).exists():
        click.echo(
            f"note: no token signing key ({signing_key_path(home)}): tokens are verified with "
            f"{home.verify_key_path} and issued where its admin/ is; if that key is lost, "
            f"remove {home.verify_key_path.name} and run `aiid init` again (every token "
            "issued so far is then refused)",
            err=True,
        )
    click.echo(f"agents trust: {home.ca_cert_path}")


@main_group.group()
def tenant() -> None:
    """Manage tenants."""


@tenant.command("add")
@click.argument("name", callback=checked_name("tenant"))
@click.option("--region", default=None, help="tenant region, e.g. eu or us")
@click.pass_context
def tenant_add(ctx: click.Context, name: str, region: str | None) -> None:
    """Register tenant NAME and create its databases."""
    from aiid_proxy.admin import add_tenant

    home = home_of(ctx)
    home.require()
    if region is not None:
        validate_name("region", region)
        known = known_regions(policies_dir(None))
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


@tenant.command("list")
@click.pass_context
def tenant_list(ctx: click.Context) -> None:
    """List tenants."""
    home = home_of(ctx)
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
    path = home.vault_path(tenant_name)
    # Vault() would create an empty one (also in a truncated file): a lost vault is noticed
    if not path.is_file() or path.stat().st_size == 0:
        what = "missing" if not path.is_file() else "empty (truncated?)"
        raise ConfigError(
            f"tenant {tenant_name!r}: vault database {what}: {path} (restore it from backup; "
            "an empty one is not created in its place)"
        )
    return Vault(path, tenant_name, MasterKeyring(home.master_keys()))


@vault.command("put")
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
@click.argument("provider", callback=checked_name("provider"))
@click.option("--from-env", "from_env", default=None, help="read the secret from this variable")
@click.pass_context
def vault_put(ctx: click.Context, tenant_name: str, provider: str, from_env: str | None) -> None:
    """Store PROVIDER's key for TENANT, read from stdin (or --from-env)."""
    home = home_of(ctx)
    v = _vault(home, tenant_name)  # an unknown tenant is said before any secret is asked for
    if from_env is not None:
        secret = os.environ.get(from_env)
        if not secret:
            raise UsageError(f"environment variable {from_env} is not set or empty")
    else:
        if sys.stdin.isatty():  # typed or pasted at a terminal: not shown on the screen
            import getpass

            secret = getpass.getpass("paste the secret (not shown), then Enter: ")
        else:
            secret = sys.stdin.read()
    secret = secret.strip()  # a line end, or spaces pasted around the key: never part of it
    if not secret or "\n" in secret:
        raise UsageError("expected exactly one non-empty secret line")
    if not v.list():  # its own entries are what Vault.put checks the key against
        _same_key_as_the_other_tenants(home, tenant_name, v.keyring)
    info = v.put(provider, secret)
    click.echo(f"stored {provider} for {tenant_name} (key id {info.key_id})")


def _same_key_as_the_other_tenants(home: Home, tenant_name: str, keyring: MasterKeyring) -> None:
    """The gateway opens every tenant's vault with one master key: a key that opens no
    entry of another tenant (a stray AIID_MASTER_KEY) is refused, also for a tenant's first
    entry, which ``Vault.put`` has nothing of its own to check against. Other vaults are read
    read-only, and one that cannot be read is skipped (never repaired into an empty one)."""
    from aiid_proxy.vault import wrong_master_key

    for other in home.tenants():
        path = home.vault_path(other)
        if other == tenant_name or not path.is_file():
            continue
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
            try:
                entries = conn.execute("SELECT provider, key_id FROM secrets").fetchall()
            finally:
                conn.close()
        except (sqlite3.Error, OSError):
            continue  # another tenant's damaged vault is no reason to refuse this one
        for provider, key_id in entries:
            if key_id not in keyring:
                raise wrong_master_key(other, str(provider), str(key_id), keyring.current_id)
        if entries:
            return  # the key opens a vault the gateway opens with it: proof enough


@vault.command("list")
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
@click.pass_context
def vault_list(ctx: click.Context, tenant_name: str) -> None:
    """Providers, key ids, created/rotated times; never the secret."""
    rows = _vault(home_of(ctx), tenant_name).list()
    click.echo(f"{'PROVIDER':<20} {'KEY ID':<18} {'CREATED':<28} ROTATED")
    for r in rows:
        click.echo(f"{r.provider:<20} {r.key_id:<18} {r.created:<28} {r.rotated or '-'}")


@vault.command("rotate-master")
@click.pass_context
def vault_rotate(ctx: click.Context) -> None:
    """Re-wrap every data key under a new master key."""
    from aiid_proxy.vault import rotate_master

    home = home_of(ctx)
    home.require()
    n = rotate_master(home)
    click.echo(f"re-wrapped {n} secrets under a new master key")


# -- tokens ---------------------------------------------------------------------
@main_group.group()
def token() -> None:
    """Agent tokens."""


@token.command("issue")
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
@click.argument("agent", callback=checked_name("agent"))
@click.option("--ttl", default="15m", show_default=True, help="lifetime, at most 24h")
@click.pass_context
def token_issue(ctx: click.Context, tenant_name: str, agent: str, ttl: str) -> None:
    """Print an agent token, alone, on stdout."""
    from aiid_proxy.admin import issue_token, parse_ttl

    home = home_of(ctx)
    home.require()
    home.require_tenant(tenant_name)
    click.echo(issue_token(home, tenant_name, agent, parse_ttl(ttl)))


@token.command("revoke")
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
@click.argument("jti")
@click.pass_context
def token_revoke(ctx: click.Context, tenant_name: str, jti: str) -> None:
    """Refuse token JTI from now on (a running gateway too, within 2 s). JTI may also be the
    token itself: it must then be one of this home's tokens for TENANT."""
    from aiid_proxy.admin import revocation_target, revoke_token, was_issued
    from aiid_proxy.identity import RevocationList

    home = home_of(ctx)
    home.require()
    home.require_tenant(tenant_name)
    jti, expires_at = revocation_target(home, tenant_name, jti)
    if RevocationList(home).is_revoked(tenant_name, jti):
        click.echo(f"already revoked {jti}")
        return
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
    home = home_of(ctx)
    home.require()
    policy_dir = policies_dir(policies)
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


# -- approvals ------------------------------------------------------------------
def _operator() -> str:
    from aiid_proxy.control import operator_name

    return operator_name()


def _answer(home: Home, tenant_name: str, request_id: str, payload: dict[str, Any]) -> None:
    from aiid_proxy.control import send_answer

    home.require()
    home.require_tenant(tenant_name)
    message = {"tenant": tenant_name, "request_id": request_id, **payload}
    if len(json.dumps(message).encode()) >= MAX_MESSAGE:  # as the control channel counts it
        raise UsageError(f"the answer is over {MAX_MESSAGE} bytes: shorten --reason or --as")
    reply = send_answer(home, message)
    click.echo(reply)


@main_group.command()
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
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

    if ttl is not None and not ttl.strip():
        raise UsageError("--ttl needs a duration, e.g. 10m")
    seconds = parse_ttl(ttl) if ttl else None
    if seconds is not None and not 0 < seconds <= MAX_GRANT:
        raise UsageError(
            f"--ttl must be more than 0 and at most 24h, got {ttl!r} (a standing approval "
            "belongs in the policy's overrides, which expire and are audited)"
        )
    by = who or _operator()
    _answer(home_of(ctx), tenant_name, request_id, {"answer": "approve", "ttl": seconds, "by": by})


@main_group.command()
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
@click.argument("request_id")
@click.option("--reason", default="denied by operator")
@click.option("--as", "who", default=None, help="who decided (default $USER)")
@click.pass_context
def deny(
    ctx: click.Context, tenant_name: str, request_id: str, reason: str, who: str | None
) -> None:
    """Deny a request held by an `approve` rule."""
    if len(reason) > MAX_REASON:
        raise UsageError(f"--reason is at most {MAX_REASON} characters (got {len(reason)})")
    by = who or _operator()
    _answer(home_of(ctx), tenant_name, request_id, {"answer": "deny", "reason": reason, "by": by})
