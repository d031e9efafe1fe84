"""Quality on one split and one model: centralized, federated, federated + DP, popularity.

Prints a table and the two acceptance ratios; asserts nothing. All runs share
the data split, model code and seed. Federated runs use the in-process backend
(``--backend ray`` gives the same numbers, more slowly).

    python benchmarks/quality.py [--set key=value ...] [--nodp-set key=value ...] [--dp-set ...] [--json out.json]

``--set`` applies to every run (data, model, seed); ``--nodp-set`` / ``--dp-set`` only
to the federated run without / with DP (their training settings are tuned apart:
noise changes which server optimizer and learning rates work).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import dump, machine

from shared.config import parse_config, parse_set_pairs
from shared.data.partition import item_popularity, load_device, prepare_partitions
from shared.metrics import popularity_baseline
from simulations.centralized import train_centralized
from simulations.runner import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--nodp-set", action="append", metavar="KEY=VALUE", help="federated run without DP only")
    parser.add_argument("--dp-set", action="append", metavar="KEY=VALUE", help="federated run with DP only")
    parser.add_argument("--epochs", type=int, default=15, help="centralized epochs (best on validation is kept)")
    parser.add_argument("--backend", default="local", choices=("local", "ray"))
    parser.add_argument("--out", default="runs/bench-quality", help="output directory root")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    common = parse_set_pairs(args.set)
    cfg = parse_config(common)
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}

    info = prepare_partitions(cfg.data)
    devices = [load_device(info.path, i) for i in range(info.num_devices)]
    rows["popularity"] = popularity_baseline(item_popularity(info), devices, k=cfg.eval.top_k, seed=cfg.seed)

    t = time.monotonic()
    central = train_centralized(cfg, epochs=args.epochs)
    rows["centralized (no DP)"] = central["test"]
    seconds["centralized (no DP)"] = time.monotonic() - t

    runs = {
        "federated (no DP)": {**parse_set_pairs(args.nodp_set), "dp": False},
        f"federated + DP (eps <= {cfg.privacy.epsilon_budget:g})": {**parse_set_pairs(args.dp_set), "dp": True},
    }
    eps_max = 0.0
    for name, extra in runs.items():
        t = time.monotonic()
        out = f"{args.out}/{'dp' if extra['dp'] else 'nodp'}"
        summary = simulate({**common, **extra, "output-dir": out}, backend=args.backend)
        seconds[name] = time.monotonic() - t
        rows[name] = {k: summary["final"][k] for k in ("hr@10", "ndcg@10", "sampled-hr@10", "sampled-ndcg@10")}
        if summary["privacy"]["dp"]:
            eps_max = summary["privacy"]["epsilon-max"]

    print(f"\nquality on {info.source}; model {cfg.model.name}; seed {cfg.seed}; {machine()}")
    print(f"{'run':34s} {'HR@10':>8s} {'NDCG@10':>8s} {'s-HR@10':>8s} {'s-NDCG':>8s} {'seconds':>8s}")
    for name, m in rows.items():
        print(
            f"{name:34s} {m['hr@10']:8.4f} {m['ndcg@10']:8.4f} {m['sampled-hr@10']:8.4f} "
            f"{m['sampled-ndcg@10']:8.4f} {seconds.get(name, float('nan')):8.1f}"
        )
    fed, dp = rows["federated (no DP)"], rows[list(runs)[1]]
    ratio_fed = fed["ndcg@10"] / rows["centralized (no DP)"]["ndcg@10"]
    ratio_dp = dp["ndcg@10"] / rows["popularity"]["ndcg@10"]
    print(f"\nfederated / centralized NDCG@10 = {ratio_fed:.3f}  (target >= 0.90)")
    print(f"federated+DP / popularity NDCG@10 = {ratio_dp:.3f}  (target >= 1.50), max device eps = {eps_max:.3f}")
    print(f"overrides: all runs {common}; no-DP {runs['federated (no DP)']}; DP {runs[list(runs)[1]]}")
    dump(
        args.json,
        {
            "rows": rows,
            "seconds": seconds,
            "fed_over_central": ratio_fed,
            "dp_over_popularity": ratio_dp,
            "epsilon_max": eps_max,
            "overrides": common,
            "run_overrides": runs,
        },
    )


if __name__ == "__main__":
    main()
