from __future__ import annotations

import base64
import copy
import os
import pickle
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aiid_proxy.admin import add_tenant, init_home
from aiid_proxy.clock import FakeClock
from aiid_proxy.errors import ConfigError, InvalidName, SecretNotFound, UsageError, VaultError
from aiid_proxy.home import MASTER_KEY_ENV, Home
from aiid_proxy.vault import (
    MasterKeyring,
    ReloadingKeyring,
    Secret,
    SecretInfo,
    Vault,
    key_id_of,
    rotate_master,
)
from aiid_proxy.vault.store import _dek_aad, _secret_aad

CANARY = "sk-CANARY-7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e"
K1 = bytes(range(32))
K2 = bytes(range(32, 64))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def vault(tmp_path: Path, clock: FakeClock) -> Iterator[Vault]:
    with Vault(tmp_path / "acme" / "vault.db", "acme", MasterKeyring([K1]), clock) as v:
        yield v


def raw_rows(path: Path) -> dict[str, dict[str, object]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return {r["provider"]: dict(r) for r in conn.execute("SELECT * FROM secrets")}
    finally:
        conn.close()


def set_columns(path: Path, provider: str, **values: object) -> None:
    conn = sqlite3.connect(path)
    try:
        sets = ", ".join(f"{k} = ?" for k in values)
        conn.execute(f"UPDATE secrets SET {sets} WHERE provider = ?", (*values.values(), provider))
        conn.commit()
    finally:
        conn.close()


def insert_row(path: Path, row: dict[str, object]) -> None:
    conn = sqlite3.connect(path)
    try:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        conn.execute(
            f"INSERT OR REPLACE INTO secrets ({cols}) VALUES ({marks})", tuple(row.values())
        )
        conn.commit()
    finally:
        conn.close()


# -- Secret -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "render",
    [
        pytest.param(repr, id="repr"),
        pytest.param(str, id="str"),
        pytest.param(lambda s: f"{s}", id="fstring"),
        pytest.param(lambda s: f"{s!r}", id="fstring-repr"),
        pytest.param(lambda s: "%s" % s, id="percent"),  # noqa: UP031
        pytest.param(lambda s: repr([s]), id="in-list"),
        pytest.param(lambda s: repr({"k": s}), id="in-dict"),
    ],
)
def test_secret_never_renders_its_value(render: object) -> None:
    s = Secret(CANARY)
    out = render(s)  # type: ignore[operator]
    assert CANARY not in out
    assert "Secret('***')" in out
    assert s.reveal() == CANARY


@pytest.mark.parametrize(
    ("other", "equal"),
    [
        pytest.param(Secret(CANARY), True, id="same-secret"),
        pytest.param(CANARY, True, id="same-str"),
        pytest.param(Secret(CANARY + "x"), False, id="longer"),
        pytest.param(Secret(CANARY[:-1] + "0"), False, id="last-char"),
        pytest.param("", False, id="empty"),
        pytest.param(42, False, id="other-type"),
    ],
)
def test_secret_equality(other: object, equal: bool) -> None:
    assert (Secret(CANARY) == other) is equal
    assert (Secret(CANARY) != other) is not equal


@pytest.mark.parametrize(
    "leak",
    [
        pytest.param(pickle.dumps, id="pickle"),
        pytest.param(lambda s: pickle.dumps(s, protocol=2), id="pickle-v2"),
        pytest.param(copy.copy, id="copy"),
        pytest.param(copy.deepcopy, id="deepcopy"),
        pytest.param(hash, id="hash"),
        pytest.param(vars, id="vars"),
    ],
)
def test_secret_refuses_serialisation(leak: object) -> None:
    with pytest.raises(TypeError) as err:
        leak(Secret(CANARY))  # type: ignore[operator]
    assert CANARY not in str(err.value)


# -- keyring ------------------------------------------------------------------------------


