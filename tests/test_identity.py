from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import aiid_proxy.identity as identity_mod
from aiid_proxy.clock import FakeClock
from aiid_proxy.errors import ConfigError, TokenError
from aiid_proxy.home import Home
from aiid_proxy.identity import (
    AUDIENCE,
    ISSUER,
    LEEWAY,
    MAX_LIFETIME,
    MAX_TOKEN_BYTES,
    AgentIdentity,
    RevocationList,
    TokenVerifier,
)

TENANTS = {"acme", "globex"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())


@dataclass
class Ctx:
    home: Home
    clock: FakeClock
    key: Ed25519PrivateKey
    public_pem: bytes
    revocations: RevocationList
    verifier: TokenVerifier

    @property
    def now(self) -> int:
        return int(self.clock.now())

    def claims(self, **over: Any) -> dict[str, Any]:
        c: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "support-1",
            "tid": "acme",
            "jti": "0123456789abcdef0123456789abcdef",
            "iat": self.now,
            "exp": self.now + 900,
        }
        for k, v in over.items():
            if v is DROP:
                c.pop(k, None)
            else:
                c[k] = v
        return c

    def token(self, **over: Any) -> str:
        """A token signed with the right key through PyJWT."""
        return jwt.encode(self.claims(**over), self.key, algorithm="EdDSA")

    def raw(self, header: dict[str, Any], payload: dict[str, Any], key: Any = None) -> str:
        """A token with exactly this header, Ed25519-signed (for header trickery)."""
        signing_input = compact(header, payload)
        sig = (key or self.key).sign(signing_input.encode())
        return signing_input + "." + b64url(sig)


DROP = object()


@pytest.fixture
def ctx(tmp_path: Path) -> Ctx:
    home = Home(tmp_path)
    for t in TENANTS:
        home.tenant_dir(t).mkdir(parents=True)
    clock = FakeClock()
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    rev = RevocationList(home, clock)
    verifier = TokenVerifier(pem, rev, TENANTS, clock)
    return Ctx(home, clock, key, pem, rev, verifier)


def hs256_with_public_pem(c: Ctx) -> str:
    signing_input = compact({"alg": "HS256", "typ": "JWT"}, c.claims())
    sig = hmac.new(c.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def alg_none(c: Ctx) -> str:
    return compact({"alg": "none", "typ": "JWT"}, c.claims()) + "."


def rs256(c: Ctx) -> str:
    return jwt.encode(
        c.claims(), rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"
    )


def es256(c: Ctx) -> str:
    return jwt.encode(c.claims(), ec.generate_private_key(ec.SECP256R1()), "ES256")


def other_ed25519(c: Ctx) -> str:
    return jwt.encode(c.claims(), Ed25519PrivateKey.generate(), "EdDSA")


def embedded_jwk(c: Ctx) -> str:
    """Attacker signs with own key and ships it in the header: must not be honoured."""
    attacker = Ed25519PrivateKey.generate()
    raw_pub = attacker.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw_pub)}
    return c.raw({"alg": "EdDSA", "jwk": jwk}, c.claims(), key=attacker)


def resign_payload_swap(c: Ctx) -> str:
    """A valid token's signature glued onto a different payload."""
    good = c.token()
    h, _, s = good.split(".")
    forged = b64url(json.dumps(c.claims(sub="root")).encode())
    return f"{h}.{forged}.{s}"


Case = Callable[[Ctx], str]

