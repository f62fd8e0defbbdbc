"""Metrics against trusted references (scikit-learn, scipy, direct re-implementations)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from scipy.sparse.csgraph import connected_components
from scipy.stats import chi2
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score
from sklearn.metrics import silhouette_samples as sk_silhouette_samples
from sklearn.metrics import silhouette_score as sk_silhouette_score
from sklearn.neighbors import NearestNeighbors

from scalex_scale.metrics import (
    ari,
    batch_asw,
    batch_entropy_mixing_score,
    clisi,
    confusion_percent,
    evaluate,
    f1_scores,
    graph_connectivity,
    ilisi,
    isolated_labels,
    isolated_labels_asw,
    kbet,
    kbet_per_label,
    knn,
    knn_query,
    knn_recall,
    knn_ref_and_query,
    lisi,
    mixing_score_details,
    nmi,
    silhouette,
    silhouette_samples,
    similarity_matrix,
)
from scalex_scale.metrics.evaluate import EvaluateConfig


def make_latent(
    n: int, n_types: int = 6, n_batches: int = 3, *, seed: int = 0, batch_shift: float = 0.5, spread: float = 4.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered 10-d latent: cell types are Gaussian clusters, batches shift them a little."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, spread, (n_types, 10))
    shifts = rng.normal(0.0, batch_shift, (n_batches, 10))
    types = rng.integers(0, n_types, n)
    batches = rng.integers(0, n_batches, n)
    X = centers[types] + shifts[batches] + rng.normal(0.0, 1.0, (n, 10))
    return X.astype(np.float32), np.array([f"b{b}" for b in batches]), np.array([f"t{t}" for t in types])


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_latent(1200)


def exact_graph(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference kNN: scikit-learn brute force, self (first column) dropped."""
    d, i = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X).kneighbors(X)
    return i[:, 1:], d[:, 1:]


# ---------------------------------------------------------------------------------------------
# kNN
# ---------------------------------------------------------------------------------------------


def test_knn_exact_matches_brute_force(small):
    X, _, _ = small
    idx, dist = knn(X, 15, method="exact")
    ref_i, ref_d = exact_graph(X, 15)
    assert idx.dtype == np.int64 and dist.dtype == np.float32 and idx.shape == (X.shape[0], 15)
    assert not (idx == np.arange(X.shape[0])[:, None]).any()
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-5)
    assert knn_recall(idx, ref_i) > 0.999


def test_knn_drops_self_with_duplicates():
    X = np.zeros((6, 2), dtype=np.float32)
    X[3:] = 1.0
    idx, dist = knn(X, 2, method="exact")
    assert not (idx == np.arange(6)[:, None]).any()
    assert np.all(dist == 0)


@pytest.mark.slow  # pynndescent JIT-compiles its uncached kernels in every process (~20 s idle, more under load)
def test_knn_nndescent_recall():
    X, _, _ = make_latent(8000, n_types=12, seed=3)
    ref_i, _ = exact_graph(X, 30)
    idx, dist = knn(X, 30, method="nndescent", rng=0)
    recall = knn_recall(idx, ref_i)
    print(f"\nNN-descent recall@30 on 8000 x 10-d clustered latent: {recall:.4f}")
    assert recall >= 0.98
    assert not (idx == np.arange(X.shape[0])[:, None]).any()
    assert np.all(np.diff(dist, axis=1) >= -1e-6)

    q = make_latent(2000, n_types=12, seed=3)[0] + 0.01
    qi, _ = knn_query(X, q, 15, method="nndescent", rng=0)
    ei, _ = knn_query(X, q, 15, method="exact")
    q_recall = knn_recall(qi, ei)
    print(f"NN-descent query recall@15: {q_recall:.4f}")
    assert q_recall >= 0.98
    (ri, _), (qi2, _) = knn_ref_and_query(X, q, 15, method="nndescent", rng=0)
    assert knn_recall(ri, ref_i[:, :15]) >= 0.98 and knn_recall(qi2, ei) >= 0.98


