"""The administrative side: creating the home, tenants, agent tokens and revocations.

Only this module knows where the agent-token signing key lives (``admin/signing.key``); the
gateway's runtime modules never import it. Every key file is created with mode 0600 and
never overwritten.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import os
import re
import sqlite3
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import AiidError, ConfigError, UsageError
from aiid_proxy.home import (
    AUDIT_KEY_ENV,
    MASTER_KEY_ENV,
    Home,
    append_durable,
    encode_key,
    read_private,
    validate_name,
    write_private,
)
from aiid_proxy.identity import ALGORITHM, AUDIENCE, ISSUER, JTI_RE, MAX_LIFETIME
from aiid_proxy.vault import ensure_schema

DEFAULT_TTL = 900.0
CA_COMMON_NAME = "aiid-proxy interception CA"
CA_VALIDITY = dt.timedelta(days=3650)
CA_BASENAME = "mitmproxy"

_TTL_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def signing_key_path(home: Home) -> Path:
    return home.root / "admin" / "signing.key"


def _mkdir_private(path: Path) -> bool:
    """Create ``path`` (and parents) with mode 0700; True if it did not exist."""
    if path.is_dir():
        return False
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return True


def _pem_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_signing_key(home: Home) -> Ed25519PrivateKey:
    path = signing_key_path(home)
    try:
        data = read_private(path).encode()
    except OSError:
        if home.verify_key_path.exists():  # a gateway-only home, or a lost signing key
            raise ConfigError(
                f"token signing key missing: {path}, and this home verifies tokens with "
                f"{home.verify_key_path}: issue tokens where the admin/ that goes with it is; "
                f"if that key is lost, remove {home.verify_key_path.name} and run `aiid init` "
                "(a new key pair: every token issued so far is refused)"
            ) from None
        raise ConfigError(f"token signing key missing: {path} (run `aiid init`)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"token signing key unreadable: {path}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"token signing key unreadable: {path}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"token signing key is not Ed25519: {path}")
    return key


def _create_ca(clock: Clock) -> tuple[bytes, bytes]:
    """A fresh interception CA: (private key PEM + cert PEM, cert PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aiid-proxy"),
        ]
    )
    now = dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC)
    not_before = now - dt.timedelta(days=2)  # tolerate clock skew on agents, as mitmproxy does
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    return key_pem + cert_pem, cert_pem


def _init_ca(home: Home, clock: Clock, created: list[str]) -> None:
    certs = home.certs_dir
    if _mkdir_private(certs):
        created.append("certs/")
    ca_file = certs / f"{CA_BASENAME}-ca.pem"
    cert_files = [home.ca_cert_path, certs / f"{CA_BASENAME}-ca-cert.cer"]
    if ca_file.exists():
        try:
            cert_pem = x509.load_pem_x509_certificate(ca_file.read_bytes()).public_bytes(
                serialization.Encoding.PEM
            )
        except (OSError, ValueError):
            raise ConfigError(f"interception CA unreadable: {ca_file}") from None
    else:
        stale = [p for p in cert_files if p.exists()]
        if stale:
            raise ConfigError(
                f"{ca_file} is missing but {stale[0].name} exists; agents trust that "
                "certificate, so remove the certs/ files to create a new CA"
            )
        bundle, cert_pem = _create_ca(clock)
        write_private(ca_file, bundle)
        created.append(f"certs/{ca_file.name}")
    for path in cert_files:
        if not path.exists():
            write_private(path, cert_pem)
            path.chmod(0o644)  # the certificate is public: agents read it
            created.append(f"certs/{path.name}")


