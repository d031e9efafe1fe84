"""A run never deletes or overwrites what it did not create (issue 15, point 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.output_dir import MANIFEST, OutputDirError, claim_output_dir
from shared.config import ConfigError, parse_config
from simulations.runner import simulate


def _overrides(tmp: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "dataset": "synthetic",
        "synthetic-users": 6,
        "synthetic-items": 40,
        "synthetic-interactions": 20,
        "cache-dir": str(tmp / "cache"),
        "embedding-dim": 4,
        "mlp-layers": "4",
        "local-steps": 2,
        "batch-size": 4,
        "concurrency": 3,
        "buffer-size": 2,
        "num-versions": 2,
        "eval-every": 2,
        "eval-devices": 3,
        "output-dir": str(out),
        "epsilon-budget": 30.0,
        **extra,
    }


def _foreign(out: Path) -> dict[Path, str]:
    """A directory a user made: a database of their own, notes in devices/ and a picture in plots/."""
    files = {
        out / "fedrec.db": "someone else's database",
        out / "devices" / "precious.txt": "keep me",
        out / "plots" / "mine.png": "my plot",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def test_a_run_refuses_a_directory_that_holds_foreign_files_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = _foreign(out)
    with pytest.raises(OutputDirError, match="not empty"):
        simulate(_overrides(tmp_path, out), backend="local")
    # --overwrite does not make foreign files fedrec's: without a fedrec manifest nothing goes.
    with pytest.raises(OutputDirError, match=f"no {MANIFEST}"):
        simulate(_overrides(tmp_path, out, overwrite=True), backend="local")
    assert {p: p.read_text() for p in files} == files
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "devices/precious.txt",
        "fedrec.db",
        "plots/mine.png",
    ]


def test_overwrite_replaces_the_earlier_run_and_keeps_every_file_fedrec_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = simulate(_overrides(tmp_path, out), backend="local")
    assert (out / MANIFEST).is_file() and (out / "fedrec.db").is_file()
    # A second run into the same directory is refused, the first run's files intact.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputDirError, match="--overwrite"):
        simulate(_overrides(tmp_path, out, seed=7), backend="local")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # The user adds files of their own inside the run directory, then overwrites the run.
    kept = {
        out / "notes.md": "my notes",
        out / "devices" / "precious.txt": "keep me",
        out / "plots" / "mine.png": "my plot",
    }
    for path, text in kept.items():
        path.write_text(text)
    second = simulate(_overrides(tmp_path, out, seed=7, overwrite=True), backend="local")
    assert {p: p.read_text() for p in kept} == kept
    written = json.loads((out / "summary.json").read_text())
    assert written["config"]["seed"] == 7 and second["config"]["seed"] == 7 != first["config"]["seed"]
    # The old run's rows are gone: the database holds one run.
    import sqlite3

    with sqlite3.connect(out / "fedrec.db") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 1


def test_output_dir_that_is_a_file_or_empty_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0")
    with pytest.raises(OutputDirError, match="not a directory"):
        claim_output_dir(target, overwrite=True)
    assert target.read_text() == "root:x:0:0"
    with pytest.raises(ConfigError, match="output-dir"):
        parse_config({"output-dir": ""})
    with pytest.raises(ConfigError, match="overwrite"):
        parse_config({"overwrite": "maybe"})


def test_overwrite_follows_no_link_out_of_the_run_directory(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    claim_output_dir(out, overwrite=False)
    elsewhere.mkdir()
    (elsewhere / "summary.json").write_text("not the run's")
    (out / "summary.json").symlink_to(elsewhere / "summary.json")
    (out / "devices").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "device-1.db").write_text("not the run's either")
    claim_output_dir(out, overwrite=True)
    assert (elsewhere / "summary.json").read_text() == "not the run's"
    assert (elsewhere / "device-1.db").read_text() == "not the run's either"


def test_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = _foreign(out)
    done = subprocess.run(
        [sys.executable, "-m", "shared.entrypoint", "simulate", "--backend", "local", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [errors[0]] and "not empty" in errors[0] and "--overwrite" in errors[0]
    assert {p: p.read_text() for p in files} == files
    assert not (out / MANIFEST).exists()