def test_knn_ref_and_query_exact(small):
    X, _, _ = small
    ref, query = X[:800], X[800:]
    (ri, rd), (qi, qd) = knn_ref_and_query(ref, query, 10, method="exact")
    ei, ed = knn(ref, 10, method="exact")
    np.testing.assert_array_equal(ri, ei)
    np.testing.assert_allclose(rd, ed)
    qe, qde = knn_query(ref, query, 10, method="exact")
    np.testing.assert_array_equal(qi, qe)
    d, i = NearestNeighbors(n_neighbors=10).fit(ref).kneighbors(query)
    np.testing.assert_array_equal(qi, i)
    np.testing.assert_allclose(qd, d, rtol=1e-5)


def test_knn_recall_helper():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    b = np.array([[3, 2, 9], [6, 5, 4]])
    assert knn_recall(a, b) == pytest.approx(5 / 6)


# ---------------------------------------------------------------------------------------------
# Batch entropy mixing score: direct re-implementation of SCALEX 1.0.4 scalex/metrics.py
# ---------------------------------------------------------------------------------------------


def reference_mixing_score(data, batches, draw, n_neighbors=100, n_pools=100, n_samples_per_pool=100):
    """SCALEX 1.0.4 ``batch_entropy_mixing_score`` with its ``np.random.choice`` replaced by ``draw``."""

    def entropy(batches):
        p = np.zeros(N_batches)
        adapt_p = np.zeros(N_batches)
        a = 0
        for i in range(N_batches):
            p[i] = np.mean(batches == batches_[i])
            a = a + p[i] / P[i]
        entropy = 0
        for i in range(N_batches):
            adapt_p[i] = (p[i] / P[i]) / a
            entropy = entropy - adapt_p[i] * np.log(adapt_p[i] + 10**-8)
        return entropy

    n_neighbors = min(n_neighbors, len(data) - 1)
    nne = NearestNeighbors(n_neighbors=1 + n_neighbors)
    nne.fit(data)
    kmatrix = nne.kneighbors_graph(data) - scipy.sparse.identity(data.shape[0])
    score = 0
    batches_ = np.unique(batches)
    N_batches = len(batches_)
    P = np.zeros(N_batches)
    for i in range(N_batches):
        P[i] = np.mean(batches == batches_[i])
    for _ in range(n_pools):
        indices = draw(np.arange(data.shape[0]), n_samples_per_pool)
        score += np.mean(
            [
                entropy(batches[kmatrix[indices].nonzero()[1][kmatrix[indices].nonzero()[0] == i]])
                for i in range(n_samples_per_pool)
            ]
        )
    Score = score / float(n_pools)
    return Score / float(np.log2(N_batches))


@pytest.mark.parametrize("n_batches", [2, 4])
def test_mixing_score_matches_reference_generator(n_batches):
    X, b, _ = make_latent(900, n_batches=n_batches, seed=n_batches, batch_shift=1.5)
    gen = np.random.default_rng(11)
    expected = reference_mixing_score(X, b, lambda a, s: gen.choice(a, size=s), n_neighbors=50, n_pools=8)
    got = mixing_score_details(X, b, n_neighbors=50, n_pools=8, rng=np.random.default_rng(11))
    assert got.reference == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert got.normalized == pytest.approx(expected * np.log2(n_batches) / np.log(n_batches), rel=1e-12)
    assert 0.0 <= got.normalized <= 1.0 + 1e-9


def test_mixing_score_matches_reference_randomstate_defaults(small):
    """``RandomState(s)`` reproduces the reference run after ``np.random.seed(s)`` (default settings)."""
    X, b, _ = small
    rs = np.random.RandomState(5)
    expected = reference_mixing_score(X, b, lambda a, s: rs.choice(a, size=s), n_pools=5)
    got = batch_entropy_mixing_score(X, b, n_pools=5, rng=np.random.RandomState(5))
    assert got == pytest.approx(expected, rel=1e-12)


