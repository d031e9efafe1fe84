"""What a run reports: its progress lines, its summary, and its output directory.

The summary (``summary.json``, also kept in the run database) is assembled here from
the scheduler, the spending book and the completions' counts; the output directory
holds it, the final global model, the top-k export and the plots.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.plots import plot_accuracy_vs_time, plot_epsilon_distribution
from server.run_store import EvalRecord
from server.scheduler import DeviceStatus, Scheduler
from server.spending import SpendingBook
from shared.config import FedrecConfig, to_flat


def print_progress(rec: EvalRecord, cfg: FedrecConfig, accepted: int, epsilon_max: float) -> None:
    """One line on stderr per validation round: version, time, updates, accuracy, worst epsilon."""
    print(
        f"[fedrec] v{rec.version:>4}/{cfg.aggregation.num_versions}  sim {rec.sim_time:8.0f}s  "
        f"wall {rec.wall_time:6.0f}s  updates {accepted:>5}  "
        f"valid NDCG@{rec.k} {rec.ndcg:.4f}  HR@{rec.k} {rec.hr:.4f} ({rec.mode})  eps max {epsilon_max:.2f}",
        file=sys.stderr,
        flush=True,
    )


EXACT_LABEL = "exact (simulation only, not private)"
NOMINAL_LABEL = "nominal epsilon: noise reproducible from the config"


def evaluation_label(cfg: FedrecConfig) -> str:
    """How the run's metrics were obtained, as the summary, the console and the audit say it."""
    if cfg.eval.evaluation == "exact":
        return EXACT_LABEL
    return f"private (noisy sums, eval-noise-multiplier {cfg.eval.eval_noise_multiplier:g}, charged to each ledger)"


def guarantee_label(cfg: FedrecConfig) -> str:
    """Whether the run's epsilon is a guarantee, nominal, or absent."""
    if not cfg.privacy.dp:
        return "none: DP off"
    if cfg.privacy.reproducible_noise:
        return NOMINAL_LABEL
    return "formal: noise from the OS CSPRNG"


def print_done(summary: Mapping[str, Any], out_dir: Path) -> None:
    """The run's last lines on stdout: test accuracy, how it was measured, and the worst device epsilon."""
    f, p = summary["final"], summary["privacy"]
    tiers = f.get("by-activity", {}).get("tiers", [])
    gap = ""
    if len(tiers) > 1:
        low, high = tiers[0].get("ndcg@k"), tiers[-1].get("ndcg@k")
        if low is not None and high is not None:
            gap = f"  NDCG@10 bottom tier {low:.4f} / top tier {high:.4f}"
    print(
        f"[fedrec] done: test HR@10 {f['hr@10']:.4f}  NDCG@10 {f['ndcg@10']:.4f}  "
        f"(sampled-100: HR@10 {f['sampled-hr@10']:.4f}  NDCG@10 {f['sampled-ndcg@10']:.4f}){gap}  "
        f"[{f['evaluation']}]",
        flush=True,
    )
    part = summary.get("participation", {})
    print(
        f"[fedrec] max device epsilon {p['epsilon-max']:.3f} at delta {p['delta']:g} [{p['guarantee']}]; "
        f"{part.get('devices-contributing', 0)} of {summary['devices']} devices contributed an update  "
        f"-> {out_dir}/summary.json",
        flush=True,
    )


def save_global_model(out_dir: Path, version: int, params: Mapping[str, torch.Tensor]) -> Path:
    """``global_model.pt``: the final global parameters and their version."""
    path = out_dir / "global_model.pt"
    torch.save({"version": version, "params": params}, path)
    return path


def run_outputs(database: Path, global_model: Path, top_k: Path | None, plots: Sequence[Path]) -> dict[str, Any]:
    """The summary's ``outputs`` section: where each output of the run was written."""
    return {
        "database": str(database),
        "global-model": str(global_model),
        "top-k": str(top_k) if top_k else None,
        "plots": [str(p) for p in plots],
    }


def _user_level_summary(scheduler: Scheduler, spending: SpendingBook) -> dict[str, Any]:
    mech = scheduler.user_level
    if mech is None:
        return {"enabled": False}
    eps = sorted(spending.device_user_epsilon.values())
    return {
        "enabled": True,
        "unit": "user (a device's whole history), server-side Gaussian noise per buffer",
        "epsilon-max": eps[-1] if eps else 0.0,
        "epsilon-median": statistics.median(eps) if eps else 0.0,
        "delta": mech.delta,
        "epsilon-budget": mech.budget,
        "noise-multiplier": mech.noise_multiplier,
        "clip-norm": mech.clip,
        "renyi-order": mech.order,
        "devices-contributing": len(eps),
        "devices-stopped-by-filter": sum(s is DeviceStatus.USER_EXHAUSTED for s in scheduler.status),
    }


