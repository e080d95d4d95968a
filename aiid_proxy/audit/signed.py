"""Exported, signed audit checkpoints: the anchors a stolen audit key cannot move.

The chain's macs are keyed with the tenant audit key, which the gateway must hold (in
``runtime/``). Whoever steals that key can rewrite any record and re-MAC everything after
it: the chain alone then verifies. What such an attacker cannot do is make the rewritten
chain reach a head that was exported before the theft: the mac at seq S commits to records
1..S (a different prefix with the same mac is a second preimage of HMAC-SHA256 under a known
key). ``aiid audit checkpoint T`` exports that head as one signed line::

    aiid-checkpoint/1 <tenant> <seq>:<mac> <utc time> <Ed25519 signature, base64url>

signed with the checkpoint key in ``admin/`` (which the running gateway never reads), over
:data:`DOMAIN` + ``"<tenant> <seq>:<mac> <time>"``. The signature lets the line be stored and
passed around anywhere (ticket, object store, another host) and still be checked, and makes
the operator accountable for the history it attests. ``aiid audit verify T --checkpoint FILE``
checks every line's signature and tenant, then requires the chain to reach each head with the
same mac. Plain ``SEQ:MAC`` lines (e.g. a shipped copy of ``runtime/checkpoints/<t>``) are
accepted as unsigned anchors: they are as trustworthy as the place they were kept.

See ``docs/audit-integrity.md``.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from aiid_proxy.audit.chain import parse_head
from aiid_proxy.clock import SYSTEM_CLOCK
from aiid_proxy.errors import ConfigError, UsageError
from aiid_proxy.home import append_durable, validate_name, write_private

MAGIC = "aiid-checkpoint/1"
DOMAIN = b"aiid-audit-checkpoint-v1\0"  # never a JWT signing input (those hold no NUL)
_TS_RE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"
_LINE_RE = re.compile(
    rf"{re.escape(MAGIC)} ([a-z0-9][a-z0-9_-]{{0,62}}) ([0-9]{{1,19}}:[0-9a-f]{{64}}) "
    rf"({_TS_RE}) ([A-Za-z0-9_-]{{86}})"
)
MAX_LINE = 512


class CheckpointError(Exception):
    """An exported checkpoint that cannot be used: malformed, forged or for another tenant."""


@dataclass(frozen=True)
class SignedCheckpoint:
    tenant: str
    seq: int
    mac: str
    ts: str
    signature: bytes

    def message(self) -> bytes:
        return signed_message(self.tenant, self.seq, self.mac, self.ts)

    def line(self) -> str:
        sig = base64.urlsafe_b64encode(self.signature).rstrip(b"=").decode("ascii")
        return f"{MAGIC} {self.tenant} {self.seq}:{self.mac} {self.ts} {sig}"


@dataclass(frozen=True)
class Anchor:
    """A head the chain must reach: seq, mac and where it came from (for messages)."""

    seq: int
    mac: str
    source: str
    signed: bool


def signed_message(tenant: str, seq: int, mac: str, ts: str) -> bytes:
    return DOMAIN + f"{tenant} {seq}:{mac} {ts}".encode("ascii")


def sign_checkpoint(
    key: Ed25519PrivateKey, tenant: str, head: tuple[int, str], now: float | None = None
) -> SignedCheckpoint:
    """Sign the head ``(seq, mac)`` of ``tenant``'s chain (seq 0: the empty chain)."""
    validate_name("tenant", tenant)
    seq, mac = parse_head(f"{head[0]}:{head[1]}")
    ts = time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(SYSTEM_CLOCK.now() if now is None else now)
    )
    return SignedCheckpoint(tenant, seq, mac, ts, key.sign(signed_message(tenant, seq, mac, ts)))