def test_mixing_score_bounds_and_precomputed_knn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 10)).astype(np.float32)
    b = rng.integers(0, 2, 2000)
    mixed = batch_entropy_mixing_score(X, b, rng=1)
    assert 0.6 < mixed <= np.log(2) + 1e-9  # reference scale: maximum ln 2 for any number of batches
    assert batch_entropy_mixing_score(X, b, rng=1, normalized=True) == pytest.approx(mixed / np.log(2) * np.log2(2))
    X_sep = X + 50.0 * b[:, None]
    assert batch_entropy_mixing_score(X_sep, b, rng=1) < 1e-6
    graph = knn(X, 100, method="exact")
    assert batch_entropy_mixing_score(X, b, rng=1, knn=graph) == pytest.approx(mixed, rel=1e-12)
    with pytest.raises(ValueError):
        batch_entropy_mixing_score(X, np.zeros(2000), rng=1)


# ---------------------------------------------------------------------------------------------
# Silhouette
# ---------------------------------------------------------------------------------------------


def test_silhouette_matches_sklearn(small):
    X, _, t = small
    X64 = X.astype(np.float64)
    assert silhouette(X64, t) == pytest.approx(sk_silhouette_score(X64, t), abs=1e-10)
    np.testing.assert_allclose(silhouette_samples(X64, t), sk_silhouette_samples(X64, t), atol=1e-10)
    assert silhouette(X, t, rescale=True) == pytest.approx((sk_silhouette_score(X64, t) + 1) / 2, abs=1e-6)


def test_silhouette_subsample_is_exact_on_the_subsample(small):
    X, _, t = small
    got = silhouette(X, t, sample_size=500, rng=3)
    idx = np.random.default_rng(3).permutation(X.shape[0])[:500]
    assert got == pytest.approx(sk_silhouette_score(X[idx].astype(np.float64), t[idx]), abs=1e-9)


def test_silhouette_singletons_and_errors():
    X = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [9.0, 0.0]])
    labels = np.array([0, 0, 1, 1, 2])
    np.testing.assert_allclose(silhouette_samples(X, labels), sk_silhouette_samples(X, labels), atol=1e-12)
    with pytest.raises(ValueError):
        silhouette(X, np.zeros(5))


# ---------------------------------------------------------------------------------------------
# LISI: straightforward numpy implementation of Harmony's compute_lisi / compute_simpson
# ---------------------------------------------------------------------------------------------


def harmony_simpson(distances, indices, labels, n_categories, perplexity, tol=1e-5):
    """Harmony (harmonypy ``compute_simpson``), transposed-array form, plain numpy."""
    n = distances.shape[1]
    simpson = np.zeros(n)
    logU = np.log(perplexity)
    for i in range(n):
        beta = 1
        betamin = -np.inf
        betamax = np.inf
        P = np.exp(-distances[:, i] * beta)
        P_sum = np.sum(P)
        if P_sum == 0:
            H = 0
            P = np.zeros(distances.shape[0])
        else:
            H = np.log(P_sum) + beta * np.sum(distances[:, i] * P) / P_sum
            P = P / P_sum
        Hdiff = H - logU
        for _ in range(50):
            if abs(Hdiff) < tol:
                break
            if Hdiff > 0:
                betamin = beta
                beta = beta * 2 if not np.isfinite(betamax) else (beta + betamax) / 2
            else:
                betamax = beta
                beta = beta / 2 if not np.isfinite(betamin) else (beta + betamin) / 2
            P = np.exp(-distances[:, i] * beta)
            P_sum = np.sum(P)
            if P_sum == 0:
                H = 0
                P = np.zeros(distances.shape[0])
            else:
                H = np.log(P_sum) + beta * np.sum(distances[:, i] * P) / P_sum
                P = P / P_sum
            Hdiff = H - logU
        if H == 0:
            simpson[i] = -1
        for c in range(n_categories):
            q = labels[indices[:, i]] == c
            if np.any(q):
                simpson[i] += np.sum(P[q]) ** 2
    return simpson


