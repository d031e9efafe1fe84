"""Writes a run's output directory: summary.json, top-k export and plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.plots import plot_accuracy_vs_time, plot_epsilon_distribution
from server.run_store import EvalRecord


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (sorted keys, so two runs diff cleanly)."""
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return path


def export_top_k(out_dir: Path, tops: Mapping[int, list[int]], fmt: str, split: str) -> Path | None:
    """Every evaluated user's top-k list, one row per (device, rank, item)."""
    if fmt == "none" or not tops:
        return None
    rows = [(device, rank + 1, item) for device, items in sorted(tops.items()) for rank, item in enumerate(items)]
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:  # optional dependency
            raise RuntimeError("export-top-k = 'parquet' needs pyarrow (pip install pyarrow)") from exc
        path = out_dir / f"top-k-{split}.parquet"
        table = pa.table(
            {"device_id": [r[0] for r in rows], "rank": [r[1] for r in rows], "item_id": [r[2] for r in rows]}
        )
        pq.write_table(table, path)
        return path
    path = out_dir / f"top-k-{split}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["device_id", "rank", "item_id"])
        writer.writerows(rows)
    return path


def write_plots(
    out_dir: Path, evals: list[EvalRecord], epsilons: list[float], budget: float | None, delta: float
) -> list[Path]:
    """Accuracy against simulated time, and the per-device epsilon distribution."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    return [
        plot_accuracy_vs_time(
            [e for e in evals if e.split == "valid"], plots / "accuracy_vs_time.png", title="validation, on-device"
        ),
        plot_epsilon_distribution(epsilons, plots / "epsilon_distribution.png", budget, delta),
    ]