def test_keyring_ids_and_lookup() -> None:
    ring = MasterKeyring([K2, K1, K2])
    assert ring.current_id == key_id_of(K2)
    assert ring.key_ids == (key_id_of(K2), key_id_of(K1))
    assert len(ring.current_id) == 16
    assert ring.aead(key_id_of(K1)) is ring.aead(key_id_of(K1))  # built once
    with pytest.raises(VaultError):
        ring.aead("0000000000000000")
    assert K1.hex() not in repr(ring) and K2.hex() not in repr(ring)


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([], id="none"),
        pytest.param([b"short"], id="short"),
        pytest.param([K1 + b"x"], id="long"),
        pytest.param([K1, b""], id="second-empty"),
    ],
)
def test_keyring_refuses_bad_keys(keys: list[bytes]) -> None:
    with pytest.raises(ConfigError):
        MasterKeyring(keys)


# -- round trip ---------------------------------------------------------------------------


def test_round_trip(vault: Vault, clock: FakeClock) -> None:
    info = vault.put("openai", CANARY)
    assert info == SecretInfo("openai", key_id_of(K1), "2027-01-15T08:00:00Z", None)
    vault.put("anthropic", "sk-ant-ünïcode-🔑")
    got = vault.get("openai")
    assert isinstance(got, Secret) and got.reveal() == CANARY
    assert vault.get("anthropic").reveal() == "sk-ant-ünïcode-🔑"
    assert vault.providers() == {"openai", "anthropic"}
    assert [i.provider for i in vault.list()] == ["anthropic", "openai"]
    clock.advance(60)
    info2 = vault.put("openai", CANARY + "-v2")
    assert info2.created == info.created and info2.rotated == "2027-01-15T08:01:00Z"
    assert vault.get("openai").reveal() == CANARY + "-v2"
    assert vault.list()[1] == info2


def test_get_decrypts_every_call(vault: Vault) -> None:
    vault.put("openai", CANARY)
    a, b = vault.get("openai"), vault.get("openai")
    assert a is not b and a == b
    set_columns(vault.path, "openai", ciphertext=b"\x00" * 64)
    with pytest.raises(VaultError):
        vault.get("openai")  # no plaintext cache to fall back on


def test_missing_secret(vault: Vault) -> None:
    with pytest.raises(SecretNotFound, match="openai"):
        vault.get("openai")


@pytest.mark.parametrize(
    ("provider", "secret", "exc"),
    [
        pytest.param("openai", "", UsageError, id="empty-secret"),
        pytest.param("openai", "x" * (64 * 1024 + 1), UsageError, id="huge-secret"),
        pytest.param("Open AI", "s", InvalidName, id="bad-provider"),
        pytest.param("../x", "s", InvalidName, id="traversal-provider"),
    ],
)
def test_put_refuses(vault: Vault, provider: str, secret: str, exc: type) -> None:
    with pytest.raises(exc):
        vault.put(provider, secret)
    assert vault.providers() == set()


def test_file_mode_is_private(vault: Vault) -> None:
    assert (vault.path.stat().st_mode & 0o777) == 0o600


# -- tampering ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "column", ["wrapped_dek", "dek_nonce", "nonce", "ciphertext"], ids=lambda c: f"flip-{c}"
)
@pytest.mark.parametrize("bit", [0, 7, -1], ids=lambda b: f"byte{b}")
def test_bit_flip_in_any_blob(vault: Vault, column: str, bit: int) -> None:
    vault.put("openai", CANARY)
    blob = bytearray(raw_rows(vault.path)["openai"][column])  # type: ignore[arg-type]
    blob[bit] ^= 0x01
    set_columns(vault.path, "openai", **{column: bytes(blob)})
    with pytest.raises(VaultError) as err:
        vault.get("openai")
    assert CANARY not in str(err.value) and CANARY not in repr(err.value)
    assert err.value.__cause__ is None


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("wrapped_dek", b"", id="dek-empty"),
        pytest.param("wrapped_dek", b"\x00" * 47, id="dek-short"),
        pytest.param("dek_nonce", b"\x00" * 11, id="dek-nonce-short"),
        pytest.param("nonce", b"\x00" * 16, id="nonce-long"),
        pytest.param("ciphertext", b"\x00" * 16, id="ciphertext-tag-only"),
        pytest.param("ciphertext", "text", id="ciphertext-wrong-type"),
        pytest.param("key_id", "0000000000000000", id="unknown-key-id"),
        pytest.param("key_id", key_id_of(K2), id="other-key-id"),
    ],
)
def test_malformed_row(vault: Vault, column: str, value: object) -> None:
    vault.put("openai", CANARY)
    set_columns(vault.path, "openai", **{column: value})
    with pytest.raises(VaultError):
        vault.get("openai")


