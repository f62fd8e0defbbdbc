"""The store-backed preprocessing (dask passes, permuted training matrix) equals scanpy + per-batch MaxAbs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from scalex_scale.store import Atlas, PreprocessError, ingest
from scalex_scale.workflows.preprocess import preprocess

from test_preprocess_equivalence import load, scanpy_rna, synthetic_adata
from test_store_ingest import _snapshot

sc = pytest.importorskip("scanpy")


def _unpermuted(atlas: Atlas) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    """The training matrix back in atlas order: (atlas rows, float32 values, batch codes)."""
    tm = atlas.training_matrix()
    indptr, indices, data, batch = tm.read(0, tm.n_rows)
    m = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int32), indptr), shape=(tm.n_rows, tm.n_features))
    order = np.argsort(tm.cells)
    return tm.cells[order], m[order], batch[order]


@pytest.mark.parametrize("name, min_features", [("kang", 600), ("synthetic", 300)])
def test_store_pipeline_matches_scanpy(tmp_path, name, min_features):
    a = load(name) if name != "synthetic" else synthetic_adata()
    if name == "synthetic":
        a = a[a.obs["batch"] != "zz"].copy()  # the all-failing batch is an error at the store level
        a.obs["batch"] = a.obs["batch"].cat.remove_unused_categories()
    ingest(tmp_path / "s", [a], batch_key="batch")
    state = preprocess(tmp_path / "s", min_features=min_features, bucket_values=20_000, n_workers=2)
    ref = scanpy_rna(a, min_features)
    atlas = Atlas.open(tmp_path / "s")
    assert list(state.features) == list(ref.hvg)
    assert list(atlas.var_names[atlas.var["highly_variable"].to_numpy()]) == sorted(ref.hvg, key=list(atlas.var_names).index)
    rows, values, batch = _unpermuted(atlas)
    assert list(atlas.obs_names[rows]) == list(ref.cells)
    assert atlas.obs["scalex_qc_pass"].sum() == len(ref.cells)
    np.testing.assert_array_equal(batch, atlas.batch_codes[rows])
    # stored as float16: equal to scanpy's float32 values up to one float16 rounding
    expect = ref.scaled.toarray().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(values.toarray(), expect)
    info = atlas.info()["preprocess"]
    assert info["n_train"] == len(ref.cells) and info["n_features"] == 2000


def test_permutation_is_random_deterministic_and_bucket_independent(tmp_path):
    a = synthetic_adata()
    a = a[a.obs["batch"] != "zz"].copy()
    a.obs["batch"] = a.obs["batch"].cat.remove_unused_categories()
    cells = {}
    for name, seed, bucket in [("a", 0, 1 << 26), ("b", 0, 1 << 26), ("c", 1, 1 << 26), ("d", 0, 10_000)]:
        ingest(tmp_path / name, [a], batch_key="batch")
        preprocess(tmp_path / name, min_features=300, seed=seed, bucket_values=bucket, n_workers=1)
        cells[name] = Atlas.open(tmp_path / name).training_matrix().cells
    np.testing.assert_array_equal(cells["a"], cells["b"])  # same seed, same order
    assert not np.array_equal(cells["a"], cells["c"])
    assert sorted(cells["a"]) == sorted(cells["d"]) and not np.array_equal(cells["a"], cells["d"])
    # well mixed: first 64 rows of a 3-batch atlas contain every batch, and order is far from sorted
    assert np.abs(np.corrcoef(np.arange(len(cells["a"])), cells["a"])[0, 1]) < 0.2
    # identical values whatever the bucket count
    _, v_a, _ = _unpermuted(Atlas.open(tmp_path / "a"))
    _, v_d, _ = _unpermuted(Atlas.open(tmp_path / "d"))
    assert (v_a != v_d).nnz == 0


def test_batch_without_cells_fails_and_atlas_unchanged(tmp_path):
    a = synthetic_adata()  # batch "zz" has no cell with >= 300 genes
    ingest(tmp_path / "s", [a], batch_key="batch")
    before = _snapshot(tmp_path / "s")
    with pytest.raises(PreprocessError, match="batch 'zz' has no cells left after filtering"):
        preprocess(tmp_path / "s", min_features=300)
    assert _snapshot(tmp_path / "s") == before
    assert not any(p.name.startswith(".s.spill") for p in tmp_path.iterdir())


def test_failed_rerun_keeps_previous_training_matrix(tmp_path, monkeypatch):
    a = synthetic_adata()
    a = a[a.obs["batch"] != "zz"].copy()
    a.obs["batch"] = a.obs["batch"].cat.remove_unused_categories()
    ingest(tmp_path / "s", [a], batch_key="batch")
    preprocess(tmp_path / "s", min_features=300)
    before = _snapshot(tmp_path / "s")
    import scalex_scale.store.training as permute

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(permute.PermutedWriter, "finish", boom)
    with pytest.raises(OSError, match="disk full"):
        preprocess(tmp_path / "s", min_features=200, seed=5)
    assert _snapshot(tmp_path / "s") == before
    assert Atlas.open(tmp_path / "s").training_matrix().n_rows > 0


def test_distributed_preprocessing_equals_threads(tmp_path):
    distributed = pytest.importorskip("distributed")
    a = synthetic_adata()
    a = a[a.obs["batch"] != "zz"].copy()
    a.obs["batch"] = a.obs["batch"].cat.remove_unused_categories()
    ingest(tmp_path / "t", [a], batch_key="batch")
    ingest(tmp_path / "d", [a], batch_key="batch")
    preprocess(tmp_path / "t", min_features=300, n_workers=2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            preprocess(tmp_path / "d", min_features=300, client=client)
    t, d = Atlas.open(tmp_path / "t"), Atlas.open(tmp_path / "d")
    assert t.state["preprocess"] == d.state["preprocess"]
    for key in ("data", "indices", "indptr", "cells", "batch"):
        gt = zarr.open_group(tmp_path / "t" / "uns" / "scalex_scale" / "train")[key][:]
        gd = zarr.open_group(tmp_path / "d" / "uns" / "scalex_scale" / "train")[key][:]
        np.testing.assert_array_equal(gt, gd)
