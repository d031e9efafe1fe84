"""A device's durable local store: its signing key, its privacy ledger and accountant history.

One SQLite file per device (SQLAlchemy 2.0), created with file mode ``0o600`` because
it holds the device's Ed25519 private key in the clear. Issue 4 will encrypt the
secret parts of this store (the private key, and possibly the ledger); until then the
file's permissions are the only protection, so keep it on the device's private storage.

Schema
------
``meta``
    Key/value text: ``device_id`` (fixed when the file is created; reopening the file
    for another device is refused) and ``created_at`` (Unix seconds).
``device_identity``
    The single row holding the device's raw 32-byte private key and, for inspection
    without the key, its public key.
``ledger_entries``
    The device's signed ledger (:class:`shared.privacy.ledger.LedgerEntry`), one row
    per release, ``id`` in append order; ``seq`` unique (:mod:`shared.privacy.ledger_table`).
    The server's copy of accepted entries is a table of another name
    (``server/privacy_store.py`` says why that one, not this one, was renamed).
``evaluations_answered``
    One row per evaluation request the device answered: ``answered_at`` (Unix
    seconds), ``run``, ``version`` and ``split``.

The accountant's history is not stored separately: it is exactly the
``(noise_multiplier, sample_rate, steps)`` of the ledger's releases, so deriving it
(:meth:`DeviceLedgerStore.history`) means the two can never disagree.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Final

from sqlalchemy import (
    Double,
    Engine,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    insert,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from shared.privacy.identity import DeviceIdentity
from shared.privacy.ledger import LedgerEntry, make_entry
from shared.privacy.ledger_table import entry_from_row, entry_row, ledger_entry_table
from shared.sql_store import Base, SqlStore, create_tables

__all__ = ["DeviceLedgerStore"]

# Read/write for the owner only: the file holds the private key.
FILE_MODE: Final = 0o600


class _Meta(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class _IdentityRow(Base):
    __tablename__ = "device_identity"

    # A single row: a device has exactly one identity.
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    private_key: Mapped[bytes] = mapped_column(LargeBinary, comment="raw Ed25519 private key (secret)")
    public_key: Mapped[str] = mapped_column(comment="raw public key, URL-safe base64")
    created_at: Mapped[float] = mapped_column(comment="Unix seconds")


# Append order (the row id) is what verification reads, to detect reordering.
_ENTRIES = ledger_entry_table("ledger_entries", UniqueConstraint("seq"))


class _EvaluationRow(Base):
    """An evaluation the device answered (metrics are not DP: the policy rate-limits them)."""

    __tablename__ = "evaluations_answered"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    answered_at: Mapped[float] = mapped_column(Double, index=True)
    run: Mapped[str] = mapped_column(String)
    version: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String)


@functools.lru_cache(maxsize=1024)
def _engine_for(path: str) -> Engine:
    """One engine per store file per process, holding no connection between uses.

    A simulated device's store is opened for every message; a new engine each time
    compiled every SQL statement afresh, which cost more than the statements. NullPool
    opens and closes the SQLite connection with each session, so a cached engine keeps
    no file open and sees the file as it is on disk.
    """
    return create_engine(f"sqlite:///{path}", poolclass=NullPool)


def _create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0o600 unless it exists.

    Created before SQLite opens it so the private key is never, even briefly, in a
    file others can read (SQLite would create it with the umask's default, 0o644).
    O_EXCL makes a concurrent creator lose cleanly instead of both chmod-racing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)
    # os.open applies the umask; make sure the mode is exactly 0o600.
    os.chmod(path, FILE_MODE)


class DeviceLedgerStore(SqlStore):
    """A device's identity key and signed privacy ledger in one SQLite file.

    Parameters
    ----------
    path
        The SQLite file; created (mode 0o600, parent directories too) if missing.
    device_id
        The device this store belongs to. Required when the file is new (it is
        recorded there); when reopening, None accepts the recorded device.

    Raises
    ------
    ValueError
        If the file is new and ``device_id`` is None, or the file belongs to a device
        other than ``device_id``.
    """

    def __init__(self, path: Path | str, device_id: int | None = None) -> None:
        self.path = Path(path).expanduser()
        _create_private_file(self.path)
        self._engine: Engine = _engine_for(str(self.path))
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._identity: DeviceIdentity | None = None
        self._closed = False
        try:
            create_tables(self._engine, _Meta, _IdentityRow, _ENTRIES, _EvaluationRow)
            self.device_id = self._claim(device_id)
        except BaseException:
            self._engine.dispose()
            raise

    def _claim(self, device_id: int | None) -> int:
        """Record ``device_id`` in a new file, or check it against the recorded one."""
        # Reopening is the common case (every message): read without a write transaction,
        # whose commit would cost an fsync each time.
        with self._sessions() as session:
            stored = session.get(_Meta, "device_id")
        if stored is not None:
            recorded = int(stored.value)
            if device_id is not None and int(device_id) != recorded:
                raise ValueError(
                    f"{self.path} is the ledger store of device {recorded}, not of device {device_id}: "
                    "each device needs its own store file"
                )
            return recorded
        with self._sessions.begin() as session:
            stored = session.get(_Meta, "device_id")
            if stored is None:
                if device_id is None:
                    raise ValueError(f"{self.path} is a new ledger store: pass the device_id it belongs to")
                session.add(_Meta(key="device_id", value=str(int(device_id))))
                session.add(_Meta(key="created_at", value=repr(time.time())))
                return int(device_id)
            recorded = int(stored.value)
            if device_id is not None and int(device_id) != recorded:
                raise ValueError(
                    f"{self.path} is the ledger store of device {recorded}, not of device {device_id}: "
                    "each device needs its own store file"
                )
            return recorded

    # ------------------------------------------------------------------- identity

    def identity(self) -> DeviceIdentity:
        """Return the device's signing identity, generating and storing it on first use.

        The same key is returned on every later call and after reopening the file.
        """
        if self._identity is not None:
            return self._identity
        with self._session() as session, session.begin():
            row = session.get(_IdentityRow, 1)
            if row is None:
                identity = DeviceIdentity.generate()
                session.add(
                    _IdentityRow(
                        id=1,
                        private_key=identity.private_bytes(),
                        public_key=identity.public_key,
                        created_at=time.time(),
                    )
                )
            else:
                identity = DeviceIdentity.from_private_bytes(row.private_key)
        self._identity = identity
        return identity

    # --------------------------------------------------------------------- ledger

    def append(self, *, timestamp: float | None = None, **release: object) -> LedgerEntry:
        """Sign one release, chained to the current head, and store it (one transaction).

        Parameters
        ----------
        timestamp
            When the entry is made, in Unix seconds; default now.
        **release
            The release's other fields (:data:`shared.privacy.ledger.RELEASE_FIELDS`), as
            described on :class:`shared.privacy.ledger.LedgerEntry`.

        Returns
        -------
        LedgerEntry
            The stored entry.

        Raises
        ------
        ValueError, TypeError
            If a field is missing, unknown or invalid (see :func:`shared.privacy.ledger.make_entry`).
        sqlalchemy.exc.IntegrityError
            If another writer appended the same seq concurrently (nothing is stored).
        """
        identity = self.identity()
        with self._session() as session, session.begin():
            prev = self._head(session)
            entry = make_entry(
                identity,
                prev,
                device_id=self.device_id,
                timestamp=time.time() if timestamp is None else timestamp,
                **release,
            )
            session.execute(insert(_ENTRIES), [entry_row(entry)])
        return entry

    @staticmethod
    def _head(session: Session) -> LedgerEntry | None:
        row = session.execute(select(_ENTRIES).order_by(_ENTRIES.c.seq.desc()).limit(1)).mappings().first()
        return None if row is None else entry_from_row(row)

    def head(self) -> LedgerEntry | None:
        """Return the entry with the highest seq, or None if the ledger is empty."""
        with self._session() as session:
            return self._head(session)

    def entries(self, after_seq: int = -1) -> list[LedgerEntry]:
        """Return the entries with ``seq > after_seq`` in storage (append) order.

        Storage order, not seq order, so that :func:`shared.privacy.ledger.verify_chain`
        can detect rows that were reordered.
        """
        query = select(_ENTRIES).where(_ENTRIES.c.seq > after_seq).order_by(_ENTRIES.c.id)
        with self._session() as session:
            return [entry_from_row(row) for row in session.execute(query).mappings()]

    # ---------------------------------------------------------------- evaluations

    def record_evaluation(self, *, run: str, version: int, split: str, at: float | None = None) -> None:
        """Note that the device answered an evaluation request (before the answer is sent)."""
        with self._session() as session, session.begin():
            session.add(
                _EvaluationRow(
                    answered_at=time.time() if at is None else at,
                    run=run,
                    version=version,
                    split=split,
                )
            )

    def evaluations_since(self, since: float) -> int:
        """How many evaluation requests the device answered at or after ``since`` (epoch seconds)."""
        query = select(func.count()).select_from(_EvaluationRow).where(_EvaluationRow.answered_at >= since)
        with self._session() as session:
            return int(session.scalar(query) or 0)

    def history(self, unit: str = "record") -> list[tuple[float, float, int]]:
        """Return the accountant history ``[(noise_multiplier, sample_rate, steps), ...]``.

        Derived from the ledger's releases of privacy ``unit`` in storage order, to
        resume a :class:`shared.privacy.accounting.DeviceAccountant`.
        """
        query = (
            select(_ENTRIES.c.noise_multiplier, _ENTRIES.c.sample_rate, _ENTRIES.c.steps)
            .where(_ENTRIES.c.unit == unit)
            .order_by(_ENTRIES.c.id)
        )
        with self._session() as session:
            return [(float(s), float(q), int(n)) for s, q, n in session.execute(query)]
