"""The centralized, non-private reference: the same model code trained on pooled data.

It is what federated training is compared against (benchmarks/quality.py). The
model holds every user's embedding (``num_users`` rows) instead of one per device;
everything else (records, loss, scoring, metrics) is shared with the devices.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from shared.config import FedrecConfig
from shared.data.partition import load_device, prepare_partitions
from shared.data.types import DeviceData
from shared.metrics import full_ranking, sampled_ranking
from shared.models.base import Recommender, UserContext
from shared.models.factory import build_model
from shared.seeding import EVAL_SAMPLING, device_seed
from shared.training import make_optimizer


def evaluate_model(
    model: Recommender,
    devices: list[DeviceData],
    split: str,
    k: int = 10,
    sampled_negatives: int = 100,
    seed: int = 0,
    user_index_of_device: bool = True,
) -> dict[str, float]:
    """Mean HR@k / NDCG@k (full ranking and sampled) of ``model`` over ``devices``."""
    model.eval()
    sums = np.zeros(4)
    with torch.no_grad():
        for dev in devices:
            history = dev.train_items if split == "valid" else np.append(dev.train_items, dev.valid_item)
            target = dev.valid_item if split == "valid" else dev.test_item
            ctx = UserContext(dev.device_id if user_index_of_device else 0, torch.as_tensor(history, dtype=torch.long))
            scores = model.score_all(ctx).double().numpy()
            full = full_ranking(scores, target, history, k=k)
            # Same per-device negatives as on-device evaluation, so the figures compare.
            rng = np.random.default_rng(device_seed(seed, dev.device_id, EVAL_SAMPLING))
            samp = sampled_ranking(scores, target, history, rng, num_negatives=sampled_negatives, k=k)
            sums += (full.hit, full.ndcg, samp.hit, samp.ndcg)
    mean = sums / max(1, len(devices))
    return {"hr@10": mean[0], "ndcg@10": mean[1], "sampled-hr@10": mean[2], "sampled-ndcg@10": mean[3]}


def train_centralized(
    cfg: FedrecConfig,
    epochs: int = 20,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    optimizer: str = "adam",
) -> dict[str, Any]:
    """Train on all users' training records pooled; keep the epoch with the best validation NDCG@10.

    Returns validation and test metrics of the best epoch and the training time.
    """
    info = prepare_partitions(cfg.data)
    devices = [load_device(info.path, i) for i in range(info.num_devices)]
    # The user table is indexed by position in the partition.
    devices = [replace(d, device_id=i) for i, d in enumerate(devices)]
    model = build_model(cfg.model, info.num_items, info.num_devices, seed=cfg.seed)
    parts = [model.build_records(d.train_items, d.device_id) for d in devices]
    records = tuple(torch.cat([p[j] for p in parts]) for j in range(len(parts[0])))
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(*records), batch_size=batch_size, shuffle=True, generator=gen)
    train_cfg = replace(cfg.train, optimizer=optimizer, learning_rate=learning_rate)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], train_cfg)
    neg_gen = torch.Generator().manual_seed(cfg.seed + 1)
    best: dict[str, Any] = {"valid": {"ndcg@10": -1.0}}
    best_state = None
    started = time.monotonic()
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            model.loss(tuple(batch), neg_gen).backward()
            opt.step()
        valid = evaluate_model(model, devices, "valid", cfg.eval.top_k, cfg.eval.sampled_negatives, cfg.seed)
        if valid["ndcg@10"] > best["valid"]["ndcg@10"]:
            best = {"epoch": epoch, "valid": valid}
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    best["test"] = evaluate_model(model, devices, "test", cfg.eval.top_k, cfg.eval.sampled_negatives, cfg.seed)
    best["seconds"] = time.monotonic() - started
    best["epochs"] = epochs
    return best
