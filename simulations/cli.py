"""``fedrec simulate``, ``centralized``, ``config`` and ``presets``: the researcher's commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shared.config import parse_config, parse_set_pairs, to_flat
from simulations.config_help import describe_keys


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from simulations.presets import preset

    overrides = preset(args.preset)
    overrides.update(parse_set_pairs(args.set))
    if args.output:
        overrides["output-dir"] = args.output
    if getattr(args, "overwrite", False):
        overrides["overwrite"] = True
    return overrides


def _cmd_simulate(args: argparse.Namespace) -> int:
    from server.stop import RunInterrupted
    from simulations.runner import simulate

    overrides = _overrides(args)
    try:
        summary = simulate(
            overrides,
            num_actors=args.actors,
            backend=args.backend,
            console="verbose" if args.verbose else "quiet",
        )
    except (RunInterrupted, KeyboardInterrupt):
        out = parse_config({**overrides}).output_dir
        print(
            f"fedrec: interrupted; {out}/fedrec.db keeps every task and privacy release recorded so far, and the "
            f"devices' ledgers are in {out}/devices (the run is marked unfinished, which `fedrec audit {out}` "
            "reports); a run cannot be resumed yet: start it again with --overwrite",
            file=sys.stderr,
        )
        return 130
    final, privacy = summary["final"], summary["privacy"]
    print(
        json.dumps(
            {
                "hr@10": final["hr@10"],
                "ndcg@10": final["ndcg@10"],
                "epsilon-max": privacy["epsilon-max"],
                "delta": privacy["delta"],
            }
        )
    )
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = parse_config(_overrides(args))
    print(json.dumps(to_flat(cfg), indent=2))
    return 0


def _cmd_presets(_args: argparse.Namespace) -> int:
    from simulations.presets import PRESETS

    for name, values in PRESETS.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items()) or "(the defaults)"
        print(f"{name:10s} {shown}")
    return 0


def _cmd_centralized(args: argparse.Namespace) -> int:
    from simulations.centralized import train_centralized

    result = train_centralized(parse_config(_overrides(args)), epochs=args.epochs)
    print(json.dumps(result, indent=2))
    return 0


def cmd_empirical_audit(args: argparse.Namespace) -> int:
    """``fedrec audit --empirical``: the canary experiment.

    Exit 1 when its bound exceeds the accounted epsilon, 3 when the audit could not have
    found that (its ceiling is at or below the accounted epsilon), else 0.
    """
    from simulations.canary_audit import CANARIES_PER_DEVICE, audit_exit_code, run_canary_audit

    overrides: dict[str, Any] = dict(parse_set_pairs(args.set))
    if args.no_dp:
        overrides["dp"] = False
    if args.output:
        overrides["output-dir"] = args.output
    if getattr(args, "overwrite", False):
        overrides["overwrite"] = True
    result = run_canary_audit(
        overrides,
        canaries_per_device=args.canaries_per_device or CANARIES_PER_DEVICE,
        broken_noise_factor=args.broken_noise_factor,
    )
    print(json.dumps(result, indent=2, default=str))
    code = audit_exit_code(result)
    if code == 1:
        print("fedrec audit: the empirical lower bound exceeds the accounted epsilon: a privacy bug", file=sys.stderr)
    return code


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="named preset (see `fedrec presets`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--output", help="output directory (config key output-dir); refused if it holds files")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the fedrec run in the output directory, removing only fedrec's own files (config key overwrite)",
    )


def register(sub: Any) -> None:
    """Add the simulation commands to ``fedrec``'s subparsers."""
    keys = describe_keys(to_flat(parse_config({})))
    sim = sub.add_parser(
        "simulate",
        help="run a federated simulation (one virtual device per user)",
        epilog=keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _run_options(sim)
    sim.add_argument(
        "--actors",
        type=int,
        default=None,
        help="ClientApps running in parallel (default: one more than the CPU cores, at most one per GiB of memory)",
    )
    sim.add_argument(
        "--backend",
        choices=("ray", "local"),
        default="ray",
        help="ray: Flower's simulation runtime (default); local: in-process, same numbers",
    )
    sim.add_argument(
        "--verbose",
        action="store_true",
        help="show every library's log lines and warnings on the console (they always go to fedrec.log in the run)",
    )
    sim.set_defaults(func=_cmd_simulate)

    cen = sub.add_parser("centralized", help="train the same model centrally without DP (the reference)")
    _run_options(cen)
    cen.add_argument("--epochs", type=int, default=20)
    cen.set_defaults(func=_cmd_centralized)

    conf = sub.add_parser(
        "config",
        help="print the resolved configuration",
        epilog=keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _run_options(conf)
    conf.set_defaults(func=_cmd_config)

    pre = sub.add_parser("presets", help="list simulation presets")
    pre.set_defaults(func=_cmd_presets)
