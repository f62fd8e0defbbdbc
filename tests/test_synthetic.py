"""Tests of the synthetic single-cell count generator (scalex_scale.synthetic)."""

from __future__ import annotations

import math
import resource
from dataclasses import replace

import numba
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from scalex_scale import synthetic as ds
from scalex_scale.synthetic import (
    SyntheticConfig,
    celltype_presence,
    make_synthetic,
    synthetic_chunks,
    synthetic_rows,
    synthetic_var,
)

SMALL = SyntheticConfig(n_cells=3000, n_genes=1500, n_batches=3, n_celltypes=6, mean_genes_per_cell=300, chunk_size=700)


@pytest.fixture(scope="module")
def small():
    return make_synthetic(SMALL)


def _lognorm(x: sp.csr_matrix) -> np.ndarray:
    totals = np.asarray(x.sum(axis=1)).ravel()
    return np.log1p(np.asarray(x.multiply(1e4 / totals[:, None]).todense()))


# --------------------------------------------------------------------------------------------------------
# Kernels against trusted references
# --------------------------------------------------------------------------------------------------------


def test_alias_table_reproduces_probabilities() -> None:
    rng = np.random.default_rng(3)
    p = rng.lognormal(0, 2, 997)
    p /= p.sum()
    prob, alias = ds._build_alias(p)
    n = p.size
    implied = prob / n
    np.add.at(implied, alias, (1.0 - prob) / n)  # mass of each slot's alias
    np.testing.assert_allclose(implied, p, rtol=1e-9, atol=1e-15)
    assert alias.dtype == np.int32 and np.all((prob >= 0) & (prob <= 1 + 1e-12))


@numba.njit
def _many_logseries(rng: np.random.Generator, theta: float, n: int, at_least_2: bool) -> np.ndarray:
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = ds._logseries_ge2(rng, theta) if at_least_2 else ds._logseries(rng, theta)
    return out


@pytest.mark.parametrize("theta", [0.05, 0.4, 0.8, 0.97])
def test_logseries_matches_scipy(theta: float) -> None:
    rng = np.random.default_rng(1)
    n = 100_000
    k = np.arange(1, 40)
    draws = _many_logseries(rng, theta, n, False)
    emp = np.array([(draws == i).mean() for i in k])
    assert np.abs(emp - stats.logser.pmf(k, theta)).max() < 0.006
    ge2 = _many_logseries(rng, theta, n, True)
    assert ge2.min() >= 2
    cond = stats.logser.pmf(k, theta) * (k >= 2) / stats.logser.sf(1, theta)
    emp2 = np.array([(ge2 == i).mean() for i in k])
    assert np.abs(emp2 - cond).max() < 0.006


def test_counts_are_negative_binomial() -> None:
    """Per-gene counts from the compound-Poisson kernel follow NB(mean L p, dispersion phi)."""
    p = np.array([0.5, 0.3, 0.15, 0.045, 0.005])
    phi = np.array([0.1, 0.5, 1.0, 2.0, 0.3])
    prob, alias = ds._build_alias(p)
    n, lib = 40_000, 30.0
    rng = np.random.default_rng(7)
    libs = np.full(n, lib)
    indptr, indices, data = ds._sample_block(
        rng, np.zeros(n, dtype=np.int64), libs, rng.poisson(libs), prob[None], alias[None], p[None], phi, 10
    )
    x = sp.csr_matrix((data, indices, indptr), shape=(n, p.size)).toarray()
    for g in range(p.size):
        mean, size = lib * p[g], 1.0 / phi[g]
        ref = stats.nbinom(size, size / (size + mean))
        support = np.arange(0, int(ref.ppf(0.999)) + 1)
        emp = np.bincount(x[:, g].astype(np.int64), minlength=support.size)[: support.size] / n
        assert np.abs(emp - ref.pmf(support)).sum() < 0.03, g  # total variation
        assert abs(x[:, g].mean() - mean) < 4 * math.sqrt(ref.var() / n) + 1e-3
        assert x[:, g].var() == pytest.approx(mean + phi[g] * mean**2, rel=0.08)


