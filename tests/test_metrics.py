"""Ranking metrics against hand-computed values (tie rule: smaller item index first)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.data.types import DeviceData
from shared.metrics import (
    MetricTotals,
    RankResult,
    catalog_coverage,
    full_ranking,
    popularity_baseline,
    sampled_ranking,
    top_k,
)

NO_EXCLUDE = np.zeros(0, dtype=np.int64)
NDCG_RANK_1 = 1 / math.log2(3)  # 0.6309...


def test_full_ranking_one_item_above() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.3])
    result = full_ranking(scores, 2, NO_EXCLUDE)
    assert result.rank == 1
    assert result.hit == 1.0
    assert result.ndcg == pytest.approx(0.6309297535714575)


def test_full_ranking_excluded_items_do_not_count() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.3])
    assert full_ranking(scores, 2, np.array([1])) == RankResult(0, 1.0, 1.0)
    # The target is ranked even when listed in exclude.
    assert full_ranking(scores, 2, np.array([2, 1])) == RankResult(0, 1.0, 1.0)
    assert full_ranking(scores, 0, np.array([0])).rank == 3


def test_full_ranking_ties_smaller_index_first() -> None:
    scores = np.array([0.5, 0.5, 0.5, 0.2])
    assert full_ranking(scores, 0, NO_EXCLUDE).rank == 0
    assert full_ranking(scores, 1, NO_EXCLUDE).rank == 1
    assert full_ranking(scores, 2, NO_EXCLUDE).rank == 2
    assert full_ranking(scores, 2, np.array([0])).rank == 1
    assert full_ranking(scores, 3, NO_EXCLUDE).rank == 3
    assert full_ranking(scores, 2, NO_EXCLUDE).ndcg == pytest.approx(0.5)  # 1/log2(4)


def test_full_ranking_cutoff_boundary() -> None:
    scores = np.arange(20, dtype=np.float64)[::-1].copy()  # item i is at rank i
    at_nine = full_ranking(scores, 9, NO_EXCLUDE, k=10)
    assert (at_nine.rank, at_nine.hit) == (9, 1.0)
    assert at_nine.ndcg == pytest.approx(1 / math.log2(11))
    assert full_ranking(scores, 10, NO_EXCLUDE, k=10) == RankResult(10, 0.0, 0.0)
    assert full_ranking(scores, 4, NO_EXCLUDE, k=5).hit == 1.0
    assert full_ranking(scores, 5, NO_EXCLUDE, k=5).hit == 0.0


def test_full_ranking_equals_position_in_stable_sort() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        scores = rng.integers(0, 4, size=30).astype(np.float32)  # many ties
        exclude = rng.choice(30, size=8, replace=False)
        target = int(rng.integers(30))
        candidates = np.setdiff1d(np.arange(30), np.setdiff1d(exclude, [target]))
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        assert full_ranking(scores, target, exclude).rank == int(np.flatnonzero(order == target)[0])


def test_full_ranking_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        full_ranking(np.array([0.1, np.nan, 0.3]), 0, NO_EXCLUDE)
    with pytest.raises(ValueError, match="target"):
        full_ranking(np.array([0.1, 0.2]), 2, NO_EXCLUDE)


def test_sampled_ranking_uses_every_candidate_when_few() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    # Candidates besides the target: 1 (0.1), 3 (0.7), 4 (0.3); only item 3 is above.
    result = sampled_ranking(scores, 2, np.array([0]), np.random.default_rng(0))
    assert result.rank == 1
    assert result.ndcg == pytest.approx(NDCG_RANK_1)


def test_sampled_ranking_ties_smaller_index_first() -> None:
    scores = np.ones(8)
    assert sampled_ranking(scores, 5, NO_EXCLUDE, np.random.default_rng(0)).rank == 5
    assert sampled_ranking(scores, 5, np.array([0, 1]), np.random.default_rng(0)).rank == 3


def test_sampled_ranking_never_samples_excluded_items() -> None:
    scores = np.zeros(40)
    scores[:20] = 1.0  # excluded items would all outrank the target
    scores[30] = 0.5
    exclude = np.arange(20)
    for seed in range(30):
        result = sampled_ranking(scores, 30, exclude, np.random.default_rng(seed), num_negatives=5)
        assert result.rank == 0


def test_sampled_ranking_draws_distinct_negatives() -> None:
    # 100 items above the target, 1 below: 100 distinct negatives hold at least 99 above.
    scores = np.ones(102)
    scores[100] = 0.5  # target
    scores[101] = 0.0
    for seed in range(20):
        result = sampled_ranking(scores, 100, NO_EXCLUDE, np.random.default_rng(seed), num_negatives=100)
        assert result.rank >= 99


def test_sampled_ranking_is_uniform() -> None:
    # Half of 200 candidates outrank the target: the rank among 100 is 50 on average.
    scores = np.concatenate((np.ones(100), np.zeros(100), [0.5]))
    rng = np.random.default_rng(7)
    ranks = [sampled_ranking(scores, 200, NO_EXCLUDE, rng, num_negatives=100).rank for _ in range(300)]
    assert abs(np.mean(ranks) - 50) < 1.5


def test_top_k_order_and_exclusion() -> None:
    scores = np.array([0.3, 0.9, 0.9, 0.1, 0.5])
    assert top_k(scores, np.array([4]), 3).tolist() == [1, 2, 0]
    assert top_k(scores, NO_EXCLUDE, 2).tolist() == [1, 2]


def test_top_k_ties_at_the_cut_take_smaller_ids() -> None:
    scores = np.array([1, 2, 2, 2, 0])
    assert top_k(scores, NO_EXCLUDE, 2).tolist() == [1, 2]
    assert top_k(scores, np.array([2]), 3).tolist() == [1, 3, 0]


def test_top_k_more_than_candidates() -> None:
    assert top_k(np.array([3.0, 1.0, 2.0]), np.array([0]), 5).tolist() == [2, 1]
    assert top_k(np.array([3.0, 1.0, 2.0]), NO_EXCLUDE, 0).tolist() == []


def test_top_k_matches_stable_sort() -> None:
    rng = np.random.default_rng(11)
    for _ in range(100):
        scores = rng.integers(0, 5, size=50)
        exclude = rng.choice(50, size=10, replace=False)
        k = int(rng.integers(1, 45))
        candidates = np.setdiff1d(np.arange(50), exclude)
        expected = candidates[np.argsort(-scores[candidates], kind="stable")][:k]
        assert top_k(scores, exclude, k).tolist() == expected.tolist()


def test_catalog_coverage() -> None:
    assert catalog_coverage([np.array([0, 1]), np.array([1, 2])], 6) == pytest.approx(0.5)
    assert catalog_coverage([], 4) == 0.0
    assert catalog_coverage([np.array([3, 3, 3])], 4) == pytest.approx(0.25)


def test_metric_totals_add_merge_and_means() -> None:
    first = MetricTotals()
    first.add(RankResult(0, 1.0, 1.0), RankResult(3, 1.0, 0.5))
    second = MetricTotals()
    second.add(RankResult(12, 0.0, 0.0), RankResult(1, 1.0, NDCG_RANK_1))
    first.merge(second)
    assert first.as_dict() == pytest.approx(
        {
            "hr@10": 0.5,
            "ndcg@10": 0.5,
            "sampled-hr@10": 1.0,
            "sampled-ndcg@10": (0.5 + NDCG_RANK_1) / 2,
            "users": 2.0,
        }
    )
    assert MetricTotals().as_dict()["hr@10"] == 0.0  # no users: finite zeros
    with pytest.raises(ValueError, match="k="):
        first.merge(MetricTotals(k=5))


def _devices() -> list[DeviceData]:
    return [
        DeviceData(0, np.array([0]), valid_item=1, test_item=2),
        DeviceData(1, np.array([2, 1]), valid_item=0, test_item=4),
        DeviceData(2, np.array([3]), valid_item=4, test_item=2),
    ]


def test_popularity_baseline_hand_computed() -> None:
    counts = np.array([5, 3, 3, 1, 0])
    # device 0: candidates 2,3,4 scored 3,1,0 -> rank 0
    # device 1: candidates 3,4 scored 1,0 -> rank 1
    # device 2: candidates 0,1,2 scored 5,3,3 -> item 0 above, item 1 tied with smaller id -> rank 2
    at_10 = popularity_baseline(counts, _devices(), k=10)
    assert at_10["hr@10"] == pytest.approx(1.0)
    assert at_10["ndcg@10"] == pytest.approx((1 + NDCG_RANK_1 + 0.5) / 3)
    # Fewer than 100 unseen items: the sampled protocol ranks among all of them.
    assert at_10["sampled-hr@10"] == pytest.approx(1.0)
    assert at_10["sampled-ndcg@10"] == pytest.approx(at_10["ndcg@10"])
    assert at_10["users"] == 3.0
    at_2 = popularity_baseline(counts, _devices(), k=2)
    assert at_2["hr@2"] == pytest.approx(2 / 3)
    assert at_2["ndcg@2"] == pytest.approx((1 + NDCG_RANK_1) / 3)
