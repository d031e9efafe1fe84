"""SASRec: a causal self-attention next-item model, shaped for per-sample gradients.

Built from ``nn.Linear`` + ``nn.LayerNorm`` + ``F.scaled_dot_product_attention``
rather than ``nn.MultiheadAttention`` / ``nn.TransformerEncoder``: Opacus's
validator rejects the former, its ``DPMultiheadAttention`` replacement is wrong
with ``batch_first=True``, and the encoder's causal-mask fast path trips Opacus
(``docs/models.md``). Every parameter is used only through its module's forward.

Item ids are shifted by +1 inside the model so that 0 is padding. The item table
is tied between input and output *through the module*: the input sequence, the
targets and the sampled negatives are looked up in ONE call of ``item_embedding``
(concatenated indices), so hooks-mode per-sample gradients include both uses and
ghost clipping, which rejects a module called twice, also works.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.models.base import ModelSpec, Recommender, UserContext
from shared.models.layers import init_embedding, init_linear, sampled_softmax_nll


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head attention, then a GELU FFN.

    Parameters
    ----------
    dim
        Model width D (divisible by ``num_heads``).
    num_heads
        Attention heads.
    dropout
        Dropout on the attention output and inside the FFN.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, dim)
        self.ffn_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``B x L x D`` -> ``B x heads x L x D/heads``."""
        b, length, d = x.shape
        return x.reshape(b, length, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        x
            ``B x L x D`` hidden states.
        attn_mask
            ``B x 1 x L x L`` bool, True where query t may attend to key s
            (causal, and padded keys hidden).

        Returns
        -------
        torch.Tensor
            ``B x L x D``.
        """
        b, length, d = x.shape
        h = self.attn_norm(x)
        q, k, v = self._heads(self.query(h)), self._heads(self.key(h)), self._heads(self.value(h))
        # Functional attention has no parameters, so Opacus only sees the Linear
        # layers around it, whose per-sample gradients are exact.
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # B x heads x L x D/heads
        att = att.transpose(1, 2).reshape(b, length, d)
        x = x + self.dropout(self.attn_out(att))
        h = self.ffn_out(self.dropout(F.gelu(self.ffn_in(self.ffn_norm(x)))))
        return x + self.dropout(h)


class SASRec(Recommender):
    """Causal transformer over a user's last ``max_seq_len`` items (Kang & McAuley, 2018).

    Parameters
    ----------
    num_items
        Catalogue size V; public item ids ``0 .. V-1`` are stored shifted as ``1 .. V``.
    embedding_dim
        Model width D.
    max_seq_len
        L, the longest input sequence (and number of positions).
    num_blocks, num_heads, dropout
        Transformer shape.
    num_negatives
        K uniform negatives per target position in the sampled softmax.
    init
        ``"xavier"`` or ``"normal"``.
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int,
        max_seq_len: int,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.0,
        num_negatives: int = 32,
        init: str = "xavier",
    ) -> None:
        super().__init__()
        if num_items < 2 or max_seq_len < 1:
            raise ValueError(f"need num_items >= 2 and max_seq_len >= 1, got {num_items}, {max_seq_len}")
        self.num_items = num_items
        self.max_seq_len = max_seq_len
        self.num_negatives = num_negatives
        self.item_embedding = nn.Embedding(num_items + 1, embedding_dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_seq_len, embedding_dim)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(embedding_dim, num_heads, dropout) for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(embedding_dim)
        self.reset_parameters(init)

    @classmethod
    def from_config(cls, cfg: ModelSpec, num_items: int) -> SASRec:
        """Build from a ``shared.config.ModelConfig`` (or any :class:`~shared.models.base.ModelSpec`)."""
        return cls(
            num_items=num_items,
            embedding_dim=cfg.embedding_dim,
            max_seq_len=cfg.max_seq_len,
            num_blocks=cfg.num_blocks,
            num_heads=cfg.num_heads,
            dropout=cfg.dropout,
            num_negatives=cfg.num_negatives,
            init=cfg.init,
        )

    def reset_parameters(self, init: str) -> None:
        """(Re)initialise: embeddings and Linear weights by scheme, LayerNorms to identity."""
        if init not in ("xavier", "normal"):
            raise ValueError(f"unknown init {init!r}")
        init_embedding(self.item_embedding, init)
        init_embedding(self.position_embedding, init)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module, init)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    # ------------------------------------------------------------------ records

    def _left_pad(self, shifted: np.ndarray) -> np.ndarray:
        out = np.zeros(self.max_seq_len, dtype=np.int64)
        if len(shifted):
            out[-len(shifted) :] = shifted
        return out

    def build_records(self, history: np.ndarray, user_index: int) -> tuple[torch.Tensor, ...]:
        """Cut the history into non-overlapping next-item records.

        The history is split into consecutive chunks of ``L + 1`` items aligned
        from the most recent end (so the oldest chunk may be shorter; chunks of
        fewer than 2 items are dropped). A chunk gives ``input = chunk[:-1]`` and
        ``targets = chunk[1:]``, both shifted (+1) and left-padded with 0 to L.
        Chunks do not overlap, so every interaction lies in at most one record
        and changing one interaction changes one record (the DP unit).

        Parameters
        ----------
        history
            ``H`` time-ordered item ids of one user.
        user_index
            Unused (SASRec has no user table); part of the common contract.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor]
            ``seq`` (N x L) and ``targets`` (N x L), int64, oldest record first.
        """
        del user_index
        items = np.asarray(history, dtype=np.int64).reshape(-1)
        if items.size and (items.min() < 0 or items.max() >= self.num_items):
            raise ValueError(f"item ids must lie in [0, {self.num_items})")
        shifted = items + 1
        span = self.max_seq_len + 1
        seqs: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        for end in range(len(shifted), 1, -span):
            chunk = shifted[max(0, end - span) : end]
            if len(chunk) < 2:
                break
            seqs.append(self._left_pad(chunk[:-1]))
            targets.append(self._left_pad(chunk[1:]))
        seqs.reverse()
        targets.reverse()
        if not seqs:
            empty = torch.zeros((0, self.max_seq_len), dtype=torch.long)
            return empty, empty.clone()
        return torch.from_numpy(np.stack(seqs)), torch.from_numpy(np.stack(targets))

    # --------------------------------------------------------------------- core

    def _encode(self, seq: torch.Tensor, seq_emb: torch.Tensor) -> torch.Tensor:
        """Hidden states of a left-padded sequence.

        Parameters
        ----------
        seq
            ``B x L`` shifted item ids (0 = padding).
        seq_emb
            ``B x L x D`` their item embeddings (looked up by the caller, so the
            item table can be called once for inputs and candidates together).

        Returns
        -------
        torch.Tensor
            ``B x L x D`` final-LayerNorm hidden states; rows at padded positions
            are meaningless and must be masked by the caller.
        """
        b, length = seq.shape
        # Position ids are materialised per sample as a contiguous (B x L) tensor:
        # Opacus takes the batch size from dim 0 of a module's input, so a shared
        # (L,) or broadcast (1 x L) tensor would make it treat positions as samples
        # (a crash when L != B, silently wrong per-sample gradients when L == B).
        positions = torch.arange(length, device=seq.device).unsqueeze(0).expand(b, length).contiguous()
        x = seq_emb * math.sqrt(seq_emb.shape[-1]) + self.position_embedding(positions)
        valid = seq != 0  # B x L
        x = self.input_dropout(x) * valid.unsqueeze(-1)
        # Causal mask that also hides padded keys. Every query keeps its own key
        # (the diagonal), so a padded query never has an all-masked row (NaN);
        # with left padding, real positions then never see padding at all.
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=seq.device)
        attn_mask = (causal & (valid.unsqueeze(1) | eye)).unsqueeze(1)  # B x 1 x L x L
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.final_norm(x)

    def sample_negatives(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``B x L x K`` shifted item ids (``1 .. V``), uniform over the catalogue.

        Drawn for every position, padded ones included, so the draw does not
        depend on the data.
        """
        return torch.randint(
            1,
            self.num_items + 1,
            (batch_size, self.max_seq_len, self.num_negatives),
            generator=generator,
            dtype=torch.long,
        )

    def loss_per_record(self, batch: tuple[torch.Tensor, ...], negatives: torch.Tensor) -> torch.Tensor:
        """Sampled-softmax next-item loss of each record with given negatives.

        Parameters
        ----------
        batch
            ``seq`` (B x L) and ``targets`` (B x L), shifted ids, 0 = padding.
        negatives
            ``B x L x K`` shifted ids.

        Returns
        -------
        torch.Tensor
            ``B``: per record, the mean over its non-padded target positions of
            ``-log softmax([target, negs])[target]``.
        """
        seq, targets = batch[0], batch[1]
        b, length = seq.shape
        k = negatives.shape[-1]
        candidates = torch.cat([targets.unsqueeze(-1), negatives], dim=-1)  # B x L x (1 + K)
        # One call of the item table for inputs and candidates (see module docstring).
        ids = torch.cat([seq, candidates.reshape(b, length * (1 + k))], dim=1).contiguous()
        emb = self.item_embedding(ids)  # B x (L + L(1 + K)) x D
        seq_emb = emb[:, :length]
        cand_emb = emb[:, length:].reshape(b, length, 1 + k, emb.shape[-1])  # B x L x (1 + K) x D
        hidden = self._encode(seq, seq_emb)  # B x L x D
        logits = torch.einsum("bld,blcd->blc", hidden, cand_emb)  # B x L x (1 + K)
        nll = sampled_softmax_nll(logits, negatives == targets.unsqueeze(-1))  # B x L
        valid = (targets != 0).to(nll.dtype)
        return (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)

    # ------------------------------------------------------------------ scoring

    def _user_state(self, ctx: UserContext) -> torch.Tensor:
        """``D`` hidden state after the last ``L`` items of ``ctx.history``."""
        recent = ctx.history.reshape(-1)[-self.max_seq_len :].to(torch.long) + 1
        seq = torch.zeros(1, self.max_seq_len, dtype=torch.long)
        if recent.numel():
            seq[0, -recent.numel() :] = recent
        return self._encode(seq, self.item_embedding(seq))[0, -1]

    @torch.no_grad()
    def score(self, ctx: UserContext, items: torch.Tensor) -> torch.Tensor:
        """Scores (n,) of public item ids (n,)."""
        state = self._user_state(ctx)
        return self.item_embedding(items.reshape(-1).to(torch.long) + 1) @ state

    @torch.no_grad()
    def score_all(self, ctx: UserContext) -> torch.Tensor:
        """Scores (V,) of every item, indexed by public (unshifted) id."""
        state = self._user_state(ctx)
        # Direct use of the weight is fine here: no gradients are taken when scoring.
        return self.item_embedding.weight[1:] @ state