REFUSED: list[Any] = [
    pytest.param(alg_none, "token algorithm not allowed", id="alg-none"),
    pytest.param(
        lambda c: compact({"alg": "None"}, c.claims()) + ".",
        "token algorithm not allowed",
        id="alg-None",
    ),
    pytest.param(hs256_with_public_pem, "token algorithm not allowed", id="hs256-public-pem"),
    pytest.param(rs256, "token algorithm not allowed", id="rs256"),
    pytest.param(es256, "token algorithm not allowed", id="es256"),
    pytest.param(other_ed25519, "bad token signature", id="other-ed25519-key"),
    pytest.param(embedded_jwk, "bad token signature", id="embedded-jwk"),
    pytest.param(resign_payload_swap, "bad token signature", id="payload-swap"),
    *[
        pytest.param(
            (lambda c, claim=claim: c.token(**{claim: DROP})),
            f"token missing claim {claim}",
            id=f"missing-{claim}",
        )
        for claim in ("exp", "iat", "iss", "aud", "sub", "tid", "jti")
    ],
    pytest.param(lambda c: c.token(iss="aiid2"), "wrong token issuer", id="wrong-iss"),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA"}, c.claims(iss=["aiid"])),
        "wrong token issuer",
        id="iss-list",
    ),
    pytest.param(lambda c: c.token(aud="openai"), "wrong token audience", id="wrong-aud"),
    pytest.param(
        lambda c: c.token(aud=[AUDIENCE, "other"]), "wrong token audience", id="aud-list-extra"
    ),
    pytest.param(lambda c: c.token(aud=["other"]), "wrong token audience", id="aud-list-wrong"),
    pytest.param(
        lambda c: c.token(iat=c.now + LEEWAY + 5, exp=c.now + LEEWAY + 900),
        "token issued in the future",
        id="iat-future",
    ),
    pytest.param(lambda c: c.token(nbf=c.now + LEEWAY + 5), "token not yet valid", id="nbf-future"),
    pytest.param(
        lambda c: c.token(exp=c.now + MAX_LIFETIME + 1),
        "token lifetime too long",
        id="lifetime-over-24h",
    ),
    pytest.param(
        lambda c: c.token(iat=c.now - 1000, exp=c.now),
        "token expired",
        id="expired-at-exp",
    ),
    pytest.param(lambda c: c.token(exp=c.now), "malformed token", id="exp-equals-iat"),
    pytest.param(lambda c: c.token(iat=str(1_800_000_000)), "malformed token", id="iat-string"),
    pytest.param(lambda c: c.token(exp=c.now + 900.0), "malformed token", id="exp-float"),
    pytest.param(lambda c: c.token(exp=True), "malformed token", id="exp-bool"),
    pytest.param(lambda c: c.token(nbf="soon"), "malformed token", id="nbf-string"),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "crit": ["x-unknown"], "x-unknown": 1}, c.claims()),
        ("malformed token", "unsupported critical token header"),
        id="crit-unknown",
    ),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "crit": ["b64"], "b64": True}, c.claims()),
        "unsupported critical token header",
        id="crit-b64-true",
    ),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "b64": False}, c.claims()),
        "malformed token",
        id="b64-false",
    ),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "jku": "https://evil.example/jwks"}, c.claims()),
        "unsupported token header",
        id="jku",
    ),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "x5u": "https://evil.example/c.pem"}, c.claims()),
        "unsupported token header",
        id="x5u",
    ),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "x5c": ["MIIB"]}, c.claims()),
        "unsupported token header",
        id="x5c",
    ),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "cty": "JWT"}, c.claims()),
        "unsupported token header",
        id="cty-nested",
    ),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "typ": "at+jwt"}, c.claims()),
        "unsupported token type",
        id="typ-other",
    ),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "kid": 7}, c.claims()),
        "malformed token",
        id="kid-not-string",
    ),
    pytest.param(lambda c: c.token(pad="x" * MAX_TOKEN_BYTES), "token too large", id="oversize"),
    pytest.param(lambda c: "", "malformed token", id="empty"),
    pytest.param(lambda c: "garbage", "malformed token", id="garbage"),
    pytest.param(lambda c: "a.b.c", "malformed token", id="three-junk-segments"),
    pytest.param(lambda c: "..", "malformed token", id="dots"),
    pytest.param(lambda c: c.token() + ".x.y", "malformed token", id="five-segments-jwe"),
    pytest.param(lambda c: c.token() + "é", "malformed token", id="non-ascii"),
    pytest.param(lambda c: c.token() + "=", "malformed token", id="bad-padding"),
    pytest.param(
        lambda c: "sk-proj-" + "A1b2C3d4E5f6" * 4, "malformed token", id="raw-provider-key"
    ),
    pytest.param(
        lambda c: "sk-ant-api03-abc.def.ghi", "malformed token", id="provider-key-with-dots"
    ),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA"}, [1, 2, 3]),  # type: ignore[arg-type]
        "malformed token",
        id="payload-not-object",
    ),
    pytest.param(lambda c: c.token(tid="initech"), "unknown tenant", id="unknown-tenant"),
    pytest.param(lambda c: c.token(tid="Acme"), "invalid tenant in token", id="tid-uppercase"),
    pytest.param(lambda c: c.token(tid="../acme"), "invalid tenant in token", id="tid-traversal"),
    pytest.param(lambda c: c.token(tid=7), "invalid tenant in token", id="tid-int"),
    pytest.param(
        lambda c: c.token(sub="Support Bot"), "invalid agent name in token", id="sub-space"
    ),
    pytest.param(lambda c: c.token(sub="a/b"), "invalid agent name in token", id="sub-slash"),
    pytest.param(lambda c: c.token(sub=""), "invalid agent name in token", id="sub-empty"),
    pytest.param(lambda c: c.token(sub=42), "malformed token", id="sub-int"),
    pytest.param(lambda c: c.token(jti=""), "invalid token id", id="jti-empty"),
    pytest.param(lambda c: c.token(jti="x" * 129), "invalid token id", id="jti-too-long"),
    pytest.param(lambda c: c.token(jti="a b"), "invalid token id", id="jti-space"),
    pytest.param(lambda c: c.token(jti=5), "malformed token", id="jti-int"),
]