def test_row_moved_to_another_provider(vault: Vault) -> None:
    vault.put("openai", CANARY)
    vault.put("anthropic", "sk-ant-real")
    row = raw_rows(vault.path)["openai"]
    insert_row(vault.path, {**row, "provider": "anthropic"})
    with pytest.raises(VaultError):
        vault.get("anthropic")


@pytest.mark.parametrize(
    "swap",
    [
        pytest.param(("ciphertext", "nonce"), id="secret-blobs-only"),
        pytest.param(("wrapped_dek", "dek_nonce"), id="dek-blobs-only"),
    ],
)
def test_partial_row_swap_between_providers(vault: Vault, swap: tuple[str, str]) -> None:
    vault.put("openai", CANARY)
    vault.put("anthropic", "sk-ant-real")
    src = raw_rows(vault.path)["openai"]
    set_columns(vault.path, "anthropic", **{c: src[c] for c in swap})
    with pytest.raises(VaultError):
        vault.get("anthropic")


def test_row_moved_into_another_tenants_vault(tmp_path: Path, clock: FakeClock) -> None:
    ring = MasterKeyring([K1])  # same master key for both tenants: only the AAD separates them
    with (
        Vault(tmp_path / "acme.db", "acme", ring, clock) as acme,
        Vault(tmp_path / "globex.db", "globex", ring, clock) as globex,
    ):
        acme.put("openai", CANARY)
        insert_row(globex.path, raw_rows(acme.path)["openai"])
        assert globex.providers() == {"openai"}
        with pytest.raises(VaultError):
            globex.get("openai")
        assert acme.get("openai").reveal() == CANARY


