"""The device's encrypted local store of its owner's raw interactions and personal model state.

One job: the person's raw data at rest, and rotating the key it is encrypted under. It
lives in the same SQLite file as the device's ledger store
(:mod:`shared.privacy.ledger_store`), in tables of its own (``device_data_meta``,
``device_data_blobs``, declared on :class:`shared.sql_store.Base`) that it alone
creates and reads.

Encryption
----------
Everything personal is AES-256-GCM ciphertext (``cryptography``'s ``AESGCM``): the
interactions as one blob, the personal model state (the user embedding) as another, and
the SecAgg+ contribution receipts (:mod:`client.receipts`) one blob each. Every write
draws a fresh random 96-bit nonce; the associated data binds each blob to this device
and to its table and row (``fedrec-device-store/v1|device=N|table=T|name=X``), so a
blob copied to another row or another device's file fails to decrypt instead of being
read as something else. What is stored in the clear: the device id, the catalogue size,
the scrypt salt (when a passphrase is used), blob sizes and write times; never an item
id, a timestamp or a rating.

Keys
----
A store's 32-byte key comes from a key file or a passphrase (:mod:`client.store_keys`);
a passphrase's key is derived under a random salt kept in this store
(:func:`key_from_passphrase`). A ``key_check`` blob (a known constant encrypted under
the key) lets :class:`DeviceDataStore` tell a wrong key (:class:`WrongKeyError`) from
damaged data (:class:`StoreCorruptError`) before it touches anything; a wrong key never
writes to the file.

Rotating the key (:meth:`DeviceDataStore.rekey`, ``fedrec device rekey``) re-encrypts
every blob (the key check included) under a new key in one SQLite transaction, with the
same associated data, and replaces or removes the scrypt salt in the same transaction:
the store is either wholly under the new key or unchanged. The ledger tables (identity,
signed entries, hence the accountant's history and the spent epsilon) are not encrypted
under the store key and are left as they are.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, Integer, LargeBinary, create_engine, delete, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from client.receipts import ContributionReceipts, SealedEntry
from client.store_keys import KEY_BYTES, derive_key, new_salt
from shared.data.split import leave_one_out
from shared.data.types import DataError, DeviceData, InteractionLog
from shared.sql_store import Base, SqlStore, create_tables

if TYPE_CHECKING:
    import torch

__all__ = [
    "ConcurrentWriteError",
    "DeviceDataStore",
    "ImportResult",
    "Interaction",
    "StoreCorruptError",
    "WrongKeyError",
    "is_enrolled",
    "key_from_passphrase",
    "stored_device_id",
]

NONCE_BYTES: Final = 12  # 96-bit GCM nonce, the size GCM is specified for
FILE_MODE: Final = 0o600
MIN_INTERACTIONS: Final = 3  # leave-one-out needs train, valid and test

_FORMAT: Final = "fedrec-device-store/v1"
_KEY_CHECK_PLAINTEXT: Final = b"fedrec device store key check v1"
_INTERACTIONS: Final = "interactions"
_PERSONAL: Final = "personal"
_KEY_CHECK: Final = "key_check"


class WrongKeyError(ValueError):
    """The key or passphrase does not open this store (nothing was read or changed)."""


class StoreCorruptError(ValueError):
    """The key is right but a stored blob does not authenticate: the file was damaged or tampered with."""


class ConcurrentWriteError(RuntimeError):
    """Another process changed the same blob between this write's read and its commit (nothing written)."""


@dataclass(frozen=True)
class Interaction:
    """One interaction of the device's owner: a catalogue item at a time, optionally rated.

    ``item_id`` is the catalogue's dense id (``0 .. num_items-1``, the id the global
    model uses); ``timestamp`` is Unix seconds.
    """

    timestamp: float
    item_id: int
    rating: float | None = None

    @property
    def key(self) -> tuple[int, float]:
        """Identity of an interaction for de-duplication: (item, time)."""
        return (self.item_id, self.timestamp)


