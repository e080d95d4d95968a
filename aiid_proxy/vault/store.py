"""The vault database: one SQLite file per tenant, entries under envelope encryption (see the
package doc), and the no-downtime rotation of the master key."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import ConfigError, SecretNotFound, UsageError, VaultError
from aiid_proxy.home import MASTER_KEY_ENV, Home, encode_key, replace_private, validate_name
from aiid_proxy.vault.keys import (
    KEY_BYTES,
    KeyringSource,
    MasterKeyring,
    ReloadingKeyring,
    Secret,
    SecretInfo,
    key_id_of,
    wrong_master_key,
)

NONCE_BYTES = 12
TAG_BYTES = 16
MAX_SECRET_BYTES = 64 * 1024
_AAD_PREFIX = b"aiid-vault-v1\0"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    provider    TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    wrapped_dek BLOB NOT NULL,
    dek_nonce   BLOB NOT NULL,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    created     TEXT NOT NULL,
    rotated     TEXT
)
"""


def _dek_aad(tenant: str, provider: str, key_id: str) -> bytes:
    return b"%sdek\0%s\0%s\0%s" % (
        _AAD_PREFIX,
        tenant.encode("utf-8"),
        provider.encode("utf-8"),
        key_id.encode("utf-8"),
    )


def _secret_aad(tenant: str, provider: str) -> bytes:
    return b"%ssecret\0%s\0%s" % (_AAD_PREFIX, tenant.encode("utf-8"), provider.encode("utf-8"))


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def ensure_schema(path: Path) -> None:
    """Create ``path`` (0600) with the vault schema if it does not exist yet."""
    conn = _connect(path)
    conn.close()


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute(_SCHEMA)
    except sqlite3.Error:
        conn.close()
        raise
    return conn