def parse_signed(line: str) -> SignedCheckpoint:
    m = _LINE_RE.fullmatch(line)
    if m is None:
        raise CheckpointError("not a signed checkpoint line")
    try:
        seq, mac = parse_head(m.group(2))
        sig = base64.urlsafe_b64decode(m.group(4) + "==")
    except (UsageError, binascii.Error, ValueError):
        raise CheckpointError("not a signed checkpoint line") from None
    if len(sig) != 64:
        raise CheckpointError("signature is not 64 bytes")
    return SignedCheckpoint(m.group(1), seq, mac, m.group(3), sig)


def signature_ok(cp: SignedCheckpoint, public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(cp.signature, cp.message())
    except InvalidSignature:
        return False
    return True


def read_exported(path: Path, tenant: str, public_key: Ed25519PublicKey | None) -> list[Anchor]:
    """Every anchor in an exported checkpoint file, each line checked.

    A signed line must carry a valid signature by ``public_key`` and name ``tenant``; a plain
    ``SEQ:MAC`` line is taken as is. Blank lines and ``#`` comments are skipped. Anything else
    (or a signed line with no public key to check it) raises CheckpointError naming the line.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e.strerror}") from None
    anchors: list[Anchor] = []
    for n, raw in enumerate(data.splitlines(), 1):
        where = f"checkpoint file {path.name} line {n}"
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{where} is not ASCII") from None
        if not text or text.startswith("#"):
            continue
        if len(text) > MAX_LINE:
            raise CheckpointError(f"{where} is too long")
        if text.startswith(MAGIC + " "):
            try:
                cp = parse_signed(text)
            except CheckpointError as e:
                raise CheckpointError(f"{where}: {e}") from None
            if public_key is None:
                raise CheckpointError(
                    f"{where} is signed but no checkpoint public key is available "
                    "(pass --checkpoint-key)"
                )
            if not signature_ok(cp, public_key):
                raise CheckpointError(f"{where}: signature invalid (forged or altered)")
            if cp.tenant != tenant:
                raise CheckpointError(f"{where} is for tenant {cp.tenant!r}, not {tenant!r}")
            anchors.append(Anchor(cp.seq, cp.mac, f"signed {where} ({cp.ts})", True))
            continue
        try:
            seq, mac = parse_head(text)
        except UsageError:
            raise CheckpointError(f"{where} is malformed") from None
        anchors.append(Anchor(seq, mac, f"{where}", False))
    return anchors


def append_line(path: Path, line: str) -> None:
    """Append one line to ``path`` (created 0600), fsync'd. ConfigError if it cannot."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        append_durable(path, line + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write checkpoint file {path}: {e.strerror}") from None


# -- key files ----------------------------------------------------------------------
def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError:
        raise ConfigError(f"checkpoint signing key missing: {path}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"checkpoint signing key unreadable: {path}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"checkpoint signing key is not Ed25519: {path}")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError:
        raise ConfigError(f"checkpoint public key missing: {path}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(f"checkpoint public key unreadable: {path}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"checkpoint public key is not Ed25519: {path}")
    return key


def load_or_create_key(private_path: Path, public_path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The checkpoint signing key, created (0600, with its public half) if missing.

    Never overwrites: a public file that does not match the private key is an error.
    Returns (key, created).
    """
    created = False
    if not private_path.exists():
        key = Ed25519PrivateKey.generate()
        try:
            write_private(
                private_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            created = True
        except FileExistsError:  # created concurrently: use that one
            pass
    key = load_private_key(private_path)
    pem = public_pem(key)
    if not public_path.exists():
        try:
            write_private(public_path, pem)
            public_path.chmod(0o644)
        except FileExistsError:
            pass
    if public_path.read_bytes().strip() != pem.strip():
        raise ConfigError(f"{public_path} does not match {private_path}")
    return key, created


__all__ = [
    "DOMAIN",
    "MAGIC",
    "Anchor",
    "CheckpointError",
    "SignedCheckpoint",
    "append_line",
    "load_or_create_key",
    "load_private_key",
    "load_public_key",
    "parse_signed",
    "public_pem",
    "read_exported",
    "sign_checkpoint",
    "signature_ok",
    "signed_message",
]
