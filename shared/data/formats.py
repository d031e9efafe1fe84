"""Parsers of the MovieLens file formats: files on disk in, an interaction log out.

Two families are read: the official GroupLens files users bring (ML-100K
``u.data``/``u.item``, ML-1M ``ratings.dat``/``movies.dat``, ML-20M / ML-25M /
ml-latest ``ratings.csv``/``movies.csv``) and RecBole's atomic ``.inter``/``.item``
files, the format MovieLens-100K is shipped in (see :mod:`shared.data.bundled`).
``docs/data.md`` describes every format.

Every reader returns an :class:`~shared.data.types.InteractionLog` with dense ids:
original user and item ids are mapped to ``0..n-1`` in ascending numeric order of
the original id, and rows keep the file's order (it breaks timestamp ties in the
leave-one-out split, see ``docs/data.md``).

Ratings files are parsed with :func:`numpy.loadtxt` (C speed, needed for the 25M
rows of ML-25M); when a chunk of lines does not parse, it is re-read line by line
so that the :class:`~shared.data.types.DataError` names the file, the 1-based line
number, what was expected and what was found.
"""

from __future__ import annotations

import csv
import itertools
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from shared.data.types import DataError, InteractionLog

__all__ = [
    "GroupLensFiles",
    "find_grouplens_files",
    "load_grouplens",
    "read_recbole_atomic",
]

_CHUNK_LINES = 1 << 20  # lines parsed per numpy.loadtxt call: bounds peak memory
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INT64_MAX = np.iinfo(np.int64).max


# ------------------------------------------------------------------ table parsing


@dataclass(frozen=True)
class _Columns:
    """Layout of a ratings table: which field holds what, and which are numeric."""

    sep: str
    names: tuple[str, ...]  # field names, for messages
    user: int
    item: int
    time: int
    numeric: tuple[int, ...] = ()  # further fields that must parse as numbers

    @property
    def sep_label(self) -> str:
        return {"\t": "tabs", ",": "commas", "::": "'::'", "|": "'|'"}.get(self.sep, repr(self.sep))


def _describe_line(line: str) -> str:
    text = line.rstrip("\r\n")
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _parse_line(path: Path, line_no: int, line: str, cols: _Columns) -> tuple[int, int, float] | None:
    """Parse one data line; ``None`` for a blank line, DataError when malformed."""
    if not line.strip():
        return None
    fields = line.rstrip("\r\n").split(cols.sep)
    if len(fields) != len(cols.names):
        raise DataError(
            f"{path}: line {line_no}: expected {len(cols.names)} fields separated by "
            f"{cols.sep_label} ({', '.join(cols.names)}), found {len(fields)}: "
            f"{_describe_line(line)}"
        )
    ids: list[int] = []
    for index in (cols.user, cols.item):
        text = fields[index].strip()
        if not _INT_RE.fullmatch(text) or abs(int(text)) > _INT64_MAX:
            raise DataError(f"{path}: line {line_no}: expected an integer {cols.names[index]}, found {fields[index]!r}")
        ids.append(int(text))
    values: dict[int, float] = {}
    for index in (*cols.numeric, cols.time):
        text = fields[index].strip()
        if not _FLOAT_RE.fullmatch(text):
            raise DataError(f"{path}: line {line_no}: expected a numeric {cols.names[index]}, found {fields[index]!r}")
        values[index] = float(text)
    return ids[0], ids[1], values[cols.time]


