"""Simulated device heterogeneity: speed, availability and drop-out, on a virtual clock.

The model (documented in docs/architecture.md):

* **Speed.** Device ``i`` takes ``step_seconds * slowdown_i`` simulated seconds per local
  step, with ``slowdown_i ~ LogNormal(0, speed_sigma)``: most devices are near the
  median, a long tail is many times slower (as measured on real phone fleets).
* **Network.** Each task adds ``latency_seconds * LogNormal(0, 0.5)`` for download and upload.
* **Availability.** Device ``i`` is online with probability ``a_i ~ Beta`` with mean
  ``availability_mean`` (concentration 4); each time the scheduler considers it, a
  seeded draw decides whether it is reachable.
* **Drop-out.** Each dispatched task is lost (the device goes away before it reports)
  with probability ``dropout_rate``; the server learns this only when the task times out.

All draws come from generators seeded by (run seed, device, task), so a run is
reproducible and its simulated times do not depend on this machine's load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.config import FleetConfig

_AVAILABILITY_CONCENTRATION = 4.0
_LATENCY_SIGMA = 0.5


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated device's fixed characteristics."""

    device_id: int
    slowdown: float
    availability: float


@dataclass(frozen=True)
class TaskTiming:
    """The simulated fate of one dispatched task."""

    duration: float  # seconds from dispatch to the reply reaching the server
    dropped: bool


class Fleet:
    """Seeded profiles for ``num_devices`` devices and per-task draws."""

    def __init__(self, num_devices: int, cfg: FleetConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        rng = np.random.default_rng([seed, 0xF1EE7])
        slowdown = rng.lognormal(0.0, cfg.speed_sigma, size=num_devices)
        a = cfg.availability_mean * _AVAILABILITY_CONCENTRATION
        b = (1.0 - cfg.availability_mean) * _AVAILABILITY_CONCENTRATION
        availability = rng.beta(a, b, size=num_devices) if b > 0 else np.ones(num_devices)
        self.profiles = [DeviceProfile(i, float(slowdown[i]), float(availability[i])) for i in range(num_devices)]

    def __len__(self) -> int:
        return len(self.profiles)

    def is_online(self, device_id: int, attempt: int) -> bool:
        """Whether the device answers the scheduler at its ``attempt``-th consideration."""
        rng = np.random.default_rng([self.seed, 0xA7A1, device_id, attempt])
        return bool(rng.random() < self.profiles[device_id].availability)

    def task_timing(self, device_id: int, task_index: int, local_steps: int) -> TaskTiming:
        """Simulated duration and drop-out of the device's ``task_index``-th task."""
        rng = np.random.default_rng([self.seed, 0x7A5C, device_id, task_index])
        compute = self.cfg.step_seconds * self.profiles[device_id].slowdown * local_steps
        network = self.cfg.latency_seconds * float(rng.lognormal(0.0, _LATENCY_SIGMA))
        dropped = bool(rng.random() < self.cfg.dropout_rate)
        return TaskTiming(compute + network, dropped)