def run_summary(
    cfg: FedrecConfig,
    final: EvalRecord,
    scheduler: Scheduler,
    spending: SpendingBook,
    status_counts: Mapping[str, int],
    *,
    contributors: int,
    num_devices: int,
    wall_seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's headline figures (written to summary.json); ``extra`` adds top-level entries."""
    eps = sorted(spending.device_epsilon.values())
    staleness = scheduler.applied_staleness
    counts = status_counts
    return {
        "final": {
            "split": final.split,
            "users": final.users,
            "k": final.k,
            "hr@10": final.hr,
            "ndcg@10": final.ndcg,
            "sampled-hr@10": final.sampled_hr,
            "sampled-ndcg@10": final.sampled_ndcg,
            "coverage@10": final.coverage,
            "evaluation": evaluation_label(cfg),
            "by-activity": {
                "bounds": list(cfg.eval.activity_tiers),
                "basis": "training interactions on the device; tier i holds devices reaching i of the bounds",
                "tiers": json.loads(final.tiers),
            },
        },
        "participation": {
            "devices-contributing": contributors,
            "share": contributors / num_devices if num_devices else 0.0,
        },
        "privacy": {
            "dp": cfg.privacy.dp,
            "unit": "record (one interaction / training record on a device)",
            "adjacency": "add or remove one training record of one device (docs/privacy.md)",
            "guarantee": guarantee_label(cfg),
            "epsilon-max": eps[-1] if eps else 0.0,
            "epsilon-median": statistics.median(eps) if eps else 0.0,
            "delta": cfg.privacy.delta,
            "epsilon-budget": cfg.privacy.epsilon_budget,
            "devices-with-spending": len(eps),
            "devices-exhausted": counts.get("refused", 0),
            # Devices whose last releases may be missing here: they never answered the final
            # ledger query (their own ledgers hold the truth).
            "devices-unreconciled": len(spending.unreconciled),
            "accountant": cfg.privacy.accountant,
            "user-level": _user_level_summary(scheduler, spending),
        },
        "aggregation": {
            "mode": cfg.aggregation.mode,
            "versions": scheduler.version,
            "updates-applied": counts.get("accepted", 0),
            "updates-rejected-stale": counts.get("rejected-stale", 0),
            "tasks-failed": counts.get("failed", 0),
            "updates-rejected-ledger": counts.get("rejected-ledger", 0),
            "updates-withheld": counts.get("withheld", 0),
            "tasks-dropped": counts.get("dropped", 0),
            "tasks-timed-out": counts.get("timeout", 0),
            "tasks-refused": counts.get("refused", 0),
            "tasks-late": counts.get("late", 0),
            "devices-retired": sum(s is DeviceStatus.RETIRED for s in scheduler.status),
            "staleness-mean": float(np.mean(staleness)) if staleness else 0.0,
            "staleness-max": int(max(staleness)) if staleness else 0,
        },
        "time": {"simulated-seconds": scheduler.now, "wall-seconds": wall_seconds},
        "seed": cfg.seed,
        "devices": num_devices,
        "config": to_flat(cfg),
        **(dict(extra) if extra else {}),
    }


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (sorted keys, so two runs diff cleanly)."""
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return path


@dataclass(frozen=True)
class Catalogue:
    """How the data set itself names devices' users and items (for exports), where it can."""

    users: np.ndarray | None = None  # device index -> the data set's user id
    items: np.ndarray | None = None  # dense item id -> the data set's item id
    titles: Sequence[str] | None = None  # dense item id -> title

    def row(self, device: int, item: int) -> list[object]:
        user = int(self.users[device]) if self.users is not None else ""
        original = int(self.items[item]) if self.items is not None else ""
        title = self.titles[item] if self.titles is not None else ""
        return [user, original, title]


def export_top_k(
    out_dir: Path, tops: Mapping[int, list[int]], fmt: str, split: str, catalogue: Catalogue | None = None
) -> Path | None:
    """Every evaluated user's top-k list, one row per (device, rank, item).

    Columns: ``device_id``, ``rank``, ``item_id`` (fedrec's dense ids), then with a
    ``catalogue`` the data set's own ``user``, ``item`` and the item's ``title`` (empty
    where the data set has none).
    """
    if fmt == "none" or not tops:
        return None
    rows: list[list[object]] = [
        [device, rank + 1, item, *(catalogue.row(device, item) if catalogue is not None else [])]
        for device, items in sorted(tops.items())
        for rank, item in enumerate(items)
    ]
    header = ["device_id", "rank", "item_id", *(["user", "item", "title"] if catalogue is not None else [])]
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:  # optional dependency
            raise RuntimeError("export-top-k = 'parquet' needs pyarrow (pip install pyarrow)") from exc
        path = out_dir / f"top-k-{split}.parquet"
        table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(header)})
        pq.write_table(table, path)
        return path
    path = out_dir / f"top-k-{split}.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
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