def _parse_chunk_slowly(
    path: Path, first_line_no: int, lines: Sequence[str], cols: _Columns
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Line-by-line parse; the reference semantics the fast path must agree with."""
    rows = [
        row
        for offset, line in enumerate(lines)
        if (row := _parse_line(path, first_line_no + offset, line, cols)) is not None
    ]
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float64)
    users, items, times = zip(*rows, strict=True)
    return (
        np.asarray(users, dtype=np.int64),
        np.asarray(items, dtype=np.int64),
        np.asarray(times, dtype=np.float64),
    )


def _parse_chunk_fast(lines: Sequence[str], cols: _Columns) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """numpy.loadtxt parse of a chunk; ``None`` when anything looks off."""
    nsep = len(cols.names) - 1
    # loadtxt ignores columns outside ``usecols``, so field counts are checked here.
    if any(line.count(cols.sep) != nsep for line in lines if line.strip()):
        return None
    text = lines
    if len(cols.sep) > 1:
        # loadtxt only takes single-character delimiters, so '::' becomes a tab; a
        # tab already in a line would then split a field unnoticed (loadtxt ignores
        # columns beyond usecols), so such chunks go to the slow path.
        if any("\t" in line for line in lines):
            return None
        text = [line.replace(cols.sep, "\t") for line in lines]
    used = sorted({cols.user, cols.item, cols.time, *cols.numeric})
    dtype = [(f"f{i}", np.int64 if i in (cols.user, cols.item) else np.float64) for i in used]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data" for blank chunks
            table = np.loadtxt(
                text,
                dtype=dtype,
                delimiter="\t" if len(cols.sep) > 1 else cols.sep,
                comments=None,
                usecols=used,
                ndmin=1,
            )
    except ValueError:
        return None
    for i in (*cols.numeric, cols.time):
        if not np.all(np.isfinite(table[f"f{i}"])):
            return None  # nan/inf: let the slow path name the line
    return (
        np.ascontiguousarray(table[f"f{cols.user}"]),
        np.ascontiguousarray(table[f"f{cols.item}"]),
        np.ascontiguousarray(table[f"f{cols.time}"], dtype=np.float64),
    )


def _parse_ratings(
    path: Path, handle: TextIO, first_line_no: int, cols: _Columns
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse the remaining lines of ``handle`` (whose next line is ``first_line_no``)."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    line_no = first_line_no
    last, last_no = "\n", 0
    while True:
        lines = list(itertools.islice(handle, _CHUNK_LINES))
        if not lines:
            break
        last, last_no = lines[-1], line_no + len(lines) - 1
        parsed = _parse_chunk_fast(lines, cols)
        if parsed is None:
            parsed = _parse_chunk_slowly(path, line_no, lines, cols)
        parts.append(parsed)
        line_no += len(lines)
    if last.strip() and not last.endswith("\n"):
        # A copy cut short ends inside a line, whose prefix may still parse (a timestamp cut
        # to its first digits): a complete file ends with a line break.
        raise DataError(
            f"{path}: line {last_no}: the file ends inside this line (truncated?): {_describe_line(last)}; "
            "if the line is complete, end the file with a line break"
        )
    if not parts or sum(len(p[0]) for p in parts) == 0:
        where = "file is empty" if first_line_no == 1 else "no data lines after the header"
        raise DataError(f"{path}: {where}; expected lines of {', '.join(cols.names)} separated by {cols.sep_label}")
    users, items, times = (np.concatenate(column) for column in zip(*parts, strict=True))
    return users, items, times


def _open_text(path: Path, encoding: str) -> TextIO:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path.open(encoding=encoding, newline=None)


def _read_ratings_file(
    path: Path, cols: _Columns, *, encoding: str, header: tuple[str, ...] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a whole ratings file, checking its header line when it has one."""
    try:
        with _open_text(path, encoding) as handle:
            first_line_no = 1
            if header is not None:
                line = handle.readline()
                if not line:
                    raise DataError(f"{path}: file is empty; expected the header line {','.join(header)!r}")
                found = tuple(field.strip() for field in line.rstrip("\r\n").split(cols.sep))
                if found != header:
                    raise DataError(
                        f"{path}: line 1: expected the header {','.join(header)!r}, found {_describe_line(line)}"
                    )
                first_line_no = 2
            return _parse_ratings(path, handle, first_line_no, cols)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid {encoding} text ({exc})") from exc


# ------------------------------------------------------------------------- titles


def _title_table(
    path: Path, rows: Iterable[tuple[int, list[str]]], min_fields: int, id_col: int, title_col: int
) -> dict[int, str]:
    """Map original item id -> title from ``(1-based line number, fields)`` rows."""
    titles: dict[int, str] = {}
    for line_no, fields in rows:
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) < min_fields:
            raise DataError(
                f"{path}: line {line_no}: expected at least {min_fields} fields, "
                f"found {len(fields)}: {_describe_line(' | '.join(fields))}"
            )
        text = fields[id_col].strip()
        if not _INT_RE.fullmatch(text):
            raise DataError(f"{path}: line {line_no}: expected an integer item id, found {fields[id_col]!r}")
        # First occurrence wins; duplicates do not occur in the official files.
        titles.setdefault(int(text), fields[title_col].strip())
    return titles


def _split_lines(handle: TextIO, sep: str, first_line_no: int) -> Iterator[tuple[int, list[str]]]:
    for line_no, line in enumerate(handle, start=first_line_no):
        yield line_no, line.rstrip("\r\n").split(sep)


