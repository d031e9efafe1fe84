"""A device's record-level privacy accountant that survives rounds, restarts and refusals.

Opacus keeps an accountant's whole state in ``history``, a list of
``(noise_multiplier, sample_rate, steps)``. Persisting that list and loading it
into the accountant *before* ``make_private`` makes epsilon cumulative over the
device's lifetime; a fresh accountant each round would under-report it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.rdp import RDPAccountant

HistoryEntry = tuple[float, float, int]


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
    """

    def __init__(
        self,
        mechanism: str,
        delta: float,
        budget: float,
        history: Sequence[Sequence[float]] = (),
    ) -> None:
        self.mechanism = mechanism
        self.delta = delta
        self.budget = budget
        self.opacus: IAccountant = create_accountant(mechanism)
        # Opacus compares entries as tuples when merging consecutive steps.
        self.opacus.history = [(float(s), float(q), int(n)) for s, q, n in history]

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the accountant's composition history."""
        return [(float(s), float(q), int(n)) for s, q, n in self.opacus.history]

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any release)."""
        return self._epsilon_of(self.opacus.history)

    def _epsilon_of(self, history: Sequence[Sequence[float]]) -> float:
        if not history:
            return 0.0
        if self.mechanism == "rdp":
            return rdp_epsilon(history, self.delta)
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

    def check(self, release: Release) -> float:
        """Return the epsilon ``release`` would reach, or raise :class:`BudgetExhausted`.

        The check happens before training so that a refused round spends nothing.
        """
        would_reach = self.epsilon_if(release)
        if would_reach > self.budget:
            raise BudgetExhausted(self.epsilon(), would_reach, self.budget, self.delta)
        return would_reach
