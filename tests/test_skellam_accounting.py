"""Record-level RDP accounting of subsampled Skellam noise: formulas, bounds, and independent checks."""

from __future__ import annotations

import math
import warnings
from itertools import pairwise

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy import special, stats

from shared.privacy.skellam import (
    DEFAULT_ORDERS,
    SkellamTask,
    _skellam_logpmf,
    _skellam_logpmf_series,
    poisson_subsampled_rdp,
    rdp_to_epsilon,
    skellam_epsilon,
    skellam_mu_for_epsilon,
    skellam_rdp,
    skellam_rdp_curve,
    skellam_rdp_numerical_1d,
    subsampled_skellam_rdp_numerical_1d,
)

# ---------------------------------------------------------------- (1) closed form


def test_skellam_rdp_hand_computed_value() -> None:
    # alpha=2, D1=D2=1, mu=1 -> variance 2. Gaussian part 2*1/(2*2) = 0.5;
    # discreteness min(((2*2-1)*1 + 6*1)/(4*2^2), 3*1/(2*2)) = min(9/16, 3/4) = 0.5625.
    assert skellam_rdp(2, 1.0, 1.0, 1.0) == pytest.approx(0.5 + 0.5625, rel=1e-15)
    # Large noise picks the 1/var^2 branch, small noise the 1/var one.
    # alpha=3, D1=4, D2=2, mu=0.5 -> var 1: 3*4/2 + min((5*4 + 24)/4, 12/2) = 6 + min(11, 6) = 12.
    assert skellam_rdp(3, 4.0, 2.0, 0.5) == pytest.approx(12.0, rel=1e-15)


def _google_reference_rdp(l1_sens: float, l2_sens: float, central_var: float, scale: float, order: int) -> float:
    """google-research/federated distributed_dp/accounting_utils._skellam_rdp, in the unscaled domain."""
    a, s, mu = order, scale, central_var
    return a / (2 * mu) * l2_sens**2 + min(
        ((2 * a - 1) * s * l2_sens**2 + 6 * l1_sens) / (4 * s**3 * mu**2), 3 * l1_sens / (2 * s * mu)
    )


@pytest.mark.parametrize("scale", [1.0, 3.0, 50.0])
@pytest.mark.parametrize("alpha", [2, 7, 64])
def test_parameterisation_matches_the_reference_implementation(scale: float, alpha: int) -> None:
    # The reference takes sensitivities and variance in the unscaled domain: D_int = s * D and
    # var_int = s^2 * var. Our mu is the Poisson parameter, var_int = 2 * mu.
    l1_int, l2_int, mu = 30.0, 12.0, 450.0
    ref = _google_reference_rdp(l1_int / scale, l2_int / scale, 2 * mu / scale**2, scale, alpha)
    assert skellam_rdp(alpha, l1_int, l2_int, mu) == pytest.approx(ref, rel=1e-12)


def test_skellam_rdp_is_monotone() -> None:
    mus = [0.5, 1.0, 5.0, 50.0, 1e3, 1e5]
    for alpha in (2, 3, 10, 100):
        values = [skellam_rdp(alpha, 8.0, 4.0, mu) for mu in mus]
        assert all(x > y for x, y in pairwise(values)), values  # more noise, less loss
    by_alpha = [skellam_rdp(a, 8.0, 4.0, 20.0) for a in range(2, 60)]
    assert all(x < y for x, y in pairwise(by_alpha))
    assert skellam_rdp(5, 8.0, 4.0, 20.0) < skellam_rdp(5, 9.0, 4.0, 20.0) < skellam_rdp(5, 9.0, 5.0, 20.0)


@pytest.mark.parametrize("alpha", [2, 8, 32, 256])
def test_large_mu_approaches_the_gaussian(alpha: int) -> None:
    l1, l2 = 40.0, 10.0
    excesses = []
    for mu in (1e2, 1e4, 1e6, 1e8):
        var = 2.0 * mu  # sigma^2 of the matching Gaussian
        gaussian = alpha * l2**2 / (2.0 * var)
        value = skellam_rdp(alpha, l1, l2, mu)
        # The theorem's extra term is at most ((2a - 1) D2^2 + 6 D1) / (4 var^2), O(1/mu) relative.
        bound = ((2 * alpha - 1) * l2**2 + 6 * l1) / (4.0 * var**2)
        assert gaussian <= value <= gaussian + bound * (1 + 1e-12)
        excesses.append(value / gaussian - 1.0)
    assert all(x > y for x, y in pairwise(excesses))
    assert excesses[-1] < 1e-6


