"""Simulated time for asynchronous (FedBuff) and synchronous (FedAvg) training to reach a target NDCG@10.

Both modes run on the same fleet profile (same seed: same device speeds,
availability and drop-outs), the same model and the same number of client
updates; time is the scheduler's virtual clock, so the figures do not depend on
this machine's load. The target defaults to 95% of the lower of the two runs'
best validation NDCG@10, so that both reach it.

    python benchmarks/async_vs_sync.py [--set key=value ...] [--target 0.03]
    python benchmarks/async_vs_sync.py --secure      # both through the secure noisy sum

With ``--secure`` both runs use fedrec's secure aggregation with distributed noise and are
not capped by ``--updates``: each runs its configured versions or until the fleet's privacy
budgets end it, so both spend the same per-device budget and the comparison is time to the
target on that budget.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import dump, machine

from server.run_store import RunStore
from shared.config import parse_config, parse_set_pairs
from simulations.runner import simulate


def _curve(out_dir: str) -> list[tuple[float, float]]:
    store = RunStore(f"sqlite:///{out_dir}/fedrec.db")
    try:
        run_id = store.run_ids()[-1]
        return [(e.sim_time, e.ndcg) for e in store.evaluations(run_id, split="valid")]
    finally:
        store.close()


def _time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, v in curve if v >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for both runs")
    parser.add_argument("--target", type=float, help="target validation NDCG@10 (default: see above)")
    parser.add_argument("--updates", type=int, default=1500, help="client updates per run")
    parser.add_argument("--backend", default="local", choices=("local", "ray"))
    parser.add_argument(
        "--secure", action="store_true", help="secure async against secure sync (runs end on the budget, not --updates)"
    )
    parser.add_argument("--out", default="runs/bench-async-vs-sync")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    common: dict[str, object] = {"eval-every": 2, "eval-devices": 300}
    if args.secure:
        common["secure-aggregation"] = True
    common.update(parse_set_pairs(args.set))
    cfg = parse_config(common)
    cohort = cfg.aggregation.concurrency
    modes: dict[str, dict[str, object]] = {
        "async": {"mode": "async", "num-versions": args.updates // cfg.aggregation.buffer_size},
        "sync": {
            "mode": "sync",
            "num-versions": args.updates // cohort,
            "eval-every": max(1, cfg.eval.eval_every * cfg.aggregation.buffer_size // cohort),
        },
    }
    if args.secure:
        for extra in modes.values():
            extra.pop("num-versions")
    curves, summaries = {}, {}
    for mode, extra in modes.items():
        out = f"{args.out}/{mode}"
        summaries[mode] = simulate({**common, **extra, "output-dir": out}, backend=args.backend)
        curves[mode] = _curve(out)
    best = {m: max(v for _, v in c) for m, c in curves.items()}
    target = args.target if args.target is not None else 0.95 * min(best.values())
    reach = {m: _time_to(c, target) for m, c in curves.items()}
    print(
        f"\nasync vs sync on {cfg.data.dataset}, {summaries['async']['devices']} devices, "
        f"concurrency {cohort}, buffer {cfg.aggregation.buffer_size}, DP {'on' if cfg.privacy.dp else 'off'}, "
        f"{'secure noisy sum' if cfg.aggregation.secure_aggregation else 'plain updates'}; "
        f"{machine()}"
    )
    print(f"target validation NDCG@10 = {target:.4f}")
    for mode in modes:
        s = summaries[mode]
        r = reach[mode]
        print(
            f"{mode:6s} best NDCG@10 {best[mode]:.4f}  reached target at "
            f"{'never' if r is None else f'{r:,.0f} simulated s'}  "
            f"(run: {s['time']['simulated-seconds']:,.0f} simulated s, {s['time']['wall-seconds']:.0f} wall s, "
            f"{s['aggregation']['updates-applied']} updates, "
            f"staleness mean {s['aggregation']['staleness-mean']:.2f})"
        )
    speedup = None
    if reach["async"] and reach["sync"]:
        speedup = reach["sync"] / reach["async"]
        print(f"speed-up (sync time / async time to target) = {speedup:.2f}x  (goal >= 3x; FedBuff paper: 3.3x)")
    try:
        from server.plots import plot_comparison

        plot_comparison(curves, Path(args.out) / "async_vs_sync.png", "validation NDCG@10", target)
    except Exception as exc:  # noqa: BLE001 - a plot is a convenience
        print(f"(plot not written: {exc})")
    dump(args.json, {"target": target, "best": best, "reach": reach, "speedup": speedup, "overrides": common})


if __name__ == "__main__":
    main()
