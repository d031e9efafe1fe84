"""Signed privacy ledger: identity, hash chain, device store and server store.

Everything is real: Ed25519 keys, SQLite files under ``tmp_path``, and tampering done
with raw SQL on those files, the way someone with access to the database would.
"""

from __future__ import annotations

import json
import sqlite3
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from server.privacy_store import ENTRIES_TABLE, PrivacyStore
from server.run_store import RunStore
from shared.privacy.identity import DeviceIdentity, fingerprint, verify_signature
from shared.privacy.ledger import (
    GENESIS,
    ChainProblem,
    LedgerEntry,
    canonical_bytes,
    compute_hash,
    entry_from_json,
    entry_to_json,
    make_entry,
    verify_chain,
)
from shared.privacy.ledger_store import DeviceLedgerStore

DEVICE = 7
N = 5


def _release(k: int, **overrides: Any) -> dict[str, Any]:
    """The k-th release of a device: fixed DP parameters, growing cumulative epsilon."""
    values: dict[str, Any] = {
        "run": "test-run",
        "version": 10 + k,
        "task_id": 100 + k,
        "unit": "record",
        "mechanism": "subsampled-gaussian",
        "noise_multiplier": 1.0,
        "sample_rate": 1 / 92,
        "steps": 10,
        "clip_norm": 1.0,
        "accountant": "rdp",
        "epsilon": 0.3 * (k + 1),
        "delta": 1e-5,
        "timestamp": 1_700_000_000.0 + k + 0.125,
    }
    values.update(overrides)
    return values


def _fill(store: DeviceLedgerStore, count: int, start: int = 0) -> list[LedgerEntry]:
    return [store.append(**_release(k)) for k in range(start, start + count)]


def _kinds(problems: list[ChainProblem]) -> list[tuple[str, int | None, int | None]]:
    return [(p.kind, p.seq, p.position) for p in problems]


# ---------------------------------------------------------------- raw-SQL tampering


def _sql(db: Path, statement: str, *params: object) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(statement, params)
    finally:
        conn.close()


def _row(ledger: Ledger, seq: int) -> dict[str, Any]:
    conn = sqlite3.connect(ledger.db)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute(f"SELECT * FROM {ledger.table} WHERE device_id = ? AND seq = ?", (DEVICE, seq)).fetchone()
    finally:
        conn.close()
    assert row is not None
    return dict(row)


def _update(ledger: Ledger, seq: int, /, **values: object) -> None:
    assignments = ", ".join(f"{name} = ?" for name in values)
    statement = f"UPDATE {ledger.table} SET {assignments} WHERE device_id = ? AND seq = ?"
    _sql(ledger.db, statement, *values.values(), DEVICE, seq)


def _delete(ledger: Ledger, seq: int) -> None:
    _sql(ledger.db, f"DELETE FROM {ledger.table} WHERE device_id = ? AND seq = ?", DEVICE, seq)


def _swap(ledger: Ledger, seq_a: int, seq_b: int) -> None:
    """Exchange two rows' contents, keeping their ids (so storage order changes)."""
    a, b = _row(ledger, seq_a), _row(ledger, seq_b)
    columns = [c for c in a if c != "id"]
    assignments = ", ".join(f"{c} = ?" for c in columns)

    def put(row_id: int, values: dict[str, Any], seq: int) -> None:
        params = [seq if c == "seq" else values[c] for c in columns]
        _sql(ledger.db, f"UPDATE {ledger.table} SET {assignments} WHERE id = ?", *params, row_id)

    put(a["id"], b, -1)  # placeholder seq: (device_id, seq) is unique
    put(b["id"], a, a["seq"])
    put(a["id"], b, b["seq"])


def _edit_and_rehash(ledger: Ledger, seq: int, /, **values: object) -> None:
    """Edit fields and store a correctly recomputed hash, without being able to re-sign."""
    row = _row(ledger, seq)
    row.update(values)
    fields = {name: row[name] for name in LedgerEntry.__dataclass_fields__}
    _update(ledger, seq, **values, entry_hash=compute_hash(fields))


# ------------------------------------------------------------- both stores, one API


@dataclass
class Ledger:
    """A stored ledger of N entries, on the device or on the server."""

    db: Path
    read: Callable[[], list[LedgerEntry]]
    public_key: str
    table: str  # the entries table in db


