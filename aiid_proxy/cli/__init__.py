"""The ``aiid`` command line. Errors become one line on stderr (exit 1; 2 for usage).

One module per command group: :mod:`.manage` (init, tenant, vault, token, run, approve,
deny), :mod:`.policy` and :mod:`.audit`; :mod:`.base` holds the root group.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Sequence

import click

from aiid_proxy.cli import audit, manage, policy  # noqa: F401  (registers the commands)
from aiid_proxy.cli.base import fail, main_group
from aiid_proxy.errors import AiidError, UsageError


def main(argv: Sequence[str] | None = None) -> None:
    try:
        main_group.main(args=argv, prog_name="aiid", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        fail("aborted", 1)
    except click.exceptions.NoArgsIsHelpError as e:  # `aiid`, `aiid vault`: the help, whole
        click.echo(e.format_message(), err=True)
        sys.exit(2)
    except click.UsageError as e:
        fail(" ".join(e.format_message().split()), 2)
    except click.ClickException as e:
        fail(" ".join(e.format_message().split()), 1)
    except UsageError as e:
        fail(e.one_line(), 2)
    except AiidError as e:
        fail(e.one_line(), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except OSError as e:
        fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", 1)
    except sqlite3.Error as e:
        fail(f"database error: {' '.join(str(e).split())}", 1)


if __name__ == "__main__":
    main()
