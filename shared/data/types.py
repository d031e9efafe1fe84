"""Plain data containers shared by loaders, splitting, devices and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Raised for malformed or unusable input data; the message names file, line and problem."""


@dataclass(frozen=True)
class InteractionLog:
    """All interactions of a data set, with dense 0-based ids.

    Arrays have one row per interaction, in the file's row order (the order
    matters: it breaks timestamp ties in the leave-one-out split).
    """

    user_ids: np.ndarray  # int64 (n,), values in [0, num_users)
    item_ids: np.ndarray  # int64 (n,), values in [0, num_items)
    timestamps: np.ndarray  # float64 (n,)
    num_users: int
    num_items: int
    item_titles: tuple[str, ...] | None  # index = dense item id, when the source has titles
    source: str  # human-readable description of where the data came from
    # The data set's own ids (index = dense id), when the source has ids of its own.
    user_original: np.ndarray | None = None
    item_original: np.ndarray | None = None


@dataclass(frozen=True)
class DeviceData:
    """One device's (one user's) own interactions after the leave-one-out split.

    ``train_items`` is time-ordered (stable sort by timestamp, file order among ties).
    """

    device_id: int  # dense user id == device id
    train_items: np.ndarray  # int64 (n_train,)
    valid_item: int
    test_item: int
