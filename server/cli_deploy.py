"""``fedrec server``: set up and run the SuperLink edge devices join, and manage its devices.

The commands, in the order a server engineer runs them on an empty host::

    fedrec server init --dir /srv/fedrec --host fl.example.org --host 203.0.113.5
    fedrec server start --dir /srv/fedrec --port 9093        # loopback (behind a proxy); Ctrl-C stops
    # in another shell, for each device (its owner sends the two public keys):
    fedrec server register-device --dir /srv/fedrec --device-id 7 \\
        --auth-key device7-supernode-auth.pub --ledger-key=<base64 ledger key>
    fedrec server list-devices --dir /srv/fedrec
    fedrec server revoke-device --dir /srv/fedrec --device-id 7

``init`` always adds ``127.0.0.1`` to the certificate: the SuperLink's own SuperExec and
the ``flwr`` commands on this host dial it there. ``start`` (re)writes the Flower
connection ``--federation`` (default ``fedrec``) in ``$FLWR_HOME/config.toml`` so that
``register-device``, ``list-devices``, ``revoke-device`` and ``flwr run . fedrec`` reach
the SuperLink over TLS.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from server import device_registry, flwr_cli, pki, superlink

__all__ = ["register"]

_LOCAL = "127.0.0.1"


def _paths(args: argparse.Namespace) -> superlink.DeployPaths:
    return superlink.DeployPaths(Path(args.dir))


def _fail(message: str) -> int:
    print(f"fedrec: error: {message}", file=sys.stderr)
    return 1


def _control_host(paths: superlink.DeployPaths, bind_host: str) -> str:
    """The address ``flwr`` on this host dials: must be a SAN of the server certificate."""
    from cryptography import x509

    if bind_host not in {"0.0.0.0", "::", "[::]"}:
        return bind_host
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] + sans.get_values_for_type(x509.DNSName)
    return _LOCAL if _LOCAL in names else names[0]


def _cmd_init(args: argparse.Namespace) -> int:
    paths = _paths(args)
    hosts = list(dict.fromkeys([*args.host, _LOCAL]))
    for host in hosts:
        pki.parse_host(host)  # all validated before anything is written
    if args.reissue and not args.force and not paths.ca_cert.exists():
        # --reissue promises the devices' ca.crt stays valid: never create a CA under it.
        return _fail(f"--reissue: no CA in {paths.pki_dir} (wrong --dir?); run init without --reissue to create one")
    try:
        pki.create_ca(paths.pki_dir, common_name=args.ca_name, force=args.force)
    except FileExistsError as exc:
        if not args.reissue:
            return _fail(f"{exc}; or pass --reissue to keep the CA and only re-issue the server certificate")
    pki.issue_server_certificate(paths.pki_dir, paths.pki_dir, hosts, days=args.days)
    print(f"server directory:  {paths.root}")
    print(f"CA certificate:    {paths.ca_cert}  (copy to every device)")
    print(f"CA fingerprint:    SHA256 {pki.certificate_fingerprint(paths.ca_cert)}")
    print(f"server cert hosts: {', '.join(hosts)}")
    print(f"next: fedrec server start --dir {paths.root}")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cmd_start(args: argparse.Namespace) -> int:
    if not superlink.is_loopback(args.host) and not args.expose_control_api:
        # Flower 1.42 serves its management (Control) and Runtime APIs on the devices' port,
        # unauthenticated: a public bind must be asked for knowingly (or sit behind a proxy).
        return _fail(
            f"--host {args.host} would expose Flower's unauthenticated Control and Runtime APIs (submit runs, "
            "register nodes) with the devices' Fleet API; bind to 127.0.0.1 behind a proxy that forwards only "
            "/v1/fleet/ (docs/deploy.md, Threat model), or pass --expose-control-api to accept that"
        )
    paths = _paths(args)
    paths.check_tls()
    address = f"{_control_host(paths, args.host)}:{args.port}"
    config = flwr_cli.write_connection_config(args.federation, address, paths.ca_cert)
    try:
        proc = superlink.start_superlink(paths, args.host, args.port, timeout=args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        return _fail(str(exc))
    print(f"SuperLink running (pid {proc.pid}) on {args.host}:{args.port} with TLS and SuperNode authentication")
    print(f"devices connect:   fedrec device start --superlink <this host>:{args.port} --root-cert ca.crt ...")
    print(f"CA fingerprint:    SHA256 {pki.certificate_fingerprint(paths.ca_cert)}")
    print(f"flwr connection:   {args.federation} -> {address} (in {config})")
    print(f"log:               {paths.log_file}")
    if not superlink.is_loopback(args.host):
        # Flower 1.42 serves its management (Control) and Runtime APIs on the same port as the
        # devices' Fleet API, without authentication: whoever reaches the port can submit runs.
        print(
            f"warning:           {args.host}:{args.port} also serves Flower's unauthenticated Control and "
            "Runtime APIs (submit runs, register nodes); expose only /v1/fleet/ to the network "
            "(docs/deploy.md, Threat model)",
            file=sys.stderr,
        )
    print("press Ctrl-C to stop", flush=True)
    # The SuperLink runs in its own session: stop it on SIGTERM (service managers, `kill`)
    # as on Ctrl-C, and on Ctrl-C even where the launching shell left SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        superlink.stop_superlink(proc)
        print("SuperLink stopped")
        return 0
    return _fail(f"SuperLink exited with code {code}; see {paths.log_file}")


def _cmd_register_device(args: argparse.Namespace) -> int:
    try:
        node_id = device_registry.register_device(
            _paths(args),
            args.federation,
            args.device_id,
            args.auth_key,
            args.ledger_key,
            replace_ledger_key=args.replace_ledger_key,
        )
    except flwr_cli.FlowerCommandError as exc:
        return _fail(str(exc))
    print(f"device {args.device_id} registered: SuperNode {node_id}, ledger key {args.ledger_key}")
    return 0


def _cmd_list_devices(args: argparse.Namespace) -> int:
    try:
        records = device_registry.list_devices(_paths(args), args.federation)
    except flwr_cli.FlowerCommandError as exc:
        return _fail(str(exc))
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps([asdict(r) for r in records], indent=2))
        return 0
    rows: list[tuple[Any, ...]] = [("device", "node", "status", "ledger key")]
    for r in records:
        key = (r.ledger_key or "-") if r.ledger_key_active or r.device_id is None else "revoked"
        rows.append(("-" if r.device_id is None else r.device_id, r.node_id or "-", r.status, key))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_revoke_device(args: argparse.Namespace) -> int:
    try:
        device_registry.revoke_device(_paths(args), args.federation, args.device_id, auth_only=args.auth_only)
    except flwr_cli.FlowerCommandError as exc:
        return _fail(str(exc))
    if args.auth_only:
        print(
            f"device {args.device_id}: SuperNode unregistered, ledger key still trusted "
            "(register its new auth key with the same --ledger-key)"
        )
    else:
        print(f"device {args.device_id} revoked: SuperNode unregistered, ledger key no longer trusted")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``server`` command group to an argparse ``subparsers`` object.

    ``subparsers`` is what ``ArgumentParser.add_subparsers()`` returns; each command
    sets ``func`` (``Namespace -> int`` exit code), like the other ``fedrec`` commands.
    """
    server = subparsers.add_parser("server", help="run the SuperLink for edge devices and manage their keys")
    sub = server.add_subparsers(dest="server_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--dir", required=True, type=Path, help="the server directory (pki/, state.db, fedrec.db)")
        return parser

    def federation(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--federation",
            default=flwr_cli.DEFAULT_CONNECTION,
            help=f"Flower connection name in $FLWR_HOME/config.toml (default {flwr_cli.DEFAULT_CONNECTION})",
        )

    init = command("init", "create the CA and the SuperLink's TLS certificate")
    init.add_argument(
        "--host",
        action="append",
        required=True,
        help="an IP address or DNS name devices dial (repeatable); 127.0.0.1 is always added",
    )
    init.add_argument("--days", type=int, default=825, help="server certificate validity in days (default 825)")
    init.add_argument("--ca-name", default="fedrec CA", help="the CA's common name")
    group = init.add_mutually_exclusive_group()
    group.add_argument("--force", action="store_true", help="replace an existing CA (devices need the new ca.crt)")
    group.add_argument("--reissue", action="store_true", help="keep the CA, re-issue the server certificate only")
    init.set_defaults(func=_cmd_init)

    start = command("start", "run the SuperLink (TLS, SuperNode auth, persistent state) until Ctrl-C")
    start.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this host only)")
    start.add_argument(
        "--expose-control-api",
        action="store_true",
        help="allow a non-loopback --host although Flower then serves its unauthenticated Control API there too",
    )
    start.add_argument(
        "--port", type=int, default=superlink.DEFAULT_PORT, help=f"port (default {superlink.DEFAULT_PORT})"
    )
    start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the SuperLink to listen")
    federation(start)
    start.set_defaults(func=_cmd_start)

    reg = command("register-device", "admit a device: its SuperNode auth key and its ledger key")
    reg.add_argument("--device-id", type=int, required=True, help="the device's id (its node-config device-id)")
    reg.add_argument("--auth-key", type=Path, required=True, help="the device's SuperNode public key (OpenSSH .pub)")
    reg.add_argument("--ledger-key", required=True, help="the device's Ed25519 ledger public key (URL-safe base64)")
    reg.add_argument(
        "--replace-ledger-key", action="store_true", help="replace a different or revoked ledger key of this device"
    )
    federation(reg)
    reg.set_defaults(func=_cmd_register_device)

    ls = command("list-devices", "list devices: SuperNode status and ledger key")
    ls.add_argument("--json", action="store_true", help="print JSON")
    federation(ls)
    ls.set_defaults(func=_cmd_list_devices)

    rev = command("revoke-device", "expel a device: unregister its SuperNode and revoke its ledger key")
    rev.add_argument("--device-id", type=int, required=True)
    rev.add_argument(
        "--auth-only",
        action="store_true",
        help="unregister only the SuperNode auth key and keep the ledger key trusted (rotating the auth key)",
    )
    federation(rev)
    rev.set_defaults(func=_cmd_revoke_device)
