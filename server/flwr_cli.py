"""Flower's command-line programs, as fedrec runs them: finding them, and driving ``flwr``.

This module finds Flower's executables (:func:`flower_executable`), writes the named
connection ``flwr`` commands use to reach a SuperLink (:func:`write_connection_config`)
and runs ``flwr ... --format json`` commands (:func:`run_flwr`). Flower 1.42 details it
relies on (read from the installed source, checked on loopback):

* ``flwr`` commands find the SuperLink through a named *connection* in the Flower
  configuration file ``$FLWR_HOME/config.toml`` (default ``~/.flwr/config.toml``),
  table ``[superlink.<name>]`` with ``address`` and ``root-certificates``; the
  ``[tool.flwr.federations]`` table of ``pyproject.toml`` is deprecated. ``flwr run .
  <name>`` reads the same table.
* With ``--format json`` a failing command still exits 0 and prints ``{"success":
  false, "error-message": ...}``; some messages may precede the JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEFAULT_CONNECTION",
    "QUIET_ENV",
    "FlowerCommandError",
    "check_connection_name",
    "check_port",
    "flower_executable",
    "run_flwr",
    "write_connection_config",
]

DEFAULT_CONNECTION: Final = "fedrec"
# A connection name becomes a bare TOML key in `[superlink.<name>]`; `default` is taken.
_CONNECTION_NAME: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_FLWR_TIMEOUT: Final = 120.0
# Without these, every Flower process posts usage telemetry and checks for a newer Flower
# release in a non-daemon thread: on a host without internet access a process cannot exit
# until that request gives up, and a server has no use for either.
QUIET_ENV: Final = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class FlowerCommandError(RuntimeError):
    """A ``flwr`` command failed; the message carries Flower's own explanation."""


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


def check_port(port: int) -> None:
    """Raise ValueError unless ``port`` is an integer in 1..65535."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535, got {port!r}")


def _flwr_home(flwr_home: Path | None) -> Path:
    if flwr_home is not None:
        return Path(flwr_home)
    if env_home := os.environ.get("FLWR_HOME"):
        return Path(env_home)
    return Path.home() / ".flwr"


def check_connection_name(name: str) -> None:
    """Raise ValueError unless ``name`` can name a Flower connection (a bare TOML key, not ``default``)."""
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
    check_connection_name(name)
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    check_port(int(port_text))
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


def run_flwr(args: Sequence[str], *, flwr_home: Path | None, cwd: Path) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` and return its JSON.

    Parameters
    ----------
    args
        The command and its arguments, e.g. ``["supernode", "list", "fedrec"]``.
    flwr_home
        Flower's configuration directory; None for ``$FLWR_HOME`` or ``~/.flwr``.
    cwd
        Working directory of the command.

    Returns
    -------
    dict
        The command's JSON answer (``"success"`` is true).

    Raises
    ------
    FlowerCommandError
        If the command fails, times out or answers ``"success": false``.
    """
    argv = [str(flower_executable("flwr")), *args, "--format", "json"]
    env = {**os.environ, **QUIET_ENV}
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
