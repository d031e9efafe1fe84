"""The server's verified privacy store: device keys and the ledger entries it accepted.

A device's privacy ledger (:mod:`shared.privacy.ledger`) is only worth keeping on the
server if what is kept was checked: :meth:`PrivacyStore.accept` verifies each upload
against the device's registered key and the entries already stored, and against the
DP parameters the server asked for, and stores it all-or-nothing. Because stored
entries keep their device signatures, a reviewer can re-run
:func:`shared.privacy.ledger.verify_chain` over :meth:`PrivacyStore.entries` later and
detect anything changed in the database since.

Schema (SQLAlchemy 2.0, any backend; SQLite by default)
------------------------------------------------------
``device_keys``
    One row per device: ``public_key`` (raw Ed25519 key, URL-safe base64),
    ``registered_at`` (UTC) and ``revoked``.
``accepted_ledger_entries``
    Every accepted entry, one row each, all :class:`~shared.privacy.ledger.LedgerEntry`
    fields plus an autoincrement ``id`` recording acceptance (storage) order; unique
    ``(device_id, seq)`` (:mod:`shared.privacy.ledger_table`).
``ledger_rejections``
    Uploads the server refused: ``device_id``, ``task_id``, ``seq`` (NULL for the whole
    upload), problem ``kind`` and ``detail``, and when (``at``, UTC).

The store can share a database file with ``server.run_store.RunStore`` and the device
registry: all tables belong to :class:`shared.sql_store.Base`, and each store creates
only its own.

Upgrading an earlier database
-----------------------------
Up to now this store called its entries table ``ledger_entries``, the name the device's
ledger file (:mod:`shared.privacy.ledger_store`) also uses; one metadata cannot hold
two tables of one name, so one of the two had to change, and it is this one. Opening a
database of the earlier layout renames its table (:func:`_upgrade`), guarded by what
the file holds: a ``ledger_entries`` table with exactly the entry columns, beside
``device_keys`` and without ``accepted_ledger_entries``. The rename is one statement
in one transaction that holds SQLite's write lock from the first check on, so a
concurrent opener waits and then finds the file upgraded; it rewrites no row, so every
entry, its storage-order ``id`` and signature are kept as they were. (SQLite and
PostgreSQL keep the constraint names, which still say ``ledger_entries``; nothing
addresses them by name.)

Why this side: the server's database is one file in the operator's care, opened by
fedrec's server processes and ``fedrec audit``; the device's file holds the device's
private key, lives unattended on every device, and is opened for each message. A
device that was upgraded and then ran an earlier fedrec would meet an empty
``ledger_entries``, start a new chain and derive its accountant history from nothing,
under-counting what it has spent; an earlier server meeting an upgraded database
refuses the devices' uploads (they do not continue an empty chain) instead. A database
that still holds a ``ledger_entries`` with entries next to the upgraded table (an
earlier fedrec wrote to it after the upgrade) is refused with an error rather than
having those entries ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    Boolean,
    Connection,
    Engine,
    ForeignKeyConstraint,
    Integer,
    Text,
    UniqueConstraint,
    insert,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from shared.privacy.identity import decode_public_key
from shared.privacy.ledger import ENTRY_FIELDS, GENESIS, ChainProblem, LedgerEntry, verify_chain
from shared.privacy.ledger_table import entry_from_row, entry_row, ledger_entry_table
from shared.sql_store import Base, SqlStore, create_store_engine, create_tables

__all__ = ["PrivacyStore", "Rejection"]

# The entries table, and its name in databases written before the upgrade above.
ENTRIES_TABLE: Final = "accepted_ledger_entries"
LEGACY_ENTRIES_TABLE: Final = "ledger_entries"


@dataclass(frozen=True)
class Rejection:
    """One problem with an upload the server refused."""

    device_id: int
    task_id: int
    seq: int | None
    kind: str
    detail: str
    at: datetime


# ------------------------------------------------------------------------------- ORM


class DeviceKeyRow(Base):
    """``device_keys``: each device's registered public key."""

    __tablename__ = "device_keys"

    device_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    public_key: Mapped[str] = mapped_column(comment="raw Ed25519 public key, URL-safe base64")
    registered_at: Mapped[datetime] = mapped_column(comment="UTC time the key was (re)registered")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False, comment="key no longer trusted")


