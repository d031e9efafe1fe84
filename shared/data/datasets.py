"""Which data sets fedrec knows, and which loader reads each (dataset name -> loader).

``ml-100k`` is the bundled MovieLens-100K (:mod:`shared.data.bundled`),
``grouplens`` an official GroupLens directory or ratings file given by path
(:mod:`shared.data.formats`), ``synthetic`` the seeded generator
(:mod:`shared.data.synthetic`). ``docs/data.md`` describes the three.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.data.bundled import load_bundled_ml100k, resolve_cache_dir
from shared.data.formats import load_grouplens
from shared.data.synthetic import MIN_INTERACTIONS, generate_synthetic
from shared.data.types import DataError, InteractionLog

if TYPE_CHECKING:
    from shared.config import DataConfig

__all__ = ["drop_exact_duplicates", "load_interactions", "validate_data_config"]

_DATASETS = ("ml-100k", "grouplens", "synthetic")


def validate_data_config(cfg: DataConfig) -> None:
    """Check the combination of data settings before any data is read.

    Parameters
    ----------
    cfg
        Uses ``dataset``, ``data_path`` and the ``synthetic_*`` fields.

    Raises
    ------
    DataError
        Naming the configuration key: an unknown ``dataset``, a ``data-path``
        missing for ``grouplens`` or given to another data set, or synthetic
        parameters out of range.
    """
    if cfg.dataset not in _DATASETS:
        raise DataError(f"dataset: unknown value {cfg.dataset!r}; expected one of {', '.join(_DATASETS)}")
    if cfg.dataset == "grouplens" and not cfg.data_path:
        raise DataError(
            "data-path: required when dataset = 'grouplens' (a directory with u.data, "
            "ratings.dat or ratings.csv, or the ratings file itself)"
        )
    if cfg.dataset != "grouplens" and cfg.data_path:
        raise DataError(
            f"data-path: only used with dataset = 'grouplens', but dataset = {cfg.dataset!r} "
            f"and data-path = {cfg.data_path!r}"
        )
    if cfg.dataset != "synthetic":
        return
    if cfg.synthetic_users < 1:
        raise DataError(f"synthetic-users: must be at least 1, got {cfg.synthetic_users}")
    if cfg.synthetic_items < MIN_INTERACTIONS:
        raise DataError(f"synthetic-items: must be at least {MIN_INTERACTIONS}, got {cfg.synthetic_items}")
    if not MIN_INTERACTIONS <= cfg.synthetic_interactions <= cfg.synthetic_items:
        raise DataError(
            f"synthetic-interactions: the mean per user must lie between {MIN_INTERACTIONS} "
            f"and synthetic-items ({cfg.synthetic_items}), got {cfg.synthetic_interactions}"
        )


def load_interactions(cfg: DataConfig) -> InteractionLog:
    """Load the interactions a :class:`DataConfig` names.

    Parameters
    ----------
    cfg
        Uses ``dataset``, ``data_path``, ``cache_dir`` and the ``synthetic_*`` fields.

    Returns
    -------
    InteractionLog
        The full log (``max_devices`` is applied after splitting, not here).

    Raises
    ------
    DataError
        For an invalid configuration (see :func:`validate_data_config`) and any
        loading error.
    """
    validate_data_config(cfg)
    if cfg.dataset == "grouplens":
        log = load_grouplens(Path(cfg.data_path))
    elif cfg.dataset == "ml-100k":
        log = load_bundled_ml100k(resolve_cache_dir(cfg.cache_dir))
    else:
        log = generate_synthetic(
            cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_interactions, cfg.synthetic_seed
        )
    deduped, removed = drop_exact_duplicates(log)
    if removed and cfg.duplicates == "refuse":
        raise DataError(
            f"{log.source}: {removed} exact duplicate interactions (same user, item and timestamp as an earlier "
            "row); remove them, or set duplicates = 'drop' to keep the first of each"
        )
    return deduped


def drop_exact_duplicates(log: InteractionLog) -> tuple[InteractionLog, int]:
    """Keep the first of each group of rows with the same user, item and timestamp.

    Such rows are one interaction recorded twice (a file concatenated with itself, a
    re-sent export): kept, they would put a device's test item into its training history
    and halve its sampling rate while each interaction counted twice. Row order is kept.

    Returns
    -------
    tuple[InteractionLog, int]
        The log without them (its ``source`` says how many were removed) and that count.
    """
    if len(log.user_ids) == 0:
        return log, 0
    rows = np.stack(
        [
            log.user_ids.astype(np.int64),
            log.item_ids.astype(np.int64),
            log.timestamps.astype(np.float64).view(np.int64),
        ],
        axis=1,
    )
    _, first = np.unique(rows, axis=0, return_index=True)
    removed = len(rows) - len(first)
    if not removed:
        return log, 0
    keep = np.sort(first)
    return (
        replace(
            log,
            user_ids=log.user_ids[keep],
            item_ids=log.item_ids[keep],
            timestamps=log.timestamps[keep],
            source=f"{log.source}; {removed} exact duplicate interactions removed",
        ),
        removed,
    )
