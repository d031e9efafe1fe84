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
``ledger_entries``
    Every accepted entry, one row each, all :class:`~shared.privacy.ledger.LedgerEntry`
    fields plus an autoincrement ``id`` recording acceptance (storage) order; unique
    ``(device_id, seq)``.
``ledger_rejections``
    Uploads the server refused: ``device_id``, ``task_id``, ``seq`` (NULL for the whole
    upload), problem ``kind`` and ``detail``, and when (``at``, UTC).

The tables have their own declarative base, so the store can share a database file
with ``server.run_store.RunStore``: each creates only its own tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    Boolean,
    Double,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from server.run_store import NAMING_CONVENTION, UTCDateTime
from shared.privacy.identity import decode_public_key
from shared.privacy.ledger import GENESIS, ChainProblem, LedgerEntry, verify_chain
from shared.sql_store import SqlStore

__all__ = ["PrivacyStore", "Rejection"]

_ENTRY_FIELDS: Final = tuple(LedgerEntry.__dataclass_fields__)


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


class Base(DeclarativeBase):
    """Declarative base of the privacy tables only (see the module docstring)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Double: Float is single precision on MySQL, and the hashes cover every bit.
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        float: Double(),
        str: String(64),
        datetime: UTCDateTime(),
    }


class DeviceKeyRow(Base):
    """``device_keys``: each device's registered public key."""

    __tablename__ = "device_keys"

    device_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    public_key: Mapped[str] = mapped_column(comment="raw Ed25519 public key, URL-safe base64")
    registered_at: Mapped[datetime] = mapped_column(comment="UTC time the key was (re)registered")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False, comment="key no longer trusted")


class LedgerEntryRow(Base):
    """``ledger_entries``: accepted, signed ledger entries in acceptance order."""

    __tablename__ = "ledger_entries"
    __table_args__ = (UniqueConstraint("device_id", "seq"),)

    # Row id is the storage order that verify_chain reads, to detect reordering.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device_keys.device_id"), comment="releasing device")
    seq: Mapped[int] = mapped_column(comment="position in the device's ledger, from 0")
    run: Mapped[str] = mapped_column(String(255), comment="run the release belongs to")
    version: Mapped[int] = mapped_column(comment="global model version trained on; -1 if not applicable")
    task_id: Mapped[int] = mapped_column(comment="training task the release answered")
    unit: Mapped[str] = mapped_column(comment="privacy unit: record|user")
    mechanism: Mapped[str] = mapped_column(comment="e.g. subsampled-gaussian")
    noise_multiplier: Mapped[float] = mapped_column(comment="noise std / clip_norm")
    sample_rate: Mapped[float] = mapped_column(comment="Poisson sampling probability per step")
    steps: Mapped[int] = mapped_column(comment="noisy steps in this release")
    clip_norm: Mapped[float] = mapped_column(comment="L2 clipping bound")
    accountant: Mapped[str] = mapped_column(comment="accountant of epsilon, e.g. rdp")
    epsilon: Mapped[float] = mapped_column(comment="device's cumulative epsilon after this release")
    delta: Mapped[float] = mapped_column(comment="delta the epsilon is stated at")
    timestamp: Mapped[float] = mapped_column(comment="device's Unix seconds when the entry was made")
    prev_hash: Mapped[str] = mapped_column(comment="entry_hash of the previous entry")
    entry_hash: Mapped[str] = mapped_column(comment="SHA-256 hex of the canonical entry")
    signature: Mapped[str] = mapped_column(String(128), comment="device's Ed25519 signature of entry_hash")


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


def _to_entry(row: LedgerEntryRow) -> LedgerEntry:
    return LedgerEntry(**{name: getattr(row, name) for name in _ENTRY_FIELDS})


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
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._engine: Engine = create_engine(url)
        Base.metadata.create_all(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._closed = False

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
        query = (
            select(LedgerEntryRow)
            .where(LedgerEntryRow.device_id == device_id)
            .order_by(LedgerEntryRow.seq.desc())
            .limit(1)
        )
        row = session.scalars(query).first()
        return None if row is None else _to_entry(row)

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
        unknown = set(expected) - set(_ENTRY_FIELDS)
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
                session.add_all(LedgerEntryRow(**{name: getattr(e, name) for name in _ENTRY_FIELDS}) for e in entries)
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
        query = select(LedgerEntryRow).order_by(LedgerEntryRow.id)
        if device_id is not None:
            query = query.where(LedgerEntryRow.device_id == device_id)
        with self._session() as session:
            return [_to_entry(row) for row in session.scalars(query)]

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
