"""Per-device storage of the split, so that a simulated device loads only its own data.

Layout of a partition directory (all arrays int64):

- ``items.npy``: every device's training items, concatenated in device order;
- ``offsets.npy``: ``num_devices + 1`` offsets into ``items.npy``;
- ``device_ids.npy``, ``valid.npy``, ``test.npy``: one entry per device;
- ``meta.json``: format name and version, ``num_items``, ``num_devices``, ``source``;
- ``titles.json``: item titles by dense item id, when the data has them.

:func:`load_device` memory-maps the arrays and copies one device's slice, so a
device process never reads the other devices' interactions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.data.bundled import BUNDLED_FILES, resolve_cache_dir
from shared.data.datasets import load_interactions, validate_data_config
from shared.data.formats import find_grouplens_files
from shared.data.split import MIN_INTERACTIONS, leave_one_out
from shared.data.types import DataError, DeviceData

if TYPE_CHECKING:
    from shared.config import DataConfig

__all__ = [
    "FORMAT_VERSION",
    "DeviceIndexError",
    "PartitionInfo",
    "history_lengths",
    "item_popularity",
    "load_device",
    "load_original_ids",
    "load_titles",
    "prepare_partitions",
    "read_partition_info",
    "write_partitions",
]

FORMAT_NAME = "fedrec-partitions"
FORMAT_VERSION = 1
_ARRAYS = ("items", "offsets", "device_ids", "valid", "test")


class DeviceIndexError(DataError, IndexError):
    """A device index outside ``0..num_devices-1``."""


@dataclass(frozen=True)
class PartitionInfo:
    """A written partition directory and what it holds."""

    path: Path
    num_devices: int
    num_items: int
    source: str


def write_partitions(
    devices: Sequence[DeviceData],
    num_items: int,
    source: str,
    item_titles: Sequence[str] | None,
    path: Path,
    *,
    original_users: np.ndarray | None = None,
    original_items: np.ndarray | None = None,
) -> PartitionInfo:
    """Write the devices' split data as a partition directory, atomically.

    The directory is built under a temporary name next to ``path`` and renamed
    into place, so readers see either nothing or the complete partition.

    Parameters
    ----------
    devices
        Split data, in the order that defines device index 0..n-1.
    num_items
        Catalogue size (item ids lie in ``[0, num_items)``).
    source
        Description of the data, kept in ``meta.json``.
    item_titles
        Titles by dense item id, or ``None``.
    path
        Directory to create; it must not exist yet.
    original_users, original_items
        The data set's own ids by dense user id and dense item id, when it has them
        (kept for exports that name users and items as the data set does).

    Returns
    -------
    PartitionInfo
        Describing the new directory.

    Raises
    ------
    FileExistsError
        If ``path`` exists (also when another process created it meanwhile).
    DataError
        If an item id is outside ``[0, num_items)`` or titles do not match.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: partition directory already exists")
    counts = np.fromiter((len(d.train_items) for d in devices), dtype=np.int64, count=len(devices))
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    items = (
        np.concatenate([np.asarray(d.train_items, dtype=np.int64) for d in devices])
        if devices
        else np.zeros(0, dtype=np.int64)
    )
    valid = np.fromiter((d.valid_item for d in devices), dtype=np.int64, count=len(devices))
    test = np.fromiter((d.test_item for d in devices), dtype=np.int64, count=len(devices))
    device_ids = np.fromiter((d.device_id for d in devices), dtype=np.int64, count=len(devices))
    for name, values in (("train", items), ("valid", valid), ("test", test)):
        if len(values) and (values.min() < 0 or values.max() >= num_items):
            raise DataError(f"{source}: a {name} item id lies outside [0, {num_items})")
    if item_titles is not None and len(item_titles) != num_items:
        raise DataError(f"{source}: {len(item_titles)} titles for {num_items} items")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700; the cache is ordinary shared data
        arrays = {"items": items, "offsets": offsets, "device_ids": device_ids}
        arrays |= {"valid": valid, "test": test}
        for name, values in arrays.items():
            np.save(tmp / f"{name}.npy", values, allow_pickle=False)
        if item_titles is not None:
            (tmp / "titles.json").write_text(json.dumps(list(item_titles)), encoding="utf-8")
        for name, ids in (("original_users", original_users), ("original_items", original_items)):
            if ids is not None:
                np.save(tmp / f"{name}.npy", np.asarray(ids, dtype=np.int64), allow_pickle=False)
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_items": int(num_items),
            "num_devices": len(devices),
            "num_train_interactions": int(offsets[-1]),
            "source": source,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        try:
            # rename fails on an existing non-empty directory: the other writer wins.
            tmp.rename(path)
        except OSError as exc:
            if path.exists():
                raise FileExistsError(f"{path}: partition directory already exists") from exc
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PartitionInfo(path, len(devices), int(num_items), source)


