"""User-level DP for buffered asynchronous aggregation, accounted per device with a Rényi filter.

Mechanism (the server implements the aggregation; this module prices it and adds the noise)
-------------------------------------------------------------------------------------------
Each device clips its whole model update ``Δ_i`` to L2 norm ``S`` (:func:`clip_update`). The
server fills a buffer of ``K`` updates, each with a public weight ``w_i ∈ (0, 1]`` (staleness
discount), releases ``Σ w_i Δ_i + N(0, (z·S)² I)`` (:func:`add_gaussian_noise`) and divides by
the *configured* buffer size ``K``. Dividing is post-processing only because ``K`` is public; a
data-dependent denominator (``Σ w_i`` or the number of updates actually received) would change
the sensitivity and is not covered by this accounting.

One buffer application is one Gaussian release. Under add/remove-one-device neighbouring, device
``i``'s contribution to the noised sum moves it by at most ``w_i·S``, so with noise std ``z·S``
its individual Rényi DP at order ``α`` is (Mironov 2017, Prop. 7, with sensitivity ``w_i·S``)::

    ρ_i(α) = α · w_i² / (2 z²)

No amplification by sampling is claimed: the server chooses, and knows, who is in each buffer.

Individual accounting (Feldman & Zrnic 2021, "Individual Privacy Accounting via a Rényi Filter",
Thm. 3.1): devices take part in different numbers of releases with different weights. Fix ONE
order ``α`` before any release and an RDP budget ``B``. If every release charges each
participant its ``ρ_i(α)`` and a device is excluded from any release that would take its sum
past ``B``, then each device enjoys ``(α, B)``-RDP however adaptively participation and weights
were chosen. Picking the best ``α`` *after* the releases is not covered by the theorem, which is
why :class:`RenyiFilter` fixes its order at construction (:func:`choose_order` depends only on
public configuration). ``(α, B)``-RDP is converted to ``(ε, δ)`` with :func:`rdp_to_epsilon`.

Conditions the server must keep for this accounting to hold (a reviewer should check them):

* charge the filter (:meth:`RenyiFilter.charge` / :meth:`RenyiFilter.charge_release`) BEFORE
  the noised sum leaves the server, and drop a refused device's update from that buffer;
* weights and participation may depend on public information and past releases (staleness,
  schedules), not on the content of a device's data beyond that;
* every update in the sum must have gone through :func:`clip_update` with the same ``S`` that
  scales the noise, and the noise must be drawn from OS entropy in deployment.

Recompute every claimed ε with :func:`server.audit.independent.user_level_epsilon`, which
prices the same weights with dp-accounting.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# Opacus's RDPAccountant.DEFAULT_ALPHAS, copied so that this module does not import Opacus and
# so that user- and record-level figures use the same grid of orders.
DEFAULT_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

_STATE_VERSION = 1


def _check_positive_finite(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


def _check_order(order: float) -> None:
    if not (math.isfinite(order) and order > 1):
        raise ValueError(f"Rényi order must be finite and > 1, got {order!r}")


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_weight(weight: float) -> None:
    # Weights above 1 would mean sensitivity above S, which the noise was not scaled for; a zero
    # weight means the update is not in the sum at all and must not be charged.
    if not (math.isfinite(weight) and 0 < weight <= 1):
        raise ValueError(f"weight must be in (0, 1], got {weight!r}")


def gaussian_rdp(order: float, noise_multiplier: float, weight: float = 1.0) -> float:
    """RDP at ``order`` of one Gaussian release for a participant with weight ``weight``.

    The noise std is ``noise_multiplier · S`` and the participant's sensitivity ``weight · S``, so
    the effective noise multiplier is ``noise_multiplier / weight`` and the RDP is
    ``order · weight² / (2 · noise_multiplier²)`` (Mironov 2017, Prop. 7). ``S`` cancels.
    """
    _check_order(order)
    _check_positive_finite("noise_multiplier", noise_multiplier)
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
    # Unit cost first, then times w²: with weight=1 this is bit-identical to the unit cost, which
    # keeps the filter's full-weight boundary exactly reproducible.
    return order / (2.0 * noise_multiplier**2) * (weight * weight)


def rdp_to_epsilon(rdp: float, order: float, delta: float) -> float:
    """Convert ``(order, rdp)``-RDP to an ε at ``delta``, at this single order.

    ``ε = rdp + log1p(-1/α) - (log δ + log α) / (α - 1)``

    This is the improved conversion of Balle et al. 2020 ("Hypothesis testing interpretations
    and Rényi differential privacy", Thm. 21) and Canonne, Kamath & Steinke 2020 (Prop. 12),
    the same formula as Opacus's ``analysis.rdp.get_privacy_spent`` (which writes
    ``log1p(-1/α)`` as ``log((α-1)/α)``) and dp-accounting's ``rdp.compute_epsilon``.

    The result is clamped below at 0. This is sound: an ``(ε', δ)`` guarantee implies
    ``(ε, δ)`` for every ``ε ≥ ε'``, so raising a negative value to 0 only weakens the claim
    (dp-accounting clamps the same way). It can only bind for large δ or orders beyond 1/δ.
    """
    _check_order(order)
    _check_delta(delta)
    if math.isnan(rdp) or rdp < 0:
        raise ValueError(f"rdp must be >= 0, got {rdp!r}")
    if math.isinf(rdp):
        return math.inf
    eps = rdp + math.log1p(-1.0 / order) - (math.log(delta) + math.log(order)) / (order - 1.0)
    return max(0.0, eps)


def _rdp_budget(order: float, delta: float, budget: float) -> float:
    """Largest float RDP at ``order`` whose :func:`rdp_to_epsilon` is ``<= budget`` (may be < 0)."""
    _check_order(order)
    _check_delta(delta)
    _check_positive_finite("budget", budget)
    # Invert the conversion algebraically, then step down ulp by ulp until the forward conversion
    # (as actually computed in floats) is within budget, so that rounding can never let the
    # reported ε exceed the budget. The loop runs at most a few times.
    shift = math.log1p(-1.0 / order) - (math.log(delta) + math.log(order)) / (order - 1.0)
    rdp = budget - shift
    if rdp < 0:
        return rdp
    while rdp >= 0 and rdp_to_epsilon(rdp, order, delta) > budget:
        rdp = math.nextafter(rdp, -math.inf)
    # Step up while still within budget, so this is the largest such float.
    while rdp_to_epsilon(math.nextafter(rdp, math.inf), order, delta) <= budget:
        rdp = math.nextafter(rdp, math.inf)
    return rdp


def _full_weight_releases(unit: float, rdp_budget: float) -> int:
    """How many full-weight releases of RDP ``unit`` fit, using the filter's own comparison."""
    if rdp_budget < 0:
        return 0
    n = math.floor(rdp_budget / unit)
    # The filter admits release n+1 iff unit * (n+1) <= budget in floats; align with that exactly.
    while n > 0 and unit * n > rdp_budget:
        n -= 1
    while unit * (n + 1) <= rdp_budget:
        n += 1
    return n


def choose_order(
    noise_multiplier: float,
    budget: float,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """The Rényi order that allows the most full-weight releases within ``(budget, delta)``.

    It depends only on public configuration, so fixing it before any release is legitimate
    (Feldman & Zrnic's filter needs the order fixed in advance). Ties go to the smaller order.

    Raises
    ------
    ValueError
        If no order admits even one full-weight release: such a configuration can never let a
        device contribute at full weight, which is almost certainly a misconfiguration.
    """
    _check_positive_finite("noise_multiplier", noise_multiplier)
    if not orders:
        raise ValueError("orders must be non-empty")
    best_order: float | None = None
    best_n = -1
    for order in sorted(float(o) for o in orders):
        n = _full_weight_releases(gaussian_rdp(order, noise_multiplier), _rdp_budget(order, delta, budget))
        if n > best_n:  # strict: on a tie the smaller order (seen first) is kept
            best_order, best_n = order, n
    assert best_order is not None
    if best_n == 0:
        raise ValueError(
            f"no order admits a single full-weight release: noise_multiplier={noise_multiplier}, "
            f"budget={budget}, delta={delta:g}"
        )
    return best_order


class UserBudgetExhausted(ValueError):
    """Charging a release would take a device past its user-level budget; nothing was charged."""

    def __init__(self, device_id: int, weight: float, spent: float, would_reach: float, budget: float) -> None:
        super().__init__(
            f"user-level budget exhausted for device {device_id}: a release at weight {weight:g} "
            f"would take its epsilon from {spent:.4f} to {would_reach:.4f} > budget {budget:.4f}; "
            "drop its update from this buffer"
        )
        self.device_id = device_id
        self.weight = weight
        self.spent = spent
        self.would_reach = would_reach
        self.budget = budget


class RenyiFilter:
    """Per-device Rényi filter (Feldman & Zrnic 2021) at one fixed order.

    Parameters
    ----------
    noise_multiplier
        ``z``: the noise std on the weighted sum is ``z · S``.
    delta
        The δ at which ε is reported and the budget enforced.
    budget
        Each device's lifetime user-level ε.
    order
        The fixed Rényi order; ``None`` picks :func:`choose_order`. Never change it between
        releases (a resumed filter must be built with the same order).

    The state per device is the list of weights charged; its cumulative RDP is
    ``gaussian_rdp(order, z) · fsum(w²)``, which a reviewer can recompute from the list alone.
    """

    def __init__(self, noise_multiplier: float, delta: float, budget: float, order: float | None = None) -> None:
        _check_positive_finite("noise_multiplier", noise_multiplier)
        _check_delta(delta)
        _check_positive_finite("budget", budget)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.budget = float(budget)
        if order is None:
            order = choose_order(self.noise_multiplier, self.budget, self.delta)
        _check_order(order)
        self.order = float(order)
        self._rdp_budget = _rdp_budget(self.order, self.delta, self.budget)
        self._unit = gaussian_rdp(self.order, self.noise_multiplier)
        self._weights: dict[int, list[float]] = {}

    @property
    def rdp_budget(self) -> float:
        """The largest cumulative RDP at :attr:`order` whose converted ε is ``<= budget``."""
        return self._rdp_budget

    def _rdp_of(self, weights: Sequence[float]) -> float:
        # fsum is correctly rounded, so the total does not depend on the order of releases.
        return self._unit * math.fsum(w * w for w in weights)

    def rdp(self, device_id: int) -> float:
        """Cumulative RDP at :attr:`order` charged to ``device_id`` (0.0 if never charged)."""
        return self._rdp_of(self._weights.get(device_id, []))

    def _would_reach_rdp(self, device_id: int, weight: float) -> float:
        return self._rdp_of([*self._weights.get(device_id, []), weight])

    def admits(self, device_id: int, weight: float = 1.0) -> bool:
        """Whether charging one release at ``weight`` keeps ``device_id`` within budget."""
        _check_weight(weight)
        return self._would_reach_rdp(device_id, weight) <= self._rdp_budget

    def charge(self, device_id: int, weight: float = 1.0) -> None:
        """Charge ``device_id`` one release at ``weight``, or raise :class:`UserBudgetExhausted`.

        Call before the release leaves the server; on refusal nothing is charged and the device's
        update must be dropped from the buffer.
        """
        _check_weight(weight)
        would_reach = self._would_reach_rdp(device_id, weight)
        if would_reach > self._rdp_budget:
            raise UserBudgetExhausted(
                device_id,
                weight,
                self.epsilon(device_id),
                rdp_to_epsilon(would_reach, self.order, self.delta),
                self.budget,
            )
        self._weights.setdefault(int(device_id), []).append(float(weight))

    def charge_release(self, weights: Mapping[int, float]) -> None:
        """Charge every participant of one release, all or nothing.

        Raises :class:`UserBudgetExhausted` for the first device that does not fit, having charged
        nobody, so the server can drop it and retry with the rest.
        """
        for device_id, weight in weights.items():
            if not self.admits(device_id, weight):
                self.charge(device_id, weight)  # raises with the full message
        for device_id, weight in weights.items():
            self.charge(device_id, weight)

    def epsilon(self, device_id: int) -> float:
        """ε at :attr:`delta` of what ``device_id`` has been charged (0.0 if never charged)."""
        weights = self._weights.get(device_id)
        if not weights:
            return 0.0
        return rdp_to_epsilon(self._rdp_of(weights), self.order, self.delta)

    def epsilons(self) -> dict[int, float]:
        """ε of every device charged so far."""
        return {device_id: self.epsilon(device_id) for device_id in self._weights}

    def history(self, device_id: int) -> list[float]:
        """A copy of the weights charged to ``device_id``, in order."""
        return list(self._weights.get(device_id, []))

    def __len__(self) -> int:
        return len(self._weights)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the configuration and each device's weights (keys as strings)."""
        return {
            "version": _STATE_VERSION,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "budget": self.budget,
            "order": self.order,
            "weights": {str(device_id): list(ws) for device_id, ws in self._weights.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; refuses a different configuration or an over-spent device.

        The stored weights are priced at this filter's ``(z, order)``, so resuming with another
        configuration would misprice them; that is refused rather than converted.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported RenyiFilter state version {state.get('version')!r}")
        for key in ("noise_multiplier", "delta", "budget", "order"):
            if float(state[key]) != getattr(self, key):
                raise ValueError(f"state {key}={state[key]!r} does not match this filter's {getattr(self, key)!r}")
        restored: dict[int, list[float]] = {}
        for key, ws in dict(state["weights"]).items():
            weights = [float(w) for w in ws]
            for w in weights:
                _check_weight(w)
            if self._rdp_of(weights) > self._rdp_budget:
                raise ValueError(f"state for device {key} exceeds the budget; refusing to load it")
            restored[int(key)] = weights
        self._weights = restored


def clip_update(delta: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """Clip a whole model update to global L2 norm ``clip`` over all tensors together.

    Returns the clipped update (same dtypes and devices; small updates are returned as untouched
    copies) and the original norm. The norm is measured in float64; if rounding in the tensors'
    dtype leaves the scaled update a hair above ``clip``, it is scaled again, so the realised
    norm never exceeds ``clip`` (the sensitivity the noise is calibrated to).
    """
    _check_positive_finite("clip", clip)

    def norm_of(tensors: Mapping[str, torch.Tensor]) -> float:
        total = math.fsum(float(t.detach().to(torch.float64).pow(2).sum()) for t in tensors.values())
        return math.sqrt(total)

    for name, t in delta.items():
        if not torch.is_floating_point(t):
            raise TypeError(f"update tensor {name!r} has non-floating dtype {t.dtype}")
    norm = norm_of(delta)
    if not math.isfinite(norm):
        raise ValueError("update has a non-finite norm (NaN or inf); refusing to clip it")
    if norm <= clip:
        return {name: t.detach().clone() for name, t in delta.items()}, norm
    factor = clip / norm
    clipped = {name: t.detach().to(torch.float64).mul(factor).to(t.dtype) for name, t in delta.items()}
    # Rounding to float32 can overshoot by ~1e-7 relative; shrink by a few ulps of the dtype until
    # the realised norm is within the bound (one pass in practice).
    for _ in range(8):
        realised = norm_of(clipped)
        if realised <= clip:
            return clipped, norm
        shrink = clip / realised * (1.0 - 4.0 * max(torch.finfo(t.dtype).eps for t in delta.values()))
        clipped = {name: t.to(torch.float64).mul(shrink).to(t.dtype) for name, t in clipped.items()}
    raise RuntimeError("could not bring the update's norm within the clip bound")  # pragma: no cover


def add_gaussian_noise(
    total: dict[str, torch.Tensor],
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """Return ``total`` plus independent ``N(0, (noise_multiplier · clip)²)`` on every coordinate.

    ``total`` is the weighted SUM of clipped updates (divide by the public buffer size after).

    In deployment ``generator`` must be seeded from OS entropy (or be ``None``): a generator
    seeded from a known value (the run seed) lets anyone who knows it subtract the noise. With
    ``None`` a fresh generator per device type is seeded from :mod:`secrets`, never torch's
    global generator, whose default seed is a fixed constant. torch's samplers are not
    cryptographically secure nor hardened against floating-point attacks on DP noise.
    """
    _check_positive_finite("noise_multiplier", noise_multiplier)
    _check_positive_finite("clip", clip)
    std = noise_multiplier * clip
    own: dict[str, torch.Generator] = {}
    noised: dict[str, torch.Tensor] = {}
    for name, t in total.items():
        if not torch.is_floating_point(t):
            raise TypeError(f"cannot noise non-floating tensor {name!r} ({t.dtype}); it would leak unnoised")
        gen = generator
        if gen is None:
            key = str(t.device)
            if key not in own:
                own[key] = torch.Generator(device=t.device)
                own[key].manual_seed(secrets.randbits(63))
            gen = own[key]
        noise = torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device)
        noised[name] = t.detach() + noise * std
    return noised
