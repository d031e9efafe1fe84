"""A device's record-level privacy accountant that survives rounds, restarts and refusals.

Opacus keeps an accountant's whole state in ``history``, a list of
``(noise_multiplier, sample_rate, steps)``. Persisting that list and loading it
into the accountant *before* ``make_private`` makes epsilon cumulative over the
device's lifetime; a fresh accountant each round would under-report it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.rdp import RDPAccountant

from shared.privacy.skellam import SkellamTask, skellam_rdp_curve

HistoryEntry = tuple[float, float, int]
# A secure-sum release as its ledger entry names it: (noise multiplier, sample rate, steps, L2
# sensitivity in the integer domain); see :class:`SkellamRelease`.
SkellamEntry = tuple[float, float, int, float]

# Orders at which Gaussian and Skellam releases compose: the integers of Opacus's default orders.
COMBINED_ORDERS: tuple[int, ...] = tuple(
    int(a) for a in RDPAccountant.DEFAULT_ALPHAS if float(a).is_integer() and a >= 2
)


@functools.lru_cache(maxsize=4096)
def _unit_rdp_curve(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of ONE subsampled Gaussian step at each of Opacus's default orders.

    This is Opacus's own ``compute_rdp`` with ``steps=1``; its result for ``steps=n`` is
    exactly this curve times ``n``. It is a pure function and dominates the cost of
    accounting, and devices share few distinct (sigma, q), so it is memoised.
    """
    curve = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    return tuple(float(v) for v in np.atleast_1d(curve))


def rdp_epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """Epsilon of a composition ``[(sigma, q, steps), ...]`` exactly as Opacus's RDPAccountant computes it."""
    if not history:
        return 0.0
    total = np.zeros(len(RDPAccountant.DEFAULT_ALPHAS))
    for sigma, q, steps in history:
        total = total + np.asarray(_unit_rdp_curve(float(sigma), float(q))) * int(steps)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


@dataclass(frozen=True)
class SkellamRelease:
    """Record-level release through the secure noisy sum (``shared/secure_sum``), as the ledger logs it.

    Each of ``steps`` steps Poisson-samples records at ``sample_rate``, sums their clipped,
    individually encoded gradients (L2 norm at most ``l2_sensitivity`` in the integer
    domain), and the sum over at least ``min-contributors`` devices carries Skellam noise of
    Poisson parameter ``mu``. The ledger logs ``noise_multiplier = sqrt(2 mu) / l2_sensitivity``
    (the noise's standard deviation over the sensitivity, as for a Gaussian) so that ``mu``
    is recomputable from the entry alone; the L1 sensitivity is bounded by ``l2**2``, which
    holds for every integer vector (``|v_i| <= v_i**2``).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    l2_sensitivity: float

    @classmethod
    def from_mu(cls, mu: float, sample_rate: float, steps: int, l2_sensitivity: float) -> SkellamRelease:
        """The release whose aggregate Skellam parameter is ``mu``."""
        return cls(math.sqrt(2.0 * mu) / l2_sensitivity, sample_rate, steps, l2_sensitivity)

    @property
    def mu(self) -> float:
        """The aggregate Skellam (Poisson) parameter per coordinate."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2 / 2.0

    def entry(self) -> SkellamEntry:
        """The history tuple the accountant keeps."""
        return (self.noise_multiplier, self.sample_rate, self.steps, self.l2_sensitivity)

    def task(self) -> SkellamTask:
        """One step of this release for ``shared.privacy.skellam``."""
        return SkellamTask(self.sample_rate, self.l2_sensitivity**2, self.l2_sensitivity, self.mu)


