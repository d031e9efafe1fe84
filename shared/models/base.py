"""The one recommender contract every fedrec model implements.

Training code, the device runtime and evaluation only ever call these methods,
so they never special-case a model (RecBole's contract: loss, score, full sort).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class UserContext:
    """What a model may use to score items for one user.

    ``user_index`` is the row of the model's own user table (always 0 on a device,
    whose model holds only its own user); ``history`` is the user's time-ordered
    training items (int64, shape (H,)).
    """

    user_index: int
    history: torch.Tensor


class Recommender(nn.Module, abc.ABC):
    """Base class: a torch module with the three calls of the recommender contract."""

    num_items: int
    # Whether Opacus ghost clipping gives this model's exact clipped gradients faster than
    # materialising per-record gradients (config clipping-mode = "auto" follows it).
    ghost_clipping: ClassVar[bool] = False

    @abc.abstractmethod
    def sample_negatives(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Negative item ids for ``batch_size`` records, drawn uniformly (no data used)."""

    @abc.abstractmethod
    def loss_per_record(self, batch: tuple[torch.Tensor, ...], negatives: torch.Tensor) -> torch.Tensor:
        """Loss of each record (shape (B,)) with the given negatives.

        ``loss(batch, g)`` must equal the mean of
        ``loss_per_record(batch, sample_negatives(B, g))`` (0 when B == 0).
        """

    @abc.abstractmethod
    def build_records(self, history: np.ndarray, user_index: int) -> tuple[torch.Tensor, ...]:
        """Turn one user's time-ordered training items into DP records.

        Returns tensors whose first dimension N is the number of records. A
        record is the unit record-level DP protects; every interaction must
        belong to exactly one record so that changing one interaction changes
        one record.
        """

    @abc.abstractmethod
    def loss(self, batch: tuple[torch.Tensor, ...], generator: torch.Generator) -> torch.Tensor:
        """Mean loss over a batch of records (first dim B, possibly 0).

        Negative items are drawn inside with ``generator``, uniformly from the
        whole catalogue, so that each record's loss depends on that record only.
        """

    @abc.abstractmethod
    def score(self, ctx: UserContext, items: torch.Tensor) -> torch.Tensor:
        """Scores (shape (n,)) of the given items (int64, shape (n,)) for one user."""

    @abc.abstractmethod
    def score_all(self, ctx: UserContext) -> torch.Tensor:
        """Scores (shape (num_items,)) of every item for one user."""

    def local_parameter_names(self) -> frozenset[str]:
        """Names (as in ``state_dict``) of personal parameters that never leave a device."""
        return frozenset()

    def global_state(self) -> dict[str, torch.Tensor]:
        """The state shared with the server: everything but personal parameters."""
        local = self.local_parameter_names()
        return {k: v for k, v in self.state_dict().items() if k not in local}