class RejectionRow(Base):
    """``ledger_rejections``: problems of refused uploads."""

    __tablename__ = "ledger_rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # No foreign key: uploads from unregistered devices are rejected (and recorded) too.
    device_id: Mapped[int] = mapped_column(index=True, comment="uploading device")
    task_id: Mapped[int] = mapped_column(comment="task the upload answered")
    seq: Mapped[int | None] = mapped_column(comment="entry concerned; NULL for the whole upload")
    kind: Mapped[str] = mapped_column(comment="ChainProblem kind")
    detail: Mapped[str] = mapped_column(Text, comment="what is wrong, in words")
    at: Mapped[datetime] = mapped_column(comment="UTC time of the rejection")


# Row id is the storage order that verify_chain reads, to detect reordering.
_ENTRIES = ledger_entry_table(
    ENTRIES_TABLE,
    UniqueConstraint("device_id", "seq"),
    ForeignKeyConstraint(["device_id"], ["device_keys.device_id"]),
)


def _upgrade(engine: Engine) -> None:
    """Rename an earlier database's ``ledger_entries`` to :data:`ENTRIES_TABLE` (module docstring).

    Raises
    ------
    ValueError
        If the database holds a ``ledger_entries`` this store cannot take over (one
        with other columns, or one with entries beside the upgraded table), or it needs
        the upgrade but is read-only.
    """
    names = set(inspect(engine).get_table_names())
    if LEGACY_ENTRIES_TABLE not in names or "device_keys" not in names or "device_identity" in names:
        return  # a new or upgraded database, or not a privacy store's (a device's ledger file)
    url = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                # Take the write lock before looking, so two openers cannot both rename.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            _rename_legacy(conn, url)
            conn.commit()
    except OperationalError as exc:
        if "readonly" not in str(exc.orig).replace(" ", "").lower():
            raise
        raise ValueError(
            f"{url} was written by an earlier fedrec and is upgraded when opened (table "
            f"{LEGACY_ENTRIES_TABLE} becomes {ENTRIES_TABLE}), which needs write access: open a writable copy"
        ) from None


def _rename_legacy(conn: Connection, url: str) -> None:
    """The guarded rename, in ``conn``'s transaction; raises ValueError where :func:`_upgrade` says."""
    inspector = inspect(conn)
    names = set(inspector.get_table_names())
    if LEGACY_ENTRIES_TABLE not in names:
        return  # upgraded by a concurrent opener
    if ENTRIES_TABLE in names:
        left = conn.exec_driver_sql(f"SELECT COUNT(*) FROM {LEGACY_ENTRIES_TABLE}").scalar_one()
        if left:
            raise ValueError(
                f"{url} holds {left} ledger entries in table {LEGACY_ENTRIES_TABLE} beside the upgraded "
                f"{ENTRIES_TABLE}: an earlier fedrec wrote them after the upgrade; move them into "
                f"{ENTRIES_TABLE} (or discard them) before opening it"
            )
        return  # an empty leftover of an earlier fedrec: nothing to keep, nothing to rename
    columns = {c["name"] for c in inspector.get_columns(LEGACY_ENTRIES_TABLE)}
    if columns != {"id", *ENTRY_FIELDS}:
        raise ValueError(
            f"{url}: table {LEGACY_ENTRIES_TABLE} has columns {sorted(columns)}, not those of fedrec's "
            "ledger entries; it was not upgraded"
        )
    conn.exec_driver_sql(f"ALTER TABLE {LEGACY_ENTRIES_TABLE} RENAME TO {ENTRIES_TABLE}")


# ----------------------------------------------------------------------------- store