@pytest.fixture(params=["device", "server"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    device = DeviceLedgerStore(tmp_path / "device.db", device_id=DEVICE)
    _fill(device, N)
    if request.param == "device":
        yield Ledger(device.path, device.entries, device.identity().public_key, "ledger_entries")
        device.close()
        return
    server = PrivacyStore(f"sqlite:///{tmp_path / 'server.db'}")
    server.register_key(DEVICE, device.identity().public_key)
    assert server.accept(device.entries()) == []
    device.close()
    yield Ledger(tmp_path / "server.db", lambda: server.entries(DEVICE), server.public_key(DEVICE) or "", ENTRIES_TABLE)
    server.close()


# -------------------------------------------------------------------------- identity


def test_identity_signs_and_verifies_and_restores_from_private_bytes() -> None:
    identity = DeviceIdentity.generate()
    signature = identity.sign(b"release")

    restored = DeviceIdentity.from_private_bytes(identity.private_bytes())

    assert len(identity.private_bytes()) == 32
    assert restored.public_key == identity.public_key
    assert verify_signature(identity.public_key, b"release", signature)
    assert verify_signature(identity.public_key, b"release", restored.sign(b"release"))
    assert not verify_signature(identity.public_key, b"other", signature)
    assert not verify_signature(DeviceIdentity.generate().public_key, b"release", signature)
    assert len(fingerprint(identity.public_key)) == 16
    assert identity.fingerprint in repr(identity)
    assert identity.private_bytes().hex() not in repr(identity)


@pytest.mark.parametrize(
    ("key", "signature"),
    [
        ("", "x"),
        ("not base64!", "AAAA"),
        ("AAAA", "AAAA"),  # decodes, wrong length
        (None, None),
        ("valid", "garbage with spaces"),
    ],
)
def test_verify_signature_is_false_on_malformed_input_and_never_raises(key: Any, signature: Any) -> None:
    identity = DeviceIdentity.generate()
    key = identity.public_key if key == "valid" else key

    assert verify_signature(key, b"data", signature) is False


def test_from_private_bytes_and_fingerprint_reject_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="32 raw bytes"):
        DeviceIdentity.from_private_bytes(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        fingerprint("AAAA")


# ---------------------------------------------------------------- canonical encoding


@pytest.mark.parametrize("value", [0.1 + 0.2, 1e-5, 1 / 92, 5e-324, 1.7976931348623157e308, 1 / 3, 2.0])
def test_canonical_bytes_round_trip_floats_exactly(value: float) -> None:
    entry = make_entry(DeviceIdentity.generate(), None, device_id=1, **_release(0, epsilon=value, timestamp=-value))

    document = json.loads(canonical_bytes(entry))

    assert struct.pack("<d", float.fromhex(document["epsilon"])) == struct.pack("<d", value)
    assert float.fromhex(document["timestamp"]) == -value
    assert float.fromhex(document["delta"]) == 1e-5
    assert set(document) == set(LedgerEntry.__dataclass_fields__) - {"entry_hash", "signature"}
    assert b" " not in canonical_bytes(entry).replace(b"test-run", b"")


def test_canonical_bytes_are_deterministic_and_type_strict() -> None:
    entry = make_entry(DeviceIdentity.generate(), None, device_id=1, **_release(0))
    fields = {name: getattr(entry, name) for name in LedgerEntry.__dataclass_fields__}

    assert canonical_bytes(fields) == canonical_bytes(entry)
    assert compute_hash(dict(reversed(list(fields.items())))) == entry.entry_hash
    # An int given for a float field hashes like the float it stands for.
    assert compute_hash({**fields, "clip_norm": 1}) == entry.entry_hash
    with pytest.raises(TypeError):
        canonical_bytes({**fields, "epsilon": "0.3"})
    with pytest.raises(ValueError, match="missing"):
        canonical_bytes({k: v for k, v in fields.items() if k != "run"})


def test_json_transport_round_trips_exactly_and_parses_strictly() -> None:
    identity = DeviceIdentity.generate()
    entry = make_entry(identity, None, device_id=1, **_release(0, epsilon=0.1 + 0.2, sample_rate=1 / 92))

    parsed = entry_from_json(entry_to_json(entry))

    assert parsed == entry
    assert verify_chain([parsed], identity.public_key) == []
    document = json.loads(entry_to_json(entry))
    for broken in ({**document, "epsilon": 0.3}, {**document, "steps": "10"}, {**document, "extra": 1}, [1]):
        with pytest.raises(ValueError):
            entry_from_json(json.dumps(broken))
    with pytest.raises(ValueError):
        entry_from_json("{not json")


def test_make_entry_chains_and_validates() -> None:
    identity = DeviceIdentity.generate()
    first = make_entry(identity, None, device_id=3, **_release(0))
    second = make_entry(identity, first, device_id=3, **_release(1))

    assert (first.seq, first.prev_hash) == (0, GENESIS)
    assert (second.seq, second.prev_hash) == (1, first.entry_hash)
    assert verify_signature(identity.public_key, second.entry_hash.encode("ascii"), second.signature)
    with pytest.raises(ValueError, match="device 4"):
        make_entry(identity, first, device_id=4, **_release(1))
    with pytest.raises(ValueError, match="unit"):
        make_entry(identity, first, device_id=3, **_release(1, unit="example"))
    with pytest.raises(ValueError, match="epsilon"):
        make_entry(identity, first, device_id=3, **_release(1, epsilon=float("nan")))


def test_exact_floats_survive_sqlite_and_still_verify(tmp_path: Path) -> None:
    values = [0.1 + 0.2, 1e-5, 1 / 92]
    with DeviceLedgerStore(tmp_path / "d.db", device_id=DEVICE) as store:
        for k, value in enumerate(values):
            store.append(**_release(k, epsilon=value, sample_rate=value, timestamp=1e9 + value))
    with DeviceLedgerStore(tmp_path / "d.db") as store:
        entries = store.entries()
        key = store.identity().public_key

    assert [e.epsilon for e in entries] == values
    assert [e.sample_rate for e in entries] == values
    assert verify_chain(entries, key) == []


# ---------------------------------------------------------------------- device store


def test_device_key_persists_across_reopen_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "device.db"
    with DeviceLedgerStore(path, device_id=DEVICE) as store:
        key = store.identity().public_key
        assert store.identity().public_key == key

    with DeviceLedgerStore(path) as reopened:
        assert reopened.identity().public_key == key
        assert reopened.device_id == DEVICE
    with DeviceLedgerStore(path, device_id=DEVICE) as reopened:
        assert reopened.identity().public_key == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_device_store_refuses_another_device_or_a_missing_id(tmp_path: Path) -> None:
    DeviceLedgerStore(tmp_path / "device.db", device_id=DEVICE).close()

    with pytest.raises(ValueError, match=f"device {DEVICE}, not of device 8"):
        DeviceLedgerStore(tmp_path / "device.db", device_id=8)
    with pytest.raises(ValueError, match="pass the device_id"):
        DeviceLedgerStore(tmp_path / "new.db")


def test_device_store_appends_a_verifiable_chain_and_derives_history(tmp_path: Path) -> None:
    with DeviceLedgerStore(tmp_path / "device.db", device_id=DEVICE) as store:
        assert store.head() is None
        appended = _fill(store, N)
        head = store.head()
        entries = store.entries()
        later = store.entries(after_seq=2)
        history = store.history()
        key = store.identity().public_key

    assert entries == appended
    assert head == appended[-1]
    assert [e.seq for e in entries] == list(range(N))
    assert [e.seq for e in later] == [3, 4]
    assert all(e.prev_hash == p.entry_hash for p, e in zip(entries, entries[1:], strict=False))
    assert history == [(1.0, 1 / 92, 10)] * N
    assert verify_chain(entries, key) == []
    assert verify_chain(entries, key, expected_count=N) == []


# ------------------------------------------------ tampering with the stored ledgers


def test_clean_ledger_verifies(ledger: Ledger) -> None:
    entries = ledger.read()

    assert len(entries) == N
    assert verify_chain(entries, ledger.public_key, expected_count=N) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epsilon", 0.01),
        ("noise_multiplier", 5.0),
        ("sample_rate", 0.001),
        ("steps", 1),
        ("clip_norm", 0.1),
        ("delta", 1e-9),
        ("timestamp", 1.0),
        ("run", "other-run"),
        ("task_id", 999),
        ("version", -1),
        ("accountant", "prv"),
        ("unit", "user"),
        ("mechanism", "gaussian"),
        ("seq", 99),
        ("prev_hash", "f" * 64),
        ("entry_hash", "e" * 64),
        ("epsilon", "0.9"),  # SQLite stores text in a REAL column
    ],
)
def test_editing_one_field_is_reported_as_edited(ledger: Ledger, field: str, value: object) -> None:
    _update(ledger, 2, **{field: value})

    problems = verify_chain(ledger.read(), ledger.public_key, expected_count=N)

    assert _kinds(problems) == [("edited", 2, 2)]
    assert problems[0].device_id == DEVICE
    assert "stored at position 2" in problems[0].detail


