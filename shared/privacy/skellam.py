"""Record-level RDP accounting for distributed DP with Skellam noise and secure aggregation.

The mechanism accounted here: on each task a device Poisson-subsamples its records at a public
rate ``q``, sums their integer-encoded, L2-clipped gradients, adds its share of Skellam noise, and
secure aggregation reveals only the sum over at least ``m`` devices. Whatever the other devices
contribute, the released sum carries Skellam noise ``Sk(mu, mu)`` per coordinate, the difference of
two independent ``Poisson(mu)`` variables, with ``mu = m * mu_device`` (sums of independent
Skellams are Skellam with added parameters). The other devices' data are independent of the
record in question, so post-processing lets us account as if the server saw only this device's
subsampled sum plus that noise. Neighbouring datasets: one record of one device added or removed.

Parameterisation, stated once because papers differ: everywhere in this module ``mu`` is the
*Poisson* parameter, so the noise variance per coordinate is ``2 * mu`` (``scipy.stats.skellam(mu,
mu)``). Agarwal, Kairouz and Liu write ``Sk_{0, mu'}`` with pmf ``e^{-mu'} I_k(mu')`` whose
*variance* is ``mu'``; their ``mu'`` is our ``2 * mu``.

The pieces:

* :func:`skellam_rdp` -- closed-form RDP of the (unsubsampled) multi-dimensional Skellam mechanism.
* :func:`poisson_subsampled_rdp` -- Zhu & Wang's general upper bound for Poisson subsampling.
* :func:`skellam_epsilon` -- composition over tasks and Opacus's RDP -> (eps, delta) conversion.
* :func:`skellam_mu_for_epsilon` -- the smallest ``mu`` that keeps a plan within a budget.
* :func:`skellam_rdp_numerical_1d` and :func:`subsampled_skellam_rdp_numerical_1d` -- an
  independent numerical evaluation of the same divergences for one coordinate, for audits.
"""

from __future__ import annotations

import functools
import math
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 257))


# --------------------------------------------------------------------------- validation


def _check_order(alpha: object, name: str = "alpha") -> int:
    """Return ``alpha`` as an int >= 2, or raise ValueError naming the argument."""
    if isinstance(alpha, bool):
        raise ValueError(f"{name} must be an integer >= 2, got {alpha!r}")
    try:
        value = operator.index(alpha)  # type: ignore[arg-type]
    except TypeError:
        # Integral floats (2.0) are accepted; 2.5 is not, since the bounds here need integer orders.
        if isinstance(alpha, float) and alpha.is_integer():
            value = int(alpha)
        else:
            raise ValueError(f"{name} must be an integer >= 2, got {alpha!r}") from None
    if value < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {alpha!r}")
    return value


