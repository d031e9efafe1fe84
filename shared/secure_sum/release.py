"""What one secure-sum training task releases, derived from public configuration alone.

The device and the server both call :func:`plan_secure_release` with the run's config and
the global model's size, so both arrive at the same encoding, the same noise share and the
same ledger entry; the intake compares the entry a device signs with this plan.

The mechanism (docs/secure-aggregation.md): each of ``local-steps`` steps Poisson-samples
the device's records at the public ``sample-rate``; every sampled record's gradient of the
global parameters (at the task's model, never updated in between) is clipped to
``clip-norm``; each step's sum is rotated, scaled by ``secure-sum-scale``, rounded
stochastically and given its own noise share, so one record moves one step's vector by at
most ``encoding.rounded_norm_bound = clip-norm * secure-sum-scale + sqrt(d)``
(``shared.secure_sum.encoding.encode_sum`` proves it) and every step is one release. The
device adds Skellam noise of parameter ``mu_device`` to every step, and no sum over fewer than
``secure-sum-min-contributors`` devices is unmasked, so every step's sum carries noise of
parameter at least ``mu_total = noise-multiplier**2 * sensitivity**2 / 2``: the standard
deviation ``sqrt(2 mu_total)`` is ``noise-multiplier`` times the sensitivity, as in DP-SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import AggregationConfig, ConfigError, FedrecConfig, PrivacyConfig, TrainConfig
from shared.models.factory import build_model
from shared.privacy.accounting import SkellamRelease
from shared.secure_sum.encoding import EncodingParams, wrap_bound
from shared.secure_sum.rounds import default_neighbours, default_threshold
from shared.training import opacus_sample_rate


@dataclass(frozen=True)
class SecureReleasePlan:
    """Everything public about one secure-sum task.

    Attributes
    ----------
    encoding:
        The per-record integer encoding.
    release:
        The ledger's view of the task (noise multiplier, rate, steps, sensitivity).
    mu_device:
        Each device's Skellam share per coordinate.
    min_contributors:
        The fewest devices whose sum may be unmasked.
    max_records:
        Records a device may encode in one task (``local-steps`` samples of its history).
    """

    encoding: EncodingParams
    release: SkellamRelease
    mu_device: float
    min_contributors: int
    max_records: int

    @property
    def mu_total(self) -> float:
        """The Skellam parameter every unmasked sum carries at least."""
        return self.mu_device * self.min_contributors


def cohort_size(agg: AggregationConfig) -> int:
    """Devices dispatched together for one secure sum.

    Synchronous: the whole cohort (``concurrency``). Asynchronous: ``secure-sum-cohort-size``,
    or 30% more than ``buffer-size`` so that stragglers do not hold the sum back.
    """
    if agg.mode == "sync":
        return agg.concurrency
    if agg.secure_sum_cohort_size:
        return agg.secure_sum_cohort_size
    return max(agg.secure_sum_min_contributors, -(-agg.buffer_size * 13 // 10))


def session_shape(agg: AggregationConfig, roster: int, cohort: int = 0) -> tuple[int, int]:
    """``(neighbours, threshold)`` of a session whose roster has ``roster`` devices.

    ``cohort`` is the number of devices the session names (at least ``roster``; the
    session's own check takes the graph's degree from it).
    """
    neighbours = agg.secure_sum_neighbours or default_neighbours(roster)
    neighbours = min(neighbours, max(2, roster - 1 + (roster - 1) % 2))
    # A small roster's graph is complete: each seed's holders are the roster's other devices,
    # so the threshold is more than half of those, and never at or below half the degree a
    # larger named cohort could give the graph.
    named = max(cohort, roster)
    return neighbours, max(
        default_threshold(min(neighbours, roster - 1)), default_threshold(min(neighbours, named - 1))
    )


def check_secure_sum_config(cfg: FedrecConfig, num_items: int) -> None:
    """Refuse, before a run starts, a secure-sum configuration whose sum could wrap around.

    The model's size fixes the vector length, so this runs once the catalogue is known.

    Raises
    ------
    ConfigError
        Naming the keys to change (see :func:`plan_secure_release`).
    """
    agg = cfg.aggregation
    if not (agg.secure_aggregation and agg.secure_aggregation_protocol == "fedrec"):
        return
    model = build_model(cfg.model, num_items, 1, seed=cfg.seed)
    dim = sum(v.numel() for v in model.global_state().values() if v.is_floating_point())
    plan_secure_release(agg, cfg.privacy, cfg.train, dim)


def plan_secure_release(
    agg: AggregationConfig, privacy: PrivacyConfig, train: TrainConfig, dim: int
) -> SecureReleasePlan:
    """The encoding, noise share and ledger entry of one secure task on a ``dim``-parameter model.

    Raises
    ------
    ConfigError
        If the noisy sum of the largest cohort could wrap around modulo ``2**secure-sum-bits``
        (naming the keys to change).
    """
    encoding = EncodingParams(
        dim=dim, clip=privacy.clip_norm, scale=agg.secure_sum_scale, bits=agg.secure_sum_bits, rotate=True, beta=0.0
    )
    sensitivity = encoding.rounded_norm_bound
    mu_total = (privacy.noise_multiplier * sensitivity) ** 2 / 2.0
    mu_device = mu_total / agg.secure_sum_min_contributors
    # The ledger logs the multiplier recomputed from mu_total, so that the entry alone gives mu.
    release = SkellamRelease.from_mu(mu_total, opacus_sample_rate(train), train.local_steps, sensitivity)
    cohort = cohort_size(agg)
    encodings = cohort * agg.secure_sum_max_records
    # Every record counts as a contributor of the sum (its rounding included: at most one per
    # device, step and coordinate); the noise is one share per device and step.
    bound = wrap_bound(encoding, encodings, mu_device * cohort * train.local_steps / encodings)
    if not bound.safe:
        raise ConfigError(
            f"secure-sum-bits: the noisy sum of {cohort} devices with up to {agg.secure_sum_max_records} records "
            f"each could need {bound.signal + bound.noise:.4g} per coordinate, beyond 2**{agg.secure_sum_bits - 1} "
            f"(failure probability {bound.failure_prob:g}): raise secure-sum-bits (now {agg.secure_sum_bits}), or "
            f"lower secure-sum-scale (now {agg.secure_sum_scale:g}), clip-norm (now {privacy.clip_norm:g}), "
            f"secure-sum-max-records (now {agg.secure_sum_max_records}) or the cohort (concurrency, "
            "secure-sum-cohort-size)"
        )
    return SecureReleasePlan(encoding, release, mu_device, agg.secure_sum_min_contributors, agg.secure_sum_max_records)