def test_deleting_a_middle_entry_is_reported_with_the_missing_seq(ledger: Ledger) -> None:
    _delete(ledger, 2)

    problems = verify_chain(ledger.read(), ledger.public_key)

    assert _kinds(problems) == [("deleted", 2, 2)]
    assert "entry seq 2 is missing" in problems[0].detail


def test_deleting_a_range_is_reported_once(ledger: Ledger) -> None:
    _delete(ledger, 1)
    _delete(ledger, 2)

    problems = verify_chain(ledger.read(), ledger.public_key)

    assert _kinds(problems) == [("deleted", 1, 1)]
    assert "entries seq 1-2 (2) are missing" in problems[0].detail


def test_deleting_the_first_entry_is_reported(ledger: Ledger) -> None:
    _delete(ledger, 0)

    assert _kinds(verify_chain(ledger.read(), ledger.public_key)) == [("deleted", 0, 0)]


def test_deleting_the_last_entry_needs_the_expected_count(ledger: Ledger) -> None:
    _delete(ledger, N - 1)
    entries = ledger.read()

    problems = verify_chain(entries, ledger.public_key, expected_count=N)

    assert verify_chain(entries, ledger.public_key) == []  # undetectable from the chain alone
    assert _kinds(problems) == [("deleted", N - 1, N - 1)]
    assert "missing at the end" in problems[0].detail


