"""On-device recommendations, explained from the person's own history.

Everything here runs on the device: the global model (public) plus the device's
personal state (its user embedding, which never leaves it) rank the whole catalogue;
items the person already has are excluded; each recommendation is explained by the
history item whose global item embedding is most similar (cosine) to the recommended
item's: "because you watched X". No history, score or explanation is sent anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import torch

from shared.config import FedrecConfig
from shared.data.types import DataError, DeviceData
from shared.metrics import top_k
from shared.models.base import ModelSpec, Recommender, UserContext
from shared.models.factory import build_model
from shared.models.ncf import NCF
from shared.models.sasrec import SASRec
from shared.seeding import MODEL_INIT, device_seed

__all__ = [
    "Because",
    "Recommendation",
    "catalogue_size",
    "item_embeddings",
    "load_titles",
    "recommend",
]

# Name of the item table in each model's state_dict, and the row of item 0 in it
# (SASRec keeps row 0 for padding and stores item i at row i + 1).
_ITEM_TABLE: Final = {"ncf": ("item_embedding.weight", 0), "sasrec": ("item_embedding.weight", 1)}


@dataclass(frozen=True)
class Because:
    """A history item that explains a recommendation, with its cosine similarity to it."""

    item_id: int
    title: str | None
    similarity: float


@dataclass(frozen=True)
class Recommendation:
    """One recommended item: rank (1 = best), model score, and why."""

    rank: int
    item_id: int
    title: str | None
    score: float
    because: tuple[Because, ...]  # most similar history items, best first; empty without item embeddings

    @property
    def explanation(self) -> str:
        """A sentence for the person: "because you watched X" (or a neutral fallback)."""
        if not self.because:
            return "recommended for you by the shared model"
        names = [b.title or f"item {b.item_id}" for b in self.because]
        return "because you watched " + " and ".join(names)


def catalogue_size(model_cfg: ModelSpec, global_params: Mapping[str, torch.Tensor]) -> int:
    """The catalogue size a global model was built for, read from its item table's shape.

    Raises
    ------
    ValueError
        If the parameters lack the item table of ``model_cfg.name``.
    """
    if model_cfg.name not in _ITEM_TABLE:
        raise ValueError(f"unknown model {model_cfg.name!r}")
    name, offset = _ITEM_TABLE[model_cfg.name]
    if name not in global_params:
        raise ValueError(
            f"the global model has no {name!r}: it was not trained with model={model_cfg.name!r} "
            f"(its parameters: {', '.join(sorted(global_params)[:6])}...)"
        )
    return int(global_params[name].shape[0]) - offset


def item_embeddings(model: Recommender) -> torch.Tensor | None:
    """The model's item embeddings, one row per public item id, or None if it has no item table."""
    if isinstance(model, NCF):
        return model.item_embedding.weight.detach()
    if isinstance(model, SASRec):
        return model.item_embedding.weight.detach()[1:]
    table = getattr(model, "item_embedding", None)
    if isinstance(table, torch.nn.Embedding) and table.weight.shape[0] == model.num_items:
        return table.weight.detach()
    return None


def _build(
    cfg: FedrecConfig,
    global_params: Mapping[str, torch.Tensor],
    personal_state: Mapping[str, torch.Tensor],
    device_id: int,
) -> Recommender:
    """The device's model: global parameters plus its own personal state (as ``Device._model``)."""
    num_items = catalogue_size(cfg.model, global_params)
    model = build_model(cfg.model, num_items, 1, seed=device_seed(cfg.seed, device_id, MODEL_INIT))
    local = model.local_parameter_names()
    leaked = set(global_params) & local
    if leaked:
        raise ValueError(f"the global model must not carry personal parameters: {sorted(leaked)}")
    missing = set(model.global_state()) - set(global_params)
    if missing:
        raise ValueError(f"the global model is missing parameters: {sorted(missing)} (model={cfg.model.name!r}?)")
    foreign = set(personal_state) - local
    if foreign:
        raise ValueError(f"personal state holds non-personal parameters: {sorted(foreign)}")
    try:
        model.load_state_dict({**global_params, **personal_state}, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"the global model does not fit the configured model ({cfg.model.name}): {exc}") from None
    model.eval()
    return model


