"""`fedrec audit` on a real run: clean runs pass; every kind of tampering is named, located and fails."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from server.audit.independent import TOLERANCE
from shared.entrypoint import main
from shared.privacy.ledger import compute_hash
from shared.privacy.ledger_store import DeviceLedgerStore
from simulations.runner import simulate

BUDGET = 30.0
USER_BUDGET = 20.0


def _overrides(out: Path) -> dict[str, Any]:
    return {
        "dataset": "synthetic",
        "synthetic-users": 8,
        "synthetic-items": 80,
        "synthetic-interactions": 30,
        "cache-dir": str(out.parent / "cache"),
        "embedding-dim": 8,
        "mlp-layers": "8",
        "num-negatives": 4,
        "local-steps": 3,
        "batch-size": 4,
        "concurrency": 4,
        "buffer-size": 2,
        "num-versions": 8,
        "eval-every": 4,
        "eval-devices": 4,
        "output-dir": str(out),
        "epsilon-budget": BUDGET,
        "user-dp": True,
        "user-noise-multiplier": 2.0,
        "user-epsilon-budget": USER_BUDGET,
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "run"
    simulate(_overrides(out), backend="local")
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    shutil.rmtree(dst / "audit", ignore_errors=True)
    return dst


def _audit(*args: str) -> tuple[int, dict[str, Any]]:
    code = main(["audit", *args])
    out = Path(args[args.index("--output") + 1]) if "--output" in args else Path(args[0]) / "audit"
    return code, json.loads((out / "audit.json").read_text())


def _rows(db: Path, device: int) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    query = "SELECT * FROM accepted_ledger_entries WHERE device_id = ? ORDER BY id"
    rows = [dict(r) for r in con.execute(query, (device,))]
    con.close()
    return rows


def _busiest_device(db: Path) -> int:
    con = sqlite3.connect(db)
    device, count = con.execute(
        "SELECT device_id, COUNT(*) AS n FROM accepted_ledger_entries "
        "GROUP BY device_id ORDER BY n DESC, device_id LIMIT 1"
    ).fetchone()
    con.close()
    assert count >= 4, "the fixture run must give some device at least four ledger entries"
    return int(device)


def _execute(db: Path, sql: str, *params: Any) -> None:
    con = sqlite3.connect(db)
    con.execute(sql, params)
    con.commit()
    con.close()


def _kinds(report: dict[str, Any]) -> set[tuple[str, int, int | None]]:
    return {(f["kind"], f["device_id"], f["seq"]) for f in report["findings"]}


def test_a_clean_run_passes_and_every_claim_recomputes_within_tolerance(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    code, report = _audit(str(run))
    assert code == 0, report["findings"]
    assert report["ok"] and not report["findings"]
    assert (run / "audit" / "audit.md").read_text().startswith("# fedrec privacy audit")
    assert (run / "audit" / "audit_epsilon_over_time.png").stat().st_size > 1000
    fleet = report["fleet"]
    assert fleet["devices"] == 8
    assert 0 < fleet["record"]["epsilon-max"] <= BUDGET
    assert 0 < fleet["user"]["epsilon-max"] <= USER_BUDGET
    for d in report["devices"]:
        if d["record_releases"]:
            assert abs(d["record_claimed"] - d["record_recomputed"]) <= TOLERANCE * d["record_recomputed"]
        if d["user_releases"]:
            assert abs(d["user_claimed"] - d["user_recomputed"]) <= TOLERANCE * d["user_recomputed"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["epsilon-max"] == pytest.approx(fleet["record"]["epsilon-max"], rel=TOLERANCE)


def test_a_run_database_of_an_earlier_fedrec_is_upgraded_and_audits_the_same(run_dir: Path, tmp_path: Path) -> None:
    """Earlier fedrec kept the server's accepted entries in ``ledger_entries``: the audit still reads it, unchanged."""
    _, current = _audit(str(_copy(run_dir, tmp_path)))
    run = tmp_path / "earlier"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "audit", ignore_errors=True)
    db = run / "fedrec.db"
    con = sqlite3.connect(db)
    # The earlier table: the same DDL under the old name (constraint names follow the table's).
    (ddl,) = con.execute("SELECT sql FROM sqlite_master WHERE name = 'accepted_ledger_entries'").fetchone()
    with con:
        con.execute(ddl.replace("accepted_ledger_entries", "ledger_entries"))
        con.execute("INSERT INTO ledger_entries SELECT * FROM accepted_ledger_entries")
        con.execute("DROP TABLE accepted_ledger_entries")
    before = con.execute("SELECT * FROM ledger_entries ORDER BY id").fetchall()
    con.close()
    assert before

    code, report = _audit(str(run))

    assert code == 0, report["findings"]
    assert (report["findings"], report["fleet"], report["devices"]) == (
        current["findings"],
        current["fleet"],
        current["devices"],
    )
    # The audit read a copy: the earlier database is left exactly as it was (never written).
    con = sqlite3.connect(db)
    assert con.execute("SELECT * FROM ledger_entries ORDER BY id").fetchall() == before
    assert not con.execute("SELECT name FROM sqlite_master WHERE name = 'accepted_ledger_entries'").fetchall()
    con.close()


