"""Label transfer: reference parity, accuracy on shared types, rejection of an absent type."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from scalex_scale.metrics import f1_scores
from scalex_scale.metrics.label_transfer import TransferResult, knn_classifier_transfer, transfer_labels


def make_ref_query(
    *, n_ref: int = 3000, n_query: int = 2100, query_shift: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """10-d Gaussian clusters; types t0..t5 in both, t6 only in the query (absent from the reference).

    Centres are 8 * e_i (pairwise distance 11.3, noise sd 0.7-1.3 per type, radius ~ sqrt(10) sd);
    the query is shifted by a small random vector (a residual batch effect).
    """
    rng = np.random.default_rng(seed)
    centers = 8.0 * np.eye(7, 10)
    sd = rng.uniform(0.7, 1.3, 7)
    rt = rng.integers(0, 6, n_ref)
    qt = rng.integers(0, 7, n_query)
    ref = centers[rt] + rng.normal(0.0, 1.0, (n_ref, 10)) * sd[rt, None]
    query = centers[qt] + rng.normal(0.0, 1.0, (n_query, 10)) * sd[qt, None] + rng.normal(0.0, query_shift, 10)
    names = np.array([f"t{i}" for i in range(7)], dtype=object)
    return ref.astype(np.float32), names[rt], query.astype(np.float32), names[qt]


@pytest.fixture(scope="module")
def data():
    return make_ref_query()


def test_shared_types_accurate_and_absent_type_unassigned(data):
    ref, ref_lab, query, query_lab = data
    res = transfer_labels(ref, ref_lab, query)
    assert isinstance(res, TransferResult)
    assert res.labels.dtype == object and res.confidence.dtype == np.float32
    shared = query_lab != "t6"
    accuracy = np.mean(res.labels[shared] == query_lab[shared])
    unassigned_shared = np.mean(res.labels[shared] == "unassigned")
    unassigned_novel = np.mean(res.labels[~shared] == "unassigned")
    print(f"\nshared accuracy {accuracy:.3f}, shared unassigned {unassigned_shared:.3f}, novel unassigned {unassigned_novel:.3f}")
    assert accuracy >= 0.97
    assert unassigned_shared <= 0.02
    assert unassigned_novel >= 0.90
    f1 = f1_scores(query_lab[shared], res.labels[shared])
    assert f1["f1_macro"] >= 0.97
    # the novel type is far from the reference: its novelty ratio sits above the cutoff
    assert np.median(res.novelty_ratio[~shared]) > res.novelty_cutoff > np.median(res.novelty_ratio[shared])


@pytest.mark.parametrize("seed", [0, 1])
def test_smoothing_rejects_a_novel_group_between_reference_types(seed):
    """A novel type halfway between two reference types (moderate per-cell ratios): the neighbourhood-averaged
    ratio rejects (nearly) all of it, the per-cell ratio only part, and shared types stay assigned."""
    rng = np.random.default_rng(seed)
    centers = 8.0 * np.eye(7, 10)
    centers[6] = 0.5 * (centers[0] + centers[1])
    centers[6, 7] = 2.0
    rt, qt = rng.integers(0, 6, 3000), rng.integers(0, 7, 2100)
    ref = (centers[rt] + rng.normal(0.0, 1.0, (3000, 10))).astype(np.float32)
    query = (centers[qt] + rng.normal(0.0, 1.0, (2100, 10)) + rng.normal(0.0, 0.3, 10)).astype(np.float32)
    names = np.array([f"t{i}" for i in range(7)], dtype=object)
    novel = qt == 6
    smoothed = transfer_labels(ref, names[rt], query)
    per_cell = transfer_labels(ref, names[rt], query, novelty_smoothing=0)
    assert np.mean(smoothed.labels[novel] == "unassigned") >= 0.95
    assert np.mean(per_cell.labels[novel] == "unassigned") <= 0.8
    assert np.mean(smoothed.labels[~novel] == "unassigned") <= 0.02
    assert smoothed.novelty_cutoff < per_cell.novelty_cutoff  # the averaged null is narrower
    with pytest.raises(ValueError, match="novelty_smoothing"):
        transfer_labels(ref, names[rt], query, novelty_smoothing=-1)


def test_vote_alone_cannot_reject_absent_type(data):
    """Without the distance check the unknown cluster is confidently given a reference label."""
    ref, ref_lab, query, query_lab = data
    res = transfer_labels(ref, ref_lab, query, novelty=False)
    assert np.isnan(res.novelty_cutoff) and np.all(np.isnan(res.novelty_ratio))
    np.testing.assert_array_equal(res.confidence, res.vote_fraction)
    assert np.mean(res.labels[query_lab == "t6"] == "unassigned") < 0.5


@pytest.mark.parametrize("weighting", ["distance", "uniform", "gaussian"])
def test_weightings_and_probabilities(data, weighting):
    ref, ref_lab, query, query_lab = data
    res = transfer_labels(ref, ref_lab, query, weighting=weighting, return_probabilities=True, k=15)
    probs = res.probabilities
    assert probs is not None and probs.shape == (query.shape[0], 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.max(axis=1), res.vote_fraction, rtol=1e-5)
    assert np.all(probs.columns[np.argmax(probs.to_numpy(), axis=1)] == res.predicted)
    second = np.sort(probs.to_numpy(), axis=1)[:, -2]
    np.testing.assert_allclose(res.second_fraction, second, atol=1e-6)
    assert np.all((res.confidence >= 0) & (res.confidence <= res.vote_fraction + 1e-7))
    shared = query_lab != "t6"
    assert np.mean(res.predicted[shared] == query_lab[shared]) >= 0.99


def test_ambiguous_cells_get_low_vote_fraction():
    rng = np.random.default_rng(1)
    ref = np.vstack([rng.normal(0, 1, (1000, 10)), rng.normal(0, 1, (1000, 10)) + np.r_[2.0, np.zeros(9)]]).astype(np.float32)
    lab = np.array(["a"] * 1000 + ["b"] * 1000, dtype=object)
    mid = (rng.normal(0, 0.3, (200, 10)) + np.r_[1.0, np.zeros(9)]).astype(np.float32)
    far_a = (rng.normal(0, 0.3, (200, 10)) - np.r_[1.5, np.zeros(9)]).astype(np.float32)
    # with two labels the winning share is >= 0.5, so a stricter threshold is needed to reject
    res_mid = transfer_labels(ref, lab, mid, novelty=False, threshold=0.7)
    res_a = transfer_labels(ref, lab, far_a, novelty=False, threshold=0.7)
    assert res_mid.vote_fraction.mean() < 0.75 < res_a.vote_fraction.mean()
    assert np.mean(res_mid.labels == "unassigned") > 0.3 > np.mean(res_a.labels == "unassigned")


def test_threshold_and_unassigned_name(data):
    ref, ref_lab, query, _ = data
    none_rejected = transfer_labels(ref, ref_lab, query, threshold=0.0, unassigned="?")
    assert not np.any(none_rejected.labels == "?")
    np.testing.assert_array_equal(none_rejected.labels, none_rejected.predicted)
    strict = transfer_labels(ref, ref_lab, query, threshold=1.0, unassigned="?")
    assert np.all((strict.labels == "?") == (strict.confidence < 1.0))
    with pytest.raises(ValueError):
        transfer_labels(ref, ref_lab, query, threshold=1.5)
    with pytest.raises(ValueError):
        transfer_labels(ref, ref_lab, query[:, :5])


def test_exact_duplicates_take_all_distance_weight(data):
    ref, ref_lab, _, _ = data
    query = ref[:50]
    res = transfer_labels(ref, ref_lab, query, novelty=False)
    np.testing.assert_array_equal(res.predicted, ref_lab[:50])
    assert np.all(res.vote_fraction == 1.0)


def test_knn_classifier_transfer_is_sklearn_default(data):
    ref, ref_lab, query, query_lab = data
    got = knn_classifier_transfer(ref, ref_lab, query)
    expected = KNeighborsClassifier().fit(ref, ref_lab).predict(query)
    np.testing.assert_array_equal(got, expected)
    shared = query_lab != "t6"
    assert np.mean(got[shared] == query_lab[shared]) >= 0.99
    assert not np.any(got == "t6")  # the reference method can only answer reference labels
