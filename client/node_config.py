"""Reading a Flower node config: which device this node is, where its store is, and its store key.

One job, and the only place that reads these node-config keys:

``device-id`` / ``partition-id``
    The device's id (:func:`device_index`). A deployed device has ``device-id``;
    Flower's simulation engine gives each virtual device a ``partition-id``.
``store``
    The device's SQLite store (:func:`store_path`), which holds the signed ledger
    (:mod:`shared.privacy.ledger_store`) and, on a deployed device, the encrypted data
    (:mod:`client.device_store`). A simulated device without one gets a file of its own
    under the run's output directory.
``key-file`` / ``passphrase-env``
    The store key's source (:func:`key_from_node_config`): a key file, or the name of
    an environment variable holding the passphrase. A node with ``store`` and a key
    source is *deployed*: its data comes from its encrypted store
    (:func:`open_node_store`, :func:`device_data_from_node`, :func:`deployed_device`),
    not from the simulation partitions.
``num-items``
    The catalogue size, when it should override the one recorded at enrolment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.device_store import DeviceDataStore, key_from_passphrase
from client.store_keys import key_from_file, passphrase_from_env
from shared.data.types import DataError, DeviceData
from shared.typed_fields import get_int

if TYPE_CHECKING:
    import torch

    from shared.config import FedrecConfig

__all__ = [
    "DeployedDevice",
    "deployed_device",
    "device_data_from_node",
    "device_index",
    "is_deployed",
    "key_from_node_config",
    "open_node_store",
    "store_path",
]

_KEY_SOURCES = frozenset({"key-file", "passphrase-env"})


@dataclass(frozen=True)
class DeployedDevice:
    """What a deployed device's encrypted store gives the ClientApp when a task starts."""

    data: DeviceData
    num_items: int
    personal: dict[str, torch.Tensor]  # the personal model state; empty if none was saved


def device_index(node_config: Mapping[str, Any]) -> int:
    """This node's device id: ``device-id`` (deployed) or ``partition-id`` (simulated).

    Raises
    ------
    KeyError
        If the node config has neither.
    """
    for key in ("device-id", "partition-id"):
        if key in node_config:
            return get_int(node_config, key)
    raise KeyError("node config has neither 'device-id' nor 'partition-id'")


def store_path(cfg: FedrecConfig, node_config: Mapping[str, Any]) -> Path:
    """This device's local store: the node config's ``store``, else one file per simulated device.

    The simulated device's file is ``device-<id>.db`` under ``cfg.privacy.device_store_dir``,
    or under ``<output_dir>/devices`` when that is unset.
    """
    if "store" in node_config:
        return Path(str(node_config["store"])).expanduser()
    root = Path(cfg.privacy.device_store_dir or Path(cfg.output_dir) / "devices")
    return root / f"device-{device_index(node_config)}.db"


def is_deployed(node_config: Mapping[str, Any]) -> bool:
    """Whether the node is a deployed device: a ``store`` and a key source (``key-file`` or ``passphrase-env``)."""
    return "store" in node_config and bool(_KEY_SOURCES & set(node_config))


def key_from_node_config(node_config: Mapping[str, Any], store_file: Path) -> bytes | None:
    """The store key named by a node config (``key-file`` or ``passphrase-env``), else None.

    ``store_file`` is the store whose scrypt salt a passphrase is derived under.

    Raises
    ------
    KeyFileError, ValueError
        If both are given, the key file is unusable, or the environment variable is unset or empty.
    """
    has_file, has_env = "key-file" in node_config, "passphrase-env" in node_config
    if has_file and has_env:
        raise ValueError("node config: give either 'key-file' or 'passphrase-env', not both")
    if has_file:
        return key_from_file(str(node_config["key-file"]))
    if has_env:
        passphrase = passphrase_from_env(str(node_config["passphrase-env"]), "node config 'passphrase-env'")
        return key_from_passphrase(store_file, passphrase)
    return None


def open_node_store(node_config: Mapping[str, Any]) -> DeviceDataStore | None:
    """A deployed device's encrypted store, opened from its node config; None for a simulated device.

    Deployed means ``store`` plus a key source (``key-file`` or ``passphrase-env``) and
    ``device-id``, as for :func:`device_data_from_node`. The caller closes the store.

    Raises
    ------
    DataError, ValueError
        For a missing store file or ``device-id``, an unusable key, or a wrong key.
    """
    if not is_deployed(node_config):
        return None
    if "device-id" not in node_config:
        raise ValueError("node config: 'store' is set but 'device-id' is missing")
    path = Path(str(node_config["store"])).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: device store not found (run `fedrec device enroll` first)")
    key = key_from_node_config(node_config, path)
    assert key is not None  # a key source is present (checked above)
    return DeviceDataStore(path, get_int(node_config, "device-id"), key)


def _data_of(store: DeviceDataStore, node_config: Mapping[str, Any]) -> tuple[DeviceData, int]:
    """The device's split and catalogue size: ``num-items`` if the node sets it, else the store's."""
    num_items = get_int(node_config, "num-items") if "num-items" in node_config else store.num_items
    if num_items is None:
        raise DataError(f"{store.path}: no catalogue size recorded; set 'num-items' in the node config")
    return store.device_data(num_items), num_items


def device_data_from_node(cfg: FedrecConfig, node_config: Mapping[str, Any]) -> tuple[DeviceData, int] | None:
    """A deployed device's own data, from its encrypted store; None for a simulated device.

    A node is deployed when its ``node_config`` has ``store`` and a key source
    (``key-file``, or ``passphrase-env`` naming an environment variable that holds the
    passphrase); it also needs ``device-id``. Without a key source, None: the caller
    falls back to the simulation partitions.

    The catalogue size is the node config's ``num-items`` when given, else the one
    recorded in the store at enrolment (``fedrec device enroll``). It is not read from
    the global model because the data is loaded before any model arrives (and the
    ClientApp loads data for every message); a catalogue that disagrees with the global
    model's item table fails loudly when the model's state is loaded.

    ``cfg`` is accepted for symmetry with the simulation route and is not read today.

    Raises
    ------
    DataError, ValueError
        For a missing ``device-id``, an unusable key, a wrong key, or unusable data.
    """
    del cfg  # the catalogue comes from the node or the store, not from the data config
    opened = open_node_store(node_config)
    if opened is None:
        return None
    with opened as store:
        return _data_of(store, node_config)


def deployed_device(node_config: Mapping[str, Any]) -> DeployedDevice | None:
    """A deployed device's data and personal model state, read in one opening of its store.

    None for a simulated device. The data is as :func:`device_data_from_node` reads it.

    Raises
    ------
    DataError, ValueError
        As :func:`device_data_from_node`.
    """
    opened = open_node_store(node_config)
    if opened is None:
        return None
    with opened as store:
        data, num_items = _data_of(store, node_config)
        return DeployedDevice(data, num_items, store.load_personal())
