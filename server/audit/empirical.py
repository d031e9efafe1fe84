"""Empirical privacy lower bounds from one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

"Privacy Auditing with One (1) Training Run" inserts ``m`` canaries, each included
independently with probability 1/2 (the true bits ``S_i``). An attacker who sees only
the algorithm's output guesses ``T_i`` in {+1 (included), -1 (excluded), 0 (abstain)}.
If the algorithm is (ε, δ)-DP with respect to every canary, the number ``W`` of correct
guesses among ``r`` guesses is stochastically dominated by ``Binomial(r, e^ε/(1+e^ε))``
up to a δ term (the approximate-DP form of their main theorem, evaluated numerically as
in the paper's p-value procedure for (ε, δ)):

    P[W >= v]  <=  P[B >= v]  +  2 m δ · max_{i=1..v} P[v - i <= B < v] / i,   B ~ Binomial(r, q(ε)).

Observing ``v`` correct out of ``r`` therefore rejects "(ε, δ)-DP" at level
``β = 1 - confidence`` whenever that right-hand side is below ``β``; the empirical lower
bound is the largest such ε. With ``δ = 0`` the δ term vanishes and the bound is the
pure-ε binomial tail test.

The δ term caps what any run can certify. Even a perfect attacker (every guess right)
gets at most :func:`audit_ceiling`: about 4.26 for 943 canaries at δ = 1e-5 and the
default grid, and at most about 5.4 however many canaries there are (the term ``2 m δ``
grows with ``m`` as fast as the guesses do; the maximum is near 5,000 canaries). Even a
single pre-registered test that guesses every canary tends to ``ln(β / (2 δ))`` (7.8 at
β = 0.05, δ = 1e-5; at most about 8.1, near 100,000 canaries). An audit whose ceiling
lies below the accounted ε cannot fail, so it must report "inconclusive", never "passed".

Everything here is pure numpy/scipy: no Flower, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

__all__ = [
    "DEFAULT_K_FRACTIONS",
    "AuditResult",
    "audit_ceiling",
    "best_lower_bound",
    "guesses_from_scores",
    "one_run_lower_bound",
    "p_value",
    "p_value_pure",
]

# A small public grid of (k+, k-) choices as fractions of the number of scored canaries.
# It is fixed before any truth is seen; best_lower_bound pays for trying all of them
# with a Bonferroni correction.
DEFAULT_K_FRACTIONS: tuple[tuple[float, float], ...] = (
    (0.02, 0.0),
    (0.05, 0.0),
    (0.1, 0.0),
    (0.2, 0.0),
    (0.3, 0.0),
    (0.1, 0.1),
    (0.2, 0.2),
)

_BISECTION_STEPS = 60
_EPS_CAP = 200.0  # q(200) == 1 in float64: no finite data rejects a larger ε


def _check_counts(num_guesses: int, num_correct: int, num_canaries: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            f"need 0 <= num_correct ({num_correct}) <= num_guesses ({num_guesses}) <= num_canaries ({num_canaries})"
        )


def p_value_pure(num_guesses: int, num_correct: int, epsilon: float) -> float:
    """``P[Binomial(r, e^ε/(1+e^ε)) >= v]``: the p-value of "pure ε-DP" given v correct of r guesses.

    Parameters
    ----------
    num_guesses
        ``r``, the guesses made (abstentions excluded).
    num_correct
        ``v``, the correct guesses.
    epsilon
        The ε of the null hypothesis (>= 0).
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    _check_counts(num_guesses, num_correct, num_guesses)
    q = float(special.expit(epsilon))  # accuracy of ε-DP randomized response
    return float(stats.binom.sf(num_correct - 1, num_guesses, q))


