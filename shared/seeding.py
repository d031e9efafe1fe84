"""Stable seeds derived from (run seed, device, purpose), identical across processes."""

from __future__ import annotations

import zlib

# Purposes, so that two uses of one device's seed never share a stream.
MODEL_INIT = "model-init"
EVAL_SAMPLING = "eval-sampling"


def device_seed(run_seed: int, device_id: int, purpose: str) -> int:
    """A 31-bit seed for ``purpose`` on ``device_id`` (unlike ``hash``, stable across processes)."""
    return zlib.crc32(f"{run_seed}:{device_id}:{purpose}".encode()) & 0x7FFFFFFF