def test_an_edited_entry_is_named_and_located(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    target = _rows(db, device)[1]
    _execute(db, "UPDATE accepted_ledger_entries SET epsilon = epsilon / 2 WHERE id = ?", target["id"])
    code, report = _audit(str(run))
    assert code == 1
    assert ("edited", device, target["seq"]) in _kinds(report)


def test_a_deleted_entry_is_named_and_located(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    target = _rows(db, device)[1]
    _execute(db, "DELETE FROM accepted_ledger_entries WHERE id = ?", target["id"])
    code, report = _audit(str(run))
    assert code == 1
    deleted = [f for f in report["findings"] if f["kind"] == "deleted" and f["device_id"] == device]
    assert deleted and str(target["seq"]) in deleted[0]["detail"]


def test_deleting_the_last_entry_is_detected_from_the_release_log(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    last = _rows(db, device)[-1]
    _execute(db, "DELETE FROM accepted_ledger_entries WHERE id = ?", last["id"])
    code, report = _audit(str(run))
    assert code == 1
    assert any(f["kind"] == "deleted" and f["device_id"] == device for f in report["findings"])


def test_reordered_entries_are_named(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    a, b = _rows(db, device)[1:3]
    cols = [c for c in a if c != "id"]
    con = sqlite3.connect(db)
    # Swap the two rows' contents, keeping their ids (the storage order); seq is unique, so park one.
    con.execute("UPDATE accepted_ledger_entries SET seq = -1 WHERE id = ?", (a["id"],))
    con.execute(
        f"UPDATE accepted_ledger_entries SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
        [a[c] for c in cols] + [b["id"]],
    )
    con.execute(
        f"UPDATE accepted_ledger_entries SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
        [b[c] for c in cols] + [a["id"]],
    )
    con.commit()
    con.close()
    code, report = _audit(str(run))
    assert code == 1
    kinds = {f["kind"] for f in report["findings"] if f["device_id"] == device}
    assert kinds == {"reordered"}


def test_a_rehashed_forgery_is_named(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    row = _rows(db, device)[1]
    fields = {k: v for k, v in row.items() if k not in ("id", "entry_hash", "signature")}
    fields["epsilon"] = row["epsilon"] / 3
    # The forger recomputes the hash, but cannot sign it with the device's key.
    _execute(
        db,
        "UPDATE accepted_ledger_entries SET epsilon = ?, entry_hash = ? WHERE id = ?",
        fields["epsilon"],
        compute_hash(fields),
        row["id"],
    )
    code, report = _audit(str(run))
    assert code == 1
    assert ("forged", device, row["seq"]) in _kinds(report)


def test_an_unsigned_entry_is_named(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    row = _rows(db, device)[0]
    _execute(db, "UPDATE accepted_ledger_entries SET signature = '' WHERE id = ?", row["id"])
    code, report = _audit(str(run))
    assert code == 1
    assert ("unsigned", device, row["seq"]) in _kinds(report)


def test_entries_of_a_device_with_no_registered_key_are_flagged(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    _execute(db, "DELETE FROM device_keys WHERE device_id = ?", device)
    code, report = _audit(str(run))
    assert code == 1
    assert any(f["kind"] == "unknown-key" and f["device_id"] == device for f in report["findings"])


def test_a_wrong_server_side_user_level_claim_is_flagged(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    _execute(db, "UPDATE user_releases SET epsilon = epsilon * 0.8 WHERE id = (SELECT MAX(id) FROM user_releases)")
    code, report = _audit(str(run))
    assert code == 1
    assert any(f["kind"] == "claim-mismatch" and f["unit"] == "user" for f in report["findings"])


def test_a_signed_but_wrong_claim_in_a_device_ledger_is_flagged(run_dir: Path, tmp_path: Path) -> None:
    """A buggy or lying device signs a claim its mechanism does not support: the recomputation catches it."""
    src = sorted((run_dir / "devices").glob("device-*.db"))[0]
    path = tmp_path / "liar.db"
    with DeviceLedgerStore(src) as real:
        entries = real.entries()
    assert entries
    with DeviceLedgerStore(path, device_id=entries[0].device_id) as liar:
        key = liar.identity().public_key
        for i, e in enumerate(entries):
            fields = {
                k: getattr(e, k)
                for k in (
                    "run",
                    "version",
                    "task_id",
                    "unit",
                    "mechanism",
                    "noise_multiplier",
                    "sample_rate",
                    "steps",
                    "clip_norm",
                    "accountant",
                    "epsilon",
                    "delta",
                    "timestamp",
                )
            }
            if i == len(entries) - 1 and e.unit == "record":
                fields["epsilon"] = e.epsilon * 0.9
            liar.append(**fields)
    out = tmp_path / "liar-audit"
    code, report = _audit(
        "--ledger", str(path), "--public-key", key, "--epsilon-budget", str(BUDGET), "--output", str(out)
    )
    if entries[-1].unit == "record":
        assert code == 1
        assert [f["kind"] for f in report["findings"]] == ["claim-mismatch"]
    # The honest device's own ledger, audited with its key, passes.
    with DeviceLedgerStore(src) as real:
        honest_key = real.identity().public_key
    code, report = _audit(
        "--ledger",
        str(src),
        "--public-key",
        honest_key,
        "--epsilon-budget",
        str(BUDGET),
        "--output",
        str(tmp_path / "honest"),
    )
    assert code == 0, report["findings"]


def test_tampering_with_a_device_ledger_file_is_detected(run_dir: Path, tmp_path: Path) -> None:
    src = max((run_dir / "devices").glob("device-*.db"), key=lambda p: len(DeviceLedgerStore(p).entries()))
    with DeviceLedgerStore(src) as store:
        key = store.identity().public_key
        n = len(store.entries())
    assert n >= 3
    cases = {
        "edited": "UPDATE ledger_entries SET steps = steps + 1 WHERE seq = 1",
        "deleted": "DELETE FROM ledger_entries WHERE seq = 1",
        "unsigned": "UPDATE ledger_entries SET signature = '' WHERE seq = 1",
    }
    for kind, sql in cases.items():
        path = tmp_path / f"{kind}.db"
        shutil.copy(src, path)
        _execute(path, sql)
        code, report = _audit("--ledger", str(path), "--public-key", key, "--output", str(tmp_path / f"{kind}-out"))
        assert code == 1, kind
        assert kind in {f["kind"] for f in report["findings"]}, (kind, report["findings"])
    # Verified against a key other than the device's registered one: every entry is a forgery.
    path = tmp_path / "other-key.db"
    shutil.copy(src, path)
    with DeviceLedgerStore(tmp_path / "stranger.db", device_id=999) as stranger:
        other = stranger.identity().public_key
    code, report = _audit("--ledger", str(path), "--public-key", other, "--output", str(tmp_path / "other-out"))
    assert code == 1
    assert {f["kind"] for f in report["findings"]} == {"forged"}


def test_a_device_whose_entries_were_all_removed_is_still_flagged(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    _execute(db, "DELETE FROM accepted_ledger_entries WHERE device_id = ?", device)
    _execute(db, "DELETE FROM device_keys WHERE device_id = ?", device)
    code, report = _audit(str(run))
    assert code == 1
    assert any(f["device_id"] == device and f["kind"] in ("deleted", "unknown-key") for f in report["findings"])


def test_an_upload_rejected_at_intake_fails_the_audit(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    _execute(
        db,
        "INSERT INTO ledger_rejections (device_id, task_id, seq, kind, detail, at) "
        "VALUES (3, 17, 2, 'forged', 'signature does not verify', '2026-11-25 00:00:00')",
    )
    code, report = _audit(str(run))
    assert code == 1
    assert [f["kind"] for f in report["findings"]] == ["rejected-upload"]


def test_server_user_releases_the_device_never_signed_are_flagged(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    con = sqlite3.connect(db)
    device, released = con.execute(
        "SELECT device_id, COUNT(*) FROM user_releases GROUP BY device_id ORDER BY device_id LIMIT 1"
    ).fetchone()
    signed = con.execute(
        "SELECT COUNT(*) FROM accepted_ledger_entries WHERE device_id = ? AND unit = 'user'", (device,)
    ).fetchone()[0]
    con.close()
    assert released <= signed, "a clean run never logs more releases than the device signed"
    columns = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(user_releases)")]
    copied = ", ".join(f'"{c}"' for c in columns if c != "id")
    for _ in range(signed - released + 1):  # one release more than the device ever signed
        _execute(db, f"INSERT INTO user_releases ({copied}) SELECT {copied} FROM user_releases "
                     "WHERE device_id = ? ORDER BY id DESC LIMIT 1", device)  # fmt: skip
    code, report = _audit(str(run))
    assert code == 1
    flagged = [f for f in report["findings"] if f["kind"] == "unbacked-user-release"]
    assert [f["device_id"] for f in flagged] == [device]


def test_a_run_with_the_prv_accountant_passes_and_its_claims_are_recomputed(tmp_path: Path) -> None:
    out = tmp_path / "prv"
    overrides = {**_overrides(out), "accountant": "prv", "user-dp": False, "num-versions": 4}
    simulate(overrides, backend="local")
    code, report = _audit(str(out))
    assert code == 0, report["findings"]
    claimed = [d for d in report["devices"] if d["record_releases"]]
    assert claimed
    for d in claimed:
        assert abs(d["record_claimed"] - d["record_recomputed"]) <= max(0.01 * d["record_recomputed"], 0.02)
    # A PRV claim is tighter than RDP: the RDP recomputation alone would have flagged these.
    from server.audit.checks import independent_record_epsilon

    with DeviceLedgerStore(sorted((out / "devices").glob("device-*.db"))[0]) as ledger:
        record = [e for e in ledger.entries() if e.unit == "record"]
    assert record and record[-1].accountant == "prv"
    rdp = independent_record_epsilon([(e.noise_multiplier, e.sample_rate, e.steps) for e in record], 1e-5)
    assert rdp > record[-1].epsilon * 1.01


@pytest.mark.parametrize("earlier_user_dp", [True, False])
def test_a_ledger_spanning_runs_with_and_without_user_dp_audits_clean_and_a_deleted_tail_is_found(
    tmp_path: Path, earlier_user_dp: bool
) -> None:
    """Devices keep their stores across runs: the audited run's DB holds their lifetime chains.

    An earlier run with user-level DP logged two entries per task, a record-level-only run one
    (and the other way round). The audit must count the expected chain per unit and per run:
    no false ``deleted`` for an honest chain, and a removed tail of this run's entries found.
    """
    stores = tmp_path / "device-stores"
    first = {
        **_overrides(tmp_path / "first"),
        "user-dp": earlier_user_dp,
        "device-store-dir": str(stores),
        "num-versions": 4,
    }
    second = {
        **_overrides(tmp_path / "second"),
        "user-dp": not earlier_user_dp,
        "device-store-dir": str(stores),
        "num-versions": 2,
    }
    simulate(first, backend="local")
    simulate(second, backend="local")
    run = tmp_path / "second"
    code, report = _audit(str(run))
    assert code == 0, report["findings"]
    db = run / "fedrec.db"
    label = sqlite3.connect(db).execute("SELECT ledger_label FROM runs").fetchone()[0]
    # A device with entries from both runs; remove its last entry of this run's (a record-level one).
    rows_by_device = {d: _rows(db, d) for d in range(8)}
    device = max(
        (d for d, rows in rows_by_device.items() if {r["run"] == label for r in rows} == {True, False}),
        key=lambda d: len(rows_by_device[d]),
    )
    last_record = [r for r in rows_by_device[device] if r["run"] == label and r["unit"] == "record"][-1]
    tail = [r for r in rows_by_device[device] if r["seq"] >= last_record["seq"]]
    for r in tail:
        _execute(db, "DELETE FROM accepted_ledger_entries WHERE id = ?", r["id"])
    code, report = _audit(str(run))
    assert code == 1
    assert any(f["kind"] == "deleted" and f["device_id"] == device for f in report["findings"])
