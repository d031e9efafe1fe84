"""Loads what the privacy audit reads from a run's database (or one device's ledger file).

The run database holds the server's verified ledger entries and device keys
(``server/privacy_store.py``), its per-release log and the run's configuration
(``server/run_store.py``). The audit itself (``server/audit/checks.py``)
only sees the plain :class:`~server.audit.checks.AuditInput` built here.
"""

from __future__ import annotations

from pathlib import Path

from server.audit.checks import AuditInput, UserRelease
from server.privacy_store import PrivacyStore
from server.run_store import RunStore
from shared.config import ConfigError, parse_config
from shared.privacy.ledger import LedgerEntry
from shared.privacy.user_level import choose_order


class AuditSourceError(ValueError):
    """The given path is not something the audit can read."""


def resolve_database(path: Path) -> Path:
    """A run directory or a database file -> the database file."""
    db = path / "fedrec.db" if path.is_dir() else path
    if not db.is_file():
        raise AuditSourceError(f"{path}: no run database (expected a run directory with fedrec.db, or a .db file)")
    return db


def load_run(path: Path, run_id: int | None = None) -> tuple[AuditInput, float | None]:
    """The audit input of a run (the latest in the database unless ``run_id``) and the user-level filter order."""
    db = resolve_database(path)
    url = f"sqlite:///{db}"
    with RunStore(url) as runs:
        ids = runs.run_ids()
        if not ids:
            raise AuditSourceError(f"{db}: the database holds no run")
        rid = ids[-1] if run_id is None else run_id
        if rid not in ids:
            raise AuditSourceError(f"{db}: no run {rid} (runs: {ids})")
        try:
            cfg = parse_config(runs.run_info(rid).config)
        except ConfigError as exc:
            raise AuditSourceError(f"{db}: run {rid} has an unreadable configuration: {exc}") from None
        spent = [r for r in runs.privacy_records(rid) if r.status == "spent"]
        run_label = runs.run_info(rid).ledger_label
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
    expected: dict[int, int] = {}
    for r in spent:
        expected[r.device_id] = expected.get(r.device_id, 0) + 1
    for device, rows in list(expected.items()):
        # Without a label (an older database) every entry counts as this run's.
        earlier = [e for e in ledgers.get(device, []) if run_label is not None and e.run != run_label]
        earlier_users = sum(1 for e in earlier if e.unit == "user")
        this_run_rows = max(rows - (len(earlier) - earlier_users), 0)
        expected[device] = rows + earlier_users + (this_run_rows if cfg.privacy.user_dp else 0)
    p = cfg.privacy
    order = choose_order(p.user_noise_multiplier, p.user_epsilon_budget, p.delta) if p.user_dp else None
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
    )
    return data, order
