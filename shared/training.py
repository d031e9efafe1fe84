"""Local training of a recommender on one device's records, with or without DP-SGD.

No Flower imports: the device runtime (``client/``) and the centralized reference
trainer both call :func:`train_locally` / :func:`make_optimizer`, so private and
non-private results come from the same code.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
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
    return torch.optim.SGD(params, lr=train.learning_rate, momentum=train.momentum, weight_decay=train.weight_decay)


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


def opacus_sample_rate(train: TrainConfig) -> float:
    """The Poisson rate Opacus's accountant will record for the public ``sample-rate``.

    :func:`train_locally` hands Opacus a loader of ``round(1 / sample-rate)`` Poisson
    batches; ``make_private`` takes ``1 / len(loader)`` and charges ``1 / len`` of the loader
    it rebuilds, whose length is ``int(1 / rate)``. Floating-point rounding can make the two
    differ, so the budget check mirrors the whole chain, not the formula. The rate depends on
    public configuration only: never on the device's record count.
    """
    batches = round(1.0 / train.sample_rate)
    return 1.0 / int(1.0 / (1.0 / batches))


def plan_release(train: TrainConfig, privacy: PrivacyConfig) -> Release:
    """The DP-SGD release a task will make (exactly the rate and steps Opacus will charge).

    A function of public configuration alone, so every device's release, and the epsilon it
    reports or refuses at, is the same whatever its number of records.
    """
    return Release(privacy.noise_multiplier, opacus_sample_rate(train), train.local_steps)


# Expected batch x catalogue size above which ghost clipping is faster for NCF on CPU:
# hooks mode's cost grows with the B x V x D per-record embedding gradient, ghost mode
# pays a second backward pass instead. Measured (1 thread, 10 steps, D = 64): at B = 8,
# hooks 0.11 s vs ghost 0.15 s with 1,682 items, 0.14 vs 0.13 s with 5,000, 0.35 vs
# 0.22 s with 10,000; at B = 32, 0.18 vs 0.17 s with 1,682 and 1.58 vs 0.34 s with 10,000.
GHOST_CLIPPING_MIN_BATCH_ITEMS = 40_000


def uses_ghost_clipping(model: Recommender, privacy: PrivacyConfig, batch_size: int) -> bool:
    """Whether DP-SGD clips with Opacus ghost clipping for this model, batch size and config.

    ``clipping-mode = "auto"`` picks ghost clipping where the model supports it and the
    expected batch times the catalogue size reaches :data:`GHOST_CLIPPING_MIN_BATCH_ITEMS`.

    Raises
    ------
    ValueError
        If ``clipping-mode = "ghost"`` is asked of a model that does not support it.
    """
    if privacy.clipping_mode == "ghost" and not model.ghost_clipping:
        raise ValueError(f"clipping-mode: {type(model).__name__} does not support ghost clipping; use hooks or auto")
    if privacy.clipping_mode == "auto":
        return model.ghost_clipping and batch_size * model.num_items >= GHOST_CLIPPING_MIN_BATCH_ITEMS
    return privacy.clipping_mode == "ghost"


def _ghost_step(
    model: Recommender,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    negative_gen: torch.Generator,
    params: list[torch.nn.Parameter],
) -> torch.Tensor:
    """Leave the batch's clipped gradient sum in ``.grad`` for ghost mode's optimizer step.

    Opacus's two-pass backward (``DPTensorFastGradientClipping``) cannot take an empty
    batch (its mean is NaN), so an empty Poisson batch gets zero gradients instead: the
    optimizer step then adds the same noise, scales by the same expected batch size and
    charges the same step as in hooks mode, where an empty batch's clipped sum is zero.
    """
    negatives = model.sample_negatives(batch[0].shape[0], negative_gen)  # same draws as ``loss``
    if batch[0].shape[0] == 0:
        for p in params:
            p.grad = torch.zeros_like(p)
        return torch.zeros(())
    per_record = model.loss_per_record(batch, negatives)
    DPTensorFastGradientClipping(net, optimizer, per_record, loss_reduction="mean").backward()  # type: ignore[arg-type]
    return per_record.mean()


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
    dataset = TensorDataset(*records)
    loader: DataLoader[tuple[torch.Tensor, ...]]
    if privacy.dp:
        # Poisson sampling at the public rate (not batch-size / N, which would reveal N).
        loader = DPDataLoader(dataset, sample_rate=1.0 / round(1.0 / train.sample_rate), generator=sampler_gen)
    else:
        loader = DataLoader(dataset, batch_size=train.batch_size, shuffle=True, generator=sampler_gen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, train)
    model.train()
    ghost = privacy.dp and uses_ghost_clipping(model, privacy, train.batch_size)

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
            made = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=privacy.noise_multiplier,
                max_grad_norm=privacy.clip_norm,
                poisson_sampling=True,
                noise_generator=noise_gen,
                grad_sample_mode="ghost" if ghost else "hooks",
            )
            # Ghost mode also returns a criterion wrapper; fedrec's models compute their own
            # per-record losses, which :func:`_ghost_step` wraps the same way.
            private_model, optimizer, loader = (made[0], made[1], made[3]) if ghost else made
        # Opacus divides each noisy sum by int(N * rate), a function of N; the public
        # batch-size takes its place, so the update's scale reveals nothing beyond the DP output.
        optimizer.expected_batch_size = train.batch_size  # type: ignore[attr-defined]
        sample_rate = 1.0 / len(loader)
        if sample_rate != opacus_sample_rate(train):
            raise RuntimeError(f"Opacus charges rate {sample_rate}, the plan says {opacus_sample_rate(train)}")
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
                if ghost:
                    loss = _ghost_step(model, net, optimizer, tuple(batch), negative_gen, params)
                else:
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