def test_lisi_matches_harmony_formula(small):
    X, b, t = small
    # Harmony: 90 neighbours (perplexity * 3) including the cell, first column dropped
    d, i = NearestNeighbors(n_neighbors=90).fit(X).kneighbors(X)
    d, i = d[:, 1:].astype(np.float32).astype(np.float64), i[:, 1:]
    for labels in (b, t):
        codes = pd.Categorical(labels).codes
        expected = 1.0 / harmony_simpson(d.T, i.T, codes, codes.max() + 1, 30)
        got = lisi(X, labels)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    lisi_b = 1.0 / harmony_simpson(d.T, i.T, pd.Categorical(b).codes, 3, 30)
    assert ilisi(X, b, scale=False) == pytest.approx(np.median(lisi_b), rel=1e-6)
    assert ilisi(X, b) == pytest.approx((np.median(lisi_b) - 1) / 2, rel=1e-6)
    lisi_t = 1.0 / harmony_simpson(d.T, i.T, pd.Categorical(t).codes, 6, 30)
    assert clisi(X, t, scale=False) == pytest.approx(np.median(lisi_t), rel=1e-6)
    assert clisi(X, t) == pytest.approx((6 - np.median(lisi_t)) / 5, rel=1e-6)


def test_scoring_a_subset_of_cells_is_exact_per_cell(small):
    """cells / sample_size: exact neighbourhoods in all cells, only some cells scored."""
    X, b, t = small
    full_lisi = lisi(X, b)
    full_kbet = kbet(X, b)
    cells = np.sort(np.random.default_rng(0).choice(X.shape[0], 300, replace=False))
    np.testing.assert_allclose(lisi(X, b, cells=cells), full_lisi[cells], rtol=1e-12)
    sub = kbet(X, b, cells=cells)
    np.testing.assert_allclose(sub.statistics, full_kbet.statistics[cells], rtol=1e-12)
    # sample_size draws the cells from rng
    drawn = np.sort(np.random.default_rng(5).choice(X.shape[0], 400, replace=False))
    np.testing.assert_allclose(lisi(X, t, sample_size=400, rng=5), lisi(X, t)[drawn], rtol=1e-12)
    # a precomputed graph of the scored cells only
    graph = knn(X, 89, method="exact")
    np.testing.assert_allclose(
        lisi(None, b, knn=(graph[0][cells], graph[1][cells]), cells=cells), full_lisi[cells], rtol=1e-12
    )
    assert ilisi(X, b, cells=cells, scale=False) == pytest.approx(np.median(full_lisi[cells]))


def test_evaluate_tiny_and_single_batch():
    X, b, t = make_latent(60, n_types=3, n_batches=1, seed=4)
    res = evaluate(X, b, t, config=EvaluateConfig(mixing_pools=3), rng=0)
    for key in ("batch_entropy_mixing", "kbet", "kbet_per_label", "batch_asw"):
        assert np.isnan(res.scores[key])
    assert np.isfinite(res.scores["clisi"]) and np.isfinite(res.scores["graph_connectivity"])


def test_evaluate_with_sampled_neighbourhoods(small):
    X, b, t = small
    full = evaluate(X, b, t, config=EvaluateConfig(metrics=("ilisi", "kbet", "kbet_per_label", "graph_connectivity")), rng=0)
    cfg = EvaluateConfig(metrics=("ilisi", "kbet", "kbet_per_label", "graph_connectivity"), neighborhood_sample_size=600)
    sampled = evaluate(X, b, t, config=cfg, rng=0)
    assert "knn_connectivity" in sampled.seconds and "knn_connectivity" not in full.seconds
    assert sampled.scores["graph_connectivity"] == pytest.approx(full.scores["graph_connectivity"])
    for key in ("ilisi", "kbet", "kbet_per_label"):
        assert abs(sampled.scores[key] - full.scores[key]) < 0.05, key


