"""Buffered, staleness-aware aggregation (FedBuff) and the server optimizers it feeds.

Synchronous FedAvg is the same engine with a buffer the size of the cohort and no
staleness, so the two modes differ only in scheduling (see "The asynchronous
algorithm" in ``docs/architecture.md``).

The buffer's aggregate is ``sum_i s(tau_i) w_i delta_i / sum_i w_i``: with no
staleness (s = 1) it is exactly the example-weighted FedAvg mean, and a stale update
is discounted in absolute terms rather than renormalised away (as in FedBuff, which
divides by the buffer size).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

StateDict = dict[str, torch.Tensor]
StalenessFn = Callable[[int], float]


def polynomial_staleness(exponent: float = 0.5) -> StalenessFn:
    """``s(tau) = 1 / (1 + tau) ** exponent``; exponent 0.5 is FedBuff's 1/sqrt(1+tau)."""

    def weight(staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        return float(1.0 / (1.0 + staleness) ** exponent)

    return weight


def constant_staleness(_staleness: int) -> float:
    """No discount: every accepted update counts fully."""
    return 1.0


@dataclass(frozen=True)
class BufferedUpdate:
    """One accepted device update as folded into the buffer."""

    device_id: int
    staleness: int
    weight: float  # data weight (number of examples, or 1)
    discount: float  # staleness discount s(tau)


class UpdateBuffer:
    """Accumulates weighted model deltas until it is applied.

    Parameters
    ----------
    staleness_fn
        Maps staleness (server versions elapsed since dispatch) to a discount.
    max_staleness
        Updates staler than this are rejected (``add`` returns False).
    """

    def __init__(self, staleness_fn: StalenessFn, max_staleness: int) -> None:
        self.staleness_fn = staleness_fn
        self.max_staleness = max_staleness
        self._sum: StateDict | None = None
        self._total_weight = 0.0
        self.entries: list[BufferedUpdate] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, device_id: int, delta: Mapping[str, torch.Tensor], weight: float, staleness: int) -> bool:
        """Fold ``delta`` in; returns False (and folds nothing) if it is too stale."""
        if staleness > self.max_staleness:
            return False
        if weight <= 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        discount = self.staleness_fn(staleness)
        scale = discount * weight
        if self._sum is None:
            self._sum = {k: v.detach().to(torch.float64) * scale for k, v in delta.items()}
        else:
            if delta.keys() != self._sum.keys():
                raise ValueError("update does not have the global model's parameter names")
            for k, v in delta.items():
                self._sum[k] += v.detach().to(torch.float64) * scale
        self._total_weight += weight
        self.entries.append(BufferedUpdate(device_id, staleness, weight, discount))
        return True

    def aggregate(self, noise: Callable[[StateDict], StateDict] | None = None) -> StateDict:
        """The buffer's weighted mean delta (float64), then the buffer is emptied.

        ``noise``, if given, is applied to the weighted *sum* before dividing (user-level
        DP adds its Gaussian noise there; the divisor must then be public, which it is
        when every update has weight 1: the number of updates).
        """
        if self._sum is None:
            raise ValueError("cannot aggregate an empty buffer")
        total = noise(self._sum) if noise is not None else self._sum
        mean = {k: v / self._total_weight for k, v in total.items()}
        self._sum = None
        self._total_weight = 0.0
        self.entries = []
        return mean


class ServerOptimizer:
    """Applies an aggregated delta (a pseudo-gradient pointing downhill) to the global model.

    ``sgd`` with learning rate 1 and no momentum is plain FedAvg/FedBuff; momentum
    gives FedAvgM; ``adam`` is FedAdam (Reddi et al. 2021).
    """

    def __init__(
        self,
        kind: str,
        learning_rate: float,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
    ) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"unknown server optimizer {kind!r}")
        self.kind = kind
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.betas = betas
        self.eps = eps
        self._m: StateDict = {}
        self._v: StateDict = {}

    def apply(self, params: StateDict, delta: Mapping[str, torch.Tensor]) -> StateDict:
        """Return the new global parameters (same dtypes as ``params``)."""
        new: StateDict = {}
        for k, p in params.items():
            d = delta[k].to(torch.float64)
            if not p.is_floating_point():
                new[k] = p.clone()
                continue
            if self.kind == "sgd":
                if self.momentum > 0:
                    buf = self._m.get(k)
                    buf = d.clone() if buf is None else self.momentum * buf + d
                    self._m[k] = buf
                    d = buf
                step = self.learning_rate * d
            else:
                b1, b2 = self.betas
                m = self._m.get(k, torch.zeros_like(d))
                v = self._v.get(k, torch.zeros_like(d))
                m = b1 * m + (1 - b1) * d
                v = b2 * v + (1 - b2) * d * d
                self._m[k], self._v[k] = m, v
                step = self.learning_rate * m / (v.sqrt() + self.eps)
            new[k] = (p.to(torch.float64) + step).to(p.dtype)
        return new