@dataclass(frozen=True)
class ImportResult:
    """What :meth:`DeviceDataStore.import_interactions` did."""

    added: int  # new interactions stored
    skipped: int  # identical to one already stored (or repeated in the batch)
    total: int  # interactions in the store afterwards


# ------------------------------------------------------------------- schema


# On fedrec's one declarative base; the table names are this store's file format (existing
# stores open by them), and only these two tables are ever created in a device's file.


class _MetaRow(Base):
    __tablename__ = "device_data_meta"

    key: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary, comment="public values only: device id, salt, catalogue size")


class _BlobRow(Base):
    __tablename__ = "device_data_blobs"

    name: Mapped[str] = mapped_column(primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary, comment="AES-256-GCM, tag appended")
    # Bumped on every write: an update conditioned on the version read detects a concurrent writer.
    revision: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(comment="Unix seconds")


def _associated_data(device_id: int, table: str, name: str) -> bytes:
    return f"{_FORMAT}|device={device_id}|table={table}|name={name}".encode()


def _create_private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0o600 unless it exists; True when it was created.

    Created before SQLite opens it, which would otherwise use the umask's mode (0o644).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    os.chmod(path, FILE_MODE)  # os.open applied the umask
    return True


def _engine(path: Path) -> Engine:
    return create_engine(f"sqlite:///{path}")


