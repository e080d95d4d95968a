"""YAML policy files -> :class:`Policy`, validated strictly, every error with ``file:line``.

The YAML is read by :mod:`aiid_proxy.policy.yamlsrc`, which keeps the line of every key, value
and list item, refuses duplicate keys and leaves timestamps as strings (so ``expires`` is parsed
in :mod:`aiid_proxy.policy.validate`, with its time zone required).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiid_proxy.errors import PolicyError
from aiid_proxy.home import NAME_RE
from aiid_proxy.policy.model import Policy
from aiid_proxy.policy.validate import compile_policy
from aiid_proxy.policy.yamlsrc import parse_yaml

POLICY_SUFFIXES = (".yaml", ".yml")
# Files in the policies directory that are not tenant policies (read by other components).
NON_POLICY_FILES = frozenset({"prices.yaml", "prices.yml", "providers.yaml", "providers.yml"})

MAX_POLICY_BYTES = 256 * 1024
"""Parsing runs in the gateway (~0.7 s for 256 KiB, 3 s for 1 MiB on the 2-core host): a
bigger file would delay the edits after it past the 2 s the contract gives a reload."""


# -- public entry points -------------------------------------------------------------------------


def _load(text: str, filename: str, expected_tenant: str | None, source_hash: str) -> Policy:
    return compile_policy(parse_yaml(text, filename), filename, expected_tenant, source_hash)


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
