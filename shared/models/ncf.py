"""NeuMF-style neural collaborative filtering, shaped for per-sample gradients.

The user table is the only personal parameter: on a device it has one row (the
device's own user, index 0) and never leaves the device; a centralized trainer
builds the same class with one row per user. Everything else (item table, item
bias, MLP tower, output layer) is global.

Opacus constraints this module is written around (``docs/models.md``):

* every parameter is used only inside its own module's ``forward`` (a bare
  ``weight`` in a matmul is silently missing from per-sample gradients);
* each module is called exactly once per training forward: positives and sampled
  negatives go through the item table in one call, which ghost clipping needs
  (it rejects a module used twice) and which keeps the dense per-sample
  embedding gradient to a single (B x V x D) allocation;
* index tensors are contiguous and 2-D (ghost's embedding norm sampler views
  them, and Expanded Weights rejects 1-D index tensors).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from shared.models.base import ModelSpec, Recommender, UserContext
from shared.models.layers import init_embedding, init_linear, sampled_softmax_nll

# Items scored per chunk in ``score_all``: bounds the (chunk x (2D + H)) MLP input
# so 100k-item catalogues score without a catalogue-sized activation per layer.
_SCORE_CHUNK = 8192


class NCF(Recommender):
    """NeuMF: a GMF branch ``u * e_i`` and an MLP tower over ``[u, e_i]``, fused by one linear layer.

    ``score(u, i) = w . [u * e_i, MLP([u, e_i])] + b + item_bias[i]``. With empty
    ``mlp_layers`` the MLP branch is dropped (pure GMF plus item bias).

    Parameters
    ----------
    num_items
        Catalogue size V; item ids are ``0 .. V-1``.
    num_users
        Rows of the personal user table (1 on a device, all users centrally).
    embedding_dim
        D, shared by user and item vectors.
    mlp_layers
        Hidden widths of the ReLU tower over the ``2D`` concatenation.
    num_negatives
        K uniform negatives per positive in the sampled softmax.
    init
        ``"xavier"`` or ``"normal"`` (see :func:`~shared.models.layers.init_linear`,
        :func:`~shared.models.layers.init_embedding`).
    """

    # The item table is called once per forward (positives and negatives together), the
    # one condition ghost clipping has; per-record gradients of a V x D table are not.
    ghost_clipping = True

    def __init__(
        self,
        num_items: int,
        num_users: int,
        embedding_dim: int,
        mlp_layers: tuple[int, ...] = (),
        num_negatives: int = 32,
        init: str = "xavier",
        user_init: str = "zero",
    ) -> None:
        super().__init__()
        if user_init not in ("zero", "random"):
            raise ValueError(f"unknown user_init {user_init!r}")
        self.user_init = user_init
        if num_items < 2 or num_users < 1:
            raise ValueError(f"need num_items >= 2 and num_users >= 1, got {num_items}, {num_users}")
        self.num_items = num_items
        self.num_users = num_users
        self.num_negatives = num_negatives
        d = embedding_dim
        self.user_embedding = nn.Embedding(num_users, d)
        self.item_embedding = nn.Embedding(num_items, d)
        self.item_bias = nn.Embedding(num_items, 1)
        tower: list[nn.Module] = []
        width = 2 * d
        for hidden in mlp_layers:
            tower += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.mlp = nn.Sequential(*tower)
        self.has_mlp = bool(mlp_layers)
        self.output = nn.Linear(d + (width if self.has_mlp else 0), 1)
        self.reset_parameters(init)

    @classmethod
    def from_config(cls, cfg: ModelSpec, num_items: int, num_users: int) -> NCF:
        """Build from a ``shared.config.ModelConfig`` (or any :class:`~shared.models.base.ModelSpec`)."""
        return cls(
            num_items=num_items,
            num_users=num_users,
            embedding_dim=cfg.embedding_dim,
            mlp_layers=tuple(cfg.mlp_layers),
            num_negatives=cfg.num_negatives,
            init=cfg.init,
            user_init=getattr(cfg, "user_init", "zero"),
        )

    def reset_parameters(self, init: str) -> None:
        """(Re)initialise every parameter with the given scheme; item biases start at zero."""
        if init not in ("xavier", "normal"):
            raise ValueError(f"unknown init {init!r}")
        if self.user_init == "zero":
            # A user starts at the origin: its first gradient step points it at the
            # (weighted) centroid of its own items, in the items' current coordinates.
            # Random starting points of rarely-trained personal vectors instead pull the
            # shared item table in unrelated directions on every device.
            nn.init.zeros_(self.user_embedding.weight)
        else:
            init_embedding(self.user_embedding, init)
        init_embedding(self.item_embedding, init)
        nn.init.zeros_(self.item_bias.weight)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                init_linear(module, init)
        init_linear(self.output, init)

    def local_parameter_names(self) -> frozenset[str]:
        """The user table is personal: it is trained on the device and never uploaded."""
        return frozenset({"user_embedding.weight"})

    # ------------------------------------------------------------------ records

    def build_records(self, history: np.ndarray, user_index: int) -> tuple[torch.Tensor, ...]:
        """One record per training interaction.

        Parameters
        ----------
        history
            ``H`` time-ordered item ids of one user.
        user_index
            The user's row in this model's user table (0 on a device).

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor]
            ``users`` (N,) int64, all ``user_index``; ``items`` (N x 1) int64, N = H.
        """
        items = torch.as_tensor(np.asarray(history, dtype=np.int64)).reshape(-1, 1).contiguous()
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise ValueError(f"item ids must lie in [0, {self.num_items})")
        if not 0 <= user_index < self.num_users:
            raise ValueError(f"user_index {user_index} outside [0, {self.num_users})")
        users = torch.full((items.shape[0],), user_index, dtype=torch.long)
        return users, items

    # --------------------------------------------------------------------- core

    def _logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of candidate items for each row's user.

        Parameters
        ----------
        users
            ``B`` user rows.
        items
            ``B x C`` candidate item ids (contiguous).

        Returns
        -------
        torch.Tensor
            ``B x C`` scores.
        """
        # (B x 1) index rather than (B,): Expanded Weights and ghost clipping need
        # an index tensor with a batch dimension plus at least one more.
        u = self.user_embedding(users.reshape(-1, 1).contiguous())  # B x 1 x D
        e = self.item_embedding(items)  # B x C x D
        bias = self.item_bias(items).squeeze(-1)  # B x C
        u = u.expand_as(e)
        parts = [u * e]  # GMF branch
        if self.has_mlp:
            parts.append(self.mlp(torch.cat([u, e], dim=-1)))  # B x C x H
        return self.output(torch.cat(parts, dim=-1)).squeeze(-1) + bias

    def sample_negatives(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``B x K`` item ids drawn uniformly from the whole catalogue.

        Uniform sampling uses no data, so each record's loss depends on that
        record alone (what record-level DP-SGD assumes).
        """
        return torch.randint(0, self.num_items, (batch_size, self.num_negatives), generator=generator, dtype=torch.long)

    def loss_per_record(self, batch: tuple[torch.Tensor, ...], negatives: torch.Tensor) -> torch.Tensor:
        """Sampled-softmax loss of each record with given negatives.

        Parameters
        ----------
        batch
            ``users`` (B,) and ``items`` (B x 1), as from :meth:`build_records`.
        negatives
            ``B x K`` item ids.

        Returns
        -------
        torch.Tensor
            ``B``: ``-log softmax([pos, negs])[pos]`` per record (what ghost
            clipping's ``DPTensorFastGradientClipping`` takes).
        """
        users, items = batch[0], batch[1]
        b = users.shape[0]
        pos = items.reshape(b, 1)
        negatives = negatives.reshape(b, negatives.shape[-1])  # explicit K: -1 is ambiguous when B == 0
        candidates = torch.cat([pos, negatives], dim=1).contiguous()  # B x (1 + K)
        logits = self._logits(users, candidates)
        return sampled_softmax_nll(logits, negatives == pos)

    # ------------------------------------------------------------------ scoring

    def _user_row(self, ctx: UserContext) -> torch.Tensor:
        return torch.tensor([ctx.user_index], dtype=torch.long)

    @torch.no_grad()
    def score(self, ctx: UserContext, items: torch.Tensor) -> torch.Tensor:
        """Scores (n,) of items (n,) for ``ctx.user_index``."""
        items = items.reshape(1, -1).to(torch.long).contiguous()
        return self._logits(self._user_row(ctx), items).reshape(-1)

    @torch.no_grad()
    def score_all(self, ctx: UserContext) -> torch.Tensor:
        """Scores (V,) of every item, computed in chunks of items to bound memory."""
        user = self._user_row(ctx)
        chunks = [
            self._logits(user, torch.arange(start, min(start + _SCORE_CHUNK, self.num_items)).unsqueeze(0))
            for start in range(0, self.num_items, _SCORE_CHUNK)
        ]
        return torch.cat(chunks, dim=1).reshape(-1)