def stored_device_id(path: Path | str) -> int | None:
    """The device id recorded in a store's data tables, or None if it has none (read-only; changes nothing).

    Raises
    ------
    ValueError
        If the file exists but is not an SQLite database.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    # Read-only URI: looking must not create tables or touch the file.
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as con:
            row = con.execute("SELECT value FROM device_data_meta WHERE key = 'device_id'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise ValueError(f"{path}: cannot read the device store ({exc})") from None
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path}: not a device store ({exc})") from None
    return None if row is None else int(bytes(row[0]))


def is_enrolled(path: Path | str) -> bool:
    """Whether ``path`` holds an initialised encrypted data store (see :func:`stored_device_id`)."""
    return stored_device_id(path) is not None


# ---------------------------------------------------------- passphrase salt


def key_from_passphrase(store_path: Path | str, passphrase: str) -> bytes:
    """Derive a store key from a passphrase with scrypt (:func:`client.store_keys.derive_key`).

    The salt is random, 16 bytes, kept in the store: it is created (and the store file
    with it, mode 0o600) on first use, and read afterwards.

    Raises
    ------
    ValueError
        If the passphrase is empty.
    WrongKeyError
        If the store was enrolled with a key file (it has no salt); the file is not changed.
    """
    if not passphrase:
        raise ValueError("the passphrase is empty")
    path = Path(store_path).expanduser()
    _create_private_file(path)
    engine = _engine(path)
    try:
        create_tables(engine, _MetaRow, _BlobRow)
        with sessionmaker(engine)() as session, session.begin():
            row = session.get(_MetaRow, "scrypt_salt")
            if row is None and session.get(_MetaRow, "device_id") is not None:
                # Enrolled with a key file: adding a salt now would change the file for nothing.
                raise WrongKeyError(
                    f"{path}: this store was created with a key file, not a passphrase; nothing was read or changed"
                )
            if row is None:
                row = _MetaRow(key="scrypt_salt", value=new_salt())
                session.add(row)
            salt = bytes(row.value)
    finally:
        engine.dispose()
    return derive_key(passphrase, salt)


# -------------------------------------------------------------------- store


def _encode_interactions(records: list[Interaction]) -> bytes:
    return json.dumps(
        {
            "item_id": [r.item_id for r in records],
            "timestamp": [r.timestamp for r in records],
            "rating": [r.rating for r in records],
        },
        separators=(",", ":"),
    ).encode()


def _decode_interactions(blob: bytes) -> list[Interaction]:
    data = json.loads(blob)
    return [
        Interaction(timestamp=float(t), item_id=int(i), rating=None if r is None else float(r))
        for i, t, r in zip(data["item_id"], data["timestamp"], data["rating"], strict=True)
    ]


def _check_record(index: int, record: Interaction) -> None:
    if not isinstance(record, Interaction):
        raise TypeError(f"record {index}: expected an Interaction, got {type(record).__name__}")
    if isinstance(record.item_id, bool) or not isinstance(record.item_id, (int, np.integer)) or record.item_id < 0:
        raise ValueError(f"record {index}: item_id must be a non-negative integer, got {record.item_id!r}")
    if not math.isfinite(record.timestamp):
        raise ValueError(f"record {index}: timestamp must be finite, got {record.timestamp!r}")
    if record.rating is not None and not math.isfinite(record.rating):
        raise ValueError(f"record {index}: rating must be finite or None, got {record.rating!r}")


class DeviceDataStore(ContributionReceipts, SqlStore):
    """The device's encrypted interactions, personal model state and contribution receipts.

    The receipts' methods (``add_contribution_receipt``, ``contribution_receipts``) come
    from :class:`client.receipts.ContributionReceipts`; this class stores them.

    Parameters
    ----------
    path
        The device's SQLite store (shared with :class:`shared.privacy.ledger_store.DeviceLedgerStore`);
        created with mode 0o600 if missing.
    device_id
        The device this store belongs to; recorded when the data tables are first
        created, and checked on every later open.
    key
        32 bytes from :func:`client.store_keys.key_from_file` or :func:`key_from_passphrase`.
    num_items
        The catalogue size to record on first open (optional; see :attr:`num_items`).

    Raises
    ------
    WrongKeyError
        If ``key`` is not the key this store was created with. Nothing is written.
    ValueError
        If ``key`` is not 32 bytes, or the store belongs to another device.
    """

    def __init__(self, path: Path | str, device_id: int, key: bytes, *, num_items: int | None = None) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"the store key must be {KEY_BYTES} bytes")
        self.path = Path(path).expanduser()
        self.device_id = int(device_id)
        self._aead = AESGCM(key)
        self._closed = False
        _create_private_file(self.path)
        self._engine = _engine(self.path)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            self._open(num_items)
        except BaseException:
            self._engine.dispose()
            raise

    def _open(self, num_items: int | None) -> None:
        # Check before creating anything, so a wrong key or device leaves an existing file as it was.
        with self._sessions() as session:
            initialized = self._tables_exist(session) and session.get(_MetaRow, "device_id") is not None
            if initialized:
                self._verify(session)
        if initialized:
            if num_items is not None and self.num_items is None:
                self._set_meta("num_items", str(int(num_items)).encode())
            return
        # New data tables (or only the passphrase salt so far): record the device and the key check.
        create_tables(self._engine, _MetaRow, _BlobRow)
        with self._sessions.begin() as session:
            if session.get(_MetaRow, "device_id") is not None:  # a concurrent opener got there first
                self._verify(session)
                return
            session.add(_MetaRow(key="device_id", value=str(self.device_id).encode()))
            session.add(_MetaRow(key="created_at", value=repr(time.time()).encode()))
            if num_items is not None:
                session.add(_MetaRow(key="num_items", value=str(int(num_items)).encode()))
            session.add(self._seal_row(_KEY_CHECK, _KEY_CHECK_PLAINTEXT, revision=1))

    @staticmethod
    def _tables_exist(session: Session) -> bool:
        names = set(session.connection().dialect.get_table_names(session.connection()))
        return {_MetaRow.__tablename__, _BlobRow.__tablename__} <= names

    def _verify(self, session: Session) -> None:
        recorded = session.get(_MetaRow, "device_id")
        if recorded is None:
            raise StoreCorruptError(f"{self.path}: the device id record is missing; the store is damaged")
        if int(recorded.value) != self.device_id:
            raise ValueError(
                f"{self.path} holds the data of device {int(recorded.value)}, not of device {self.device_id}"
            )
        check = session.get(_BlobRow, _KEY_CHECK)
        if check is None:
            raise StoreCorruptError(f"{self.path}: the key check record is missing; the store is damaged")
        try:
            plain = self._aead.decrypt(check.nonce, check.ciphertext, self._ad(_KEY_CHECK))
        except InvalidTag:
            if self._another_record_opens(session):
                # The key opens the data: it is the key check itself that was damaged.
                raise StoreCorruptError(
                    f"{self.path}: the key check record is damaged (the key opens the other records); "
                    "nothing was changed"
                ) from None
            salted = session.get(_MetaRow, "scrypt_salt") is not None
            source = "a passphrase" if salted else "a key file"
            raise WrongKeyError(
                f"{self.path}: wrong key or passphrase for device {self.device_id}'s data store "
                f"(this store was created with {source}); nothing was read or changed"
            ) from None
        if plain != _KEY_CHECK_PLAINTEXT:
            raise StoreCorruptError(f"{self.path}: the key check record is damaged")

    def _another_record_opens(self, session: Session) -> bool:
        """Whether this key decrypts an encrypted record other than the key check."""
        for row in session.scalars(select(_BlobRow).where(_BlobRow.name != _KEY_CHECK).limit(1)):
            try:
                self._aead.decrypt(row.nonce, row.ciphertext, self._ad(row.name))
            except InvalidTag:
                return False
            return True
        return False

    # --------------------------------------------------------------- key rotation

    def rekey(self, new_key: bytes | None = None, *, new_passphrase: str | None = None) -> int:
        """Re-encrypt the whole store under a new key, in place, in one transaction.

        Give exactly one of ``new_key`` (32 bytes, e.g. from :func:`client.store_keys.create_key_file`
        or :func:`client.store_keys.key_from_file`) and ``new_passphrase`` (the key is then derived with scrypt
        under a fresh random salt, which replaces the store's salt). Every encrypted blob
        (interactions, personal state, contribution receipts, the key check and any other
        row of the blob table) is decrypted with the current key and sealed again under the
        new one with a fresh nonce and the same associated data (device, table, row). In
        the same transaction the scrypt salt is written (new passphrase) or removed (new
        key file), so a later open reports the right key source. The transaction holds
        SQLite's write lock from its start (``BEGIN IMMEDIATE``): no other writer can
        interleave. On any error it rolls back, leaving the store under the current key.

        Nothing outside the encrypted data tables is touched: the device id, the catalogue
        size, the ledger identity, the signed ledger entries and therefore the privacy
        accountant's history (the spent epsilon) are kept. Afterwards this object uses the
        new key; other open handles on the file (another process) still hold the old one and
        fail to read, so stop the device's SuperNode first.

        Returns
        -------
        int
            The number of encrypted records re-encrypted (the key check included).

        Raises
        ------
        ValueError
            If not exactly one of the arguments is given, the key is not 32 bytes, the
            passphrase is empty, or the new key is the store's current key (nothing changed).
        StoreCorruptError
            If a stored blob does not authenticate under the current key (nothing changed).
        ConcurrentWriteError
            If another process holds the store's write lock (nothing changed; retry once
            the device is stopped).
        WrongKeyError
            If the store's key was changed by another process since this object opened it.
        """
        if (new_key is None) == (new_passphrase is None):
            raise ValueError("give exactly one of new_key and new_passphrase")
        salt: bytes | None = None
        if new_passphrase is not None:
            if not new_passphrase:
                raise ValueError("the new passphrase is empty")
            salt = new_salt()
            new_key = derive_key(new_passphrase, salt)
        if not isinstance(new_key, bytes) or len(new_key) != KEY_BYTES:
            raise ValueError(f"the new store key must be {KEY_BYTES} bytes")
        new_aead = AESGCM(new_key)
        with self._session() as session, session.begin():
            self._begin_immediate(session)
            self._verify(session)  # under the write lock: still our key, nobody rekeyed meanwhile
            check = session.get(_BlobRow, _KEY_CHECK)
            assert check is not None  # _verify checked it
            try:
                new_aead.decrypt(check.nonce, check.ciphertext, self._ad(_KEY_CHECK))
            except InvalidTag:
                pass
            else:
                raise ValueError(f"{self.path}: the new key is the store's current key; nothing changed")
            rows = session.scalars(select(_BlobRow).order_by(_BlobRow.name)).all()
            # Every blob must authenticate under the current key before anything is written.
            plaintexts = [(row, self._open_row(row)) for row in rows]
            # Table 1: the key source's public part (the salt), 2: every encrypted blob.
            if salt is None:
                session.execute(delete(_MetaRow).where(_MetaRow.key == "scrypt_salt"))
            else:
                session.merge(_MetaRow(key="scrypt_salt", value=salt))
            session.flush()
            now = time.time()
            for row, plaintext in plaintexts:
                nonce = secrets.token_bytes(NONCE_BYTES)
                row.ciphertext = new_aead.encrypt(nonce, plaintext, self._ad(row.name))
                row.nonce = nonce
                # A writer that read the old revision (under the old key) now fails instead of overwriting.
                row.revision += 1
                row.updated_at = now
                session.flush()
        self._aead = new_aead
        return len(plaintexts)

    def _begin_immediate(self, session: Session) -> None:
        """Start the session's transaction with SQLite's write lock held (before any read).

        Python's sqlite3 module would begin the transaction only at the first write, letting
        another process write between this transaction's reads and its writes.
        """
        try:
            session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        except OperationalError as exc:
            raise ConcurrentWriteError(
                f"{self.path}: the store is being written by another process (stop the device first); "
                f"nothing changed ({exc.orig})"
            ) from None

    # --------------------------------------------------------------- encryption

    def _ad(self, name: str) -> bytes:
        return _associated_data(self.device_id, _BlobRow.__tablename__, name)

    def _seal_row(self, name: str, plaintext: bytes, revision: int) -> _BlobRow:
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = self._aead.encrypt(nonce, plaintext, self._ad(name))
        return _BlobRow(name=name, nonce=nonce, ciphertext=ciphertext, revision=revision, updated_at=time.time())

    def _open_row(self, row: _BlobRow) -> bytes:
        try:
            return self._aead.decrypt(row.nonce, row.ciphertext, self._ad(row.name))
        except InvalidTag:
            raise StoreCorruptError(
                f"{self.path}: the encrypted {row.name!r} record does not authenticate; "
                "the file was damaged or tampered with"
            ) from None

    def _read(self, session: Session, name: str) -> tuple[bytes | None, int]:
        row = session.get(_BlobRow, name)
        if row is None:
            return None, 0
        return self._open_row(row), row.revision

    def _write(self, session: Session, name: str, plaintext: bytes, revision: int) -> None:
        """Store ``plaintext`` as ``name``, provided nobody wrote it since it was read at ``revision``."""
        row = self._seal_row(name, plaintext, revision + 1)
        if revision == 0:
            session.add(row)
            try:
                session.flush()
            except Exception as exc:  # IntegrityError: a concurrent writer inserted it first
                raise ConcurrentWriteError(f"{self.path}: {name!r} was written concurrently; retry") from exc
            return
        done = session.execute(
            update(_BlobRow)
            .where(_BlobRow.name == name, _BlobRow.revision == revision)
            .values(nonce=row.nonce, ciphertext=row.ciphertext, revision=row.revision, updated_at=row.updated_at)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise ConcurrentWriteError(f"{self.path}: {name!r} was written concurrently; retry")

    # -------------------------------------------------------------------- meta

    def _set_meta(self, key: str, value: bytes) -> None:
        with self._session() as session, session.begin():
            session.merge(_MetaRow(key=key, value=value))

    @property
    def num_items(self) -> int | None:
        """The catalogue size recorded in the store (public), or None if never recorded."""
        with self._session() as session:
            row = session.get(_MetaRow, "num_items")
            return None if row is None else int(row.value)

    def set_num_items(self, num_items: int) -> None:
        """Record the catalogue size (checked against every stored item id).

        Raises
        ------
        ValueError
            If ``num_items < 2`` or a stored item id is outside ``[0, num_items)``.
        """
        if num_items < 2:
            raise ValueError(f"num_items must be at least 2, got {num_items}")
        beyond = [r.item_id for r in self.interactions() if r.item_id >= num_items]
        if beyond:
            raise ValueError(f"{len(beyond)} stored interactions have item ids >= {num_items} (e.g. {beyond[0]})")
        self._set_meta("num_items", str(int(num_items)).encode())

    # ------------------------------------------------------------ interactions

    def interactions(self) -> list[Interaction]:
        """All stored interactions, in import order (which breaks timestamp ties in the split)."""
        with self._session() as session:
            blob, _ = self._read(session, _INTERACTIONS)
        return [] if blob is None else _decode_interactions(blob)

    def import_interactions(self, records: Iterable[Interaction]) -> ImportResult:
        """Add interactions atomically: all of them, or none (one transaction).

        Duplicates are identified by ``(item_id, timestamp)``. One identical to a stored
        interaction, or repeated within ``records``, is skipped, so re-importing the same
        file changes nothing. The same (item, time) with a *different* rating is a
        conflict: nothing is imported and the error lists it (a silent choice between
        the two ratings would lose one).

        Raises
        ------
        ValueError
            If a record is invalid, conflicts with a stored one or another record, or an
            item id is outside the recorded catalogue.
        ConcurrentWriteError
            If another process imported at the same time (retry).
        """
        batch = list(records)
        for index, record in enumerate(batch):
            _check_record(index, record)
        batch = [
            Interaction(float(r.timestamp), int(r.item_id), None if r.rating is None else float(r.rating))
            for r in batch
        ]
        limit = self.num_items
        if limit is not None:
            beyond = [(i, r.item_id) for i, r in enumerate(batch) if r.item_id >= limit]
            if beyond:
                i, item = beyond[0]
                raise ValueError(
                    f"record {i}: item id {item} is outside the catalogue [0, {limit}) "
                    f"({len(beyond)} such records); nothing imported"
                )
        with self._session() as session, session.begin():
            blob, revision = self._read(session, _INTERACTIONS)
            stored = [] if blob is None else _decode_interactions(blob)
            known = {r.key: r for r in stored}
            added: list[Interaction] = []
            skipped = 0
            conflicts: list[str] = []
            for index, record in enumerate(batch):
                previous = known.get(record.key)
                if previous is None:
                    known[record.key] = record
                    added.append(record)
                elif previous.rating == record.rating:
                    skipped += 1
                else:
                    conflicts.append(
                        f"record {index}: item {record.item_id} at {record.timestamp:g} has rating "
                        f"{record.rating} but {previous.rating} is already recorded"
                    )
            if conflicts:
                shown = "; ".join(conflicts[:5]) + (f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
                raise ValueError(f"conflicting duplicates, nothing imported: {shown}")
            if added:
                self._write(session, _INTERACTIONS, _encode_interactions(stored + added), revision)
        return ImportResult(added=len(added), skipped=skipped, total=len(stored) + len(added))

    def device_data(self, num_items: int | None = None) -> DeviceData:
        """The device's split, exactly as in simulation (:func:`shared.data.split.leave_one_out`).

        Parameters
        ----------
        num_items
            Catalogue size; defaults to the one recorded in the store.

        Raises
        ------
        DataError
            With fewer than 3 interactions, an item id outside the catalogue, or no
            catalogue size given or recorded.
        """
        if num_items is None:
            num_items = self.num_items
        if num_items is None:
            raise DataError(f"{self.path}: no catalogue size recorded; pass num_items")
        records = self.interactions()
        if len(records) < MIN_INTERACTIONS:
            raise DataError(
                f"{self.path}: device {self.device_id} has {len(records)} interactions; "
                f"at least {MIN_INTERACTIONS} are needed (train, validation, test)"
            )
        items = np.fromiter((r.item_id for r in records), dtype=np.int64, count=len(records))
        if int(items.max()) >= num_items:
            raise DataError(f"{self.path}: item id {int(items.max())} outside the catalogue [0, {num_items})")
        log = InteractionLog(
            user_ids=np.zeros(len(records), dtype=np.int64),
            item_ids=items,
            timestamps=np.fromiter((r.timestamp for r in records), dtype=np.float64, count=len(records)),
            num_users=1,
            num_items=num_items,
            item_titles=None,
            source=f"device store {self.path}",
        )
        (split,) = leave_one_out(log, MIN_INTERACTIONS)
        return DeviceData(self.device_id, split.train_items, split.valid_item, split.test_item)

    # ---------------------------------------------------------- personal state

    def save_personal(self, state: Mapping[str, torch.Tensor]) -> None:
        """Store the personal model state (e.g. the user embedding), encrypted, replacing the previous one."""
        import torch  # lazily: the device CLI's --help must not pay for importing torch

        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, buffer)
        with self._session() as session, session.begin():
            row = session.get(_BlobRow, _PERSONAL)
            self._write(session, _PERSONAL, buffer.getvalue(), 0 if row is None else row.revision)

    def load_personal(self) -> dict[str, torch.Tensor]:
        """The stored personal model state; empty if none was saved."""
        with self._session() as session:
            blob, _ = self._read(session, _PERSONAL)
        if blob is None:
            return {}
        import torch

        loaded = torch.load(io.BytesIO(blob), weights_only=True)
        return dict(loaded)

    # ------------------------------------------------------- numbered series

    def _append_sealed(self, series: str, plaintext: bytes, keep: int) -> int:
        """Seal ``plaintext`` as the next entry of ``series``, keep the ``keep`` most recent; its number.

        An entry's row is named ``series`` + its number, zero-padded so that names sort in
        order. Numbering, writing and dropping are one transaction.

        Raises
        ------
        ConcurrentWriteError
            If another process appended to ``series`` at the same time (retry).
        """
        with self._session() as session, session.begin():
            names = self._series_names(session, series)
            seq = _series_seq(series, names[-1]) + 1 if names else 1
            name = f"{series}{seq:010d}"
            self._write(session, name, plaintext, 0)
            stale = [*names, name][:-keep]
            if stale:
                session.execute(delete(_BlobRow).where(_BlobRow.name.in_(stale)))
        return seq

    def _sealed_series(self, series: str) -> list[SealedEntry]:
        """Every entry of ``series``, decrypted, oldest first.

        Raises
        ------
        StoreCorruptError
            If an entry does not authenticate (damaged or tampered with).
        """
        with self._session() as session:
            rows = session.scalars(
                select(_BlobRow).where(_BlobRow.name.startswith(series)).order_by(_BlobRow.name)
            ).all()
            return [SealedEntry(_series_seq(series, row.name), row.name, self._open_row(row)) for row in rows]

    def _damaged(self, detail: str) -> StoreCorruptError:
        return StoreCorruptError(f"{self.path}: {detail}")

    @staticmethod
    def _series_names(session: Session, series: str) -> list[str]:
        return list(
            session.scalars(select(_BlobRow.name).where(_BlobRow.name.startswith(series)).order_by(_BlobRow.name)).all()
        )


def _series_seq(series: str, name: str) -> int:
    return int(name[len(series) :])
