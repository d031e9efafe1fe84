"""Parse and validate a device owner's own history file before it enters the encrypted store.

Formats
-------
CSV
    A header line naming the columns ``item_id`` and ``timestamp``, optionally
    ``rating`` (any order, no other columns), then one interaction per line. Blank
    lines are ignored.
JSON
    A list of objects with the keys ``item_id``, ``timestamp`` and optionally
    ``rating`` (``null`` allowed), e.g. ``[{"item_id": 49, "timestamp": 874965758}]``.

The format is chosen by the file's suffix (``.csv``, ``.json``), otherwise by its
first non-blank character (``[`` means JSON). Item ids are the catalogue's dense ids
``0 .. num_items-1`` (those the global model scores). A timestamp is Unix seconds
(integer or decimal) or an ISO 8601 date-time (``2024-05-01T20:15:00+02:00``; one
without a UTC offset is read as UTC). A rating, when present, is a finite number.

Everything is validated before anything is returned: one bad line rejects the whole
file, and the error lists every problem found (up to :data:`MAX_REPORTED`), each with
the file, the line (CSV) or list index (JSON), and what is wrong. Duplicate
``(item_id, timestamp)`` pairs are errors too: in a file the owner exported they
indicate a broken export, and which copy to keep is not this module's guess.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from client.device_store import Interaction
from shared.data.types import DataError

__all__ = ["MAX_REPORTED", "HistoryImportError", "parse_history"]

MAX_REPORTED: Final = 20
REQUIRED: Final = ("item_id", "timestamp")
OPTIONAL: Final = ("rating",)
_INT_RE = re.compile(r"[+-]?\d+")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


class HistoryImportError(DataError):
    """The history file is unusable; the message lists each problem with its file and line/index."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        lines = "\n".join(f"  {p}" for p in shown) + (f"\n  ... and {more} more" if more > 0 else "")
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{path}: {len(problems)} {noun}; nothing imported:\n{lines}")


# ------------------------------------------------------------------ values


def _item_id(raw: Any, num_items: int) -> int:
    """An item id in ``[0, num_items)``; ValueError says why not."""
    if isinstance(raw, bool):
        raise ValueError(f"item_id must be an integer, found {raw!r}")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and _INT_RE.fullmatch(raw.strip()):
        value = int(raw.strip())
    else:
        raise ValueError(f"item_id must be an integer, found {raw!r}")
    if not 0 <= value < num_items:
        raise ValueError(f"item_id {value} is not in the catalogue (ids 0 to {num_items - 1})")
    return value


def _to_float(raw: Any, name: str) -> float:
    """``float(raw)`` for an int, a float or a numeric string; an int beyond float range is a ValueError."""
    try:
        return float(raw)
    except OverflowError:
        raise ValueError(f"{name} {raw!r} is out of range") from None


def _timestamp(raw: Any) -> float:
    """Unix seconds from a number, a numeric string or an ISO 8601 string; ValueError says why not."""
    if isinstance(raw, bool) or raw is None:
        raise ValueError(f"timestamp must be Unix seconds or an ISO 8601 date-time, found {raw!r}")
    if isinstance(raw, (int, float)):
        value = _to_float(raw, "timestamp")
    elif isinstance(raw, str):
        text = raw.strip()
        if not text:
            raise ValueError("timestamp is empty")
        if _NUMBER_RE.fullmatch(text):
            value = _to_float(text, "timestamp")
        else:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"timestamp must be Unix seconds or an ISO 8601 date-time, found {raw!r}") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            try:
                value = moment.timestamp()
            except (OverflowError, OSError, ValueError):
                raise ValueError(f"timestamp {raw!r} is out of range") from None
    else:
        raise ValueError(f"timestamp must be Unix seconds or an ISO 8601 date-time, found {raw!r}")
    if not math.isfinite(value):
        raise ValueError(f"timestamp must be finite, found {raw!r}")
    if value < 0:
        raise ValueError(f"timestamp {raw!r} is before 1970-01-01")
    return value


def _rating(raw: Any) -> float | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, bool):
        raise ValueError(f"rating must be a number, found {raw!r}")
    if isinstance(raw, (int, float)):
        value = _to_float(raw, "rating")
    elif isinstance(raw, str) and _NUMBER_RE.fullmatch(raw.strip()):
        value = _to_float(raw.strip(), "rating")
    else:
        raise ValueError(f"rating must be a number, found {raw!r}")
    if not math.isfinite(value):
        raise ValueError(f"rating must be finite, found {raw!r}")
    return value


def _record(where: str, fields: Mapping[str, Any], num_items: int, problems: list[str]) -> Interaction | None:
    """One validated interaction, or None with every problem of the row appended."""
    values: dict[str, Any] = {}
    for name, parse in (("item_id", lambda v: _item_id(v, num_items)), ("timestamp", _timestamp), ("rating", _rating)):
        try:
            values[name] = parse(fields.get(name))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if len(values) < 3:
        return None
    return Interaction(timestamp=values["timestamp"], item_id=values["item_id"], rating=values["rating"])


