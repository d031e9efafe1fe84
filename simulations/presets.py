"""Named simulation presets: each is a set of config overrides on top of the defaults.

The defaults themselves (``[tool.flwr.app.config]``) are the main job: all 943
MovieLens-100K users as devices, DP on, asynchronous buffered aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "default": {},
        "smoke": {
            "max-devices": 12,
            "num-versions": 6,
            "concurrency": 6,
            "buffer-size": 3,
            "eval-every": 3,
            "eval-devices": 6,
            "local-steps": 3,
            "output-dir": "runs/smoke",
        },
        "no-dp": {"dp": False, "output-dir": "runs/no-dp"},
        "sync": {"mode": "sync", "num-versions": 50, "output-dir": "runs/sync"},
        "sasrec": {"model": "sasrec", "output-dir": "runs/sasrec"},
        # Both privacy units: record-level DP-SGD on devices and user-level server noise
        # (z = 3 admits ~22 full-weight contributions per device within epsilon 8).
        "user-dp": {"user-dp": True, "user-noise-multiplier": 3.0, "output-dir": "runs/user-dp"},
        "large": {
            "dataset": "synthetic",
            "synthetic-users": 500,
            "synthetic-items": 20000,
            "embedding-dim": 512,
            "mlp-layers": "512,256",
            "batch-size": 8,
            "local-steps": 2,
            "num-versions": 10,
            "concurrency": 10,
            "buffer-size": 5,
            "eval-every": 5,
            "eval-devices": 20,
            "output-dir": "runs/large",
        },
    }
)


def preset(name: str) -> dict[str, Any]:
    """The overrides of a named preset; raises KeyError listing the known names."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
