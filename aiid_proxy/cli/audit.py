"""``aiid audit verify``, ``checkpoint``, ``tail`` and ``export``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

import click

from aiid_proxy.cli.base import checked_name, home_of, main_group
from aiid_proxy.errors import AiidError, ConfigError
from aiid_proxy.home import Home


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

    if key_file is not None and not Path(key_file).is_file():
        raise ConfigError(f"checkpoint key not found: {key_file}")
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
            click.echo(f"FAILED: {e}")  # the command's result, for scripts reading stdout
            click.echo(f"aiid: error: audit chain FAILED: {e}", err=True)
            sys.exit(1)
    return anchors


def _verify_failed(res: Any, suffix: str = "") -> NoReturn:
    where = f" at seq {res.first_bad_seq}" if res.first_bad_seq is not None else ""
    line = f"FAILED{where}: {res.reason}{suffix}"
    click.echo(line)  # the command's result, for scripts reading stdout
    click.echo(f"aiid: error: audit chain {line}", err=True)
    sys.exit(1)


@audit.command("verify")
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
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

    home = home_of(ctx)
    home.require()
    home.require_tenant(tenant_name)
    head = parse_head(expect_head) if expect_head is not None else None  # "" is no head
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
            # the same head in admin/checkpoints and in an --checkpoint file is one checkpoint
            heads = {(a.seq, a.mac) for a in exported}
            signed = len({(a.seq, a.mac) for a in exported if a.signed})
            last = max(a.seq for a in exported)
            click.echo(  # stderr, like the head: stdout is the contract's one line
                f"reached {len(heads)} exported checkpoint(s) ({signed} signed), "
                f"the latest at seq {last}",
                err=True,
            )
        return
    _verify_failed(res)


@audit.command("checkpoint")
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
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

    home = home_of(ctx)
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
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
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

    home = home_of(ctx)
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
@click.argument("tenant_name", metavar="TENANT", callback=checked_name("tenant"))
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.pass_context
def audit_export(ctx: click.Context, tenant_name: str, fmt: str) -> None:
    """Every record, one JSON object a line, with its mac."""
    from aiid_proxy.audit import export_jsonl

    home = home_of(ctx)
    home.require()
    home.require_tenant(tenant_name)
    path = home.audit_path(tenant_name)
    if not path.exists():
        raise AiidError(f"no audit database for tenant {tenant_name}")
    export_jsonl(path, sys.stdout)
