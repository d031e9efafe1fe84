"""The one-run empirical privacy audit: its statistics, and a small real federation with canaries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import special

from server.audit.empirical import (
    AuditResult,
    best_lower_bound,
    guesses_from_scores,
    one_run_lower_bound,
    p_value,
    p_value_pure,
)

# ------------------------------------------------------------------------- statistics


def test_all_correct_bound_grows_with_the_number_of_guesses() -> None:
    bounds = [one_run_lower_bound(r, r, delta=1e-5, num_canaries=1000) for r in (10, 30, 100, 300, 1000)]
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] > 0.5 and bounds[-1] > 5.0


def test_all_correct_pure_bound_matches_the_closed_form() -> None:
    # r = v = 10, δ = 0: reject while q^10 <= 0.05, so q* = 0.05^(1/10) and ε* = logit(q*).
    expected = float(special.logit(0.05 ** (1 / 10)))
    assert one_run_lower_bound(10, 10, delta=0.0) == pytest.approx(expected, abs=1e-6)
    assert p_value_pure(10, 10, expected) == pytest.approx(0.05, rel=1e-6)


def test_half_correct_gives_no_evidence() -> None:
    assert one_run_lower_bound(1000, 500, delta=1e-5, num_canaries=1000) == 0.0
    assert one_run_lower_bound(1000, 480, delta=0.0) == 0.0
    assert one_run_lower_bound(0, 0, delta=1e-5, num_canaries=10) == 0.0
    assert one_run_lower_bound(1000, 530, delta=1e-5, num_canaries=1000) < 0.1


def test_bound_is_monotone_in_correct_guesses() -> None:
    bounds = [one_run_lower_bound(200, v, delta=1e-5, num_canaries=500) for v in range(90, 201, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == 0.0 and bounds[-1] > 3.0


def test_delta_term_only_weakens_the_bound() -> None:
    assert p_value(50, 45, 1.0, 0.0) == pytest.approx(p_value_pure(50, 45, 1.0))
    assert p_value(50, 45, 1.0, 1e-3, num_canaries=1000) > p_value_pure(50, 45, 1.0)
    pure = one_run_lower_bound(100, 90, delta=0.0, num_canaries=1000)
    approx = one_run_lower_bound(100, 90, delta=1e-4, num_canaries=1000)
    more_canaries = one_run_lower_bound(100, 90, delta=1e-4, num_canaries=10_000)
    assert pure > approx > more_canaries > 0.0


def test_invalid_counts_are_rejected() -> None:
    with pytest.raises(ValueError):
        one_run_lower_bound(10, 11, delta=0.0)
    with pytest.raises(ValueError):
        one_run_lower_bound(10, 5, delta=0.0, num_canaries=5)
    with pytest.raises(ValueError):
        one_run_lower_bound(10, 5, delta=0.0, confidence=1.0)


def _randomized_response_bound(rng: np.random.Generator, m: int, epsilon: float, delta: float) -> float:
    correct = int((rng.random(m) < special.expit(epsilon)).sum())
    return one_run_lower_bound(m, correct, delta=delta, num_canaries=m)


def test_randomized_response_bound_stays_below_its_epsilon() -> None:
    rng = np.random.default_rng(7)
    epsilon = 1.0
    bounds = np.array([_randomized_response_bound(rng, 500, epsilon, 1e-5) for _ in range(200)])
    # The bound exceeds the true ε with probability <= 5%; allow sampling slack.
    assert (bounds > epsilon).mean() <= 0.10
    assert np.median(bounds) > 0.5  # and it is not vacuous


def test_randomized_response_bound_is_tight_for_many_canaries() -> None:
    rng = np.random.default_rng(11)
    bound = _randomized_response_bound(rng, 200_000, 1.0, 1e-6)
    assert 0.95 < bound < 1.05


def test_guesses_from_scores_picks_extremes_and_skips_unobserved() -> None:
    scores = np.array([0.5, np.nan, 3.0, -1.0, 2.0, 0.0])
    assert guesses_from_scores(scores, 2, 1).tolist() == [0, 0, 1, -1, 1, 0]
    assert guesses_from_scores(scores, 0, 0).tolist() == [0] * 6
    capped = guesses_from_scores(scores, 4, 4)  # 5 finite scores: 4 positive, 1 negative
    assert (capped == 1).sum() == 4 and (capped == -1).sum() == 1 and capped[1] == 0


def test_best_lower_bound_pays_for_its_grid() -> None:
    truth = np.array([True] * 60 + [False] * 60)
    scores = np.where(truth, 1.0, -1.0) + np.linspace(0, 0.1, 120)
    single = best_lower_bound(scores, truth, 1e-5, ks=[(40, 0)])
    assert isinstance(single, AuditResult)
    assert (single.num_guesses, single.num_correct, single.num_canaries) == (40, 40, 120)
    assert single.epsilon_lower_bound == pytest.approx(one_run_lower_bound(40, 40, 1e-5, 0.95, 120))
    grid = best_lower_bound(scores, truth, 1e-5, ks=[(40, 0), (10, 0), (5, 0), (1, 0)])
    # Same best guesses, but tested at 0.05 / 4: a smaller bound.
    assert grid.k_plus == 40 and grid.epsilon_lower_bound < single.epsilon_lower_bound
    both = best_lower_bound(scores, truth, 1e-5)  # default grid, fixed before seeing the truth
    assert both.epsilon_lower_bound > 1.0 and both.confidence == 0.95


def test_scores_independent_of_truth_rarely_give_a_positive_bound() -> None:
    rng = np.random.default_rng(3)
    bounds = [
        best_lower_bound(rng.normal(size=400), rng.random(400) < 0.5, 1e-5).epsilon_lower_bound for _ in range(100)
    ]
    assert np.mean(np.array(bounds) > 0) <= 0.10


# ---------------------------------------------------------------- real federation


def _small(tmp: Path, name: str, dp: bool) -> dict[str, Any]:
    # 60 MovieLens-100K users; ~1.3 tasks per device.
    return {
        "max-devices": 60, "num-versions": 8, "concurrency": 20, "buffer-size": 10,
        "dp": dp, "output-dir": str(tmp / name),
    }  # fmt: skip


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    from simulations.canary_audit import run_canary_audit

    tmp = tmp_path_factory.mktemp("audit")
    return {
        "off": run_canary_audit(_small(tmp, "off", dp=False), audit_seed=5),
        "on": run_canary_audit(_small(tmp, "on", dp=True), audit_seed=5),
    }


def test_attack_finds_canaries_without_dp(audits: dict[str, dict[str, Any]]) -> None:
    off = audits["off"]
    assert off["num-canaries"] == 60 and off["canaries-observed"] >= 40
    assert off["precision"] >= 0.9 and off["num-guesses"] >= 10
    assert off["auc"] > 0.75
    assert off["epsilon-lower-bound"] > 0.5
    written = json.loads((Path(off["config"]["output-dir"]) / "empirical_audit.json").read_text())
    assert written["epsilon-lower-bound"] == off["epsilon-lower-bound"]


def test_lower_bound_never_exceeds_accounted_epsilon_with_dp(audits: dict[str, dict[str, Any]]) -> None:
    on = audits["on"]
    assert on["dp"] and 0.0 < on["epsilon-accounted"] <= 8.0
    assert on["epsilon-lower-bound"] <= on["epsilon-accounted"]
    assert math.isfinite(on["epsilon-lower-bound"])


def test_canary_data_keeps_ids_and_puts_canaries_in_training(tmp_path: Path) -> None:
    from shared.data.split import leave_one_out
    from shared.data.synthetic import generate_synthetic
    from simulations.canary_audit import _check_canary_data, plan_canaries, write_canary_data

    base = generate_synthetic(30, 60, 20, 0)
    plan = plan_canaries(base, audit_seed=1)
    assert 0 < plan.included.sum() < plan.num_canaries
    for device, item in zip(plan.device_ids, plan.canary_items, strict=True):
        assert item not in base.item_ids[base.user_ids == device]  # never interacted with
    path = write_canary_data(base, plan, tmp_path / "u.data")
    _check_canary_data(base, path, plan)  # raises if ids, split or canary placement differ
    devices = {d.device_id: d for d in leave_one_out(base)}
    assert set(devices) == {int(d) for d in plan.device_ids}