def test_swapping_two_rows_is_reported_as_reordered(ledger: Ledger) -> None:
    _swap(ledger, 1, 3)
    entries = ledger.read()

    problems = verify_chain(entries, ledger.public_key)

    assert [e.seq for e in entries] == [0, 3, 2, 1, 4]
    assert _kinds(problems) == [("reordered", 3, 1)]
    assert "seq 3 at position 1" in problems[0].detail
    assert "seq 1 at position 3" in problems[0].detail


def test_rehashing_an_edited_entry_is_reported_as_forged(ledger: Ledger) -> None:
    _edit_and_rehash(ledger, 2, epsilon=0.01)

    problems = verify_chain(ledger.read(), ledger.public_key)

    assert _kinds(problems) == [("forged", 2, 2)]


def test_rehashing_an_edited_seq_is_reported_as_forged_only(ledger: Ledger) -> None:
    _edit_and_rehash(ledger, 2, seq=42)

    assert _kinds(verify_chain(ledger.read(), ledger.public_key)) == [("forged", 2, 2)]


def test_blanking_a_signature_is_reported_as_unsigned(ledger: Ledger) -> None:
    _update(ledger, 2, signature="")

    assert _kinds(verify_chain(ledger.read(), ledger.public_key)) == [("unsigned", 2, 2)]


def test_a_signature_by_another_key_is_reported_as_forged(ledger: Ledger) -> None:
    row = _row(ledger, 2)
    _update(ledger, 2, signature=DeviceIdentity.generate().sign(row["entry_hash"].encode("ascii")))

    assert _kinds(verify_chain(ledger.read(), ledger.public_key)) == [("forged", 2, 2)]


def test_entries_checked_against_another_key_are_all_forged(ledger: Ledger) -> None:
    problems = verify_chain(ledger.read(), DeviceIdentity.generate().public_key)

    assert _kinds(problems) == [("forged", k, k) for k in range(N)]


def test_an_unknown_key_is_one_problem(ledger: Ledger) -> None:
    problems = verify_chain(ledger.read(), None)

    assert _kinds(problems) == [("unknown-key", None, None)]
    assert problems[0].device_id == DEVICE
    assert f"device {DEVICE}" in problems[0].detail


