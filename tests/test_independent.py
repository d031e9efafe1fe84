"""Independent recomputation of claimed epsilons: record level (vs Opacus) and user level."""

from __future__ import annotations

import itertools
import logging
import math

import mpmath
import pytest

from server.audit.independent import (
    TOLERANCE,
    _log_a_quadrature,
    record_level_epsilon,
    record_level_epsilon_flower,
    record_level_epsilon_quadrature,
    relative_error,
    user_level_epsilon,
    within_tolerance,
)
from shared.privacy.accounting import rdp_epsilon
from shared.privacy.user_level import rdp_to_epsilon

DELTA = 1e-5
SIGMAS = [0.6, 1.0, 1.5]
RATES = [1 / 2, 1 / 7, 1 / 13, 1 / 92]
STEPS = [10, 25, 50, 100, 250, 500]
GRID = list(itertools.product(SIGMAS, RATES, STEPS))
MIXED = [
    [(1.0, 1 / 7, 40), (1.0, 1 / 13, 40), (1.5, 1 / 2, 20)],
    [(0.6, 1 / 92, 300), (1.0, 1 / 92, 200)],
    [(1.5, 1 / 13, 10), (1.5, 1 / 7, 10), (1.0, 1 / 2, 5), (0.6, 1 / 92, 100)],
]


@pytest.fixture(autouse=True)
def _quiet_dp_accounting() -> None:
    # dp-accounting logs a warning per fractional order it drops (see the module docstring).
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def test_quadrature_matches_opacus_on_the_fedrec_grid() -> None:
    worst, where = 0.0, None
    for sigma, q, steps in GRID:
        history = [(sigma, q, steps)]
        err = relative_error(rdp_epsilon(history, DELTA), record_level_epsilon_quadrature(history, DELTA))
        if err > worst:
            worst, where = err, (sigma, q, steps)
    for history in MIXED:
        worst = max(worst, relative_error(rdp_epsilon(history, DELTA), record_level_epsilon_quadrature(history, DELTA)))
    print(f"max relative error, quadrature vs Opacus: {worst:.3e} at {where}")
    assert worst <= TOLERANCE
    assert worst < 1e-8  # observed 2.7e-12: far inside the tolerance


def test_dp_accounting_is_an_upper_bound_tight_in_the_budget_regime() -> None:
    worst_small = 0.0
    for sigma, q, steps in GRID:
        history = [(sigma, q, steps)]
        exact = record_level_epsilon_quadrature(history, DELTA)
        dp = record_level_epsilon(history, DELTA)
        assert dp >= exact * (1 - 1e-9), (sigma, q, steps, dp, exact)
        if exact <= 10:
            worst_small = max(worst_small, relative_error(rdp_epsilon(history, DELTA), dp))
    print(f"max relative error, dp-accounting vs Opacus where eps <= 10: {worst_small:.3e}")
    assert worst_small <= TOLERANCE


def test_dp_accounting_is_loose_at_large_epsilon_as_documented() -> None:
    # sigma=0.6, q=1/2, 500 steps: Opacus and the exact integral give ~350, dp-accounting ~584
    # (it sums |binomial coefficients| and drops the small fractional orders that do not converge).
    history = [(0.6, 0.5, 500)]
    opacus, exact, dp = (
        rdp_epsilon(history, DELTA),
        record_level_epsilon_quadrature(history, DELTA),
        record_level_epsilon(history, DELTA),
    )
    assert relative_error(opacus, exact) < 1e-9
    assert opacus == pytest.approx(349.5885, abs=1e-3)
    assert dp == pytest.approx(584.1959, abs=1e-3)
    assert not within_tolerance(opacus, dp)


