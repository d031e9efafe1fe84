"""A device's secure contribution: each per-record gradient row is that record's own gradient."""

from __future__ import annotations

import numpy as np
import torch
from opacus import GradSampleModule

from client.secure_training import _per_record_gradients
from shared.config import ModelConfig
from shared.models.factory import build_model
from shared.secure_sum.layout import VectorLayout


def test_each_row_is_the_records_own_gradient_whatever_the_chunk_size() -> None:
    model = build_model(ModelConfig(embedding_dim=8, mlp_layers=(8,), num_negatives=4), 40, 1, seed=0)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in model.local_parameter_names())
    history = np.arange(1, 21) % 40
    records = model.build_records(history, 0)
    layout = VectorLayout.of(model.global_state())
    for size in (1, 5, 12):
        batch = tuple(r[:size] for r in records)
        net = GradSampleModule(model, loss_reduction="sum")
        try:
            rows = _per_record_gradients(net, model, batch, layout.names, torch.Generator().manual_seed(3))
        finally:
            net.to_standard_module()
        negatives = model.sample_negatives(size, torch.Generator().manual_seed(3))
        params = dict(model.named_parameters())
        for i in range(size):
            model.zero_grad(set_to_none=True)
            one = tuple(r[i : i + 1] for r in batch)
            model.loss_per_record(one, negatives[i : i + 1]).sum().backward()
            expected = torch.cat(
                [
                    (params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).reshape(-1)
                    for n in layout.names
                ]
            )
            torch.testing.assert_close(rows[i], expected, rtol=1e-5, atol=1e-6)


def test_every_step_is_rounded_and_noised_on_its_own(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The ledger charges local-steps releases, so each step must carry its own noise share."""
    import client.secure_training as st
    from shared.config import parse_config
    from shared.secure_sum.release import plan_secure_release

    cfg = parse_config(
        {"secure-aggregation": True, "embedding-dim": 8, "mlp-layers": "8", "num-negatives": 4, "local-steps": 4}
    )
    model = build_model(cfg.model, 40, 1, seed=0)
    layout = VectorLayout.of(model.global_state())
    plan = plan_secure_release(cfg.aggregation, cfg.privacy, cfg.train, layout.dim)
    noised, rounded = [], []
    real_noise, real_encode = st.skellam_noise, st.encode_sum

    def noise(mu: float, size: int, rng: np.random.Generator) -> np.ndarray:
        noised.append(mu)
        return real_noise(mu, size, rng)

    def encode(total: np.ndarray, *args: object) -> np.ndarray:
        rounded.append(float(np.linalg.norm(total)))
        return real_encode(total, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(st, "skellam_noise", noise)
    monkeypatch.setattr(st, "encode_sum", encode)
    records = model.build_records(np.arange(1, 31) % 40, 0)
    result = st.secure_contribution(model, records, plan, layout, b"r" * 32)
    assert noised == [plan.mu_device] * 4 and len(rounded) == 4
    # Each step's sum holds that step's records only: at most (records sampled) * clip.
    assert max(rounded) <= result.records_encoded * cfg.privacy.clip_norm + 1e-9
