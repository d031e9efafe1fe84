"""The audit's independent recomputation of every claimed ε.

Each claim is recomputed by an implementation other than the one that produced it.

Record level
------------
Claims come from Opacus's RDP accountant (:func:`shared.privacy.accounting.rdp_epsilon`) over a
device history ``[(noise_multiplier, sample_rate, steps), ...]`` of Poisson-subsampled Gaussian
steps (add/remove-one neighbouring). Three recomputations, all on Opacus's default orders
(1.1 … 63) so that every one minimises over the same grid:

* :func:`record_level_epsilon_quadrature` — **use this one for the tolerance check.** It
  evaluates the definition ``A_α = E_{z~N(0,σ²)}[((1-q) + q·exp((2z-1)/(2σ²)))^α]``
  (Mironov, Talwar & Zhang 2019, Sec. 3) by adaptive quadrature in log space (scipy), instead of
  the series expansion both libraries use, composes ``steps · log(A_α)/(α-1)`` and converts with
  dp-accounting's ``compute_epsilon``. It shares no code with Opacus. Against 40-digit mpmath
  quadrature its ``log A_α`` agrees to ~4e-11 relative (tests/test_independent.py).
* :func:`record_level_epsilon` — dp-accounting's ``RdpAccountant`` with
  ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``. CAUTION:
  dp-accounting 0.6.0 is a *conservative upper bound* at fractional orders, not the same number.
  Its ``_compute_log_a_frac`` sums ``|C(α, i)|`` (``_log_comb`` uses ``gammaln``, i.e. log of the
  absolute value) where the exact series alternates in sign, and when that series has not met
  its stopping rule after 1000 terms it returns ``inf`` and drops the order. Opacus keeps the
  signs and matches the exact integral. Measured on the fedrec grid (δ=1e-5): agreement within
  0.13% while ε ≤ 10, but up to +40% above Opacus (and above the exact value) at ε in the
  hundreds (σ=0.6, q=1/2, 500 steps: 584 vs 350; exact 350). It never falls below the exact
  value, so it is a valid bound, and a claim above it by more than :data:`TOLERANCE` is an
  over-claim worth a look; it is not a tight check of an Opacus claim at large ε.
* :func:`record_level_epsilon_flower` — Flower 1.42's ``RdpAccountant`` (see below).

Claims of Opacus's ``"prv"`` accountant (tight, so smaller than RDP's) are recomputed with
dp-accounting's privacy-loss-distribution accountant (:func:`record_level_epsilon_pld`) and checked to
1% or 0.02 absolute, whichever is larger (:func:`prv_claim_agrees`): PRV's own estimate carries an
absolute error of up to 0.01.

User level
----------
Claims come from :class:`shared.privacy.user_level.RenyiFilter` (closed-form Gaussian RDP at one
fixed order). :func:`user_level_epsilon` recomputes them with dp-accounting at that single order,
one ``GaussianDpEvent(z / w_i)`` per release (for ``q = 1`` dp-accounting uses the closed form
``α/(2σ²)`` too, so the check is of the weights, orders, composition and conversion).

Flower's accountant
-------------------
``flwr.supercore.privacy_accounting.rdp_accountant.RdpAccountant`` fits record-level histories:
with ``SamplingMethod.POISSON`` (and ``NeighboringRelation.ADD_OR_REMOVE_ONE``, the only relation
Flower allows with Poisson) each ``GaussianPrivacyEvent`` becomes
``PoissonSampledDpEvent(sample_size / population_size, GaussianDpEvent(σ))``, and it accepts
custom orders. Its one constraint is that ``population_size`` is fixed per accountant while our
sample rates are ``1/k`` with ``k`` varying; :func:`record_level_epsilon_flower` uses
``population_size = lcm(k)`` and ``sample_size = lcm(k) / k``. Python's ``int / int`` is correctly
rounded, so ``sample_size / population_size`` is bit-identical to the float ``1/k`` the device
used; a rate that is not exactly ``1/k`` is refused rather than approximated. Flower wraps
dp-accounting, so it returns exactly :func:`record_level_epsilon` (same upper bound, same caveat):
it checks Flower's event translation, not a further independent implementation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
from dp_accounting import rdp as dp_rdp
from scipy import integrate

from shared.privacy.user_level import DEFAULT_ORDERS

# Relative tolerance between a claim and its recomputation. The claim (Opacus) sums the
# fractional-order subsampled-Gaussian RDP as a signed series truncated at terms below e^-30;
# the recomputation integrates the same quantity numerically (scipy quad, rtol 1e-12) and both
# go through a different ε conversion routine (Opacus's vs dp-accounting's). Those numerical
# differences are tiny: on the fedrec grid (σ ∈ {0.6, 1, 1.5}, q ∈ {1/2, 1/7, 1/13, 1/92},
# 10–500 steps) the observed maximum is 2.7e-12 relative (tests/test_independent.py). 1% leaves
# many orders of magnitude of room for them while catching the errors that matter: a claim
# that is 10% low, a wrong δ or σ, or a ledger that lost a substantial part of its history all
# move ε by well over 1%. It bounds the error in ε, not in the ledger: losing a CHEAP entry
# (e.g. 200 steps at σ=1, q=1/92 next to 300 at σ=0.6) moves ε by ~1% and can pass.
TOLERANCE = 0.01


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_history(history: Sequence[tuple[float, float, int]]) -> None:
    for sigma, q, steps in history:
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"noise multiplier must be positive, got {sigma!r}")
        if not (0 < q <= 1):
            raise ValueError(f"sample rate must be in (0, 1], got {q!r}")
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")


def record_level_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of a record-level history, recomputed with dp-accounting's RDP accountant.

    Each entry ``(σ, q, steps)`` is ``steps`` self-composed Poisson-subsampled Gaussian steps,
    evaluated on Opacus's default orders (1.1 … 63) and minimised over them like Opacus.
    """
    _check_delta(delta)
    _check_history(history)
    if not any(int(steps) > 0 for _, _, steps in history):
        return 0.0
    accountant = dp_rdp.RdpAccountant(
        orders=list(DEFAULT_ORDERS),
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )
    for sigma, q, steps in history:
        if int(steps) == 0:
            continue
        step = dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(sigma)))
        accountant.compose(dp_accounting.SelfComposedDpEvent(step, int(steps)))
    return float(accountant.get_epsilon(delta))