def test_lisi_precomputed_graph_and_range(small):
    X, b, _ = small
    graph = knn(X, 120, method="exact")
    np.testing.assert_allclose(lisi(None, b, knn=graph), lisi(X, b), rtol=1e-12)
    per_cell = lisi(X, b, perplexity=10)
    assert np.all(per_cell >= 1 - 1e-9) and np.all(per_cell <= 3 + 1e-9)
    with pytest.raises(ValueError):
        lisi(None, b, knn=knn(X, 20, method="exact"))


# ---------------------------------------------------------------------------------------------
# kBET: direct scipy chi-square implementation
# ---------------------------------------------------------------------------------------------


def test_kbet_matches_scipy_chi2(small):
    X, b, _ = small
    codes = pd.Categorical(b).codes
    k = 30
    i, _ = exact_graph(X, k - 1)
    freq = np.bincount(codes) / codes.size
    stats, pvals = [], []
    for r in range(X.shape[0]):
        hood = np.concatenate([[codes[r]], codes[i[r]]])
        obs = np.bincount(hood, minlength=3)
        exp = freq * k
        stat = np.sum((obs - exp) ** 2 / exp)
        stats.append(stat)
        pvals.append(1 - chi2.cdf(stat, 2))
    res = kbet(X, b, n_neighbors=k)
    np.testing.assert_allclose(res.statistics, stats, rtol=1e-10)
    np.testing.assert_allclose(res.p_values, pvals, rtol=1e-7, atol=1e-12)
    assert res.acceptance_rate == pytest.approx(np.mean(np.asarray(pvals) >= 0.05))


def reference_kbet_per_label(X, batches, labels, alpha=0.05):
    """scib rule per label: k0 from batch sizes, self + k0-1 same-label neighbours, local frequencies."""
    scores = []
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        bl = pd.Categorical(batches[rows]).codes
        nb = bl.max() + 1
        if rows.size < 10 or nb < 2:
            continue
        k0 = int(min(70, max(10, np.floor(np.bincount(bl).mean() / 4))))
        _, idx = NearestNeighbors(n_neighbors=k0).fit(X[rows]).kneighbors(X[rows])  # includes self
        freq = np.bincount(bl) / rows.size
        exp = freq * k0
        accept = 0
        for r in range(rows.size):
            obs = np.bincount(bl[idx[r]], minlength=nb)
            p = chi2.sf(np.sum((obs - exp) ** 2 / exp), nb - 1)
            accept += p >= alpha
        scores.append(accept / rows.size)
    return float(np.mean(scores))


def test_kbet_per_label_matches_reference(small):
    X, b, t = small
    expected = reference_kbet_per_label(X, b, t)
    assert kbet_per_label(X, b, t) == pytest.approx(expected, abs=1e-12)
    # same-label neighbours from an exact global graph give the same answer
    graph = knn(X, 89, method="exact")
    score, df = kbet_per_label(X, b, t, knn=graph, return_per_label=True)
    assert score == pytest.approx(expected, abs=1e-12)
    assert list(df.columns) == ["label", "n_cells", "n_tested", "k0", "kBET"]
    # testing a subset of cells: same rule, acceptance over the tested cells only
    cells = np.sort(np.random.default_rng(2).choice(X.shape[0], 500, replace=False))
    sub_graph = (graph[0][cells], graph[1][cells])
    via_graph = kbet_per_label(X, b, t, knn=sub_graph, cells=cells, return_per_label=True)[1]
    via_tree = kbet_per_label(X, b, t, cells=cells, return_per_label=True)[1]
    pd.testing.assert_frame_equal(via_graph, via_tree)
    assert (via_graph["n_tested"] < via_graph["n_cells"]).all()
    capped = kbet_per_label(X, b, t, max_cells_per_label=50, rng=0, return_per_label=True)[1]
    assert (capped["n_tested"] == 50).all()
    # a label in a single batch is skipped (NaN)
    t2 = t.astype(object)
    t2[b == "b0"] = "only_b0"
    _, df2 = kbet_per_label(X, b, t2, return_per_label=True)
    assert np.isnan(df2.set_index("label").loc["only_b0", "kBET"])


