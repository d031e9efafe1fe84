"""`fedrec audit` compares the server's own privacy records with the devices' signed evidence.

The server writes its spending log, task log and stored config itself, so they prove nothing
alone: each tampering below leaves every signed chain intact, and only the cross-check with
the signed entries (or a device's own ledger file) finds it. Each run is a real small
simulation; the tampering is done with sqlite3 on a copy of its directory.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.config import default_flat_config
from shared.entrypoint import main
from simulations.runner import simulate

REPO = Path(__file__).resolve().parents[1]
BUDGET = 30.0


def _overrides(out: Path, **changes: Any) -> dict[str, Any]:
    flat = {
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
        # Fresh noise: a clean run then earns a plain PASS (a simulation defaults to reproducible noise).
        "reproducible-noise": False,
    }
    flat.update(changes)
    return flat


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crosscheck") / "run"
    simulate(_overrides(out), backend="local")
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    shutil.rmtree(dst / "audit", ignore_errors=True)
    return dst


def _audit(run: Path) -> tuple[int, dict[str, Any]]:
    code = main(["audit", str(run)])
    return code, json.loads((run / "audit" / "audit.json").read_text())


def _execute(db: Path, sql: str, *params: Any) -> None:
    con = sqlite3.connect(db)
    with con:
        con.execute(sql, params)
    con.close()


def _query(db: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = con.execute(sql, params).fetchall()
    con.close()
    return rows


def _busiest_device(db: Path) -> int:
    (row,) = _query(
        db,
        "SELECT device_id, COUNT(*) AS n FROM privacy_spending WHERE status = 'spent' "
        "GROUP BY device_id ORDER BY n DESC, device_id LIMIT 1",
    )
    assert row["n"] >= 2, "the fixture run must give some device at least two releases"
    return int(row["device_id"])


def _found(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["kind"] == kind]


def test_an_edited_spending_epsilon_fails_the_cli_and_names_the_device(run_dir: Path, tmp_path: Path) -> None:
    """The reported reproduction: `update privacy_spending set epsilon = 0.01` used to pass."""
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    signed = {
        (r["task_id"], r["seq"])
        for r in _query(db, "SELECT task_id, seq FROM accepted_ledger_entries WHERE device_id = ?", device)
    }
    _execute(db, "UPDATE privacy_spending SET epsilon = 0.01 WHERE device_id = ? AND status = 'spent'", device)

    done = subprocess.run(
        [sys.executable, "-m", "shared.entrypoint", "audit", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 1, done.stdout + done.stderr
    assert "verdict: FAIL" in done.stdout and "spending-mismatch" in done.stdout
    report = json.loads((run / "audit" / "audit.json").read_text())
    mismatches = _found(report, "spending-mismatch")
    assert mismatches and {f["device_id"] for f in mismatches} == {device}
    assert {f["kind"] for f in report["findings"]} == {"spending-mismatch"}
    for f in mismatches:
        assert "epsilon 0.01" in f["detail"]
        # Located: the signed entry the row was a copy of.
        assert any(seq == f["seq"] and f"task {task} " in f["detail"] for task, seq in signed)


def test_deleted_spending_rows_are_named(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    deleted = _query(db, "SELECT task_id FROM privacy_spending WHERE device_id = ? AND status = 'spent'", device)
    _execute(db, "DELETE FROM privacy_spending WHERE device_id = ?", device)

    code, report = _audit(run)

    assert code == 1
    missing = _found(report, "spending-missing")
    assert {f["device_id"] for f in missing} == {device}
    assert len(missing) == len(deleted)
    assert {f["kind"] for f in report["findings"]} == {"spending-missing"}


def test_a_spending_row_no_device_signed_is_unbacked(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    columns = [r[1] for r in _query(db, "PRAGMA table_info(privacy_spending)") if r[1] != "id"]
    copied = ", ".join(columns)
    # A second copy of the device's last row: one entry, two rows.
    _execute(
        db,
        f"INSERT INTO privacy_spending ({copied}) SELECT {copied} FROM privacy_spending "
        "WHERE device_id = ? AND status = 'spent' ORDER BY id DESC LIMIT 1",
        device,
    )

    code, report = _audit(run)

    assert code == 1
    assert [f["device_id"] for f in _found(report, "spending-unbacked")] == [device]
    # The chain check, counting one entry per row, also calls the signed chain short.
    assert {f["kind"] for f in report["findings"]} <= {"spending-unbacked", "deleted"}


def test_a_last_entry_removed_with_its_spending_and_task_rows_is_found_in_the_device_file(
    run_dir: Path, tmp_path: Path
) -> None:
    """The server's records then agree with each other; the device's own ledger file does not.

    The simulated device's ledger tables are not encrypted (only its data store is), so the
    audit reads the file read-only and verifies its entries against the registered key.
    """
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    (last,) = _query(db, "SELECT * FROM accepted_ledger_entries WHERE device_id = ? ORDER BY seq DESC LIMIT 1", device)
    _execute(db, "DELETE FROM accepted_ledger_entries WHERE id = ?", last["id"])
    _execute(
        db,
        "DELETE FROM privacy_spending WHERE device_id = ? AND task_id = ? AND epsilon = ?",
        device,
        last["task_id"],
        last["epsilon"],
    )
    _execute(db, "DELETE FROM tasks WHERE device_id = ? AND task_id = ?", device, last["task_id"])
    device_file = run / "devices" / f"device-{device}.db"
    before = device_file.read_bytes()

    code, report = _audit(run)

    assert code == 1
    assert [(f["kind"], f["device_id"], f["seq"]) for f in report["findings"]] == [
        ("device-ledger-ahead", device, last["seq"])
    ]
    assert device_file.read_bytes() == before, "the audit must not write to a device's file"
    # Deleting the simulated devices' files as well hides nothing: each missing file is a finding.
    shutil.rmtree(run / "devices")
    shutil.rmtree(run / "audit")
    code, report = _audit(run)
    assert code == 1
    missing = {f["device_id"] for f in _found(report, "device-ledger-missing")}
    spenders = {int(r["device_id"]) for r in _query(db, "SELECT DISTINCT device_id FROM accepted_ledger_entries")}
    assert missing == spenders and device in missing


def test_an_interrupted_run_is_a_finding_naming_the_earlier_run_outputs(run_dir: Path, tmp_path: Path) -> None:
    """A run killed before it finished leaves finished_at NULL beside an earlier run's outputs."""
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    _execute(db, "UPDATE runs SET finished_at = NULL, summary = NULL")
    code, report = _audit(run)
    assert code == 1
    (finding,) = _found(report, "unfinished-run")
    assert "never finished" in finding["detail"] and "summary.json" in finding["detail"]