@pytest.mark.parametrize(("make", "reason"), REFUSED)
@pytest.mark.parametrize(
    "cache_size", [pytest.param(4096, id="cache"), pytest.param(0, id="nocache")]
)
def test_refused(ctx: Ctx, make: Case, reason: str | tuple[str, ...], cache_size: int) -> None:
    verifier = TokenVerifier(
        ctx.public_pem, ctx.revocations, TENANTS, ctx.clock, cache_size=cache_size
    )
    token = make(ctx)
    for _ in range(2):  # a refusal is never cached as anything else
        with pytest.raises(TokenError) as err:
            verifier.verify(token)
        reasons = (reason,) if isinstance(reason, str) else reason
        assert str(err.value) in reasons
        # the reason never echoes the token, nor any segment of it
        assert err.value.__cause__ is None
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in str(err.value)
                assert part not in repr(err.value)


ACCEPTED: list[Any] = [
    pytest.param(lambda c: c.token(), id="valid"),
    pytest.param(lambda c: c.token(role="x", foo={"bar": [1]}), id="extra-claims"),
    pytest.param(lambda c: c.token(aud=[AUDIENCE]), id="aud-single-list"),
    pytest.param(lambda c: c.raw({"alg": "EdDSA"}, c.claims()), id="typ-absent"),
    pytest.param(lambda c: c.raw({"alg": "EdDSA", "typ": "JWT"}, c.claims()), id="typ-jwt"),
    pytest.param(
        lambda c: c.raw({"alg": "EdDSA", "kid": "whatever"}, c.claims()), id="kid-ignored"
    ),
    pytest.param(lambda c: c.token(nbf=c.now - 10), id="nbf-past"),
    pytest.param(lambda c: c.token(nbf=c.now + LEEWAY), id="nbf-within-leeway"),
    pytest.param(
        lambda c: c.token(iat=c.now + LEEWAY, exp=c.now + LEEWAY + 60), id="iat-within-leeway"
    ),
    pytest.param(lambda c: c.token(exp=c.now + MAX_LIFETIME), id="lifetime-exactly-24h"),
    pytest.param(lambda c: c.token(iat=c.now - 1000, exp=c.now + 1), id="expires-in-a-second"),
    pytest.param(lambda c: c.token(tid="globex", sub="a" * 63), id="other-tenant-long-agent"),
    pytest.param(lambda c: c.token(jti="A_b-" + "x" * 124), id="jti-128"),
]