def _read_titles(path: Path, kind: str) -> dict[int, str]:
    """Read a titles file of the given GroupLens ``kind`` (``ml-100k``/``ml-1m``/``csv``)."""
    try:
        if kind == "ml-100k":
            with path.open(encoding="latin-1") as f:
                return _title_table(path, _split_lines(f, "|", 1), 2, 0, 1)
        if kind == "ml-1m":
            with path.open(encoding="latin-1") as f:
                return _title_table(path, _split_lines(f, "::", 1), 3, 0, 1)
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["movieId", "title"]:
                raise DataError(f"{path}: line 1: expected the header 'movieId,title,genres', found {header!r}")
            # reader.line_num counts physical lines, which quoted titles may span.
            return _title_table(path, ((reader.line_num, row) for row in reader), 3, 0, 1)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read titles ({exc})") from exc


def _dense_log(
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    titles: dict[int, str] | None,
    source: str,
) -> InteractionLog:
    """Map original ids to dense ids (ascending numeric order) and build the log."""
    user_values, user_ids = np.unique(users, return_inverse=True)
    item_values, item_ids = np.unique(items, return_inverse=True)
    item_titles = None
    if titles is not None:
        item_titles = tuple(titles.get(int(v), f"item {int(v)}") for v in item_values)
    return InteractionLog(
        user_ids=user_ids.astype(np.int64, copy=False).reshape(-1),
        item_ids=item_ids.astype(np.int64, copy=False).reshape(-1),
        timestamps=times.astype(np.float64, copy=False),
        num_users=len(user_values),
        num_items=len(item_values),
        item_titles=item_titles,
        source=f"{source}: {len(users)} interactions, {len(user_values)} users, {len(item_values)} items",
        user_original=user_values.astype(np.int64, copy=False),
        item_original=item_values.astype(np.int64, copy=False),
    )


# ---------------------------------------------------------------- RecBole atomic


def _atomic_header(path: Path, line: str, wanted: Sequence[str]) -> tuple[list[str], list[int]]:
    """Parse a RecBole typed header (``name:type`` fields) and locate ``wanted``."""
    if not line.strip():
        raise DataError(f"{path}: file is empty; expected a RecBole header line (name:type)")
    names = [field.split(":", 1)[0].strip() for field in line.rstrip("\r\n").split("\t")]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise DataError(
            f"{path}: line 1: expected a RecBole header with the fields {', '.join(wanted)}, "
            f"found {_describe_line(line)}"
        )
    return names, [names.index(name) for name in wanted]


def read_recbole_atomic(inter_path: Path, item_path: Path | None = None, *, label: str | None = None) -> InteractionLog:
    """Read a RecBole atomic ``.inter`` file (and optionally its ``.item`` file).

    Parameters
    ----------
    inter_path
        Tab-separated file whose first line is a typed header (``user_id:token``,
        ``item_id:token``, ``timestamp:float``, ...). User and item tokens must be
        integers so that dense ids follow numeric order.
    item_path
        Optional ``.item`` file with ``item_id`` and ``movie_title`` columns.
    label
        Description of the data for the log's ``source`` (default: the path).

    Returns
    -------
    InteractionLog
        Dense ids, file row order, titles when ``item_path`` is given.

    Raises
    ------
    DataError
        When a file is missing, empty or has a malformed line.
    """
    try:
        with _open_text(inter_path, "utf-8") as handle:
            names, (u, i, t) = _atomic_header(inter_path, handle.readline(), ("user_id", "item_id", "timestamp"))
            cols = _Columns("\t", tuple(names), u, i, t)
            users, items, times = _parse_ratings(inter_path, handle, 2, cols)
    except UnicodeDecodeError as exc:
        raise DataError(f"{inter_path}: not valid utf-8 text ({exc})") from exc
    titles = None
    if item_path is not None:
        try:
            with _open_text(item_path, "utf-8") as handle:
                header_line = handle.readline()
                names, (id_col, title_col) = _atomic_header(item_path, header_line, ("item_id", "movie_title"))
                rows = _split_lines(handle, "\t", 2)
                titles = _title_table(item_path, rows, len(names), id_col, title_col)
        except UnicodeDecodeError as exc:
            raise DataError(f"{item_path}: not valid utf-8 text ({exc})") from exc
    return _dense_log(users, items, times, titles, label or f"RecBole atomic file {inter_path}")


# ------------------------------------------------------------------------ GroupLens