def recommend(
    cfg: FedrecConfig,
    global_params: Mapping[str, torch.Tensor],
    data: DeviceData,
    personal_state: Mapping[str, torch.Tensor],
    k: int = 10,
    titles: Mapping[int, str] | None = None,
    *,
    explain: int = 1,
) -> list[Recommendation]:
    """Rank the whole catalogue for this device's owner and explain the top ``k``.

    Parameters
    ----------
    cfg
        The run's configuration (the model section must match the global model).
    global_params
        The global model's parameters (``state_dict`` without personal ones).
    data
        The device's interactions; all of them (train, validation and test items)
        form the history, which is excluded from the results.
    personal_state
        The device's personal parameters (NCF's user embedding); empty uses the
        model's initial personal state (NCF: the zero user, i.e. popularity-like).
    k
        How many recommendations (fewer when fewer unseen items exist).
    titles
        Item titles by dense item id, for display and explanations.
    explain
        How many history items to cite per recommendation.

    Returns
    -------
    list[Recommendation]
        Best first.

    Raises
    ------
    ValueError
        If ``k < 1``, or the parameters do not fit the configured model.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    model = _build(cfg, global_params, personal_state, data.device_id)
    history = np.concatenate([np.asarray(data.train_items, dtype=np.int64), [data.valid_item, data.test_item]])
    if history.size and (int(history.min()) < 0 or int(history.max()) >= model.num_items):
        raise DataError(f"the device's history holds item ids outside the model's catalogue [0, {model.num_items})")
    with torch.no_grad():
        scores = model.score_all(UserContext(0, torch.as_tensor(history, dtype=torch.long))).double().numpy()
    best = top_k(scores, history, k)
    because = _explain(model, best, history, titles, explain)
    return [
        Recommendation(
            rank=rank,
            item_id=int(item),
            title=None if titles is None else titles.get(int(item)),
            score=float(scores[item]),
            because=because[rank - 1],
        )
        for rank, item in enumerate(best, start=1)
    ]


def _explain(
    model: Recommender, items: np.ndarray, history: np.ndarray, titles: Mapping[int, str] | None, count: int
) -> list[tuple[Because, ...]]:
    """For each item, the ``count`` history items most similar by cosine of the item embeddings."""
    table = item_embeddings(model)
    if table is None or count < 1 or not len(items):
        return [() for _ in items]
    seen = np.unique(history)  # the person's own items; a repeat would only repeat the explanation
    emb = torch.nn.functional.normalize(table.double(), dim=1)
    sims = emb[torch.as_tensor(items)] @ emb[torch.as_tensor(seen)].T  # k x H
    top = torch.topk(sims, min(count, len(seen)), dim=1)
    return [
        tuple(
            Because(int(seen[j]), None if titles is None else titles.get(int(seen[j])), float(s))
            for s, j in zip(values.tolist(), indices.tolist(), strict=True)
        )
        for values, indices in zip(top.values, top.indices, strict=True)
    ]


def load_titles(cache_dir: Path | str | None = None, *, download: bool = False) -> dict[int, str] | None:
    """Titles of the bundled MovieLens-100K catalogue by dense item id, or None if unavailable.

    Reads fedrec's cached copy (``~/.cache/fedrec/ml-100k``, or ``cache_dir``, or
    ``FEDREC_CACHE_DIR``). Without a cache it returns None unless ``download`` is True,
    in which case it fetches the data as :func:`shared.data.bundled.load_bundled_ml100k` does.
    """
    from shared.data.bundled import BUNDLED_FILES, load_bundled_ml100k, resolve_cache_dir

    root = resolve_cache_dir("" if cache_dir is None else str(cache_dir))
    cached = all((root / "ml-100k" / name).is_file() for name in BUNDLED_FILES)
    if not cached and not download:
        return None
    log = load_bundled_ml100k(root)
    if log.item_titles is None:
        return None
    return dict(enumerate(log.item_titles))
