"""The one recommender contract every fedrec model implements, and the settings it is built from.

Training code, the device runtime and evaluation only ever call these methods,
so they never special-case a model (RecBole's contract: loss, score, full sort).
``docs/models.md`` describes the contract and the two models behind it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from shared.models.layers import batch_mean

__all__ = ["ModelSpec", "Recommender", "UserContext"]


class ModelSpec(Protocol):
    """The fields of ``shared.config.ModelConfig`` the models read.

    A structural type, so the models need not import the config module and tests
    can pass their own small frozen dataclass.
    """

    @property
    def name(self) -> str: ...
    @property
    def embedding_dim(self) -> int: ...
    @property
    def mlp_layers(self) -> tuple[int, ...]: ...
    @property
    def num_negatives(self) -> int: ...
    @property
    def max_seq_len(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def dropout(self) -> float: ...
    @property
    def init(self) -> str: ...


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
    """Base class: a torch module with the calls of the recommender contract."""

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

        :meth:`loss` is the mean of ``loss_per_record(batch, sample_negatives(B, g))``
        (0 when B == 0); a model that overrides :meth:`loss` must keep that.
        """

    @abc.abstractmethod
    def build_records(self, history: np.ndarray, user_index: int) -> tuple[torch.Tensor, ...]:
        """Turn one user's time-ordered training items into DP records.

        Returns tensors whose first dimension N is the number of records. A
        record is the unit record-level DP protects; every interaction must
        belong to exactly one record so that changing one interaction changes
        one record.
        """

    def loss_with_negatives(self, batch: tuple[torch.Tensor, ...], negatives: torch.Tensor) -> torch.Tensor:
        """Mean over records of :meth:`loss_per_record` (scalar; a connected 0 when B == 0).

        Parameters
        ----------
        batch
            Records as from :meth:`build_records` (first dim B, possibly 0).
        negatives
            The negatives :meth:`loss_per_record` takes, first dim B.

        Returns
        -------
        torch.Tensor
            A scalar (see :func:`~shared.models.layers.batch_mean`).
        """
        return batch_mean(self.loss_per_record(batch, negatives))

    def loss(self, batch: tuple[torch.Tensor, ...], generator: torch.Generator) -> torch.Tensor:
        """Mean loss over a batch of records (first dim B, possibly 0).

        Negative items are drawn inside with ``generator``, uniformly from the
        whole catalogue, so that each record's loss depends on that record only.

        Parameters
        ----------
        batch
            Records as from :meth:`build_records`.
        generator
            Source of the negatives (:meth:`sample_negatives`).

        Returns
        -------
        torch.Tensor
            A scalar.
        """
        return self.loss_with_negatives(batch, self.sample_negatives(batch[0].shape[0], generator))

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