@dataclass(frozen=True)
class GroupLensFiles:
    """The files of one GroupLens data set: its format, ratings and titles paths."""

    kind: str  # "ml-100k" (u.data), "ml-1m" (ratings.dat) or "csv" (ratings.csv)
    ratings: Path
    titles: Path | None  # None when the titles file is absent


_RATINGS_NAMES = {"u.data": "ml-100k", "ratings.dat": "ml-1m", "ratings.csv": "csv"}
_TITLES_NAMES = {"ml-100k": "u.item", "ml-1m": "movies.dat", "csv": "movies.csv"}
_LAYOUTS = {
    "ml-100k": _Columns("\t", ("user id", "item id", "rating", "timestamp"), 0, 1, 3, (2,)),
    "ml-1m": _Columns("::", ("UserID", "MovieID", "Rating", "Timestamp"), 0, 1, 3, (2,)),
    "csv": _Columns(",", ("userId", "movieId", "rating", "timestamp"), 0, 1, 3, (2,)),
}
_ENCODINGS = {"ml-100k": "latin-1", "ml-1m": "latin-1", "csv": "utf-8"}


def _sniff_kind(path: Path) -> str:
    """Guess the format of a ratings file with an unofficial name from its first line."""
    with _open_text(path, "latin-1") as f:
        first = f.readline()
    if not first.strip():
        raise DataError(f"{path}: file is empty; expected GroupLens ratings")
    if first.startswith("userId,"):
        return "csv"
    if "::" in first:
        return "ml-1m"
    if "\t" in first:
        return "ml-100k"
    raise DataError(
        f"{path}: line 1: expected GroupLens ratings (u.data with tabs, ratings.dat with "
        f"'::' or ratings.csv with a userId header), found {_describe_line(first)}"
    )


def find_grouplens_files(path: Path) -> GroupLensFiles:
    """Locate the ratings and titles files of a GroupLens data set.

    Parameters
    ----------
    path
        A directory holding ``u.data``, ``ratings.dat`` or ``ratings.csv`` (first
        found in that order), or a ratings file. A file with another name is
        recognised from its first line.

    Returns
    -------
    GroupLensFiles
        The format and the paths; ``titles`` is ``None`` when ``u.item`` /
        ``movies.dat`` / ``movies.csv`` is not next to the ratings file.

    Raises
    ------
    DataError
        When nothing usable is found at ``path``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in _RATINGS_NAMES:
            if (path / name).is_file():
                ratings = path / name
                break
        else:
            raise DataError(
                f"{path}: no GroupLens ratings file found; expected one of "
                f"{', '.join(_RATINGS_NAMES)} in this directory"
            )
    elif path.is_file():
        ratings = path
    else:
        raise DataError(f"{path}: file not found (data-path must be a GroupLens directory or ratings file)")
    kind = _RATINGS_NAMES.get(ratings.name) or _sniff_kind(ratings)
    titles = ratings.parent / _TITLES_NAMES[kind]
    return GroupLensFiles(kind, ratings, titles if titles.is_file() else None)


def load_grouplens(path: Path) -> InteractionLog:
    """Load an official GroupLens MovieLens data set by path.

    Supported: ML-100K ``u.data`` (tab-separated user, item, rating, timestamp;
    titles from ``u.item``, ``|``-separated latin-1), ML-1M ``ratings.dat``
    (``::``-separated, latin-1; titles from ``movies.dat``) and ML-20M / ML-25M /
    ml-latest ``ratings.csv`` (header ``userId,movieId,rating,timestamp``; titles
    from ``movies.csv``). Every rating counts as an implicit interaction.

    Parameters
    ----------
    path
        Directory or ratings file, see :func:`find_grouplens_files`.

    Returns
    -------
    InteractionLog
        Dense ids in ascending numeric order of the original ids, rows in file
        order; ``item_titles`` is ``None`` when there is no titles file.

    Raises
    ------
    DataError
        Naming the file, the 1-based line and what was expected versus found.
    """
    files = find_grouplens_files(path)
    cols = _LAYOUTS[files.kind]
    header = cols.names if files.kind == "csv" else None
    users, items, times = _read_ratings_file(files.ratings, cols, encoding=_ENCODINGS[files.kind], header=header)
    titles = _read_titles(files.titles, files.kind) if files.titles is not None else None
    label = {"ml-100k": "ML-100K", "ml-1m": "ML-1M", "csv": "MovieLens CSV"}[files.kind]
    return _dense_log(users, items, times, titles, f"GroupLens {label} {files.ratings}")