# --------------------------------------------------------------------------------------------------------
# Data set structure
# --------------------------------------------------------------------------------------------------------


def test_shapes_dtypes_and_names(small) -> None:
    x = small.X
    assert small.shape == (SMALL.n_cells, SMALL.n_genes)
    assert isinstance(x, sp.csr_matrix)
    assert x.dtype == np.float32 and x.indices.dtype == np.int32
    assert x.has_sorted_indices and x.has_canonical_format
    assert np.all(x.data > 0) and np.all(x.data == np.round(x.data))
    assert small.obs_names.is_unique and small.var_names.is_unique
    assert list(small.obs.columns) == ["batch", "celltype", "lineage", "low_quality"]
    for col in ("batch", "celltype", "lineage"):
        assert isinstance(small.obs[col].dtype, pd.CategoricalDtype)
    assert list(small.obs["batch"].cat.categories) == ["batch0", "batch1", "batch2"]
    names = small.var_names
    assert names[0] == "GENE00001" and names[SMALL.n_regular_genes - 1] == f"GENE{SMALL.n_regular_genes:05d}"
    assert names.str.startswith("MT-").sum() == SMALL.n_mt_genes > 0
    assert names.str.startswith("ERCC-").sum() == SMALL.n_ercc_genes > 0
    pd.testing.assert_frame_equal(small.var, synthetic_var(SMALL))
    assert small.uns["synthetic"]["config"]["n_lineages"] == SMALL.resolved_n_lineages


def test_h5ad_roundtrip(small, tmp_path) -> None:
    small.write_h5ad(tmp_path / "s.h5ad")
    import anndata

    back = anndata.read_h5ad(tmp_path / "s.h5ad")
    assert (back.X != small.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, small.obs)


def test_chunks_have_chunk_size_rows() -> None:
    cfg = replace(SMALL, n_cells=2500, chunk_size=1000)
    sizes, categories = [], set()
    for matrix, obs in synthetic_chunks(cfg):
        assert matrix.shape == (obs.shape[0], cfg.n_genes)
        assert matrix.indices.dtype == np.int32 and matrix.dtype == np.float32
        sizes.append(matrix.shape[0])
        categories.add(tuple(obs["celltype"].cat.categories))
    assert sizes == [1000, 1000, 500]
    assert len(categories) == 1  # every chunk carries all categories


def test_deterministic_and_chunk_size_independent(small) -> None:
    again = make_synthetic(replace(SMALL, chunk_size=4999))
    assert (again.X != small.X).nnz == 0
    pd.testing.assert_frame_equal(again.obs, small.obs)
    start, stop = 1234, 2222  # any row range on its own
    rows, obs = synthetic_rows(SMALL, start, stop)
    assert (rows != small.X[start:stop]).nnz == 0
    pd.testing.assert_frame_equal(obs, small.obs.iloc[start:stop])


@pytest.mark.parametrize("order", ["batch", "shuffled"])
def test_rows_independent_of_chunking_across_blocks(order: str) -> None:
    cfg = SyntheticConfig(n_cells=9000, n_genes=300, mean_genes_per_cell=50, order=order, chunk_size=9000)
    assert cfg.n_cells > 2 * ds.BLOCK_CELLS
    whole = make_synthetic(cfg)
    for chunk_size in (1000, ds.BLOCK_CELLS, 4097):
        other = make_synthetic(replace(cfg, chunk_size=chunk_size))
        assert (other.X != whole.X).nnz == 0
        pd.testing.assert_frame_equal(other.obs, whole.obs)
    rows, obs = synthetic_rows(cfg, 4000, 8300)  # spans three blocks
    assert (rows != whole.X[4000:8300]).nnz == 0
    pd.testing.assert_frame_equal(obs, whole.obs.iloc[4000:8300])


