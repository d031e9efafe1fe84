"""Buffered aggregation: weighted FedAvg exactly, staleness discounts and rejection."""

from __future__ import annotations

import pytest
import torch

from server.aggregation import ServerOptimizer, UpdateBuffer, constant_staleness, polynomial_staleness


def _models(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(n)]


def test_no_staleness_buffer_is_exactly_example_weighted_fedavg() -> None:
    global_model = _models(0, 1)[0]
    clients = _models(1, 3)
    examples = [10, 30, 60]
    buf = UpdateBuffer(constant_staleness, max_staleness=0)
    for i, (client, n) in enumerate(zip(clients, examples, strict=False)):
        delta = {k: client[k] - global_model[k] for k in client}
        assert buf.add(i, delta, float(n), staleness=0)
    new = ServerOptimizer("sgd", 1.0).apply(global_model, buf.aggregate())
    for k in global_model:
        fedavg = sum(n * c[k].double() for c, n in zip(clients, examples, strict=False)) / sum(examples)
        torch.testing.assert_close(new[k].double(), fedavg.float().double(), rtol=0, atol=1e-6)


def test_polynomial_staleness_values() -> None:
    s = polynomial_staleness(0.5)
    assert s(0) == 1.0
    assert s(3) == pytest.approx(0.5)
    assert s(8) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        s(-1)


def test_stale_updates_are_discounted_not_renormalised() -> None:
    buf = UpdateBuffer(polynomial_staleness(0.5), max_staleness=10)
    buf.add(0, {"w": torch.ones(2)}, 1.0, staleness=0)
    buf.add(1, {"w": torch.ones(2)}, 1.0, staleness=3)  # discount 1/2
    mean = buf.aggregate()
    torch.testing.assert_close(mean["w"], torch.full((2,), 0.75, dtype=torch.float64))


def test_updates_staler_than_the_limit_are_rejected() -> None:
    buf = UpdateBuffer(polynomial_staleness(0.5), max_staleness=2)
    assert not buf.add(0, {"w": torch.ones(2)}, 1.0, staleness=3)
    assert len(buf) == 0
    assert buf.add(0, {"w": torch.ones(2)}, 1.0, staleness=2)
    assert len(buf) == 1


def test_mismatched_update_is_refused() -> None:
    buf = UpdateBuffer(constant_staleness, max_staleness=0)
    buf.add(0, {"w": torch.ones(2)}, 1.0, 0)
    with pytest.raises(ValueError, match="parameter names"):
        buf.add(1, {"v": torch.ones(2)}, 1.0, 0)


def test_server_momentum_accumulates() -> None:
    opt = ServerOptimizer("sgd", 1.0, momentum=0.5)
    p = {"w": torch.zeros(1)}
    p = opt.apply(p, {"w": torch.ones(1, dtype=torch.float64)})
    p = opt.apply(p, {"w": torch.ones(1, dtype=torch.float64)})
    assert p["w"].item() == pytest.approx(1.0 + 1.5)


def test_server_adam_moves_against_nothing_when_delta_is_zero() -> None:
    opt = ServerOptimizer("adam", 0.1)
    p = {"w": torch.ones(3)}
    out = opt.apply(p, {"w": torch.zeros(3, dtype=torch.float64)})
    torch.testing.assert_close(out["w"], p["w"])
