"""A device's contribution to a secure noisy sum: its records' clipped gradients, each encoded on its own.

For each of ``local-steps`` steps the device Poisson-samples its records at the public rate;
each sampled record's gradient of the *global* parameters (at the task's model: nothing is
updated in between, so no step depends on another's sample) is clipped to ``clip-norm``;
the step's sum is rotated, scaled and rounded stochastically
(``shared.secure_sum.encoding.encode_sum``) and gets its own Skellam share. One record
moves one step's vector by at most ``clip * scale + sqrt(d)`` (the encoding's
``rounded_norm_bound`` at ``beta = 0``; ``encode_sum`` says why), the sensitivity the ledger
entry names; each step is one subsampled Skellam release (the aggregate noise of every step's
sum is at least ``mu_total``), and the device sends only the sum of its steps' noisy
encodings, a post-processing of those ``local-steps`` releases.
The device's personal parameters (NCF's user embedding) are not trained by such a task:
their update would be a second, device-side release.

Per-record gradients come from Opacus's ``GradSampleModule`` (the same per-sample machinery
DP-SGD uses); the sampling, rounding and noise generators are seeded from the OS CSPRNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from opacus import GradSampleModule

from client.secure_sum_device import fresh_generator
from shared.models.base import Recommender
from shared.secure_sum.encoding import add_mod, encode_sum, skellam_noise, to_modular
from shared.secure_sum.layout import VectorLayout
from shared.secure_sum.release import SecureReleasePlan

# Records whose per-sample gradients are held at once (bounds memory on large catalogues).
_CHUNK = 32


class TooManyRecords(ValueError):
    """The device holds more records than the secure sum's public bound admits per task."""


@dataclass(frozen=True)
class SecureContribution:
    """The noisy encoded vector a device masks, and how many records it encoded (kept on the device)."""

    vector: NDArray[np.uint64]
    records_encoded: int


def _torch_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int(fresh_generator().integers(0, 2**62)))


def _per_record_gradients(
    net: GradSampleModule,
    model: Recommender,
    batch: tuple[torch.Tensor, ...],
    names: Sequence[str],
    gen: torch.Generator,
) -> torch.Tensor:
    """Rows of flattened per-record gradients of ``names`` (shape (B, dim))."""
    negatives = model.sample_negatives(batch[0].shape[0], gen)
    net.zero_grad(set_to_none=True)
    # Summed, so each record's grad_sample is its own loss's gradient.
    model.loss_per_record(batch, negatives).sum().backward()
    params = dict(model.named_parameters())
    rows = []
    for name in names:
        sample = getattr(params[name], "grad_sample", None)
        if sample is None:  # a parameter no sampled record touches
            sample = torch.zeros((batch[0].shape[0], *params[name].shape))
        rows.append(sample.reshape(batch[0].shape[0], -1))
    return torch.cat(rows, dim=1)


def secure_contribution(
    model: Recommender,
    records: tuple[torch.Tensor, ...],
    plan: SecureReleasePlan,
    layout: VectorLayout,
    rotation_seed: bytes,
) -> SecureContribution:
    """The device's noisy encoded vector for one secure task (modulo ``2**bits``).

    Raises
    ------
    TooManyRecords
        If ``local-steps`` times the device's record count exceeds ``secure-sum-max-records``
        (the wrap-around bound assumes it never does).
    """
    num_records = int(records[0].shape[0])
    steps = plan.release.steps
    if num_records * steps > plan.max_records:
        raise TooManyRecords(
            f"{num_records} records x {steps} steps exceed secure-sum-max-records ({plan.max_records})"
        )
    encoding = plan.encoding
    rng = fresh_generator()
    sampler, negatives = _torch_generator(), _torch_generator()
    local = model.local_parameter_names()
    for name, p in model.named_parameters():
        # Personal parameters stay as they are: training them would be a second release.
        p.requires_grad_(name not in local)
    model.train()
    result = np.zeros(encoding.padded_dim, dtype=np.uint64)
    encoded = 0
    with warnings.catch_warnings():
        # Opacus's hooks on the input embedding fire without input gradients; harmless (opacus #328).
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        # "sum": each grad_sample row is that record's own gradient (Opacus's default "mean"
        # would scale it by the chunk's size, which one record's presence changes).
        net = GradSampleModule(model, loss_reduction="sum")
        try:
            for _ in range(steps):
                # One release per step: this step's clipped sum, rounded, with its own noise share.
                # Summing the steps' noisy encodings is then post-processing of `steps` releases.
                total = np.zeros(encoding.dim, dtype=np.float64)
                chosen = torch.nonzero(torch.rand(num_records, generator=sampler) < plan.release.sample_rate).flatten()
                for start in range(0, len(chosen), _CHUNK):
                    index = chosen[start : start + _CHUNK]
                    batch = tuple(r[index] for r in records)
                    grads = _per_record_gradients(net, model, batch, layout.names, negatives)
                    # Each row is one record's gradient: clipped on its own, then summed.
                    rows = grads.detach().double()
                    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
                    clipped = rows * torch.clamp(encoding.clip / torch.clamp(norms, min=1e-300), max=1.0)
                    total += clipped.sum(dim=0).numpy()
                    encoded += rows.shape[0]
                step = encode_sum(total, encoding, rotation_seed, rng)
                noise = to_modular(skellam_noise(plan.mu_device, encoding.padded_dim, rng), encoding.bits)
                result = add_mod(result, add_mod(step, noise, encoding.bits), encoding.bits)
        finally:
            net.to_standard_module()
    return SecureContribution(result, encoded)