def _log_a_quadrature(q: float, sigma: float, order: float) -> float:
    """``log A_α`` for the Poisson-subsampled Gaussian, by numerical integration.

    ``A_α = ∫ φ_σ(z) · ((1-q) + q·exp((2z-1)/(2σ²)))^α dz`` where ``φ_σ`` is the N(0, σ²) density:
    the α-th moment of the likelihood ratio between ``(1-q)·N(0,σ²) + q·N(1,σ²)`` and ``N(0,σ²)``
    (Mironov, Talwar & Zhang 2019; the quantity Opacus and dp-accounting expand as a series).
    """
    s2 = sigma * sigma
    log1mq, logq = math.log1p(-q), math.log(q)
    log_norm = -math.log(sigma * math.sqrt(2.0 * math.pi))

    def log_integrand(z: float) -> float:
        x = logq + (2.0 * z - 1.0) / (2.0 * s2)
        log_mix = max(log1mq, x) + math.log1p(math.exp(-abs(log1mq - x)))
        return log_norm - z * z / (2.0 * s2) + order * log_mix

    # The integrand has (at most) two bumps, near 0 (the 1-q part) and near z = α (the q part),
    # each of width σ; 40σ beyond them the neglected mass is below e^-800.
    lo, hi = -40.0 * sigma, order + 40.0 * sigma
    grid = np.linspace(lo, hi, 1001)
    log_grid = log_norm - grid**2 / (2.0 * s2) + order * np.logaddexp(log1mq, logq + (2.0 * grid - 1.0) / (2.0 * s2))
    peak = int(np.argmax(log_grid))
    # Integrate exp(f - max f) so that nothing overflows (A_63 at σ=0.6 is about e^5500).
    shift = float(log_grid[peak])
    z0 = s2 * math.log(1.0 / q - 1.0) + 0.5  # where the two parts of the mixture are equal (q < 1)
    points = sorted(p for p in {0.0, z0, order, float(grid[peak])} if lo < p < hi)
    value, abserr = integrate.quad(
        lambda z: math.exp(log_integrand(z) - shift), lo, hi, points=points, limit=1000, epsabs=0.0, epsrel=1e-12
    )
    if not (value > 0 and abserr <= 1e-9 * value):
        raise ArithmeticError(f"quadrature did not converge for q={q}, sigma={sigma}, order={order}: {value}±{abserr}")
    return shift + math.log(value)


