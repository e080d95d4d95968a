from __future__ import annotations

import base64
import json
import math
import sqlite3
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from aiid_proxy.admin import (
    add_tenant,
    init_home,
    issue_token,
    parse_ttl,
    revoke_token,
    signing_key_path,
)
from aiid_proxy.clock import FakeClock
from aiid_proxy.errors import ConfigError, InvalidName, TokenError, UsageError
from aiid_proxy.home import Home
from aiid_proxy.identity import AUDIENCE, ISSUER, RevocationList, TokenVerifier

EXPECTED_FILES = [
    "admin/signing.key",
    "runtime/token.pub",
    "runtime/master.key",
    "runtime/audit.key",
    "certs/mitmproxy-ca.pem",
    "certs/mitmproxy-ca-cert.pem",
    "certs/mitmproxy-ca-cert.cer",
]


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def home(tmp_path: Path, clock: FakeClock) -> Home:
    h = Home(tmp_path / "home")
    init_home(h, clock)
    assert add_tenant(h, "acme", "eu", clock)
    return h


def verifier_for(home: Home, clock: FakeClock) -> TokenVerifier:
    return TokenVerifier(home.verify_key_pem(), RevocationList(home, clock), home.tenants, clock)


# -- init ---------------------------------------------------------------------------------


def test_init_creates_everything_then_is_idempotent(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    created = init_home(home)
    for rel in EXPECTED_FILES:
        assert rel in created
        assert (home.root / rel).is_file()
    for rel in ("admin/", "runtime/", "runtime/checkpoints/", "tenants/", "certs/"):
        assert rel in created
    before = snapshot(home.root)
    assert init_home(home) == []
    assert snapshot(home.root) == before


@pytest.mark.parametrize(
    ("key", "env_name", "needle"),
    [
        pytest.param("master.key", "AIID_MASTER_KEY", "vault entries", id="master"),
        pytest.param("audit.key", "AIID_AUDIT_KEY", "audit records", id="audit"),
    ],
)
def test_init_does_not_replace_a_lost_key_that_data_depends_on(
    tmp_path: Path, key: str, env_name: str, needle: str
) -> None:
    from aiid_proxy.audit import AuditLog
    from aiid_proxy.vault import MasterKeyring, Vault

    home = Home(tmp_path / "h")
    init_home(home, env={})
    assert add_tenant(home, "acme")
    with Vault(home.vault_path("acme"), "acme", MasterKeyring.from_home(home, {})) as v:
        v.put("openai", "sk-x")
    with AuditLog(home.audit_path("acme"), "acme", home.audit_key({})) as log:
        log.append_sync("request")
    lost = home.runtime_dir / key
    lost.unlink()
    with pytest.raises(ConfigError) as err:
        init_home(home, env={})
    assert f"runtime/{key} is missing, but the {needle} of tenant 'acme' are " in str(err.value)
    assert f"restore it from backup, or set {env_name}" in str(err.value)
    assert not lost.exists()  # nothing made up in its place
    assert init_home(home, env={env_name: "x"}) == []  # the key lives in the environment
    assert not lost.exists()


def test_init_makes_a_missing_key_when_nothing_depends_on_it(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    init_home(home, env={})
    assert add_tenant(home, "acme")  # no vault entry, no audit record yet
    (home.runtime_dir / "master.key").unlink()
    assert init_home(home, env={}) == ["runtime/master.key"]


PRESEEDED = [
    pytest.param("admin/signing.key", ["runtime/token.pub"], id="signing-key"),
    pytest.param("runtime/token.pub", [], id="token-pub-alone"),
    pytest.param("runtime/master.key", [], id="master-key"),
    pytest.param("runtime/audit.key", [], id="audit-key"),
    pytest.param(
        "certs/mitmproxy-ca.pem",
        ["certs/mitmproxy-ca-cert.pem", "certs/mitmproxy-ca-cert.cer"],
        id="ca-bundle",
    ),
]


@pytest.mark.parametrize(("rel", "derived"), PRESEEDED)
def test_init_never_overwrites_a_preexisting_file(
    tmp_path: Path, rel: str, derived: list[str]
) -> None:
    """A key or CA already there is kept byte for byte; what derives from it matches it."""
    other = Home(tmp_path / "other")
    init_home(other)
    seeded = (other.root / rel).read_bytes()
    home = Home(tmp_path / "h")
    (home.root / rel).parent.mkdir(parents=True)
    (home.root / rel).write_bytes(seeded)
    (home.root / rel).chmod(0o600)  # a key open to others is refused (test_cli)
    mtime = (home.root / rel).stat().st_mtime_ns
    created = init_home(home)
    assert rel not in created
    assert (home.root / rel).read_bytes() == seeded
    assert (home.root / rel).stat().st_mtime_ns == mtime
    for d in derived:
        assert d in created
        assert (home.root / d).read_bytes() == (other.root / d).read_bytes()


@pytest.mark.parametrize(
    ("rel", "mode"),
    [
        pytest.param("admin/signing.key", 0o600, id="signing-key"),
        pytest.param("runtime/token.pub", 0o600, id="token-pub"),
        pytest.param("runtime/master.key", 0o600, id="master-key"),
        pytest.param("runtime/audit.key", 0o600, id="audit-key"),
        pytest.param("certs/mitmproxy-ca.pem", 0o600, id="ca-bundle-with-key"),
        pytest.param("certs/mitmproxy-ca-cert.pem", 0o644, id="ca-cert-public"),
        pytest.param("certs/mitmproxy-ca-cert.cer", 0o644, id="ca-cer-public"),
        pytest.param("admin", 0o700, id="admin-dir"),
        pytest.param("runtime", 0o700, id="runtime-dir"),
        pytest.param("certs", 0o700, id="certs-dir"),
        pytest.param(".", 0o700, id="home-dir"),
    ],
)
def test_modes(tmp_path: Path, rel: str, mode: int) -> None:
    home = Home(tmp_path / "h")
    init_home(home)
    assert stat.S_IMODE((home.root / rel).stat().st_mode) == mode


def test_keys_are_well_formed(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    init_home(home)
    sk = serialization.load_pem_private_key(signing_key_path(home).read_bytes(), None)
    assert isinstance(sk, Ed25519PrivateKey)
    assert b"BEGIN PRIVATE KEY" in signing_key_path(home).read_bytes()  # PKCS8
    pub = serialization.load_pem_public_key(home.verify_key_pem())
    assert pub.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    ) == sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(home.master_keys({})) == 1
    assert len(home.audit_key({})) == 32
    assert home.master_keys({}) != [home.audit_key({})]
    # the runtime side never needs admin/
    assert b"PRIVATE" not in home.verify_key_pem()


def test_ca_certificate(tmp_path: Path, clock: FakeClock) -> None:
    home = Home(tmp_path / "h")
    init_home(home, clock)
    bundle = (home.certs_dir / "mitmproxy-ca.pem").read_bytes()
    cert_pem = home.ca_cert_path.read_bytes()
    assert (home.certs_dir / "mitmproxy-ca-cert.cer").read_bytes() == cert_pem
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert x509.load_pem_x509_certificates(bundle) == [cert]
    key = serialization.load_pem_private_key(bundle, None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert b"PRIVATE" not in cert_pem
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert ku.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "aiid-proxy interception CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3640 <= days <= 3660
    assert (
        cert.not_valid_before_utc.timestamp() < clock.now() < cert.not_valid_after_utc.timestamp()
    )


def test_ca_loads_in_mitmproxy(tmp_path: Path) -> None:
    certs = pytest.importorskip("mitmproxy.certs")
    home = Home(tmp_path / "h")
    init_home(home)
    ca_before = home.ca_cert_path.read_bytes()
    store = certs.CertStore.from_store(home.certs_dir, "mitmproxy", 2048)
    leaf = store.get_cert("api.openai.com", [])
    assert leaf.cert.issuer == store.default_ca.issuer
    assert home.ca_cert_path.read_bytes() == ca_before  # mitmproxy used ours, made no new CA


def test_init_refuses_mismatched_verification_key(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    init_home(home)
    other = Ed25519PrivateKey.generate().public_key()
    home.verify_key_path.write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError, match="does not match"):
        init_home(home)


def test_gateway_only_home_gets_no_signing_key(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    init_home(home)
    pub = home.verify_key_pem()
    signing_key_path(home).unlink()
    created = init_home(home)
    assert "admin/signing.key" not in created
    assert not signing_key_path(home).exists()
    assert home.verify_key_pem() == pub


def test_token_pub_is_rederived_from_signing_key(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    init_home(home)
    pub = home.verify_key_pem()
    home.verify_key_path.unlink()
    assert init_home(home) == ["runtime/token.pub"]
    assert home.verify_key_pem() == pub


def test_missing_ca_key_with_trusted_cert_present_is_refused(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    init_home(home)
    (home.certs_dir / "mitmproxy-ca.pem").unlink()
    with pytest.raises(ConfigError, match="mitmproxy-ca.pem"):
        init_home(home)


def test_cert_files_rederived_from_ca_bundle(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    init_home(home)
    cert = home.ca_cert_path.read_bytes()
    home.ca_cert_path.unlink()
    assert init_home(home) == ["certs/mitmproxy-ca-cert.pem"]
    assert home.ca_cert_path.read_bytes() == cert


# -- tenants ------------------------------------------------------------------------------


def test_add_tenant(home: Home, clock: FakeClock) -> None:
    data = json.loads(home.tenant_settings_path("acme").read_text())
    assert data == {"name": "acme", "region": "eu", "created": "2027-01-15T08:00:00Z"}
    assert home.tenants() == ["acme"]
    assert home.tenant_region("acme") == "eu"
    vault = home.vault_path("acme")
    assert stat.S_IMODE(vault.stat().st_mode) == 0o600
    with sqlite3.connect(vault) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(secrets)")]
    assert cols == [
        "provider",
        "key_id",
        "wrapped_dek",
        "dek_nonce",
        "nonce",
        "ciphertext",
        "created",
        "rotated",
    ]
    # second add: False, nothing updated
    before = home.tenant_settings_path("acme").read_bytes()
    clock.advance(3600)
    assert add_tenant(home, "acme", "us", clock) is False
    assert home.tenant_settings_path("acme").read_bytes() == before
    assert add_tenant(home, "globex", None, clock) is True
    assert home.tenants() == ["acme", "globex"]
    assert home.tenant_region("globex") is None


def test_add_tenant_creates_the_audit_db(home: Home) -> None:
    path = home.audit_path("acme")
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "audit" in tables


@pytest.mark.parametrize(
    ("tenant", "region", "exc"),
    [
        pytest.param("../evil", None, InvalidName, id="traversal"),
        pytest.param("Acme", None, InvalidName, id="uppercase"),
        pytest.param("", None, InvalidName, id="empty"),
        pytest.param("a" * 64, None, InvalidName, id="too-long"),
        pytest.param("ok", "EU/1", InvalidName, id="bad-region"),
    ],
)
def test_add_tenant_refuses_bad_names(
    home: Home, tenant: str, region: str | None, exc: type
) -> None:
    with pytest.raises(exc):
        add_tenant(home, tenant, region)
    assert home.tenants() == ["acme"]
    assert not (home.tenants_dir.parent / "evil").exists()


def test_add_tenant_needs_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="aiid init"):
        add_tenant(Home(tmp_path / "nothing"), "acme", None)


# -- tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "lifetime"),
    [
        pytest.param(900, 900, id="default-15m"),
        pytest.param(1, 1, id="one-second"),
        pytest.param(0.2, 1, id="sub-second-rounds-up"),
        pytest.param(3600.5, 3601, id="fraction-rounds-up"),
        pytest.param(24 * 3600, 24 * 3600, id="max-24h"),
    ],
)
def test_issue_token_round_trips(home: Home, clock: FakeClock, ttl: float, lifetime: int) -> None:
    token = issue_token(home, "acme", "support-1", ttl, clock)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == {"iss", "aud", "sub", "tid", "jti", "iat", "exp"}
    assert claims["iss"] == ISSUER and claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == lifetime
    ident = verifier_for(home, clock).verify(token)
    assert (ident.tenant, ident.agent, ident.jti) == ("acme", "support-1", claims["jti"])
    assert ident.issued_at == int(clock.now())
    assert len(ident.jti) == 32


@pytest.mark.parametrize(
    ("ttl", "lifetime"), [(1, 1), (0.5, 1), (3, 3), (900, 900), (86400, 86400)]
)
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.977])
def test_a_tokens_claims_carry_exactly_its_lifetime(
    home: Home, clock: FakeClock, ttl: float, lifetime: int, fraction: float
) -> None:
    """exp - iat is the lifetime asked for (901 for the default 15 minutes broke a reader of
    the claims, pass [AA]); iat is never ahead of the clock (PyJWT refuses that); the token is
    refused from exp on."""
    clock.advance(1 - clock.now() % 1 + fraction)  # now = n + fraction
    token = issue_token(home, "acme", "support-1", ttl, clock)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == lifetime
    assert claims["iat"] <= clock.now() < claims["iat"] + 1
    v = verifier_for(home, clock)
    clock.advance(claims["exp"] - clock.now() - 0.001)
    v.verify(token)  # still valid just before exp
    clock.advance(0.002)
    with pytest.raises(TokenError, match="expired"):
        v.verify(token)


def test_issued_tokens_are_distinct(home: Home, clock: FakeClock) -> None:
    jtis = {
        jwt.decode(
            issue_token(home, "acme", "a", clock=clock), options={"verify_signature": False}
        )["jti"]
        for _ in range(50)
    }
    assert len(jtis) == 50


def test_default_ttl_is_15_minutes(home: Home, clock: FakeClock) -> None:
    token = issue_token(home, "acme", "support-1", clock=clock)
    v = verifier_for(home, clock)
    clock.advance(900 - 1)
    v.verify(token)
    clock.advance(1)
    with pytest.raises(TokenError, match="expired"):
        v.verify(token)


@pytest.mark.parametrize(
    "ttl",
    [
        pytest.param(0, id="zero"),
        pytest.param(-5, id="negative"),
        pytest.param(24 * 3600 + 1, id="over-24h"),
        pytest.param(math.nan, id="nan"),
        pytest.param(math.inf, id="inf"),
        pytest.param(True, id="bool"),
        pytest.param("900", id="string"),
    ],
)
def test_issue_token_ttl_bounds(home: Home, ttl: Any) -> None:
    with pytest.raises(UsageError, match="lifetime"):
        issue_token(home, "acme", "support-1", ttl)


@pytest.mark.parametrize(
    ("tenant", "agent", "exc"),
    [
        pytest.param("acme", "Bad Agent", InvalidName, id="bad-agent"),
        pytest.param("../x", "a", InvalidName, id="bad-tenant"),
        pytest.param("initech", "a", ConfigError, id="unknown-tenant"),
    ],
)
def test_issue_token_refuses(home: Home, tenant: str, agent: str, exc: type) -> None:
    with pytest.raises(exc):
        issue_token(home, tenant, agent)


def test_issue_token_without_signing_key(home: Home) -> None:
    signing_key_path(home).unlink()
    with pytest.raises(ConfigError, match="signing key missing"):
        issue_token(home, "acme", "a")


def test_issue_token_refuses_mismatched_verification_key(home: Home) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    home.verify_key_path.write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError, match="does not match"):
        issue_token(home, "acme", "a")


def test_token_does_not_carry_the_signing_key(home: Home) -> None:
    pem = signing_key_path(home).read_bytes()
    body = b"".join(pem.split(b"\n")[1:-2])
    raw = base64.b64decode(body)[-32:]
    token = issue_token(home, "acme", "a")
    assert base64.urlsafe_b64encode(raw).rstrip(b"=").decode() not in token


# -- revocation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_at", "line"),
    [
        pytest.param(None, "{jti} 0", id="no-exp"),
        pytest.param(1_900_000_000, "{jti} 1900000000", id="exp"),
    ],
)
def test_revoke_token(home: Home, clock: FakeClock, expires_at: int | None, line: str) -> None:
    token = issue_token(home, "acme", "support-1", clock=clock)
    other = issue_token(home, "acme", "support-1", clock=clock)
    v = verifier_for(home, clock)
    jti = v.verify(token).jti
    revoke_token(home, "acme", jti, expires_at)
    assert home.revoked_path("acme").read_text() == line.format(jti=jti) + "\n"
    clock.advance(1.1)
    with pytest.raises(TokenError, match="^token revoked$"):
        v.verify(token)
    v.verify(other)
    revoke_token(home, "acme", "second")
    assert home.revoked_path("acme").read_text().splitlines()[1] == "second 0"


@pytest.mark.parametrize(
    ("jti", "expires_at", "exc"),
    [
        pytest.param("", None, UsageError, id="empty"),
        pytest.param("a b", None, UsageError, id="space"),
        pytest.param("a\nb 0\nc", None, UsageError, id="newline-injection"),
        pytest.param("x" * 129, None, UsageError, id="too-long"),
        pytest.param("ok", -1, UsageError, id="negative-exp"),
        pytest.param("ok", True, UsageError, id="bool-exp"),
    ],
)
def test_revoke_token_refuses(home: Home, jti: str, expires_at: Any, exc: type) -> None:
    with pytest.raises(exc):
        revoke_token(home, "acme", jti, expires_at)
    assert not home.revoked_path("acme").exists()


def test_revoke_unknown_tenant(home: Home) -> None:
    with pytest.raises(ConfigError):
        revoke_token(home, "initech", "abc")


# -- ttl parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("900", 900.0, id="bare"),
        pytest.param("900s", 900.0, id="seconds"),
        pytest.param("15m", 900.0, id="minutes"),
        pytest.param("1h", 3600.0, id="hours"),
        pytest.param("1d", 86400.0, id="days"),
        pytest.param("1.5h", 5400.0, id="fraction"),
        pytest.param("1h30m", 5400.0, id="compound"),
        pytest.param(" 10M ", 600.0, id="spaces-case"),
        pytest.param("0", 0.0, id="zero-parses-bounds-elsewhere"),
    ],
)
def test_parse_ttl(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("abc", id="letters"),
        pytest.param("15x", id="unit"),
        pytest.param("-5m", id="negative"),
        pytest.param("1h30", id="bare-after-unit"),
        pytest.param("m", id="unit-only"),
        pytest.param("1e3", id="exponent"),
        pytest.param("nan", id="nan"),
        pytest.param("15 m", id="inner-space"),
    ],
)
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ttl(text)