def test_a_task_the_server_recorded_accepted_without_a_signed_entry_is_unbacked(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    device = _busiest_device(db)
    columns = [r[1] for r in _query(db, "PRAGMA table_info(tasks)") if r[1] not in ("id", "task_id")]
    copied = ", ".join(columns)
    # A task the server says it accepted (so verified a ledger entry for), which no device signed.
    _execute(
        db,
        f"INSERT INTO tasks (task_id, {copied}) SELECT 9999, {copied} FROM tasks "
        "WHERE device_id = ? AND status = 'accepted' ORDER BY id DESC LIMIT 1",
        device,
    )

    code, report = _audit(run)

    assert code == 1
    unbacked = _found(report, "unbacked-task")
    assert [(f["device_id"], f["unit"]) for f in unbacked] == [(device, "record")]
    assert "task 9999" in unbacked[0]["detail"]


def _set_config(db: Path, key: str, value: Any, *, column: str = "config") -> None:
    path = "$.config" if column == "summary" else "$"
    _execute(db, f"UPDATE runs SET {column} = json_set({column}, '{path}.\"{key}\"', json(?))", json.dumps(value))


def test_a_raised_budget_in_the_stored_config_disagrees_with_the_run_summary(run_dir: Path, tmp_path: Path) -> None:
    """No signed entry states the budget: only the run's other copies of the config can contradict it."""
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    _set_config(db, "epsilon-budget", 100.0)

    code, report = _audit(run)

    assert code == 1
    inconsistent = _found(report, "config-inconsistent")
    assert {f["device_id"] for f in inconsistent} == {-1}
    assert all("epsilon-budget" in f["detail"] and "100.0" in f["detail"] for f in inconsistent)
    assert {f["kind"] for f in report["findings"]} == {"config-inconsistent"}
    assert report["budgets"]["record"] == 100.0

    # The documented limit: whoever edits every copy goes unnoticed, since no device signed the budget.
    _set_config(db, "epsilon-budget", 100.0, column="summary")
    summary = json.loads((run / "summary.json").read_text())
    summary["config"]["epsilon-budget"] = 100.0
    (run / "summary.json").write_text(json.dumps(summary))
    shutil.rmtree(run / "audit")
    code, report = _audit(run)
    assert code == 0, report["findings"]


def test_stored_mechanism_parameters_other_than_the_devices_signed_are_a_config_mismatch(
    run_dir: Path, tmp_path: Path
) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    devices = {int(r[0]) for r in _query(db, "SELECT DISTINCT device_id FROM accepted_ledger_entries")}
    # Every copy edited, so only the devices' signatures contradict it.
    for column in ("config", "summary"):
        _set_config(db, "noise-multiplier", 2.5, column=column)
    (run / "summary.json").unlink()

    code, report = _audit(run)

    assert code == 1
    mismatches = _found(report, "config-mismatch")
    assert {f["device_id"] for f in mismatches} == devices
    assert all("noise_multiplier 2.5" in f["detail"] and f["unit"] == "record" for f in mismatches)

    # DP switched off in the stored config, though the devices signed DP releases in this run.
    run = tmp_path / "dp-off"
    shutil.copytree(run_dir, run)
    _set_config(run / "fedrec.db", "dp", False)
    if "evaluation" in default_flat_config():
        _set_config(run / "fedrec.db", "evaluation", "exact")  # else the config does not parse (needs DP)
    code, report = _audit(run)
    assert code == 1
    assert {f["device_id"] for f in _found(report, "config-mismatch")} == devices
    assert any("dp = false" in f["detail"] for f in _found(report, "config-mismatch"))


def test_an_untampered_run_passes_plainly_and_a_reproducible_noise_run_passes_nominally(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(run_dir, tmp_path)
    database = (run / "fedrec.db").read_bytes()
    code, report = _audit(run)
    out = capsys.readouterr().out
    assert code == 0, report["findings"]
    assert (run / "fedrec.db").read_bytes() == database, "the audit must not write to its input"
    assert (report["verdict"], report["nominal"], report["nominal-reason"]) == ("PASS", False, None)
    assert "verdict: PASS (0 findings)" in out

    nominal = tmp_path / "nominal"
    simulate(_overrides(nominal, **{"reproducible-noise": True, "num-versions": 4}), backend="local")
    code, report = _audit(nominal)
    out = capsys.readouterr().out
    assert code == 0, report["findings"]
    assert report["ok"] and report["nominal"] is True
    assert report["verdict"] == "PASS (nominal)"
    assert report["nominal-reason"] == "nominal epsilon: noise reproducible from the config"
    assert "verdict: PASS (nominal)" in out
    assert "nominal epsilon: noise reproducible from the config" in out
    assert "**PASS (nominal)**" in (nominal / "audit" / "audit.md").read_text()


def test_a_run_with_dp_off_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "no-dp"
    changes: dict[str, Any] = {"dp": False, "num-versions": 4}
    if "evaluation" in default_flat_config():
        changes["evaluation"] = "exact"  # a private evaluation needs DP
    simulate(_overrides(out_dir, **changes), backend="local")
    code, report = _audit(out_dir)
    out = capsys.readouterr().out
    assert code == 0, report["findings"]
    assert report["verdict"] == "PASS (DP off)"
    assert report["dp"] == {"record": False, "user": False}
    assert "verdict: PASS (DP off)" in out
    assert "DP is off in this run's configuration" in out


@pytest.mark.skipif("evaluation" not in default_flat_config(), reason="no private evaluation in this fedrec")
def test_private_evaluation_releases_with_user_dp_audit_clean(tmp_path: Path) -> None:
    """A private evaluation is a record-level release with no training task and no user-level twin."""
    out_dir = tmp_path / "private-eval"
    changes = {
        "evaluation": "private",
        "export-top-k": "none",
        "user-dp": True,
        "user-noise-multiplier": 2.0,
        "user-epsilon-budget": 20.0,
        "num-versions": 4,
    }
    simulate(_overrides(out_dir, **changes), backend="local")
    db = out_dir / "fedrec.db"
    assert _query(db, "SELECT 1 FROM privacy_spending WHERE task_id < 0 AND status = 'spent'"), "no evaluation release"
    code, report = _audit(out_dir)
    assert code == 0, report["findings"]
    assert report["verdict"] == "PASS"


@pytest.mark.parametrize("damage", ["empty", "random", "truncated", "foreign"])
def test_a_corrupt_or_foreign_database_exits_2_naming_it_and_is_not_written(
    run_dir: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(run_dir, tmp_path)
    db = run / "fedrec.db"
    good = db.read_bytes()
    if damage == "empty":
        db.write_bytes(b"")
    elif damage == "random":
        db.write_bytes(bytes(range(256)) * 64)
    elif damage == "truncated":
        db.write_bytes(good[: len(good) // 3])
    else:
        db.unlink()
        con = sqlite3.connect(db)
        con.execute("create table notes (body text)")
        con.commit()
        con.close()
    before = db.read_bytes()
    code = main(["audit", str(run)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(db) in lines[0], err
    assert "Traceback" not in err
    assert db.read_bytes() == before, "the audit wrote to the database it checks"
    assert not (run / "audit" / "audit.json").exists()