def read_partition_info(path: Path) -> PartitionInfo:
    """Read and check a partition directory's metadata.

    Parameters
    ----------
    path
        Directory written by :func:`write_partitions`.

    Returns
    -------
    PartitionInfo

    Raises
    ------
    DataError
        If the directory or a file is missing, ``meta.json`` is corrupt, the format
        version differs, or the arrays disagree with the metadata.
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{path}: not a partition directory (no meta.json)")
    try:
        meta: Any = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_NAME:
            raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise DataError(
                f"{meta_path}: format version {meta.get('version')!r}, expected "
                f"{FORMAT_VERSION}; delete the directory to rebuild it"
            )
        info = PartitionInfo(path, int(meta["num_devices"]), int(meta["num_items"]), str(meta["source"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{meta_path}: corrupt metadata ({exc!r})") from exc
    expected = {"offsets": info.num_devices + 1}
    expected |= {name: info.num_devices for name in ("device_ids", "valid", "test")}
    for name in _ARRAYS:
        shape = _open(path, name).shape
        if name in expected and shape != (expected[name],):
            raise DataError(f"{path / (name + '.npy')}: shape {shape}, expected ({expected[name]},)")
    return info


@functools.lru_cache(maxsize=64)
def _mapped(file: str, mtime_ns: int, size: int) -> np.ndarray:
    # Keyed by the file's identity as well as its name: a rebuilt file is mapped anew.
    del mtime_ns, size
    return np.load(file, mmap_mode="r", allow_pickle=False)


def _open(path: Path, name: str) -> np.ndarray:
    """Memory-map one array of a partition (nothing is read until indexed).

    The maps are kept per process: a simulated device loads its data on every
    message, and re-opening five files each time was a measurable share of a task.
    """
    file = path / f"{name}.npy"
    try:
        st = file.stat()
        return _mapped(str(file), st.st_mtime_ns, st.st_size)
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: cannot read partition array ({exc})") from exc


def load_device(path: Path, index: int) -> DeviceData:
    """Load one device's data, reading only that device's part of the files.

    Parameters
    ----------
    path
        Partition directory.
    index
        Device position ``0..num_devices-1`` (not the device id).

    Returns
    -------
    DeviceData
        With ``train_items`` copied out of the memory map.

    Raises
    ------
    DeviceIndexError
        (a DataError and IndexError) if ``index`` is out of range.
    DataError
        If the partition files are missing or unreadable.
    """
    path = Path(path)
    offsets = _open(path, "offsets")
    num_devices = len(offsets) - 1
    if not 0 <= index < num_devices:
        raise DeviceIndexError(f"{path}: device index {index} outside [0, {num_devices})")
    start, stop = int(offsets[index]), int(offsets[index + 1])
    return DeviceData(
        device_id=int(_open(path, "device_ids")[index]),
        train_items=np.array(_open(path, "items")[start:stop], dtype=np.int64),
        valid_item=int(_open(path, "valid")[index]),
        test_item=int(_open(path, "test")[index]),
    )


def load_original_ids(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The data set's own ids of each device's user and of each item (``None`` where it has none).

    Returns ``(users, items)``: ``users[i]`` is device ``i``'s user id in the data set,
    ``items[j]`` the data set's id of dense item ``j``.
    """
    path = Path(path)
    users = items = None
    if (path / "original_users.npy").is_file():
        by_dense_user = np.load(path / "original_users.npy", allow_pickle=False)
        users = by_dense_user[_open(path, "device_ids")]
    if (path / "original_items.npy").is_file():
        items = np.load(path / "original_items.npy", allow_pickle=False)
    return users, items


