"""Run a fedrec SuperLink for real edge devices: server layout, launch, device registry.

Everything here is a plain function for ``fedrec server ...`` (:mod:`server.cli_deploy`)
or an engineer's own scripts. Flower 1.42 details this module relies on (read from the
installed source, checked on loopback):

* ``flower-superlink`` serves the Fleet, Control and Runtime APIs over HTTPS on one
  ``--host/--port``. It launches ``flower-superexec`` by bare name, so the directory of
  the Flower executables must be on ``PATH`` (:func:`start_superlink` sees to it), and
  that process dials the SuperLink at ``127.0.0.1`` when it binds ``0.0.0.0``: the
  server certificate must name ``127.0.0.1`` too.
* ``flwr`` commands find the SuperLink through a named *connection* in the Flower
  configuration file ``$FLWR_HOME/config.toml`` (default ``~/.flwr/config.toml``),
  table ``[superlink.<name>]`` with ``address`` and ``root-certificates``; the
  ``[tool.flwr.federations]`` table of ``pyproject.toml`` is deprecated. ``flwr run .
  <name>`` reads the same table (:func:`write_connection_config`).
* ``flwr supernode register <public-key-file> <connection> [--name N] --format json``
  prints ``{"success": true, "node-id": <int>}``; ``flwr supernode list <connection>
  --format json`` prints ``{"success": true, "nodes": [{"node-id": "<str>", "status":
  ...}]}`` (no public key, no name); ``flwr supernode unregister <node-id>
  <connection>``. With ``--format json`` a failure still exits 0 and prints
  ``{"success": false, "error-message": ...}``.
* Node IDs are unsigned 64-bit integers, beyond SQLite's signed INTEGER, so fedrec's
  device-to-node table keeps them as text.

fedrec's own half of a device's registration is its Ed25519 ledger key in
:class:`server.privacy_store.PrivacyStore` (``<dir>/fedrec.db``), and the device-to-node
mapping in table ``device_nodes`` of the same database.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import MetaData, String, Text, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from server import pki
from server.privacy_store import PrivacyStore
from server.run_store import NAMING_CONVENTION, UTCDateTime
from shared.privacy.identity import decode_public_key

__all__ = [
    "DEFAULT_CONNECTION",
    "DEFAULT_PORT",
    "DeployPaths",
    "DeviceRecord",
    "FlowerCommandError",
    "flower_executable",
    "list_devices",
    "load_auth_public_key",
    "register_device",
    "revoke_device",
    "start_superlink",
    "stop_superlink",
    "superlink_command",
    "wait_for_port",
    "write_connection_config",
]

DEFAULT_PORT: Final = 9093
DEFAULT_CONNECTION: Final = "fedrec"
# A connection name becomes a bare TOML key in `[superlink.<name>]`; `default` is taken.
_CONNECTION_NAME: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_FLWR_TIMEOUT: Final = 120.0
# Quiet, offline-friendly Flower processes (see ../shared/notes/FLOWER.md, "Pitfalls").
_QUIET_ENV: Final = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class FlowerCommandError(RuntimeError):
    """A ``flwr`` command failed; the message carries Flower's own explanation."""


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class DeployPaths:
    """The files of one server directory.

    ``<root>/pki/{ca.crt, ca.key, server.pem, server.key}``, ``<root>/state.db``
    (Flower's SuperLink state, including SuperNode registrations), ``<root>/fedrec.db``
    (fedrec's run and privacy database), ``<root>/superlink.log``.
    """

    root: Path

    def __post_init__(self) -> None:
        # Absolute: the paths end up in Flower's config and in argv run from other cwds.
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def pki_dir(self) -> Path:
        """Directory of the CA and the server certificate."""
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate devices trust."""
        return self.pki_dir / pki.CA_CERT

    @property
    def ca_key(self) -> Path:
        """The CA's private key (never leaves the server)."""
        return self.pki_dir / pki.CA_KEY

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.pki_dir / pki.SERVER_CERT

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key."""
        return self.pki_dir / pki.SERVER_KEY

    @property
    def state_db(self) -> Path:
        """Flower's SuperLink state database."""
        return self.root / "state.db"

    @property
    def fedrec_db(self) -> Path:
        """fedrec's run and privacy database."""
        return self.root / "fedrec.db"

    @property
    def fedrec_db_url(self) -> str:
        """SQLAlchemy URL of :attr:`fedrec_db`."""
        return f"sqlite:///{self.fedrec_db}"

    @property
    def log_file(self) -> Path:
        """Where :func:`start_superlink` writes the SuperLink's output."""
        return self.root / "superlink.log"

    def check_tls(self) -> None:
        """Raise FileNotFoundError naming every missing TLS file (run ``fedrec server init``)."""
        missing = [str(p) for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"server directory {self.root} is not initialised: missing {', '.join(missing)} "
                f"(run `fedrec server init --dir {self.root} --host <address devices dial>`)"
            )