# ------------------------------------------------------------------- server accept


@pytest.fixture
def device(tmp_path: Path) -> Iterator[DeviceLedgerStore]:
    with DeviceLedgerStore(tmp_path / "device.db", device_id=DEVICE) as store:
        yield store


@pytest.fixture
def server(tmp_path: Path, device: DeviceLedgerStore) -> Iterator[PrivacyStore]:
    with PrivacyStore(f"sqlite:///{tmp_path / 'out' / 'fedrec.db'}") as store:
        store.register_key(DEVICE, device.identity().public_key)
        yield store


EXPECTED = {"noise_multiplier": 1.0, "clip_norm": 1.0, "accountant": "rdp", "unit": "record", "steps": 10}


def test_accept_continues_the_stored_chain(device: DeviceLedgerStore, server: PrivacyStore) -> None:
    first = _fill(device, 3)
    assert server.accept(first, expected=EXPECTED) == []
    assert server.head(DEVICE) == first[-1]

    second = _fill(device, 2, start=3)
    assert server.accept(second, expected=EXPECTED) == []

    assert server.entries(DEVICE) == first + second
    assert server.entries() == first + second
    assert server.head(DEVICE) == second[-1]
    assert verify_chain(server.entries(DEVICE), server.public_key(DEVICE), expected_count=5) == []


def test_accept_refuses_a_gap_and_stores_nothing(device: DeviceLedgerStore, server: PrivacyStore) -> None:
    entries = _fill(device, 4)
    assert server.accept(entries[:2]) == []

    problems = server.accept(entries[3:])

    assert _kinds(problems) == [("deleted", 2, 0)]
    assert server.entries(DEVICE) == entries[:2]


def test_accept_refuses_a_replay_and_stores_nothing(device: DeviceLedgerStore, server: PrivacyStore) -> None:
    entries = _fill(device, 3)
    assert server.accept(entries[:2]) == []

    problems = server.accept([entries[1], entries[2]])

    assert _kinds(problems) == [("replayed", 1, 0)]
    assert server.entries(DEVICE) == entries[:2]
    assert _kinds(server.accept(entries[:2])) == [("replayed", 0, 0), ("replayed", 1, 1)]
    # The same new entry twice in one upload: the copy is the replay.
    assert _kinds(server.accept([entries[2], entries[2]])) == [("replayed", 2, 1)]


def test_accept_refuses_a_fork_that_links_elsewhere(
    tmp_path: Path, device: DeviceLedgerStore, server: PrivacyStore
) -> None:
    common = _fill(device, 2)
    # A second copy of the device's store, diverging after seq 1.
    (tmp_path / "fork.db").write_bytes((tmp_path / "device.db").read_bytes())
    mine = _fill(device, 1, start=2)
    with DeviceLedgerStore(tmp_path / "fork.db") as fork:
        theirs = _fill(fork, 2, start=7)
    assert server.accept(common + mine) == []

    problems = server.accept(theirs[1:])  # seq 3, chained to the fork's seq 2

    assert _kinds(problems) == [("deleted", 3, 0)]
    assert "not stored" in problems[0].detail
    assert len(server.entries(DEVICE)) == 3


def test_accept_refuses_parameter_mismatches_and_stores_nothing(
    device: DeviceLedgerStore, server: PrivacyStore
) -> None:
    good = device.append(**_release(0))
    bad = device.append(**_release(1, noise_multiplier=0.5, accountant="prv"))

    problems = server.accept([good, bad], expected=EXPECTED)

    assert sorted(_kinds(problems)) == [("mismatch", 1, 1), ("mismatch", 1, 1)]
    assert any("noise_multiplier=0.5" in p.detail and "noise_multiplier=1.0" in p.detail for p in problems)
    assert any("accountant='prv'" in p.detail for p in problems)
    assert server.entries() == []
    with pytest.raises(ValueError, match="unknown ledger fields"):
        server.accept([good], expected={"noise": 1.0})


