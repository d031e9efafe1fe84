"""What every fedrec SQLAlchemy store shares: one declarative base and one store lifecycle.

:class:`Base` is the single declarative base of every table fedrec keeps, on the server
(run database, privacy store, device registry) and on a device (ledger file, data
store). Its one :class:`~sqlalchemy.MetaData` cannot hold two tables of one name, so
table names are unique across all stores, and each store creates only its own tables
(``Base.metadata.create_all(engine, tables=[...])``): a file never gains another
store's tables.

:class:`SqlStore` is the lifecycle of a store holding one engine: context manager,
idempotent close and the check that the store is still open.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, cast

from sqlalchemy import JSON, DateTime, Dialect, Double, Engine, MetaData, String, Table, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

__all__ = ["NAMING_CONVENTION", "Base", "SqlStore", "UTCDateTime", "create_store_engine", "create_tables"]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend.

    SQLite has no timezone-aware type and hands back naive datetimes, so values are
    normalised to UTC on the way in and tagged as UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Reject naive datetimes (ambiguous) and store UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime whatever the backend returned."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Deterministic constraint names, so migrations on any backend can address them.
NAMING_CONVENTION: Final = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every fedrec table: constraint naming convention, portable column types."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Double rather than Float: Float is single precision on MySQL, and ledger hashes
    # cover every bit of a float. Strings get a length because some backends (MySQL)
    # require one for VARCHAR.
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        float: Double(),
        str: String(64),
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


def create_store_engine(url: str) -> Engine:
    """Return an engine for ``url``, creating a SQLite file's parent directory first.

    Parameters
    ----------
    url
        Any SQLAlchemy database URL, e.g. ``"sqlite:///out/fedrec.db"``.

    Returns
    -------
    Engine
        A new engine; the caller disposes of it (:meth:`SqlStore.close`).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url)


def create_tables(engine: Engine, *tables: type[Base] | Table) -> None:
    """Create those of ``tables`` that are missing, and no other table of :class:`Base`.

    Parameters
    ----------
    engine
        The store's engine.
    *tables
        Mapped classes or Core tables of :class:`Base`'s metadata.
    """
    # A declarative class's __table__ is typed as any FromClause; Base's are all Tables.
    Base.metadata.create_all(engine, tables=[t if isinstance(t, Table) else cast(Table, t.__table__) for t in tables])


class SqlStore:
    """Base of a store holding one engine and its session factory.

    Subclasses set ``_engine``, ``_sessions`` and ``_closed = False`` in ``__init__``.
    """

    _engine: Engine
    _sessions: sessionmaker[Session]
    _closed: bool

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the database connections (idempotent)."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def _require_open(self) -> None:
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed")

    def _session(self) -> Session:
        self._require_open()
        return self._sessions()