def record_epsilon(gaussian: Sequence[Sequence[float]], skellam: Sequence[Sequence[float]], delta: float) -> float:
    """Epsilon of a device's record-level history of Gaussian and Skellam releases.

    With no Skellam release this is exactly :func:`rdp_epsilon` (Opacus's RDP accountant).
    Otherwise both kinds compose by adding their RDP at the integer orders 2..63
    (:data:`COMBINED_ORDERS`) and convert by Opacus's own conversion.
    """
    if not skellam:
        return rdp_epsilon(gaussian, delta)
    orders = list(COMBINED_ORDERS)
    total = np.zeros(len(orders))
    for sigma, q, steps in gaussian:
        curve = rdp_analysis.compute_rdp(q=float(q), noise_multiplier=float(sigma), steps=1, orders=orders)
        total = total + np.atleast_1d(curve) * int(steps)
    tasks: list[SkellamTask] = []
    for sigma, q, steps, l2 in skellam:
        tasks.extend([SkellamRelease(float(sigma), float(q), int(steps), float(l2)).task()] * int(steps))
    total = total + skellam_rdp_curve(tasks, orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


class BudgetExhausted(RuntimeError):
    """Training would take a device past its epsilon budget; nothing was trained or spent."""

    def __init__(self, spent: float, would_reach: float, budget: float, delta: float) -> None:
        super().__init__(
            f"privacy budget exhausted: epsilon would reach {would_reach:.4f} > budget {budget:.4f} "
            f"at delta={delta:g} (spent so far {spent:.4f})"
        )
        self.spent = spent
        self.would_reach = would_reach
        self.budget = budget
        self.delta = delta


@dataclass(frozen=True)
class Release:
    """One planned DP-SGD release: ``steps`` noisy steps at ``noise_multiplier`` and ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class DeviceAccountant:
    """Cumulative (epsilon, delta) of one device, with planning and refusal.

    Parameters
    ----------
    mechanism
        Opacus accountant name: ``"rdp"`` or ``"prv"``.
    delta
        The delta at which epsilon is reported and the budget is enforced.
    budget
        The device's lifetime epsilon budget.
    history
        Previously persisted Opacus history, to resume.
    skellam_history
        Previously persisted secure-sum releases (:class:`SkellamRelease` entries).
    """

    def __init__(
        self,
        mechanism: str,
        delta: float,
        budget: float,
        history: Sequence[Sequence[float]] = (),
        skellam_history: Sequence[Sequence[float]] = (),
    ) -> None:
        self.mechanism = mechanism
        self.delta = delta
        self.budget = budget
        self.opacus: IAccountant = create_accountant(mechanism)
        # Opacus compares entries as tuples when merging consecutive steps.
        self.opacus.history = [(float(s), float(q), int(n)) for s, q, n in history]
        self.skellam: list[SkellamEntry] = [(float(s), float(q), int(n), float(l2)) for s, q, n, l2 in skellam_history]
        if self.skellam and mechanism != "rdp":
            raise ValueError("secure-sum (Skellam) releases are accounted with the RDP accountant only")

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the accountant's composition history."""
        return [(float(s), float(q), int(n)) for s, q, n in self.opacus.history]

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any release)."""
        return self._epsilon_of(self.opacus.history)

    def _epsilon_of(
        self, history: Sequence[Sequence[float]], skellam: Sequence[Sequence[float]] | None = None
    ) -> float:
        skellam = self.skellam if skellam is None else skellam
        if not history and not skellam:
            return 0.0
        if self.mechanism == "rdp":
            return record_epsilon(history, skellam, self.delta)
        accountant = create_accountant(self.mechanism)
        accountant.history = [tuple(h) for h in history]
        return float(accountant.get_epsilon(delta=self.delta))

    def epsilon_if(self, release: Release) -> float:
        """Epsilon the device would reach after ``release``, without spending anything."""
        hypothetical = [*self.opacus.history, (release.noise_multiplier, release.sample_rate, release.steps)]
        return self._epsilon_of(hypothetical)

    def spend(self, release: Release) -> float:
        """Record ``release`` (one not made by an Opacus optimizer, e.g. a private evaluation).

        Returns the epsilon after it. DP-SGD steps are recorded by Opacus's own hook instead.
        """
        self.opacus.history.append((release.noise_multiplier, release.sample_rate, release.steps))
        return self.epsilon()

    def epsilon_if_skellam(self, release: SkellamRelease) -> float:
        """Epsilon the device would reach after a secure-sum ``release``, without spending anything."""
        return self._epsilon_of(self.opacus.history, [*self.skellam, release.entry()])

    def check_skellam(self, release: SkellamRelease) -> float:
        """Return the epsilon a secure-sum ``release`` would reach, or raise :class:`BudgetExhausted`."""
        would_reach = self.epsilon_if_skellam(release)
        if would_reach > self.budget:
            raise BudgetExhausted(self.epsilon(), would_reach, self.budget, self.delta)
        return would_reach

    def spend_skellam(self, release: SkellamRelease) -> float:
        """Record a secure-sum ``release``; return the epsilon after it."""
        self.skellam.append(release.entry())
        return self.epsilon()

    def check(self, release: Release) -> float:
        """Return the epsilon ``release`` would reach, or raise :class:`BudgetExhausted`.

        The check happens before training so that a refused round spends nothing.
        """
        would_reach = self.epsilon_if(release)
        if would_reach > self.budget:
            raise BudgetExhausted(self.epsilon(), would_reach, self.budget, self.delta)
        return would_reach