@functools.lru_cache(maxsize=1024)
def _unit_rdp_quadrature(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one subsampled Gaussian step at each default order (memoised: few distinct (σ, q))."""
    if sample_rate == 1.0:
        return tuple(order / (2.0 * noise_multiplier**2) for order in DEFAULT_ORDERS)
    return tuple(
        max(0.0, _log_a_quadrature(sample_rate, noise_multiplier, order) / (order - 1.0)) for order in DEFAULT_ORDERS
    )


def record_level_epsilon_quadrature(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of a record-level history, from the RDP *definition* by numerical integration.

    The audit's reference for Opacus RDP claims (see the module docstring): per-step RDP at each
    of Opacus's default orders by quadrature, times ``steps``, summed over entries, converted to
    ε with dp-accounting's ``compute_epsilon`` (minimum over the orders).
    """
    _check_delta(delta)
    _check_history(history)
    total = np.zeros(len(DEFAULT_ORDERS))
    for sigma, q, steps in history:
        if int(steps) > 0:
            total += int(steps) * np.asarray(_unit_rdp_quadrature(float(sigma), float(q)))
    if not total.any():
        return 0.0
    eps, _ = dp_rdp.compute_epsilon(DEFAULT_ORDERS, total, delta)
    return float(eps)


def _exact_inverse(q: float) -> int:
    """The integer ``k`` with ``1/k == q`` exactly in floats, or ValueError."""
    k = round(1.0 / q)
    if k < 1 or 1 / k != q:
        raise ValueError(f"sample rate {q!r} is not exactly 1/k for an integer k; Flower cannot represent it")
    return k


def record_level_epsilon_flower(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Same as :func:`record_level_epsilon`, through Flower's ``RdpAccountant``.

    Sample rates must be exactly ``1/k`` (fedrec's ``1 / ceil(N / batch_size)``); see the module
    docstring for how they are mapped onto Flower's fixed population size.
    """
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    _check_delta(delta)
    _check_history(history)
    entries = [(float(s), _exact_inverse(float(q)), int(n)) for s, q, n in history if int(n) > 0]
    if not entries:
        return 0.0
    population = math.lcm(*(k for _, k, _ in entries))
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        ),
        orders=tuple(float(o) for o in DEFAULT_ORDERS),
    )
    for sigma, k, steps in entries:
        event = GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=population // k, population_size=population)
        accountant.compose(event, count=steps)
    return float(accountant.get_epsilon(delta))


def user_level_epsilon(weights: Sequence[float], noise_multiplier: float, delta: float, order: float) -> float:
    """ε at ``delta`` of a device's user-level releases, at the filter's single fixed ``order``.

    Each release with weight ``w`` has sensitivity ``w·S`` under noise std ``z·S``, i.e. a
    Gaussian with noise multiplier ``z / w``; dp-accounting composes them and converts at
    ``order`` alone (the filter's guarantee holds at that order only, so no minimisation).
    """
    _check_delta(delta)
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier!r}")
    if not (math.isfinite(order) and order > 1):
        raise ValueError(f"order must be > 1, got {order!r}")
    if not weights:
        return 0.0
    accountant = dp_rdp.RdpAccountant(
        orders=[float(order)],
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )
    for w in weights:
        if not (math.isfinite(w) and 0 < w <= 1):
            raise ValueError(f"weight must be in (0, 1], got {w!r}")
        accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier / float(w)))
    return float(accountant.get_epsilon(delta))


# Opacus's PRV accountant estimates ε to within ``eps_error`` (0.01 by default, absolute), and the
# PLD recomputation discretises losses at 1e-4: a PRV claim is checked to TOLERANCE relative or
# twice Opacus's absolute error, whichever is larger (measured on the fedrec grid: at most 0.013
# absolute, at ε ≈ 0.13 where that is 8% relative; below 1% relative once ε > 1; PRV above PLD;
# tests/test_independent.py).
PRV_ABSOLUTE_TOLERANCE = 0.02
_PLD_DISCRETIZATION = 1e-4


def record_level_epsilon_pld(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Record-level ε of ``[(sigma, q, steps), ...]`` with dp-accounting's privacy-loss-distribution accountant.

    The recomputation for claims made by Opacus's ``"prv"`` accountant, which like the PLD
    accountant tracks the whole privacy-loss distribution (tight, unlike RDP): the two are
    independent implementations of near-exact accounting of Poisson-subsampled Gaussian steps
    (add/remove-one). Opacus's PRV code shares nothing with dp-accounting.
    """
    _check_delta(delta)
    _check_history(history)
    if not history:
        return 0.0
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
    for sigma, q, steps in history:
        if int(steps) == 0:
            continue
        event = dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(sigma)))
        accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))


def prv_claim_agrees(claimed: float, recomputed: float) -> bool:
    """Whether a PRV claim agrees with its PLD recomputation (see :data:`PRV_ABSOLUTE_TOLERANCE`)."""
    return abs(claimed - recomputed) <= max(TOLERANCE * abs(recomputed), PRV_ABSOLUTE_TOLERANCE)


def relative_error(claimed: float, recomputed: float) -> float:
    """``|claimed - recomputed| / recomputed``; 0 when both are 0, inf when only the claim is wrong-signed to 0."""
    if recomputed == claimed:
        return 0.0
    if recomputed == 0 or not math.isfinite(recomputed) or not math.isfinite(claimed):
        return math.inf
    return abs(claimed - recomputed) / abs(recomputed)


def within_tolerance(claimed: float, recomputed: float, tolerance: float = TOLERANCE) -> bool:
    """Whether a claim agrees with its recomputation to ``tolerance`` (relative)."""
    return relative_error(claimed, recomputed) <= tolerance