def test_different_seeds_differ(small) -> None:
    other = make_synthetic(replace(SMALL, seed=1))
    assert other.shape == small.shape
    assert (other.X != small.X).nnz > 0
    assert not celltype_presence(SMALL).equals(celltype_presence(replace(SMALL, seed=1))) or not np.array_equal(
        other.obs["celltype"].to_numpy(), small.obs["celltype"].to_numpy()
    )


@pytest.mark.parametrize("seed", range(6))
def test_partial_overlap_structure(seed: int) -> None:
    cfg = replace(SyntheticConfig(), seed=seed)  # default 4 batches x 8 types
    presence = celltype_presence(cfg).to_numpy()
    assert presence.any(axis=0).all()  # every type lives somewhere
    assert (~presence).any(axis=1).all()  # every batch lacks some type
    assert (presence.sum(axis=0) == 1).any()  # a batch-specific type
    assert (presence.sum(axis=0) >= 2).any()  # and shared types
    full = celltype_presence(replace(cfg, partial_overlap=False)).to_numpy()
    assert full.all()


def test_cells_follow_presence(small) -> None:
    presence = celltype_presence(SMALL)
    seen = pd.crosstab(small.obs["batch"], small.obs["celltype"]).reindex(
        index=presence.index, columns=presence.columns, fill_value=0
    )
    assert not (seen.to_numpy() > 0)[~presence.to_numpy()].any()
    specific = presence.columns[presence.sum(axis=0) == 1]
    assert len(specific) >= 1 and (seen[specific].to_numpy() > 0).sum(axis=0).tolist() == [1] * len(specific)
    lineage = small.obs.groupby("celltype", observed=True)["lineage"].nunique()
    assert (lineage == 1).all()


def test_shuffled_order_keeps_batch_sizes() -> None:
    cfg = replace(SMALL, n_cells=9000, n_genes=300, mean_genes_per_cell=50)
    by_batch = make_synthetic(cfg).obs["batch"].cat.codes.to_numpy()
    shuffled = make_synthetic(replace(cfg, order="shuffled")).obs["batch"].cat.codes.to_numpy()
    assert np.all(np.diff(by_batch) >= 0)  # batch by batch
    np.testing.assert_array_equal(np.bincount(by_batch), np.bincount(shuffled))
    for part in np.array_split(shuffled, 9):  # interleaved everywhere
        assert np.unique(part).size == cfg.n_batches


# --------------------------------------------------------------------------------------------------------
# Biology-like properties
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "pass_range"), [(500, (0.1, 0.5)), (1000, (0.8, 1.0))])
def test_detected_genes_mean_and_filter(target: float, pass_range: tuple[float, float]) -> None:
    cfg = SyntheticConfig(n_cells=4000, mean_genes_per_cell=target, seed=5)
    adata = make_synthetic(cfg)
    genes = np.diff(adata.X.indptr)
    assert genes.mean() == pytest.approx(target, rel=0.05)
    assert adata.X.nnz / np.prod(adata.shape) == pytest.approx(target / cfg.n_genes, rel=0.05)
    passing = (genes >= 600).mean()  # the SCALEX default cell filter
    assert pass_range[0] < passing < pass_range[1]
    low_q = adata.obs["low_quality"].to_numpy()
    assert 0.005 < low_q.mean() < 0.04
    assert np.median(genes[low_q]) < 0.2 * target


def test_mt_and_ercc_get_counts(small) -> None:
    names = small.var_names
    total = small.X.sum()
    mt = small.X[:, np.flatnonzero(names.str.startswith("MT-"))].sum() / total
    ercc = small.X[:, np.flatnonzero(names.str.startswith("ERCC-"))].sum() / total
    assert 0.01 < mt < 0.12 and 0 < ercc < 0.03


