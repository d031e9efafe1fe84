"""Local training of a recommender on one device's records, with or without DP-SGD.

No Flower imports: the device runtime (``client/``) and the centralized reference
trainer both call :func:`train_locally` / :func:`make_optimizer`, so private and
non-private results come from the same code.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from shared.config import PrivacyConfig, TrainConfig
from shared.models.base import Recommender
from shared.privacy.accounting import DeviceAccountant, Release


@dataclass(frozen=True)
class LocalResult:
    """What one local training task did (the metrics a device may report)."""

    num_records: int
    steps: int
    mean_loss: float
    sample_rate: float
    epsilon: float  # cumulative after this task; 0.0 when DP is off


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer; L2 regularisation is the optimizer's weight decay."""
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    return torch.optim.SGD(
        params, lr=train.learning_rate, momentum=train.momentum, weight_decay=train.weight_decay
    )


def apply_l1_proximal(params: list[torch.nn.Parameter], lr: float, l1: float) -> None:
    """Soft-threshold parameters: the proximal step of an L1 penalty.

    Applied after the optimizer step rather than added to the loss because Opacus
    replaces ``.grad`` with clipped per-sample gradients, which would silently drop
    a penalty term that does not flow through a module. It uses no data, so it costs
    no privacy.
    """
    if l1 <= 0:
        return
    with torch.no_grad():
        for p in params:
            p.copy_(torch.sign(p) * torch.clamp(p.abs() - lr * l1, min=0.0))


def opacus_sample_rate(num_records: int, batch_size: int) -> float:
    """The Poisson rate Opacus's accountant will record for ``num_records`` at ``batch_size``.

    ``make_private`` takes ``1 / len(loader)`` = ``1 / ceil(N / B)`` to build the
    DPDataLoader, whose length is ``int(1 / rate)``, and then charges
    ``1 / len(dp_loader)``. Floating-point rounding makes the two differ for some N
    (N = 737, B = 8: 1/93 becomes 1/92), so the budget check must mirror the
    whole chain, not the formula.
    """
    batches = max(1, math.ceil(num_records / batch_size))
    return 1.0 / int(1.0 / (1.0 / batches))


def plan_release(num_records: int, train: TrainConfig, privacy: PrivacyConfig) -> Release:
    """The DP-SGD release a task will make (exactly the rate and steps Opacus will charge)."""
    return Release(
        privacy.noise_multiplier, opacus_sample_rate(num_records, train.batch_size), train.local_steps
    )


def train_locally(
    model: Recommender,
    records: tuple[torch.Tensor, ...],
    train: TrainConfig,
    privacy: PrivacyConfig,
    accountant: DeviceAccountant | None,
    seed: int,
) -> LocalResult:
    """Train ``model`` in place for ``train.local_steps`` optimizer steps.

    With ``privacy.dp`` the steps are Opacus DP-SGD with Poisson sampling; the
    device's ``accountant`` is attached before ``make_private`` so every step is
    charged to its persistent history. The caller must have checked the budget
    (:meth:`DeviceAccountant.check`) first.

    Parameters
    ----------
    model
        The recommender; trained in place and returned to a plain module.
    records
        The device's DP records (``model.build_records``), first dim N.
    seed
        Seeds batch sampling, negative sampling and DP noise (reproducible simulation).
    """
    # Empty Poisson batches are expected on small devices and handled (see below);
    # Opacus would log a warning for each one.
    logging.getLogger("opacus.data_loader").setLevel(logging.ERROR)
    num_records = int(records[0].shape[0])
    if num_records == 0:
        raise ValueError("a device with no training records cannot train")
    sampler_gen = torch.Generator().manual_seed(seed)
    negative_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator().manual_seed(seed + 2)
    loader = DataLoader(
        TensorDataset(*records), batch_size=train.batch_size, shuffle=True, generator=sampler_gen
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, train)
    model.train()

    if privacy.dp:
        if accountant is None:
            raise ValueError("DP training needs the device's accountant")
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off; docs/privacy.md states the RNG choice.
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            engine = PrivacyEngine(accountant=accountant.mechanism)
            # Bind the device's persistent accountant before make_private: the optimizer's
            # step hook is attached to whatever accountant the engine holds at that point.
            engine.accountant = accountant.opacus
            private_model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=privacy.noise_multiplier,
                max_grad_norm=privacy.clip_norm,
                poisson_sampling=True,
                noise_generator=noise_gen,
            )
        sample_rate = 1.0 / len(loader)
        net: torch.nn.Module = private_model
    else:
        sample_rate = min(1.0, train.batch_size / num_records)
        net = model

    losses: list[float] = []
    steps = 0
    with warnings.catch_warnings():
        # Opacus's hooks on the input embedding fire without input gradients; harmless (opacus #328).
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        while steps < train.local_steps:
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                # Empty Poisson batches still take a (noise-only) step: skipping them
                # would change the sampling the accountant assumes.
                loss = model.loss(tuple(batch), negative_gen)
                loss.backward()
                optimizer.step()
                apply_l1_proximal(params, train.learning_rate, train.l1)
                if batch[0].shape[0] > 0:
                    losses.append(float(loss.detach()))
                steps += 1
                if steps >= train.local_steps:
                    break

    if privacy.dp:
        # Strip Opacus hooks so the same module can be made private again next round.
        private_model.to_standard_module()  # type: ignore[attr-defined]
        epsilon = accountant.epsilon() if accountant is not None else 0.0
    else:
        epsilon = 0.0
    del net
    return LocalResult(
        num_records=num_records,
        steps=steps,
        mean_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
        sample_rate=sample_rate,
        epsilon=epsilon,
    )
