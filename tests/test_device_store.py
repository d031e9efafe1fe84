"""The device's encrypted store: nothing readable at rest, wrong keys destroy nothing, atomic imports and rekeys."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import stat
import struct
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, create_engine

from client import device_store
from client.device_store import (
    ConcurrentWriteError,
    DeviceDataStore,
    Interaction,
    StoreCorruptError,
    WrongKeyError,
    is_enrolled,
    key_from_passphrase,
    stored_device_id,
)
from client.node_config import (
    deployed_device,
    device_data_from_node,
    device_index,
    is_deployed,
    key_from_node_config,
    open_node_store,
    store_path,
)
from client.receipts import RECEIPTS_KEPT
from client.store_keys import KeyFileError, create_key_file, key_from_file
from shared.config import parse_config
from shared.data.split import leave_one_out
from shared.data.types import DataError, InteractionLog
from shared.privacy.ledger_store import DeviceLedgerStore

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


def test_creates_only_its_own_tables(tmp_path: Path, key: bytes) -> None:
    import server.run_store  # noqa: F401 - puts the server's tables on the shared declarative base
    from shared.sql_store import Base

    assert {"runs", "device_data_meta", "device_data_blobs"} <= set(Base.metadata.tables)
    key_store, passphrase_store = tmp_path / "key.db", tmp_path / "passphrase.db"
    passphrase_key = key_from_passphrase(passphrase_store, "pw")  # creates the salt's table first
    for path, path_key in ((key_store, key), (passphrase_store, passphrase_key)):
        with DeviceDataStore(path, 1, path_key):
            pass
        with closing(sqlite3.connect(path)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"device_data_meta", "device_data_blobs"}


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


def test_a_damaged_key_check_is_reported_as_damage_not_as_a_wrong_key(tmp_path: Path, key: bytes) -> None:
    import sqlite3

    from client.device_store import _KEY_CHECK

    path = tmp_path / "device.db"
    with DeviceDataStore(path, 3, key) as store:
        store.import_interactions(_history())
    with sqlite3.connect(path) as con:
        (blob,) = con.execute("SELECT ciphertext FROM device_data_blobs WHERE name = ?", (_KEY_CHECK,)).fetchone()
        con.execute(
            "UPDATE device_data_blobs SET ciphertext = ? WHERE name = ?", (bytes([blob[0] ^ 1]) + blob[1:], _KEY_CHECK)
        )
    before = path.read_bytes()
    with pytest.raises(StoreCorruptError, match="key check record is damaged"):
        DeviceDataStore(path, 3, key)
    with pytest.raises(WrongKeyError, match="wrong key or passphrase"):  # a wrong key is still named so
        DeviceDataStore(path, 3, os.urandom(32))
    assert path.read_bytes() == before


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


def _delta(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "item_embedding.weight": torch.randn(20, 4, generator=gen) * 1e-2 + 1234.5,  # values easy to spot
        "mlp.0.bias": torch.randn(4, generator=gen),
    }


def test_contribution_receipts_round_trip_and_bounded(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.db"
    deltas = {n: _delta(n) for n in range(RECEIPTS_KEPT + 2)}
    with DeviceDataStore(path, 2, key) as store:
        assert store.contribution_receipts() == []
        first = store.add_contribution_receipt(
            run="r#1-ab", version=0, task_id=10, num_examples=37, delta=deltas[0],
            clipping_range=8.0, quantization_range=2**22, modulus_range=2**32, max_weight=1000.0, clipped=False,
        )  # fmt: skip
        assert first.seq == 1
        for n in range(1, RECEIPTS_KEPT + 2):
            store.add_contribution_receipt(run="r#1-ab", version=n, task_id=10 + n, num_examples=37 + n,
                                           delta=deltas[n])  # fmt: skip
    with DeviceDataStore(path, 2, key) as store:  # reopened: they persist
        kept = store.contribution_receipts()
    # Only the most recent RECEIPTS_KEPT, oldest first, numbered on.
    assert [r.seq for r in kept] == list(range(3, RECEIPTS_KEPT + 3))
    assert [r.version for r in kept] == list(range(2, RECEIPTS_KEPT + 2))
    for r in kept:
        assert r.run == "r#1-ab" and r.task_id == 10 + r.version and r.num_examples == 37 + r.version
        assert set(r.delta) == set(deltas[r.version])
        for k, v in deltas[r.version].items():
            assert r.delta[k].dtype == v.dtype
            torch.testing.assert_close(r.delta[k], v, rtol=0, atol=0)
        assert r.clipping_range is None and r.quantization_range is None and r.clipped is None
        assert r.created_at > 0
    with DeviceDataStore(path, 2, key) as store:  # the protocol settings round-trip too
        store.add_contribution_receipt(
            run="r#2-cd", version=0, task_id=1, num_examples=5, delta=deltas[0],
            clipping_range=8.0, quantization_range=2**22, modulus_range=2**32, max_weight=1000.0, clipped=False,
        )  # fmt: skip
        last = store.contribution_receipts()[-1]
        assert len(store.contribution_receipts()) == RECEIPTS_KEPT
    assert (last.run, last.clipping_range, last.quantization_range, last.modulus_range, last.max_weight) == (
        "r#2-cd",
        8.0,
        2**22,
        2**32,
        1000.0,
    )
    assert last.clipped is False
    with DeviceDataStore(path, 2, key) as store, pytest.raises(ValueError, match="keep"):
        store.add_contribution_receipt(run="r", version=0, task_id=0, num_examples=1, delta=deltas[0], keep=0)


def test_contribution_receipts_are_encrypted_at_rest(tmp_path: Path, key: bytes) -> None:
    store_dir = tmp_path / "store"
    delta = _delta(7)
    with DeviceDataStore(store_dir / "device.db", 5, key) as store:
        store.add_contribution_receipt(run="run-secret-label", version=3, task_id=4, num_examples=29, delta=delta)
    raw = _files_bytes(store_dir)
    for value in delta.values():
        flat = value.numpy().ravel()
        for dtype in (np.float32, np.float64):
            assert np.asarray(flat[:2], dtype=dtype).tobytes() not in raw
    assert b"run-secret-label" not in raw and b"item_embedding" not in raw
    # A wrong key reads nothing; a tampered receipt does not authenticate.
    with pytest.raises(WrongKeyError):
        DeviceDataStore(store_dir / "device.db", 5, os.urandom(32))
    # Renamed (another receipt number) or altered, a receipt does not authenticate.
    with sqlite3.connect(store_dir / "device.db") as con:
        con.execute("UPDATE device_data_blobs SET name = 'receipt/0000000009' WHERE name LIKE 'receipt/%'")
    with DeviceDataStore(store_dir / "device.db", 5, key) as store, pytest.raises(StoreCorruptError):
        store.contribution_receipts()
    with sqlite3.connect(store_dir / "device.db") as con:
        con.execute("UPDATE device_data_blobs SET name = 'receipt/0000000001' WHERE name LIKE 'receipt/%'")
    with DeviceDataStore(store_dir / "device.db", 5, key) as store:
        assert [r.seq for r in store.contribution_receipts()] == [1]
    with sqlite3.connect(store_dir / "device.db") as con:
        (blob,) = con.execute("SELECT ciphertext FROM device_data_blobs WHERE name LIKE 'receipt/%'").fetchone()
        flipped = bytes([blob[0] ^ 1]) + blob[1:]
        con.execute("UPDATE device_data_blobs SET ciphertext = ? WHERE name LIKE 'receipt/%'", (flipped,))
    with DeviceDataStore(store_dir / "device.db", 5, key) as store, pytest.raises(StoreCorruptError, match="tamper"):
        store.contribution_receipts()


def test_node_config_names_the_device_and_its_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config({"output-dir": str(tmp_path / "run")})
    assert device_index({"device-id": 7, "partition-id": 2}) == 7  # a deployed device's own id wins
    assert device_index({"partition-id": 2}) == 2
    with pytest.raises(KeyError, match="neither 'device-id' nor 'partition-id'"):
        device_index({})
    assert store_path(cfg, {"partition-id": 2}) == tmp_path / "run" / "devices" / "device-2.db"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert store_path(cfg, {"store": "~/device.db", "device-id": 7}) == tmp_path / "device.db"
    assert not is_deployed({"store": "x.db", "device-id": 1}) and not is_deployed({"key-file": "k", "device-id": 1})
    assert is_deployed({"store": "x.db", "passphrase-env": "PW"})


def test_node_config_key_sources(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "device.db"
    key_file = str(tmp_path / "device.key")
    assert key_from_node_config({"store": str(path)}, path) is None
    assert key_from_node_config({"key-file": key_file}, path) == key
    with pytest.raises(ValueError, match="not both"):
        key_from_node_config({"key-file": key_file, "passphrase-env": "FEDREC_TEST_PW"}, path)
    monkeypatch.delenv("FEDREC_TEST_PW", raising=False)
    with pytest.raises(ValueError, match="node config 'passphrase-env': environment variable 'FEDREC_TEST_PW'"):
        key_from_node_config({"passphrase-env": "FEDREC_TEST_PW"}, path)
    monkeypatch.setenv("FEDREC_TEST_PW", "s3cret")
    assert key_from_node_config({"passphrase-env": "FEDREC_TEST_PW"}, path) == key_from_passphrase(path, "s3cret")


def test_deployed_device_reads_data_and_personal_state(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.db"
    node = {"store": str(path), "key-file": str(tmp_path / "device.key"), "device-id": 4}
    assert deployed_device({"partition-id": 4}) is None
    with DeviceDataStore(path, 4, key, num_items=20) as store:
        store.import_interactions(_history((4, 5, 6, 7)))
    found = deployed_device(node)
    assert found is not None and found.personal == {}
    assert (found.num_items, found.data.test_item) == (20, 7)
    with DeviceDataStore(path, 4, key) as store:
        store.save_personal({"user_embedding.weight": torch.ones(1, 3)})
    found = deployed_device({**node, "num-items": 30})
    assert found is not None and found.num_items == 30
    torch.testing.assert_close(found.personal["user_embedding.weight"], torch.ones(1, 3))


def test_open_node_store(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.db"
    with DeviceDataStore(path, 4, key) as store:
        store.add_contribution_receipt(run="r", version=0, task_id=0, num_examples=1, delta=_delta(0))
    assert open_node_store({"partition-id": 4}) is None
    assert open_node_store({"store": str(path), "device-id": 4}) is None  # no key source: simulation
    node = {"store": str(path), "key-file": str(tmp_path / "device.key"), "device-id": 4}
    opened = open_node_store(node)
    assert opened is not None
    with opened as store:
        assert len(store.contribution_receipts()) == 1
    with pytest.raises(ValueError, match="device-id"):
        open_node_store({"store": str(path), "key-file": str(tmp_path / "device.key")})
    with pytest.raises(DataError, match="not found"):
        open_node_store({**node, "store": str(tmp_path / "missing.db")})


# ------------------------------------------------------------------ key rotation


def _fill_store(path: Path, device_id: int, key: bytes) -> None:
    """A store with everything a deployed device keeps: data, personal state, receipts, ledger."""
    with DeviceDataStore(path, device_id, key, num_items=2_000_000) as store:
        store.import_interactions(_history())
        store.save_personal({"user_embedding.weight": torch.full((1, 4), 1234.5678)})
        for n in range(2):
            store.add_contribution_receipt(run="r#1", version=n, task_id=n, num_examples=9, delta=_delta(n),
                                           clipping_range=8.0, clipped=False)  # fmt: skip
    with DeviceLedgerStore(path, device_id=device_id) as ledger:
        for k in range(3):
            ledger.append(run="r#1", version=k, task_id=k, unit="record", mechanism="subsampled-gaussian",
                          noise_multiplier=1.1, sample_rate=0.01, steps=20, clip_norm=1.0, accountant="rdp",
                          epsilon=0.5 * (k + 1), delta=1e-5, timestamp=1_700_000_000.0 + k)  # fmt: skip


def _snapshot(path: Path, device_id: int, key: bytes) -> dict[str, object]:
    """Everything the store holds, read back through the public API, in comparable form."""
    with DeviceDataStore(path, device_id, key) as store:
        receipts = store.contribution_receipts()
        snap: dict[str, object] = {
            "interactions": store.interactions(),
            "num_items": store.num_items,
            "personal": {k: v.tolist() for k, v in store.load_personal().items()},
            "receipts": [
                (dataclasses.replace(r, delta={}), {k: v.tolist() for k, v in r.delta.items()}) for r in receipts
            ],  # fmt: skip
        }
    with DeviceLedgerStore(path) as ledger:
        identity = ledger.identity()
        snap |= {
            "device_id": ledger.device_id,
            "public_key": identity.public_key,
            "private_key": identity.private_bytes(),
            "entries": ledger.entries(),
            "history": ledger.history(),
        }
    return snap


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(path: Path, table: str) -> dict[str, tuple[Any, ...]]:
    query = {"device_data_blobs": "SELECT name, nonce, ciphertext, revision FROM device_data_blobs",
             "device_data_meta": "SELECT key, value FROM device_data_meta"}[table]  # fmt: skip
    with closing(sqlite3.connect(path)) as con:
        return {row[0]: tuple(row[1:]) for row in con.execute(query)}


def test_rekey_key_file_to_passphrase_keeps_everything(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.db"
    _fill_store(path, 3, key)
    before = _snapshot(path, 3, key)
    blobs_before, meta_before = _rows(path, "device_data_blobs"), _rows(path, "device_data_meta")
    assert set(blobs_before) == {"key_check", "interactions", "personal", "receipt/0000000001", "receipt/0000000002"}
    assert "scrypt_salt" not in meta_before

    with DeviceDataStore(path, 3, key) as store:
        assert store.rekey(new_passphrase="a new long passphrase") == len(blobs_before)
        assert store.interactions() == _history()  # the open handle goes on with the new key

    with pytest.raises(WrongKeyError, match="wrong key or passphrase"):
        DeviceDataStore(path, 3, key)
    new_key = key_from_passphrase(path, "a new long passphrase")
    assert _snapshot(path, 3, new_key) == before
    with pytest.raises(WrongKeyError, match="wrong key or passphrase"):
        DeviceDataStore(path, 3, key_from_passphrase(path, "a new long passphrasE"))
    # Every blob (the key check too) was sealed again: same rows, new nonces and ciphertexts, under the
    # same associated data (device, table, row); the salt is new and nothing else in the clear changed.
    blobs_after, meta_after = _rows(path, "device_data_blobs"), _rows(path, "device_data_meta")
    assert set(blobs_after) == set(blobs_before)
    aead = AESGCM(new_key)
    for name, (nonce, ciphertext, revision) in blobs_after.items():
        old_nonce, old_ciphertext, old_revision = blobs_before[name]
        assert nonce != old_nonce and ciphertext != old_ciphertext and revision == old_revision + 1
        ad = f"fedrec-device-store/v1|device=3|table=device_data_blobs|name={name}".encode()
        aead.decrypt(nonce, ciphertext, ad)
        with pytest.raises(InvalidTag):
            aead.decrypt(nonce, ciphertext, ad.replace(b"device=3", b"device=4"))
    assert len(meta_after.pop("scrypt_salt")[0]) == 16
    assert meta_after == meta_before


def test_rekey_passphrase_to_key_file_and_to_a_new_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    old_key = key_from_passphrase(path, "the old passphrase")
    _fill_store(path, 8, old_key)
    before = _snapshot(path, 8, old_key)
    old_salt = _rows(path, "device_data_meta")["scrypt_salt"]

    with DeviceDataStore(path, 8, old_key) as store:  # passphrase -> passphrase: a new salt
        store.rekey(new_passphrase="the old passphrase")
    assert _rows(path, "device_data_meta")["scrypt_salt"] != old_salt
    with pytest.raises(WrongKeyError):
        DeviceDataStore(path, 8, old_key)  # same passphrase, old salt: not the key any more
    middle_key = key_from_passphrase(path, "the old passphrase")
    assert _snapshot(path, 8, middle_key) == before

    new_key = create_key_file(tmp_path / "new.key")
    with DeviceDataStore(path, 8, middle_key) as store:  # passphrase -> key file: the salt goes
        store.rekey(new_key)
    assert "scrypt_salt" not in _rows(path, "device_data_meta")
    with pytest.raises(WrongKeyError, match="created with a key file"):
        key_from_passphrase(path, "the old passphrase")
    assert _snapshot(path, 8, key_from_file(tmp_path / "new.key")) == before


def test_rekey_with_a_wrong_or_stale_key_changes_nothing(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "device.db"
    _fill_store(path, 3, key)
    digest = _sha256(path)
    with pytest.raises(WrongKeyError, match="wrong key or passphrase"):
        DeviceDataStore(path, 3, os.urandom(32)).rekey(os.urandom(32))
    assert _sha256(path) == digest
    # Two handles on the file: once one has rotated the key, the other's rekey is refused, not applied.
    new_key = os.urandom(32)
    with DeviceDataStore(path, 3, key) as first, DeviceDataStore(path, 3, key) as second:
        first.rekey(new_key)
        digest = _sha256(path)
        with pytest.raises(WrongKeyError, match="wrong key or passphrase"):
            second.rekey(os.urandom(32))
    assert _sha256(path) == digest
    with DeviceDataStore(path, 3, new_key) as store:
        assert store.interactions() == _history()
        with pytest.raises(ValueError, match="current key"):
            store.rekey(new_key)
        for bad in ({}, {"new_key": os.urandom(32), "new_passphrase": "pw"}, {"new_key": b"short"},
                    {"new_passphrase": ""}):  # fmt: skip
            with pytest.raises(ValueError):
                store.rekey(**bad)
    assert _sha256(path) == digest


@pytest.mark.parametrize("direction", ["key-file-to-passphrase", "passphrase-to-key-file"])
def test_rekey_failing_midway_rolls_everything_back(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    path = tmp_path / "device.db"
    old_key = key if direction == "key-file-to-passphrase" else key_from_passphrase(path, "old passphrase")
    _fill_store(path, 3, old_key)
    before, digest = _snapshot(path, 3, old_key), _sha256(path)
    real_aesgcm = AESGCM
    sealed: list[bytes] = []
    lock_checked: list[bool] = []

    class FailingAESGCM:
        """The new key's AESGCM: its second encryption fails, after the salt and one blob were written."""

        def __init__(self, new_key: bytes) -> None:
            self._aead = real_aesgcm(new_key)

        def decrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
            # The "is it the current key?" check, before any write: the write lock is already held.
            with closing(sqlite3.connect(path, timeout=0)) as other, pytest.raises(sqlite3.OperationalError,
                                                                                   match="locked"):  # fmt: skip
                other.execute("BEGIN IMMEDIATE")
            lock_checked.append(True)
            return self._aead.decrypt(nonce, data, ad)

        def encrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
            sealed.append(ad)
            if len(sealed) == 2:
                raise RuntimeError("simulated failure while re-encrypting the blobs")
            return self._aead.encrypt(nonce, data, ad)

    with DeviceDataStore(path, 3, old_key) as store:
        monkeypatch.setattr(device_store, "AESGCM", FailingAESGCM)  # for the new key only
        with pytest.raises(RuntimeError, match="simulated failure"):
            if direction == "key-file-to-passphrase":
                store.rekey(new_passphrase="new passphrase")
            else:
                store.rekey(os.urandom(32))
        assert len(sealed) == 2 and lock_checked == [True]
        assert store.interactions() == _history()  # the handle keeps the old key
    monkeypatch.setattr(device_store, "AESGCM", real_aesgcm)
    assert _sha256(path) == digest  # rolled back: byte-identical, salt and first blob included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.db", "device.key"]  # no journal left
    assert _snapshot(path, 3, old_key) == before
    with DeviceDataStore(path, 3, old_key) as store:  # and a retry succeeds
        store.rekey(new_passphrase="new passphrase")
    assert _snapshot(path, 3, key_from_passphrase(path, "new passphrase")) == before


def test_rekey_of_a_damaged_or_busy_store_changes_nothing(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "device.db"
    _fill_store(path, 3, key)
    with closing(sqlite3.connect(path)) as con, con:
        (blob,) = con.execute("SELECT ciphertext FROM device_data_blobs WHERE name = 'receipt/0000000002'").fetchone()
        con.execute("UPDATE device_data_blobs SET ciphertext = ? WHERE name = 'receipt/0000000002'",
                    (bytes([blob[0] ^ 1]) + blob[1:],))  # fmt: skip
    digest = _sha256(path)
    with DeviceDataStore(path, 3, key) as store, pytest.raises(StoreCorruptError, match="receipt/0000000002"):
        store.rekey(os.urandom(32))
    assert _sha256(path) == digest

    def impatient_engine(p: Path) -> Engine:
        return create_engine(f"sqlite:///{p}", connect_args={"timeout": 0.05})

    monkeypatch.setattr(device_store, "_engine", impatient_engine)
    with closing(sqlite3.connect(path)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process is writing
        with DeviceDataStore(path, 3, key) as store, pytest.raises(ConcurrentWriteError, match="another process"):
            store.rekey(os.urandom(32))
        other.rollback()
    assert _sha256(path) == digest