def test_batch_effects_exist(small) -> None:
    """The same type differs between batches far more than between two halves of one batch."""
    obs = small.obs
    presence = celltype_presence(SMALL)
    shared = presence.columns[presence.sum(axis=0) >= 2]
    counts = obs.groupby(["celltype", "batch"], observed=True).size()
    t = max(shared, key=lambda name: counts[name].nlargest(2).min())
    b1, b2 = counts[t].nlargest(2).index
    x = small.X

    def profile(mask: np.ndarray) -> np.ndarray:
        sub = x[np.flatnonzero(mask)]
        return np.asarray((sub.multiply(1.0 / sub.sum(axis=1))).mean(axis=0)).ravel()

    is_t = (obs["celltype"] == t).to_numpy()
    in1, in2 = is_t & (obs["batch"] == b1).to_numpy(), is_t & (obs["batch"] == b2).to_numpy()
    half = np.flatnonzero(in1)
    first, second = np.zeros_like(in1), np.zeros_like(in1)
    first[half[::2]], second[half[1::2]] = True, True
    p1, p2, h1, h2 = profile(in1), profile(in2), profile(first), profile(second)
    top = np.argsort(p1 + p2)[-200:]  # well-measured genes
    across = np.std(np.log(p1[top] / p2[top]))
    within = np.std(np.log(h1[top] / h2[top]))
    assert across > 0.2 and across > 2 * within
    lib = np.log(np.asarray(x.sum(axis=1)).ravel())
    per_batch = pd.Series(lib).groupby(obs["batch"].to_numpy()).mean()
    assert per_batch.max() - per_batch.min() > 0.05  # library sizes differ between batches


def test_celltypes_separable_and_lineages_closer(small) -> None:
    keep = ~small.obs["low_quality"].to_numpy()
    y = small.obs["celltype"].cat.codes.to_numpy()[keep]
    lineage_of = small.obs.groupby("celltype", observed=True)["lineage"].first()
    z = _lognorm(small.X[np.flatnonzero(keep)])
    z = z[:, np.argsort(z.var(axis=0))[-500:]]
    z -= z.mean(axis=0)
    with threadpool_limits(1):  # a small PCA; BLAS threads only contend on a shared machine
        _, vectors = np.linalg.eigh(z.T @ z)
    pcs = z @ vectors[:, -20:]
    tr, te, ytr, yte = train_test_split(pcs, y, test_size=0.5, random_state=0, stratify=y)
    accuracy = KNeighborsClassifier(n_neighbors=15).fit(tr, ytr).score(te, yte)
    assert accuracy > 0.9
    centroids = pd.DataFrame(z).groupby(small.obs["celltype"].to_numpy()[keep]).mean()
    d = np.linalg.norm(centroids.to_numpy()[:, None] - centroids.to_numpy()[None], axis=2)
    lin = lineage_of.reindex(centroids.index).to_numpy()
    same = (lin[:, None] == lin[None]) & ~np.eye(len(lin), dtype=bool)
    assert same.any() and d[same].mean() < d[~same & ~np.eye(len(lin), dtype=bool)].mean()


# --------------------------------------------------------------------------------------------------------
# Config validation and memory
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"n_cells": 0},
        {"n_cells": 2, "n_batches": 3},
        {"mean_genes_per_cell": 5000},
        {"order": "random"},
        {"n_mt_genes": 14},
        {"n_genes": 20},
        {"low_quality_fraction": 1.0},
        {"seed": -1},
    ],
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)


def test_rows_out_of_range() -> None:
    with pytest.raises(ValueError):
        synthetic_rows(SMALL, 10, SMALL.n_cells + 1)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
def test_streaming_memory_is_flat() -> None:
    """Streaming 40k cells x 5k genes (150 MiB of CSR) holds about one chunk at a time."""
    cfg = SyntheticConfig(n_cells=40_000, chunk_size=2_000)
    next(synthetic_chunks(replace(cfg, n_cells=10)))  # compile and build the model first
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss, nnz = [], 0
    for matrix, _ in synthetic_chunks(cfg):
        nnz += matrix.nnz
        rss.append(_rss_mib())
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - max(peak_before, rss[0])
    assert nnz * 8 / 2**20 > 140  # the data: >140 MiB of CSR never held at once
    assert peak_growth < 80 and max(rss[5:]) - rss[4] < 60  # MiB; holding the data would add ~110