def test_kbet_detects_unmixed_batches():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1500, 10)).astype(np.float32)
    b = rng.integers(0, 2, 1500)
    assert kbet(X, b).acceptance_rate > 0.8
    assert kbet(X + 20.0 * b[:, None], b).acceptance_rate == 0.0


# ---------------------------------------------------------------------------------------------
# Graph connectivity: scipy.sparse.csgraph on the label-restricted kNN graph
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connection", ["strong", "weak"])
def test_graph_connectivity_matches_csgraph(connection):
    X, _, t = make_latent(900, n_types=4, seed=7, spread=2.0)
    G = NearestNeighbors(n_neighbors=15).fit(X).kneighbors_graph(X, mode="distance")  # self + 14
    fractions = []
    for lab in np.unique(t):
        mask = t == lab
        sub = G[mask][:, mask]
        _, comp = connected_components(sub, connection=connection)
        fractions.append(np.bincount(comp).max() / mask.sum())
    got = graph_connectivity(X, t, connection=connection)
    assert got == pytest.approx(np.mean(fractions), abs=1e-12)
    sparse = graph_connectivity(X, t, n_neighbors=3, connection=connection)
    assert 0 < sparse <= got + 1e-12


# ---------------------------------------------------------------------------------------------
# ASW-based scib metrics vs scikit-learn silhouette_samples
# ---------------------------------------------------------------------------------------------


def test_batch_asw_matches_sklearn(small):
    X, b, t = small
    per = []
    for lab in np.unique(t):
        m = t == lab
        s = sk_silhouette_samples(X[m].astype(np.float64), b[m])
        per.append(np.mean(1 - np.abs(s)))
    assert batch_asw(X, b, t) == pytest.approx(np.mean(per), abs=1e-6)
    raw = batch_asw(X, b, t, rescale=False)
    assert raw == pytest.approx(1 - np.mean(per), abs=1e-6)
    capped = batch_asw(X, b, t, max_cells_per_label=120, rng=0)
    assert abs(capped - np.mean(per)) < 0.05


def test_isolated_labels_asw_matches_sklearn(small):
    X, b, t = small
    t = t.copy()
    t[(t == "t0") & (b != "b1")] = "t1"  # t0 now only in batch b1 -> the isolated label
    assert list(isolated_labels(t, b)) == ["t0"]
    s_all = sk_silhouette_samples(X.astype(np.float64), t)
    expected = np.mean((s_all[t == "t0"] + 1) / 2)
    assert isolated_labels_asw(X, t, b) == pytest.approx(expected, abs=1e-6)
    assert isolated_labels_asw(X, t, b, rescale=False) == pytest.approx(np.mean(s_all[t == "t0"]), abs=1e-6)
    capped = isolated_labels_asw(X, t, b, max_cells_per_label=100, rng=0)
    assert abs(capped - expected) < 0.05


# ---------------------------------------------------------------------------------------------
# Annotation metrics, confusion, similarity
# ---------------------------------------------------------------------------------------------