def p_value(num_guesses: int, num_correct: int, epsilon: float, delta: float, num_canaries: int | None = None) -> float:
    """The paper's p-value of "(ε, δ)-DP" given ``v`` correct out of ``r`` guesses among ``m`` canaries.

    ``P[B >= v] + 2 m δ · max_{i=1..v} P[v-i <= B < v] / i`` with
    ``B ~ Binomial(r, e^ε/(1+e^ε))``, capped at 1 (Steinke, Nasr and Jagielski 2023,
    the approximate-DP theorem and its numerical algorithm). With ``δ = 0`` it equals
    :func:`p_value_pure`.

    Parameters
    ----------
    num_guesses, num_correct
        ``r`` and ``v``.
    epsilon, delta
        The null hypothesis.
    num_canaries
        ``m``, every canary that was randomised (guessed or not). ``None`` means ``m = r``,
        which is exact only when the attacker guessed on every canary: the δ term grows
        with ``m``, so pass the true count whenever the attacker abstains.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must lie in [0, 1], got {delta}")
    m = num_guesses if num_canaries is None else num_canaries
    _check_counts(num_guesses, num_correct, m)
    r, v = num_guesses, num_correct
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0.0 or v == 0:
        return min(beta, 1.0)
    # alpha = max_i P[v-i <= B < v] / i: cumulative pmf from v-1 downwards, divided by i.
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def one_run_lower_bound(
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
    num_canaries: int | None = None,
) -> float:
    """The largest ε that ``v`` correct guesses out of ``r`` reject at the given confidence.

    Bisection on ε of :func:`p_value` (the (ε, δ) version; with ``delta = 0`` it is the
    pure-ε binomial test): returns ``sup {ε : p_value(ε) <= 1 - confidence}``, i.e. with
    probability at least ``confidence`` over the canaries' random inclusion, the
    mechanism is *not* (ε', δ)-DP for any ε' below the returned value.

    Parameters
    ----------
    num_guesses
        ``r``, guesses made (abstentions excluded).
    num_correct
        ``v``, correct guesses.
    delta
        δ of the guarantee being audited.
    confidence
        ``1 - β``; 0.95 by default.
    num_canaries
        ``m``, all randomised canaries (see :func:`p_value`); ``None`` means ``m = r``.

    Returns
    -------
    float
        The lower bound; 0.0 when the data give no evidence against ε = 0
        (e.g. no guesses, or no better than coin flips).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if num_guesses == 0:
        m = 0 if num_canaries is None else num_canaries
        _check_counts(0, num_correct, m)
        return 0.0
    if p_value(num_guesses, num_correct, 0.0, delta, num_canaries) > beta:
        return 0.0
    # p_value increases with ε (q grows), so bracket the crossing and bisect.
    lo, hi = 0.0, 1.0
    while hi < _EPS_CAP and p_value(num_guesses, num_correct, hi, delta, num_canaries) <= beta:
        lo, hi = hi, min(2.0 * hi, _EPS_CAP)
    if hi >= _EPS_CAP and p_value(num_guesses, num_correct, hi, delta, num_canaries) <= beta:
        return _EPS_CAP
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if p_value(num_guesses, num_correct, mid, delta, num_canaries) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """Guess +1 for the ``k_plus`` highest scores, -1 for the ``k_minus`` lowest, 0 otherwise.

    Non-finite scores (canaries the attacker has no observation of) are never guessed.
    Ties are broken by position (a stable sort), which does not depend on the truth.

    Parameters
    ----------
    scores
        One score per canary; higher means "more likely included".
    k_plus, k_minus
        How many positive and negative guesses; each is capped at the number of finite
        scores, and ``k_minus`` further so that the two sets never overlap.

    Returns
    -------
    numpy.ndarray
        int8 array of +1 / -1 / 0, same length as ``scores``.
    """
    if k_plus < 0 or k_minus < 0:
        raise ValueError(f"k_plus and k_minus must be >= 0, got {k_plus}, {k_minus}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    guesses = np.zeros(scores.shape[0], dtype=np.int8)
    finite = np.flatnonzero(np.isfinite(scores))
    order = finite[np.argsort(scores[finite], kind="stable")]  # ascending
    k_plus = min(k_plus, len(order))
    k_minus = min(k_minus, len(order) - k_plus)
    if k_plus:
        guesses[order[len(order) - k_plus :]] = 1
    if k_minus:
        guesses[order[:k_minus]] = -1
    return guesses


@dataclass(frozen=True)
class AuditResult:
    """One empirical audit: the lower bound and the guess counts it came from."""

    epsilon_lower_bound: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    k_plus: int
    k_minus: int
    confidence: float
    delta: float


def _count(guesses: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    made = guesses != 0
    correct = made & ((guesses > 0) == truth)
    return int(made.sum()), int(correct.sum())


def best_lower_bound(
    scores: np.ndarray,
    truth: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    ks: Sequence[tuple[int, int]] | None = None,
) -> AuditResult:
    """The best one-run lower bound over a small public grid of ``(k+, k-)``, Bonferroni-corrected.

    Picking the ``(k+, k-)`` with the largest bound *after* comparing guesses with the
    truth would inflate the bound. So every candidate is tested at level
    ``β / len(grid)`` (Bonferroni): the chance that *any* of them falsely rejects is at
    most ``β``, and the maximum over the grid is a valid lower bound at ``confidence``.
    The grid must be chosen without looking at ``truth`` (the default depends only on
    how many canaries have a finite score).

    Parameters
    ----------
    scores
        One attack score per canary (higher = included); NaN = no observation (abstain).
    truth
        The canaries' true inclusion bits (bool / 0-1), same length.
    delta
        δ of the guarantee being audited.
    confidence
        Overall confidence ``1 - β`` after the correction.
    ks
        Explicit ``(k_plus, k_minus)`` pairs; default: :data:`DEFAULT_K_FRACTIONS` of
        the number of finite scores.

    Returns
    -------
    AuditResult
        For the grid point with the largest bound (its own counts); ``confidence`` is the
        overall one.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth).astype(bool).reshape(-1)
    if scores.shape != truth.shape:
        raise ValueError(f"scores and truth differ in length ({scores.shape[0]}, {truth.shape[0]})")
    m = int(scores.shape[0])
    n_scored = int(np.isfinite(scores).sum())
    if ks is None:
        grid = sorted({(round(a * n_scored), round(b * n_scored)) for a, b in DEFAULT_K_FRACTIONS})
        grid = [k for k in grid if k[0] + k[1] > 0] or [(0, 0)]
    else:
        grid = [(int(a), int(b)) for a, b in ks]
        if not grid:
            raise ValueError("ks must hold at least one (k_plus, k_minus) pair")
    per_test = 1.0 - (1.0 - confidence) / len(grid)
    best: AuditResult | None = None
    for k_plus, k_minus in grid:
        r, v = _count(guesses_from_scores(scores, k_plus, k_minus), truth)
        bound = one_run_lower_bound(r, v, delta, per_test, num_canaries=m)
        if best is None or bound > best.epsilon_lower_bound:
            best = AuditResult(bound, m, r, v, k_plus, k_minus, confidence, delta)
    assert best is not None
    return best


def audit_ceiling(num_canaries: int, delta: float, confidence: float = 0.95, num_scored: int | None = None) -> float:
    """The largest lower bound :func:`best_lower_bound` can return for this many canaries: its ceiling.

    A perfect attacker scores every included canary above every excluded one, so each of
    its guesses is right; the bound it then certifies (default grid, Bonferroni, the δ term
    at ``num_canaries``) is the most *any* run of this audit can show. If the accounted ε is
    at or above it, the audit cannot fail, whatever the mechanism does.

    Parameters
    ----------
    num_canaries
        ``m``, every randomised canary (the δ term grows with it).
    delta
        δ of the guarantee being audited.
    confidence
        As in :func:`best_lower_bound`.
    num_scored
        Canaries the attacker has a score for (devices that never trained abstain);
        default all ``m``. Half of them (rounded down) count as included, the expected split.

    Returns
    -------
    float
        The ceiling; 0.0 with no scored canary.
    """
    scored = num_canaries if num_scored is None else num_scored
    if not 0 <= scored <= num_canaries:
        raise ValueError(f"need 0 <= num_scored ({scored}) <= num_canaries ({num_canaries})")
    # Depends on counts only, never on the audit's secret bits.
    truth = np.zeros(num_canaries, dtype=bool)
    truth[: scored // 2] = True
    scores = np.full(num_canaries, np.nan)
    scores[:scored] = truth[:scored].astype(np.float64)
    return best_lower_bound(scores, truth, delta, confidence).epsilon_lower_bound