def load_titles(path: Path) -> tuple[str, ...] | None:
    """Item titles by dense item id, or ``None`` when the data has none.

    Raises
    ------
    DataError
        If ``titles.json`` is corrupt.
    """
    file = Path(path) / "titles.json"
    if not file.is_file():
        return None
    try:
        titles = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{file}: corrupt titles ({exc})") from exc
    if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
        raise DataError(f"{file}: expected a JSON list of strings")
    return tuple(titles)


def item_popularity(info: PartitionInfo) -> np.ndarray:
    """Training interactions per item over all devices (popularity baseline scores).

    Returns
    -------
    numpy.ndarray
        int64, shape ``(num_items,)``.
    """
    items = _open(info.path, "items")
    return np.bincount(items, minlength=info.num_items).astype(np.int64)


def history_lengths(info: PartitionInfo) -> np.ndarray:
    """Training interactions per device, in device order (int64, shape ``(num_devices,)``).

    For simulations and benchmarks, which hold every device's data anyway; a server never reads it.
    """
    return np.diff(_open(info.path, "offsets")).astype(np.int64)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(cfg: DataConfig) -> dict[str, Any]:
    """Everything the partition content depends on (hashed into the folder name)."""
    key: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "split": f"leave-one-out, stable by timestamp then file row, min {MIN_INTERACTIONS}",
        "dataset": cfg.dataset,
        "max_devices": cfg.max_devices,
        # Exact duplicates dropped, users too short for the split counted in the source.
        "hygiene": 1,
        "original-ids": 1,
        "duplicates": cfg.duplicates,
    }
    if cfg.dataset == "ml-100k":
        key["content"] = BUNDLED_FILES
    elif cfg.dataset == "grouplens":
        files = find_grouplens_files(Path(cfg.data_path))
        key["content"] = {
            "kind": files.kind,
            "ratings": _file_digest(files.ratings),
            "titles": _file_digest(files.titles) if files.titles else None,
        }
    elif cfg.dataset == "synthetic":
        key["synthetic"] = [
            cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_interactions,
            cfg.synthetic_seed,
        ]  # fmt: skip
    return key


def prepare_partitions(cfg: DataConfig, cache_dir: Path | None = None) -> PartitionInfo:
    """Load, split and store the configured data once; later calls reuse it.

    The folder ``<cache>/partitions/<dataset>-<hash>`` is named by a hash of the
    settings that determine its content (data set, ``max_devices``, synthetic
    parameters, format version, and for ``grouplens`` the SHA-256 of the input
    files, so edited files are re-read).

    Parameters
    ----------
    cfg
        Data configuration; ``max_devices > 0`` keeps the first ``max_devices``
        devices (ascending dense user id) of the split.
    cache_dir
        Cache root; ``None`` resolves ``cfg.cache_dir`` (see
        :func:`~shared.data.bundled.resolve_cache_dir`).

    Returns
    -------
    PartitionInfo

    Raises
    ------
    DataError
        For invalid configuration or data.
    """
    validate_data_config(cfg)
    if cfg.max_devices < 0:
        raise DataError(f"max-devices: must be 0 (all users) or positive, got {cfg.max_devices}")
    root = Path(cache_dir) if cache_dir is not None else resolve_cache_dir(cfg.cache_dir)
    encoded = json.dumps(_cache_key(cfg), sort_keys=True).encode()
    path = root / "partitions" / f"{cfg.dataset}-{hashlib.sha256(encoded).hexdigest()[:16]}"
    if (path / "meta.json").is_file():
        return read_partition_info(path)
    log = load_interactions(cfg)
    devices = leave_one_out(log, MIN_INTERACTIONS)
    source = log.source
    short = int(np.count_nonzero(np.bincount(log.user_ids, minlength=log.num_users) < MIN_INTERACTIONS))
    if short:
        source += f"; {short} users with fewer than {MIN_INTERACTIONS} interactions left out (no device)"
    if cfg.max_devices:
        devices = devices[: cfg.max_devices]
    try:
        return write_partitions(
            devices,
            log.num_items,
            source,
            log.item_titles,
            path,
            original_users=log.user_original,
            original_items=log.item_original,
        )
    except FileExistsError:
        return read_partition_info(path)  # a concurrent process wrote the same content
