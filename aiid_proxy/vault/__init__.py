"""The per-tenant secret vault: provider keys encrypted at rest with envelope encryption.

Each entry has its own random 256-bit data key (DEK). The secret is encrypted with the DEK
(AES-256-GCM), and the DEK is wrapped with the current vault master key (AES-256-GCM).

Associated data binds every ciphertext to where it belongs, so a row copied to another
provider name or into another tenant's vault does not decrypt:

* wrapped DEK: ``b"aiid-vault-v1\\0dek\\0" + tenant + b"\\0" + provider + b"\\0" + key_id``
* secret:      ``b"aiid-vault-v1\\0secret\\0" + tenant + b"\\0" + provider``

The secret's associated data deliberately leaves out the master key id: the secret is
encrypted under its DEK, not under the master key, so rotating the master key (see
:meth:`Vault.rewrap`) only re-wraps the 32-byte DEK and never touches the secret's ciphertext.
The two distinct labels keep the two kinds of ciphertext from ever being confused.

Nothing here caches plaintext: :meth:`Vault.get` decrypts on each call and returns a
:class:`Secret`, whose ``repr``/``str`` never show the value.
"""

from __future__ import annotations

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
from aiid_proxy.vault.store import MAX_SECRET_BYTES, Vault, ensure_schema, rotate_master

__all__ = [
    "KEY_BYTES",
    "MAX_SECRET_BYTES",
    "KeyringSource",
    "MasterKeyring",
    "ReloadingKeyring",
    "Secret",
    "SecretInfo",
    "Vault",
    "ensure_schema",
    "key_id_of",
    "rotate_master",
    "wrong_master_key",
]
