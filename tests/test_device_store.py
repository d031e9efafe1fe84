"""The device's encrypted store: nothing readable at rest, wrong keys destroy nothing, atomic imports."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from client.device_store import (
    DeviceDataStore,
    Interaction,
    KeyFileError,
    StoreCorruptError,
    WrongKeyError,
    create_key_file,
    device_data_from_node,
    is_enrolled,
    key_from_file,
    key_from_passphrase,
    stored_device_id,
)
from client.ledger_store import DeviceLedgerStore
from shared.config import parse_config
from shared.data.split import leave_one_out
from shared.data.types import DataError, InteractionLog

DISTINCT = (987654, 987655, 987656, 987657)


def _history(items: tuple[int, ...] = DISTINCT) -> list[Interaction]:
    return [Interaction(timestamp=1_700_000_000.0 + 60 * n, item_id=i, rating=4.5) for n, i in enumerate(items)]


def _files_bytes(directory: Path) -> bytes:
    """Every file SQLite left in ``directory`` (database, journals), concatenated."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.suffix != ".key")


@pytest.fixture()
def key(tmp_path: Path) -> bytes:
    return create_key_file(tmp_path / "device.key")


def test_item_ids_are_not_stored_in_the_clear(tmp_path: Path, key: bytes) -> None:
    store_dir = tmp_path / "store"
    with DeviceDataStore(store_dir / "device.db", 3, key) as store:
        store.import_interactions(_history())
        store.save_personal({"user_embedding.weight": torch.full((1, 4), 1234.5678)})
        assert [r.item_id for r in store.interactions()] == list(DISTINCT)
    raw = _files_bytes(store_dir)
    for item in DISTINCT:
        assert str(item).encode() not in raw
        assert struct.pack("<i", item) not in raw
        assert struct.pack("<q", item) not in raw
    assert b"1700000000" not in raw and struct.pack("<d", 1_700_000_000.0) not in raw
    assert struct.pack("<f", 1234.5678) not in raw  # the personal embedding is encrypted too


