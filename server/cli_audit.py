"""``fedrec audit``: verify a run's (or one device's) ledgers, recompute every epsilon, check budgets."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _audit_device_ledger(args: argparse.Namespace) -> tuple[Any, float | None]:
    from server.audit.checks import AuditInput
    from server.audit.source import AuditSourceError, read_device_file
    from shared.privacy.user_level import choose_order

    path = Path(args.ledger)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such device ledger file")
    _device, entries, stated = read_device_file(path)  # read-only: the audit never writes its input
    key = args.public_key or stated
    if key is None:
        raise AuditSourceError(f"{path}: the file states no public key; give the registered one with --public-key")
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
    from server.audit.checks import run_audit
    from server.audit.report import terminal_text, write_reports

    started = time.monotonic()
    if args.ledger:
        data, order = _audit_device_ledger(args)
        out = Path(args.output or Path(args.ledger).with_suffix("").as_posix() + "-audit")
    else:
        if not args.path:
            raise FileNotFoundError("give a run directory or database, --ledger FILE, or --empirical")
        from server.audit.source import load_run

        data, order = load_run(Path(args.path), args.run_id)
        base = Path(args.path) if Path(args.path).is_dir() else Path(args.path).parent
        out = Path(args.output) if args.output else base / "audit"
    report = run_audit(data, user_order=order)
    paths = write_reports(report, out)
    print(terminal_text(report))
    print(f"\nreports: {paths['markdown']}  {paths['json']}  ({time.monotonic() - started:.1f} s)")
    return 0 if report.ok else 1


def register(sub: Any, empirical: Callable[[argparse.Namespace], int]) -> None:
    """Add ``audit`` to ``fedrec``'s subparsers.

    ``empirical`` runs ``audit --empirical``: the canary experiment is a simulation
    (it runs devices), so it lives in ``simulations/`` and the entry point passes it in.
    """
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
    aud.add_argument(
        "--overwrite",
        action="store_true",
        help="with --empirical: replace the fedrec run in --output, removing only fedrec's own files",
    )
    aud.add_argument(
        "--canaries-per-device",
        type=int,
        default=None,
        help="with --empirical: canary records per device (default 8)",
    )
    aud.add_argument(
        "--broken-noise-factor",
        type=float,
        default=None,
        metavar="F",
        help="with --empirical: train with noise F x sigma while accounting sigma, to show the audit catches it",
    )
    aud.add_argument("--no-dp", action="store_true", help="with --empirical: train without DP (the attack's baseline)")
    aud.add_argument("--set", action="append", metavar="KEY=VALUE", help="with --empirical: config overrides")

    def dispatch(args: argparse.Namespace) -> int:
        return empirical(args) if args.empirical else _cmd_audit(args)

    aud.set_defaults(func=dispatch)