def test_annotation_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    true = rng.choice(["a", "b", "c"], 300).astype(object)
    pred = true.copy()
    flip = rng.random(300) < 0.2
    pred[flip] = rng.choice(["a", "b", "unassigned"], flip.sum())
    assert ari(true, pred) == pytest.approx(adjusted_rand_score(true, pred))
    assert nmi(true, pred) == pytest.approx(normalized_mutual_info_score(true, pred))
    f1 = f1_scores(true, pred)
    labs = ["a", "b", "c"]
    assert f1["f1_macro"] == pytest.approx(f1_score(true, pred, labels=labs, average="macro"))
    assert f1["f1_weighted"] == pytest.approx(f1_score(true, pred, labels=labs, average="weighted"))
    cm = confusion_percent(true, pred)
    np.testing.assert_allclose(cm.sum(axis=1), 100.0)
    assert list(cm.index) == labs and "unassigned" in cm.columns
    a_rows = true == "a"
    assert cm.loc["a", "b"] == pytest.approx(100 * np.mean(pred[a_rows] == "b"))


def test_similarity_matrix_matches_corrcoef(small):
    X, b, t = small
    sim = similarity_matrix(X, t, b, "b0", "b1")
    ma = np.stack([X[(b == "b0") & (t == c)].astype(np.float64).mean(0) for c in sim.index])
    mb = np.stack([X[(b == "b1") & (t == c)].astype(np.float64).mean(0) for c in sim.columns])
    expected = np.corrcoef(np.vstack([ma, mb]))[: len(ma), len(ma) :]
    np.testing.assert_allclose(sim.to_numpy(), expected, atol=1e-10)
    assert np.all(np.diag(sim.to_numpy()) > 0.9)  # same type across batches correlates


def test_evaluate_smoke(small):
    X, b, t = small
    cfg = EvaluateConfig(mixing_pools=10, silhouette_sample_size=800, asw_max_cells_per_label=150)
    res = evaluate(X, b, t, config=cfg, rng=0)
    expected = {
        "batch_entropy_mixing",
        "batch_entropy_mixing_normalized",
        "silhouette",
        "ilisi",
        "ilisi_raw",
        "clisi",
        "clisi_raw",
        "kbet",
        "kbet_per_label",
        "graph_connectivity",
        "isolated_labels_asw",
        "batch_asw",
    }
    assert set(res.scores) == expected
    assert all(np.isfinite(v) for v in res.scores.values())
    assert "knn" in res.seconds
    # the shared graph gives the same LISI as a direct call
    assert res.scores["ilisi"] == pytest.approx(ilisi(X, b), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Optional: scib-metrics itself (jax), when installed
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # jax import + JIT: ~45 s
def test_against_scib_metrics(small):
    scib_metrics = pytest.importorskip("scib_metrics")
    from scib_metrics.nearest_neighbors import NeighborsResults

    X, b, t = small
    d, i = NearestNeighbors(n_neighbors=90).fit(X).kneighbors(X)  # self-including, as scib-metrics
    nr = NeighborsResults(indices=i, distances=d)
    assert ilisi(X, b) == pytest.approx(float(scib_metrics.ilisi_knn(nr, b)), rel=1e-4)
    assert clisi(X, t) == pytest.approx(float(scib_metrics.clisi_knn(nr, t)), rel=1e-4)
    acc, _, _ = scib_metrics.kbet(nr.subset_neighbors(50), b)
    assert kbet(X, b, n_neighbors=50).acceptance_rate == pytest.approx(float(acc), abs=1e-9)
    assert graph_connectivity(X, t) == pytest.approx(float(scib_metrics.graph_connectivity(nr.subset_neighbors(15), t)))
    assert batch_asw(X, b, t) == pytest.approx(float(scib_metrics.silhouette_batch(X, t, b)), abs=1e-5)
    assert silhouette(X, t, rescale=True) == pytest.approx(float(scib_metrics.silhouette_label(X, t)), abs=1e-5)
    t2 = t.copy()
    t2[(t2 == "t0") & (b != "b1")] = "t1"
    assert isolated_labels_asw(X, t2, b) == pytest.approx(float(scib_metrics.isolated_labels(X, t2, b)), abs=1e-5)
