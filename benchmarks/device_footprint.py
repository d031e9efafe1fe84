"""Peak memory and time of DP training tasks on one device (run it in the light install).

    python benchmarks/device_footprint.py [--device 12] [--tasks 3]

Prints the seconds per task and the process's peak resident memory: what a device
running the default configuration needs.
"""

from __future__ import annotations

import argparse
import resource
import time

from _common import machine

from client.device import Device, DeviceState
from shared.config import parse_config
from shared.data.partition import load_device, prepare_partitions
from shared.models.factory import build_model


def main() -> None:
    """Train a few tasks on one MovieLens device with the default config and report the footprint."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", type=int, default=12)
    parser.add_argument("--tasks", type=int, default=3)
    args = parser.parse_args()
    cfg = parse_config({})
    info = prepare_partitions(cfg.data)
    data = load_device(info.path, args.device)
    device = Device(cfg, data, info.num_items, DeviceState())
    model = build_model(cfg.model, info.num_items, 1, seed=1)
    params = {k: v.clone() for k, v in model.global_state().items()}
    started = time.perf_counter()
    for task in range(args.tasks):
        device.train(params, task)
    per_task = (time.perf_counter() - started) / args.tasks
    print(f"machine: {machine()}")
    print(
        f"device {args.device}: {len(data.train_items)} training interactions, epsilon after "
        f"{args.tasks} tasks {device.epsilon():.3f}"
    )
    print(
        f"seconds per DP task: {per_task:.2f}   peak RSS: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
