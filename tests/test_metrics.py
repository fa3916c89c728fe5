"""Every metric against hand-computed cases, and the bootstrap interval's behaviour."""

import math

import numpy as np
import pytest

from data.errors import DataValidationError
from data.metrics import (
    bootstrap_ci,
    coverage_at_k,
    evaluate_rankings,
    mrr_at_k,
    ndcg_at_k,
    paired_bootstrap_ci,
    recall_at_k,
)

RANKED = np.array([
    [5, 3, 9, 1],   # target 3 at rank 2
    [1, 2, 3, 4],   # target 7 absent
    [8, -1, -1, -1],  # target 8 at rank 1, padded tail
])
TARGETS = [3, 7, 8]


def test_recall_is_hit_rate_with_one_target():
    np.testing.assert_array_equal(recall_at_k(RANKED, TARGETS, 1), [0, 0, 1])
    np.testing.assert_array_equal(recall_at_k(RANKED, TARGETS, 2), [1, 0, 1])


def test_recall_with_several_targets():
    # user 0: relevant {3, 9}; top-2 holds 3 -> 1/2; top-3 holds both -> 1
    np.testing.assert_allclose(recall_at_k(RANKED[:1], [[3, 9]], 2), [0.5])
    np.testing.assert_allclose(recall_at_k(RANKED[:1], [[3, 9]], 3), [1.0])


def test_ndcg_hand_computed():
    got = ndcg_at_k(RANKED, TARGETS, 4)
    np.testing.assert_allclose(got, [1 / math.log2(3), 0.0, 1.0])
    # two relevant at ranks 2 and 3: DCG = 1/log2(3) + 1/log2(4); IDCG = 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3))
    np.testing.assert_allclose(ndcg_at_k(RANKED[:1], [[3, 9]], 4), [expected])


def test_ndcg_cutoff_excludes_later_hits():
    np.testing.assert_allclose(ndcg_at_k(RANKED, TARGETS, 1), [0.0, 0.0, 1.0])


def test_mrr_hand_computed():
    np.testing.assert_allclose(mrr_at_k(RANKED, TARGETS, 4), [0.5, 0.0, 1.0])
    np.testing.assert_allclose(mrr_at_k(RANKED, TARGETS, 1), [0.0, 0.0, 1.0])


def test_padding_is_never_relevant():
    assert recall_at_k(np.array([[-1, -1]]), [-1], 2)[0] == 0


def test_coverage_counts_distinct_items_ignoring_padding():
    # top-2 over users: {5, 3, 1, 2, 8} -> 5 of 10
    assert coverage_at_k(RANKED, 2, 10) == pytest.approx(0.5)
    with pytest.raises(DataValidationError):
        coverage_at_k(RANKED, 2, 0)


def test_evaluate_rankings_means_and_row():
    report = evaluate_rankings(RANKED, TARGETS, ks=(1, 4), n_items=10, n_boot=200)
    means = report.means
    assert means["Recall@4"] == pytest.approx(2 / 3)
    assert means["NDCG@4"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert means["MRR@4"] == pytest.approx(0.5)
    row = report.row("m")
    assert row["method"] == "m" and row["users"] == 3
    assert row["Coverage@1"] == pytest.approx(0.3)
    assert "NDCG@10_ci" not in row and "NDCG@1_ci" not in row  # intervals only for ci_metrics
    with pytest.raises(DataValidationError, match="max\\(ks\\)"):
        evaluate_rankings(RANKED, TARGETS, ks=(10,), n_items=10)


def test_relevant_must_align_with_rows():
    with pytest.raises(DataValidationError, match="one per user"):
        recall_at_k(RANKED, [1, 2], 2)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_users():
    rng = np.random.default_rng(0)
    small = rng.binomial(1, 0.3, 100).astype(float)
    large = rng.binomial(1, 0.3, 10_000).astype(float)
    lo_s, hi_s = bootstrap_ci(small, n_boot=500)
    lo_l, hi_l = bootstrap_ci(large, n_boot=500)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3
    assert bootstrap_ci(small, n_boot=500) == (lo_s, hi_s)  # seeded


def test_paired_bootstrap_detects_a_real_difference():
    rng = np.random.default_rng(1)
    a = rng.binomial(1, 0.5, 2000).astype(float)
    b = a * rng.binomial(1, 0.8, 2000)  # b loses 20% of a's hits
    lo, hi = paired_bootstrap_ci(a, b, n_boot=500)
    assert lo > 0
    lo, hi = paired_bootstrap_ci(a, a, n_boot=100)
    assert lo == hi == 0


def test_clustered_bootstrap_resamples_whole_users():
    from data.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    per_user = rng.normal(size=200)
    # five identical cases per user carry no more information than one: the interval must not shrink
    values, clusters = np.repeat(per_user, 5), np.repeat(np.arange(200), 5)
    one = bootstrap_ci(per_user, seed=1)
    clustered = bootstrap_ci(values, seed=1, clusters=clusters)
    naive = bootstrap_ci(values, seed=1)
    width = lambda ci: ci[1] - ci[0]
    assert width(clustered) == pytest.approx(width(one), rel=0.15)
    assert width(naive) < 0.6 * width(clustered)  # treating the cases as independent would overstate
    with pytest.raises(DataValidationError, match="clusters"):
        bootstrap_ci(values, clusters=clusters[:-1])


def test_evaluate_cases_clusters_a_user_with_several_cases():
    from data.protocol import EvalCases
    from retrieval.evaluate import evaluate_cases

    cases = EvalCases(users=np.array([1, 1, 2]), targets=np.array([5, 6, 7]),
                      histories=[np.array([1]), np.array([1, 5]), np.array([2])])
    ranked = np.array([[5, 9], [9, 6], [8, 9]])
    report = evaluate_cases(ranked, cases, n_items=10, ks=(2,))
    np.testing.assert_allclose(report.per_user["Recall@2"], [1.0, 1.0, 0.0])
    assert report.per_user["NDCG@2"][1] == pytest.approx(1 / np.log2(3))