def test_wrong_master_key(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "v.db"
    with Vault(path, "acme", MasterKeyring([K1]), clock) as v:
        v.put("openai", CANARY)
    with Vault(path, "acme", MasterKeyring([K2]), clock) as v, pytest.raises(VaultError) as err:
        v.get("openai")
    assert str(err.value) == "vault entry cannot be decrypted"
    # a key carrying the right id but wrong bytes cannot exist; forge the id column instead
    set_columns(path, "openai", key_id=key_id_of(K2))
    with Vault(path, "acme", MasterKeyring([K2]), clock) as v, pytest.raises(VaultError):
        v.get("openai")


def test_put_under_a_key_that_opens_no_other_entry_is_refused(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "v.db"
    with Vault(path, "acme", MasterKeyring([K1]), clock) as v:
        v.put("openai", CANARY)
    before = raw_rows(path)
    with Vault(path, "acme", MasterKeyring([K2]), clock) as v:
        with pytest.raises(ConfigError) as err:
            v.put("anthropic", "sk-ant-other")
        assert str(err.value) == (
            "the vault master key does not open tenant 'acme': its vault entry 'openai' is "
            f"under master key id {key_id_of(K1)}, the key in use is {key_id_of(K2)} (wrong "
            "AIID_MASTER_KEY or runtime/master.key?)"
        )
        assert raw_rows(path) == before  # nothing stored
        # Replacing the only entry is how a lost master key is recovered from: allowed.
        v.put("openai", CANARY + "-new")
        assert v.get("openai").reveal() == CANARY + "-new"
    # Mid-rotation the keyring holds both keys: entries under either are fine.
    with Vault(path, "acme", MasterKeyring([K1, K2]), clock) as v:
        v.put("anthropic", "sk-ant-other")
        assert {i.key_id for i in v.list()} == {key_id_of(K1), key_id_of(K2)}
        assert v.get("anthropic").reveal() == "sk-ant-other"


def test_nonces_and_deks_unique_across_1000_puts(vault: Vault) -> None:
    seen: set[bytes] = set()
    wrapped: set[bytes] = set()
    for i in range(1000):
        vault.put("openai", f"secret-{i % 3}")
        row = raw_rows(vault.path)["openai"]
        for col in ("nonce", "dek_nonce"):
            value = row[col]
            assert isinstance(value, bytes) and len(value) == 12
            assert value not in seen
            seen.add(value)
        wrapped.add(row["wrapped_dek"])  # type: ignore[arg-type]
    assert len(seen) == 2000
    assert len(wrapped) == 1000


# -- rewrap and rotation ------------------------------------------------------------------


def test_rewrap_in_one_transaction(vault: Vault) -> None:
    vault.put("anthropic", "sk-ant")
    vault.put("openai", CANARY)
    set_columns(vault.path, "openai", ciphertext=b"\x01" * 60)  # corrupt one entry
    with pytest.raises(VaultError):
        vault.rewrap(MasterKeyring([K2, K1]))
    ids = {p: r["key_id"] for p, r in raw_rows(vault.path).items()}
    assert ids == {"anthropic": key_id_of(K1), "openai": key_id_of(K1)}  # all rolled back


def test_rewrap_moves_every_entry(vault: Vault, clock: FakeClock) -> None:
    for p in ("openai", "anthropic", "github"):
        vault.put(p, f"{p}-{CANARY}")
    before = raw_rows(vault.path)
    assert all(i.rotated is None for i in vault.list())
    clock.advance(3600)
    new = MasterKeyring([K2, K1])
    assert vault.rewrap(new) == 3
    # `vault list` shows the re-keying: the entry's key id and its rotated time both change
    infos = vault.list()
    assert {i.rotated for i in infos} == {
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now()))
    }
    assert all(i.created < (i.rotated or "") for i in infos)
    assert vault.rewrap(new) == 0  # already there
    after = raw_rows(vault.path)
    for p, row in after.items():
        assert row["key_id"] == key_id_of(K2)
        assert row["wrapped_dek"] != before[p]["wrapped_dek"]
        assert row["dek_nonce"] != before[p]["dek_nonce"]
        assert row["ciphertext"] == before[p]["ciphertext"]  # secret AAD has no key id
    with Vault(vault.path, "acme", MasterKeyring([K2]), FakeClock()) as only_new:
        assert only_new.get("github").reveal() == f"github-{CANARY}"
    with (
        Vault(vault.path, "acme", MasterKeyring([K1]), FakeClock()) as only_old,
        pytest.raises(VaultError),
    ):
        only_old.get("github")


