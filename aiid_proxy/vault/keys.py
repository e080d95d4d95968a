"""Vault keys: the master keyring (current key first, one AESGCM each) and :class:`Secret`, a
decrypted provider key that never shows itself."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aiid_proxy.clock import SYSTEM_CLOCK, Clock
from aiid_proxy.errors import ConfigError, VaultError
from aiid_proxy.home import MASTER_KEY_ENV, Home

KEY_BYTES = 32


class Secret:
    """A secret string that does not show itself: ``repr``/``str`` give ``Secret('***')``.

    ``reveal()`` returns the value. Equality is a constant-time comparison. Pickling and
    copying are refused so the value cannot leak through serialisation.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            other_value = other._value
        elif isinstance(other, str):
            other_value = other
        else:
            return NotImplemented
        return hmac.compare_digest(self._value.encode("utf-8"), other_value.encode("utf-8"))

    __hash__ = None  # type: ignore[assignment]

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("Secret cannot be pickled or copied")

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret cannot be pickled or copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError("Secret cannot be pickled or copied")


@dataclass(frozen=True)
class SecretInfo:
    provider: str
    key_id: str
    created: str
    rotated: str | None


def key_id_of(key: bytes) -> str:
    """The public id of a master key: first 8 bytes of its SHA-256, hex."""
    return hashlib.sha256(key).digest()[:8].hex()


class MasterKeyring:
    """Vault master keys, current first; one AESGCM instance per key, built once."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ConfigError("no vault master key")
        self._aeads: dict[str, AESGCM] = {}
        order: list[str] = []
        for key in keys:
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise ConfigError("vault master key must be 32 bytes")
            kid = key_id_of(key)
            if kid not in self._aeads:
                self._aeads[kid] = AESGCM(key)
                order.append(kid)
        self.current_id: str = order[0]
        self.key_ids: tuple[str, ...] = tuple(order)

    @classmethod
    def from_home(cls, home: Home, env: Mapping[str, str] | None = None) -> MasterKeyring:
        return cls(home.master_keys(env))

    def __repr__(self) -> str:
        return f"MasterKeyring(key_ids={list(self.key_ids)!r})"

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._aeads

    def aead(self, key_id: str) -> AESGCM:
        try:
            return self._aeads[key_id]
        except (KeyError, TypeError):
            raise VaultError() from None


class ReloadingKeyring:
    """Callable returning the home's current :class:`MasterKeyring`, re-read on change.

    ``runtime/master.key`` is ``stat``-ed at most once per ``interval`` seconds (of the
    injected clock) and re-read only when its (inode, mtime, size) changed; ``force=True``
    checks at once (a vault entry names a key id the keyring lacks: a rotation has just
    happened). With ``$AIID_MASTER_KEY`` set the keyring never changes. Pass it as a
    :class:`Vault`'s keyring so a running gateway follows ``rotate-master``.
    """

    def __init__(
        self,
        home: Home,
        env: Mapping[str, str] | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        interval: float = 1.0,
    ) -> None:
        self._home = home
        self._path = home.master_key_path
        self._env = dict(os.environ if env is None else env)
        self._clock = clock
        self._interval = interval
        self._lock = threading.Lock()
        self._stat: tuple[int, int, int] | None = None
        self._keyring: MasterKeyring | None = None
        self._next_check = float("-inf")

    def __repr__(self) -> str:
        return f"ReloadingKeyring({self._path})"

    def __call__(self, force: bool = False) -> MasterKeyring:
        keyring = self._keyring
        if keyring is not None and not force and self._clock.monotonic() < self._next_check:
            return keyring
        with self._lock:
            if self._env.get(MASTER_KEY_ENV):
                if self._keyring is None:
                    self._keyring = MasterKeyring.from_home(self._home, self._env)
                self._next_check = float("inf")
                return self._keyring
            try:
                st = self._path.stat()
                key: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                key = None
            if self._keyring is None or key != self._stat:
                self._keyring = MasterKeyring.from_home(self._home, self._env)
                self._stat = key
            self._next_check = self._clock.monotonic() + self._interval
            return self._keyring


KeyringSource = MasterKeyring | Callable[[], MasterKeyring]


def wrong_master_key(tenant: str, provider: str, key_id: str, current_id: str) -> ConfigError:
    """The one error for a vault entry the master key in use cannot open (key ids are public,
    keys are not shown): a wrong ``AIID_MASTER_KEY`` or key file."""
    return ConfigError(
        f"the vault master key does not open tenant {tenant!r}: its vault entry {provider!r} "
        f"is under master key id {key_id}, the key in use is {current_id} (wrong "
        f"{MASTER_KEY_ENV} or runtime/master.key?)"
    )
