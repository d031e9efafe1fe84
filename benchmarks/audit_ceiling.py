"""What the one-run empirical audit can certify at best (its ceiling), against what is accounted.

    python benchmarks/audit_ceiling.py [--devices 943] [--delta 1e-5] [--json FILE]

For k canaries per device it prints the ceiling (the lower bound a perfect attacker would get:
every guess right, the audit's grid and Bonferroni correction, the δ term at m = k x devices) and,
for a few privacy configurations (one task per device at the public sample rate), the accounted ε.
An audit can fail only where the ceiling lies above the accounted ε. Pure arithmetic: no training.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from _common import dump

from server.audit.empirical import audit_ceiling, one_run_lower_bound
from shared.privacy.accounting import DeviceAccountant

# (noise multiplier, sample rate, DP-SGD steps per device): the project's default task, a device
# that spends its whole budget of 8 at the defaults, and the empirical audit's default task.
_CONFIGS: tuple[tuple[str, float, float, int], ...] = (
    ("project default, one task", 1.0, 0.125, 10),
    ("project default, 60 steps (ε ≈ budget 8)", 1.0, 0.125, 60),
    ("audit default, one task", 3.0, 0.5, 10),
)


def main() -> None:
    """Print the ceiling per canaries-per-device and the accounted ε of a few configurations."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=943)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    ceilings = {}
    print(f"devices {args.devices}, delta {args.delta:g}, confidence {args.confidence}")
    for k in (1, 2, 4, 8, 16, 32):
        m = k * args.devices
        ceilings[k] = audit_ceiling(m, args.delta, args.confidence)
        print(f"  {k:2d} canaries per device ({m:6d} canaries): ceiling {ceilings[k]:.2f}")
    # Without the grid: one pre-registered test guessing every canary, all right.
    single = {m: one_run_lower_bound(m, m, args.delta, args.confidence, m) for m in (10_000, 100_000)}
    for m, bound in single.items():
        print(f"  one test guessing all {m} canaries, all right: {bound:.2f}")
    print(f"  (it tends to ln(beta / (2 delta)) = {math.log((1 - args.confidence) / (2 * args.delta)):.2f})")
    accounted = {}
    for name, sigma, rate, steps in _CONFIGS:
        accounted[name] = DeviceAccountant("rdp", args.delta, math.inf, [(sigma, rate, steps)]).epsilon()
        print(f"  accounted epsilon, {name} (sigma {sigma:g}, rate {rate:g}, {steps} steps): {accounted[name]:.2f}")
    dump(
        args.json,
        {
            "devices": args.devices,
            "delta": args.delta,
            "ceiling": ceilings,
            "single-test": single,
            "accounted": accounted,
        },
    )


if __name__ == "__main__":
    main()
