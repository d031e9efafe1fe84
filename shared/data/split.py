"""Leave-one-out split by time, the protocol fedrec reports on (see ``docs/data.md``)."""

from __future__ import annotations

import numpy as np

from shared.data.types import DataError, DeviceData, InteractionLog

__all__ = ["MIN_INTERACTIONS", "leave_one_out"]

MIN_INTERACTIONS = 3  # leave-one-out needs a training, a validation and a test item


def leave_one_out(log: InteractionLog, min_interactions: int = MIN_INTERACTIONS) -> list[DeviceData]:
    """Split each user's interactions into train / validation / test by time.

    Each user's interactions are ordered by timestamp with a *stable* sort, so
    interactions with equal timestamps keep the log's row order (RecBole's
    convention; MovieLens users rate many items within one second, and breaking
    those ties otherwise moves the reported figures by 40% or more). The last
    interaction is the test item, the one before it the validation item, the rest
    (time-ordered) the device's training items.

    Parameters
    ----------
    log
        Interactions with dense ids, rows in file order.
    min_interactions
        Users with fewer interactions are dropped; at least 3, so every device
        keeps a training item.

    Returns
    -------
    list[DeviceData]
        One entry per kept user, in ascending ``device_id`` (== dense user id).

    Raises
    ------
    ValueError
        If ``min_interactions < 3``.
    DataError
        If the log's arrays disagree in length or hold out-of-range user ids.
    """
    if min_interactions < MIN_INTERACTIONS:
        raise ValueError(f"min_interactions must be at least {MIN_INTERACTIONS}, got {min_interactions}")
    users = np.asarray(log.user_ids, dtype=np.int64)
    items = np.asarray(log.item_ids, dtype=np.int64)
    times = np.asarray(log.timestamps, dtype=np.float64)
    if not len(users) == len(items) == len(times):
        raise DataError(
            f"{log.source}: user_ids, item_ids and timestamps differ in length "
            f"({len(users)}, {len(items)}, {len(times)})"
        )
    if len(users) and (users.min() < 0 or users.max() >= log.num_users):
        raise DataError(f"{log.source}: user ids outside [0, {log.num_users})")

    # lexsort is stable: by user, then timestamp, then original row position.
    order = np.lexsort((times, users))
    sorted_items = items[order]
    counts = np.bincount(users, minlength=log.num_users)
    ends = np.cumsum(counts)
    devices = []
    for user in np.flatnonzero(counts >= min_interactions):
        end = int(ends[user])
        start = end - int(counts[user])
        devices.append(
            DeviceData(
                device_id=int(user),
                train_items=sorted_items[start : end - 2].copy(),
                valid_item=int(sorted_items[end - 2]),
                test_item=int(sorted_items[end - 1]),
            )
        )
    return devices