# ---------------------------------------------------------------- (4) independent numerical check


@pytest.mark.parametrize("mu", [0.25, 1.0, 3.0, 20.0, 300.0, 2000.0])
@pytest.mark.parametrize("alpha", [2, 3, 6, 16, 64])
@pytest.mark.parametrize("shift", [1, 3])
def test_numerical_divergence_never_exceeds_the_closed_form(mu: float, alpha: int, shift: int) -> None:
    numeric = skellam_rdp_numerical_1d(alpha, shift, mu)
    closed = skellam_rdp(alpha, shift, shift, mu)
    assert 0.0 < numeric <= closed, f"numeric {numeric!r} > closed form {closed!r} (ratio {numeric / closed:.6f})"


@pytest.mark.parametrize("alpha", [2, 5, 32])
@pytest.mark.parametrize("shift", [1, 4])
def test_closed_form_is_tight_for_large_mu(alpha: int, shift: int) -> None:
    for mu in (1e3, 1e4):
        ratio = skellam_rdp_numerical_1d(alpha, shift, mu) / skellam_rdp(alpha, shift, shift, mu)
        # The discreteness term is O(1/mu) relative, and the Skellam converges to the Gaussian.
        assert ratio > 1.0 - 20.0 / mu, f"mu={mu}: numeric/closed = {ratio:.6f}"


@pytest.mark.parametrize(("alpha", "shift", "mu"), [(2, 1, 3.0), (5, 2, 3.0), (3.5, 1, 0.7), (12, 3, 40.0)])
def test_numerical_divergence_matches_a_naive_scipy_sum(alpha: float, shift: int, mu: float) -> None:
    # Independent pmf implementation (scipy.stats.skellam), plain linear-space sum of
    # P * (P / Q)^(alpha - 1) over a support far wider than the mass (sd <= 9 here).
    k = np.arange(-150, 151)
    p = stats.skellam.pmf(k - shift, mu, mu)
    q = stats.skellam.pmf(k, mu, mu)
    keep = q > 0
    naive = math.log(np.sum(p[keep] * (p[keep] / q[keep]) ** (alpha - 1))) / (alpha - 1)
    assert skellam_rdp_numerical_1d(alpha, shift, mu) == pytest.approx(naive, rel=1e-9)


def test_deep_tail_logpmf_series_agrees_with_bessel() -> None:
    for mu in (0.3, 5.0, 50.0):
        ks = np.arange(0, 120)
        via_bessel = np.log(special.ive(ks, 2 * mu))
        via_series = np.array([_skellam_logpmf_series(int(k), mu) for k in ks])
        finite = np.isfinite(via_bessel)
        np.testing.assert_allclose(via_series[finite], via_bessel[finite], rtol=1e-10, atol=1e-10)
    # Where e^{-2mu} I_k(2mu) underflows, the log-pmf stays finite and keeps decreasing.
    deep = _skellam_logpmf(np.array([300, 600, 1200]), 0.5)
    assert np.all(np.isfinite(deep)) and deep[0] > deep[1] > deep[2]


