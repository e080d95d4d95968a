"""Agent-token verification: the runtime side of agent identity.

The gateway holds only the Ed25519 *public* key (``runtime/token.pub``). Tokens are compact
JWS (JWT) signed with EdDSA; every check below runs on every call, so a token is refused the
moment it expires or is revoked. Issuing tokens lives elsewhere and is never imported here.

Each refusal raises :class:`~aiid_proxy.errors.TokenError` whose ``str()`` is a short reason
that is safe to show the agent; it never contains the token or any part of it.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options

from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import ConfigError, TokenError
from aiid_proxy.home import NAME_RE, Home

ISSUER = "aiid"
AUDIENCE = "aiid-gateway"
ALGORITHM = "EdDSA"
MAX_LIFETIME = 24 * 3600
LEEWAY = 30
"""Seconds a token may look issued (``iat``) or valid (``nbf``) ahead of this clock: the
issuing host's clock may run ahead. Expiry has none: a token is refused from ``exp`` on, as
``aiid token issue --ttl`` promises."""
MAX_TOKEN_BYTES = 4096
MAX_JTI_CHARS = 128
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "tid", "jti")
REVOCATION_MAX_AGE = 1.0
"""Seconds after which the verifier re-stats a tenant's revocation file on its own."""
TENANTS_MAX_AGE = 1.0
"""Seconds for which a callable ``tenants`` source's answer is reused for known tenants."""

JTI_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
"""Token ids: the charset a revocation line can carry (no whitespace, no separators)."""

# Header parameters a token may carry. ``kid`` is tolerated and ignored (there is one key);
# anything else -- crit, jku, jwk, x5u, x5c, x5t, cty, b64, ... -- is refused outright.
_ALLOWED_HEADER = frozenset({"alg", "typ", "kid"})

_PYJWT_OPTIONS: Options = {
    "verify_signature": True,
    "require": list(REQUIRED_CLAIMS),
    # Time claims are checked below against the injected clock, not PyJWT's wall clock.
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_iss": True,
    "verify_aud": True,
    "verify_sub": True,
    "verify_jti": True,
    "strict_aud": False,
}


@dataclass(frozen=True)
class AgentIdentity:
    tenant: str
    agent: str
    jti: str
    issued_at: int
    expires_at: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RevocationList:
    """Revoked token ids per tenant, read from ``tenants/<t>/revoked`` ("jti exp" a line).

    :meth:`refresh` re-reads a tenant's file only when its (inode, mtime_ns, size) changed, so
    calling it often costs one ``os.stat``. A file that exists but cannot be read makes every
    lookup for that tenant fail closed.
    """

    def __init__(self, home: Home, clock: Clock = SYSTEM_CLOCK) -> None:
        self._home = home
        self._clock = clock
        self._lock = threading.Lock()
        self._revoked: dict[str, frozenset[str]] = {}
        self._stat: dict[str, tuple[int, int, int] | None] = {}
        self._checked: dict[str, float] = {}
        self._broken: set[str] = set()

    def refresh(self, tenant: str | None = None) -> None:
        """Re-read ``tenant``'s file if it changed; every tenant seen so far when ``None``."""
        with self._lock:
            tenants = list(self._revoked) if tenant is None else [tenant]
            for t in tenants:
                self._refresh_locked(t)

    def refresh_if_stale(self, tenant: str, max_age: float = REVOCATION_MAX_AGE) -> None:
        """Refresh ``tenant`` if it was last checked more than ``max_age`` seconds ago."""
        last = self._checked.get(tenant)
        if last is None or self._clock.monotonic() - last > max_age:
            self.refresh(tenant)

    def is_revoked(self, tenant: str, jti: str) -> bool:
        if tenant not in self._revoked:
            self.refresh(tenant)
        if tenant in self._broken:
            raise TokenError("revocation list unavailable")
        return jti in self._revoked.get(tenant, frozenset())

    def _refresh_locked(self, tenant: str) -> None:
        path = self._home.revoked_path(tenant)
        self._checked[tenant] = self._clock.monotonic()
        try:
            st = path.stat()
        except FileNotFoundError:
            self._stat[tenant] = None
            self._revoked[tenant] = frozenset()
            self._broken.discard(tenant)
            return
        except OSError:
            self._broken.add(tenant)
            self._revoked.setdefault(tenant, frozenset())
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if tenant in self._revoked and self._stat.get(tenant) == key:
            return
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            self._broken.add(tenant)
            self._revoked.setdefault(tenant, frozenset())
            return
        ids = set()
        for line in text.splitlines():
            parts = line.split()
            if parts:
                ids.add(parts[0])
        self._revoked[tenant] = frozenset(ids)
        self._stat[tenant] = key
        self._broken.discard(tenant)


