"""A device's record-level privacy accountant that survives rounds, restarts and refusals.

Opacus keeps an accountant's whole state in ``history``, a list of
``(noise_multiplier, sample_rate, steps)``. Persisting that list and loading it
into the accountant *before* ``make_private`` makes epsilon cumulative over the
device's lifetime; a fresh accountant each round would under-report it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant

HistoryEntry = tuple[float, float, int]


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
        if not self.opacus.history:
            return 0.0
        return float(self.opacus.get_epsilon(delta=self.delta))

    def epsilon_if(self, release: Release) -> float:
        """Epsilon the device would reach after ``release``, without spending anything."""
        hypothetical = copy.deepcopy(self.opacus)
        hypothetical.history.append((release.noise_multiplier, release.sample_rate, release.steps))
        return float(hypothetical.get_epsilon(delta=self.delta))

    def check(self, release: Release) -> float:
        """Return the epsilon ``release`` would reach, or raise :class:`BudgetExhausted`.

        The check happens before training so that a refused round spends nothing.
        """
        would_reach = self.epsilon_if(release)
        if would_reach > self.budget:
            raise BudgetExhausted(self.epsilon(), would_reach, self.budget, self.delta)
        return would_reach
