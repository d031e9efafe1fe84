"""Results database for simulation runs (SQLAlchemy 2.0, any backend; SQLite by default).

A privacy reviewer recomputes a run's guarantees from this database alone, so every
column is named for what it holds and carries its unit in a column comment (emitted
as DDL comments on backends that support them).

Schema
------
``runs``
    One row per simulation run: ``id``, ``name``, ``seed``, ``started_at`` and
    ``finished_at`` (timezone-aware UTC wall-clock timestamps; ``finished_at`` is NULL
    while the run is in progress or if it crashed), ``config`` (the flat run
    configuration as JSON) and ``summary`` (final metrics as JSON, NULL until
    :meth:`RunStore.finish_run`).
``tasks``
    One row per dispatched training task: which device (``device_id``) trained from
    which global model version (``base_version``), when it was dispatched and finished
    (``dispatched_at`` / ``finished_at``, simulated seconds), its ``status``
    (accepted, rejected-stale, failed, timeout, dropped, refused), the ``staleness`` it
    was applied with, the global ``applied_version`` its aggregation produced, and its mean training
    ``loss`` (DP off only). No record count: it is the device's private data.
``versions``
    One row per global model version: when it was produced (``sim_time``, simulated
    seconds; ``wall_time``, real seconds since the run started), how many client
    updates were aggregated into it (``num_updates``) and their ``mean_staleness`` /
    ``max_staleness``.
``evaluations``
    One row per evaluation of a global version on a ``split`` (valid or test) over
    ``users`` users: full-ranking ``hr`` / ``ndcg`` at cut-off ``k``, the same metrics
    under the sampled-negatives protocol (``sampled_hr`` / ``sampled_ndcg``) and
    catalogue ``coverage`` (NULL when not computed).
``privacy_spending``
    One row per differentially private release a device made (``status = 'spent'``) or
    refused because it would have exceeded its budget (``status = 'refused'``), in the
    order the device's accountant composed them (the row ``id``). ``epsilon`` is the
    device's *cumulative* epsilon at ``delta`` after this release (for refused rows,
    the value the release would have reached; it was never spent). The DP-SGD
    parameters of the release are stored alongside so the accounting can be redone:
    ``noise_multiplier`` (noise std / clipping norm), ``sample_rate`` (Poisson
    sampling probability per step), ``steps`` (optimizer steps in this release),
    ``clip_norm`` (per-example L2 clipping bound) and ``accountant`` (e.g. ``rdp``).

Every child table has a ``run_id`` foreign key to ``runs.id`` and is indexed on
``run_id`` plus the columns the readers filter or order by.

Writes are buffered in memory and inserted in batches (executemany), committed every
:data:`FLUSH_EVERY` rows, on :meth:`RunStore.flush`, :meth:`RunStore.finish_run` and
:meth:`RunStore.close`; readers flush this store's pending rows first, so a store
always reads its own writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from shared.sql_store import Base, SqlStore, create_store_engine, create_tables

__all__ = [
    "EVAL_MODES",
    "EVAL_SPLITS",
    "FLUSH_EVERY",
    "PRIVACY_STATUSES",
    "TASK_STATUSES",
    "EvalRecord",
    "PrivacyRecord",
    "RunInfo",
    "RunStore",
    "TABLES",
    "TaskRecord",
    "UserReleaseRecord",
    "VersionRecord",
]

TASK_STATUSES: Final = (
    "accepted",
    "rejected-stale",
    "rejected-ledger",
    "failed",
    "timeout",
    "dropped",
    "refused",
    "withheld",
    # A secure cohort's sum closed before the device finished training, or stopped before the
    # device sent its masked vector: it released nothing and is not blamed.
    "late",
)
EVAL_SPLITS: Final = ("valid", "test")
EVAL_MODES: Final = ("exact", "private")
PRIVACY_STATUSES: Final = ("spent", "refused")

# Rows buffered (all tables together) before an automatic batch commit: large enough
# that a run's thousands of rows cost a handful of transactions, small enough that a
# crash loses little.
FLUSH_EVERY: Final = 500


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TaskRecord:
    """The fate of one dispatched training task (times in simulated seconds)."""

    task_id: int
    device_id: int
    base_version: int
    dispatched_at: float
    finished_at: float
    status: str
    staleness: int | None
    applied_version: int | None
    loss: float | None

    def __post_init__(self) -> None:
        _check_choice("TaskRecord.status", self.status, TASK_STATUSES)


@dataclass(frozen=True)
class VersionRecord:
    """One global model version: when it appeared and the staleness of its updates."""

    version: int
    sim_time: float
    wall_time: float
    num_updates: int
    mean_staleness: float
    max_staleness: int


@dataclass(frozen=True)
class EvalRecord:
    """Ranking metrics of one global version on one split."""

    version: int
    sim_time: float
    wall_time: float
    split: str
    users: int
    hr: float
    ndcg: float
    sampled_hr: float
    sampled_ndcg: float
    coverage: float | None
    k: int
    # "exact": per-device metrics (simulation only, not private); "private": noisy sums.
    mode: str = "exact"
    # Per activity tier (JSON list of {"users", "hr", "ndcg", "sampled-hr", "sampled-ndcg"}).
    tiers: str = "[]"

    def __post_init__(self) -> None:
        _check_choice("EvalRecord.split", self.split, EVAL_SPLITS)
        _check_choice("EvalRecord.mode", self.mode, EVAL_MODES)


@dataclass(frozen=True)
class PrivacyRecord:
    """One DP release a device made or refused; ``epsilon`` is cumulative."""

    device_id: int
    task_id: int
    version: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    accountant: str
    status: str

    def __post_init__(self) -> None:
        _check_choice("PrivacyRecord.status", self.status, PRIVACY_STATUSES)


@dataclass(frozen=True)
class UserReleaseRecord:
    """One device's part in one user-level release (a noised buffer application).

    The device's individual sensitivity in the release is ``weight * clip_norm``;
    ``epsilon`` is its cumulative user-level epsilon at ``delta`` after it, from the
    Renyi filter at the fixed ``order``.
    """

    version: int
    device_id: int
    weight: float
    noise_multiplier: float
    clip_norm: float
    order: float
    epsilon: float
    delta: float


@dataclass(frozen=True)
class RunInfo:
    """A run's metadata as stored in ``runs``."""

    run_id: int
    name: str
    seed: int
    started_at: datetime
    finished_at: datetime | None
    config: dict[str, Any]
    summary: dict[str, Any] | None
    ledger_label: str | None = None  # what devices' ledger entries of this run name it