class PrivacyStore(SqlStore):
    """Device keys and verified ledger entries in a SQL database.

    Parameters
    ----------
    url
        Any SQLAlchemy URL, e.g. ``"sqlite:///out/fedrec.db"`` (the results database
        may be shared). The privacy tables are created if missing; for a SQLite file,
        its parent directory too.
    """

    def __init__(self, url: str) -> None:
        self._engine = create_store_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._closed = False
        try:
            _upgrade(self._engine)
            create_tables(self._engine, DeviceKeyRow, _ENTRIES, RejectionRow)
        except BaseException:
            self._engine.dispose()
            raise

    # ----------------------------------------------------------------------- keys

    def register_key(self, device_id: int, public_key: str, *, replace: bool = False) -> None:
        """Register ``device_id``'s public key.

        Re-registering the same key is a no-op (and does not lift a revocation).

        Parameters
        ----------
        device_id
            The device.
        public_key
            Its raw Ed25519 public key, URL-safe base64
            (:attr:`shared.privacy.identity.DeviceIdentity.public_key`).
        replace
            Allow replacing a different key already registered. Entries stored under
            the old key will then no longer verify (they report as ``"forged"``), so
            only replace a key whose entries have been audited or discarded.

        Raises
        ------
        ValueError
            If ``public_key`` is malformed, or the device already has a different key
            and ``replace`` is False.
        """
        decode_public_key(public_key)  # raises ValueError if malformed
        with self._session() as session, session.begin():
            row = session.get(DeviceKeyRow, device_id)
            if row is None:
                session.add(
                    DeviceKeyRow(
                        device_id=device_id, public_key=public_key, registered_at=datetime.now(UTC), revoked=False
                    )
                )
            elif row.public_key != public_key:
                if not replace:
                    raise ValueError(
                        f"device {device_id} already has a different public key registered; "
                        "pass replace=True to replace it"
                    )
                row.public_key = public_key
                row.registered_at = datetime.now(UTC)
                row.revoked = False

    def revoke_key(self, device_id: int) -> None:
        """Stop trusting ``device_id``'s key: its uploads report ``"unknown-key"`` from now on.

        Raises
        ------
        KeyError
            If the device has no registered key.
        """
        with self._session() as session, session.begin():
            row = session.get(DeviceKeyRow, device_id)
            if row is None:
                raise KeyError(f"device {device_id} has no registered key")
            row.revoked = True

    def public_key(self, device_id: int) -> str | None:
        """Return the device's registered, unrevoked public key, or None."""
        with self._session() as session:
            row = session.get(DeviceKeyRow, device_id)
            return None if row is None or row.revoked else row.public_key

    def keys(self) -> dict[int, str]:
        """Return every unrevoked registered key, ``device_id -> public_key``, by device id."""
        query = select(DeviceKeyRow).where(DeviceKeyRow.revoked.is_(False)).order_by(DeviceKeyRow.device_id)
        with self._session() as session:
            return {row.device_id: row.public_key for row in session.scalars(query)}

    # --------------------------------------------------------------------- ledger

    def head(self, device_id: int) -> LedgerEntry | None:
        """Return the device's stored entry with the highest seq, or None."""
        with self._session() as session:
            return self._head(session, device_id)

    @staticmethod
    def _head(session: Session, device_id: int) -> LedgerEntry | None:
        query = select(_ENTRIES).where(_ENTRIES.c.device_id == device_id).order_by(_ENTRIES.c.seq.desc()).limit(1)
        row = session.execute(query).mappings().first()
        return None if row is None else entry_from_row(row)

    def accept(
        self, entries: Sequence[LedgerEntry], *, expected: Mapping[str, object] | None = None
    ) -> list[ChainProblem]:
        """Verify an upload of new ledger entries and store it if, and only if, it is clean.

        Each device's entries in the upload must continue its stored chain (the first
        links to the stored head's hash with seq ``head.seq + 1``, or to the genesis
        hash with seq 0), form an intact chain signed by its registered key, and carry
        the parameters in ``expected``.

        Parameters
        ----------
        entries
            New entries, in the order the device made them; normally one device's.
        expected
            Field values every entry must carry, e.g. ``{"noise_multiplier": 1.0,
            "clip_norm": 1.0, "accountant": "rdp", "unit": "record", "steps": 10}``.

        Returns
        -------
        list[ChainProblem]
            Empty if the upload was stored; otherwise every problem found, and nothing
            was stored. Besides :func:`~shared.privacy.ledger.verify_chain`'s kinds:
            ``"replayed"`` for entries already stored and ``"mismatch"`` for parameters
            other than ``expected``.

        Raises
        ------
        ValueError
            If ``expected`` names a field a ledger entry does not have.
        """
        expected = dict(expected or {})
        unknown = set(expected) - set(ENTRY_FIELDS)
        if unknown:
            raise ValueError(f"expected names unknown ledger fields: {', '.join(sorted(unknown))}")
        if not entries:
            return []
        by_device: dict[int, list[LedgerEntry]] = {}
        for entry in entries:
            by_device.setdefault(entry.device_id, []).append(entry)
        try:
            with self._session() as session, session.begin():
                problems: list[ChainProblem] = []
                for device_id, uploaded in by_device.items():
                    row = session.get(DeviceKeyRow, device_id)
                    key = None if row is None or row.revoked else row.public_key
                    head = self._head(session, device_id)
                    problems += verify_chain(
                        uploaded,
                        key,
                        start_prev_hash=GENESIS if head is None else head.entry_hash,
                        start_seq=0 if head is None else head.seq + 1,
                        device_id=device_id,
                    )
                    problems += _mismatches(uploaded, expected)
                if problems:
                    return problems
                session.execute(insert(_ENTRIES), [entry_row(e) for e in entries])
        except IntegrityError:
            # Another writer stored the same seq between our read of the head and the
            # commit; the transaction was rolled back, so nothing is stored.
            return [
                ChainProblem(
                    "replayed",
                    device_id,
                    None,
                    None,
                    f"device {device_id}'s upload collided with entries stored concurrently; nothing was stored",
                )
                for device_id in by_device
            ]
        return []

    def reject(self, device_id: int, task_id: int, problems: Sequence[ChainProblem]) -> None:
        """Record why ``device_id``'s upload for ``task_id`` was refused (one row per problem)."""
        at = datetime.now(UTC)
        with self._session() as session, session.begin():
            session.add_all(
                RejectionRow(device_id=device_id, task_id=task_id, seq=p.seq, kind=p.kind, detail=p.detail, at=at)
                for p in problems
            )

    def entries(self, device_id: int | None = None) -> list[LedgerEntry]:
        """Return stored entries in storage (acceptance) order, optionally of one device.

        Storage order, not seq order: :func:`~shared.privacy.ledger.verify_chain` needs
        it to detect reordered rows.
        """
        query = select(_ENTRIES).order_by(_ENTRIES.c.id)
        if device_id is not None:
            query = query.where(_ENTRIES.c.device_id == device_id)
        with self._session() as session:
            return [entry_from_row(row) for row in session.execute(query).mappings()]

    def rejections(self, device_id: int | None = None) -> list[Rejection]:
        """Return recorded rejections in the order they were recorded."""
        query = select(RejectionRow).order_by(RejectionRow.id)
        if device_id is not None:
            query = query.where(RejectionRow.device_id == device_id)
        with self._session() as session:
            return [
                Rejection(device_id=r.device_id, task_id=r.task_id, seq=r.seq, kind=r.kind, detail=r.detail, at=r.at)
                for r in session.scalars(query)
            ]


def _mismatches(entries: Sequence[LedgerEntry], expected: Mapping[str, Any]) -> list[ChainProblem]:
    """Report entries whose parameters differ from what the server asked for."""
    problems = []
    for position, entry in enumerate(entries):
        for name, want in expected.items():
            claimed = getattr(entry, name)
            if claimed != want:
                problems.append(
                    ChainProblem(
                        "mismatch",
                        entry.device_id,
                        entry.seq,
                        position,
                        f"entry seq {entry.seq} (task {entry.task_id}) claims {name}={claimed!r} "
                        f"but the server asked for {name}={want!r}",
                    )
                )
    return problems