def _load_public_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise ConfigError("token verification key is not a valid PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("token verification key is not an Ed25519 public key")
    return key


class TokenVerifier:
    """Verifies agent tokens against one Ed25519 public key.

    ``tenants`` is the set of known tenants, or a callable returning it (re-called on a
    miss and at least once a second). A small LRU of recently verified tokens skips the
    signature check on a hit; expiry, tenant and revocation are re-checked every time.
    """

    def __init__(
        self,
        public_key_pem: bytes,
        revocations: RevocationList,
        tenants: Callable[[], Collection[str]] | Collection[str],
        clock: Clock = SYSTEM_CLOCK,
        *,
        cache_size: int = 4096,
    ) -> None:
        self._key = _load_public_key(public_key_pem)
        self._revocations = revocations
        self._tenants = tenants
        self._clock = clock
        self._jwt = jwt.PyJWT(_PYJWT_OPTIONS)
        self._cache_size = max(0, cache_size)
        self._cache: OrderedDict[str, AgentIdentity] = OrderedDict()
        self._lock = threading.Lock()
        self._tenant_cache: tuple[float, frozenset[str]] | None = None

    def __repr__(self) -> str:
        return f"TokenVerifier(cached={len(self._cache)})"

    def verify(self, token: str) -> AgentIdentity:
        if not isinstance(token, str) or not token:
            raise TokenError("malformed token")
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("token too large")
        if not token.isascii() or token.count(".") != 2:
            raise TokenError("malformed token")

        if self._cache_size:
            with self._lock:
                hit = self._cache.get(token)
                if hit is not None:
                    self._cache.move_to_end(token)
            if hit is not None:
                try:
                    self._check_live(hit)
                except TokenError:
                    with self._lock:
                        self._cache.pop(token, None)
                    raise
                return hit

        identity = self._verify_uncached(token)
        if self._cache_size:
            with self._lock:
                self._cache[token] = identity
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return identity

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- internals -------------------------------------------------------------------------
    def _tenant_known(self, tenant: str) -> bool:
        tenants = self._tenants
        if not callable(tenants):
            return tenant in tenants
        # A callable (e.g. ``Home.tenants``, a directory listing) is called again on a miss,
        # and at least every TENANTS_MAX_AGE seconds: new tenants count at once, a removed
        # one stops counting within that time.
        now = self._clock.monotonic()
        cached = self._tenant_cache
        if cached is not None and now - cached[0] <= TENANTS_MAX_AGE and tenant in cached[1]:
            return True
        known = frozenset(tenants())
        self._tenant_cache = (now, known)
        return tenant in known

    def recheck(self, ident: AgentIdentity) -> None:
        """Raise TokenError if a token accepted earlier is no longer valid now (its tenant
        removed, expired, revoked): for a request that waited, e.g. for an approval."""
        self._check_live(ident)

    def _check_live(self, ident: AgentIdentity) -> None:
        """The checks that can change after a token was first accepted. The tenant first: an
        error that names the identity (expired, revoked) names a tenant this home has."""
        if not self._tenant_known(ident.tenant):
            raise TokenError("unknown tenant")
        if ident.expires_at <= self._clock.now():
            raise TokenError("token expired", ident)
        self._revocations.refresh_if_stale(ident.tenant)
        if self._revocations.is_revoked(ident.tenant, ident.jti):
            raise TokenError("token revoked", ident)

    def _decode(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            decoded = self._jwt.decode_complete(
                token,
                key=self._key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                audience=AUDIENCE,
            )
        except jwt.InvalidSignatureError:
            raise TokenError("bad token signature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("token algorithm not allowed") from None
        except jwt.MissingRequiredClaimError as e:
            claim = e.claim if e.claim in REQUIRED_CLAIMS else "claim"
            raise TokenError(f"token missing claim {claim}") from None
        except jwt.InvalidIssuerError:
            raise TokenError("wrong token issuer") from None
        except jwt.InvalidAudienceError:
            raise TokenError("wrong token audience") from None
        except Exception:  # any other parse failure, whatever raised it
            raise TokenError("malformed token") from None
        header = decoded["header"]
        payload = decoded["payload"]
        if not isinstance(header, dict) or not isinstance(payload, dict):
            raise TokenError("malformed token")
        return header, payload

    def _verify_uncached(self, token: str) -> AgentIdentity:
        header, claims = self._decode(token)

        # Header: signature and alg are already verified; refuse what we do not understand.
        if header.get("alg") != ALGORITHM:
            raise TokenError("token algorithm not allowed")
        if "crit" in header:
            raise TokenError("unsupported critical token header")
        if not _ALLOWED_HEADER.issuperset(header):
            raise TokenError("unsupported token header")
        if header.get("typ", "JWT") != "JWT":
            raise TokenError("unsupported token type")

        # Issuer and audience, exactly.
        if claims["iss"] != ISSUER:
            raise TokenError("wrong token issuer")
        aud = claims["aud"]
        if aud != AUDIENCE and aud != [AUDIENCE]:
            raise TokenError("wrong token audience")

        # Time, against the injected clock.
        iat, exp = claims["iat"], claims["exp"]
        if not _is_int(iat) or not _is_int(exp):
            raise TokenError("malformed token")
        if exp <= iat:
            raise TokenError("malformed token")
        if exp - iat > MAX_LIFETIME:
            raise TokenError("token lifetime too long")
        now = self._clock.now()
        if iat > now + LEEWAY:
            raise TokenError("token issued in the future")
        if "nbf" in claims:
            nbf = claims["nbf"]
            if not _is_int(nbf):
                raise TokenError("malformed token")
            if nbf > now + LEEWAY:
                raise TokenError("token not yet valid")

        # Names and id.
        sub, tid, jti = claims["sub"], claims["tid"], claims["jti"]
        if not isinstance(tid, str) or NAME_RE.fullmatch(tid) is None:
            raise TokenError("invalid tenant in token")
        if not isinstance(sub, str) or NAME_RE.fullmatch(sub) is None:
            raise TokenError("invalid agent name in token")
        if not isinstance(jti, str) or len(jti) > MAX_JTI_CHARS or JTI_RE.fullmatch(jti) is None:
            raise TokenError("invalid token id")

        ident = AgentIdentity(tenant=tid, agent=sub, jti=jti, issued_at=iat, expires_at=exp)
        self._check_live(ident)
        return ident