# -------------------------------------------------------------------------- SuperLink


def flower_executable(name: str) -> Path:
    """Return the path of a Flower console script (``flwr``, ``flower-superlink``, ...).

    The one installed next to the running interpreter wins, so a virtualenv's Flower
    is used even when the virtualenv is not activated.

    Raises
    ------
    FileNotFoundError
        If the executable is neither beside ``sys.executable`` nor on ``PATH``.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} not found beside {sys.executable} or on PATH; install flwr==1.42.0")
    return Path(found)


def _check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535, got {port!r}")


def _check_host(host: str) -> None:
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise ValueError(f"host must be a non-empty address without spaces, got {host!r}")


def superlink_command(cfg: DeployPaths, host: str, port: int) -> list[str]:
    """Return the ``flower-superlink`` argv serving ``cfg`` on ``host:port``.

    TLS with the server directory's certificate, SuperNode authentication (only
    registered device keys may connect), registrations persisted in ``state.db``, and
    no ``uv sync`` of app dependencies at run time (the server's environment is fixed).

    Raises
    ------
    ValueError
        If ``host`` or ``port`` is malformed.
    """
    _check_host(host)
    _check_port(port)
    return [
        str(flower_executable("flower-superlink")),
        "--ssl-ca-certfile",
        str(cfg.ca_cert),
        "--ssl-certfile",
        str(cfg.server_cert),
        "--ssl-keyfile",
        str(cfg.server_key),
        "--enable-supernode-auth",
        "--database",
        str(cfg.state_db),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]


def _dial_host(host: str) -> str:
    """The address to reach a SuperLink bound to ``host`` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host.strip("[]"))


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the SuperLink reachable from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises
    ------
    RuntimeError
        If ``proc`` exits first (with the tail of ``log``).
    TimeoutError
        If the port does not open within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited with code {proc.returncode} before {host}:{port} opened; "
                f"last lines of {log}:\n{_tail(log) if log else '(no log)'}"
            )
        if _port_open(host, port):
            return
        time.sleep(0.2)
    raise TimeoutError(
        f"{host}:{port} did not accept connections within {timeout:.0f} s"
        + (f"; last lines of {log}:\n{_tail(log)}" if log else "")
    )


