"""Which data sets fedrec knows, and which loader reads each (dataset name -> loader).

``ml-100k`` is the bundled MovieLens-100K (:mod:`shared.data.bundled`),
``grouplens`` an official GroupLens directory or ratings file given by path
(:mod:`shared.data.formats`), ``synthetic`` the seeded generator
(:mod:`shared.data.synthetic`). ``docs/data.md`` describes the three.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shared.data.bundled import load_bundled_ml100k, resolve_cache_dir
from shared.data.formats import load_grouplens
from shared.data.synthetic import MIN_INTERACTIONS, generate_synthetic
from shared.data.types import DataError, InteractionLog

if TYPE_CHECKING:
    from shared.config import DataConfig

__all__ = ["load_interactions", "validate_data_config"]

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
        return load_grouplens(Path(cfg.data_path))
    if cfg.dataset == "ml-100k":
        return load_bundled_ml100k(resolve_cache_dir(cfg.cache_dir))
    return generate_synthetic(cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_interactions, cfg.synthetic_seed)
