"""How much a split rewards popularity, co-occurrence and order: non-private, count-based ceilings.

Prints test HR@10 / NDCG@10 (full ranking, the same protocol and exclusions as fedrec's
evaluation) of recommenders that need no training, computed centrally from every
device's training items. None of them is private; they show what kind of signal the
leave-one-out-by-time split holds, so a researcher can see which model family a
private model would have to approximate to beat popularity by a given factor:

* ``popularity``: training interactions per item (the baseline of benchmarks/quality.py);
* ``markov L``: the user's last L items vote for the items that followed them in any
  user's sequence (first-order transition counts, recency weights 0.8^age);
* ``item-knn L``: cosine similarity of item co-occurrence vectors, summed over the
  user's last L items (L = all: the whole history);
* ``popularity + N(0, s^2)``: popularity counts with Gaussian noise (mean of 3 draws), the scale of
  noise a differentially private count or a DP-trained item bias would have to stay under;
* ``item bias of RUN`` (``--model runs/RUN/global_model.pt``): a trained model's item bias alone;
* ``markov L=5 + N(0, s^2)`` (``--transition-noise``): the Markov scorer on transition and popularity
  counts that both carry Gaussian noise of std ``s`` per cell, the popularity weight picked on the
  validation item. Two rows place the noise of one DP release of those counts at ``--epsilon``:
  ``central`` (one noise draw on the fleet's sum: a trusted aggregator or secure aggregation) and
  ``local`` (each device adds its own noise, as record-level DP on an untrusted server requires).

    python benchmarks/split_signal.py [--set key=value ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import dump

from shared.config import parse_config, parse_set_pairs
from shared.data.partition import item_popularity, load_device, prepare_partitions
from shared.data.types import DeviceData
from shared.metrics import MetricTotals, full_ranking, sampled_ranking

# Added to every score so that ties (items no recent item points to) fall back to popularity.
_POPULARITY_TIEBREAK = 1e-3


def evaluate(devices: list[DeviceData], scores_of: Callable[[np.ndarray], np.ndarray], k: int) -> dict[str, float]:
    """Test metrics of a scorer that sees only a user's history (training items + validation item)."""
    totals = MetricTotals(k=k)
    rng = np.random.default_rng(0)
    for d in devices:
        history = np.append(d.train_items, d.valid_item)
        scores = scores_of(history)
        full = full_ranking(scores, d.test_item, history, k)
        totals.add(full, sampled_ranking(scores, d.test_item, history, rng, 100, k))
    return totals.as_dict()


def validate(devices: list[DeviceData], scores_of: Callable[[np.ndarray], np.ndarray], k: int) -> float:
    """Validation NDCG@k of a scorer that sees the training items only (for picking a weight)."""
    totals = MetricTotals(k=k)
    rng = np.random.default_rng(0)
    for d in devices:
        scores = scores_of(d.train_items)
        totals.add(full_ranking(scores, d.valid_item, d.train_items, k),
                   sampled_ranking(scores, d.valid_item, d.train_items, rng, 100, k))  # fmt: skip
    return float(totals.as_dict()[f"ndcg@{k}"])


# Candidate weights of the popularity counts next to the transition votes (picked on validation);
# inf ranks by the noisy popularity alone, the better choice once the transitions drown in noise.
_POPULARITY_WEIGHTS = (1e-3, 0.02, 0.05, 0.1, 1.0, math.inf)


def markov(transitions: np.ndarray, pop: np.ndarray, weight: float) -> Callable[[np.ndarray], np.ndarray]:
    """The user's last 5 items vote (weights 0.8^age) for their successors, plus weighted popularity."""

    if math.isinf(weight):
        return _fixed(pop)

    def scores(history: np.ndarray) -> np.ndarray:
        last = history[-5:]
        weights = 0.8 ** np.arange(len(last))[::-1]
        return (weights[:, None] * transitions[last]).sum(axis=0) + weight * pop

    return scores


