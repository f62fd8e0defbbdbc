"""The streaming preprocessing reproduces the SCALEX reference pipeline run with scanpy 1.11.5 + scikit-learn.

Reference (scalex 1.0.4 ``preprocessing_rna`` with the paper's per-batch scaling)::

    adata = adata[:, names not starting with ERCC / MT- / mt-]
    sc.pp.filter_cells(adata, min_genes=min_features); sc.pp.filter_genes(adata, min_cells=3)
    sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, batch_key="batch")   # flavor "seurat"
    adata = adata[:, adata.var.highly_variable]; MaxAbsScaler per batch

Every case runs the chunked pipeline with chunk sizes 97, 1000 and all rows and checks the kept cells, kept genes,
selected genes, the HVG statistics and the scaled values, and that nothing depends on the chunk size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.preprocessing import MaxAbsScaler

from scalex_scale.preprocessing import (
    PreprocessConfig,
    PreprocessState,
    gene_moments_chunk,
    preprocess_chunks,
    transform_chunk,
    tree_merge,
)
from scalex_scale.preprocessing.state import GLOBAL_MAXABS_KEY, FilterPlan
from scalex_scale.preprocessing.transform import cell_filter_chunk

sc = pytest.importorskip("scanpy")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "baron": "baron_pancreas_human_mouse_toy_cider.h5ad",
    "cellbench": "cellbench_lung_celllines.h5ad",
    "kang": "kang_pbmc_ifnb_harmony_rawcounts_unlabelled.h5ad",
}
CHUNK_SIZES = (97, 1000, None)
DROP = ("ERCC", "MT-", "mt-")


# ------------------------------------------------------------------------------------------------- data


def synthetic_adata(seed: int = 0) -> ad.AnnData:
    """NB counts, 3 batches with batch effects and batch-specific unexpressed genes, MT-/ERCC genes, and a 4th
    batch whose cells all fail the cell filter; batch categories deliberately not in alphabetical order."""
    rng = np.random.default_rng(seed)
    n_genes, sizes = 3000, (260, 180, 240)
    base = np.exp(rng.normal(-1.5, 1.6, n_genes))
    base[:20] *= 30  # MT- genes, highly expressed
    blocks = []
    for b, n in enumerate(sizes):
        mu = base * np.exp(rng.normal(0, 0.4, n_genes))
        mu[100 * b + 200 : 100 * b + 300] = 0.0  # genes absent from this batch
        lib = np.exp(rng.normal(0, 0.6, n))[:, None]
        m = lib * mu[None, :]
        r = 1.5
        blocks.append(rng.negative_binomial(r, r / (r + m)))
    low = rng.binomial(1, 0.01, (12, n_genes))  # the failing batch
    x = sp.csr_matrix(np.vstack(blocks + [low]).astype(np.float32))
    x.data[rng.random(x.nnz) < 0.01] = 0.0  # stored zeros: never "expressed"
    names = [f"MT-{i}" for i in range(20)] + [f"ERCC-{i:05d}" for i in range(5)]
    names += [f"G{i:04d}" for i in rng.permutation(n_genes - 25)]  # gene-name order differs from var order
    batch = np.repeat(["s2", "s0", "s1", "zz"], list(sizes) + [12])
    obs = pd.DataFrame(
        {"batch": pd.Categorical(batch, categories=["s2", "s0", "s1", "zz"])},
        index=[f"c{i}" for i in range(x.shape[0])],
    )
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=names))


_CACHE: dict[str, ad.AnnData] = {}


def load(name: str) -> ad.AnnData:
    if name not in _CACHE:
        if name == "synthetic":
            _CACHE[name] = synthetic_adata()
        else:
            path = SHARED_DATA / DATASETS[name]
            if not path.exists():
                pytest.skip(f"{path} is not present")
            a = ad.read_h5ad(path)
            a.obs["batch"] = a.obs["batch"].astype("category")
            _CACHE[name] = a
    return _CACHE[name]


def factory(x: sp.csr_matrix, codes: np.ndarray, chunk: int | None):
    step = x.shape[0] if chunk is None else chunk
    return lambda: ((x[i : i + step], codes[i : i + step]) for i in range(0, x.shape[0], step))


def transform_chunks(chunks, state: PreprocessState, *, maxabs=None):
    """The shipped third pass (:func:`transform_chunk`) over every chunk, as the runner maps it."""
    for x, codes in chunks():
        yield transform_chunk(x, codes, state, maxabs=maxabs)


# ------------------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    cells: pd.Index
    genes: pd.Index
    hvg: pd.Index
    var: pd.DataFrame
    scaled: sp.csr_matrix


def maxabs_per_batch(a: ad.AnnData) -> sp.csr_matrix:
    x = a.X.copy()
    for b in a.obs["batch"].unique():
        idx = np.flatnonzero((a.obs["batch"] == b).to_numpy())
        x[idx] = MaxAbsScaler(copy=False).fit(x[idx]).transform(x[idx])
    return sp.csr_matrix(x)


def scanpy_rna(a: ad.AnnData, min_features: int, scale: str = "batch") -> Reference:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = a[:, [g for g in a.var_names if not str(g).startswith(DROP)]].copy()
        sc.pp.filter_cells(b, min_genes=min_features)
        sc.pp.filter_genes(b, min_cells=3)
        sc.pp.normalize_total(b, target_sum=1e4)
        sc.pp.log1p(b)
        sc.pp.highly_variable_genes(b, n_top_genes=2000, batch_key="batch")
        c = b[:, b.var["highly_variable"]].copy()
        scaled = maxabs_per_batch(c) if scale == "batch" else sp.csr_matrix(MaxAbsScaler().fit_transform(c.X))
    return Reference(b.obs_names, b.var_names, c.var_names, b.var.copy(), scaled)


_REF: dict[tuple, Reference] = {}


def reference(name: str, min_features: int) -> Reference:
    key = (name, min_features)
    if key not in _REF:
        _REF[key] = scanpy_rna(load(name), min_features)
    return _REF[key]


def assert_scaled_equal(ours: sp.csr_matrix, ref: sp.csr_matrix) -> None:
    assert ours.dtype == np.float32 and ref.dtype == np.float32
    assert ours.shape == ref.shape
    a, b = ours.toarray(), ref.toarray()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    assert a.min() >= 0 and a.max() <= 1
    # as stored for training (float16): identical up to one float16 rounding step
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    assert np.all(np.abs(a16.astype(np.float32) - b16.astype(np.float32)) <= np.spacing(b16).astype(np.float32))
    # and in fact bit-identical: same float32 operations in the same order
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------- RNA equivalence

CASES = [
    ("baron", 600),
    ("baron", 1500),  # drops about half the cells
    ("cellbench", 600),
    ("kang", 600),  # drops about 70% of the cells
    ("kang", 200),
    ("synthetic", 300),
]


@pytest.mark.parametrize(("name", "min_features"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_rna_matches_scanpy(name: str, min_features: int):
    a = load(name)
    ref = reference(name, min_features)
    codes = a.obs["batch"].cat.codes.to_numpy()
    cats = list(a.obs["batch"].cat.categories)
    config = PreprocessConfig(min_features=min_features)

    states, sums, scaled = [], [], []
    for chunk in CHUNK_SIZES:
        res = preprocess_chunks(factory(a.X, codes, chunk), a.var_names, cats, config)
        st = res.state
        # cells, genes, selected genes (set and order)
        assert list(a.obs_names[res.cell_mask]) == list(ref.cells)
        assert list(a.var_names[list(st.genes_kept_index)]) == list(ref.genes)
        assert list(st.features) == list(ref.hvg)
        assert len(st.features) == min(2000, len(ref.genes))
        # HVG statistics
        v = res.var.loc[ref.genes]
        for col in ("means", "dispersions"):
            np.testing.assert_allclose(v[col].to_numpy(), ref.var[col].to_numpy(), rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(
            v["dispersions_norm"].to_numpy().astype(np.float32),
            ref.var["dispersions_norm"].to_numpy(),
            rtol=1e-6,
            equal_nan=True,
        )
        np.testing.assert_array_equal(v["highly_variable_nbatches"], ref.var["highly_variable_nbatches"])
        np.testing.assert_array_equal(v["highly_variable_intersection"], ref.var["highly_variable_intersection"])
        # scaled model input
        y = sp.vstack([m for m, _ in transform_chunks(factory(a.X, codes, chunk), st)]).tocsr()
        assert_scaled_equal(y, ref.scaled)
        states.append(st.to_json())
        sums.append(res.feature_stats.sums())
        scaled.append(y)
    # nothing depends on the chunk size
    assert states[0] == states[1] == states[2]
    for s in sums[1:]:
        for u, w in zip(sums[0], s, strict=True):
            np.testing.assert_array_equal(u, w)
    assert (scaled[0] != scaled[2]).nnz == 0


def test_synthetic_edge_cases_are_exercised():
    a = load("synthetic")
    ref = reference("synthetic", 300)
    kept_batches = set(a.obs.loc[ref.cells, "batch"])
    assert kept_batches == {"s0", "s1", "s2"}  # the "zz" batch lost all its cells
    assert 0 < len(ref.cells) < a.n_obs - 12  # some cells of the real batches are filtered too
    assert ref.var["highly_variable_nbatches"].min() == 0 and ref.var["highly_variable_nbatches"].max() == 3


def test_hvg_ties_are_broken_like_scanpy():
    """Every gene twice (twins have identical statistics, names in random order): an odd ``n_top`` cuts a tie
    group, which scanpy orders by gene name (groupby) with a stable sort."""
    a = load("synthetic")
    rng = np.random.default_rng(5)
    genes = np.flatnonzero([not g.startswith(DROP) for g in a.var_names])
    twins = [f"A{i:04d}" for i in rng.permutation(genes.size)]  # twins sort before the originals by name
    x = sp.hstack([a.X, a.X[:, genes]]).tocsr()
    b = ad.AnnData(x, obs=a.obs.copy(), var=pd.DataFrame(index=list(a.var_names) + twins))
    n_top = 2001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = b[:, [g for g in b.var_names if not g.startswith(DROP)]].copy()
        sc.pp.filter_cells(r, min_genes=300)
        sc.pp.filter_genes(r, min_cells=3)
        sc.pp.normalize_total(r, target_sum=1e4)
        sc.pp.log1p(r)
        df = sc.pp.highly_variable_genes(r, n_top_genes=n_top, batch_key="batch", inplace=False)
    keys = ["highly_variable_nbatches", "dispersions_norm"]
    ordered = df.sort_values(keys, ascending=False, na_position="last")
    assert (ordered[keys].iloc[n_top - 1] == ordered[keys].iloc[n_top]).all()  # the cut splits a tie
    codes = b.obs["batch"].cat.codes.to_numpy()
    cats = list(b.obs["batch"].cat.categories)
    config = PreprocessConfig(min_features=300, n_top_features=n_top)
    res = preprocess_chunks(factory(b.X, codes, 250), b.var_names, cats, config)
    assert list(res.state.features) == list(r.var_names[df["highly_variable"].to_numpy()])


def test_chunk_stats_merge_in_any_tree():
    """Per-chunk accumulators reduced as a dask tree equal the in-place sequential fold, bit for bit."""
    a = load("cellbench")
    codes = a.obs["batch"].cat.codes.to_numpy()
    cats = list(a.obs["batch"].cat.categories)
    res = preprocess_chunks(factory(a.X, codes, 200), a.var_names, cats, PreprocessConfig())
    st = res.state
    plan = FilterPlan("RNA", st.n_vars, st.qc_mask, st.min_features, np.asarray(st.genes_kept_index), st.target_sum)
    chunks = list(factory(a.X, codes, 97)())
    per_chunk = [gene_moments_chunk(x, c, plan, len(cats)) for x, c in chunks]
    merged = tree_merge(per_chunk[::-1])
    for u, w in zip(merged.sums(), res.feature_stats.sums(), strict=True):
        np.testing.assert_array_equal(u, w)
    np.testing.assert_array_equal(merged.n_positive, res.feature_stats.n_positive)
    np.testing.assert_array_equal(merged.max_log1p, res.feature_stats.max_log1p)
    cf = tree_merge([cell_filter_chunk(x, c, st.qc_mask, 600, len(cats))[0] for x, c in chunks])
    np.testing.assert_array_equal(cf.n_cells_per_feature, res.cell_stats.n_cells_per_feature)


def test_global_scaling_matches_single_maxabs_scaler():
    a = load("synthetic")
    ref = scanpy_rna(a, 300, scale="global")
    codes = a.obs["batch"].cat.codes.to_numpy()
    cats = list(a.obs["batch"].cat.categories)
    config = PreprocessConfig(min_features=300, scale="global")
    res = preprocess_chunks(factory(a.X, codes, 97), a.var_names, cats, config)
    assert set(res.state.maxabs) == {GLOBAL_MAXABS_KEY}
    y = sp.vstack([m for m, _ in transform_chunks(factory(a.X, codes, 97), res.state)]).tocsr()
    assert_scaled_equal(y, ref.scaled)


def test_projection_uses_new_data_maxabs_and_atlas_features(tmp_path):
    """The MaxAbs ``project`` computes (:func:`~scalex_scale.preprocessing.scaling.projection_maxabs`, over the
    query's rows in an atlas) is scikit-learn's MaxAbsScaler fit on the query."""
    from scalex_scale.preprocessing.scaling import projection_maxabs
    from scalex_scale.store import Atlas, ingest

    a = load("synthetic")
    atlas = a[a.obs["batch"].isin(["s0", "s2"])].copy()
    query = a[a.obs["batch"] == "s1"].copy()
    cats = list(a.obs["batch"].cat.categories)
    res = preprocess_chunks(
        factory(atlas.X, atlas.obs["batch"].cat.codes.to_numpy(), 97), a.var_names, cats,
        PreprocessConfig(min_features=300),
    )  # fmt: skip
    st = PreprocessState.from_json(res.state.to_json())
    qcodes = np.zeros(query.n_obs, dtype=np.int64)  # one new batch
    q_atlas = tmp_path / "q.zarr"
    ingest(q_atlas, [query], batch_names=["q"])
    record = projection_maxabs(Atlas.open(q_atlas), st, (0, query.n_obs), ["q"], n_workers=1)
    m = np.asarray([record["q"]], dtype=np.float32)
    y = sp.vstack([t for t, _ in transform_chunks(factory(query.X, qcodes, 50), st, maxabs=m)]).tocsr()
    # reference: same cell filter, totals over the atlas' kept genes, atlas features, MaxAbs fit on the query
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = query[:, [g for g in a.var_names if not g.startswith(DROP)]].copy()
        sc.pp.filter_cells(q, min_genes=300)
        q = q[:, list(a.var_names[list(st.genes_kept_index)])].copy()
        sc.pp.normalize_total(q, target_sum=1e4)
        sc.pp.log1p(q)
        q = q[:, list(st.features)].copy()
    assert_scaled_equal(y, sp.csr_matrix(MaxAbsScaler().fit_transform(q.X)))


# ------------------------------------------------------------------------------------------------- ATAC


def synthetic_atac(seed: int = 1) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n_peaks, sizes = 1500, (150, 120, 90)
    p = rng.beta(0.4, 6.0, n_peaks)
    blocks = []
    for n in sizes:
        depth = rng.uniform(0.3, 1.5, n)[:, None]
        open_ = rng.random((n, n_peaks)) < np.clip(depth * p[None, :], 0, 1)
        open_[:, :5] = True  # open everywhere: most cells, but zero variance
        blocks.append(open_ * rng.integers(1, 4, (n, n_peaks)))  # counts > 1 are binarized
    x = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    batch = np.repeat(["a", "b", "c"], sizes)
    obs = pd.DataFrame({"batch": pd.Categorical(batch)}, index=[f"c{i}" for i in range(x.shape[0])])
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(n_peaks)]))


def test_atac_matches_documented_rule_with_scanpy_arithmetic():
    a = synthetic_atac()
    codes = a.obs["batch"].cat.codes.to_numpy()
    cats = list(a.obs["batch"].cat.categories)
    config = PreprocessConfig(profile="ATAC", min_features=60, n_top_features=600)
    outs = []
    for chunk in CHUNK_SIZES:
        res = preprocess_chunks(factory(a.X, codes, chunk), a.var_names, cats, config)
        y = sp.vstack([m for m, _ in transform_chunks(factory(a.X, codes, chunk), res.state)]).tocsr()
        outs.append((res.state.to_json(), y))
    assert outs[0][0] == outs[1][0] == outs[2][0]
    st = res.state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = a.copy()
        b.X.data[:] = (b.X.data > 0).astype(np.float32)  # binarize
        sc.pp.filter_cells(b, min_genes=60)
        sc.pp.filter_genes(b, min_cells=3)
        n = b.n_obs
        c = b.var["n_cells"].to_numpy()
        order = np.argsort(np.abs(2 * c - n), kind="stable")[:600]  # variance p(1-p) of the binarized peak
        b = b[:, np.sort(order)].copy()
        totals = np.asarray(b.X.sum(axis=1)).ravel()
        median = float(np.median(totals))
        sc.pp.normalize_total(b, target_sum=median)
    assert list(a.obs_names[res.cell_mask]) == list(b.obs_names)
    assert list(st.features) == list(b.var_names)
    assert st.median_total == median
    # the ranking is by binarized variance, not by number of cells: peaks open in every cell are not selected
    assert not set(a.var_names[:5]) & set(st.features)
    for _, y in outs:
        assert_scaled_equal(y, maxabs_per_batch(b))
