"""On-device recommendations: whole-catalogue ranking, history excluded, explained from the person's history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import client.recommend as rec_module
from client.recommend import catalogue_size, item_embeddings, recommend
from shared.config import FedrecConfig, parse_config
from shared.data.types import DeviceData
from shared.models.base import UserContext
from shared.models.factory import build_model

SMALL = {"embedding-dim": 8, "mlp-layers": "8", "max-seq-len": 5, "num-heads": 2}


def _setup(model: str = "ncf", num_items: int = 40) -> tuple[FedrecConfig, dict[str, torch.Tensor], DeviceData]:
    cfg = parse_config({**SMALL, "model": model})
    params = build_model(cfg.model, num_items, 1, seed=7).global_state()
    data = DeviceData(device_id=3, train_items=np.array([4, 9, 15, 22], dtype=np.int64), valid_item=30, test_item=2)
    return cfg, params, data


@pytest.mark.parametrize("model", ["ncf", "sasrec"])
def test_ranks_unseen_items_best_first_and_explains_by_cosine(model: str) -> None:
    cfg, params, data = _setup(model)
    titles = {i: f"Movie {i}" for i in range(40)}
    recs = recommend(cfg, params, data, {}, k=10, titles=titles)
    history = {4, 9, 15, 22, 30, 2}
    assert len(recs) == 10 and [r.rank for r in recs] == list(range(1, 11))
    assert not {r.item_id for r in recs} & history
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    table = rec_module.item_embeddings(build_model(cfg.model, 40, 1, seed=0))
    assert table is not None and table.shape == (40, 8)
    emb = params["item_embedding.weight"][1:] if model == "sasrec" else params["item_embedding.weight"]
    emb = torch.nn.functional.normalize(emb.double(), dim=1)
    seen = sorted(history)
    for r in recs:
        sims = emb[seen] @ emb[r.item_id]
        assert r.because[0].item_id == seen[int(torch.argmax(sims))]
        assert r.because[0].similarity == pytest.approx(float(sims.max()))
        assert r.title == f"Movie {r.item_id}"
        assert r.explanation == f"because you watched Movie {r.because[0].item_id}"


def test_scores_match_the_model_and_personal_state_matters() -> None:
    cfg, params, data = _setup()
    personal = {"user_embedding.weight": torch.randn(1, 8, generator=torch.Generator().manual_seed(1))}
    recs = recommend(cfg, params, data, personal, k=5)
    model = build_model(cfg.model, 40, 1, seed=0)
    model.load_state_dict({**params, **personal})
    history = torch.as_tensor([4, 9, 15, 22, 30, 2])
    expected = model.score_all(UserContext(0, history))
    for r in recs:
        assert r.score == pytest.approx(float(expected[r.item_id]), rel=1e-5)
    assert [r.item_id for r in recs] != [r.item_id for r in recommend(cfg, params, data, {}, k=5)]


def test_k_larger_than_the_unseen_catalogue_and_several_explanations() -> None:
    cfg, params, data = _setup(num_items=40)
    recs = recommend(cfg, params, data, {}, k=100, explain=2)
    assert len(recs) == 34
    assert all(len(r.because) == 2 for r in recs)
    assert recs[0].explanation.startswith("because you watched item ") and " and item " in recs[0].explanation


def test_model_without_item_embeddings_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, params, data = _setup()
    monkeypatch.setattr(rec_module, "item_embeddings", lambda _model: None)
    recs = recommend(cfg, params, data, {}, k=3)
    assert all(r.because == () for r in recs)
    assert recs[0].explanation == "recommended for you by the shared model"


def test_bad_inputs_are_clear_errors() -> None:
    cfg, params, data = _setup()
    with pytest.raises(ValueError, match="k must be at least 1"):
        recommend(cfg, params, data, {}, k=0)
    with pytest.raises(ValueError, match="must not carry personal parameters"):
        recommend(cfg, {**params, "user_embedding.weight": torch.zeros(1, 8)}, data, {})
    with pytest.raises(ValueError, match="non-personal"):
        recommend(cfg, params, data, {"output.bias": torch.zeros(1)})
    sasrec_cfg = parse_config({**SMALL, "model": "sasrec"})
    with pytest.raises(ValueError, match="missing parameters"):
        recommend(sasrec_cfg, params, data, {})
    with pytest.raises(ValueError, match="does not fit"):
        recommend(parse_config({**SMALL, "mlp-layers": "16"}), params, data, {})
    with pytest.raises(ValueError, match="has no 'item_embedding.weight'"):
        catalogue_size(cfg.model, {"x": torch.zeros(1)})
    assert catalogue_size(sasrec_cfg.model, build_model(sasrec_cfg.model, 40, 1, seed=0).global_state()) == 40
    assert item_embeddings(torch.nn.Linear(2, 2)) is None  # type: ignore[arg-type]
