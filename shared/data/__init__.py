"""Data for fedrec: loaders, the leave-one-out split and per-device partitions."""

from shared.data.bundled import load_bundled_ml100k
from shared.data.datasets import load_interactions
from shared.data.formats import load_grouplens
from shared.data.partition import (
    PartitionInfo,
    item_popularity,
    load_device,
    load_titles,
    prepare_partitions,
    read_partition_info,
    write_partitions,
)
from shared.data.split import leave_one_out
from shared.data.synthetic import generate_synthetic
from shared.data.types import DataError, DeviceData, InteractionLog

__all__ = [
    "DataError",
    "DeviceData",
    "InteractionLog",
    "PartitionInfo",
    "generate_synthetic",
    "item_popularity",
    "leave_one_out",
    "load_bundled_ml100k",
    "load_device",
    "load_grouplens",
    "load_interactions",
    "load_titles",
    "prepare_partitions",
    "read_partition_info",
    "write_partitions",
]