# ----------------------------------------------------------------- formats


def _parse_csv(path: Path, text: str, num_items: int, problems: list[str]) -> list[tuple[str, Interaction]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        problems.append("the file is empty; expected a header line item_id,timestamp[,rating]")
        return []
    except csv.Error as exc:
        problems.append(f"line 1: not valid CSV ({exc})")
        return []
    names = [h.strip().lstrip("\ufeff") for h in header]
    missing = [n for n in REQUIRED if n not in names]
    unknown = [n for n in names if n not in (*REQUIRED, *OPTIONAL)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if missing or unknown or repeated:
        what = []
        if missing:
            what.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            what.append(f"unknown column(s) {', '.join(repr(u) for u in unknown)}")
        if repeated:
            what.append(f"repeated column(s) {', '.join(repeated)}")
        problems.append(
            f"line 1: bad header {','.join(header)!r}: {'; '.join(what)} "
            "(expected item_id,timestamp and optionally rating)"
        )
        return []
    rows: list[tuple[str, Interaction]] = []
    try:
        for row in reader:
            where = f"line {reader.line_num}"
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                problems.append(f"{where}: expected {len(names)} fields ({','.join(names)}), found {len(row)}")
                continue
            record = _record(where, dict(zip(names, row, strict=True)), num_items, problems)
            if record is not None:
                rows.append((where, record))
    except csv.Error as exc:
        problems.append(f"line {reader.line_num}: not valid CSV ({exc})")
    if not rows and not problems:
        problems.append("no interactions after the header")
    return rows


def _parse_json(path: Path, text: str, num_items: int, problems: list[str]) -> list[tuple[str, Interaction]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(f"line {exc.lineno}: not valid JSON ({exc.msg})")
        return []
    if not isinstance(data, list):
        problems.append(f"expected a JSON list of objects, found a {type(data).__name__}")
        return []
    if not data:
        problems.append("the list is empty; no interactions to import")
        return []
    rows: list[tuple[str, Interaction]] = []
    for index, entry in enumerate(data):
        where = f"index {index}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object with item_id and timestamp, found {type(entry).__name__}")
            continue
        missing = [n for n in REQUIRED if n not in entry]
        unknown = sorted(k for k in entry if k not in (*REQUIRED, *OPTIONAL))
        if missing or unknown:
            what = ([f"missing key(s) {', '.join(missing)}"] if missing else []) + (
                [f"unknown key(s) {', '.join(repr(u) for u in unknown)}"] if unknown else []
            )
            problems.append(f"{where}: {'; '.join(what)}")
            continue
        if isinstance(entry["item_id"], str):
            # JSON has integers; a quoted id is most likely a different id space (e.g. titles).
            problems.append(f"{where}: item_id must be a JSON integer, found the string {entry['item_id']!r}")
            continue
        record = _record(where, entry, num_items, problems)
        if record is not None:
            rows.append((where, record))
    return rows


def _detect(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".json"):
        return suffix[1:]
    return "json" if text.lstrip("\ufeff \t\r\n").startswith("[") else "csv"


def parse_history(path: Path | str, num_items: int) -> list[Interaction]:
    """Read and validate a history file; return its interactions in file order.

    Parameters
    ----------
    path
        A CSV or JSON file (see the module docstring).
    num_items
        The catalogue size: valid item ids are ``0 .. num_items-1``.

    Returns
    -------
    list[Interaction]
        Every interaction, in file order (it breaks timestamp ties in the split).

    Raises
    ------
    HistoryImportError
        If the file is missing, empty, not UTF-8, malformed, or any row is invalid or
        duplicated; the message lists the problems with line numbers or list indices.
    """
    path = Path(path).expanduser()
    if num_items < 1:
        raise ValueError(f"num_items must be positive, got {num_items}")
    if not path.is_file():
        raise HistoryImportError(path, ["file not found"])
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HistoryImportError(path, [f"not UTF-8 text ({exc})"]) from None
    if not text.strip():
        raise HistoryImportError(path, ["the file is empty"])
    problems: list[str] = []
    parse = _parse_json if _detect(path, text) == "json" else _parse_csv
    rows = parse(path, text, num_items, problems)
    first_seen: dict[tuple[int, float], str] = {}
    for where, record in rows:
        earlier = first_seen.setdefault(record.key, where)
        if earlier != where:
            problems.append(
                f"{where}: duplicate of {earlier} (item_id {record.item_id}, timestamp {record.timestamp:g})"
            )
    if problems:
        raise HistoryImportError(path, problems)
    return [record for _, record in rows]