@pytest.mark.parametrize("make", ACCEPTED)
def test_accepted(ctx: Ctx, make: Case) -> None:
    token = make(ctx)
    claims = jwt.decode(token, options={"verify_signature": False})
    ident = ctx.verifier.verify(token)
    assert ident == AgentIdentity(
        tenant=claims["tid"],
        agent=claims["sub"],
        jti=claims["jti"],
        issued_at=claims["iat"],
        expires_at=claims["exp"],
    )
    assert ctx.verifier.verify(token) == ident  # the cache hit gives the same answer


@pytest.mark.parametrize(
    ("advance", "ok"),
    [
        pytest.param(0, True, id="fresh"),
        pytest.param(899, True, id="last-second"),
        pytest.param(900, False, id="at-exp"),  # no leeway on expiry: --ttl means what it says
        pytest.param(900 + 3600, False, id="long-expired"),
    ],
)
@pytest.mark.parametrize(
    "cache_size", [pytest.param(4096, id="cache"), pytest.param(0, id="nocache")]
)
def test_expiry_follows_injected_clock(ctx: Ctx, advance: float, ok: bool, cache_size: int) -> None:
    verifier = TokenVerifier(
        ctx.public_pem, ctx.revocations, TENANTS, ctx.clock, cache_size=cache_size
    )
    token = ctx.token()
    verifier.verify(token)  # primes the cache, when there is one
    ctx.clock.advance(advance)
    if ok:
        assert verifier.verify(token).tenant == "acme"
    else:
        with pytest.raises(TokenError, match="^token expired$"):
            verifier.verify(token)


def append_revocation(home: Home, tenant: str, jti: str) -> None:
    with open(home.revoked_path(tenant), "a") as f:
        f.write(f"{jti} 0\n")


@pytest.mark.parametrize(
    "cache_size", [pytest.param(4096, id="cache"), pytest.param(0, id="nocache")]
)
@pytest.mark.parametrize(
    ("wait", "refused"),
    [
        pytest.param(0.5, False, id="not-yet-rechecked-0.5s"),
        pytest.param(1.1, True, id="picked-up-after-1.1s"),
    ],
)
def test_revocation_picked_up_without_events(
    ctx: Ctx, cache_size: int, wait: float, refused: bool
) -> None:
    verifier = TokenVerifier(
        ctx.public_pem, ctx.revocations, TENANTS, ctx.clock, cache_size=cache_size
    )
    token = ctx.token()
    other = ctx.token(jti="another")
    ident = verifier.verify(token)
    append_revocation(ctx.home, "acme", ident.jti)
    ctx.clock.advance(wait)
    if refused:
        with pytest.raises(TokenError, match="^token revoked$"):
            verifier.verify(token)
    else:
        assert verifier.verify(token) == ident
    assert verifier.verify(other).jti == "another"  # only that jti


def test_revocation_refresh_event_is_immediate(ctx: Ctx) -> None:
    token = ctx.token()
    ident = ctx.verifier.verify(token)
    append_revocation(ctx.home, "acme", ident.jti)
    ctx.revocations.refresh()  # what the gateway's file watcher calls
    with pytest.raises(TokenError, match="^token revoked$"):
        ctx.verifier.verify(token)
    # other tenant, same jti: unaffected
    assert ctx.verifier.verify(ctx.token(tid="globex")).tenant == "globex"


def test_revocation_file_replaced_same_size_is_reread(ctx: Ctx) -> None:
    path = ctx.home.revoked_path("acme")
    path.write_text("aaaa 0\n")
    assert ctx.revocations.is_revoked("acme", "aaaa")
    st = path.stat()
    tmp = path.with_name("revoked.new")
    tmp.write_text("bbbb 0\n")
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    tmp.replace(path)  # same size, same mtime: only the inode tells
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    ctx.revocations.refresh("acme")
    assert not ctx.revocations.is_revoked("acme", "aaaa")
    assert ctx.revocations.is_revoked("acme", "bbbb")


