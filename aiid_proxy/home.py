"""The home directory layout, name validation and runtime key loading.

Layout (``--home``, else ``$AIID_HOME``, else ``./.aiid``)::

    admin/signing.key            Ed25519 agent-token signing key (read by admin commands only)
    runtime/token.pub            token verification key (public)
    runtime/master.key           vault master keys, one base64 key a line, current first (0600)
    runtime/audit.key            audit HMAC root key, base64 of 32 bytes (0600)
    runtime/checkpoints/<t>      audit heads appended by the gateway, "seq:mac" a line
    certs/                       interception CA (mitmproxy's confdir)
    tenants/<t>/tenant.json      tenant settings (region)
    tenants/<t>/vault.db         encrypted provider secrets
    tenants/<t>/audit.db         HMAC-chained audit log
    tenants/<t>/revoked          revoked token ids, "jti exp" a line

This module knows nothing of ``admin/``: the signing key path lives in :mod:`aiid_proxy.admin`
alone, so the runtime path has no way to reach it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiid_proxy.errors import ConfigError, InvalidName

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

MASTER_KEY_ENV = "AIID_MASTER_KEY"
AUDIT_KEY_ENV = "AIID_AUDIT_KEY"


def child_env(*, package: bool = False) -> dict[str, str]:
    """This process's environment without the key variables, for a child process of ours;
    ``package``: with this package's root first on PYTHONPATH (for ``python -m aiid_proxy...``
    run with ``-P``, which leaves the working directory off sys.path)."""
    env = {k: v for k, v in os.environ.items() if k not in (MASTER_KEY_ENV, AUDIT_KEY_ENV)}
    if package:
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def validate_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a safe tenant/agent/provider name, else raise InvalidName.

    Called before any path is built from a name, so ``../x`` or ``a/b`` never reach the disk.
    """
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        shown = name if isinstance(name, str) and len(name) <= 80 else "<too long>"
        raise InvalidName(f"invalid {kind} name {shown!r}: must match ^[a-z0-9][a-z0-9_-]{{0,62}}$")
    return name


def decode_key(text: str, what: str) -> bytes:
    """Decode a base64 32-byte key, raising ConfigError that never echoes the key."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what} is not valid base64") from None
    if len(raw) != 32:
        raise ConfigError(f"{what} must be 32 bytes, got {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 atomically; never overwrites an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_private(path: Path) -> str:
    """A secret key file's text; refused (ConfigError) when others may read or write it, as
    ssh refuses such a private key: the contract keeps runtime keys 0600."""
    with open(path, encoding="utf-8") as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{path} is open to other users (mode {mode:04o}): chmod 600 {path}")
        return f.read()


def append_durable(path: Path, line: str, mode: int = 0o600) -> None:
    """Append one line to ``path`` (created with ``mode``), fsync the file, and fsync the
    directory when the file is new so the entry survives a crash. Raises OSError."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        data = memoryview(line.encode("ascii"))
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def replace_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` (mode 0600) with ``data``."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    write_private(tmp, data)
    tmp.replace(path)


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None) -> Home:
        if home is None:
            home = os.environ.get("AIID_HOME") or ".aiid"
        return cls(Path(home).expanduser().absolute())

    # -- layout -------------------------------------------------------------
    @property
    def runtime_dir(self) -> Path:
        return self.root / "runtime"

    @property
    def certs_dir(self) -> Path:
        return self.root / "certs"

    @property
    def ca_cert_path(self) -> Path:
        return self.certs_dir / "mitmproxy-ca-cert.pem"

    @property
    def demo_token_path(self) -> Path:
        """The demo agent's token as `make run` last issued it (0600): the console, which
        takes the screen it was printed on, points at it."""
        return self.root / "demo-agent.token"

    @property
    def tenants_dir(self) -> Path:
        return self.root / "tenants"

    @property
    def verify_key_path(self) -> Path:
        return self.runtime_dir / "token.pub"

    @property
    def master_key_path(self) -> Path:
        return self.runtime_dir / "master.key"

    @property
    def audit_key_path(self) -> Path:
        return self.runtime_dir / "audit.key"

    @property
    def checkpoints_dir(self) -> Path:
        return self.runtime_dir / "checkpoints"

    @property
    def control_dir(self) -> Path:
        return self.runtime_dir / "control"

    def checkpoint_path(self, tenant: str) -> Path:
        return self.checkpoints_dir / validate_name("tenant", tenant)

    def tenant_dir(self, tenant: str) -> Path:
        return self.tenants_dir / validate_name("tenant", tenant)

    def vault_path(self, tenant: str) -> Path:
        return self.tenant_dir(tenant) / "vault.db"

    def audit_path(self, tenant: str) -> Path:
        return self.tenant_dir(tenant) / "audit.db"

    def revoked_path(self, tenant: str) -> Path:
        return self.tenant_dir(tenant) / "revoked"

    def tenant_settings_path(self, tenant: str) -> Path:
        return self.tenant_dir(tenant) / "tenant.json"

    # -- state --------------------------------------------------------------
    def require(self) -> None:
        if not self.verify_key_path.exists():
            raise ConfigError(f"no aiid home at {self.root} (run `aiid init` first)")

    def tenants(self) -> list[str]:
        if not self.tenants_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.tenants_dir.iterdir()
            if p.is_dir() and NAME_RE.fullmatch(p.name) and (p / "tenant.json").exists()
        )

    def has_tenant(self, tenant: str) -> bool:
        return self.tenant_settings_path(tenant).exists()

    def require_tenant(self, tenant: str) -> None:
        if not self.has_tenant(tenant):
            raise ConfigError(f"unknown tenant {tenant!r} (run `aiid tenant add {tenant}`)")

    def tenant_region(self, tenant: str) -> str | None:
        try:
            data = json.loads(self.tenant_settings_path(tenant).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"tenant {tenant!r} settings unreadable: {e}") from None
        region = data.get("region")
        return region if isinstance(region, str) else None

    # -- runtime keys -------------------------------------------------------
    def master_keys(self, env: Mapping[str, str] | None = None) -> list[bytes]:
        """Vault master keys, current first. ``$AIID_MASTER_KEY`` overrides the file."""
        env = os.environ if env is None else env
        if env.get(MASTER_KEY_ENV):
            return [decode_key(env[MASTER_KEY_ENV], MASTER_KEY_ENV)]
        try:
            lines = read_private(self.master_key_path).split()
        except OSError:
            raise ConfigError(f"vault master key missing: {self.master_key_path}") from None
        if not lines:
            raise ConfigError(f"vault master key file is empty: {self.master_key_path}")
        return [decode_key(line, "vault master key") for line in lines]

    def audit_key(self, env: Mapping[str, str] | None = None) -> bytes:
        """Audit HMAC root key. ``$AIID_AUDIT_KEY`` overrides the file."""
        env = os.environ if env is None else env
        if env.get(AUDIT_KEY_ENV):
            return decode_key(env[AUDIT_KEY_ENV], AUDIT_KEY_ENV)
        try:
            text = read_private(self.audit_key_path)
        except OSError:
            raise ConfigError(f"audit key missing: {self.audit_key_path}") from None
        return decode_key(text, "audit key")

    def verify_key_pem(self) -> bytes:
        try:
            return self.verify_key_path.read_bytes()
        except OSError:
            raise ConfigError(f"token verification key missing: {self.verify_key_path}") from None
