"""The ``fedrec`` console command: one parser, each command group registered by the side that owns it.

This is the one module under ``shared/`` that may import ``client``, ``server`` and
``simulations`` (the import-linter contracts in ``pyproject.toml`` name it): it only
dispatches. Each group imports its heavy dependencies inside its commands, so
``fedrec --help`` is instant and a device install needs none of the simulation extras.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from shared.config import ConfigError
from shared.data.types import DataError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``fedrec``."""
    from client.cli_device import register as register_device_commands
    from server.cli_audit import register as register_audit_command
    from server.cli_deploy import register as register_server_commands
    from simulations.cli import cmd_empirical_audit
    from simulations.cli import register as register_simulation_commands

    parser = argparse.ArgumentParser(prog="fedrec", description="Federated, differentially private recommendation.")
    sub = parser.add_subparsers(dest="command", required=True)
    register_simulation_commands(sub)
    register_audit_command(sub, empirical=cmd_empirical_audit)
    # Deployment: the server host's and the device's command groups.
    register_server_commands(sub)
    register_device_commands(sub)
    return parser


# Options whose value is an Ed25519 public key in URL-safe base64. One key in 64 starts with
# "-", which argparse would read as an option ("expected one argument").
_KEY_OPTIONS = frozenset({"--ledger-key", "--public-key"})
_KEY_TEXT = re.compile(r"[A-Za-z0-9_-]{43}=?")


def attach_key_values(argv: Sequence[str]) -> list[str]:
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
    args = build_parser().parse_args(attach_key_values(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args))
    except (ConfigError, DataError, KeyError, FileNotFoundError, ValueError) as exc:
        print(f"fedrec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