@pytest.fixture
def home(tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Home:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    monkeypatch.delenv("AIID_AUDIT_KEY", raising=False)
    h = Home(tmp_path / "home")
    init_home(h, clock)
    add_tenant(h, "acme", None, clock)
    add_tenant(h, "globex", None, clock)
    return h


def test_rotate_master(home: Home) -> None:
    old_keys = home.master_keys({})
    old = MasterKeyring(old_keys)
    for t in ("acme", "globex"):
        with Vault(home.vault_path(t), t, old) as v:
            v.put("openai", f"{t}-{CANARY}")
            v.put("anthropic", f"{t}-ant")
    assert rotate_master(home, env={}) == 4
    lines = home.master_key_path.read_text().split()
    assert len(lines) == 1
    assert base64.b64decode(lines[0]) not in old_keys
    assert (home.master_key_path.stat().st_mode & 0o777) == 0o600
    new = MasterKeyring.from_home(home, {})
    for t in ("acme", "globex"):
        with Vault(home.vault_path(t), t, new) as v:
            assert v.get("openai").reveal() == f"{t}-{CANARY}"
            assert {i.key_id for i in v.list()} == {new.current_id}
        with Vault(home.vault_path(t), t, old) as v, pytest.raises(VaultError):
            v.get("openai")  # the old key alone no longer decrypts anything


def test_running_gateway_follows_rotation(home: Home) -> None:
    """A vault opened before rotation with a ReloadingKeyring keeps working, no restart."""
    live = Vault(home.vault_path("acme"), "acme", ReloadingKeyring(home, env={}))
    live.put("openai", CANARY)
    assert live.get("openai").reveal() == CANARY
    rotate_master(home, env={})
    assert live.get("openai").reveal() == CANARY
    rotate_master(home, env={})
    assert live.get("openai").reveal() == CANARY
    live.close()


def test_keyring_stats_the_key_file_once_per_interval(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    ring = ReloadingKeyring(home, env={}, clock=clock, interval=1.0)
    stats: list[Path] = []
    real_stat = Path.stat

    def counting_stat(self: Path, *a: object, **k: object) -> os.stat_result:
        if self == home.master_key_path:
            stats.append(self)
        return real_stat(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "stat", counting_stat)
    first = ring()
    assert ring() is first and ring() is first and len(stats) == 1  # within the interval
    rotate_master(home, env={})
    assert ring() is first  # not looked at yet
    assert ring(force=True).current_id != first.current_id  # a vault entry asked: at once
    assert len(stats) == 2
    rotate_master(home, env={})
    clock.advance(0.9)
    before = ring().current_id
    clock.advance(0.2)  # the interval is over: the change is seen without being asked
    after = ring().current_id
    assert after != before and len(stats) == 3


def test_interrupted_rotation_is_finished_by_the_next(home: Home) -> None:
    first = MasterKeyring.from_home(home, {})
    with Vault(home.vault_path("acme"), "acme", first) as v:
        v.put("openai", CANARY)
    # simulate a crash after step 1: the file lists a newer key and the old one
    newer = os.urandom(32)
    home.master_key_path.write_text(
        base64.b64encode(newer).decode() + "\n" + home.master_key_path.read_text()
    )
    assert rotate_master(home, env={}) == 1
    assert len(home.master_key_path.read_text().split()) == 1
    with Vault(home.vault_path("acme"), "acme", MasterKeyring.from_home(home, {})) as v:
        assert v.get("openai").reveal() == CANARY


def test_rotate_refused_with_env_key(home: Home) -> None:
    before = home.master_key_path.read_bytes()
    env = {MASTER_KEY_ENV: base64.b64encode(K1).decode()}
    with pytest.raises(ConfigError, match=MASTER_KEY_ENV):
        rotate_master(home, env=env)
    assert home.master_key_path.read_bytes() == before


# -- canary -------------------------------------------------------------------------------


def test_plaintext_never_at_rest_or_in_output(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "vault.db"
    with Vault(path, "acme", MasterKeyring([K1]), clock) as v:
        v.put("openai", CANARY)
        v.put("openai", CANARY + "-2")  # replaced entry: secure_delete leaves nothing behind
        v.rewrap(MasterKeyring([K2, K1]))
        secret = v.get("openai")
        listing = repr(v.list()) + repr(v.providers()) + repr(v)
        set_columns(path, "openai", nonce=os.urandom(12))
        with pytest.raises(VaultError) as err:
            v.get("openai")
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for needle in (CANARY.encode(), CANARY.encode("utf-16-le"), base64.b64encode(CANARY.encode())):
        assert needle not in blob
    for text in (repr(secret), str(secret), listing, str(err.value), repr(err.value)):
        assert CANARY not in text


def test_secret_ciphertext_is_bound_to_its_slot(vault: Vault) -> None:
    """Even with a correctly wrapped DEK for the new slot, a moved ciphertext is refused."""
    vault.put("openai", CANARY)
    row = raw_rows(vault.path)["openai"]
    ring = MasterKeyring([K1])
    dek = ring.aead(ring.current_id).decrypt(
        row["dek_nonce"],  # type: ignore[arg-type]
        row["wrapped_dek"],  # type: ignore[arg-type]
        _dek_aad("acme", "openai", ring.current_id),
    )
    dek_nonce = os.urandom(12)
    rewrapped = ring.aead(ring.current_id).encrypt(
        dek_nonce, dek, _dek_aad("acme", "anthropic", ring.current_id)
    )
    insert_row(
        vault.path,
        {**row, "provider": "anthropic", "wrapped_dek": rewrapped, "dek_nonce": dek_nonce},
    )
    with pytest.raises(VaultError):
        vault.get("anthropic")


def test_wrapped_dek_is_bound_to_its_slot(vault: Vault) -> None:
    """A DEK known from one slot cannot carry a chosen secret into another slot."""
    vault.put("openai", CANARY)
    row = raw_rows(vault.path)["openai"]
    ring = MasterKeyring([K1])
    dek = ring.aead(ring.current_id).decrypt(
        row["dek_nonce"],  # type: ignore[arg-type]
        row["wrapped_dek"],  # type: ignore[arg-type]
        _dek_aad("acme", "openai", ring.current_id),
    )
    nonce = os.urandom(12)
    planted = AESGCM(dek).encrypt(nonce, b"attacker-key", _secret_aad("acme", "anthropic"))
    insert_row(vault.path, {**row, "provider": "anthropic", "nonce": nonce, "ciphertext": planted})
    with pytest.raises(VaultError):
        vault.get("anthropic")


def test_get_retries_a_stale_keyring_source_once(vault: Vault) -> None:
    vault.put("openai", CANARY)
    answers = iter([MasterKeyring([K2]), MasterKeyring([K2, K1])])
    with Vault(vault.path, "acme", lambda: next(answers)) as v:
        assert v.get("openai").reveal() == CANARY


def vault_bytes(home: Home, tenant: str) -> bytes:
    tdir = home.tenant_dir(tenant)
    return b"".join(p.read_bytes() for p in tdir.iterdir() if p.name.startswith("vault.db"))


def test_retired_wrappings_leave_the_disk(home: Home) -> None:
    """Replaced entries (secure_delete) and pre-rotation wrappings (WAL checkpoint) are gone,
    even while a gateway keeps the vault open."""
    live = Vault(home.vault_path("acme"), "acme", ReloadingKeyring(home, env={}))
    try:
        live.put("openai", CANARY * 80)  # a large cell, then replaced by a small one
        first = raw_rows(home.vault_path("acme"))["openai"]["wrapped_dek"]
        for p in ("openai", "anthropic", "github"):
            live.put(p, f"{p}-{CANARY}")
        assert isinstance(first, bytes)
        old = [r["wrapped_dek"] for r in raw_rows(home.vault_path("acme")).values()]
        rotate_master(home, env={})
        blob = vault_bytes(home, "acme")
        for w in [first, *old]:
            assert isinstance(w, bytes) and w not in blob
        assert live.get("github").reveal() == f"github-{CANARY}"
    finally:
        live.close()


def test_replaced_entry_leaves_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    with Vault(path, "acme", MasterKeyring([K1])) as v:
        v.put("openai", CANARY * 80)
        old = raw_rows(path)["openai"]
        v.put("openai", "small")
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for col in ("wrapped_dek", "ciphertext"):
        value = old[col]
        assert isinstance(value, bytes) and value[:32] not in blob


def test_failed_rotation_keeps_every_key_and_names_the_tenant(home: Home) -> None:
    ring = MasterKeyring.from_home(home, {})
    with Vault(home.vault_path("acme"), "acme", ring) as v:
        v.put("openai", CANARY)
    with Vault(home.vault_path("globex"), "globex", ring) as v:
        v.put("openai", "sk-globex")
        v.put("broken", "sk-broken")
    set_columns(home.vault_path("globex"), "broken", ciphertext=b"\x02" * 40)
    with pytest.raises(VaultError, match="'globex'.*not finished") as err:
        rotate_master(home, env={})
    assert CANARY not in str(err.value)
    keys = home.master_keys({})
    assert len(keys) == 2 and ring.current_id in MasterKeyring(keys)
    with Vault(home.vault_path("globex"), "globex", MasterKeyring(keys)) as v:
        assert v.get("openai").reveal() == "sk-globex"  # still readable mid-rotation
        v.put("broken", "sk-fixed")
    assert rotate_master(home, env={}) == 3
    assert len(home.master_keys({})) == 1


def test_a_gateway_vault_reads_each_entry_at_most_once_per_interval(home: Home) -> None:
    clock = FakeClock()
    cli = Vault(home.vault_path("acme"), "acme", ReloadingKeyring(home, env={}))
    live = Vault(
        home.vault_path("acme"), "acme", ReloadingKeyring(home, env={}), clock, cache_for=1.0
    )
    try:
        cli.put("openai", "first-" + CANARY)
        assert live.get("openai").reveal() == "first-" + CANARY
        cli.put("openai", "second-" + CANARY)  # another process: `aiid vault put`
        assert live.get("openai").reveal() == "first-" + CANARY  # within the interval
        clock.advance(1.01)
        assert live.get("openai").reveal() == "second-" + CANARY
        cli.delete("openai")
        assert live.get("openai").reveal() == "second-" + CANARY
        clock.advance(1.01)
        with pytest.raises(SecretNotFound):
            live.get("openai")
        cli.put("openai", "third-" + CANARY)  # a miss is never cached
        assert live.get("openai").reveal() == "third-" + CANARY
    finally:
        cli.close()
        live.close()


def test_a_cached_entry_rewrapped_by_rotation_is_read_again_at_once(home: Home) -> None:
    clock = FakeClock()
    ring = ReloadingKeyring(home, env={}, clock=clock, interval=1.0)
    live = Vault(home.vault_path("acme"), "acme", ring, clock, cache_for=60.0)
    try:
        live.put("openai", CANARY)
        assert live.get("openai").reveal() == CANARY  # cached, wrapped under master key 1
        rotate_master(home, env={})  # re-wraps on disk and retires key 1
        clock.advance(1.1)  # the keyring now knows only key 2; the cached row names key 1
        assert live.get("openai").reveal() == CANARY
    finally:
        live.close()


def test_without_cache_every_get_reads_the_disk(home: Home) -> None:
    cli = Vault(home.vault_path("acme"), "acme", ReloadingKeyring(home, env={}))
    other = Vault(home.vault_path("acme"), "acme", ReloadingKeyring(home, env={}))
    try:
        cli.put("openai", "a-" + CANARY)
        assert other.get("openai").reveal() == "a-" + CANARY
        cli.put("openai", "b-" + CANARY)
        assert other.get("openai").reveal() == "b-" + CANARY
    finally:
        cli.close()
        other.close()


def test_a_vault_corrupted_past_its_header_is_one_clear_error(tmp_path: Path) -> None:
    """[AM] Pages corrupted past the header: sqlite3's "malformed" reached the gateway's start
    as a traceback (no file named), and a running gateway took it for a missing key."""
    path = tmp_path / "acme" / "vault.db"
    with Vault(path, "acme", MasterKeyring([K1])) as v:
        for i in range(40):  # a few pages of entries
            v.put(f"p{i}", CANARY + "x" * 200)
    data = bytearray(path.read_bytes())
    for i in range(4096, len(data), 3):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with Vault(path, "acme", MasterKeyring([K1])) as v:
        for read in (v.list, v.providers, lambda: v.get("p1")):
            with pytest.raises(VaultError, match="unusable") as e:
                read()
            assert str(path) in str(e.value) and CANARY not in str(e.value)
