"""The SQL form of a ledger entry: one table shape, and rows to and from :class:`LedgerEntry`.

A device's ledger file (:mod:`shared.privacy.ledger_store`) and the server's privacy
store (``server.privacy_store``) both keep signed entries. Their tables are built here
from the fields of :class:`~shared.privacy.ledger.LedgerEntry`, so a field added there
is a column of both, and rows map to and from entries through the one field list
:data:`~shared.privacy.ledger.ENTRY_FIELDS`.

Columns: an autoincrement ``id`` (storage order, which
:func:`~shared.privacy.ledger.verify_chain` reads to detect reordering), then one
NOT NULL column per field in declaration order: ``INTEGER`` for int fields,
``DOUBLE`` for float fields (every bit of a float is hashed), ``VARCHAR`` of the
field's ``length`` metadata (default 64) for text fields, each with the field's
``comment`` metadata as column comment.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Final

from sqlalchemy import Column, Constraint, Double, Integer, RowMapping, String, Table
from sqlalchemy.types import TypeEngine

from shared.privacy.ledger import ENTRY_FIELDS, LedgerEntry
from shared.sql_store import Base

__all__ = ["entry_from_row", "entry_row", "ledger_entry_table"]

_DEFAULT_LENGTH: Final = 64


def _column_type(annotation: object, length: int | None) -> TypeEngine[Any]:
    # Annotations are strings (postponed evaluation): the same three kinds the hash knows.
    kind = str(annotation)
    if kind == "int":
        return Integer()
    if kind == "float":
        return Double()
    if kind == "str":
        return String(length or _DEFAULT_LENGTH)
    raise TypeError(f"a ledger field of type {kind} has no column type")


def ledger_entry_table(name: str, *constraints: Constraint) -> Table:
    """Declare the table ``name`` of ledger entries in :class:`shared.sql_store.Base`'s metadata.

    Parameters
    ----------
    name
        The table's name, unique among fedrec's tables.
    *constraints
        The store's own constraints, e.g. which fields are unique or reference another
        table.

    Returns
    -------
    Table
        The table; create it with :func:`shared.sql_store.create_tables`.
    """
    columns = [Column("id", Integer, primary_key=True, autoincrement=True)]
    columns += [
        Column(
            f.name,
            _column_type(f.type, f.metadata.get("length")),
            nullable=False,
            comment=f.metadata.get("comment"),
        )
        for f in fields(LedgerEntry)
    ]
    return Table(name, Base.metadata, *columns, *constraints)


def entry_row(entry: LedgerEntry) -> dict[str, object]:
    """Return ``entry``'s column values (without ``id``), for an insert."""
    return {name: getattr(entry, name) for name in ENTRY_FIELDS}


def entry_from_row(row: RowMapping) -> LedgerEntry:
    """Return the entry a row holds (a row mapping: ``result.mappings()``), unvalidated.

    Rows a third party may have edited must still load, so that
    :func:`~shared.privacy.ledger.verify_chain` can name the edit.
    """
    return LedgerEntry(**{name: row[name] for name in ENTRY_FIELDS})