def gaussian_sd(epsilon: float, delta: float) -> float:
    """Noise std of one Gaussian release of a sensitivity-1 query that is (epsilon, delta)-DP (PLD, tight)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    def eps(sd: float) -> float:
        return float(pld.from_gaussian_mechanism(sd, value_discretization_interval=1e-4).get_epsilon_for_delta(delta))

    lo, hi = 0.05, 50.0
    for _ in range(40):  # bisection: epsilon falls as the noise grows
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= epsilon else (mid, hi)
    return hi


def _fixed(scores: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A scorer that gives every user the same scores."""
    return lambda history: scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (data keys)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--count-noise",
        type=float,
        nargs="*",
        default=[60.0, 120.0],
        help="also rank by popularity plus Gaussian noise of these std devs (in interactions)",
    )
    parser.add_argument(
        "--transition-noise",
        type=float,
        nargs="*",
        default=[],
        help="also rank by the Markov scorer with Gaussian noise of these std devs on every count",
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        default=8.0,
        help="with --transition-noise: the per-device budget of the central/local release rows",
    )
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="also rank by the item bias of this saved global_model.pt (repeatable)",
    )
    args = parser.parse_args()
    cfg = parse_config(parse_set_pairs(args.set))
    info = prepare_partitions(cfg.data)
    devices = [load_device(info.path, i) for i in range(info.num_devices)]
    n_items, k = info.num_items, cfg.eval.top_k
    pop = item_popularity(info).astype(np.float64)

    transitions = np.zeros((n_items, n_items))
    presence = np.zeros((len(devices), n_items))
    for row, d in enumerate(devices):
        np.add.at(transitions, (d.train_items[:-1], d.train_items[1:]), 1.0)
        presence[row, d.train_items] = 1.0
    co = presence.T @ presence
    norm = np.sqrt(np.diag(co)) + 1e-12
    cosine = co / norm[:, None] / norm[None, :]
    np.fill_diagonal(cosine, 0.0)

    def recent(matrix: np.ndarray, length: int | None, decay: float) -> Callable[[np.ndarray], np.ndarray]:
        def scores(history: np.ndarray) -> np.ndarray:
            last = history if length is None else history[-length:]
            weights = decay ** np.arange(len(last))[::-1]
            return (weights[:, None] * matrix[last]).sum(axis=0) + _POPULARITY_TIEBREAK * pop

        return scores

    rows: dict[str, dict[str, float]] = {"popularity": evaluate(devices, lambda h: pop, k)}
    for length in (1, 3, 5, 10):
        rows[f"markov L={length}"] = evaluate(devices, recent(transitions, length, 0.8), k)
    for window in (5, 20, None):
        rows[f"item-knn L={window or 'all'}"] = evaluate(devices, recent(cosine, window, 1.0), k)

    # How much count noise popularity tolerates: the scale a DP count (or a DP-trained item bias) must beat.
    for sd in args.count_noise:
        draws = [pop + np.random.default_rng(seed).normal(0.0, sd, pop.shape) for seed in range(3)]
        runs = [evaluate(devices, _fixed(scores), k) for scores in draws]
        rows[f"popularity + N(0,{sd:g}^2)"] = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
    if args.transition_noise:
        # One record joins at most two consecutive pairs and its item's count; removing it also joins its
        # neighbours (items in a history are distinct): L2 sensitivity sqrt(3 + 1) = 2.
        sd_unit = gaussian_sd(args.epsilon, cfg.privacy.delta)
        levels = [(f"{s:g}", s) for s in args.transition_noise] + [
            (f"central eps={args.epsilon:g}: {2 * sd_unit:.2f}", 2 * sd_unit),
            (f"local eps={args.epsilon:g}: {2 * sd_unit * np.sqrt(len(devices)):.1f}",
             2 * sd_unit * np.sqrt(len(devices))),
        ]  # fmt: skip
        for label, sd in levels:
            rng = np.random.default_rng(1)
            noisy_t = transitions + rng.normal(0.0, sd, transitions.shape)
            noisy_pop = pop + rng.normal(0.0, sd, pop.shape)
            weight = max(_POPULARITY_WEIGHTS, key=lambda w: validate(devices, markov(noisy_t, noisy_pop, w), k))
            name = f"markov L=5 + N(0,s^2), s={label}" + (" (popularity alone)" if math.isinf(weight) else "")
            rows[name] = evaluate(devices, markov(noisy_t, noisy_pop, weight), k)
    if args.model:
        import torch  # only to read saved models
    for path in args.model:
        # Rank by a saved global model's item bias alone: how much of popularity it recovered.
        bias = torch.load(path, map_location="cpu", weights_only=True)["params"]["item_bias.weight"]
        rows[f"item bias of {path.parent.name}"] = evaluate(devices, _fixed(bias.flatten().double().numpy()), k)

    base = rows["popularity"]["ndcg@10"]
    print(f"non-private ceilings on {info.source} (test item, full ranking over unseen items)")
    width = max(26, *map(len, rows))
    print(f"{'scorer':{width}s} {'HR@10':>8s} {'NDCG@10':>8s} {'x popularity':>13s}")
    for name, m in rows.items():
        print(f"{name:{width}s} {m['hr@10']:8.4f} {m['ndcg@10']:8.4f} {m['ndcg@10'] / base:13.2f}")
    dump(args.json, {"rows": rows, "source": info.source})


if __name__ == "__main__":
    main()
