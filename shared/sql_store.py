"""The lifecycle every fedrec SQLAlchemy store shares: context manager, idempotent close, open check."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker


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

    def _session(self) -> Session:
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._sessions()