def init_home(
    home: Home, clock: Clock = SYSTEM_CLOCK, env: Mapping[str, str] | None = None
) -> list[str]:
    """Create the home's keys and directories; never overwrite an existing key or CA file.

    Returns what was created, as paths relative to the home (directories end in ``/``).
    Idempotent: a second call returns ``[]`` and changes nothing. If ``runtime/token.pub``
    exists without ``admin/signing.key`` (a gateway-only home), no signing key is made,
    since it could not match the verification key. A missing master or audit key is not
    replaced while vault entries or audit records depend on it (ConfigError), unless ``env``
    (default: the process environment) holds it.
    """
    env = os.environ if env is None else env
    created: list[str] = []
    if not home.root.exists():
        _mkdir_private(home.root)
        created.append("./")
    for rel in ("admin", "runtime", "runtime/checkpoints", "tenants"):
        if _mkdir_private(home.root / rel):
            created.append(rel + "/")

    sk_path = signing_key_path(home)
    pub_path = home.verify_key_path
    if not sk_path.exists() and not pub_path.exists():
        sk = Ed25519PrivateKey.generate()
        write_private(
            sk_path,
            sk.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        created.append("admin/signing.key")
    if sk_path.exists():
        public_pem = _pem_public(_load_signing_key(home))
        if not pub_path.exists():
            write_private(pub_path, public_pem)
            created.append("runtime/token.pub")
        elif pub_path.read_bytes().strip() != public_pem.strip():
            raise ConfigError(
                f"{pub_path} does not match {sk_path}: tokens would be refused; "
                "remove the wrong one and run `aiid init` again"
            )

    for path, env_name, what in (
        (home.master_key_path, MASTER_KEY_ENV, ("vault entries", "wrapped", "open")),
        (home.audit_key_path, AUDIT_KEY_ENV, ("audit records", "chained", "verify")),
    ):
        if path.exists():
            continue
        used = _tenants_with_data(home, path == home.master_key_path)
        if used:
            if env.get(env_name):
                continue  # the key lives in the environment: a file key would not be it
            things, how, verb = what
            whose = f"tenant {used[0]!r}" + (" and others" if len(used) > 1 else "")
            raise ConfigError(
                f"runtime/{path.name} is missing, but the {things} of {whose} are {how} under "
                f"it: restore it from backup, or set {env_name}; a new key would {verb} none "
                "of them"
            )
        write_private(path, (encode_key(os.urandom(32)) + "\n").encode())
        created.append(f"runtime/{path.name}")

    _init_ca(home, clock, created)
    return created


def _tenants_with_data(home: Home, vault: bool) -> list[str]:
    """Tenants whose vault holds an entry (``vault``) or whose audit log holds a record."""
    out: list[str] = []
    for tenant in home.tenants():
        path = home.vault_path(tenant) if vault else home.audit_path(tenant)
        if not path.is_file():
            continue
        sql = "SELECT 1 FROM secrets LIMIT 1" if vault else "SELECT 1 FROM audit LIMIT 1"
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                found = conn.execute(sql).fetchone() is not None
            finally:
                conn.close()
        except sqlite3.Error:
            found = True  # unreadable: assume it holds data rather than orphan it
        if found:
            out.append(tenant)
    return out


def add_tenant(
    home: Home, tenant: str, region: str | None = None, clock: Clock = SYSTEM_CLOCK
) -> bool:
    """Register ``tenant`` and create its databases. False (and no change) if it exists."""
    validate_name("tenant", tenant)
    if region is not None:
        validate_name("region", region)
    home.require()
    settings = home.tenant_settings_path(tenant)
    if settings.exists():
        return False
    tdir = home.tenant_dir(tenant)
    _mkdir_private(tdir)
    ensure_schema(home.vault_path(tenant))
    _create_audit_db(home, tenant)
    created = dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = json.dumps({"name": tenant, "region": region, "created": created}, indent=2) + "\n"
    try:
        # Written last and exclusively: the tenant exists once this file does.
        fd = os.open(settings, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    return True


def _create_audit_db(home: Home, tenant: str) -> None:
    try:
        audit: Any = importlib.import_module("aiid_proxy.audit")
    except ModuleNotFoundError as e:
        if e.name != "aiid_proxy.audit":
            raise
        return  # the audit module creates audit.db itself on first use
    audit_log = getattr(audit, "AuditLog", None)
    if audit_log is not None:
        audit_log(home.audit_path(tenant), tenant, home.audit_key()).close()


def parse_ttl(text: str) -> float:
    """``"15m"``, ``"1h"``, ``"900s"``, ``"900"``, ``"1h30m"``, ``"1.5h"`` -> seconds."""
    s = text.strip().lower() if isinstance(text, str) else ""
    pos, total, units = 0, 0.0, 0
    while pos < len(s):
        m = _TTL_RE.match(s, pos)
        if m is None or (m.group(2) == "" and (units or m.end() != len(s))):
            raise UsageError(f"invalid duration {text!r}: use e.g. 900, 900s, 15m, 1h or 1d")
        total += float(m.group(1)) * _TTL_UNITS[m.group(2)]
        pos, units = m.end(), units + 1
    if units == 0 or not math.isfinite(total):
        raise UsageError(f"invalid duration {text!r}: use e.g. 900, 900s, 15m, 1h or 1d")
    return total


def issue_token(
    home: Home,
    tenant: str,
    agent: str,
    ttl_seconds: float = DEFAULT_TTL,
    clock: Clock = SYSTEM_CLOCK,
) -> str:
    """Sign an agent token (JWT, EdDSA) for ``agent`` of ``tenant``, valid ``ttl_seconds``."""
    validate_name("tenant", tenant)
    validate_name("agent", agent)
    if (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, int | float)
        or not math.isfinite(ttl_seconds)
        or not 0 < ttl_seconds <= MAX_LIFETIME
    ):
        raise UsageError(f"token lifetime must be more than 0 and at most {MAX_LIFETIME // 3600}h")
    home.require_tenant(tenant)
    key = _load_signing_key(home)
    pub_path = home.verify_key_path
    if pub_path.exists() and pub_path.read_bytes().strip() != _pem_public(key).strip():
        raise ConfigError(f"{pub_path} does not match the signing key: tokens would be refused")
    now = clock.now()
    # iat is the issue second (rounded down: a verifier such as PyJWT refuses an iat ahead of
    # its clock) and exp - iat is exactly the lifetime asked for (whole seconds, rounded up),
    # as a reader of the claims expects: 900 for the default 15 minutes. The token is valid
    # from iat, so for less than a second less than its ttl from the moment it is issued.
    iat = int(now)
    exp = iat + min(MAX_LIFETIME, math.ceil(ttl_seconds))
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": agent,
        "tid": tenant,
        "jti": uuid.uuid4().hex,
        "iat": iat,
        "exp": exp,
    }
    token = jwt.encode(claims, key, algorithm=ALGORITHM, headers={"typ": "JWT"})
    ledger = issued_path(home, tenant)
    ledger.parent.mkdir(mode=0o700, exist_ok=True)
    append_durable(ledger, f"{claims['jti']} {agent} {exp}\n", 0o600)
    return token