def start_superlink(
    cfg: DeployPaths,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Launch the SuperLink for ``cfg`` and return once its port accepts connections.

    Output (stdout and stderr) is appended to ``cfg.log_file``. The process gets its
    own session so a Ctrl-C meant for the caller reaches it only through
    :func:`stop_superlink`, which shuts it down cleanly.

    Parameters
    ----------
    cfg
        The server directory (must hold the TLS files).
    host, port
        Where to listen; ``0.0.0.0`` serves every interface (edge devices).
    timeout
        Seconds to wait for the port.
    env
        Extra environment variables for the process.

    Raises
    ------
    FileNotFoundError
        If the TLS files are missing.
    RuntimeError
        If the port is already in use, or the SuperLink exits before it opens (the
        message ends with the log's last lines).
    TimeoutError
        If the port does not open in time (the process is stopped).
    """
    cfg.check_tls()
    argv = superlink_command(cfg, host, port)
    dial = _dial_host(host)
    if _port_open(dial, port):
        # Otherwise the wait below would mistake the other process for ours.
        raise RuntimeError(f"port {port} is already in use on {dial}; stop that process or choose another --port")
    child_env = {**os.environ, **_QUIET_ENV, **(env or {})}
    # flower-superlink spawns `flower-superexec` by bare name: make the one beside it findable.
    bin_dir = str(Path(argv[0]).parent)
    child_env["PATH"] = os.pathsep.join([bin_dir, child_env.get("PATH", "")])
    # Belt and braces with the flag: also read by the SuperExec the SuperLink spawns.
    child_env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    cfg.root.mkdir(parents=True, exist_ok=True)
    with cfg.log_file.open("ab") as log:
        log.write(f"\n=== {datetime.now(UTC).isoformat()} {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(  # noqa: S603 - argv built from validated parts
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=cfg.root,
            start_new_session=True,
        )
    try:
        wait_for_port(dial, port, timeout, proc=proc, log=cfg.log_file)
    except BaseException:
        stop_superlink(proc)
        raise
    return proc


def stop_superlink(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """Stop a SuperLink started by :func:`start_superlink`; return its exit code.

    SIGTERM first (the SuperLink then stops its SuperExec itself), SIGKILL after
    ``timeout`` seconds.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


# ------------------------------------------------------------------ Flower connection


def _flwr_home(flwr_home: Path | None) -> Path:
    if flwr_home is not None:
        return Path(flwr_home)
    if env_home := os.environ.get("FLWR_HOME"):
        return Path(env_home)
    return Path.home() / ".flwr"


def _check_connection_name(name: str) -> None:
    if not isinstance(name, str) or not _CONNECTION_NAME.match(name) or name == "default":
        raise ValueError(f"connection name must be letters, digits, '-' or '_' and not 'default', got {name!r}")


def write_connection_config(name: str, address: str, root_cert: Path, *, flwr_home: Path | None = None) -> Path:
    """Add or update the Flower connection ``name`` (``flwr ... <name>``, ``flwr run . <name>``).

    Writes ``[superlink.<name>]`` with ``address`` and ``root-certificates`` (absolute)
    to ``<flwr_home>/config.toml`` (default ``$FLWR_HOME`` or ``~/.flwr``). A missing
    file is first created with Flower's own defaults. Other connections and settings
    are kept; a new connection is appended as text so comments survive too (updating
    an existing one rewrites the file, which drops comments).

    Returns
    -------
    Path
        The configuration file.

    Raises
    ------
    ValueError
        If ``name`` is not a bare TOML key, ``address`` is not ``host:port``, or the
        existing file is not valid TOML.
    FileNotFoundError
        If ``root_cert`` does not exist.
    """
    _check_connection_name(name)
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    _check_port(int(port_text))
    root = Path(root_cert).expanduser().resolve()
    if not root.is_file():
        raise FileNotFoundError(f"root certificate {root} does not exist")

    path = _flwr_home(flwr_home) / "config.toml"
    if path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        # Flower's own defaults, so `flwr` commands without a connection name behave as
        # if Flower had created the file. Importing flwr.cli pulls in typer, which emits
        # DeprecationWarnings under recent click: not ours to act on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

        text = DEFAULT_FLOWER_CONFIG_TOML
    try:
        config: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"Flower configuration {path} is not valid TOML: {exc}") from exc
    wanted = {"address": address, "root-certificates": str(root)}
    superlink = config.setdefault("superlink", {})
    current = superlink.get(name)
    if current == wanted:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if current is None:
        block = f"\n[superlink.{name}]\naddress = {json.dumps(address)}\nroot-certificates = {json.dumps(str(root))}\n"
        path.write_text(text.rstrip("\n") + "\n" + block, encoding="utf-8")
    else:
        import tomli_w  # a Flower dependency

        superlink[name] = {**{k: v for k, v in current.items() if k != "insecure"}, **wanted}
        path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def _run_flwr(args: Sequence[str], *, flwr_home: Path | None, cwd: Path) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` and return its JSON, or raise FlowerCommandError."""
    argv = [str(flower_executable("flwr")), *args, "--format", "json"]
    env = {**os.environ, **_QUIET_ENV}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    try:
        done = subprocess.run(  # noqa: S603 - fixed executable, validated arguments
            argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=_FLWR_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise FlowerCommandError(f"`{' '.join(argv)}` did not finish within {_FLWR_TIMEOUT:.0f} s") from exc
    payload: dict[str, Any] | None = None
    try:
        parsed = json.loads(done.stdout)
        payload = parsed if isinstance(parsed, dict) else None
    except json.JSONDecodeError:
        # Some messages precede the JSON; it is the last top-level object.
        start = done.stdout.rfind("\n{")
        if start != -1:
            try:
                payload = json.loads(done.stdout[start:])
            except json.JSONDecodeError:
                payload = None
    # --format json exits 0 even on failure: "success" is the verdict.
    if done.returncode != 0 or payload is None or not payload.get("success"):
        detail = (payload or {}).get("error-message") or (done.stderr.strip() or done.stdout.strip())
        code = f" (exit code {done.returncode})" if done.returncode else ""
        raise FlowerCommandError(f"`flwr {' '.join(args)}` failed{code}: {detail or 'no output'}")
    return payload


# ---------------------------------------------------------------- device registry


class _Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class _DeviceNodeRow(_Base):
    """``device_nodes``: which Flower SuperNode registration belongs to which device."""

    __tablename__ = "device_nodes"

    device_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    node_id: Mapped[str] = mapped_column(String(20), comment="Flower node ID (uint64, as text)")
    auth_public_key: Mapped[str] = mapped_column(Text, comment="OpenSSH ECDSA public key the SuperNode uses")
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime(), comment="UTC")
    unregistered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), comment="UTC; NULL while registered")


@contextmanager
def _session(deploy: DeployPaths) -> Iterator[Session]:
    """A session on ``device_nodes`` (created if missing) whose engine is disposed after."""
    deploy.root.mkdir(parents=True, exist_ok=True)
    engine = create_engine(deploy.fedrec_db_url)
    try:
        _Base.metadata.create_all(engine)
        with Session(engine, expire_on_commit=False) as session:
            yield session
    finally:
        engine.dispose()


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the SuperLink and fedrec each see it.

    ``device_id`` is None for a SuperNode registered outside fedrec; ``node_id`` is None
    for a device with a ledger key but no SuperNode registration; ``status`` is
    Flower's (``registered``, ``online``, ``offline``, ``unregistered``) or
    ``"unknown"`` when the SuperLink does not list the node.
    """

    device_id: int | None
    node_id: str | None
    status: str
    ledger_key: str | None
    ledger_key_active: bool


def load_auth_public_key(path: Path) -> str:
    """Read and check a SuperNode public key file; return its OpenSSH text.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it is not an OpenSSH public key on a NIST elliptic curve (what Flower
        accepts: create one with :func:`server.pki.create_device_auth_key` or
        ``ssh-keygen -t ecdsa -b 384``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SuperNode public key {path} does not exist")
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(
            f"{path} is not an OpenSSH public key ({exc}); pass the .pub file, not the private key"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in {"secp256r1", "secp384r1", "secp521r1"}:
        raise ValueError(f"{path} must be an ECDSA key on a NIST curve (P-256/384/521); Flower rejects other keys")
    return data.decode("ascii").strip()


def _check_device_id(device_id: int) -> None:
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise ValueError(f"device_id must be a non-negative integer, got {device_id!r}")


def register_device(
    deploy: DeployPaths,
    federation: str,
    device_id: int,
    auth_public_key: Path,
    ledger_public_key: str,
    *,
    replace_ledger_key: bool = False,
    flwr_home: Path | None = None,
) -> str:
    """Admit a device: its SuperNode key to the SuperLink, its ledger key to fedrec.

    Runs ``flwr supernode register <auth_public_key> <federation> --name
    fedrec-device-<id>`` against the running SuperLink, then registers the ledger key
    in ``PrivacyStore(<dir>/fedrec.db)`` and records the node ID. If the ledger key is
    refused, the SuperNode registration is undone, so the two registries agree.

    Parameters
    ----------
    deploy
        The server directory.
    federation
        Name of the Flower connection to the SuperLink (see
        :func:`write_connection_config`).
    device_id
        fedrec's device ID (the device's ``--node-config`` ``device-id``).
    auth_public_key
        The device's OpenSSH ECDSA public key file.
    ledger_public_key
        The device's Ed25519 ledger key, URL-safe base64 (``fedrec device init`` prints it).
    replace_ledger_key
        Allow a new ledger key for a device that had a different (or revoked) one.
    flwr_home
        Flower's configuration directory; default ``$FLWR_HOME`` or ``~/.flwr``.

    Returns
    -------
    str
        The Flower node ID.

    Raises
    ------
    ValueError
        Malformed arguments, a device already registered, or a ledger-key conflict.
    FlowerCommandError
        If Flower refuses (SuperLink unreachable, key already registered, ...).
    """
    _check_device_id(device_id)
    _check_connection_name(federation)
    auth_text = load_auth_public_key(auth_public_key)
    decode_public_key(ledger_public_key)  # ValueError before anything changes
    with _session(deploy) as session:
        row = session.get(_DeviceNodeRow, device_id)
        if row is not None and row.unregistered_at is None:
            raise ValueError(f"device {device_id} is already registered as SuperNode {row.node_id}; revoke it first")
    with PrivacyStore(deploy.fedrec_db_url) as store:
        current = store.public_key(device_id)
        if current is not None and current != ledger_public_key and not replace_ledger_key:
            raise ValueError(
                f"device {device_id} already has a different ledger key; pass replace_ledger_key=True "
                "(--replace-ledger-key) only if its old entries have been audited"
            )
        result = _run_flwr(
            [
                "supernode",
                "register",
                str(Path(auth_public_key).expanduser().resolve()),
                federation,
                "--name",
                f"fedrec-device-{device_id}",
            ],
            flwr_home=flwr_home,
            cwd=deploy.root,
        )
        node_id = str(result["node-id"])
        try:
            store.register_key(device_id, ledger_public_key, replace=replace_ledger_key)
            if store.public_key(device_id) != ledger_public_key:
                # register_key keeps a revocation when the same key is registered again.
                raise ValueError(
                    f"device {device_id}'s ledger key was revoked; re-admit it with a new ledger key "
                    "and replace_ledger_key=True"
                )
        except BaseException:
            _run_flwr(["supernode", "unregister", node_id, federation], flwr_home=flwr_home, cwd=deploy.root)
            raise
    with _session(deploy) as session, session.begin():
        row = session.get(_DeviceNodeRow, device_id)
        if row is None:
            row = _DeviceNodeRow(device_id=device_id)
            session.add(row)
        row.node_id, row.auth_public_key = node_id, auth_text
        row.registered_at, row.unregistered_at = datetime.now(UTC), None
    return node_id


def list_devices(deploy: DeployPaths, federation: str, *, flwr_home: Path | None = None) -> list[DeviceRecord]:
    """Return every device known to the SuperLink or to fedrec, by device ID.

    Combines ``flwr supernode list <federation> --format json`` with fedrec's node
    mapping and ledger-key registry. SuperNodes registered outside fedrec come last,
    with ``device_id`` None.

    Raises
    ------
    FlowerCommandError
        If the SuperLink cannot be asked.
    """
    _check_connection_name(federation)
    nodes = _run_flwr(["supernode", "list", federation], flwr_home=flwr_home, cwd=deploy.root)["nodes"]
    status = {str(node["node-id"]): str(node["status"]) for node in nodes}
    with _session(deploy) as session:
        mapping = {row.device_id: row.node_id for row in session.scalars(select(_DeviceNodeRow))}
    with PrivacyStore(deploy.fedrec_db_url) as store:
        active = store.keys()  # revoked keys are left out: shown as inactive via the mapping
        ids = sorted(set(mapping) | set(active))
        ledger = {device: active.get(device) for device in ids}
    records = [
        DeviceRecord(
            device_id=device,
            node_id=mapping.get(device),
            status=status.get(mapping[device], "unknown") if device in mapping else "unknown",
            ledger_key=ledger[device],
            ledger_key_active=ledger[device] is not None,
        )
        for device in ids
    ]
    known = set(mapping.values())
    records += [
        DeviceRecord(device_id=None, node_id=node, status=state, ledger_key=None, ledger_key_active=False)
        for node, state in status.items()
        if node not in known
    ]
    return records


def revoke_device(
    deploy: DeployPaths, federation: str, device_id: int, *, auth_only: bool = False, flwr_home: Path | None = None
) -> None:
    """Expel a device: revoke its ledger key and unregister its SuperNode.

    The ledger key is revoked first, so a device whose SuperNode cannot be unregistered
    right now (SuperLink down) already has its later uploads rejected as ``unknown-key``;
    a node Flower no longer knows (unregistered by hand, a recreated ``state.db``) counts
    as unregistered. Entries already accepted stay in the store. With ``auth_only`` only
    the SuperNode key is unregistered and the ledger key stays trusted: the first step
    of rotating a device's auth key (docs/deploy.md).

    Raises
    ------
    KeyError
        If fedrec knows neither a SuperNode nor a ledger key for the device (with
        ``auth_only``: no registered SuperNode).
    FlowerCommandError
        If Flower refuses to unregister the node for another reason than not knowing it.
    """
    _check_device_id(device_id)
    _check_connection_name(federation)
    with _session(deploy) as session:
        row = session.get(_DeviceNodeRow, device_id)
    registered = row is not None and row.unregistered_at is None
    with PrivacyStore(deploy.fedrec_db_url) as store:
        has_key = store.public_key(device_id) is not None
        if auth_only and not registered:
            raise KeyError(f"device {device_id} has no registered SuperNode")
        if not registered and not has_key:
            raise KeyError(f"device {device_id} is neither registered nor holds an active ledger key")
        if has_key and not auth_only:
            store.revoke_key(device_id)
    if registered:
        assert row is not None
        try:
            _run_flwr(["supernode", "unregister", row.node_id, federation], flwr_home=flwr_home, cwd=deploy.root)
        except FlowerCommandError as exc:
            if "not found" not in str(exc).lower():
                raise
            warnings.warn(
                f"SuperNode {row.node_id} of device {device_id} was already unknown to the SuperLink", stacklevel=2
            )
        with _session(deploy) as session, session.begin():
            stored = session.get(_DeviceNodeRow, device_id)
            assert stored is not None  # read above; rows are never deleted
            stored.unregistered_at = datetime.now(UTC)
