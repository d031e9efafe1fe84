"""Ranking metrics for the leave-one-out protocol: HR@k and NDCG@k, full and sampled.

Ties are broken as a stable descending sort would: among equal scores the smaller
item index ranks first. The rule is fixed so that figures are reproducible and a
constant-score model gets no credit it did not earn beyond that fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from shared.data.types import DeviceData

__all__ = [
    "MetricTotals",
    "RankResult",
    "catalog_coverage",
    "full_ranking",
    "popularity_baseline",
    "sampled_ranking",
    "top_k",
]


@dataclass(frozen=True)
class RankResult:
    """Where the target landed: 0-based ``rank``, ``hit`` (0/1) and ``ndcg`` at k."""

    rank: int
    hit: float
    ndcg: float


def _result(rank: int, k: int) -> RankResult:
    if rank < k:
        return RankResult(rank, 1.0, 1.0 / math.log2(rank + 2))
    return RankResult(rank, 0.0, 0.0)


def _check(scores: np.ndarray, target: int, k: int) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if not 0 <= target < len(scores):
        raise ValueError(f"target {target} outside [0, {len(scores)})")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    # A NaN target would compare false with everything and rank first.
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores


def _candidates(num_items: int, exclude: np.ndarray, target: int | None) -> np.ndarray:
    """Boolean mask of rankable items: not excluded, except that the target always is."""
    mask = np.ones(num_items, dtype=bool)
    mask[np.asarray(exclude, dtype=np.int64)] = False
    if target is not None:
        mask[target] = True
    return mask


def full_ranking(scores: np.ndarray, target: int, exclude: np.ndarray, k: int = 10) -> RankResult:
    """Rank the target among all items that are not excluded.

    Parameters
    ----------
    scores
        Shape ``(num_items,)``; higher is better.
    target
        Item whose rank is measured; never excluded, even if listed in ``exclude``.
    exclude
        Item ids to leave out (the user's training and validation items).
    k
        Cut-off for hit and NDCG.

    Returns
    -------
    RankResult
        ``rank`` = candidates scoring strictly higher + candidates scoring equal with
        a smaller index; ``hit = 1`` and ``ndcg = 1 / log2(rank + 2)`` if ``rank < k``.

    Raises
    ------
    ValueError
        For non-1-D or NaN scores, a target out of range or ``k < 1``.
    """
    scores = _check(scores, target, k)
    mask = _candidates(len(scores), exclude, target)
    value = scores[target]
    above = np.count_nonzero(mask & (scores > value))
    tied_before = np.count_nonzero(mask[:target] & (scores[:target] == value))
    return _result(int(above + tied_before), k)


def sampled_ranking(
    scores: np.ndarray,
    target: int,
    exclude: np.ndarray,
    rng: np.random.Generator,
    num_negatives: int = 100,
    k: int = 10,
) -> RankResult:
    """Rank the target among ``num_negatives`` uniformly sampled unseen items.

    Parameters
    ----------
    scores, target, exclude, k
        As in :func:`full_ranking`.
    rng
        Source of the negative sample.
    num_negatives
        Distinct negatives drawn without replacement from the items that are
        neither excluded nor the target; all of them if fewer are available.

    Returns
    -------
    RankResult
        Rank among target + negatives with the same tie rule as :func:`full_ranking`.
    """
    scores = _check(scores, target, k)
    mask = _candidates(len(scores), exclude, None)
    mask[target] = False
    pool = np.flatnonzero(mask)
    negatives = pool if len(pool) <= num_negatives else rng.choice(pool, num_negatives, replace=False)
    value = scores[target]
    negative_scores = scores[negatives]
    above = np.count_nonzero(negative_scores > value)
    tied_before = np.count_nonzero((negative_scores == value) & (negatives < target))
    return _result(int(above + tied_before), k)


def top_k(scores: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """The k best items that are not excluded, best first.

    Parameters
    ----------
    scores
        Shape ``(num_items,)``; higher is better.
    exclude
        Item ids never to return.
    k
        How many; fewer when fewer candidates exist.

    Returns
    -------
    numpy.ndarray
        int64 item ids in stable descending order of score (ties: smaller id first).
    """
    if k < 1:
        return np.zeros(0, dtype=np.int64)
    scores = _check(scores, 0, 1)
    candidates = np.flatnonzero(_candidates(len(scores), exclude, None))
    values = scores[candidates].astype(np.float64)
    if k < len(candidates):
        # argpartition alone would split ties at the cut arbitrarily; take every item
        # above the k-th best value and fill up with the smallest-index ties.
        kth = np.partition(values, len(values) - k)[len(values) - k]
        above = np.flatnonzero(values > kth)
        tied = np.flatnonzero(values == kth)[: k - len(above)]
        keep = np.concatenate((above, tied))
        candidates, values = candidates[keep], values[keep]
    order = np.lexsort((candidates, -values))
    return candidates[order].astype(np.int64)


def catalog_coverage(top_lists: Iterable[np.ndarray], num_items: int) -> float:
    """Fraction of the ``num_items`` items that appear in at least one list."""
    if num_items < 1:
        raise ValueError(f"num_items must be at least 1, got {num_items}")
    seen = np.zeros(num_items, dtype=bool)
    for items in top_lists:
        seen[np.asarray(items, dtype=np.int64)] = True
    return float(np.count_nonzero(seen)) / num_items


@dataclass
class MetricTotals:
    """Sums of hit and NDCG over users, for the full and the sampled protocol.

    Devices accumulate with :meth:`add`; totals from several devices combine with
    :meth:`merge`; :meth:`as_dict` gives the means and the user count.
    """

    k: int = 10
    users: int = 0
    hit_sum: float = 0.0
    ndcg_sum: float = 0.0
    sampled_hit_sum: float = 0.0
    sampled_ndcg_sum: float = 0.0

    def add(self, full: RankResult, sampled: RankResult) -> None:
        """Count one user's results (in place)."""
        self.users += 1
        self.hit_sum += full.hit
        self.ndcg_sum += full.ndcg
        self.sampled_hit_sum += sampled.hit
        self.sampled_ndcg_sum += sampled.ndcg

    def merge(self, other: MetricTotals) -> None:
        """Add another total's counts to this one (in place)."""
        if other.k != self.k:
            raise ValueError(f"cannot merge totals at k={other.k} into totals at k={self.k}")
        self.users += other.users
        self.hit_sum += other.hit_sum
        self.ndcg_sum += other.ndcg_sum
        self.sampled_hit_sum += other.sampled_hit_sum
        self.sampled_ndcg_sum += other.sampled_ndcg_sum

    def as_dict(self) -> dict[str, float]:
        """Means per user and the user count.

        Means are 0.0 when there are no users, so that user-weighted averages over
        devices stay finite.
        """
        n = max(self.users, 1)
        k = self.k
        return {
            f"hr@{k}": self.hit_sum / n,
            f"ndcg@{k}": self.ndcg_sum / n,
            f"sampled-hr@{k}": self.sampled_hit_sum / n,
            f"sampled-ndcg@{k}": self.sampled_ndcg_sum / n,
            "users": float(self.users),
        }


def popularity_baseline(
    train_counts: np.ndarray, devices: Iterable[DeviceData], k: int = 10, seed: int = 0
) -> dict[str, float]:
    """Evaluate the most-popular recommender on every device's test item.

    Parameters
    ----------
    train_counts
        Training interactions per item, shape ``(num_items,)``; the item scores.
    devices
        Split data; each device's training and validation items are excluded.
    k
        Cut-off.
    seed
        Seed of the negatives for the sampled protocol (100 negatives).

    Returns
    -------
    dict[str, float]
        :meth:`MetricTotals.as_dict` over all devices.
    """
    scores = np.asarray(train_counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    totals = MetricTotals(k=k)
    for device in devices:
        exclude = np.append(np.asarray(device.train_items, dtype=np.int64), device.valid_item)
        totals.add(
            full_ranking(scores, device.test_item, exclude, k),
            sampled_ranking(scores, device.test_item, exclude, rng, 100, k),
        )
    return totals.as_dict()
