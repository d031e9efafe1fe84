"""Building blocks NCF and SASRec share: weight initialisers and the sampled-softmax loss.

Both models draw their initial weights through :func:`init_linear` and
:func:`init_embedding`, so one scheme name (``"xavier"`` or ``"normal"``) means
the same thing in each; both train with :func:`sampled_softmax_nll` over uniform
negatives and average it with :func:`batch_mean`, whose empty-batch behaviour
Opacus needs (``docs/models.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["batch_mean", "init_embedding", "init_linear", "sampled_softmax_nll"]

# Logit given to a sampled negative that happens to equal the positive ("accidental
# hit"): it would otherwise push the positive's own score down. Finite rather than
# -inf so an all-masked row can never produce NaN.
_MASKED_LOGIT = -1e9


def init_linear(layer: nn.Linear, scheme: str) -> None:
    """Initialise a linear layer in place: Xavier-uniform or N(0, 0.01) weights, zero bias.

    Parameters
    ----------
    layer
        The layer; its weight is redrawn from the global torch generator.
    scheme
        ``"xavier"`` (Xavier-uniform) or anything else for N(0, 0.01).
    """
    if scheme == "xavier":
        nn.init.xavier_uniform_(layer.weight)
    else:
        nn.init.normal_(layer.weight, std=0.01)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_embedding(table: nn.Embedding, scheme: str) -> None:
    """Initialise an embedding table in place.

    ``"xavier"`` draws N(0, 1/D): the scale of a Xavier layer with fan-in D, but
    independent of the number of rows, so a device's one-row user table and a
    centralized trainer's all-users table are initialised alike. ``"normal"`` is
    NCF's N(0, 0.01). A ``padding_idx`` row is reset to zero.

    Parameters
    ----------
    table
        The table; its weight is redrawn from the global torch generator.
    scheme
        ``"xavier"`` or anything else for N(0, 0.01).
    """
    std = 1.0 / math.sqrt(table.embedding_dim) if scheme == "xavier" else 0.01
    nn.init.normal_(table.weight, std=std)
    if table.padding_idx is not None:
        with torch.no_grad():
            table.weight[table.padding_idx].zero_()


def sampled_softmax_nll(logits: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of candidate 0 (the positive) against the sampled negatives.

    Parameters
    ----------
    logits
        ``... x (1 + K)`` scores; column 0 is the positive.
    hits
        ``... x K`` bool, True where a negative equals the positive (masked out).

    Returns
    -------
    torch.Tensor
        ``...`` negative log-likelihood of the positive.
    """
    mask = torch.cat([torch.zeros_like(hits[..., :1]), hits], dim=-1)
    logits = logits.masked_fill(mask, _MASKED_LOGIT)
    return -F.log_softmax(logits, dim=-1)[..., 0]


def batch_mean(per_record: torch.Tensor) -> torch.Tensor:
    """Mean of a ``B`` vector of per-record losses, B possibly 0.

    ``sum / max(B, 1)`` equals the mean for B >= 1 and, for an empty Poisson
    batch, is an exact 0 that is still connected to every parameter, so
    ``backward`` runs and Opacus takes its noise-only step (``mean()`` would be NaN).

    Parameters
    ----------
    per_record
        ``B`` losses, one per record.

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    return per_record.sum() / max(per_record.shape[0], 1)
