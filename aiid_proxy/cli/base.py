"""What every ``aiid`` command shares: the root group, the home, name checks."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from aiid_proxy.errors import AiidError
from aiid_proxy.home import Home, validate_name

if TYPE_CHECKING:
    from aiid_proxy.providers import Registry


def home_of(ctx: click.Context) -> Home:
    home: Home = ctx.obj["home"]
    return home


def registered_region(home: Home, tenant: str) -> str | None:
    """The region the tenant was registered with (``tenant add --region``), when the home
    knows the tenant; ``policy explain`` works from policy files alone otherwise."""
    if not home.tenant_settings_path(tenant).is_file():
        return None
    return home.tenant_region(tenant)


def policies_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("AIID_POLICIES") or "policies").absolute()


def checked_name(kind: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
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


def provider_registry(policies: Path) -> Registry:
    """The providers a gateway with this policy directory knows: built in, and its
    providers.yaml."""
    from aiid_proxy.providers import Registry

    path = policies / "providers.yaml"
    return Registry.load(path) if path.is_file() else Registry.builtin()


def known_regions(policies: Path) -> list[str]:
    """The regions of the providers this gateway knows."""
    return sorted({p.region for p in provider_registry(policies).providers if p.region})


def fail(msg: str, code: int) -> NoReturn:
    click.echo(f"aiid: error: {msg}", err=True)
    sys.exit(code)