def test_accept_refuses_unknown_and_foreign_keys(
    tmp_path: Path, device: DeviceLedgerStore, server: PrivacyStore
) -> None:
    with DeviceLedgerStore(tmp_path / "other.db", device_id=8) as other:
        unregistered = _fill(other, 2)
    impostor = DeviceIdentity.generate()
    forged = make_entry(impostor, None, device_id=DEVICE, **_release(0))

    assert _kinds(server.accept(unregistered)) == [("unknown-key", None, None)]
    assert _kinds(server.accept([forged])) == [("forged", 0, 0)]
    # A tampered upload (field changed in transit) is edited.
    real = device.append(**_release(0))
    assert _kinds(server.accept([replace(real, epsilon=0.0)])) == [("edited", 0, 0)]
    assert server.entries() == []
    server.revoke_key(DEVICE)
    assert _kinds(server.accept([real])) == [("unknown-key", None, None)]
    assert server.keys() == {}


def test_rejections_are_recorded(device: DeviceLedgerStore, server: PrivacyStore) -> None:
    entries = _fill(device, 2)
    problems = server.accept(entries[1:])

    server.reject(DEVICE, entries[1].task_id, problems)

    rejections = server.rejections()
    assert [(r.device_id, r.task_id, r.seq, r.kind) for r in rejections] == [(DEVICE, 101, 0, "deleted")]
    assert rejections[0].detail == problems[0].detail
    assert rejections[0].at.tzinfo is not None


def test_register_key_rules(device: DeviceLedgerStore, server: PrivacyStore) -> None:
    key = device.identity().public_key
    other = DeviceIdentity.generate().public_key

    server.register_key(DEVICE, key)  # same key again: no-op
    with pytest.raises(ValueError, match="different public key"):
        server.register_key(DEVICE, other)
    assert server.public_key(DEVICE) == key
    server.register_key(DEVICE, other, replace=True)
    assert server.keys() == {DEVICE: other}
    assert server.public_key(99) is None
    with pytest.raises(ValueError, match="base64"):
        server.register_key(9, "not a key!")


def test_privacy_store_shares_a_database_with_the_run_store(tmp_path: Path, device: DeviceLedgerStore) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with RunStore(url) as runs:
        run_id = runs.start_run("r", 1, {})
        with PrivacyStore(url) as privacy:
            privacy.register_key(DEVICE, device.identity().public_key)
            assert privacy.accept(_fill(device, 2)) == []
            names = set(inspect(privacy._engine).get_table_names())
    with RunStore(url) as runs, PrivacyStore(url) as privacy:
        assert runs.run_ids() == [run_id]
        assert len(privacy.entries(DEVICE)) == 2
    assert {"runs", "device_keys", ENTRIES_TABLE, "ledger_rejections"} <= names


# ------------------------------------------------------- files written by an earlier fedrec

# The server's privacy tables as fedrec wrote them before its entries table was renamed.
_OLD_SERVER_SCHEMA = """
CREATE TABLE device_keys (
    device_id INTEGER NOT NULL,
    public_key VARCHAR(64) NOT NULL,
    registered_at DATETIME NOT NULL,
    revoked BOOLEAN NOT NULL,
    CONSTRAINT pk_device_keys PRIMARY KEY (device_id)
);
CREATE TABLE ledger_entries (
    id INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    run VARCHAR(255) NOT NULL,
    version INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    unit VARCHAR(64) NOT NULL,
    mechanism VARCHAR(64) NOT NULL,
    noise_multiplier DOUBLE NOT NULL,
    sample_rate DOUBLE NOT NULL,
    steps INTEGER NOT NULL,
    clip_norm DOUBLE NOT NULL,
    accountant VARCHAR(64) NOT NULL,
    epsilon DOUBLE NOT NULL,
    delta DOUBLE NOT NULL,
    timestamp DOUBLE NOT NULL,
    prev_hash VARCHAR(64) NOT NULL,
    entry_hash VARCHAR(64) NOT NULL,
    signature VARCHAR(128) NOT NULL,
    CONSTRAINT pk_ledger_entries PRIMARY KEY (id),
    CONSTRAINT uq_ledger_entries_device_id_seq UNIQUE (device_id, seq),
    CONSTRAINT fk_ledger_entries_device_id_device_keys FOREIGN KEY(device_id) REFERENCES device_keys (device_id)
);
CREATE TABLE ledger_rejections (
    id INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    seq INTEGER,
    kind VARCHAR(64) NOT NULL,
    detail TEXT NOT NULL,
    at DATETIME NOT NULL,
    CONSTRAINT pk_ledger_rejections PRIMARY KEY (id)
);
CREATE INDEX ix_ledger_rejections_device_id ON ledger_rejections (device_id);
"""