def _check_rate(q: float, name: str = "q") -> float:
    q = float(q)
    if not (0.0 < q <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {q!r}")
    return q


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_sensitivities(l1_sensitivity: float, l2_sensitivity: float) -> tuple[float, float]:
    l1 = _check_positive(l1_sensitivity, "l1_sensitivity")
    l2 = _check_positive(l2_sensitivity, "l2_sensitivity")
    # ||v||_1 >= ||v||_2 for every vector, so a smaller L1 bound cannot be a valid bound.
    if l1 < l2:
        raise ValueError(f"l1_sensitivity ({l1!r}) must be >= l2_sensitivity ({l2!r})")
    return l1, l2


def _check_orders(orders: Sequence[int]) -> tuple[int, ...]:
    checked = tuple(_check_order(a, "orders") for a in orders)
    if not checked:
        raise ValueError("orders must not be empty")
    return checked


# --------------------------------------------------------------------------- (1) Skellam RDP


def skellam_rdp(alpha: int, l1_sensitivity: float, l2_sensitivity: float, mu: float) -> float:
    r"""RDP of the multi-dimensional Skellam mechanism (no subsampling), at integer order ``alpha``.

    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning",
    NeurIPS 2021, arXiv:2110.04995: Theorem 3.5 bounds the Rényi divergence between a Skellam
    distribution and its shift by an integer :math:`\Delta` (one coordinate), and Corollary 3.6
    sums it over independent coordinates for a query with integer-valued output whose
    neighbouring difference has L1 norm at most :math:`\Delta_1` and L2 norm at most
    :math:`\Delta_2`. With :math:`\mu'` the paper's parameter (the per-coordinate *variance*), the
    mechanism is :math:`(\alpha, \varepsilon(\alpha))`-RDP for integer :math:`\alpha > 1` with

    .. math::

        \varepsilon(\alpha) = \frac{\alpha \Delta_2^2}{2\mu'}
            + \min\left( \frac{(2\alpha - 1)\Delta_2^2 + 6\Delta_1}{4\mu'^2},
                         \frac{3\Delta_1}{2\mu'} \right).

    Here the noise is ``Sk(mu, mu)`` (two ``Poisson(mu)``), so :math:`\mu' = 2\,\mu`. The first
    term is exactly the Gaussian mechanism's RDP at variance :math:`\mu'`; the second is the price
    of discreteness and is :math:`O(1/\mu'^2)` for large noise. The same expression (with
    ``central_var`` = :math:`\mu'`) is google-research/federated's
    ``distributed_dp/accounting_utils._skellam_rdp``; theorem numbers are those of the arXiv
    version (another version of the paper numbers the corollary 4.1).

    Parameters
    ----------
    alpha
        Rényi order, an integer >= 2 (the theorem is stated for integer orders).
    l1_sensitivity, l2_sensitivity
        Bounds on the L1 and L2 norms of the difference one record makes to the integer-encoded
        sum, in the integer (scaled) domain, rounding slack included. For an integer vector
        ``||v||_1 <= min(sqrt(d) ||v||_2, ||v||_2 ** 2)``.
    mu
        Poisson parameter of the aggregate noise ``Sk(mu, mu)`` per coordinate (variance ``2*mu``).

    Returns
    -------
    float
        An upper bound on the order-``alpha`` Rényi divergence, in nats.
    """
    a = _check_order(alpha)
    l1, l2 = _check_sensitivities(l1_sensitivity, l2_sensitivity)
    var = 2.0 * _check_positive(mu, "mu")
    gaussian_part = a * l2 * l2 / (2.0 * var)
    discreteness = min(((2 * a - 1) * l2 * l2 + 6.0 * l1) / (4.0 * var * var), 3.0 * l1 / (2.0 * var))
    return gaussian_part + discreteness


# --------------------------------------------------------------------------- (2) subsampling


def _log_subsampled_sum(alpha: int, q: float, base: np.ndarray) -> float:
    """Log of the bracket in Zhu & Wang's Theorem 6; ``base[l - 2]`` is ``eps(l)``, l = 2..alpha."""
    log_q, log_1mq = math.log(q), math.log1p(-q)
    ls = np.arange(2, alpha + 1)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(ls + 1) - special.gammaln(alpha - ls + 1)
    with np.errstate(invalid="ignore"):  # (l - 1) * inf is inf, never NaN, since l >= 2
        terms = log_binom + (alpha - ls) * log_1mq + ls * log_q + (ls - 1) * base[: alpha - 1]
    terms[1:] += math.log(3.0)  # the factor 3 on every l >= 3 term
    head = (alpha - 1) * log_1mq + math.log1p((alpha - 1) * q)
    return float(special.logsumexp(np.concatenate(([head], terms))))


def poisson_subsampled_rdp(alpha: int, q: float, rdp_fn: Callable[[int], float]) -> float:
    r"""Upper bound on the RDP of a Poisson-subsampled mechanism, for add/remove neighbours.

    Zhu & Wang, "Poisson Subsampled Rényi Differential Privacy", ICML 2019 (PMLR 97),
    Theorem 6 (general upper bound): if :math:`\mathcal{M}` is :math:`(l, \varepsilon(l))`-RDP for
    every integer :math:`l` in :math:`[2, \alpha]`, then for integer :math:`\alpha \ge 2` and
    sampling probability :math:`\gamma`, :math:`\mathcal{M} \circ \mathrm{PoissonSample}` is
    :math:`(\alpha, \varepsilon'(\alpha))`-RDP with

    .. math::

        \varepsilon'(\alpha) \le \frac{1}{\alpha - 1} \log\Big\{
            (1-\gamma)^{\alpha-1}(\alpha\gamma - \gamma + 1)
            + \binom{\alpha}{2}\gamma^2(1-\gamma)^{\alpha-2} e^{\varepsilon(2)}
            + 3 \sum_{l=3}^{\alpha} \binom{\alpha}{l} (1-\gamma)^{\alpha-l} \gamma^l
              e^{(l-1)\varepsilon(l)} \Big\}.

    No assumption on :math:`\mathcal{M}` beyond its RDP curve is needed. The same expression
    without the factor 3 is the paper's lower bound, and it is exact for the Gaussian mechanism;
    so the general bound exceeds the truth by at most :math:`\log(3)/(\alpha - 1)`.

    The sum is evaluated in log space (``logsumexp`` over log-binomials), so large orders and large
    ``eps(l)`` neither overflow nor lose the small terms. The result is also capped by
    ``rdp_fn(alpha)`` itself: Rényi divergence is jointly quasi-convex (van Erven & Harremoës,
    IEEE Trans. Inf. Theory 60(7), 2014), so subsampling never costs more than the base
    mechanism. At ``q == 1`` the base value is returned.

    Parameters
    ----------
    alpha
        Rényi order, an integer >= 2.
    q
        Poisson sampling probability, in (0, 1].
    rdp_fn
        The base mechanism's RDP curve: ``rdp_fn(l)`` for integer ``l`` in ``[2, alpha]``.

    Returns
    -------
    float
        An upper bound on the subsampled mechanism's order-``alpha`` RDP (may be ``inf``).
    """
    a = _check_order(alpha)
    q = _check_rate(q)
    base = np.array([float(rdp_fn(order)) for order in range(2, a + 1)])
    if np.any(np.isnan(base)) or np.any(base < 0):
        raise ValueError("rdp_fn must return non-negative numbers (inf allowed)")
    unamplified = float(base[-1])
    if q == 1.0:
        return unamplified
    return min(_log_subsampled_sum(a, q, base) / (a - 1), unamplified)


# --------------------------------------------------------------------------- (3) composition


@dataclass(frozen=True)
class SkellamTask:
    """One task's release: Poisson rate, record-level sensitivities (integer domain), aggregate ``mu``."""

    sample_rate: float
    l1_sensitivity: float
    l2_sensitivity: float
    mu: float

    def __post_init__(self) -> None:
        _check_rate(self.sample_rate, "sample_rate")
        _check_sensitivities(self.l1_sensitivity, self.l2_sensitivity)
        _check_positive(self.mu, "mu")


TaskLike = SkellamTask | Sequence[float]


def _as_task(task: TaskLike) -> SkellamTask:
    if isinstance(task, SkellamTask):
        return task
    if len(task) != 4:
        raise ValueError(f"a task is (q, l1_sensitivity, l2_sensitivity, mu), got {task!r}")
    q, l1, l2, mu = task
    return SkellamTask(float(q), float(l1), float(l2), float(mu))


@functools.lru_cache(maxsize=4096)
def _task_rdp_curve(task: SkellamTask, max_order: int) -> tuple[float, ...]:
    """Subsampled-Skellam RDP bound of ONE task at every order 2..max_order.

    Pure and the dominant cost of accounting (O(max_order^2)); devices repeat few distinct tasks.
    """
    base = np.array(
        [skellam_rdp(order, task.l1_sensitivity, task.l2_sensitivity, task.mu) for order in range(2, max_order + 1)]
    )
    if task.sample_rate == 1.0:
        return tuple(float(v) for v in base)
    return tuple(
        min(_log_subsampled_sum(a, task.sample_rate, base) / (a - 1), float(base[a - 2]))
        for a in range(2, max_order + 1)
    )


def rdp_to_epsilon(orders: Sequence[int], rdp: Sequence[float] | np.ndarray, delta: float) -> tuple[float, int]:
    r"""(eps, best order) from an RDP curve, by the conversion Opacus's RDP accountant uses.

    Balle, Barthe, Gaboardi, Hsu, Sato, "Hypothesis Testing Interpretations and Rényi
    Differential Privacy", AISTATS 2020, Theorem 21 (arXiv:1905.09982), as implemented in
    ``opacus.accountants.analysis.rdp.get_privacy_spent``:

    .. math::

        \varepsilon = \min_\alpha \; \mathrm{rdp}(\alpha)
            - \frac{\log\delta + \log\alpha}{\alpha - 1} + \log\frac{\alpha - 1}{\alpha}.

    Opacus warns when the optimum sits at an end of the order range; this returns the order so
    that the caller can tell instead.
    """
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    a = np.asarray(orders, dtype=float)
    r = np.asarray(rdp, dtype=float)
    if a.shape != r.shape:
        raise ValueError(f"orders and rdp must have the same length, got {a.size} and {r.size}")
    eps = r - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    if np.all(np.isinf(eps)):
        return math.inf, int(a[0])
    best = int(np.argmin(eps))
    return float(eps[best]), int(a[best])


def skellam_rdp_curve(steps_history: Sequence[TaskLike], orders: Sequence[int] = DEFAULT_ORDERS) -> np.ndarray:
    """Total RDP of the composition of ``steps_history`` at each of ``orders`` (RDP adds up)."""
    checked = _check_orders(orders)
    max_order = max(checked)
    total = np.zeros(len(checked))
    for task, count in Counter(_as_task(t) for t in steps_history).items():
        curve = _task_rdp_curve(task, max_order)
        total = total + count * np.array([curve[a - 2] for a in checked])
    return total


def skellam_epsilon(
    steps_history: Sequence[TaskLike], delta: float, orders: Sequence[int] = DEFAULT_ORDERS
) -> tuple[float, int]:
    """Epsilon at ``delta`` of a device's history of Skellam tasks, and the order that attains it.

    Parameters
    ----------
    steps_history
        One entry per task: a :class:`SkellamTask` or a tuple ``(q, l1_sensitivity,
        l2_sensitivity, mu)``, with ``mu`` the aggregate Poisson parameter the task was unmasked
        with (the noise of the devices actually summed, never the planned count if fewer survived).
    delta
        Target delta, in (0, 1).
    orders
        Integer Rényi orders >= 2 to minimise over (default 2..256).

    Returns
    -------
    tuple[float, int]
        ``(epsilon, order)``; ``(0.0, orders[0])`` for an empty history.

    Notes
    -----
    Each task's RDP is ``poisson_subsampled_rdp(alpha, q, skellam_rdp(., l1, l2, mu))``;
    tasks compose by adding RDP (Mironov, "Rényi Differential Privacy", CSF 2017, Proposition 1),
    and the sum is converted by :func:`rdp_to_epsilon`.
    """
    checked = _check_orders(orders)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not steps_history:
        return 0.0, checked[0]
    return rdp_to_epsilon(checked, skellam_rdp_curve(steps_history, checked), delta)


# --------------------------------------------------------------------------- (5) calibration


def skellam_mu_for_epsilon(
    epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    steps: int,
    l1_sensitivity: float,
    l2_sensitivity: float,
    history: Sequence[TaskLike] = (),
    orders: Sequence[int] = DEFAULT_ORDERS,
    rtol: float = 1e-6,
) -> float:
    """Smallest aggregate ``mu`` (to ``rtol``) keeping ``history`` plus ``steps`` new tasks within ``epsilon``.

    Every bound used is non-increasing in ``mu``, so epsilon is too and bisection applies. The
    value returned is the upper end of the final bracket: it always satisfies the budget, and
    ``mu * (1 - rtol)`` may not.

    Raises
    ------
    ValueError
        On bad arguments, or when ``history`` alone already reaches ``epsilon`` (no amount of
        noise on the new tasks can help).
    """
    epsilon = _check_positive(epsilon, "epsilon")
    if isinstance(steps, bool) or operator.index(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (0.0 < rtol < 1.0):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    past = [_as_task(t) for t in history]
    spent, _ = skellam_epsilon(past, delta, orders)
    if spent >= epsilon:
        raise ValueError(f"history alone reaches epsilon {spent:.4f} >= budget {epsilon:.4f}")

    def eps_at(mu: float) -> float:
        task = SkellamTask(sample_rate, l1_sensitivity, l2_sensitivity, mu)
        return skellam_epsilon([*past, *([task] * int(steps))], delta, orders)[0]

    lo, hi = 0.0, max(1.0, float(l2_sensitivity) ** 2)
    while eps_at(hi) > epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise ValueError("no finite mu meets the budget")
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if eps_at(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


# --------------------------------------------------------------------------- (4) numerical check


def _skellam_logpmf_series(k: int, mu: float) -> float:
    """log P[Sk(mu, mu) = k] for k >= 0 from the Poisson convolution, for where ``ive`` underflows.

    P[Sk = k] = sum_j Pois(j; mu) Pois(j + k; mu) = e^{-2 mu} sum_j mu^(2j + k) / (j! (j + k)!).
    The summands are unimodal in j with peak j* where (j + 1)(j + k + 1) = mu^2; summing past
    j* + 60 sqrt(j* + 1) + 60 leaves a tail below e^-1000 of the peak.
    """
    j_peak = max(0.0, (-(k + 2) + math.sqrt(k * k + 4.0 * mu * mu)) / 2.0)
    j = np.arange(0, int(j_peak + 60.0 * math.sqrt(j_peak + 1.0) + 60.0) + 1)
    terms = (2 * j + k) * math.log(mu) - special.gammaln(j + 1) - special.gammaln(j + k + 1)
    return float(special.logsumexp(terms)) - 2.0 * mu


def _skellam_logpmf(k: np.ndarray, mu: float) -> np.ndarray:
    """log P[Sk(mu, mu) = k] = log(e^{-2 mu} I_|k|(2 mu)), exact in log space even deep in the tails."""
    abs_k = np.abs(k)
    with np.errstate(divide="ignore"):
        out = np.log(special.ive(abs_k, 2.0 * mu))
    underflow = ~np.isfinite(out)
    if np.any(underflow):
        # Deep tails: e^{-2 mu} I_k(2 mu) is below the smallest double, but its log is not.
        cache: dict[int, float] = {}
        for idx in np.flatnonzero(underflow):
            kk = int(abs_k[idx])
            if kk not in cache:
                cache[kk] = _skellam_logpmf_series(kk, mu)
            out[idx] = cache[kk]
    return out


def _renyi_sum_log(
    log_terms: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, margin: float, max_doublings: int = 8
) -> float:
    """log sum_k exp(log_terms(k)) over the integers, truncated where the terms are negligible.

    The window [lo - margin, hi + margin] grows (margin doubling) until both edge terms are below
    e^-60 times the sum. Every term is positive, so truncation can only lower the result: the value
    is a lower bound on the true sum up to rounding, and the omitted tail is negligible by this
    stopping rule (checked numerically, not proved).
    """
    for _ in range(max_doublings):
        k = np.arange(math.floor(lo - margin), math.ceil(hi + margin) + 1)
        t = log_terms(k)
        if np.any(np.isnan(t)) or np.any(t == np.inf):
            raise ValueError("non-finite term in the Rényi sum; parameters out of numerical range")
        total = float(special.logsumexp(t))
        if max(t[0], t[-1]) < total - 60.0:
            return total
        margin *= 2.0
    raise ValueError("numerical Rényi divergence did not converge; parameters out of numerical range")


def _window(a: float, d: int, mu: float) -> tuple[float, float, float]:
    """A summation window covering 0, the shift and both Gaussian-tilt peaks a*d and (1 - a)*d."""
    points = (0.0, float(d), a * d, (1.0 - a) * d)
    return min(points), max(points), 12.0 * math.sqrt(2.0 * mu) + 12.0


def skellam_rdp_numerical_1d(alpha: float, shift: int, mu: float) -> float:
    r"""Numerical :math:`\max(D_\alpha(P\|Q), D_\alpha(Q\|P))`, ``Q = Sk(mu, mu)``, ``P`` = ``Q`` shifted by ``shift``.

    An independent check of :func:`skellam_rdp` for one coordinate (``l1 = l2 = |shift|``):
    :math:`D_\alpha(P\|Q) = \frac{1}{\alpha-1}\log\sum_k P(k)^\alpha Q(k)^{1-\alpha}` summed
    directly from the pmf :math:`e^{-2\mu} I_{|k|}(2\mu)` (``scipy.special.ive``; in the deep tails,
    where that underflows, the Poisson-convolution series in log space) over a window that covers
    0, the shift and the tilt peaks and grows until the edge terms are below :math:`e^{-60}` of the
    sum. Q is symmetric, so both
    directions are equal; both are computed anyway. Truncation drops only positive terms, so this
    is a lower bound on the true divergence up to rounding (and the tail beyond the window is
    negligible by the stopping rule, not by a proof). Any real ``alpha > 1`` is accepted here.
    """
    a = float(alpha)
    if not (a > 1.0 and math.isfinite(a)):
        raise ValueError(f"alpha must be a finite number > 1, got {alpha!r}")
    d = operator.index(shift)
    mu = _check_positive(mu, "mu")
    if d == 0:
        return 0.0
    lo, hi, margin = _window(a, d, mu)
    forward = _renyi_sum_log(
        lambda k: a * _skellam_logpmf(k - d, mu) + (1 - a) * _skellam_logpmf(k, mu), lo, hi, margin
    )
    backward = _renyi_sum_log(
        lambda k: a * _skellam_logpmf(k, mu) + (1 - a) * _skellam_logpmf(k - d, mu), lo, hi, margin
    )
    return max(forward, backward) / (a - 1)


def subsampled_skellam_rdp_numerical_1d(alpha: float, q: float, shift: int, mu: float) -> float:
    r"""Numerical RDP of one Poisson-subsampled record on one coordinate with ``Sk(mu, mu)`` noise.

    With ``Q = Sk(mu, mu)`` and mixture ``P = (1 - q) Q + q Q(. - shift)`` (the record absent /
    present with probability ``q``), returns :math:`\max(D_\alpha(P\|Q), D_\alpha(Q\|P))`, summed
    as in :func:`skellam_rdp_numerical_1d`. This is the divergence for this specific pair of
    neighbours, so any valid RDP bound for the subsampled mechanism must be at least this.
    """
    a = float(alpha)
    if not (a > 1.0 and math.isfinite(a)):
        raise ValueError(f"alpha must be a finite number > 1, got {alpha!r}")
    q = _check_rate(q)
    d = operator.index(shift)
    mu = _check_positive(mu, "mu")
    if d == 0:
        return 0.0

    def log_mix(k: np.ndarray) -> np.ndarray:
        if q == 1.0:
            return _skellam_logpmf(k - d, mu)
        return np.logaddexp(math.log1p(-q) + _skellam_logpmf(k, mu), math.log(q) + _skellam_logpmf(k - d, mu))

    lo, hi, margin = _window(a, d, mu)
    forward = _renyi_sum_log(lambda k: a * log_mix(k) + (1 - a) * _skellam_logpmf(k, mu), lo, hi, margin)
    backward = _renyi_sum_log(lambda k: a * _skellam_logpmf(k, mu) + (1 - a) * log_mix(k), lo, hi, margin)
    return max(forward, backward) / (a - 1)
