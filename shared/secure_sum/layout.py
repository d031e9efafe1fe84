"""The order in which a model's global parameters are laid out in one secure-sum vector.

Both halves flatten and unflatten with the same :class:`VectorLayout`, built from the
global model's parameter names and shapes (sorted by name), so the server's decoded sum
lands on the parameters the devices' gradients came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray


@dataclass(frozen=True)
class VectorLayout:
    """Parameter names (sorted) and their shapes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> VectorLayout:
        """The layout of a global state dict (its floating-point entries)."""
        names = tuple(sorted(k for k, v in state.items() if v.is_floating_point()))
        return cls(names, tuple(tuple(int(s) for s in state[k].shape) for k in names))

    @property
    def dim(self) -> int:
        """Total number of coordinates."""
        return sum(math.prod(shape) for shape in self.shapes)

    def unflatten(self, vector: NDArray[np.floating]) -> dict[str, torch.Tensor]:
        """Split a vector of :attr:`dim` coordinates into float32 tensors by name."""
        if vector.shape != (self.dim,):
            raise ValueError(f"a vector of this layout has {self.dim} coordinates, got shape {vector.shape}")
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = torch.from_numpy(np.ascontiguousarray(vector[offset : offset + size])).reshape(shape).float()
            offset += size
        return out