@pytest.mark.parametrize("q", RATES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_quadrature_log_a_matches_high_precision_integral(sigma: float, q: float) -> None:
    mpmath.mp.dps = 40
    for order in [1.1, 1.7, 2.0, 3.5, 12.0, 63.0]:
        s, qq, a = mpmath.mpf(sigma), mpmath.mpf(q), mpmath.mpf(order)
        z0 = s * s * mpmath.log(1 / qq - 1) + mpmath.mpf(1) / 2

        def integrand(z: mpmath.mpf, s: mpmath.mpf = s, qq: mpmath.mpf = qq, a: mpmath.mpf = a) -> mpmath.mpf:
            return mpmath.npdf(z, 0, s) * ((1 - qq) + qq * mpmath.exp((2 * z - 1) / (2 * s * s))) ** a

        reference = float(mpmath.log(mpmath.quad(integrand, [-mpmath.inf, -20 * s, 0, z0, a, a + 20 * s, mpmath.inf])))
        assert _log_a_quadrature(q, sigma, order) == pytest.approx(reference, rel=1e-9, abs=1e-13)


@pytest.mark.parametrize("history", MIXED)
def test_flower_accountant_agrees_with_dp_accounting(history: list[tuple[float, float, int]]) -> None:
    flower = record_level_epsilon_flower(history, DELTA)
    assert flower == pytest.approx(record_level_epsilon(history, DELTA), rel=1e-12)
    assert within_tolerance(rdp_epsilon(history, DELTA), flower)


def test_flower_refuses_rates_that_are_not_exactly_one_over_k() -> None:
    with pytest.raises(ValueError, match="not exactly 1/k"):
        record_level_epsilon_flower([(1.0, 0.15, 10)], DELTA)


def test_empty_histories_cost_nothing() -> None:
    assert record_level_epsilon([], DELTA) == 0.0
    assert record_level_epsilon_quadrature([], DELTA) == 0.0
    assert record_level_epsilon_flower([], DELTA) == 0.0
    assert record_level_epsilon([(1.0, 0.5, 0)], DELTA) == 0.0
    assert user_level_epsilon([], 3.0, DELTA, 3.7) == 0.0


@pytest.mark.parametrize("history", [[(1.0, 1 / 7, 100)], [(1.5, 1 / 13, 250)], MIXED[0], MIXED[1]])
def test_planted_wrong_claims_are_detected(history: list[tuple[float, float, int]]) -> None:
    truth = record_level_epsilon_quadrature(history, DELTA)
    claim = rdp_epsilon(history, DELTA)
    assert within_tolerance(claim, truth)
    assert not within_tolerance(claim * 0.9, truth)
    assert not within_tolerance(claim * 1.05, truth)
    # A ledger that lost its first entry (or half its steps), or reports at the wrong delta. (Losing
    # a CHEAP entry can stay within 1%: dropping the 200 steps at sigma=1, q=1/92 from MIXED[1]
    # moves epsilon from 6.45 to 6.39. The tolerance bounds the error in epsilon, not in the ledger.)
    dropped = history[1:] if len(history) > 1 else [(history[0][0], history[0][1], history[0][2] // 2)]
    assert not within_tolerance(rdp_epsilon(dropped, DELTA), truth)
    assert not within_tolerance(rdp_epsilon(history, 1e-3), truth)
    # A ledger that recorded a larger sigma than was used.
    inflated = [(sigma * 1.2, q, steps) for sigma, q, steps in history]
    assert not within_tolerance(rdp_epsilon(inflated, DELTA), truth)


def test_user_level_epsilon_is_the_fixed_order_conversion() -> None:
    z, order = 3.0, 3.7
    weights = [1.0, 0.5, 0.25, 1.0, 0.8]
    rdp = order * sum(w * w for w in weights) / (2 * z * z)
    assert user_level_epsilon(weights, z, DELTA, order) == pytest.approx(rdp_to_epsilon(rdp, order, DELTA), rel=1e-12)
    # Planted: the same weights claimed at a larger noise multiplier.
    assert not within_tolerance(
        user_level_epsilon(weights, z * 1.1, DELTA, order), user_level_epsilon(weights, z, DELTA, order)
    )


def test_relative_error_edge_cases() -> None:
    assert relative_error(1.0, 1.0) == 0.0
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(1.01, 1.0) == pytest.approx(0.01)
    assert relative_error(0.99, 1.0) == pytest.approx(0.01)
    assert relative_error(0.1, 0.0) == math.inf
    assert relative_error(math.inf, 5.0) == math.inf
    assert TOLERANCE == 0.01


PRV_GRID = [*itertools.product(SIGMAS, [1 / 2, 1 / 13, 1 / 92], [10, 100]), (1.0, 1 / 92, 500)]


def test_prv_claims_are_recomputed_by_a_pld_accountant_within_tolerance() -> None:
    from server.audit.independent import prv_claim_agrees, record_level_epsilon_pld
    from shared.privacy.accounting import DeviceAccountant, Release

    worst_rel, worst_abs = 0.0, 0.0
    for sigma, q, steps in PRV_GRID:
        claim = DeviceAccountant("prv", DELTA, 1e9).epsilon_if(Release(sigma, q, steps))  # what a device claims
        recomputed = record_level_epsilon_pld([(sigma, q, steps)], DELTA)
        assert prv_claim_agrees(claim, recomputed), (sigma, q, steps, claim, recomputed)
        worst_rel = max(worst_rel, relative_error(claim, recomputed))
        worst_abs = max(worst_abs, abs(claim - recomputed))
        # PRV is tight: clearly below RDP's bound, so an RDP recomputation would (wrongly) flag it.
        if claim > 1.0:
            assert claim < rdp_epsilon([(sigma, q, steps)], DELTA)
        # A claim 10% (at least 0.05) low or high is caught.
        off = max(0.1 * claim, 0.05)
        assert not prv_claim_agrees(claim - off, recomputed)
        assert not prv_claim_agrees(claim + off, recomputed)
    print(f"PRV vs PLD: max relative {worst_rel:.3%}, max absolute {worst_abs:.4f}")
    assert record_level_epsilon_pld([], DELTA) == 0.0
    with pytest.raises(ValueError):
        record_level_epsilon_pld([(-1.0, 0.5, 3)], DELTA)