class Vault:
    """One tenant's vault file. Thread-safe; one SQLite connection per instance."""

    def __init__(
        self,
        path: Path,
        tenant: str,
        keyring: KeyringSource,
        clock: Clock = SYSTEM_CLOCK,
        *,
        cache_for: float = 0.0,
    ) -> None:
        self.path = Path(path)
        self.tenant = validate_name("tenant", tenant)
        self._keyring_source = keyring
        self._clock = clock
        self._lock = threading.RLock()
        # provider -> (read again after, encrypted row): a running gateway reads each entry
        # from disk at most once per ``cache_for`` seconds (each read is a GIL hand-off on the
        # event loop); only ciphertext is kept, every get() still decrypts.
        self._cache_for = cache_for
        self._rows: dict[str, tuple[float, tuple[Any, ...]]] = {}
        try:
            self._conn = _connect(self.path)
        except sqlite3.Error as e:
            raise ConfigError(f"vault {self.path} unusable: {e}") from None

    def __repr__(self) -> str:
        return f"Vault(tenant={self.tenant!r}, path={str(self.path)!r})"

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def keyring(self) -> MasterKeyring:
        src = self._keyring_source
        return src if isinstance(src, MasterKeyring) else src()

    def use_keyring(self, keyring: KeyringSource) -> None:
        with self._lock:
            self._keyring_source = keyring

    # -- writes ----------------------------------------------------------------------------
    def put(self, provider: str, secret: str) -> SecretInfo:
        validate_name("provider", provider)
        self._rows.clear()
        if not isinstance(secret, str) or not secret:
            raise UsageError("refusing to store an empty secret")
        raw = secret.encode("utf-8")
        if len(raw) > MAX_SECRET_BYTES:
            raise UsageError(f"secret too large (max {MAX_SECRET_BYTES} bytes)")
        keyring = self.keyring
        key_id = keyring.current_id
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        dek_nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(dek).encrypt(nonce, raw, _secret_aad(self.tenant, provider))
        wrapped = keyring.aead(key_id).encrypt(
            dek_nonce, dek, _dek_aad(self.tenant, provider, key_id)
        )
        now = _iso(self._clock.now())
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # A key that opens none of the other entries is the wrong key (a stray
                # AIID_MASTER_KEY): storing under it would leave a vault no single key opens.
                for other, other_id in self._conn.execute(
                    "SELECT provider, key_id FROM secrets WHERE provider != ? ORDER BY provider",
                    (provider,),
                ):
                    if other_id not in keyring:
                        raise wrong_master_key(self.tenant, other, other_id, key_id)
                row = self._conn.execute(
                    "SELECT created FROM secrets WHERE provider = ?", (provider,)
                ).fetchone()
                created = row[0] if row is not None else now
                rotated = now if row is not None else None
                self._conn.execute(
                    "INSERT OR REPLACE INTO secrets (provider, key_id, wrapped_dek, dek_nonce,"
                    " nonce, ciphertext, created, rotated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (provider, key_id, wrapped, dek_nonce, nonce, ciphertext, created, rotated),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return SecretInfo(provider=provider, key_id=key_id, created=created, rotated=rotated)

    def delete(self, provider: str) -> bool:
        validate_name("provider", provider)
        with self._lock:
            cur = self._conn.execute("DELETE FROM secrets WHERE provider = ?", (provider,))
            self._rows.clear()
            return cur.rowcount > 0

    def rewrap(self, keyring_new: MasterKeyring) -> int:
        """Re-wrap every DEK under ``keyring_new``'s current key, in one transaction.

        Each DEK is unwrapped with the key named by its row (looked up in ``keyring_new``,
        then in this vault's keyring) and the secret is checked to decrypt before the DEK is
        re-wrapped with a fresh nonce; the secret's ciphertext is unchanged (its associated
        data does not name the master key). Any failure rolls everything back (VaultError).
        Afterwards the WAL is checkpointed so the retired wrappings leave the disk.
        Returns the number of entries re-wrapped; entries already under the new key are left.
        """
        self._rows.clear()
        old = self.keyring
        new_id = keyring_new.current_id
        new_aead = keyring_new.aead(new_id)
        now = _iso(self._clock.now())  # the entry's key changed: shown as rotated
        count = 0
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                rows = self._conn.execute(
                    "SELECT provider, key_id, wrapped_dek, dek_nonce, nonce, ciphertext"
                    " FROM secrets"
                ).fetchall()
                for provider, key_id, wrapped, dek_nonce, nonce, ciphertext in rows:
                    if key_id == new_id:
                        continue
                    ring = keyring_new if key_id in keyring_new else old
                    dek = self._unwrap(ring, provider, key_id, wrapped, dek_nonce)
                    self._open(dek, provider, nonce, ciphertext)
                    fresh_nonce = os.urandom(NONCE_BYTES)
                    rewrapped = new_aead.encrypt(
                        fresh_nonce, dek, _dek_aad(self.tenant, provider, new_id)
                    )
                    self._conn.execute(
                        "UPDATE secrets SET key_id = ?, wrapped_dek = ?, dek_nonce = ?,"
                        " rotated = ? WHERE provider = ?",
                        (new_id, rewrapped, fresh_nonce, now, provider),
                    )
                    count += 1
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if isinstance(self._keyring_source, MasterKeyring):
                self._keyring_source = keyring_new
            if count:
                self._purge_old_pages()
        return count

    def _purge_old_pages(self) -> None:
        """Push the WAL into the database and truncate it, so DEKs wrapped under a retired
        master key do not linger on disk (freed cells are zeroed by ``secure_delete``).
        Best effort: a concurrent reader may hold the WAL; the next checkpoint finishes it."""
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- reads -----------------------------------------------------------------------------
    def get(self, provider: str) -> Secret:
        """Decrypt the provider's secret. With ``cache_for`` > 0 the encrypted entry is read
        from disk at most that often, and again at once if it no longer decrypts (re-wrapped
        by a master-key rotation): a ``vault put`` or ``rm`` takes at most that long to
        reach a running gateway."""
        validate_name("provider", provider)
        cached = self._rows.get(provider) if self._cache_for > 0 else None
        if cached is not None and self._clock.monotonic() < cached[0]:
            try:
                return self._decrypt(provider, cached[1])
            except VaultError:
                pass  # stale: read it again
        with self._lock, self._readable():
            row = self._conn.execute(
                "SELECT key_id, wrapped_dek, dek_nonce, nonce, ciphertext"
                " FROM secrets WHERE provider = ?",
                (provider,),
            ).fetchone()
        if row is None:
            self._rows.pop(provider, None)
            raise SecretNotFound(f"tenant {self.tenant!r} has no secret for {provider!r}")
        if self._cache_for > 0:
            self._rows[provider] = (self._clock.monotonic() + self._cache_for, tuple(row))
        return self._decrypt(provider, tuple(row))

    def _decrypt(self, provider: str, row: tuple[Any, ...]) -> Secret:
        key_id, wrapped, dek_nonce, nonce, ciphertext = row
        keyring = self.keyring
        if key_id not in keyring and not isinstance(self._keyring_source, MasterKeyring):
            # A rotation may have just happened: look at the key file now.
            src = self._keyring_source
            keyring = src(force=True) if isinstance(src, ReloadingKeyring) else src()
        dek = self._unwrap(keyring, provider, key_id, wrapped, dek_nonce)
        return Secret(self._open(dek, provider, nonce, ciphertext))

    def list(self) -> list[SecretInfo]:
        with self._lock, self._readable():
            rows = self._conn.execute(
                "SELECT provider, key_id, created, rotated FROM secrets ORDER BY provider"
            ).fetchall()
        return [SecretInfo(provider=r[0], key_id=r[1], created=r[2], rotated=r[3]) for r in rows]

    def providers(self) -> set[str]:
        with self._lock, self._readable():
            rows = self._conn.execute("SELECT provider FROM secrets").fetchall()
        return {r[0] for r in rows}

    @contextlib.contextmanager
    def _readable(self) -> Iterator[None]:
        """A database the file no longer is (pages corrupted under us, or before a start):
        one VaultError naming the file, not sqlite3's exception with a traceback."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise VaultError(f"vault {self.path} unusable: {e}") from None

    # -- crypto helpers (every failure is the same opaque VaultError) -----------------------
    def _unwrap(
        self, keyring: MasterKeyring, provider: str, key_id: object, wrapped: object, nonce: object
    ) -> bytes:
        if (
            not isinstance(key_id, str)
            or not isinstance(wrapped, bytes)
            or not isinstance(nonce, bytes)
            or len(nonce) != NONCE_BYTES
            or len(wrapped) != KEY_BYTES + TAG_BYTES
        ):
            raise VaultError()
        try:
            return keyring.aead(key_id).decrypt(
                nonce, wrapped, _dek_aad(self.tenant, provider, key_id)
            )
        except (InvalidTag, ValueError):
            raise VaultError() from None

    def _open(self, dek: bytes, provider: str, nonce: object, ciphertext: object) -> str:
        if (
            not isinstance(nonce, bytes)
            or not isinstance(ciphertext, bytes)
            or len(nonce) != NONCE_BYTES
            or len(ciphertext) <= TAG_BYTES
        ):
            raise VaultError()
        try:
            raw = AESGCM(dek).decrypt(nonce, ciphertext, _secret_aad(self.tenant, provider))
            return raw.decode("utf-8")
        except (InvalidTag, ValueError):
            raise VaultError() from None


def rotate_master(home: Home, env: Mapping[str, str] | None = None) -> int:
    """Rotate the vault master key with no downtime; returns the entries re-wrapped.

    1. ``runtime/master.key`` becomes "new, then every old key" (atomic replace), so a running
       gateway that re-reads the file (:class:`ReloadingKeyring`) can unwrap both generations;
    2. every tenant's vault is re-wrapped under the new key (one transaction per tenant), then
       swept once more for entries a concurrent ``vault put`` wrapped under an old key;
    3. the file is replaced by the new key alone.

    Rotations are serialised by an exclusive lock on ``runtime/master.key.lock``. An
    interrupted rotation leaves a file with several keys, which keeps working; running it
    again finishes the job. Refused when ``$AIID_MASTER_KEY`` is set: rotation is done on
    the file.
    """
    env = os.environ if env is None else env
    if env.get(MASTER_KEY_ENV):
        raise ConfigError(
            f"{MASTER_KEY_ENV} is set: unset it to rotate the key file, or rotate the "
            "environment value out of band"
        )
    lock_path = home.master_key_path.with_name(home.master_key_path.name + ".lock")
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        return _rotate_locked(home)
    finally:
        os.close(lock_fd)


def _rotate_locked(home: Home) -> int:
    old = home.master_keys({})  # the file, never the environment
    new = AESGCM.generate_key(bit_length=256)
    while key_id_of(new) in {key_id_of(k) for k in old}:  # pragma: no cover - 2**-64
        new = AESGCM.generate_key(bit_length=256)
    both = [new, *old]
    replace_private(home.master_key_path, "".join(encode_key(k) + "\n" for k in both).encode())
    keyring = MasterKeyring(both)
    total = 0
    for _sweep in range(2):
        for tenant in home.tenants():
            path = home.vault_path(tenant)
            if not path.exists():
                continue
            with Vault(path, tenant, keyring) as vault:
                try:
                    total += vault.rewrap(keyring)
                except VaultError:
                    raise VaultError(
                        f"tenant {tenant!r}: a vault entry cannot be decrypted; rotation not "
                        "finished (old and new keys both kept), fix or re-put it and run again"
                    ) from None
    replace_private(home.master_key_path, (encode_key(new) + "\n").encode())
    return total