@pytest.mark.parametrize("mu", [0.5, 5.0, 50.0, 500.0])
@pytest.mark.parametrize("q", [0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("alpha", [2, 3, 8, 32])
def test_subsampled_bound_dominates_the_numerical_mixture(mu: float, q: float, alpha: int) -> None:
    shift = 2
    numeric = subsampled_skellam_rdp_numerical_1d(alpha, q, shift, mu)
    bound = poisson_subsampled_rdp(alpha, q, lambda order: skellam_rdp(order, shift, shift, mu))
    assert numeric <= bound, f"mixture divergence {numeric!r} > bound {bound!r} (ratio {numeric / bound:.4f})"


def test_numerical_mixture_at_q1_is_the_unsubsampled_divergence() -> None:
    assert subsampled_skellam_rdp_numerical_1d(4, 1.0, 2, 7.0) == pytest.approx(
        skellam_rdp_numerical_1d(4, 2, 7.0), rel=1e-12
    )


# ---------------------------------------------------------------- (2) subsampling vs Opacus


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("q", [0.001, 0.01, 0.1, 0.5])
@pytest.mark.parametrize("alpha", [2, 3, 8, 32, 128, 256])
def test_general_bound_brackets_opacus_tight_gaussian(sigma: float, q: float, alpha: int) -> None:
    # Gaussian RDP eps(l) = l / (2 sigma^2). Opacus's value is exact for the subsampled Gaussian
    # (Mironov, Talwar, Zhang 2019) and equals Zhu & Wang's expression without the factor 3, so the
    # general bound lies in [tight, tight + log(3) / (alpha - 1)].
    general = poisson_subsampled_rdp(alpha, q, lambda order: order / (2 * sigma**2))
    tight = float(opacus_rdp._compute_rdp(q, sigma, alpha))
    slack = math.log(3.0) / (alpha - 1)
    msg = f"general={general!r} opacus={tight!r} ratio={general / tight:.4f} slack={slack:.4g}"
    assert tight * (1 - 1e-12) <= general <= tight + slack + 1e-12, msg


def test_general_bound_in_epsilon_against_opacus() -> None:
    orders = list(DEFAULT_ORDERS)
    steps, delta = 100, 1e-5
    for sigma, q in [(1.0, 0.01), (1.0, 0.1), (2.0, 0.01), (5.0, 0.01)]:
        general = np.array([poisson_subsampled_rdp(a, q, lambda order, s=sigma: order / (2 * s**2)) for a in orders])
        tight = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        eps_general, _ = rdp_to_epsilon(orders, general * steps, delta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps_opacus, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=tight, delta=delta)
        # Per order the gap is at most steps * log(3) / (alpha - 1); so is the gap in epsilon.
        per_order = tight - (math.log(delta) + np.log(orders)) / (np.array(orders) - 1.0)
        per_order += np.log((np.array(orders) - 1.0) / np.array(orders))
        ceiling = float(np.min(per_order + steps * math.log(3.0) / (np.array(orders) - 1.0)))
        msg = f"sigma={sigma} q={q}: general eps {eps_general:.4f} vs opacus {eps_opacus:.4f}"
        msg += f" (ratio {eps_general / eps_opacus:.3f}, derived ceiling {ceiling:.4f})"
        assert eps_opacus * (1 - 1e-12) <= eps_general <= ceiling + 1e-9, msg


def test_rdp_to_epsilon_is_opacus_conversion() -> None:
    orders = list(range(2, 65))
    curve = opacus_rdp.compute_rdp(q=0.05, noise_multiplier=1.1, steps=300, orders=orders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps_ref, order_ref = opacus_rdp.get_privacy_spent(orders=orders, rdp=curve, delta=1e-6)
    eps, order = rdp_to_epsilon(orders, curve, 1e-6)
    assert eps == pytest.approx(float(eps_ref), rel=1e-14) and order == int(order_ref)


def test_subsampling_at_q1_is_the_base_and_never_exceeds_it() -> None:
    def base(order: int) -> float:
        return skellam_rdp(order, 20.0, 10.0, 80.0)

    assert poisson_subsampled_rdp(9, 1.0, base) == base(9)
    for q in (1e-6, 0.01, 0.3, 0.99):
        assert poisson_subsampled_rdp(9, q, base) <= base(9)


def test_subsampled_bound_is_monotone_in_q() -> None:
    def base(order: int) -> float:
        return skellam_rdp(order, 20.0, 10.0, 80.0)

    for alpha in (2, 5, 40):
        values = [poisson_subsampled_rdp(alpha, q, base) for q in (1e-4, 1e-3, 0.01, 0.1, 0.5)]
        assert all(x < y for x, y in pairwise(values)), values


def test_log_space_survives_huge_terms() -> None:
    # e^{(l - 1) eps(l)} = e^{255 * 256 * 50} would overflow any float outside log space.
    value = poisson_subsampled_rdp(256, 0.5, lambda order: 50.0 * order)
    assert math.isfinite(value) and 0 < value <= 50.0 * 256
    assert poisson_subsampled_rdp(4, 0.1, lambda order: math.inf) == math.inf


# ---------------------------------------------------------------- (3) composition and epsilon


def test_composition_adds_rdp() -> None:
    a = (0.1, 40.0, 20.0, 400.0)
    b = SkellamTask(0.05, 30.0, 15.0, 900.0)
    curve_a = skellam_rdp_curve([a])
    curve_b = skellam_rdp_curve([b])
    np.testing.assert_allclose(skellam_rdp_curve([a, b, a]), 2 * curve_a + curve_b, rtol=1e-14)
    np.testing.assert_allclose(skellam_rdp_curve([a] * 50), 50 * curve_a, rtol=1e-14)
    expected = rdp_to_epsilon(DEFAULT_ORDERS, 2 * curve_a + curve_b, 1e-5)
    assert skellam_epsilon([a, b, a], 1e-5) == expected
    # A tuple and the equivalent dataclass are the same task.
    assert skellam_epsilon([SkellamTask(*a)], 1e-5) == skellam_epsilon([a], 1e-5)


def test_each_task_curve_is_the_subsampled_skellam_bound() -> None:
    q, l1, l2, mu = 0.2, 12.0, 6.0, 150.0
    curve = skellam_rdp_curve([(q, l1, l2, mu)], orders=[2, 3, 17])
    for value, alpha in zip(curve, (2, 3, 17), strict=True):
        assert value == pytest.approx(
            poisson_subsampled_rdp(alpha, q, lambda order: skellam_rdp(order, l1, l2, mu)), rel=1e-14
        )


def test_epsilon_is_monotone_in_mu_q_and_steps() -> None:
    def eps(q: float, mu: float, n: int) -> float:
        return skellam_epsilon([(q, 40.0, 20.0, mu)] * n, 1e-5)[0]

    by_mu = [eps(0.1, mu, 50) for mu in (100.0, 400.0, 1600.0, 6400.0)]
    assert all(x > y for x, y in pairwise(by_mu)), by_mu
    by_q = [eps(q, 800.0, 50) for q in (0.01, 0.05, 0.2, 1.0)]
    assert all(x < y for x, y in pairwise(by_q)), by_q
    by_n = [eps(0.1, 800.0, n) for n in (1, 10, 100)]
    assert all(x < y for x, y in pairwise(by_n)), by_n


def test_best_order_is_reported_and_custom_orders_are_honoured() -> None:
    history = [(0.1, 40.0, 20.0, 400.0)] * 100
    eps, order = skellam_epsilon(history, 1e-5)
    assert order in DEFAULT_ORDERS
    eps_few, order_few = skellam_epsilon(history, 1e-5, orders=[2, 4, 8, 16, 32])
    assert order_few in (2, 4, 8, 16, 32) and eps_few >= eps
    assert skellam_epsilon([], 1e-5) == (0.0, 2)


def test_large_noise_epsilon_is_bracketed_by_the_subsampled_gaussian() -> None:
    # At large mu the Skellam curve is the Gaussian one (sigma^2 = 2 mu / D2^2) plus a per-order
    # excess c(alpha) <= ((2a - 1) D2^2 + 6 D1) / (4 var^2), increasing in alpha. Raising every
    # eps(l), l <= alpha, by c(alpha) raises Zhu & Wang's bound by at most c(alpha), and on the
    # Gaussian curve that bound is within log(3) / (alpha - 1) of Opacus. Hence, per order,
    # opacus <= ours <= opacus + steps * (log(3) / (alpha - 1) + c(alpha)).
    q, l1, l2, mu, steps, delta = 0.05, 100.0, 10.0, 5e4, 20, 1e-5
    var = 2 * mu
    sigma = math.sqrt(var) / l2
    orders = np.array(DEFAULT_ORDERS, dtype=float)
    eps, _ = skellam_epsilon([(q, l1, l2, mu)] * steps, delta)
    tight = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(DEFAULT_ORDERS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps_gauss, _ = opacus_rdp.get_privacy_spent(orders=list(DEFAULT_ORDERS), rdp=tight, delta=delta)
    excess = ((2 * orders - 1) * l2**2 + 6 * l1) / (4 * var**2)
    ceiling, _ = rdp_to_epsilon(DEFAULT_ORDERS, tight + steps * (math.log(3.0) / (orders - 1) + excess), delta)
    assert eps_gauss <= eps <= ceiling, (eps_gauss, eps, ceiling)


# ---------------------------------------------------------------- (5) calibration


def test_mu_for_epsilon_is_the_smallest_that_fits() -> None:
    kwargs = {"sample_rate": 0.1, "steps": 100, "l1_sensitivity": 40.0, "l2_sensitivity": 20.0}
    mu = skellam_mu_for_epsilon(3.0, 1e-5, rtol=1e-6, **kwargs)  # type: ignore[arg-type]
    task = (0.1, 40.0, 20.0, mu)
    assert skellam_epsilon([task] * 100, 1e-5)[0] <= 3.0
    smaller = (0.1, 40.0, 20.0, mu * (1 - 1e-4))
    assert skellam_epsilon([smaller] * 100, 1e-5)[0] > 3.0
    # Past spending needs more noise for the same budget, and an exhausted history is refused.
    history = [(0.1, 40.0, 20.0, 2000.0)] * 50
    assert skellam_mu_for_epsilon(3.0, 1e-5, history=history, **kwargs) > mu  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="history"):
        skellam_mu_for_epsilon(0.01, 1e-5, history=history, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- bad inputs


def _base(order: int) -> float:
    return float(order)


_PLAN = {"sample_rate": 0.1, "steps": 1, "l1_sensitivity": 2.0, "l2_sensitivity": 1.0}


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: skellam_rdp(1, 2.0, 1.0, 1.0), "alpha"),
        (lambda: skellam_rdp(2.5, 2.0, 1.0, 1.0), "alpha"),  # type: ignore[arg-type]
        (lambda: skellam_rdp(True, 2.0, 1.0, 1.0), "alpha"),
        (lambda: skellam_rdp(2, 2.0, 1.0, 0.0), "mu"),
        (lambda: skellam_rdp(2, 2.0, 1.0, -3.0), "mu"),
        (lambda: skellam_rdp(2, 2.0, 1.0, math.nan), "mu"),
        (lambda: skellam_rdp(2, 0.0, 1.0, 1.0), "l1_sensitivity"),
        (lambda: skellam_rdp(2, 2.0, -1.0, 1.0), "l2_sensitivity"),
        (lambda: skellam_rdp(2, 1.0, 2.0, 1.0), "l1_sensitivity"),
        (lambda: poisson_subsampled_rdp(2, 0.0, _base), "q"),
        (lambda: poisson_subsampled_rdp(2, 1.5, _base), "q"),
        (lambda: poisson_subsampled_rdp(2, math.nan, _base), "q"),
        (lambda: poisson_subsampled_rdp(1, 0.5, _base), "alpha"),
        (lambda: poisson_subsampled_rdp(2, 0.5, lambda order: -1.0), "rdp_fn"),
        (lambda: SkellamTask(0.0, 2.0, 1.0, 1.0), "sample_rate"),
        (lambda: SkellamTask(0.5, 2.0, 1.0, 0.0), "mu"),
        (lambda: skellam_epsilon([(0.5, 2.0, 1.0, 1.0)], 0.0), "delta"),
        (lambda: skellam_epsilon([(0.5, 2.0, 1.0, 1.0)], 1.0), "delta"),
        (lambda: skellam_epsilon([(0.5, 2.0, 1.0, 1.0)], 1e-5, orders=[1, 2]), "orders"),
        (lambda: skellam_epsilon([(0.5, 2.0, 1.0, 1.0)], 1e-5, orders=[]), "orders"),
        (lambda: skellam_epsilon([(0.5, 2.0, 1.0)], 1e-5), "task"),  # type: ignore[list-item]
        (lambda: skellam_rdp_numerical_1d(1.0, 1, 1.0), "alpha"),
        (lambda: skellam_rdp_numerical_1d(2, 1, 0.0), "mu"),
        (lambda: subsampled_skellam_rdp_numerical_1d(2, 0.0, 1, 1.0), "q"),
        (lambda: skellam_mu_for_epsilon(0.0, 1e-5, **_PLAN), "epsilon"),  # type: ignore[arg-type]
        (lambda: skellam_mu_for_epsilon(1.0, 1e-5, **{**_PLAN, "steps": 0}), "steps"),  # type: ignore[arg-type]
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=name):
        call()
