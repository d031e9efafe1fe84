"""Private evaluation: the one vector a device releases about how well the model ranks for it.

A private evaluation reply carries no per-device metric and no item list. The device builds
its *metric vector* (for its activity tier: hit and NDCG under full ranking, hit and NDCG
under the sampled protocol, and a count of 1), places it in its tier's slot of a vector
with one slot per tier, and adds Gaussian noise to every coordinate. The server sums the
noisy vectors of the devices that answered: per tier, noisy sums of hits, NDCG and users.

Sensitivity. Every coordinate lies in [0, 1]. Under any change of the device's records
(adding or removing one, the relation ``docs/privacy.md`` names) the vector can at most
leave one tier's slot for another's, so its L2 change is at most the diameter
``sqrt(2 * SLOT_SIZE)`` (:func:`sensitivity`); with one tier the count is the constant 1 and the
bound is ``sqrt(4) = 2``. The range bound holds whatever the ranking depends on (the global
model, the device's personal state, its held-out items), so no further analysis of the
ranking is needed.

Cost. One Gaussian release of noise multiplier ``z`` (standard deviation ``z`` times the
sensitivity) is a subsampled Gaussian with rate 1 and one step: the device's accountant
composes it with its DP-SGD releases, and its ledger records it (mechanism
:data:`EVALUATION_MECHANISM`), so the audit recomputes it like any other release.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.privacy.accounting import Release

EVALUATION_MECHANISM = "gaussian-evaluation"
# The ledger's task id of an evaluation release (it answers no training task).
EVALUATION_TASK_ID = -1
# Each tier's slot holds, in order: full-ranking hit and NDCG at k, sampled-protocol hit and
# NDCG at k, and the count of devices (1 per device).
SLOT_SIZE = 5


def num_tiers(bounds: Sequence[int]) -> int:
    """Tiers that public ``activity-tiers`` bounds make (one more than the bounds)."""
    return len(bounds) + 1


def activity_tier(num_records: int, bounds: Sequence[int]) -> int:
    """The tier of a device with ``num_records`` training records: how many bounds it reaches."""
    return sum(1 for b in bounds if num_records >= b)


def sensitivity(tiers: int) -> float:
    """L2 sensitivity of the metric vector (module docstring)."""
    return 2.0 if tiers == 1 else math.sqrt(2.0 * SLOT_SIZE)


def evaluation_release(noise_multiplier: float) -> Release:
    """The release one private evaluation makes: one Gaussian step at rate 1."""
    return Release(noise_multiplier, 1.0, 1)


@dataclass(frozen=True)
class MetricVector:
    """One device's exact metrics before noise (never sent)."""

    hit: float
    ndcg: float
    sampled_hit: float
    sampled_ndcg: float
    tier: int

    def to_array(self, tiers: int) -> np.ndarray:
        """The vector of ``tiers`` slots with this device's metrics in its own tier's slot.

        Raises
        ------
        ValueError
            If a metric is outside [0, 1] or the tier outside ``range(tiers)``: the
            sensitivity bound would not hold.
        """
        values = (self.hit, self.ndcg, self.sampled_hit, self.sampled_ndcg, 1.0)
        if not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"metrics must lie in [0, 1], got {values}")
        if not 0 <= self.tier < tiers:
            raise ValueError(f"tier {self.tier} outside 0..{tiers - 1}")
        out = np.zeros(tiers * SLOT_SIZE)
        out[self.tier * SLOT_SIZE : (self.tier + 1) * SLOT_SIZE] = values
        return out


def privatize(metrics: MetricVector, tiers: int, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """The noisy vector a device sends: its metric vector plus N(0, (z * sensitivity)^2) per coordinate.

    ``rng`` must be seeded from the OS CSPRNG on a real device (a seed the server could know
    lets it subtract the noise).
    """
    exact = metrics.to_array(tiers)
    return exact + rng.normal(0.0, noise_multiplier * sensitivity(tiers), size=exact.shape)


@dataclass(frozen=True)
class TierEstimate:
    """One tier's fleet figures from summed vectors (noisy under private evaluation)."""

    users: float
    hr: float
    ndcg: float
    sampled_hr: float
    sampled_ndcg: float

    def to_json(self) -> dict[str, float | None]:
        """Kebab-case keys; None where a mean is undefined (JSON has no NaN)."""
        values = {"users": self.users, "hr@k": self.hr, "ndcg@k": self.ndcg,
                  "sampled-hr@k": self.sampled_hr, "sampled-ndcg@k": self.sampled_ndcg}  # fmt: skip
        return {k: (None if math.isnan(v) else v) for k, v in values.items()}


def tier_estimates(total: np.ndarray, tiers: int) -> list[TierEstimate]:
    """Per-tier means from the sum of (noisy) vectors: each metric's sum over the tier's user count.

    A tier whose (noisy) user count is below 1 gets NaN means: the ratio would be noise.
    """
    out = []
    for t in range(tiers):
        hit, ndcg, s_hit, s_ndcg, users = (float(v) for v in total[t * SLOT_SIZE : (t + 1) * SLOT_SIZE])
        if users < 1.0:
            out.append(TierEstimate(users, math.nan, math.nan, math.nan, math.nan))
        else:
            out.append(TierEstimate(users, hit / users, ndcg / users, s_hit / users, s_ndcg / users))
    return out