def test_store_file_and_key_file_are_owner_only(tmp_path: Path, key: bytes) -> None:
    with DeviceDataStore(tmp_path / "new" / "device.db", 1, key):
        pass
    assert stat.S_IMODE((tmp_path / "new" / "device.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "device.key").stat().st_mode) == 0o600
    assert key_from_file(tmp_path / "device.key") == key


def test_key_file_readable_by_others_is_refused(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.key"
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        key_from_file(path)
    with pytest.raises(KeyFileError, match="already exists"):
        create_key_file(path)  # never overwrites a key
    assert path.read_bytes() == key


def test_malformed_or_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"short")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a key file"):
        key_from_file(bad)
    with pytest.raises(KeyFileError, match="not found"):
        key_from_file(tmp_path / "missing.key")
    hexed = tmp_path / "hex.key"
    hexed.write_text("ab" * 32 + "\n")
    hexed.chmod(0o600)
    assert key_from_file(hexed) == bytes.fromhex("ab" * 32)


def test_wrong_key_raises_and_leaves_the_file_byte_identical(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.db"
    with DeviceDataStore(path, 3, key) as store:
        store.import_interactions(_history())
    before = path.read_bytes()
    with pytest.raises(WrongKeyError, match="wrong key or passphrase"):
        DeviceDataStore(path, 3, os.urandom(32))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.db", "device.key"]


def test_wrong_passphrase_raises_and_destroys_nothing(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    good = key_from_passphrase(path, "correct horse battery staple")
    with DeviceDataStore(path, 2, good) as store:
        store.import_interactions(_history())
    assert key_from_passphrase(path, "correct horse battery staple") == good  # the salt is kept
    before = path.read_bytes()
    wrong = key_from_passphrase(path, "Correct horse battery staple")
    with pytest.raises(WrongKeyError, match="created with a passphrase"):
        DeviceDataStore(path, 2, wrong)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="empty"):
        key_from_passphrase(path, "")


def test_passphrase_on_a_key_file_store_changes_nothing(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.db"
    with DeviceDataStore(path, 2, key) as store:
        store.import_interactions(_history())
    before = path.read_bytes()
    with pytest.raises(WrongKeyError, match="created with a key file"):
        key_from_passphrase(path, "pw")
    assert path.read_bytes() == before


def test_salts_differ_between_stores(tmp_path: Path) -> None:
    assert key_from_passphrase(tmp_path / "a.db", "pw") != key_from_passphrase(tmp_path / "b.db", "pw")


def test_other_device_and_tampering_are_refused(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.db"
    with DeviceDataStore(path, 3, key) as store:
        store.import_interactions(_history())
    with pytest.raises(ValueError, match="not of device 4"):
        DeviceDataStore(path, 4, key)
    import sqlite3

    with sqlite3.connect(path) as con:
        (blob,) = con.execute("SELECT ciphertext FROM device_data_blobs WHERE name = 'interactions'").fetchone()
        flipped = bytes([blob[0] ^ 1]) + blob[1:]
        con.execute("UPDATE device_data_blobs SET ciphertext = ? WHERE name = 'interactions'", (flipped,))
    with DeviceDataStore(path, 3, key) as store, pytest.raises(StoreCorruptError, match="tampered"):
        store.interactions()


def test_import_is_atomic_and_idempotent(tmp_path: Path, key: bytes) -> None:
    with DeviceDataStore(tmp_path / "device.db", 0, key, num_items=10) as store:
        first = store.import_interactions(_history((1, 2, 3)))
        assert (first.added, first.skipped, first.total) == (3, 0, 3)
        again = store.import_interactions(_history((1, 2, 3)))  # the same file twice
        assert (again.added, again.skipped, again.total) == (0, 3, 3)
        conflicting = [Interaction(1_700_000_000.0, 1, rating=1.0), Interaction(1.0, 7, None)]
        with pytest.raises(ValueError, match="conflicting duplicates, nothing imported"):
            store.import_interactions(conflicting)
        with pytest.raises(ValueError, match="outside the catalogue"):
            store.import_interactions([Interaction(5.0, 8, None), Interaction(6.0, 10, None)])
        with pytest.raises(ValueError, match="timestamp must be finite"):
            store.import_interactions([Interaction(float("nan"), 4, None)])
        assert [r.item_id for r in store.interactions()] == [1, 2, 3]


def test_device_data_is_the_simulation_split(tmp_path: Path, key: bytes) -> None:
    items = [5, 3, 9, 1, 7, 2]
    times = [10.0, 5.0, 5.0, 30.0, 20.0, 30.0]  # ties keep import order, as in the simulation
    records = [Interaction(t, i, None) for i, t in zip(items, times, strict=True)]
    with DeviceDataStore(tmp_path / "device.db", 8, key, num_items=12) as store:
        store.import_interactions(records)
        data = store.device_data()
    log = InteractionLog(np.zeros(6, np.int64), np.array(items), np.array(times), 1, 12, None, "test")
    (expected,) = leave_one_out(log)
    assert data.device_id == 8
    np.testing.assert_array_equal(data.train_items, expected.train_items)
    assert (data.valid_item, data.test_item) == (expected.valid_item, expected.test_item) == (1, 2)


def test_device_data_needs_three_interactions_and_a_catalogue(tmp_path: Path, key: bytes) -> None:
    with DeviceDataStore(tmp_path / "device.db", 0, key) as store:
        store.import_interactions(_history((1, 2)))
        with pytest.raises(DataError, match="no catalogue size"):
            store.device_data()
        with pytest.raises(DataError, match="at least 3"):
            store.device_data(10)


def test_personal_state_round_trip(tmp_path: Path, key: bytes) -> None:
    with DeviceDataStore(tmp_path / "device.db", 0, key) as store:
        assert store.load_personal() == {}
        state = {"user_embedding.weight": torch.randn(1, 8)}
        store.save_personal(state)
        store.save_personal({k: v * 2 for k, v in state.items()})  # replaces
    with DeviceDataStore(tmp_path / "device.db", 0, key) as store:
        torch.testing.assert_close(store.load_personal()["user_embedding.weight"], state["user_embedding.weight"] * 2)


def test_shares_the_file_with_the_ledger_store(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.db"
    with DeviceLedgerStore(path, device_id=6) as ledger:
        public = ledger.identity().public_key
    assert not is_enrolled(path) and stored_device_id(path) is None
    with DeviceDataStore(path, 6, key, num_items=20) as store:
        store.import_interactions(_history((4, 5, 6)))
    assert stored_device_id(path) == 6
    with DeviceLedgerStore(path) as ledger:
        assert ledger.identity().public_key == public and ledger.device_id == 6


def test_device_data_from_node(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config({})
    path = tmp_path / "device.db"
    with DeviceDataStore(path, 4, key, num_items=20) as store:
        store.import_interactions(_history((4, 5, 6, 7)))
    assert device_data_from_node(cfg, {"partition-id": 4}) is None
    assert device_data_from_node(cfg, {"store": str(path), "device-id": 4}) is None  # no key: simulation route
    node = {"store": str(path), "key-file": str(tmp_path / "device.key"), "device-id": 4}
    found = device_data_from_node(cfg, node)
    assert found is not None
    data, num_items = found
    assert num_items == 20 and data.device_id == 4 and data.test_item == 7
    found = device_data_from_node(cfg, {**node, "num-items": 30})
    assert found is not None and found[1] == 30
    with pytest.raises(ValueError, match="device-id"):
        device_data_from_node(cfg, {"store": str(path), "key-file": str(tmp_path / "device.key")})

    pw_path = tmp_path / "pw.db"
    with DeviceDataStore(pw_path, 1, key_from_passphrase(pw_path, "s3cret"), num_items=20) as store:
        store.import_interactions(_history((1, 2, 3)))
    monkeypatch.setenv("FEDREC_TEST_PW", "s3cret")
    found = device_data_from_node(cfg, {"store": str(pw_path), "passphrase-env": "FEDREC_TEST_PW", "device-id": 1})
    assert found is not None and found[0].test_item == 3
    monkeypatch.setenv("FEDREC_TEST_PW", "wrong")
    with pytest.raises(WrongKeyError):
        device_data_from_node(cfg, {"store": str(pw_path), "passphrase-env": "FEDREC_TEST_PW", "device-id": 1})