def issued_path(home: Home, tenant: str) -> Path:
    """The ids of the tokens issued for ``tenant`` (``jti agent exp`` a line), in ``admin/``:
    so that ``aiid token revoke`` can tell a mistyped id from a real one."""
    return home.root / "admin" / "issued" / validate_name("tenant", tenant)


def was_issued(home: Home, tenant: str, jti: str) -> bool:
    """Whether this home issued a token ``jti`` for ``tenant`` (per its ledger)."""
    try:
        with issued_path(home, tenant).open(encoding="ascii", errors="replace") as f:
            return any(line.split(" ", 1)[0] == jti for line in f)
    except OSError:
        return False


def revoke_token(home: Home, tenant: str, jti: str, expires_at: int | None = None) -> None:
    """Append ``jti`` to the tenant's revocation file (fsync'd); a running gateway follows."""
    validate_name("tenant", tenant)
    if not isinstance(jti, str) or JTI_RE.fullmatch(jti) is None:
        raise UsageError("invalid token id: expected 1-128 characters of A-Z a-z 0-9 _ -")
    if expires_at is not None and (
        isinstance(expires_at, bool) or not isinstance(expires_at, int) or expires_at < 0
    ):
        raise UsageError("invalid expiry for revocation")
    home.require_tenant(tenant)
    path = home.revoked_path(tenant)
    append_durable(path, f"{jti} {expires_at or 0}\n", 0o644)


def revocation_target(home: Home, tenant: str, value: str) -> tuple[str, int | None]:
    """(jti, exp) to revoke, from a token id, or from a whole token (``aiid token revoke`` takes
    either): a token must carry the admin key's signature (expired or not) and name ``tenant``."""
    if value.count(".") != 2:
        return value, None
    try:
        claims = jwt.decode(
            value,
            home.verify_key_pem(),
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
    except jwt.PyJWTError:
        raise UsageError("not a token of this home (bad signature or claims)") from None
    if claims.get("tid") != tenant:  # the data, not the command line, is wrong: exit 1
        raise AiidError(f"that token belongs to tenant {claims.get('tid')!r}, not {tenant!r}")
    jti, exp = claims.get("jti"), claims.get("exp")
    if not isinstance(jti, str):
        raise UsageError("that token carries no token id")
    return jti, exp if isinstance(exp, int) and not isinstance(exp, bool) else None


# -- audit checkpoints ------------------------------------------------------------------
def checkpoint_key_paths(home: Home) -> tuple[Path, Path]:
    """The audit checkpoint signing key and its public half. In ``admin/``: a gateway (or a
    thief of ``runtime/``) can neither read the key nor sign a checkpoint."""
    admin = home.root / "admin"
    return admin / "checkpoint.key", admin / "checkpoint.pub"


def checkpoint_log_path(home: Home, tenant: str) -> Path:
    """Signed checkpoints made by ``aiid audit checkpoint``, kept in ``admin/`` too and
    checked by every ``aiid audit verify``."""
    return home.root / "admin" / "checkpoints" / validate_name("tenant", tenant)
