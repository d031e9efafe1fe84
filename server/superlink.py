"""Run fedrec's SuperLink for real edge devices: its server directory, launch and supervision.

Everything here is a plain function for ``fedrec server ...`` (:mod:`server.cli_deploy`)
or an engineer's own scripts: the files of a server directory (:class:`DeployPaths`:
TLS material, Flower's state, fedrec's database, the log), the ``flower-superlink``
command line, and starting and stopping the process. Which devices may connect is
:mod:`server.device_registry`'s job; talking to the running SuperLink through ``flwr``,
:mod:`server.flwr_cli`'s. Flower 1.42 details this module relies on (read from the
installed source, checked on loopback):

* ``flower-superlink`` serves the Fleet, Control and Runtime APIs over HTTPS on one
  ``--host/--port``. It launches ``flower-superexec`` by bare name, so the directory of
  the Flower executables must be on ``PATH`` (:func:`start_superlink` sees to it), and
  that process dials the SuperLink at ``127.0.0.1`` when it binds ``0.0.0.0``: the
  server certificate must name ``127.0.0.1`` too.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from server import pki
from server.flwr_cli import QUIET_ENV, check_port, flower_executable

__all__ = [
    "DEFAULT_PORT",
    "DeployPaths",
    "is_loopback",
    "start_superlink",
    "stop_superlink",
    "superlink_command",
    "wait_for_port",
]

DEFAULT_PORT: Final = 9093


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
    check_port(port)
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
    child_env = {**os.environ, **QUIET_ENV, **(env or {})}
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
