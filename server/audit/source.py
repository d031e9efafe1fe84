"""Loads what the privacy audit reads from a run's database (or one device's ledger file).

The run database holds the server's verified ledger entries and device keys
(``server/privacy_store.py``), its per-release log, task log and the run's configuration
(``server/run_store.py``). Beside it, a simulated run's directory holds each device's own
ledger file (``devices/device-N.db``, or the config's ``device-store-dir``), read here
read-only as evidence the server did not write. The audit itself
(``server/audit/checks.py``) only sees the plain :class:`~server.audit.checks.AuditInput`
built here.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from server.audit.checks import AuditInput, RunSettings, ServerSpending, ServerTask, UserRelease
from server.privacy_store import ENTRIES_TABLE, LEGACY_ENTRIES_TABLE, PrivacyStore
from server.run_store import RunStore
from shared.config import ConfigError, FedrecConfig, parse_stored_config
from shared.privacy.evaluation import num_tiers, sensitivity
from shared.privacy.ledger import ENTRY_FIELDS, LedgerEntry
from shared.privacy.user_level import choose_order
from shared.training import opacus_sample_rate


class AuditSourceError(ValueError):
    """The given path is not something the audit can read."""


def resolve_database(path: Path) -> Path:
    """A run directory or a database file -> the database file."""
    db = path / "fedrec.db" if path.is_dir() else path
    if not db.is_file():
        raise AuditSourceError(f"{path}: no run database (expected a run directory with fedrec.db, or a .db file)")
    return db


# Tables every run database holds (a zero-byte or foreign SQLite file holds none of them).
_RUN_TABLES = ("runs", "tasks", "privacy_spending", "device_keys")


def read_only_url(db: Path, scratch: Path) -> str:
    """A SQLAlchemy URL that reads ``db`` without ever writing to it: the audit changes nothing it checks.

    A database of an earlier fedrec, which the stores upgrade when they open it, is copied
    into ``scratch`` first (SQLite's backup API, from a read-only connection), and the copy
    is read.

    Raises
    ------
    AuditSourceError
        If ``db`` is not a readable SQLite database holding a fedrec run's tables.
    """
    uri = f"{db.resolve().as_uri()}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as con:
            names = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [t for t in _RUN_TABLES if t not in names]
            if missing:
                raise AuditSourceError(f"{db}: not a fedrec run database (no table {', '.join(missing)})")
            if ENTRIES_TABLE not in names and LEGACY_ENTRIES_TABLE in names:
                copy = scratch / db.name
                with closing(sqlite3.connect(copy)) as target:
                    con.backup(target)
                return f"sqlite:///{copy}"
    except sqlite3.Error as exc:
        raise AuditSourceError(f"{db}: not a readable SQLite database ({exc})") from None
    return f"sqlite:///{uri.replace('file://', 'file:', 1)}&uri=true"


def load_run(path: Path, run_id: int | None = None) -> tuple[AuditInput, float | None]:
    """The audit input of a run (the latest in the database unless ``run_id``) and the user-level filter order.

    Raises
    ------
    AuditSourceError
        If the database is missing, corrupt, not a fedrec run's, or does not hold the run.
    """
    db = resolve_database(path)
    try:
        with tempfile.TemporaryDirectory(prefix="fedrec-audit-") as scratch:
            return _load_run(path, db, read_only_url(db, Path(scratch)), run_id)
    except SQLAlchemyError as exc:
        # A damaged file can pass the first look and fail on a page read later.
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise AuditSourceError(f"{db}: the database could not be read ({reason})") from None


def _load_run(path: Path, db: Path, url: str, run_id: int | None) -> tuple[AuditInput, float | None]:
    with RunStore(url) as runs:
        ids = runs.run_ids()
        if not ids:
            raise AuditSourceError(f"{db}: the database holds no run")
        rid = ids[-1] if run_id is None else run_id
        if rid not in ids:
            raise AuditSourceError(f"{db}: no run {rid} (runs: {ids})")
        try:
            cfg = parse_stored_config(runs.run_info(rid).config)
        except ConfigError as exc:
            raise AuditSourceError(f"{db}: run {rid} has an unreadable configuration: {exc}") from None
        spent = [r for r in runs.privacy_records(rid) if r.status == "spent"]
        info = runs.run_info(rid)
        run_label = info.ledger_label
        tasks = [ServerTask(t.task_id, t.device_id, t.status) for t in runs.tasks(rid)]
        releases: dict[int, list[UserRelease]] = {}
        for u in runs.user_releases(rid):
            releases.setdefault(u.device_id, []).append(
                UserRelease(u.version, u.weight, u.noise_multiplier, u.order, u.epsilon, u.delta)
            )
    with PrivacyStore(url) as store:
        keys = store.keys()
        ledgers: dict[int, list[LedgerEntry]] = {}
        for e in store.entries():
            ledgers.setdefault(e.device_id, []).append(e)
        rejected = store.rejections()
        rejections = len(rejected)
    # The chain a device uploads spans its whole life, earlier runs with or without user-level
    # DP included, so its expected length is counted per unit: one record-level entry per spent
    # row (the server logs one for every record entry it verified, whichever run made it), one
    # user-level entry per such row of this run when this run has user-level DP, and the user
    # entries of earlier runs as stored (their runs' settings are not known here). A deleted tail
    # of this run's entries then shows as missing.
    # Only a training release has a user-level twin: a record-level release that answers no
    # training task (a private evaluation's, task id -1; training task ids count from 0) has none.
    expected: dict[int, int] = {}
    training: dict[int, int] = {}
    for r in spent:
        expected[r.device_id] = expected.get(r.device_id, 0) + 1
        training[r.device_id] = training.get(r.device_id, 0) + (r.task_id >= 0)
    for device, rows in list(expected.items()):
        # Without a label (an older database) every entry counts as this run's.
        earlier = [e for e in ledgers.get(device, []) if run_label is not None and e.run != run_label]
        earlier_users = sum(1 for e in earlier if e.unit == "user")
        earlier_training = sum(1 for e in earlier if e.unit == "record" and e.task_id >= 0)
        this_run_training = max(training[device] - earlier_training, 0)
        expected[device] = rows + earlier_users + (this_run_training if cfg.privacy.user_dp else 0)
    p = cfg.privacy
    order = choose_order(p.user_noise_multiplier, p.user_epsilon_budget, p.delta) if p.user_dp else None
    base = path if path.is_dir() else db.parent
    device_files, device_file_keys, notes = read_device_files(_device_store_dir(cfg, base))
    data = AuditInput(
        source=f"{db} (run {rid})",
        keys=keys,
        ledgers=ledgers,
        delta=p.delta,
        record_budget=p.epsilon_budget if p.dp else None,
        user_budget=p.user_epsilon_budget if p.user_dp else None,
        expected_entries=expected if p.dp else None,
        user_releases=releases,
        rejections=rejections,
        rejected_uploads=[(r.device_id, r.task_id, r.kind, r.detail) for r in rejected],
        run_label=run_label,
        spending=[
            ServerSpending(
                r.device_id,
                r.task_id,
                r.version,
                r.epsilon,
                r.delta,
                r.noise_multiplier,
                r.sample_rate,
                r.steps,
                r.clip_norm,
                r.accountant,
            )
            for r in spent
        ],
        tasks=tasks,
        spending_covers_all_entries=len(ids) == 1,
        settings=RunSettings(
            record_dp=p.dp,
            user_dp=p.user_dp,
            delta=p.delta,
            noise_multiplier=p.noise_multiplier,
            clip_norm=p.clip_norm,
            accountant=p.accountant,
            steps=cfg.train.local_steps,
            user_noise_multiplier=p.user_noise_multiplier,
            user_clip_norm=p.user_clip_norm,
            user_order=order,
            reproducible_noise=p.reproducible_noise,
            sample_rate=opacus_sample_rate(cfg.train) if "sample-rate" in info.config else None,
            evaluation=cfg.eval.evaluation,
            eval_noise_multiplier=cfg.eval.eval_noise_multiplier,
            eval_sensitivity=sensitivity(num_tiers(cfg.eval.activity_tiers)),
        ),
        config_copies=_config_copies(info.config, info.summary, base / "summary.json" if rid == ids[-1] else None),
        device_files=device_files,
        device_file_keys=device_file_keys,
        device_files_expected=p.dp and not cfg.data.deploy_devices,
        run_finished=info.finished_at is not None,
        stale_outputs=_stale_outputs(base, info.finished_at is not None),
        notes=notes,
    )
    return data, order


def _stale_outputs(base: Path, written_by_run: bool) -> list[str]:
    """Output files in the run directory that the audited run did not write (it never finished)."""
    if written_by_run:
        return []
    names = ("summary.json", "global_model.pt", "top-k-test.csv")
    return [name for name in names if (base / name).is_file()]


def _config_copies(
    stored: Mapping[str, object], summary: Mapping[str, object] | None, summary_file: Path | None
) -> dict[str, Mapping[str, object]]:
    """The stored config and the run's other copies of it: the summary in the database and ``summary.json``.

    ``summary.json`` is only the latest run's, so it is read only when that run is audited.
    """
    copies: dict[str, Mapping[str, object]] = {"runs.config": stored}
    in_summary = None if summary is None else summary.get("config")
    if isinstance(in_summary, dict):
        copies["runs.summary"] = in_summary
    if summary_file is not None and summary_file.is_file():
        try:
            written = json.loads(summary_file.read_text())
        except (OSError, ValueError):
            written = None  # not fedrec's, or damaged: the database's copies still count
        if isinstance(written, dict) and isinstance(written.get("config"), dict):
            copies[summary_file.name] = written["config"]
    return copies


def _device_store_dir(cfg: FedrecConfig, base: Path) -> Path:
    # Where the run's simulated devices kept their stores (client/node_config.py store_path):
    # the config's directory if it named one, else devices/ in the run directory as it is
    # now (it may have been moved since the run).
    named = cfg.privacy.device_store_dir
    return Path(named).expanduser() if named else base / "devices"


def read_device_file(path: Path) -> tuple[int, list[LedgerEntry], str | None]:
    """One device ledger file, read-only: its device id, entries in storage order and stated public key.

    Opened through SQLite in read-only mode (not with
    :class:`~shared.privacy.ledger_store.DeviceLedgerStore`, which creates what is missing);
    the ledger tables are not encrypted, so no device secret is needed, and the private key
    column is never read.

    Raises
    ------
    AuditSourceError
        If the file is not a readable device ledger.
    """
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT value FROM meta WHERE key = 'device_id'").fetchone()
            identity = con.execute("SELECT public_key FROM device_identity ORDER BY id LIMIT 1").fetchone()
            con.row_factory = sqlite3.Row
            rows = con.execute(f"SELECT {', '.join(ENTRY_FIELDS)} FROM ledger_entries ORDER BY id").fetchall()
            device = int(row[0])
            entries = [LedgerEntry(**{name: r[name] for name in ENTRY_FIELDS}) for r in rows]
    except (sqlite3.Error, TypeError, ValueError) as exc:
        raise AuditSourceError(f"{path}: not a readable device ledger ({exc})") from None
    return device, entries, None if identity is None else str(identity[0])


def read_device_files(folder: Path) -> tuple[dict[int, list[LedgerEntry]], dict[int, str], list[str]]:
    """Every device ledger file in ``folder``: entries and stated public key per device, and notes.

    Each is read by :func:`read_device_file`; a file that cannot be read is named in the
    notes and skipped.
    """
    entries: dict[int, list[LedgerEntry]] = {}
    keys: dict[int, str] = {}
    notes: list[str] = []
    paths = sorted(folder.glob("device-*.db")) if folder.is_dir() else []
    unreadable = []
    for path in paths:
        try:
            device, found, key = read_device_file(path)
        except AuditSourceError:
            unreadable.append(path.name)
            continue
        entries[device] = found
        if key is not None:
            keys[device] = key
    if entries:
        notes.append(f"devices' own ledger files read from {folder}: {len(entries)}")
    else:
        notes.append(
            f"no device ledger files in {folder} (deployed devices keep their own): the server's records "
            "were checked against the entries it holds only"
        )
    if unreadable:
        notes.append(f"device ledger files that could not be read: {', '.join(unreadable)}")
    return entries, keys, notes
