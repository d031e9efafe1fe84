"""How long does an on-device top-10 take, for the MovieLens catalogue and a 100k-item one?

Times :func:`client.recommend.recommend` end to end, as ``fedrec device recommend``
runs it after loading the files: build the device's model, load the global and
personal state, score the whole catalogue, exclude the history, take the top 10 and
explain each by cosine similarity to the history. Also times the scoring step alone
(``score_all``) on the already-built model. NCF with the default sizes
(embedding-dim 64, mlp-layers 64); a random global model (latency does not depend on
the weights) and a random personal embedding; a 50-item history. The 100k-item model
is built directly, without generating a synthetic fleet's partitions.

Prints the medians; asserts nothing.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/recommend_latency.py --repeats 30 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import dump, machine

from client.recommend import recommend
from shared.config import parse_config
from shared.data.types import DeviceData
from shared.models.base import UserContext
from shared.models.factory import build_model

CATALOGUES = (("MovieLens-100K", "ml-100k", 1682), ("synthetic 100k", "synthetic", 100_000))


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    """Print the median top-10 latency per catalogue size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a phone: 1-4)")
    parser.add_argument("--history", type=int, default=50, help="items in the person's history")
    parser.add_argument("--json", type=str, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, torch threads {args.threads}, repeats {args.repeats}")
    figures: dict[str, dict[str, float]] = {}
    rng = np.random.default_rng(0)
    for label, dataset, num_items in CATALOGUES:
        cfg = parse_config({"model": "ncf", "dataset": dataset, "synthetic-items": max(num_items, 2)})
        model = build_model(cfg.model, num_items, 1, seed=0)
        params = model.global_state()
        personal = {"user_embedding.weight": torch.randn(1, cfg.model.embedding_dim)}
        items = rng.choice(num_items, size=args.history + 2, replace=False).astype(np.int64)
        data = DeviceData(0, items[:-2], int(items[-2]), int(items[-1]))
        model.load_state_dict({**params, **personal})
        model.eval()
        ctx = UserContext(0, torch.as_tensor(items))
        full = _median_ms(lambda: recommend(cfg, params, data, personal, k=10), args.repeats)  # noqa: B023
        score = _median_ms(lambda: model.score_all(ctx), args.repeats)  # noqa: B023
        figures[label] = {"num_items": num_items, "recommend_ms": full, "score_all_ms": score}
        print(
            f"{label:16s} {num_items:>7,d} items: top-10 recommend() median {full:8.1f} ms "
            f"(of which scoring the catalogue {score:7.1f} ms)"
        )
    dump(None if args.json is None else Path(args.json), {"machine": machine(), **figures})


if __name__ == "__main__":
    main()
