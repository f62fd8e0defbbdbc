"""Unit tests of the preprocessing numba kernels, accumulators and selection helpers against numpy/scipy/sklearn."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.preprocessing import MaxAbsScaler

from scalex_scale.preprocessing import kernels as K
from scalex_scale.preprocessing.hvg import nth_highest, select_variable_peaks, seurat_dispersions_single_batch
from scalex_scale.preprocessing.state import GLOBAL_MAXABS_KEY, PreprocessConfig, PreprocessState, qc_feature_mask
from scalex_scale.preprocessing.stats import (
    CellFilterStats,
    GeneMomentStats,
    MaxAbsStats,
    PeakTotalStats,
    dd_add,
    dd_value,
    fold,
    merge,
    tree_merge,
)
from scalex_scale.preprocessing.transform import atac_values_from_totals, maxabs_to_factors


def random_csr(
    n_rows: int = 57, n_cols: int = 23, *, seed: int = 0, density: float = 0.3, shuffle: bool = True
) -> sp.csr_matrix:
    """Random float32 CSR with empty rows, stored zeros, non-integer values and (optionally) unsorted indices."""
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_rows, n_cols)) < density) * rng.gamma(1.0, 3.0, (n_rows, n_cols))
    dense[rng.integers(0, n_rows, 3)] = 0.0  # empty rows
    x = sp.csr_matrix(dense.astype(np.float32))
    x.data[rng.random(x.nnz) < 0.1] = 0.0  # explicit zeros
    if shuffle:
        for r in range(n_rows):
            a, b = x.indptr[r], x.indptr[r + 1]
            p = rng.permutation(b - a)
            x.indices[a:b] = x.indices[a:b][p]
            x.data[a:b] = x.data[a:b][p]
        x.has_sorted_indices = False
    return x


def dense(x: sp.csr_matrix) -> np.ndarray:
    return x.toarray()


# ------------------------------------------------------------------------------------------------- validation


def test_csr_parts_casts_and_validates():
    x = random_csr()
    x.indptr = x.indptr.astype(np.int32)
    indptr, indices, data, n_rows, n_cols = K.csr_parts(x)
    assert (indptr.dtype, indices.dtype, data.dtype) == (np.int64, np.int32, np.float32)
    assert (n_rows, n_cols) == x.shape
    with pytest.raises(TypeError, match="CSR"):
        K.csr_parts(x.tocsc())
    bad = x.copy()
    bad.indices[0] = 99
    with pytest.raises(ValueError, match="out of range"):
        K.csr_parts(bad)
    np.testing.assert_array_equal(K.count_positive_per_row(x[5:20]), (dense(x)[5:20] > 0).sum(1))
    # a CSR-like view whose indptr does not start at 0 (rows 5..19 of x, sharing its arrays)
    view = SimpleNamespace(format="csr", shape=(15, x.shape[1]), indptr=x.indptr[5:21], indices=x.indices, data=x.data)
    np.testing.assert_array_equal(K.count_positive_per_row(view), (dense(x)[5:20] > 0).sum(1))
    np.testing.assert_array_equal(K.row_sums(view), K.row_sums(x)[5:20])


def test_group_codes_are_checked():
    x = random_csr()
    out = np.zeros((2, x.shape[1]), dtype=np.float32)
    with pytest.raises(ValueError, match="group codes"):
        K.accumulate_batch_max(x, np.full(x.shape[0], 2), out)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        K.accumulate_batch_max(x, np.zeros(x.shape[0]), out.astype(np.float64))


# ------------------------------------------------------------------------------------------------- counts


def test_count_positive_per_row_matches_numpy():
    x = random_csr(seed=1)
    mask = np.random.default_rng(1).random(x.shape[1]) < 0.6
    np.testing.assert_array_equal(K.count_positive_per_row(x, mask), (dense(x)[:, mask] > 0).sum(1))
    np.testing.assert_array_equal(K.count_positive_per_row(x), (dense(x) > 0).sum(1))


def test_count_positive_per_column_accumulates():
    x = random_csr(seed=2)
    rows = np.random.default_rng(2).random(x.shape[0]) < 0.5
    out = K.count_positive_per_column(x, rows)
    np.testing.assert_array_equal(out, (dense(x)[rows] > 0).sum(0))
    K.count_positive_per_column(x, None, out=out)
    np.testing.assert_array_equal(out, (dense(x)[rows] > 0).sum(0) + (dense(x) > 0).sum(0))


# ------------------------------------------------------------------------------------------------- selection, sums


def test_select_rows_and_columns_matches_scipy_and_keeps_entry_order():
    x = random_csr(seed=3)
    rng = np.random.default_rng(3)
    rows = rng.random(x.shape[0]) < 0.7
    cols = np.flatnonzero(rng.random(x.shape[1]) < 0.5)
    cmap = np.full(x.shape[1], -1, dtype=np.int64)
    cmap[cols] = np.arange(cols.size)
    ip, ix, dt = K.select_rows_and_columns(x, rows, cmap)
    y = sp.csr_matrix((dt, ix, ip), shape=(rows.sum(), cols.size))
    np.testing.assert_array_equal(y.toarray(), dense(x)[rows][:, cols])
    # entries keep their within-row order (the row sums below depend on it)
    r0 = np.flatnonzero(rows)[0]
    orig = [(c, v) for c, v in zip(x.indices[x.indptr[r0] : x.indptr[r0 + 1]], x.data[x.indptr[r0] : x.indptr[r0 + 1]])
            if cmap[c] >= 0]  # fmt: skip
    assert [(cols[c], v) for c, v in zip(ix[ip[0] : ip[1]], dt[ip[0] : ip[1]])] == orig


def test_row_sums_float64_in_storage_order():
    x = random_csr(seed=4)
    expected = np.array(
        [sum(np.float64(v) for v in x.data[x.indptr[r] : x.indptr[r + 1]]) for r in range(x.shape[0])]
    )
    np.testing.assert_array_equal(K.row_sums(x), expected)  # bit-exact: same order, same precision


# ------------------------------------------------------------------------------------------------- batch accumulators


def _moments(x: sp.csr_matrix, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, ...]:
    shape = (n_groups, x.shape[1])
    acc = [np.zeros(shape) for _ in range(4)]
    K.accumulate_batch_moments(x, codes, *acc)
    return tuple(acc)


def test_accumulate_batch_moments_are_exact_sums():
    x = random_csr(80, 11, seed=5, density=0.6)
    codes = np.random.default_rng(5).integers(0, 3, x.shape[0])
    s_hi, s_lo, q_hi, q_lo = _moments(x, codes, 3)
    d = dense(x)
    for b in range(3):
        for c in range(x.shape[1]):
            col = d[codes == b, c].astype(np.float32)
            assert dd_value(s_hi[b, c], s_lo[b, c]) == math.fsum(np.float64(v) for v in col)
            # squares are rounded to float32 first (scanpy's numba kernel squares float32 values)
            assert dd_value(q_hi[b, c], q_lo[b, c]) == math.fsum(np.float64(np.float32(v * v)) for v in col)


def test_batch_moments_do_not_depend_on_chunking_or_merge_order():
    rng = np.random.default_rng(6)
    # wide dynamic range to make naive float64 sums order-dependent
    x = random_csr(500, 7, seed=6, density=0.8)
    x.data *= np.float32(10.0) ** rng.integers(-3, 5, x.nnz).astype(np.float32)
    codes = rng.integers(0, 2, x.shape[0])
    whole = _moments(x, codes, 2)
    parts = []
    for start in range(0, x.shape[0], 37):
        parts.append(_moments(x[start : start + 37], codes[start : start + 37], 2))

    def add(u: tuple[np.ndarray, ...], v: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return (*dd_add(u[0], u[1], v[0], v[1]), *dd_add(u[2], u[3], v[2], v[3]))

    forward = parts[0]
    for p in parts[1:]:
        forward = add(forward, p)
    backward = parts[-1]
    for p in parts[-2::-1]:
        backward = add(p, backward)
    for other in (forward, backward):
        np.testing.assert_array_equal(dd_value(whole[0], whole[1]), dd_value(other[0], other[1]))
        np.testing.assert_array_equal(dd_value(whole[2], whole[3]), dd_value(other[2], other[3]))
    # the naive float64 sum of the same values does depend on the order (so the test has teeth)
    d = dense(x).astype(np.float64)
    naive_fwd = np.zeros(x.shape[1])
    naive_bwd = np.zeros(x.shape[1])
    for row in d[codes == 0]:
        naive_fwd += row
    for row in d[codes == 0][::-1]:
        naive_bwd += row
    assert np.any(naive_fwd != naive_bwd)


def test_accumulate_batch_positive_and_max():
    x = random_csr(seed=7)
    x.data[::5] *= -1  # negative values: counted neither as positive; max uses |x|
    codes = np.random.default_rng(7).integers(0, 4, x.shape[0])
    pos = np.zeros((4, x.shape[1]), dtype=np.int64)
    mx = np.zeros((4, x.shape[1]), dtype=np.float32)
    K.accumulate_batch_positive(x, codes, pos)
    K.accumulate_batch_max(x, codes, mx)
    d = dense(x)
    for b in range(4):
        np.testing.assert_array_equal(pos[b], (d[codes == b] > 0).sum(0))
        np.testing.assert_array_equal(mx[b], np.abs(d[codes == b]).max(0, initial=0))


def test_accumulate_batch_min_total():
    x = random_csr(seed=8)
    codes = np.random.default_rng(8).integers(0, 3, x.shape[0])
    totals = (dense(x) > 0).sum(1)
    out = np.full((3, x.shape[1]), K.INT64_SENTINEL, dtype=np.int64)
    K.accumulate_batch_min_total(x, codes, totals, out)
    d = dense(x)
    for b in range(3):
        for c in range(x.shape[1]):
            t = totals[(codes == b) & (d[:, c] > 0)]
            assert out[b, c] == (t.min() if t.size else K.INT64_SENTINEL)


def test_scale_by_group_matches_sklearn_maxabs():
    x = random_csr(seed=9)
    codes = np.random.default_rng(9).integers(0, 2, x.shape[0])
    mx = np.zeros((2, x.shape[1]), dtype=np.float32)
    K.accumulate_batch_max(x, codes, mx)
    factors = np.stack([maxabs_to_factors(m) for m in mx])
    out = K.scale_by_group(x, codes, factors)
    for b in range(2):
        rows = np.flatnonzero(codes == b)
        ref = MaxAbsScaler().fit_transform(x[rows])
        got = sp.csr_matrix((out, x.indices, x.indptr), shape=x.shape)[rows]
        assert ref.dtype == np.float32
        np.testing.assert_array_equal(got.toarray(), ref.toarray())  # bit-exact


def test_maxabs_to_factors_handles_near_constant_like_sklearn():
    m = np.array([0.0, 1e-7, 2.0, 3.5], dtype=np.float32)
    sk = MaxAbsScaler().fit(sp.csr_matrix(np.diag(m).astype(np.float32)))
    np.testing.assert_array_equal(maxabs_to_factors(m), np.float32(1.0) / sk.scale_)


# ------------------------------------------------------------------------------------------------- accumulators


def test_cell_filter_stats_merge_and_tree():
    parts = [CellFilterStats(np.arange(5) * i, np.array([i, 1]), np.array([1, i])) for i in range(5)]
    t = tree_merge(parts)
    np.testing.assert_array_equal(t.n_cells_per_feature, np.arange(5) * 10)
    np.testing.assert_array_equal(t.n_cells, [10, 5])
    np.testing.assert_array_equal(fold(parts).n_cells_kept, t.n_cells_kept)
    with pytest.raises(TypeError):
        merge(parts[0], MaxAbsStats.empty(1, 1))


def test_gene_moment_stats_merge_is_order_free_and_pure():
    rng = np.random.default_rng(10)
    parts = []
    for i in range(7):
        s = GeneMomentStats.empty(2, 5)
        x = random_csr(20, 5, seed=20 + i, density=0.7)
        x.data *= np.float32(10.0) ** rng.integers(-3, 5, x.nnz).astype(np.float32)
        codes = rng.integers(0, 2, 20)
        K.accumulate_batch_moments(x, codes, s.sum_hi, s.sum_lo, s.sumsq_hi, s.sumsq_lo)
        K.accumulate_batch_max(x, codes, s.max_log1p)
        s.n_cells[:] += np.bincount(codes, minlength=2)
        parts.append(s)
    before = parts[0].sum_hi.copy()
    a, b = tree_merge(parts), fold(parts[::-1])
    np.testing.assert_array_equal(parts[0].sum_hi, before)
    for u, v in zip(a.sums(), b.sums(), strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.max_log1p, b.max_log1p)
    mean, var = a.mean_var(0)
    n = a.n_cells[0]
    s, q = a.sums()
    np.testing.assert_array_equal(mean, s[0] / n)
    np.testing.assert_array_equal(var, (q[0] / n - (s[0] / n) ** 2) * (n / (n - 1)))


def test_peak_total_stats_median_matches_numpy():
    rng = np.random.default_rng(11)
    for n in (1, 2, 7, 10):
        totals = rng.integers(0, 6, n)
        s = PeakTotalStats.empty(1, 5)
        s.total_hist[:] += np.bincount(totals, minlength=6)
        assert s.median_total() == np.median(totals)
    a, b = PeakTotalStats.empty(2, 3), PeakTotalStats.empty(2, 3)
    a.min_total[0, 0], b.min_total[0, 0], b.min_total[1, 2] = 4, 2, 7
    np.testing.assert_array_equal(merge(a, b).min_total[:, [0, 2]], [[2, K.INT64_SENTINEL], [K.INT64_SENTINEL, 7]])


def test_atac_values_match_scanpy_normalize_total_arithmetic():
    totals = np.array([0, 1, 3, 7, 100, 2999])
    median = 41.5
    v = atac_values_from_totals(totals, median)
    counts = totals.astype(np.float32) / median  # numpy 2: the Python float is cast to float32
    counts = counts + (counts == 0)
    np.testing.assert_array_equal(v, np.float32(1.0) / counts)
    assert v.dtype == np.float32
    assert np.all(np.diff(v[1:]) <= 0)  # non-increasing in the total: MaxAbs is the value at the smallest total


# ------------------------------------------------------------------------------------------------- selection helpers


def test_nth_highest_matches_scanpy():
    hvg = pytest.importorskip("scanpy.preprocessing._highly_variable_genes")
    x = np.array([0.3, np.nan, 2.0, -1.0, 2.0, 0.5])
    for n in (1, 2, 3, 5):
        assert nth_highest(x.copy(), n) == hvg._nth_highest(x.copy(), n)
    assert nth_highest(np.array([np.nan]), 1) == np.inf


def test_seurat_single_batch_single_gene_bins_and_unexpressed():
    rng = np.random.default_rng(12)
    mean = rng.gamma(1.0, 1.0, 30)
    mean[0] = 500.0  # alone in the top bin -> normalized dispersion 1 rule
    var = mean * rng.gamma(2.0, 1.0, 30)
    expressed = np.ones(30, dtype=bool)
    expressed[[3, 4]] = False
    names = pd.Index([f"g{i}" for i in range(30)])
    df = seurat_dispersions_single_batch(mean, var, expressed, names, n_top=5)
    assert list(df.index) == list(names)
    assert df.loc["g0", "dispersions_norm"] == 1.0
    assert (df.loc[["g3", "g4"]].drop(columns="highly_variable").to_numpy() == 0).all()
    assert not df.loc[["g3", "g4"], "highly_variable"].any()
    assert df["highly_variable"].sum() == 5


def test_select_variable_peaks_is_binary_variance_ranking():
    counts = np.array([5, 50, 10, 95, 60, 40, 50, 0, 1])
    n = 100
    sel = select_variable_peaks(counts, n, 4)
    # episcanpy's score 1 - |p - 0.5| (max at p = 0.5); ties (50, 50 / 40, 60) by input order
    score = 1 - np.abs(counts / n - 0.5)
    assert set(sel) == set(np.argsort(-score, kind="stable")[:4])
    np.testing.assert_array_equal(sel, [1, 4, 5, 6])
    assert select_variable_peaks(counts, n, 100).size == counts.size


# ------------------------------------------------------------------------------------------------- state


def _state(**kw) -> PreprocessState:
    base = dict(
        profile="RNA", n_vars=6, features=["b", "e"], feature_index=[1, 4], dropped_index=[0],
        genes_kept_index=[1, 2, 4], min_features=1, min_cells=1, n_top_features=2, target_sum=1e4,
        scale="batch", keep_mt=False, n_bins=20, batches=["x", "y"],
        maxabs={"x": [np.float32(1.2345678), np.float32(0.1)]}, n_cells_kept=3,
    )  # fmt: skip
    base.update(kw)
    return PreprocessState(**base)


def test_state_json_round_trip_exact():
    s = _state()
    t = PreprocessState.from_json(s.to_json())
    assert t == s
    d = json.loads(s.to_json())
    assert d["format_version"] == 1 and s.format_version == 1
    m = t.maxabs_matrix()
    assert m.dtype == np.float32 and m[0, 0] == np.float32(1.2345678) and (m[1] == 0).all()
    np.testing.assert_array_equal(t.qc_mask, [False, True, True, True, True, True])


def test_state_rejects_unknown_version_and_inconsistency():
    d = json.loads(_state().to_json())
    d["format_version"] = 7
    with pytest.raises(ValueError, match="format_version 7"):
        PreprocessState.from_dict(d)
    with pytest.raises(ValueError, match="maxabs"):
        _state(maxabs={"x": [1.0]})
    with pytest.raises(ValueError, match="increasing"):
        _state(feature_index=[4, 1])
    g = _state(scale="global", maxabs={GLOBAL_MAXABS_KEY: [1.0, 2.0]})
    assert g.maxabs_matrix().shape == (1, 2)


def test_config_and_qc_mask():
    assert PreprocessConfig().n_top == 2000 and PreprocessConfig(profile="ATAC").n_top == 30000
    with pytest.raises(ValueError):
        PreprocessConfig(scale="none")  # type: ignore[arg-type]
    names = ["ERCC1", "MT-CO1", "mt-Nd1", "Mt1", "GAPDH", "ercc2"]
    np.testing.assert_array_equal(qc_feature_mask(names), [False, False, False, True, True, True])
    assert qc_feature_mask(names, keep_mt=True).all() and qc_feature_mask(names, "ATAC").all()
