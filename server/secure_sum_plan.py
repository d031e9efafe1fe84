"""Planning a secure noisy sum: the Skellam noise each device adds, checked against wrap-around.

The server picks the aggregate noise that keeps a device within its budget over the tasks
it is planned to take, splits it evenly over ``min_contributors`` devices (so any sum the
server is allowed to unmask carries at least the aggregate noise), and refuses a plan whose
noisy sum could wrap around modulo ``2**bits`` for the largest cohort it will run.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.privacy.skellam import SkellamTask, skellam_epsilon, skellam_mu_for_epsilon
from shared.secure_sum.encoding import EncodingParams, check_no_wrap


@dataclass(frozen=True)
class NoisePlan:
    """The noise of one kind of secure-sum task.

    Attributes
    ----------
    mu_total:
        The Skellam parameter (Poisson mean) of the aggregate noise per coordinate.
    mu_device:
        Each device's share, ``mu_total / min_contributors``.
    min_contributors:
        The fewest devices whose sum may be unmasked.
    epsilon:
        A device's epsilon after ``steps`` such tasks, at ``delta``.
    """

    mu_total: float
    mu_device: float
    min_contributors: int
    task: SkellamTask
    steps: int
    delta: float
    epsilon: float


def plan_noise(
    encoding: EncodingParams,
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    min_contributors: int,
    max_contributors: int,
) -> NoisePlan:
    """The smallest aggregate noise that keeps ``steps`` tasks within ``epsilon``, split over devices.

    Sensitivities are those of one record's clipped, rotated, scaled and conditionally
    rounded contribution (``encoding.rounded_norm_bound`` in L2 and its L1 counterpart).

    Raises
    ------
    ValueError
        If no finite noise meets the budget, ``min_contributors`` exceeds
        ``max_contributors``, or (``WrapAroundRisk``) the largest cohort could wrap around.
    """
    if not 2 <= min_contributors <= max_contributors:
        raise ValueError(
            f"need 2 <= min-contributors <= the largest cohort, got {min_contributors} and {max_contributors}"
        )
    l2, l1 = encoding.rounded_norm_bound, encoding.rounded_l1_norm_bound
    mu_total = skellam_mu_for_epsilon(
        epsilon, delta, sample_rate=sample_rate, steps=steps, l1_sensitivity=l1, l2_sensitivity=l2
    )
    mu_device = mu_total / min_contributors
    check_no_wrap(encoding, max_contributors, mu_device)
    task = SkellamTask(sample_rate, l1, l2, mu_device * min_contributors)
    spent, _ = skellam_epsilon([task] * steps, delta)
    return NoisePlan(mu_total, mu_device, min_contributors, task, steps, delta, spent)
