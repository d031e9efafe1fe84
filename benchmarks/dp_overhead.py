"""How much slower is an Opacus DP-SGD step than a plain SGD step for fedrec's models?

For NCF and SASRec at two catalogue sizes it times one optimizer step (forward,
backward, step) of: plain SGD, Opacus hooks mode (materialised per-sample
gradients; the item table's is a dense B x V x D tensor), and Opacus ghost
clipping (per-sample norms only). Runs are interleaved (one step of each variant
per repeat) so that load on a shared machine hits all variants alike, and the
median is reported. Batches are fixed-size (no Poisson sampling) so every
variant does the same work; negatives are drawn per step as in training.

Prints figures only; asserts nothing.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/dp_overhead.py --repeats 15 --batch-size 32 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch.utils.data import DataLoader, TensorDataset

from shared.config import ModelConfig
from shared.models import NCF, SASRec, build_model, count_parameters

MODES = ("plain", "hooks", "ghost")


def make_records(model: NCF | SASRec, batch_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Exactly ``batch_size`` records from one synthetic user's history."""
    rng = np.random.default_rng(seed)
    if isinstance(model, NCF):
        history = rng.integers(0, model.num_items, size=batch_size)
    else:
        # Each record consumes max_seq_len + 1 interactions (non-overlapping chunks).
        history = rng.integers(0, model.num_items, size=batch_size * (model.max_seq_len + 1))
    records = model.build_records(history, 0)
    assert records[0].shape[0] == batch_size
    return records


def make_step(mode: str, base: NCF | SASRec, records: tuple[torch.Tensor, ...], seed: int) -> Callable[[], None] | str:
    """A closure running one optimizer step in ``mode``, or a reason string if the mode fails."""
    model = copy.deepcopy(base)
    model.train()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = tuple(records)
    negatives = torch.Generator().manual_seed(seed)
    if mode == "plain":

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model.loss(batch, negatives).backward()
            optimizer.step()

        return step

    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(*records), batch_size=len(records[0]))
    try:
        out = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,  # fixed batch size: same work as the plain step
            grad_sample_mode=mode,
            noise_generator=torch.Generator().manual_seed(seed),
        )
    except Exception as exc:  # report it, do not abort the table
        return f"{type(exc).__name__}: {exc}"
    private, dp_optimizer = out[0], out[1]

    def dp_step() -> None:
        dp_optimizer.zero_grad(set_to_none=True)
        if mode == "ghost":
            # Ghost clipping needs per-record losses: it backpropagates twice
            # (norms, then the clipped re-weighted sum).
            per_record = model.loss_per_record(batch, model.sample_negatives(len(batch[0]), negatives))
            DPTensorFastGradientClipping(private, dp_optimizer, per_record).backward()
        else:
            model.loss(batch, negatives).backward()
        dp_optimizer.step()

    try:
        dp_step()  # probe once so an unsupported mode is reported, not raised mid-table
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return dp_step


@dataclass(frozen=True)
class BenchResult:
    """Median seconds per step by mode, and why any mode could not run."""

    params: int
    medians: dict[str, float]
    failures: dict[str, str]

    def seconds(self, mode: str) -> str:
        return f"{self.medians[mode]:9.4f}" if mode in self.medians else f"{'n/a':>9}"

    def ratio(self, mode: str) -> str:
        if mode not in self.medians:
            return f"{'n/a':>8}"
        return f"{self.medians[mode] / self.medians['plain']:7.1f}x"


def bench_one(cfg: ModelConfig, num_items: int, batch_size: int, repeats: int) -> BenchResult:
    """Median seconds per step for each mode, interleaved over ``repeats`` rounds."""
    base = build_model(cfg, num_items, 1, seed=0)
    assert isinstance(base, NCF | SASRec)
    records = make_records(base, batch_size, seed=1)
    steps: dict[str, Callable[[], None]] = {}
    failures: dict[str, str] = {}
    for mode in MODES:
        made = make_step(mode, base, records, seed=2)
        if isinstance(made, str):
            failures[mode] = made
        else:
            steps[mode] = made
            made()  # warm-up (allocator, first-call overheads)
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(repeats):
        for mode, step in steps.items():
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    return BenchResult(count_parameters(base), medians, failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant (median taken)")
    parser.add_argument("--batch-size", type=int, default=32, help="records per step")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--items", type=int, nargs="+", default=[1682, 20_000], help="catalogue sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    warnings.filterwarnings("ignore", message=".*backward hook.*")

    configs = [ModelConfig(name="ncf"), ModelConfig(name="sasrec")]
    print(
        f"torch {torch.__version__}, threads={args.threads}, batch={args.batch_size}, "
        f"repeats={args.repeats} (median s/step; interleaved)"
    )
    columns = ["model   ", "  items", "    params"] + [f"{m + ' s':>9}" for m in MODES] + ["hooks/x ", "ghost/x "]
    header = " ".join(columns)
    print(header)
    print("-" * len(header))
    notes: list[str] = []
    for cfg in configs:
        for num_items in args.items:
            res = bench_one(cfg, num_items, args.batch_size, args.repeats)
            cells = [f"{cfg.name:<8}", f"{num_items:>7}", f"{res.params:>10,}"]
            cells += [res.seconds(mode) for mode in MODES] + [res.ratio("hooks"), res.ratio("ghost")]
            print(" ".join(cells))
            notes += [f"{cfg.name} {num_items} {mode}: {why[:200]}" for mode, why in res.failures.items()]
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
