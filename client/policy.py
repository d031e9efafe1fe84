"""A deployed device's own privacy policy: limits the server's run config cannot override.

The run config comes from whoever starts the run (``flwr run --run-config ...``),
so on a real device it must not decide the device's privacy alone: a server could
ask for ``dp = false``, a huge budget, tiny noise, or ``reproducible-noise = true``
(noise it can regenerate and subtract). The device's node config
(``fedrec device start`` writes it) sets the limits; a task whose config breaks
them is refused, and the device's effective budget is the smaller of the two.

Node-config keys (all optional; the defaults are the safe ones):

* ``max-epsilon`` (8.0): the device's lifetime record-level budget;
* ``max-delta`` (1e-5): the largest delta it accepts;
* ``min-noise-multiplier`` (0.5): the least noise it accepts;
* ``max-user-epsilon`` (8.0): the lifetime user-level budget;
* ``allow-no-dp`` (false): whether it may train without DP at all;
* ``max-evaluations-per-day`` (24): how many evaluation requests the device answers in any
  24 hours; later ones are declined. Each answer is a private release charged to the device's
  budget (docs/privacy.md), so the limit keeps a server from draining it with evaluations.

A device with a policy answers only private evaluations: it declines exact ones, and never
sends a top-k list (client/app.py).

Simulated devices (no ``store`` in the node config) have no policy: the run config is
the experiment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.config import FedrecConfig


class PolicyViolation(ValueError):
    """The run asks this device for less privacy than its own policy allows."""


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _count(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"max-evaluations-per-day must be a whole number, got {value!r}")
    return int(number)


@dataclass(frozen=True)
class DevicePolicy:
    """The device's limits (see the module docstring for the node-config keys)."""

    max_epsilon: float = 8.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    max_user_epsilon: float = 8.0
    allow_no_dp: bool = False
    max_evaluations_per_day: int = 24

    def __post_init__(self) -> None:
        if self.max_evaluations_per_day < 0:
            raise PolicyViolation(
                f"node config: max-evaluations-per-day must be >= 0, got {self.max_evaluations_per_day}"
            )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> DevicePolicy | None:
        """The policy of a deployed device; None for a simulated one."""
        if "store" not in node_config:
            return None
        try:
            return cls(
                max_epsilon=float(node_config.get("max-epsilon", cls.max_epsilon)),
                max_delta=float(node_config.get("max-delta", cls.max_delta)),
                min_noise_multiplier=float(node_config.get("min-noise-multiplier", cls.min_noise_multiplier)),
                max_user_epsilon=float(node_config.get("max-user-epsilon", cls.max_user_epsilon)),
                allow_no_dp=_flag(node_config.get("allow-no-dp", False)),
                max_evaluations_per_day=_count(node_config.get("max-evaluations-per-day", cls.max_evaluations_per_day)),
            )
        except (TypeError, ValueError) as exc:
            raise PolicyViolation(f"node config: unreadable privacy policy ({exc})") from None

    def apply(self, cfg: FedrecConfig) -> FedrecConfig:
        """``cfg`` with the device's budgets enforced, or :class:`PolicyViolation` naming the key."""
        p = cfg.privacy
        if not p.dp and not self.allow_no_dp:
            raise PolicyViolation("device policy: the run asks for dp = false; this device trains only with DP")
        if p.reproducible_noise:
            raise PolicyViolation(
                "device policy: the run asks for reproducible-noise = true (noise the server could regenerate)"
            )
        if p.dp and p.noise_multiplier < self.min_noise_multiplier:
            raise PolicyViolation(
                f"device policy: noise-multiplier {p.noise_multiplier:g} is below this device's minimum "
                f"{self.min_noise_multiplier:g}"
            )
        if p.delta > self.max_delta:
            raise PolicyViolation(f"device policy: delta {p.delta:g} exceeds this device's maximum {self.max_delta:g}")
        privacy = dataclasses.replace(
            p,
            epsilon_budget=min(p.epsilon_budget, self.max_epsilon),
            user_epsilon_budget=min(p.user_epsilon_budget, self.max_user_epsilon),
        )
        return dataclasses.replace(cfg, privacy=privacy)


#: The node-config keys of a device's policy: its fields' names, hyphenated (documented above).
POLICY_KEYS = tuple(f.name.replace("_", "-") for f in dataclasses.fields(DevicePolicy))
