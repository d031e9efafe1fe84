"""User-level DP for buffered async aggregation: Gaussian RDP, the Rényi filter, clipping, noise."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from dp_accounting.rdp import compute_epsilon
from opacus.accountants.analysis.rdp import get_privacy_spent

from server.audit.independent import TOLERANCE, relative_error, user_level_epsilon
from shared.privacy.user_level import (
    DEFAULT_ORDERS,
    RenyiFilter,
    UserBudgetExhausted,
    add_gaussian_noise,
    choose_order,
    clip_update,
    gaussian_rdp,
    rdp_to_epsilon,
)

DELTA = 1e-5
# (noise multiplier, epsilon budget) pairs that admit between 2 and ~250 full-weight releases.
CONFIGS = [(1.0, 8.0), (2.0, 4.0), (3.0, 8.0), (5.0, 8.0), (10.0, 2.0), (10.0, 8.0)]


def test_default_orders_are_opacus_default_alphas() -> None:
    from opacus.accountants import RDPAccountant

    assert DEFAULT_ORDERS == RDPAccountant.DEFAULT_ALPHAS


def test_gaussian_rdp_closed_form() -> None:
    # alpha * w^2 / (2 z^2): 3 * 0.25 / (2 * 4) = 0.09375, exactly representable.
    assert gaussian_rdp(3.0, 2.0, 0.5) == 0.09375
    assert gaussian_rdp(2.5, 1.0) == 1.25
    # A weight w is the same as noise multiplier z / w.
    assert gaussian_rdp(7.3, 1.7, 0.3) == pytest.approx(gaussian_rdp(7.3, 1.7 / 0.3))


@pytest.mark.parametrize("bad", [(1.0, 1.0, 1.0), (2.0, 0.0, 1.0), (2.0, 1.0, -0.1), (2.0, math.nan, 1.0)])
def test_gaussian_rdp_rejects_invalid_arguments(bad: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        gaussian_rdp(*bad)


@pytest.mark.filterwarnings("ignore:Optimal order is the")
@pytest.mark.parametrize("order", [1.1, 1.5, 2.0, 3.7, 12.0, 63.0])
@pytest.mark.parametrize("rdp", [0.01, 0.5, 3.0, 40.0])
def test_rdp_to_epsilon_matches_opacus_and_dp_accounting(order: float, rdp: float) -> None:
    ours = rdp_to_epsilon(rdp, order, DELTA)
    opacus_eps, _ = get_privacy_spent(orders=[order], rdp=[rdp], delta=DELTA)
    dp_eps, _ = compute_epsilon([order], [rdp], DELTA)
    assert ours == pytest.approx(float(opacus_eps), rel=1e-12)
    assert ours == pytest.approx(float(dp_eps), rel=1e-12)


def test_rdp_to_epsilon_clamps_only_upward() -> None:
    # With delta near 1 the raw conversion is negative; 0 is a weaker (still valid) claim.
    raw = 0.0 + math.log1p(-1 / 63) - (math.log(0.9) + math.log(63)) / 62
    assert raw < 0
    assert rdp_to_epsilon(0.0, 63.0, 0.9) == 0.0
    assert rdp_to_epsilon(math.inf, 2.0, DELTA) == math.inf


def _full_releases(order: float, z: float, delta: float, budget: float) -> int:
    """Brute force: how many unit-weight releases a fresh filter at ``order`` admits."""
    f = RenyiFilter(z, delta, budget, order=order)
    n = 0
    while f.admits(0):
        f.charge(0)
        n += 1
    return n


@pytest.mark.parametrize(("z", "budget"), [(1.0, 8.0), (3.0, 8.0), (10.0, 2.0)])
def test_choose_order_maximises_full_weight_releases_ties_to_smaller(z: float, budget: float) -> None:
    counts = {order: _full_releases(order, z, DELTA, budget) for order in DEFAULT_ORDERS}
    best = max(counts.values())
    chosen = choose_order(z, budget, DELTA)
    assert counts[chosen] == best
    assert chosen == min(order for order, n in counts.items() if n == best)


def test_choose_order_refuses_a_budget_that_admits_nothing() -> None:
    with pytest.raises(ValueError, match="no order admits"):
        choose_order(0.6, 4.0, DELTA)


@pytest.mark.parametrize(("z", "budget"), CONFIGS)
def test_rdp_budget_is_the_largest_rdp_within_the_epsilon_budget(z: float, budget: float) -> None:
    f = RenyiFilter(z, DELTA, budget)
    assert rdp_to_epsilon(f.rdp_budget, f.order, DELTA) <= budget
    assert rdp_to_epsilon(math.nextafter(f.rdp_budget, math.inf), f.order, DELTA) > budget
    assert rdp_to_epsilon(f.rdp_budget, f.order, DELTA) == pytest.approx(budget, rel=1e-12)


@pytest.mark.parametrize(("z", "budget"), CONFIGS)
def test_filter_stops_a_full_weight_device_exactly_at_the_boundary(z: float, budget: float) -> None:
    f = RenyiFilter(z, DELTA, budget)
    unit = gaussian_rdp(f.order, z)
    expected = math.floor(f.rdp_budget / unit)
    assert expected >= 2
    for i in range(expected):
        assert f.admits(7), f"release {i + 1} of {expected} refused"
        f.charge(7)
        assert f.epsilon(7) <= budget
    assert not f.admits(7)
    with pytest.raises(UserBudgetExhausted, match="device 7"):
        f.charge(7)
    # The refusal charged nothing, and one more release really would have exceeded the budget.
    assert f.history(7) == [1.0] * expected
    assert rdp_to_epsilon(unit * (expected + 1), f.order, DELTA) > budget
    assert f.rdp(7) == pytest.approx(unit * expected, rel=1e-15)


def test_user_budget_exhausted_is_a_value_error() -> None:
    assert issubclass(UserBudgetExhausted, ValueError)


@pytest.mark.parametrize(("z", "budget"), CONFIGS)
def test_no_device_ever_exceeds_the_budget_with_random_weights(z: float, budget: float) -> None:
    rng = random.Random(1234)
    f = RenyiFilter(z, DELTA, budget)
    refusals = 0
    for _ in range(3000):
        device = rng.randrange(5)
        weight = rng.choice([1.0, rng.uniform(0.01, 1.0)])
        if f.admits(device, weight):
            f.charge(device, weight)
        else:
            refusals += 1
            with pytest.raises(UserBudgetExhausted):
                f.charge(device, weight)
        assert f.epsilon(device) <= budget
    assert refusals > 0  # the budget was actually reached
    assert all(eps <= budget for eps in f.epsilons().values())


def test_weights_below_one_allow_more_releases() -> None:
    z, budget = 3.0, 8.0
    full = _full_releases(choose_order(z, budget, DELTA), z, DELTA, budget)
    f = RenyiFilter(z, DELTA, budget)
    n = 0
    while f.admits(1, 0.5):
        f.charge(1, 0.5)
        n += 1
    # w = 1/2 costs a quarter of a full release: (about) four times as many fit.
    assert n >= 4 * full
    assert n == math.floor(f.rdp_budget / gaussian_rdp(f.order, z, 0.5))


@pytest.mark.parametrize(("z", "budget"), CONFIGS)
def test_filter_epsilon_equals_independent_recomputation(z: float, budget: float) -> None:
    rng = random.Random(99)
    f = RenyiFilter(z, DELTA, budget)
    for _ in range(500):
        device, weight = rng.randrange(5), rng.uniform(0.05, 1.0)
        if f.admits(device, weight):
            f.charge(device, weight)
    worst = 0.0
    for device, claimed in f.epsilons().items():
        recomputed = user_level_epsilon(f.history(device), z, DELTA, f.order)
        worst = max(worst, relative_error(claimed, recomputed))
    assert worst <= TOLERANCE
    assert worst < 1e-9  # same closed form and conversion: only rounding differs


def test_epsilon_of_unknown_device_is_zero_and_len_counts_devices() -> None:
    f = RenyiFilter(3.0, DELTA, 8.0)
    assert f.epsilon(42) == 0.0
    assert f.history(42) == []
    assert len(f) == 0
    f.charge(1, 0.5)
    f.charge(2)
    f.charge(1)
    assert len(f) == 2
    assert f.history(1) == [0.5, 1.0]
    assert set(f.epsilons()) == {1, 2}
    # history() is a copy.
    f.history(1).append(1.0)
    assert f.history(1) == [0.5, 1.0]


@pytest.mark.parametrize("weight", [0.0, -0.5, 1.0000001, math.nan, math.inf])
def test_invalid_weights_are_refused(weight: float) -> None:
    f = RenyiFilter(3.0, DELTA, 8.0)
    with pytest.raises(ValueError):
        f.charge(1, weight)
    with pytest.raises(ValueError):
        f.admits(1, weight)
    assert len(f) == 0


def test_charge_release_is_all_or_nothing() -> None:
    f = RenyiFilter(1.0, DELTA, 8.0)  # two full-weight releases fit
    f.charge(1)
    f.charge(1)
    with pytest.raises(UserBudgetExhausted, match="device 1"):
        f.charge_release({2: 1.0, 1: 1.0, 3: 0.5})
    assert len(f) == 1 and f.history(2) == [] and f.history(3) == []
    f.charge_release({2: 1.0, 3: 0.5})
    assert f.history(2) == [1.0] and f.history(3) == [0.5]


def test_state_dict_round_trips_through_json() -> None:
    f = RenyiFilter(3.0, DELTA, 8.0)
    rng = random.Random(5)
    for _ in range(200):
        device, weight = rng.randrange(2**40, 2**40 + 10), rng.uniform(0.1, 1.0)
        if f.admits(device, weight):
            f.charge(device, weight)
    restored = RenyiFilter(3.0, DELTA, 8.0, order=f.order)
    restored.load_state_dict(json.loads(json.dumps(f.state_dict())))
    assert len(restored) == len(f)
    assert restored.epsilons() == f.epsilons()
    for device in f.epsilons():
        assert restored.history(device) == f.history(device)
        assert restored.admits(device) == f.admits(device)


def test_load_state_dict_refuses_other_configuration_or_overspent_state() -> None:
    f = RenyiFilter(3.0, DELTA, 8.0)
    f.charge(1)
    state = f.state_dict()
    with pytest.raises(ValueError, match="noise_multiplier"):
        RenyiFilter(2.0, DELTA, 8.0, order=f.order).load_state_dict(state)
    with pytest.raises(ValueError, match="order"):
        RenyiFilter(3.0, DELTA, 8.0, order=f.order + 1).load_state_dict(state)
    tampered = dict(state, weights={"1": [1.0] * 10_000})
    with pytest.raises(ValueError, match="exceeds the budget"):
        RenyiFilter(3.0, DELTA, 8.0).load_state_dict(tampered)


def _norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_update_clips_large_updates_to_exactly_clip(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    update = {
        "emb": torch.randn(500, 16, generator=gen, dtype=dtype) * 3,
        "w": torch.randn(64, generator=gen, dtype=dtype),
    }
    original = {k: v.clone() for k, v in update.items()}
    clipped, norm = clip_update(update, 0.7)
    assert norm == pytest.approx(_norm(original), rel=1e-12)
    assert norm > 0.7
    assert _norm(clipped) <= 0.7
    assert _norm(clipped) == pytest.approx(0.7, rel=1e-6)
    # Direction is kept, dtypes are kept, and the input is not modified.
    for name in update:
        assert clipped[name].dtype == dtype
        torch.testing.assert_close(clipped[name], original[name] * (0.7 / norm), rtol=1e-5, atol=1e-7)
        assert torch.equal(update[name], original[name])


def test_clip_update_leaves_small_updates_untouched() -> None:
    update = {"a": torch.tensor([0.3, 0.4]), "b": torch.zeros(3)}
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(0.5)
    assert torch.equal(clipped["a"], update["a"]) and torch.equal(clipped["b"], update["b"])
    assert clipped["a"] is not update["a"]
    zero, zero_norm = clip_update({"a": torch.zeros(4)}, 1.0)
    assert zero_norm == 0.0 and torch.equal(zero["a"], torch.zeros(4))


def test_clip_update_refuses_non_finite_or_integer_updates() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"a": torch.tensor([1.0, math.nan])}, 1.0)
    with pytest.raises(TypeError):
        clip_update({"a": torch.tensor([1, 2])}, 1.0)


def test_noise_has_the_right_standard_deviation() -> None:
    z, clip = 1.3, 0.8
    total = {"big": torch.full((400, 500), 2.0), "small": torch.zeros(50_000, dtype=torch.float64)}
    noised = add_gaussian_noise(total, z, clip, torch.Generator().manual_seed(2024))
    assert torch.equal(total["big"], torch.full((400, 500), 2.0))  # input untouched
    for name, n in [("big", 200_000), ("small", 50_000)]:
        noise = (noised[name] - total[name]).double().numpy()
        assert noised[name].dtype == total[name].dtype
        # The sample std of n normals has relative s.e. ~ 1/sqrt(2n) (<= 0.32% here); allow 3%.
        assert np.std(noise) == pytest.approx(z * clip, rel=0.03)
        assert abs(np.mean(noise)) < 5 * z * clip / math.sqrt(n)


def test_noise_is_reproducible_with_a_seeded_generator_and_fresh_without() -> None:
    total = {"a": torch.zeros(1000)}
    one = add_gaussian_noise(total, 1.0, 1.0, torch.Generator().manual_seed(7))
    two = add_gaussian_noise(total, 1.0, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(one["a"], two["a"])
    # Without a generator the noise comes from OS entropy, not torch's fixed default seed.
    torch.manual_seed(0)
    three = add_gaussian_noise(total, 1.0, 1.0, None)
    torch.manual_seed(0)
    four = add_gaussian_noise(total, 1.0, 1.0, None)
    assert not torch.equal(three["a"], four["a"])
    assert float(three["a"].std()) == pytest.approx(1.0, rel=0.15)


def test_noise_refuses_integer_tensors() -> None:
    with pytest.raises(TypeError, match="non-floating"):
        add_gaussian_noise({"count": torch.tensor([3])}, 1.0, 1.0, torch.Generator().manual_seed(0))