# A device's ledger file as fedrec wrote it before all stores shared one declarative base
# (unnamed constraints); the layout itself is unchanged.
_OLD_DEVICE_SCHEMA = """
CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE device_identity (
    id INTEGER NOT NULL,
    private_key BLOB NOT NULL,
    public_key VARCHAR(64) NOT NULL,
    created_at DOUBLE NOT NULL,
    PRIMARY KEY (id)
);
CREATE TABLE ledger_entries (
    id INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    run VARCHAR(255) NOT NULL,
    version INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    unit VARCHAR(64) NOT NULL,
    mechanism VARCHAR(64) NOT NULL,
    noise_multiplier DOUBLE NOT NULL,
    sample_rate DOUBLE NOT NULL,
    steps INTEGER NOT NULL,
    clip_norm DOUBLE NOT NULL,
    accountant VARCHAR(64) NOT NULL,
    epsilon DOUBLE NOT NULL,
    delta DOUBLE NOT NULL,
    timestamp DOUBLE NOT NULL,
    prev_hash VARCHAR(64) NOT NULL,
    entry_hash VARCHAR(64) NOT NULL,
    signature VARCHAR(128) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (seq)
);
CREATE TABLE evaluations_answered (
    id INTEGER NOT NULL,
    answered_at DOUBLE NOT NULL,
    run VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    split VARCHAR NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX ix_evaluations_answered_answered_at ON evaluations_answered (answered_at);
"""

_ENTRY_COLUMNS = ("id", *LedgerEntry.__dataclass_fields__)


def _signed_chain(identity: DeviceIdentity, count: int) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    for k in range(count):
        entries.append(make_entry(identity, entries[-1] if entries else None, device_id=DEVICE, **_release(k)))
    return entries


def _insert_entries(conn: sqlite3.Connection, table: str, entries: list[LedgerEntry], ids: list[int]) -> None:
    placeholders = ", ".join("?" for _ in _ENTRY_COLUMNS)
    conn.executemany(
        f"INSERT INTO {table} ({', '.join(_ENTRY_COLUMNS)}) VALUES ({placeholders})",
        [(row_id, *(getattr(e, name) for name in _ENTRY_COLUMNS[1:])) for row_id, e in zip(ids, entries, strict=True)],
    )


