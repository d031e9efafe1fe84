"""Running this device's Flower SuperNode: its command line, and keeping it running.

One job: turning an enrolled device into a running ``flower-supernode`` process.
:func:`supernode_argv` builds the command line, whose ``--node-config`` carries what
the ClientApp reads (:mod:`client.node_config`) and the device's own privacy policy
(:mod:`client.policy`); :func:`run_supernode` either replaces this process with it or
supervises it (:func:`supervise`), starting it again after an error exit.
``fedrec device start`` (:mod:`client.cli_device`) is the only caller.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from client.policy import POLICY_KEYS, DevicePolicy, PolicyViolation

__all__ = ["RETRY_DELAY_S", "find_supernode", "node_config_value", "run_supernode", "supernode_argv", "supervise"]

#: Seconds between two starts of a SuperNode that exited with an error (``--retry-for``).
RETRY_DELAY_S = 10.0


def node_config_value(value: str) -> str:
    """Quote a string as a value of Flower's ``--node-config``.

    Flower (1.42) reads ``--node-config`` by picking out ``key=value`` pairs, where the
    value is a single-quoted run without ``'``, a double-quoted run without ``"``, or a
    run of non-blank characters, and then parses each pair as a TOML ``key = value``
    line. A string value must therefore be quoted: single quotes make a TOML literal
    string, which takes anything but ``'`` and newlines, verbatim; double quotes make a
    TOML basic string, which takes anything but ``"`` and newlines, with each backslash
    escaped as ``\\\\``.

    Parameters
    ----------
    value
        The string to pass (e.g. a file path).

    Returns
    -------
    str
        The quoted value, single-quoted when it has no ``'``.

    Raises
    ------
    ValueError
        If the value holds both quote characters or a newline (Flower cannot carry it).
    """
    if "\n" in value or "\r" in value:
        raise ValueError(f"{value!r}: a newline cannot be passed in Flower's --node-config")
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return '"' + value.replace("\\", "\\\\") + '"'
    raise ValueError(f"{value!r}: holds both ' and \"; Flower's --node-config cannot carry it (rename the path)")


def supernode_argv(
    executable: str,
    *,
    store: Path,
    device_id: int,
    superlink: str,
    root_cert: Path,
    auth_key: Path,
    port: int,
    key_file: Path | None = None,
    passphrase_env: str | None = None,
    policy: Mapping[str, str] | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line that runs this device in a federation.

    ``policy`` holds the device's privacy-policy node-config keys (client/policy.py); they are
    checked here, so a typo or a bad value fails before the SuperNode starts.

    Returns
    -------
    list of str
        The command line, ``executable`` first.

    Raises
    ------
    ValueError
        If not exactly one of ``key_file`` and ``passphrase_env`` is given, a policy key
        is unknown or its value invalid, or a value cannot be passed in ``--node-config``.
    """
    if (key_file is None) == (passphrase_env is None):
        raise ValueError("give exactly one of key_file and passphrase_env")
    policy = dict(policy or {})
    unknown = sorted(set(policy) - set(POLICY_KEYS))
    if unknown:
        raise ValueError(f"--policy: unknown key(s) {unknown}; known: {', '.join(POLICY_KEYS)}")
    try:
        DevicePolicy.from_node_config({"store": str(store), **policy})
    except PolicyViolation as exc:
        raise ValueError(f"--policy: {exc}") from None
    parts = [f"store={node_config_value(str(store))}"]
    parts += [f"{key}={node_config_value(str(value))}" for key, value in sorted(policy.items())]
    if key_file is not None:
        parts.append(f"key-file={node_config_value(str(key_file))}")
    else:
        parts.append(f"passphrase-env={node_config_value(str(passphrase_env))}")
    parts.append(f"device-id={int(device_id)}")
    return [
        executable,
        "--superlink", superlink,
        "--root-certificates", str(root_cert),
        "--auth-supernode-private-key", str(auth_key),
        "--port", str(port),
        "--node-config", " ".join(parts),
    ]  # fmt: skip


def find_supernode() -> str:
    """The ``flower-supernode`` executable to run.

    Raises
    ------
    FileNotFoundError
        If it is neither next to this interpreter nor on ``PATH``.
    """
    # Prefer the one installed next to this interpreter (the fedrec virtualenv).
    sibling = Path(sys.executable).with_name("flower-supernode")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which("flower-supernode")
    if found is None:
        raise FileNotFoundError("flower-supernode not found: install fedrec (it depends on flwr) in this environment")
    return found


def run_supernode(argv: Sequence[str], retry_for: float) -> int:
    """Run ``argv`` (the SuperNode): in place of this process, or under :func:`supervise` if ``retry_for > 0``.

    Returns
    -------
    int
        The SuperNode's last exit code (supervised); replacing this process never returns.

    Raises
    ------
    OSError
        If the executable cannot be run in place of this process.
    """
    if retry_for > 0:
        return supervise(argv, retry_for)
    sys.stdout.flush()
    os.execv(argv[0], list(argv))  # replaces this process; only returns by raising OSError
    return 1  # pragma: no cover


def supervise(argv: Sequence[str], retry_for: float) -> int:
    """Run ``argv`` (the SuperNode), starting it again after an error exit for up to ``retry_for`` s.

    Right after a crash the SuperLink refuses the node for about a minute (two missed heartbeats,
    docs/deploy.md), so a device restarted at once fails to start; this retries it every
    :data:`RETRY_DELAY_S` seconds. The window counts from the first failure of a streak: a SuperNode
    that ran for longer than ``retry_for`` before failing starts a new streak. A clean exit (0) or
    SIGINT/SIGTERM to this process (passed on to the SuperNode) ends it. Returns the last exit code.
    """
    import signal
    import subprocess
    import time

    stopping: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        streak_start: float | None = None
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            sys.stdout.flush()
            child = subprocess.Popen(list(argv))  # noqa: S603 - our own flower-supernode command line
            code = child.wait()
            if code == 0 or stopping:
                return code
            now = time.monotonic()
            if streak_start is None or now - started > retry_for:
                streak_start = started
            if now + RETRY_DELAY_S - streak_start > retry_for:
                print(
                    f"fedrec: flower-supernode exited with {code}; giving up after {attempt} attempts "
                    f"(--retry-for {retry_for:g} s)",
                    file=sys.stderr,
                )
                return code
            print(
                f"fedrec: flower-supernode exited with {code} (attempt {attempt}); starting it again in "
                f"{RETRY_DELAY_S:g} s",
                file=sys.stderr,
            )
            time.sleep(RETRY_DELAY_S)
            if stopping:
                return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
