"""The ``fedrec`` command line.

Subcommands import their heavy dependencies lazily so that ``fedrec --help``
is instant and a device install needs none of the simulation extras.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from shared.config import ConfigError, parse_config, to_flat
from shared.data.types import DataError


def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """``k=v`` strings into a dict (values stay strings; the config parser types them)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip().strip("'\"")
    return out


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from simulations.presets import preset

    overrides = preset(args.preset)
    overrides.update(_parse_sets(args.set or []))
    if args.output:
        overrides["output-dir"] = args.output
    return overrides


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.runner import simulate

    summary = simulate(_overrides(args), num_actors=args.actors, backend=args.backend)
    final, privacy = summary["final"], summary["privacy"]
    print(json.dumps({"hr@10": final["hr@10"], "ndcg@10": final["ndcg@10"],
                      "epsilon-max": privacy["epsilon-max"], "delta": privacy["delta"]}))
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
    from shared.centralized import train_centralized

    result = train_centralized(parse_config(_overrides(args)), epochs=args.epochs)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``fedrec``."""
    parser = argparse.ArgumentParser(prog="fedrec", description="Federated, differentially private recommendation.")
    sub = parser.add_subparsers(dest="command", required=True)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="default", help="named preset (see `fedrec presets`)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        p.add_argument("--output", help="output directory (config key output-dir)")

    sim = sub.add_parser("simulate", help="run a federated simulation (one virtual device per user)")
    run_options(sim)
    sim.add_argument("--actors", type=int, default=2, help="ClientApps running in parallel (default 2)")
    sim.add_argument("--backend", choices=("ray", "local"), default="ray",
                     help="ray: Flower's simulation runtime (default); local: in-process, same numbers")
    sim.set_defaults(func=_cmd_simulate)

    cen = sub.add_parser("centralized", help="train the same model centrally without DP (the reference)")
    run_options(cen)
    cen.add_argument("--epochs", type=int, default=20)
    cen.set_defaults(func=_cmd_centralized)

    conf = sub.add_parser("config", help="print the resolved configuration")
    run_options(conf)
    conf.set_defaults(func=_cmd_config)

    pre = sub.add_parser("presets", help="list simulation presets")
    pre.set_defaults(func=_cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedrec`` console command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, DataError, KeyError) as exc:
        print(f"fedrec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
