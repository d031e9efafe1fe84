"""The device registry of a fedrec server: which devices may connect, with which keys.

Admitting a device registers two keys: its SuperNode authentication key with Flower's
SuperLink (``flwr supernode register``, :mod:`server.flwr_cli`) and its Ed25519 ledger
key with fedrec (:class:`server.privacy_store.PrivacyStore`, ``<dir>/fedrec.db``). The
node ID Flower assigns is recorded per device in table ``device_nodes`` of the same
database, so the two registries can be listed side by side and revoked together.

Flower 1.42 details this module relies on (read from the installed source, checked on
loopback):

* ``flwr supernode register <public-key-file> <connection> [--name N] --format json``
  prints ``{"success": true, "node-id": <int>}``; ``flwr supernode list <connection>
  --format json`` prints ``{"success": true, "nodes": [{"node-id": "<str>", "status":
  ...}]}`` (no public key, no name); ``flwr supernode unregister <node-id>
  <connection>``.
* Node IDs are unsigned 64-bit integers, beyond SQLite's signed INTEGER, so
  ``device_nodes`` keeps them as text.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.flwr_cli import FlowerCommandError, check_connection_name, run_flwr
from server.privacy_store import PrivacyStore
from server.superlink import DeployPaths
from shared.privacy.identity import decode_public_key
from shared.sql_store import Base, create_store_engine, create_tables

__all__ = ["DeviceRecord", "list_devices", "load_auth_public_key", "register_device", "revoke_device"]


class _DeviceNodeRow(Base):
    """``device_nodes``: which Flower SuperNode registration belongs to which device."""

    __tablename__ = "device_nodes"

    device_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    node_id: Mapped[str] = mapped_column(String(20), comment="Flower node ID (uint64, as text)")
    auth_public_key: Mapped[str] = mapped_column(Text, comment="OpenSSH ECDSA public key the SuperNode uses")
    registered_at: Mapped[datetime] = mapped_column(comment="UTC")
    unregistered_at: Mapped[datetime | None] = mapped_column(comment="UTC; NULL while registered")


@contextmanager
def _session(deploy: DeployPaths) -> Iterator[Session]:
    """A session on ``device_nodes`` (created if missing) whose engine is disposed after."""
    engine = create_store_engine(deploy.fedrec_db_url)
    try:
        create_tables(engine, _DeviceNodeRow)
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
        :func:`server.flwr_cli.write_connection_config`).
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
    check_connection_name(federation)
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
        result = run_flwr(
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
            run_flwr(["supernode", "unregister", node_id, federation], flwr_home=flwr_home, cwd=deploy.root)
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
    check_connection_name(federation)
    nodes = run_flwr(["supernode", "list", federation], flwr_home=flwr_home, cwd=deploy.root)["nodes"]
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
    check_connection_name(federation)
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
            run_flwr(["supernode", "unregister", row.node_id, federation], flwr_home=flwr_home, cwd=deploy.root)
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
