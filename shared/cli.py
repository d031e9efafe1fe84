"""The ``fedrec`` command line.

Subcommands import their heavy dependencies lazily so that ``fedrec --help``
is instant and a device install needs none of the simulation extras.
"""

from __future__ import annotations

import argparse
import json
import re
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
    from shared.centralized import train_centralized

    result = train_centralized(parse_config(_overrides(args)), epochs=args.epochs)
    print(json.dumps(result, indent=2))
    return 0


def _audit_device_ledger(args: argparse.Namespace) -> tuple[Any, float | None]:
    from pathlib import Path

    from client.ledger_store import DeviceLedgerStore
    from shared.privacy.audit import AuditInput
    from shared.privacy.user_level import choose_order

    path = Path(args.ledger)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such device ledger file")
    with DeviceLedgerStore(path) as store:
        entries = store.entries()
        key = args.public_key or store.identity().public_key
        if not args.public_key:
            print(
                "fedrec audit: no --public-key given; verifying against the key stored in the file itself "
                "(this cannot detect a file whose key was replaced)",
                file=sys.stderr,
            )
    device = entries[0].device_id if entries else -1
    order = None
    if args.user_epsilon_budget is not None:
        user = [e for e in entries if e.unit == "user"]
        if user:
            order = choose_order(user[0].noise_multiplier, args.user_epsilon_budget, args.delta)
    data = AuditInput(
        source=str(path),
        keys={device: key},
        ledgers={device: entries},
        delta=args.delta,
        record_budget=args.epsilon_budget,
        user_budget=args.user_epsilon_budget,
    )
    return data, order


def _cmd_audit(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from shared.privacy.audit import run_audit
    from shared.privacy.audit_report import terminal_text, write_reports

    if args.empirical:
        from simulations.canary_audit import run_canary_audit

        overrides = _parse_sets(args.set or [])
        if args.no_dp:
            overrides["dp"] = False
        if args.output:
            overrides["output-dir"] = args.output
        result = run_canary_audit(overrides)
        print(json.dumps(result, indent=2, default=str))
        bound, accounted = result.get("epsilon-lower-bound"), result.get("epsilon-accounted")
        if result.get("dp", True) and bound is not None and accounted is not None and bound > accounted:
            print(
                "fedrec audit: the empirical lower bound exceeds the accounted epsilon: a privacy bug", file=sys.stderr
            )
            return 1
        return 0
    started = time.monotonic()
    if args.ledger:
        data, order = _audit_device_ledger(args)
        out = Path(args.output or Path(args.ledger).with_suffix("").as_posix() + "-audit")
    else:
        if not args.path:
            raise FileNotFoundError("give a run directory or database, --ledger FILE, or --empirical")
        from server.audit_source import load_run

        data, order = load_run(Path(args.path), args.run_id)
        base = Path(args.path) if Path(args.path).is_dir() else Path(args.path).parent
        out = Path(args.output) if args.output else base / "audit"
    report = run_audit(data, user_order=order)
    paths = write_reports(report, out)
    print(terminal_text(report))
    print(f"\nreports: {paths['markdown']}  {paths['json']}  ({time.monotonic() - started:.1f} s)")
    return 0 if report.ok else 1


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
    sim.set_defaults(func=_cmd_simulate)

    cen = sub.add_parser("centralized", help="train the same model centrally without DP (the reference)")
    run_options(cen)
    cen.add_argument("--epochs", type=int, default=20)
    cen.set_defaults(func=_cmd_centralized)

    conf = sub.add_parser("config", help="print the resolved configuration")
    run_options(conf)
    conf.set_defaults(func=_cmd_config)

    aud = sub.add_parser(
        "audit",
        help="verify privacy ledgers, recompute every epsilon independently, check budgets",
        description="Exits 0 when everything verifies and no budget is exceeded, 1 on any finding.",
    )
    aud.add_argument("path", nargs="?", help="run directory (with fedrec.db) or database file")
    aud.add_argument("--run-id", type=int, help="run in the database (default: the latest)")
    aud.add_argument("--ledger", help="audit one device's ledger file instead of a run")
    aud.add_argument("--public-key", help="with --ledger: the device's registered public key")
    aud.add_argument("--epsilon-budget", type=float, help="with --ledger: record-level budget")
    aud.add_argument("--user-epsilon-budget", type=float, help="with --ledger: user-level budget")
    aud.add_argument("--delta", type=float, default=1e-5, help="with --ledger: delta of the claims")
    aud.add_argument("--output", help="where to write audit.md, audit.json and plots")
    aud.add_argument(
        "--empirical",
        action="store_true",
        help="run the canary experiment (one-run audit) and report the empirical lower bound",
    )
    aud.add_argument("--no-dp", action="store_true", help="with --empirical: train without DP (the attack's baseline)")
    aud.add_argument("--set", action="append", metavar="KEY=VALUE", help="with --empirical: config overrides")
    aud.set_defaults(func=_cmd_audit)

    pre = sub.add_parser("presets", help="list simulation presets")
    pre.set_defaults(func=_cmd_presets)

    # Deployment: the server host's and the device's command groups.
    from client.cli_device import register as register_device_commands
    from server.cli_deploy import register as register_server_commands

    register_server_commands(sub)
    register_device_commands(sub)
    return parser


# Options whose value is an Ed25519 public key in URL-safe base64. One key in 64 starts with
# "-", which argparse would read as an option ("expected one argument").
_KEY_OPTIONS = frozenset({"--ledger-key", "--public-key"})
_KEY_TEXT = re.compile(r"[A-Za-z0-9_-]{43}=?")


def _attach_key_values(argv: Sequence[str]) -> list[str]:
    """Rewrite ``--ledger-key -abc...`` as ``--ledger-key=-abc...`` when the value is key-shaped.

    Only a token that is exactly the text of a 32-byte key is attached, so a forgotten
    value followed by another option still gets argparse's own error.
    """
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if token in _KEY_OPTIONS and nxt is not None and nxt.startswith("-") and _KEY_TEXT.fullmatch(nxt):
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedrec`` console command."""
    args = build_parser().parse_args(_attach_key_values(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args))
    except (ConfigError, DataError, KeyError, FileNotFoundError, ValueError) as exc:
        print(f"fedrec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