# ------------------------------------------------------------------------------- ORM


def _in_list(column: str, allowed: tuple[str, ...]) -> str:
    # Plain SQL IN list: portable across backends (no enum types).
    return f"{column} IN ({', '.join(repr(v) for v in allowed)})"


class RunRow(Base):
    """``runs``: one row per simulation run."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), comment="human-readable run name")
    seed: Mapped[int] = mapped_column(comment="master random seed of the run")
    started_at: Mapped[datetime] = mapped_column(comment="UTC wall-clock start")
    finished_at: Mapped[datetime | None] = mapped_column(comment="UTC wall-clock end; NULL if unfinished")
    config: Mapped[dict[str, Any]] = mapped_column(comment="flat run configuration")
    summary: Mapped[dict[str, Any] | None] = mapped_column(comment="final metrics; NULL if unfinished")
    ledger_label: Mapped[str | None] = mapped_column(
        String(255), default=None, comment="the run label devices' ledger entries of this run carry"
    )


def _run_fk() -> Mapped[int]:
    return mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), comment="runs.id")


class TaskRow(Base):
    """``tasks``: one row per dispatched training task."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("run_id", "task_id"),
        Index("ix_tasks_run_id_device_id", "run_id", "device_id"),
        CheckConstraint(_in_list("status", TASK_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _run_fk()
    task_id: Mapped[int] = mapped_column(comment="task id, unique within the run")
    device_id: Mapped[int] = mapped_column(comment="device that trained the task")
    base_version: Mapped[int] = mapped_column(comment="global version the device trained from")
    dispatched_at: Mapped[float] = mapped_column(comment="simulated seconds at dispatch")
    finished_at: Mapped[float] = mapped_column(comment="simulated seconds when the outcome reached the server")
    status: Mapped[str] = mapped_column(comment="accepted|rejected-stale|failed|timeout|dropped|refused")
    staleness: Mapped[int | None] = mapped_column(comment="versions behind when applied")
    applied_version: Mapped[int | None] = mapped_column(comment="global version this task's aggregation produced")
    loss: Mapped[float | None] = mapped_column(comment="mean local training loss")


class VersionRow(Base):
    """``versions``: one row per global model version."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("run_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _run_fk()
    version: Mapped[int] = mapped_column(comment="global model version number")
    sim_time: Mapped[float] = mapped_column(comment="simulated seconds when produced")
    wall_time: Mapped[float] = mapped_column(comment="real seconds since run start when produced")
    num_updates: Mapped[int] = mapped_column(comment="client updates aggregated into this version")
    mean_staleness: Mapped[float] = mapped_column(comment="mean staleness of those updates")
    max_staleness: Mapped[int] = mapped_column(comment="max staleness of those updates")


class EvaluationRow(Base):
    """``evaluations``: metrics of one global version on one split."""

    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_run_id_split_version", "run_id", "split", "version"),
        CheckConstraint(_in_list("split", EVAL_SPLITS), name="split"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _run_fk()
    version: Mapped[int] = mapped_column(comment="global model version evaluated")
    sim_time: Mapped[float] = mapped_column(comment="simulated seconds of that version")
    wall_time: Mapped[float] = mapped_column(comment="real seconds since run start")
    split: Mapped[str] = mapped_column(comment="valid|test")
    users: Mapped[int] = mapped_column(comment="users evaluated")
    hr: Mapped[float] = mapped_column(comment="hit rate at k, full ranking")
    ndcg: Mapped[float] = mapped_column(comment="NDCG at k, full ranking")
    sampled_hr: Mapped[float] = mapped_column(comment="hit rate at k, sampled negatives")
    sampled_ndcg: Mapped[float] = mapped_column(comment="NDCG at k, sampled negatives")
    coverage: Mapped[float | None] = mapped_column(comment="catalogue coverage of top-k lists")
    k: Mapped[int] = mapped_column(comment="ranking cut-off")
    mode: Mapped[str] = mapped_column(String(16), default="exact", comment="exact (simulation only) | private")
    tiers: Mapped[str] = mapped_column(Text, default="[]", comment="JSON: the metrics per activity tier")


class PrivacyRow(Base):
    """``privacy_spending``: one row per DP release a device made or refused."""

    __tablename__ = "privacy_spending"
    __table_args__ = (
        Index("ix_privacy_spending_run_id_device_id", "run_id", "device_id"),
        CheckConstraint(_in_list("status", PRIVACY_STATUSES), name="status"),
    )

    # Row id doubles as the composition order of each device's releases.
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _run_fk()
    device_id: Mapped[int] = mapped_column(comment="releasing device")
    task_id: Mapped[int] = mapped_column(comment="tasks.task_id of the release")
    version: Mapped[int] = mapped_column(comment="global version the device trained from")
    epsilon: Mapped[float] = mapped_column(comment="device's cumulative epsilon after this release")
    delta: Mapped[float] = mapped_column(comment="delta the epsilon is stated at")
    noise_multiplier: Mapped[float] = mapped_column(comment="Gaussian noise std / clip_norm")
    sample_rate: Mapped[float] = mapped_column(comment="Poisson sampling probability per step")
    steps: Mapped[int] = mapped_column(comment="DP-SGD steps in this release")
    clip_norm: Mapped[float] = mapped_column(comment="per-example L2 clipping bound")
    accountant: Mapped[str] = mapped_column(comment="privacy accountant used, e.g. rdp")
    status: Mapped[str] = mapped_column(comment="spent|refused")


class UserReleaseRow(Base):
    """``user_releases``: one row per (buffer application, contributing device) under user-level DP."""

    __tablename__ = "user_releases"
    __table_args__ = (Index("ix_user_releases_run_id_device_id", "run_id", "device_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _run_fk()
    version: Mapped[int] = mapped_column(comment="global version the release produced")
    device_id: Mapped[int] = mapped_column(comment="contributing device")
    weight: Mapped[float] = mapped_column(comment="staleness weight (<= 1) of its clipped update")
    noise_multiplier: Mapped[float] = mapped_column(comment="server noise std / clip_norm")
    clip_norm: Mapped[float] = mapped_column(comment="L2 bound of a whole device update")
    order: Mapped[float] = mapped_column(comment="the Renyi filter's fixed order")
    epsilon: Mapped[float] = mapped_column(comment="device's cumulative user-level epsilon after it")
    delta: Mapped[float] = mapped_column(comment="delta the epsilon is stated at")


# The results database's tables: what RunStore creates, and nothing else.
TABLES: Final[tuple[type[Base], ...]] = (RunRow, TaskRow, VersionRow, EvaluationRow, PrivacyRow, UserReleaseRow)


# ----------------------------------------------------------------------------- store


def _json_safe(value: object, where: str) -> Any:
    """Return ``value`` as strict JSON data (no NaN/Infinity), or raise TypeError.

    Non-finite floats (e.g. an infinite budget) become the strings ``"inf"``,
    ``"-inf"`` and ``"nan"``: strict JSON backends (PostgreSQL, MySQL) reject them.
    """
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


def _enable_sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    # SQLite ignores foreign keys unless asked, per connection.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class RunStore(SqlStore):
    """Buffered writer and reader of the results database.

    Parameters
    ----------
    url
        Any SQLAlchemy database URL, e.g. ``"sqlite:///out/run.db"``. Tables are
        created if missing; for a SQLite file, its parent directory too.

    Notes
    -----
    ``add_*`` calls only buffer rows; they reach the database every
    :data:`FLUSH_EVERY` rows, on :meth:`flush`, :meth:`finish_run` and :meth:`close`.
    Use the store as a context manager so the tail of the buffer is never lost.
    """

    def __init__(self, url: str) -> None:
        self._engine = create_store_engine(url)
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _enable_sqlite_foreign_keys)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._closed = False
        try:
            create_tables(self._engine, *TABLES)
        except BaseException:
            self._engine.dispose()
            raise
        # Pending rows per table, in insertion order, as column dicts for executemany.
        self._pending: dict[type[Base], list[dict[str, Any]]] = {
            TaskRow: [],
            VersionRow: [],
            EvaluationRow: [],
            PrivacyRow: [],
            UserReleaseRow: [],
        }
        self._pending_count = 0
        # Run ids confirmed to exist, so buffered writes need not query per row.
        self._known_runs: set[int] = set()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Flush pending rows, then release the database connections (idempotent)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            super().close()

    def _require_run(self, run_id: int) -> None:
        self._require_open()
        if run_id in self._known_runs:
            return
        with self._sessions() as session:
            if session.get(RunRow, run_id) is None:
                raise KeyError(f"unknown run_id {run_id}")
        self._known_runs.add(run_id)

    # -------------------------------------------------------------------- writers

    def start_run(self, name: str, seed: int, config: Mapping[str, object]) -> int:
        """Create a run and return its id (committed immediately).

        Parameters
        ----------
        name
            Human-readable run name.
        seed
            Master random seed.
        config
            JSON-serialisable run configuration (non-finite floats are stored as
            strings, paths as strings).

        Returns
        -------
        int
            The new run's id.

        Raises
        ------
        TypeError
            If ``config`` holds a value that is not JSON-serialisable.
        """
        self._require_open()
        row = RunRow(
            name=name,
            seed=seed,
            started_at=datetime.now(UTC),
            finished_at=None,
            config=_json_safe(config, "config"),
            summary=None,
        )
        with self._sessions.begin() as session:
            session.add(row)
            session.flush()
            run_id = row.id
        self._known_runs.add(run_id)
        return run_id

    def _buffer(self, table: type[Base], run_id: int, values: dict[str, Any]) -> None:
        self._require_run(run_id)
        self._pending[table].append({"run_id": run_id, **values})
        self._pending_count += 1
        if self._pending_count >= FLUSH_EVERY:
            self.flush()

    def add_task(self, run_id: int, record: TaskRecord) -> None:
        """Buffer one task outcome.

        Parameters
        ----------
        run_id
            Run the task belongs to.
        record
            The task's outcome.

        Raises
        ------
        KeyError
            If ``run_id`` does not exist.
        """
        self._buffer(TaskRow, run_id, _fields(record))

    def add_version(self, run_id: int, record: VersionRecord) -> None:
        """Buffer one global model version (see :meth:`add_task` for errors)."""
        self._buffer(VersionRow, run_id, _fields(record))

    def add_evaluation(self, run_id: int, record: EvalRecord) -> None:
        """Buffer one evaluation result (see :meth:`add_task` for errors)."""
        self._buffer(EvaluationRow, run_id, _fields(record))

    def add_privacy(self, run_id: int, record: PrivacyRecord) -> None:
        """Buffer one DP release or refusal, in the accountant's composition order.

        See :meth:`add_task` for errors.
        """
        self._buffer(PrivacyRow, run_id, _fields(record))

    def add_user_release(self, run_id: int, record: UserReleaseRecord) -> None:
        """Buffer one device's part in a user-level release (see :meth:`add_task` for errors)."""
        self._buffer(UserReleaseRow, run_id, _fields(record))

    def user_releases(self, run_id: int, device_id: int | None = None) -> list[UserReleaseRecord]:
        """User-level releases in recording order (optionally of one device)."""
        query = select(UserReleaseRow).where(UserReleaseRow.run_id == run_id)
        if device_id is not None:
            query = query.where(UserReleaseRow.device_id == device_id)
        with self._read(run_id) as session:
            return [_to_record(UserReleaseRecord, row) for row in session.scalars(query.order_by(UserReleaseRow.id))]

    def flush(self) -> None:
        """Insert all pending rows in one transaction.

        On failure the transaction is rolled back and the rows stay pending, so
        nothing is silently lost; the error propagates.
        """
        self._require_open()
        if self._pending_count == 0:
            return
        with self._sessions.begin() as session:
            for table, rows in self._pending.items():
                if rows:
                    # Core executemany: orders of magnitude faster than ORM adds.
                    session.execute(insert(table), rows)
        for rows in self._pending.values():
            rows.clear()
        self._pending_count = 0

    def label_run(self, run_id: int, ledger_label: str) -> None:
        """Record the label this run's ledger entries carry (the audit tells its entries from earlier runs')."""
        self._require_run(run_id)
        with self._sessions.begin() as session:
            row = session.get(RunRow, run_id)
            if row is None:
                raise KeyError(f"unknown run_id {run_id}")
            row.ledger_label = ledger_label

    def finish_run(self, run_id: int, summary: Mapping[str, object]) -> None:
        """Flush pending rows and mark the run finished with its summary.

        Parameters
        ----------
        run_id
            Run to finish.
        summary
            JSON-serialisable final metrics (same conversions as ``config``).

        Raises
        ------
        KeyError
            If ``run_id`` does not exist.
        """
        self._require_run(run_id)
        self.flush()
        with self._sessions.begin() as session:
            row = session.get(RunRow, run_id)
            if row is None:  # deleted concurrently by another writer
                raise KeyError(f"unknown run_id {run_id}")
            row.summary = _json_safe(summary, "summary")
            row.finished_at = datetime.now(UTC)

    # -------------------------------------------------------------------- readers

    def _read(self, run_id: int) -> Session:
        # Readers see this store's own buffered writes.
        self._require_run(run_id)
        self.flush()
        return self._sessions()

    def run_ids(self) -> list[int]:
        """Return the ids of all runs in the database, ascending."""
        self._require_open()
        with self._sessions() as session:
            return list(session.scalars(select(RunRow.id).order_by(RunRow.id)))

    def run_info(self, run_id: int) -> RunInfo:
        """Return a run's metadata (name, seed, timestamps, config, summary).

        Raises
        ------
        KeyError
            If ``run_id`` does not exist.
        """
        with self._read(run_id) as session:
            row = session.get(RunRow, run_id)
            if row is None:
                raise KeyError(f"unknown run_id {run_id}")
            return RunInfo(
                run_id=row.id,
                name=row.name,
                seed=row.seed,
                started_at=row.started_at,
                finished_at=row.finished_at,
                config=row.config,
                summary=row.summary,
                ledger_label=row.ledger_label,
            )

    def run_summary(self, run_id: int) -> dict[str, Any] | None:
        """Return the run's summary, or None if it has not finished.

        Raises
        ------
        KeyError
            If ``run_id`` does not exist.
        """
        return self.run_info(run_id).summary

    def tasks(self, run_id: int) -> list[TaskRecord]:
        """Return the run's task outcomes ordered by task id."""
        with self._read(run_id) as session:
            rows = session.scalars(
                select(TaskRow).where(TaskRow.run_id == run_id).order_by(TaskRow.task_id, TaskRow.id)
            )
            return [_to_record(TaskRecord, row) for row in rows]

    def versions(self, run_id: int) -> list[VersionRecord]:
        """Return the run's global versions ordered by version."""
        with self._read(run_id) as session:
            rows = session.scalars(select(VersionRow).where(VersionRow.run_id == run_id).order_by(VersionRow.version))
            return [_to_record(VersionRecord, row) for row in rows]

    def evaluations(self, run_id: int, split: str | None = None) -> list[EvalRecord]:
        """Return the run's evaluations ordered by version.

        Parameters
        ----------
        run_id
            Run to read.
        split
            ``"valid"`` or ``"test"`` to keep only that split; None for both.

        Returns
        -------
        list[EvalRecord]
            Ordered by version, then split, cut-off and insertion order.

        Raises
        ------
        KeyError
            If ``run_id`` does not exist.
        ValueError
            If ``split`` is not a known split.
        """
        if split is not None:
            _check_choice("split", split, EVAL_SPLITS)
        query = select(EvaluationRow).where(EvaluationRow.run_id == run_id)
        if split is not None:
            query = query.where(EvaluationRow.split == split)
        query = query.order_by(EvaluationRow.version, EvaluationRow.split, EvaluationRow.k, EvaluationRow.id)
        with self._read(run_id) as session:
            return [_to_record(EvalRecord, row) for row in session.scalars(query)]

    def privacy_records(self, run_id: int, device_id: int | None = None) -> list[PrivacyRecord]:
        """Return DP releases and refusals in recording (composition) order.

        Parameters
        ----------
        run_id
            Run to read.
        device_id
            Keep only this device's rows; None for all devices.
        """
        query = select(PrivacyRow).where(PrivacyRow.run_id == run_id)
        if device_id is not None:
            query = query.where(PrivacyRow.device_id == device_id)
        with self._read(run_id) as session:
            return [_to_record(PrivacyRecord, row) for row in session.scalars(query.order_by(PrivacyRow.id))]

    def device_epsilons(self, run_id: int) -> dict[int, float]:
        """Return each device's cumulative epsilon: its last recorded ``spent`` row.

        Refused rows are ignored (nothing was released); devices with no spent
        release are absent.

        Returns
        -------
        dict[int, float]
            ``device_id -> epsilon``, ordered by device id.
        """
        spent = PrivacyRow.status == "spent"
        latest = (
            select(func.max(PrivacyRow.id).label("row_id"))
            .where(PrivacyRow.run_id == run_id, spent)
            .group_by(PrivacyRow.device_id)
            .subquery()
        )
        query = (
            select(PrivacyRow.device_id, PrivacyRow.epsilon)
            .join(latest, PrivacyRow.id == latest.c.row_id)
            .order_by(PrivacyRow.device_id)
        )
        with self._read(run_id) as session:
            return {device: epsilon for device, epsilon in session.execute(query)}


# --------------------------------------------------------------------------- helpers


def _fields(record: object) -> dict[str, Any]:
    # Shallow on purpose: dataclasses.asdict deep-copies, which is wasted work here.
    return {name: getattr(record, name) for name in record.__dataclass_fields__}  # type: ignore[attr-defined]


_R = TypeVar("_R")


def _to_record(cls: type[_R], row: Base) -> _R:
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return cls(**{name: getattr(row, name) for name in names})
