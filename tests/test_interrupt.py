"""Ctrl-C stops a simulation within seconds, with one line saying what was kept (issue 15, point 2).

The real command runs as a subprocess (in its own session, so the signal reaches only it);
SIGINT is sent once training is under way. It must exit with 130 within 10 s, print no
traceback, and leave a run database that ``fedrec audit`` reports as unfinished.

The same runs check the console (issue 15, last point): no line containing ``DEBUG``,
``DEPRECATED`` or ``Warning`` reaches it by default (Flower's, Ray's and Python's go to
``fedrec.log`` in the run directory).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
OVERRIDES = [
    "dataset=synthetic", "synthetic-users=60", "synthetic-items=80", "synthetic-interactions=20",
    "embedding-dim=8", "mlp-layers=8", "num-negatives=4", "local-steps=3", "batch-size=4",
    "concurrency=8", "buffer-size=2", "num-versions=100000", "eval-every=2", "eval-devices=10",
    "epsilon-budget=1000000",
]  # fmt: skip


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_sigint_stops_within_seconds_with_one_line_and_the_audit_reports_it(tmp_path: Path, backend: str) -> None:
    out = tmp_path / "run"
    argv = [str(BIN / "fedrec"), "simulate", "--backend", backend, "--output", str(out), "--actors", "2"]
    argv += [f"--set=cache-dir={tmp_path / 'cache'}", *(f"--set={o}" for o in OVERRIDES)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    log, errors = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with log.open("wb") as stdout, errors.open("wb") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, start_new_session=True)  # noqa: S603
    try:
        deadline = time.monotonic() + 300
        # Under way: at least one version applied (the progress line, on stderr).
        while "[fedrec] v " not in errors.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text() + errors.read_text()
            assert time.monotonic() < deadline, "the run never got under way"
            time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 10 s after Ctrl-C")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = errors.read_text(errors="replace")
    print(f"{backend}: exit {code} {took:.1f} s after SIGINT")
    assert code == 130, err
    assert "Traceback" not in err and "Traceback" not in log.read_text(errors="replace"), err
    lines = [line for line in err.splitlines() if line.startswith("fedrec:")]
    assert len(lines) == 1 and "interrupted" in lines[0] and str(out / "fedrec.db") in lines[0], err
    assert not (out / "summary.json").exists()
    console = log.read_text(errors="replace") + err
    noisy = [line for line in console.splitlines() if any(w in line for w in ("DEBUG", "DEPRECATED", "Warning"))]
    assert noisy == [], noisy[:5]
    logged = (out / "fedrec.log").read_text(errors="replace")
    assert " DEBUG " in logged  # the library records are kept in the file
    if backend == "ray":
        assert "DEBUG flwr" in logged and "DEPRECATED" in logged  # kept, just not on the console

    from shared.entrypoint import main

    assert main(["audit", str(out)]) == 1
    report = json.loads((out / "audit" / "audit.json").read_text())
    assert [f["kind"] for f in report["findings"]].count("unfinished-run") == 1