def _dump(db: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
    finally:
        conn.close()


def _tables(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


def _old_server_database(db: Path, identity: DeviceIdentity, entries: list[LedgerEntry], ids: list[int]) -> None:
    """Write, with raw sqlite3, a privacy store in the layout of an earlier fedrec."""
    conn = sqlite3.connect(db)
    try:
        conn.executescript(_OLD_SERVER_SCHEMA)
        with conn:
            conn.execute(
                "INSERT INTO device_keys VALUES (?, ?, '2025-01-02 03:04:05.000000', 0)", (DEVICE, identity.public_key)
            )
            _insert_entries(conn, "ledger_entries", entries, ids)
            conn.execute(
                "INSERT INTO ledger_rejections (device_id, task_id, seq, kind, detail, at) "
                "VALUES (?, 99, 1, 'forged', 'an earlier refusal', '2025-01-02 03:04:06.000000')",
                (DEVICE,),
            )
    finally:
        conn.close()


def test_an_earlier_server_database_is_upgraded_on_open_keeping_every_entry(tmp_path: Path) -> None:
    identity = DeviceIdentity.generate()
    entries = _signed_chain(identity, N)
    ids = [1, 2, 4, 8, 16]  # gaps: the storage-order ids must survive as they are
    db = tmp_path / "fedrec.db"
    _old_server_database(db, identity, entries, ids)
    before = _dump(db, "ledger_entries")

    with PrivacyStore(f"sqlite:///{db}") as server:
        assert server.entries(DEVICE) == entries
        assert server.public_key(DEVICE) == identity.public_key
        assert [r.detail for r in server.rejections()] == ["an earlier refusal"]
        assert verify_chain(server.entries(DEVICE), identity.public_key, expected_count=N) == []
        more = [make_entry(identity, entries[-1], device_id=DEVICE, **_release(N))]
        assert server.accept(more) == []

    assert ENTRIES_TABLE in _tables(db) and "ledger_entries" not in _tables(db)
    after = _dump(db, ENTRIES_TABLE)
    assert after[:N] == before  # every row, id and value exactly as it was
    assert [row[0] for row in after] == [*ids, 17]
    with PrivacyStore(f"sqlite:///{db}") as reopened:  # an upgraded file opens as it is
        assert reopened.entries(DEVICE) == [*entries, *more]


def test_an_earlier_server_database_that_cannot_be_taken_over_is_refused_untouched(tmp_path: Path) -> None:
    identity = DeviceIdentity.generate()
    entries = _signed_chain(identity, 2)
    db = tmp_path / "fedrec.db"
    _old_server_database(db, identity, entries, [1, 2])
    with PrivacyStore(f"sqlite:///{db}"):
        pass
    # An earlier fedrec opened the upgraded file and stored an entry in a new ledger_entries.
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(_OLD_SERVER_SCHEMA.split(";")[1])
        _insert_entries(conn, "ledger_entries", entries[:1], [1])
    conn.close()
    with pytest.raises(ValueError, match=r"holds 1 ledger entries in table ledger_entries beside"):
        PrivacyStore(f"sqlite:///{db}")
    assert len(_dump(db, "ledger_entries")) == 1 and len(_dump(db, ENTRIES_TABLE)) == 2

    # A ledger_entries that is not fedrec's is not renamed.
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.executescript(_OLD_SERVER_SCHEMA.replace("    signature VARCHAR(128) NOT NULL,\n", ""))
    conn.close()
    with pytest.raises(ValueError, match="not those of fedrec's ledger entries"):
        PrivacyStore(f"sqlite:///{other}")
    assert "ledger_entries" in _tables(other) and ENTRIES_TABLE not in _tables(other)


def test_an_earlier_server_database_opened_read_only_asks_for_a_writable_copy(tmp_path: Path) -> None:
    identity = DeviceIdentity.generate()
    db = tmp_path / "fedrec.db"
    _old_server_database(db, identity, _signed_chain(identity, 2), [1, 2])
    with pytest.raises(ValueError, match="needs write access: open a writable copy"):
        PrivacyStore(f"sqlite:///file:{db}?mode=ro&uri=true")
    assert "ledger_entries" in _tables(db)


def test_an_earlier_device_ledger_file_opens_unchanged_and_continues(tmp_path: Path) -> None:
    identity = DeviceIdentity.generate()
    entries = _signed_chain(identity, N)
    path = tmp_path / "device.db"
    conn = sqlite3.connect(path)
    conn.executescript(_OLD_DEVICE_SCHEMA)
    with conn:
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [("device_id", str(DEVICE)), ("created_at", "1.5")])
        conn.execute(
            "INSERT INTO device_identity VALUES (1, ?, ?, 1.5)", (identity.private_bytes(), identity.public_key)
        )
        _insert_entries(conn, "ledger_entries", entries, list(range(1, N + 1)))
    conn.close()
    before = _dump(path, "ledger_entries")

    with DeviceLedgerStore(path) as store:
        assert store.device_id == DEVICE
        assert store.identity().public_key == identity.public_key
        assert store.entries() == entries
        assert store.history() == [(1.0, 1 / 92, 10)] * N
        appended = store.append(**_release(N))
        assert appended.seq == N and appended.prev_hash == entries[-1].entry_hash
        assert verify_chain(store.entries(), identity.public_key, expected_count=N + 1) == []

    assert _dump(path, "ledger_entries")[:N] == before
    assert _tables(path) == {"meta", "device_identity", "ledger_entries", "evaluations_answered"}


def test_release_fields_are_checked_by_name() -> None:
    identity = DeviceIdentity.generate()
    release = _release(0)
    del release["steps"]
    with pytest.raises(TypeError, match="missing steps"):
        make_entry(identity, None, device_id=1, **release)
    with pytest.raises(TypeError, match="unknown colour"):
        make_entry(identity, None, device_id=1, **_release(0), colour="blue")
