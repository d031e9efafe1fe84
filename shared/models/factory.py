"""Build a configured recommender with seed-determined weights."""

from __future__ import annotations

import torch
from torch import nn

from shared.models.base import ModelSpec, Recommender
from shared.models.ncf import NCF
from shared.models.sasrec import SASRec


def build_model(cfg: ModelSpec, num_items: int, num_users: int, seed: int) -> Recommender:
    """Construct ``cfg.name`` ("ncf" | "sasrec") with weights determined by ``seed`` alone.

    Initialisation runs inside ``torch.random.fork_rng`` with the CPU generator
    seeded to ``seed``: the same seed gives an identical ``state_dict`` and the
    caller's global RNG state is left untouched (no hidden global state).

    Parameters
    ----------
    cfg
        A ``shared.config.ModelConfig`` or anything with its fields (:class:`ModelSpec`).
    num_items
        Catalogue size V.
    num_users
        Rows of NCF's personal user table (1 on a device); ignored by SASRec.
    seed
        Initialisation seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name == "ncf":
            return NCF.from_config(cfg, num_items, num_users)
        if cfg.name == "sasrec":
            return SASRec.from_config(cfg, num_items)
    raise ValueError(f"unknown model {cfg.name!r}; expected 'ncf' or 'sasrec'")


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())