def test_unreadable_revocation_list_fails_closed(ctx: Ctx) -> None:
    ctx.home.revoked_path("acme").mkdir()  # exists, cannot be read as a file
    with pytest.raises(TokenError, match="^revocation list unavailable$"):
        ctx.verifier.verify(ctx.token())


def test_refresh_stats_only_when_stale(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx.verifier.verify(ctx.token())
    calls: list[str] = []
    real = RevocationList.refresh

    def spy(self: RevocationList, tenant: str | None = None) -> None:
        calls.append(str(tenant))
        real(self, tenant)

    monkeypatch.setattr(RevocationList, "refresh", spy)
    for _ in range(5):
        ctx.verifier.verify(ctx.token())
    assert calls == []
    ctx.clock.advance(1.01)
    ctx.verifier.verify(ctx.token())
    assert calls == ["acme"]


def test_callable_tenants_new_tenant_counts_at_once(ctx: Ctx) -> None:
    known = {"acme"}
    verifier = TokenVerifier(ctx.public_pem, ctx.revocations, lambda: set(known), ctx.clock)
    with pytest.raises(TokenError, match="^unknown tenant$"):
        verifier.verify(ctx.token(tid="globex"))
    known.add("globex")
    assert verifier.verify(ctx.token(tid="globex")).tenant == "globex"
    token = ctx.token()
    verifier.verify(token)
    known.discard("acme")
    ctx.clock.advance(1.1)
    with pytest.raises(TokenError, match="^unknown tenant$"):
        verifier.verify(token)


@pytest.mark.parametrize(
    "pem",
    [
        pytest.param(b"not a pem", id="junk"),
        pytest.param(
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            id="rsa-public-key",
        ),
    ],
)
def test_bad_verification_key_is_config_error(ctx: Ctx, pem: bytes) -> None:
    with pytest.raises(ConfigError):
        TokenVerifier(pem, ctx.revocations, TENANTS, ctx.clock)


def test_cache_is_bounded(ctx: Ctx) -> None:
    verifier = TokenVerifier(ctx.public_pem, ctx.revocations, TENANTS, ctx.clock, cache_size=3)
    for i in range(10):
        verifier.verify(ctx.token(jti=f"j{i}"))
    assert repr(verifier) == "TokenVerifier(cached=3)"


def test_identity_does_not_import_admin() -> None:
    code = (
        "import sys, aiid_proxy.identity; "
        "bad = [m for m in sys.modules if m in ('aiid_proxy.admin', 'mitmproxy')]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_identity_source_names_no_admin_path() -> None:
    source = Path(identity_mod.__file__).read_text()
    assert "admin" not in source.lower()
    assert "signing" not in source.lower()


def test_cache_hit_skips_signature_but_not_live_checks(
    ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = ctx.token()
    ctx.verifier.verify(token)
    decodes: list[str] = []
    real = ctx.verifier._decode
    monkeypatch.setattr(ctx.verifier, "_decode", lambda t: decodes.append(t) or real(t))
    ctx.verifier.verify(token)
    assert decodes == []
    append_revocation(ctx.home, "acme", ctx.claims()["jti"])
    ctx.clock.advance(1.1)
    with pytest.raises(TokenError, match="^token revoked$"):
        ctx.verifier.verify(token)


@pytest.mark.parametrize(
    ("over", "message", "named"),
    [
        pytest.param({"exp_in": 0}, "token expired", True, id="expired"),
        pytest.param({"tid": "ghost", "exp_in": 0}, "unknown tenant", False, id="expired-ghost"),
        pytest.param({"tid": "ghost"}, "unknown tenant", False, id="ghost"),
    ],
)
def test_a_refused_signed_token_names_its_identity_only_for_a_known_tenant(
    ctx: Ctx, over: dict[str, Any], message: str, named: bool
) -> None:
    # The gateway audits a refusal in the tenant the error names: never one this home lacks.
    exp_in = over.pop("exp_in", 900)
    token = ctx.token(iat=ctx.now - 1000, exp=ctx.now + exp_in, **over)
    with pytest.raises(TokenError, match=message) as err:
        ctx.verifier.verify(token)
    assert isinstance(err.value.identity, AgentIdentity) is named
