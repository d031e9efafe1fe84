"""How long `fedrec audit` takes on a full run (target: a 943-device run in under a minute on 2 cores).

    python benchmarks/audit_speed.py [--run runs/default] [--repeats 3]

Needs a finished run (`fedrec simulate` writes runs/default). Each repeat is a fresh
process-level audit: the RDP curves are memoised within a process, so the first repeat
is the cold figure a privacy officer sees.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import dump, machine

from server.audit.checks import _unit_curve, run_audit
from server.audit.report import write_reports
from server.audit.source import load_run


def main() -> None:
    """Time loading, auditing and writing the reports of one run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/default", help="run directory (with fedrec.db)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "fedrec.db").is_file():
        raise SystemExit(f"{run}/fedrec.db not found: run `fedrec simulate` first (or pass --run)")
    times, report = [], None
    for _ in range(args.repeats):
        _unit_curve.cache_clear()  # cold: as in a fresh `fedrec audit` process
        started = time.perf_counter()
        data, order = load_run(run)
        report = run_audit(data, user_order=order)
        write_reports(report, run / "audit-benchmark")
        times.append(time.perf_counter() - started)
    assert report is not None
    entries = sum(d.entries for d in report.devices)
    print(f"machine: {machine()}")
    print(f"run: {run}  devices: {len(report.devices)}  ledger entries: {entries}  findings: {len(report.findings)}")
    print(
        f"audit seconds (cold, {args.repeats} repeats): median {statistics.median(times):.1f}  "
        f"min {min(times):.1f}  max {max(times):.1f}  (target < 60)"
    )
    dump(
        args.json,
        {
            "machine": machine(),
            "devices": len(report.devices),
            "entries": entries,
            "seconds": times,
            "findings": len(report.findings),
        },
    )


if __name__ == "__main__":
    main()
