"""User-level DP at the server: clip whole updates, noise each buffer, filter each device.

DP-FedAvg (McMahan et al. 2018) adapted to buffered asynchronous aggregation. Each
accepted update is clipped to L2 norm S (the device clipped it too; the server
enforces it), the buffer's weighted sum ``sum_i w_i delta_i`` gets Gaussian noise
of std ``z * S`` on every coordinate, and is divided by the number of updates in
the buffer (public: the server chose the participants). One buffer application is
one Gaussian release in which device i's individual sensitivity is ``w_i * S``
(``w_i <= 1`` is its staleness discount).

Each device is accounted individually over the releases it actually took part in,
with a Renyi filter at one fixed order (Feldman and Zrnic 2021): a device whose
next full-weight release would take it past its budget is no longer scheduled.
A device is never in one buffer twice (it is not rescheduled until the buffer
holding its update is applied), so its per-release sensitivity is exactly
``w_i * S``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.aggregation import BufferedUpdate, StateDict
from shared.config import PrivacyConfig
from shared.privacy.user_level import RenyiFilter, add_gaussian_noise, clip_update


@dataclass(frozen=True)
class UserRelease:
    """One device's part in one noised buffer application."""

    device_id: int
    weight: float
    epsilon: float  # cumulative user-level epsilon after this release


class UserLevelMechanism:
    """Clipping, noise and per-device Renyi-filter accounting for user-level DP.

    Parameters
    ----------
    privacy
        ``user-clip-norm``, ``user-noise-multiplier``, ``user-epsilon-budget`` and ``delta``.
    seed
        Seeds the server's noise only with ``reproducible-noise`` (simulation); otherwise
        the noise comes from OS entropy, since anyone who can regenerate it can remove it.
    """

    def __init__(self, privacy: PrivacyConfig, seed: int) -> None:
        self.clip = privacy.user_clip_norm
        self.noise_multiplier = privacy.user_noise_multiplier
        self.delta = privacy.delta
        self.budget = privacy.user_epsilon_budget
        self.filter = RenyiFilter(privacy.user_noise_multiplier, privacy.delta, privacy.user_epsilon_budget)
        noise_seed = seed if privacy.reproducible_noise else secrets.randbits(62)
        self.generator = torch.Generator().manual_seed(noise_seed)

    @property
    def order(self) -> float:
        """The filter's fixed Renyi order."""
        return float(self.filter.order)

    def admits(self, device_id: int) -> bool:
        """Whether a full-weight contribution would keep ``device_id`` within its budget."""
        return bool(self.filter.admits(device_id, 1.0))

    def clip_update(self, delta: StateDict) -> StateDict:
        """The update clipped to ``user-clip-norm`` (whole-update L2 norm)."""
        clipped, _norm = clip_update(delta, self.clip)
        return clipped

    def noise(self, total: StateDict) -> StateDict:
        """Add the release's Gaussian noise to a buffer's weighted sum."""
        return add_gaussian_noise(total, self.noise_multiplier, self.clip, self.generator)

    def charge(self, entries: Sequence[BufferedUpdate]) -> list[UserRelease]:
        """Charge every device in an applied buffer with its staleness weight."""
        releases = []
        for entry in entries:
            self.filter.charge(entry.device_id, entry.discount)
            releases.append(UserRelease(entry.device_id, entry.discount, self.filter.epsilon(entry.device_id)))
        return releases
