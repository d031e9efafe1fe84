"""What the server accepts as a device's model update: form, dtype, finiteness and size.

A device is not trusted to send what the protocol asks. An update is accepted only when it
names exactly the global model's parameters, each with the model's shape and dtype
(float32: an int, bool, half, double or complex tensor is refused rather than cast), every
value finite, and its whole L2 norm within a bound derived from the public training
parameters (:func:`update_norm_bound`). Weights are public (``shared.protocol.PUBLIC_WEIGHT``),
so a device cannot claim more influence than any other. ``docs/privacy.md`` ("What a
malicious device can do") says what these checks leave open.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from server.aggregation import StateDict
from server.scheduler import Failure, Update
from shared.config import FedrecConfig
from shared.protocol import TrainUpdate

# A DP-SGD step's noisy gradient sum holds at most this many times ``batch-size`` clipped
# records (Poisson batches of a device with N records average N * sample-rate; at the default
# rate 1/8 and batch 8 this admits devices with about 4,000 records). Larger honest devices
# need a larger ``max-update-norm``.
MAX_BATCH_FACTOR = 64
# Gaussian noise vectors of dimension d exceed sigma * C * (sqrt(d) + t) with probability
# at most exp(-t^2 / 2): 2e-22 at t = 10 (Lipschitz concentration of the norm).
NOISE_TAIL = 10.0
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which shared.training uses


def adam_step_bound(steps: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """Largest ``|m_hat / sqrt(v_hat)|`` of one coordinate over the first ``steps`` Adam steps.

    By Cauchy-Schwarz, ``|sum a_i g_i| <= sqrt(sum a_i^2 / b_i) * sqrt(sum b_i g_i^2)`` with
    ``a_i``, ``b_i`` the bias-corrected first- and second-moment weights of step ``i``, whatever
    the gradients (epsilon only lowers the ratio).
    """
    b1, b2 = betas
    worst = 0.0
    for t in range(1, steps + 1):
        total = 0.0
        for i in range(1, t + 1):
            a = (1 - b1) * b1 ** (t - i) / (1 - b1**t)
            b = (1 - b2) * b2 ** (t - i) / (1 - b2**t)
            total += a * a / b
        worst = max(worst, math.sqrt(total))
    return worst


def update_norm_bound(cfg: FedrecConfig, dim: int, model_norm: float) -> float | None:
    """The largest L2 norm an honest device's update can have, from public parameters only.

    ``max-update-norm`` when set. Otherwise, for ``local-steps`` steps of the configured
    optimizer from a model of norm ``model_norm`` (``dim`` parameters sent):

    * Adam: every coordinate moves at most ``lr * K`` per step (:func:`adam_step_bound`), so
      ``steps * lr * K * sqrt(dim)``;
    * SGD (momentum ``m``, weight decay ``wd``) under DP-SGD: each step's gradient is at most
      ``g = (64 * batch-size * clip + sigma * clip * (sqrt(dim) + 10)) / batch-size`` and the
      momentum buffer at most ``(g + wd * |theta|) / (1 - m)``; the distance ``D`` from the start
      then grows as ``D' <= D (1 + a wd) + a (g + wd |theta_0|)`` with ``a = lr / (1 - m)``;
    * L1's proximal step adds at most ``lr * l1 * sqrt(dim)`` per step.

    ``None`` (no size check) for plain SGD without DP: unclipped gradients have no bound.
    """
    agg, train, privacy = cfg.aggregation, cfg.train, cfg.privacy
    if agg.max_update_norm:
        return agg.max_update_norm
    steps, lr, root = train.local_steps, train.learning_rate, math.sqrt(dim)
    proximal = lr * train.l1 * root
    if train.optimizer == "adam":
        return steps * (lr * adam_step_bound(steps) * root + proximal)
    if not privacy.dp:
        return None
    clip, b = privacy.clip_norm, train.batch_size
    grad = (MAX_BATCH_FACTOR * b * clip + privacy.noise_multiplier * clip * (root + NOISE_TAIL)) / b
    a = lr / (1 - train.momentum)
    per_step = a * (grad + train.weight_decay * model_norm) + proximal
    growth = 1 + a * train.weight_decay
    if growth == 1:
        return steps * per_step
    return per_step * (growth**steps - 1) / (growth - 1)


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Whole L2 norm of a state dict (in float64)."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))


def validate_update(update: TrainUpdate, reference: StateDict, bound: float | None = None) -> Update | Failure:
    """Turn a well-formed train update into an Update, or a Failure naming what is wrong.

    The protocol has checked the reply's form (``shared/protocol.py``); this checks the
    delta against the global model ``reference``: the same parameter names, shapes and
    dtype, finite values, and (when ``bound`` is given) an L2 norm within it.
    """
    try:
        delta = dict(update.delta.to_torch_state_dict())
    except Exception as exc:  # noqa: BLE001 - any bytes a device sends: numpy raises EOFError, OSError, ...
        return Failure("failed", f"malformed reply: arrays do not deserialize ({type(exc).__name__}: {exc})")
    if set(delta) != set(reference):
        extra = sorted(set(delta) - set(reference))
        missing = sorted(set(reference) - set(delta))
        return Failure("failed", f"corrupt update: unexpected {extra} / missing {missing}")
    for key, value in delta.items():
        if value.shape != reference[key].shape:
            return Failure("failed", f"corrupt update: {key} has shape {tuple(value.shape)}")
        if value.dtype != reference[key].dtype:
            return Failure("failed", f"corrupt update: {key} is {value.dtype}, the model's is {reference[key].dtype}")
        if not torch.isfinite(value).all():
            return Failure("failed", f"corrupt update: {key} has non-finite values")
    if bound is not None:
        norm = state_norm(delta)
        if not norm <= bound:
            return Failure(
                "failed",
                f"update refused: L2 norm {norm:.4g} exceeds {bound:.4g}, the most local training with the public "
                "settings can move the model (max-update-norm)",
            )
    # Under DP the device does not report its training loss (it is computed from its
    # records and is not covered by the DP guarantee).
    return Update(delta, update.loss)
