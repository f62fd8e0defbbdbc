"""Ingest: formats, batches, joins, appends, and bad input that must fail cleanly."""

from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import zarr

from scalex_scale.store import Atlas, AtlasFormatError, InputError, from_chunks, ingest
from scalex_scale.store.txn import temporaries

from conftest import make_adata


def _read(path: Path) -> ad.AnnData:
    return ad.read_zarr(path)


def test_ingest_h5ad_roundtrip_and_lazy(tmp_path):
    a = make_adata(50, 30, seed=1, batch="b1")
    a.write_h5ad(tmp_path / "a.h5ad")
    report = ingest(tmp_path / "atlas", [tmp_path / "a.h5ad"], chunk_rows=7)
    assert report.n_cells_added == 50 and report.batches_added == {"b1": 50}
    back = _read(tmp_path / "atlas")
    assert (back.X != a.X).nnz == 0
    assert list(back.obs_names) == list(a.obs_names)
    assert list(back.obs["celltype"]) == list(a.obs["celltype"])
    assert back.obs["batch"].dtype == "category"
    lazy = ad.experimental.read_lazy(tmp_path / "atlas")
    assert lazy.shape == (50, 30)
    assert zarr.open_group(tmp_path / "atlas").metadata.zarr_format == 3


def test_formats_mtx_h5_zarr_anndata(tmp_path):
    a = make_adata(20, 15, seed=2)
    # 10x MTX (gzipped, v3 names)
    mtx = tmp_path / "mtx"
    mtx.mkdir()
    with gzip.open(mtx / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(a.X.T))
    pd.DataFrame({0: [f"ENSG{j}" for j in range(15)], 1: a.var_names, 2: "Gene Expression"}).to_csv(
        mtx / "features.tsv.gz", sep="\t", header=False, index=False
    )
    pd.DataFrame({0: [f"m{i}" for i in range(20)]}).to_csv(mtx / "barcodes.tsv.gz", sep="\t", header=False, index=False)
    # 10x h5 (v3): CSC genes x cells == CSR cells x genes, plus 2 antibody features that must be dropped
    h5 = tmp_path / "x.h5"
    full = sp.hstack([a.X, sp.csr_matrix(np.ones((20, 2), np.float32))]).tocsr()
    with h5py.File(h5, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = full.data.astype(np.int32), full.indices, full.indptr
        g["shape"] = np.array([17, 20])
        g["barcodes"] = np.array([f"h{i}" for i in range(20)], dtype="S")
        g["features/name"] = np.array(list(a.var_names) + ["CD3", "CD4"], dtype="S")
        g["features/feature_type"] = np.array(["Gene Expression"] * 15 + ["Antibody Capture"] * 2, dtype="S")
    z = tmp_path / "z.zarr"
    a.write_zarr(z)
    # zarr and mem are the same cells: a duplicate unless allowed
    report = ingest(
        tmp_path / "atlas", [mtx, h5, z, a], batch_names=["mtx", "h5", "zarr", "mem"], allow_duplicates=True
    )
    assert report.batches_added == {"mtx": 20, "h5": 20, "zarr": 20, "mem": 20}
    back = _read(tmp_path / "atlas")
    assert back.n_vars == 15
    for i in range(4):
        np.testing.assert_array_equal(back.X[20 * i : 20 * (i + 1)].toarray(), a.X.toarray())
    # zarr and mem inputs share cell names: made unique with the batch name
    assert back.obs_names.is_unique
    assert "c0-mem" in back.obs_names and report.cells_renamed == 20


def test_batch_key_and_default_names(tmp_path):
    a = make_adata(30, 10, seed=3)
    a.obs["donor"] = np.where(np.arange(30) < 10, "d1", "d2")
    ingest(tmp_path / "k", [a], batch_key="donor")
    assert _read(tmp_path / "k").obs["batch"].value_counts().to_dict() == {"d2": 20, "d1": 10}
    b = make_adata(30, 10, seed=4, prefix="x")
    a.write_h5ad(tmp_path / "one.h5ad")
    b.write_h5ad(tmp_path / "two.h5ad")
    ingest(tmp_path / "d", [tmp_path / "one.h5ad", tmp_path / "two.h5ad"])
    assert list(_read(tmp_path / "d").obs["batch"].cat.categories) == ["one", "two"]
    with pytest.raises(InputError, match="no obs column 'nope'"):
        ingest(tmp_path / "e", [a], batch_key="nope")
    assert not (tmp_path / "e").exists()


def test_inner_and_outer_join(tmp_path):
    a = make_adata(10, 8, seed=5)
    b = make_adata(10, 8, seed=6, prefix="y")
    b.var_names = [f"G{j + 4}" for j in range(8)]  # G4..G11
    ingest(tmp_path / "inner", [a, b])
    assert list(_read(tmp_path / "inner").var_names) == ["G4", "G5", "G6", "G7"]
    ingest(tmp_path / "outer", [a, b], join="outer")
    back = _read(tmp_path / "outer")
    assert back.n_vars == 12
    np.testing.assert_array_equal(back[10:, [f"G{j}" for j in range(4)]].X.toarray(), 0)
    np.testing.assert_array_equal(back[10:, b.var_names].X.toarray(), b.X.toarray())


def test_append_does_not_rewrite_existing_chunks(tmp_path):
    big = make_adata(3000, 200, seed=7, batch="first")  # ~180k values: several 2**20-element chunks? no: one
    store = tmp_path / "atlas"
    ingest(store, [big])
    chunk_dir = store / "X" / "data" / "c"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in chunk_dir.iterdir()}
    n_before = Atlas.open(store).n_obs
    report = ingest(store, [make_adata(100, 200, seed=8, prefix="n")], batch_names=["second"])
    assert report.batches_added == {"second": 100}
    atlas = Atlas.open(store)
    assert atlas.n_obs == n_before + 100
    assert atlas.batch_categories == ["first", "second"]
    full_chunks = int(Atlas.open(store).indptr[n_before]) // (1 << 20)
    for p, (mtime, content) in before.items():
        if int(p.name) < full_chunks:  # complete chunks of existing cells are never rewritten
            assert p.stat().st_mtime_ns == mtime and p.read_bytes() == content
    back = _read(store)
    np.testing.assert_array_equal(back.X[:3000].toarray(), big.X.toarray())


def test_append_missing_genes_zero_filled(tmp_path):
    a = make_adata(20, 10, seed=9, batch="a")
    ingest(tmp_path / "s", [a])
    b = make_adata(5, 12, seed=10, prefix="q")
    b.var_names = [f"G{j}" for j in range(5)] + [f"X{j}" for j in range(7)]
    report = ingest(tmp_path / "s", [b], batch_names=["b"])
    name = next(iter(report.genes_missing))
    assert report.genes_missing[name] == 5 and report.genes_dropped[name] == 7
    back = _read(tmp_path / "s")
    np.testing.assert_array_equal(back[20:, [f"G{j}" for j in range(5)]].X.toarray(), b.X[:, :5].toarray())
    np.testing.assert_array_equal(back[20:, [f"G{j}" for j in range(5, 10)]].X.toarray(), 0)


def _snapshot(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "bad, match",
    [
        ("nan", "NaN or infinite"),
        ("negative", "negative counts"),
        ("string", "dtype"),
        ("empty", "no cells|no cell names|empty"),
        ("dupgenes", "duplicated gene names"),
        ("nogenes", "none of its genes"),
    ],
)
def test_bad_append_leaves_atlas_unchanged(tmp_path, bad, match):
    store = tmp_path / "atlas"
    ingest(store, [make_adata(40, 10, seed=11, batch="ok")])
    before = _snapshot(store)
    good = make_adata(15, 10, seed=12, prefix="g")
    b = make_adata(15, 10, seed=13, prefix="z")
    if bad == "nan":
        x = b.X.toarray()
        x[7, 3] = np.nan
        b = ad.AnnData(sp.csr_matrix(x), obs=b.obs, var=b.var)
    elif bad == "negative":
        b.X.data[5] = -1
    elif bad == "string":
        b = ad.AnnData(np.full((15, 10), "a", dtype=object), obs=b.obs, var=b.var)
    elif bad == "empty":
        b = b[:0].copy()
    elif bad == "dupgenes":
        b.var_names = ["G0"] * 2 + [f"G{j}" for j in range(2, 10)]
    elif bad == "nogenes":
        b.var_names = [f"Y{j}" for j in range(10)]
    with pytest.raises(InputError, match=match):
        ingest(store, [good, b], batch_names=["g", "bad"])  # the good input is rolled back too
    assert _snapshot(store) == before
    assert not temporaries(store)
    assert _read(store).n_obs == 40


def test_corrupt_file_and_foreign_store(tmp_path):
    a = make_adata(30, 10, seed=14)
    a.write_h5ad(tmp_path / "a.h5ad")
    raw = (tmp_path / "a.h5ad").read_bytes()
    (tmp_path / "trunc.h5ad").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="trunc.h5ad"):
        ingest(tmp_path / "s", [tmp_path / "trunc.h5ad"])
    assert not (tmp_path / "s").exists()
    # a plain AnnData zarr (written by anndata, not by us) is not an atlas
    a.write_zarr(tmp_path / "plain.zarr")
    with pytest.raises(AtlasFormatError, match="not a scalex-scale atlas"):
        ingest(tmp_path / "plain.zarr", [a])
    with ad.settings.override(zarr_write_format=2):
        a.write_zarr(tmp_path / "v2.zarr")
    with pytest.raises(AtlasFormatError, match="Zarr format 2"):
        Atlas.open(tmp_path / "v2.zarr")
    (tmp_path / "notes").mkdir()
    with pytest.raises(AtlasFormatError, match="not a Zarr store"):
        Atlas.open(tmp_path / "notes")
    with pytest.raises(InputError, match="unrecognised input format"):
        ingest(tmp_path / "t", [tmp_path / "a.h5ad.txt"]) if (tmp_path / "a.h5ad.txt").write_text("x") else None


def test_unknown_format_version(tmp_path):
    ingest(tmp_path / "s", [make_adata(10, 5, seed=15)])
    g = zarr.open_group(tmp_path / "s" / "uns" / "scalex_scale", mode="r+")
    g.attrs["scalex_scale_format"] = 99
    with pytest.raises(AtlasFormatError, match="format version 99"):
        Atlas.open(tmp_path / "s")


def test_from_chunks_generator(tmp_path):
    a = make_adata(35, 9, seed=17)

    def factory():
        for s in range(0, 35, 10):
            yield a.X[s : s + 10], a.obs.iloc[s : s + 10]

    ingest(tmp_path / "s", [from_chunks(factory, a.var_names, name="gen")], batch_names=["g"])
    back = _read(tmp_path / "s")
    np.testing.assert_array_equal(back.X.toarray(), a.X.toarray())
    with pytest.raises(InputError, match="has no cells"):
        ingest(tmp_path / "t", [from_chunks(lambda: iter(()), a.var_names, name="nothing")])


def test_info_summary(tmp_path):
    ingest(tmp_path / "s", [make_adata(12, 5, seed=18, batch="x"), make_adata(8, 5, seed=19, prefix="k", batch="y")])
    info = Atlas.open(tmp_path / "s").info()
    assert info["n_cells"] == 20 and info["batches"] == {"x": 12, "y": 8}
    assert "preprocess none" in Atlas.open(tmp_path / "s").summary()


def test_same_cells_again_in_the_same_batch_are_refused(tmp_path):
    from scalex_scale.store import DuplicateError

    a = make_adata(30, 10, seed=20, batch="b1")
    a.write_h5ad(tmp_path / "a.h5ad")
    store = tmp_path / "s"
    ingest(store, [tmp_path / "a.h5ad"])
    before = _snapshot(store)
    with pytest.raises(DuplicateError, match="already in batch 'b1'"):
        ingest(store, [a])  # same names, same batch
    with pytest.raises(DuplicateError, match="same file was already added"):
        ingest(store, [tmp_path / "a.h5ad"], batch_names=["other"])  # same file as another batch
    assert _snapshot(store) == before
    report = ingest(store, [tmp_path / "a.h5ad"], batch_names=["other"], allow_duplicates=True)
    assert report.n_cells_added == 30 and report.cells_renamed == 30
    assert Atlas.open(store).n_obs == 60


def test_values_are_checked_after_the_cast_to_float32(tmp_path):
    big = make_adata(6, 4, seed=21)
    x = big.X.toarray().astype(np.float64)
    x[3, 1] = 1e39  # finite in float64, inf in float32
    with pytest.raises(InputError, match=r"beyond float32's range .* cell #3"):
        ingest(tmp_path / "s", [ad.AnnData(sp.csr_matrix(x), obs=big.obs, var=big.var)])
    half = ad.AnnData(big.X.toarray().astype(np.float16), obs=big.obs, var=big.var)  # dense float16 X
    ingest(tmp_path / "h", [half])
    np.testing.assert_array_equal(_read(tmp_path / "h").X.toarray(), big.X.toarray())
    y = sp.random(2000, 50, density=0.05, format="csr", random_state=0, dtype=np.float32)
    y.data[:] = 1
    y.data[y.indptr[1234] + 0] = np.nan  # cell 1234: located through indptr, not by densifying the chunk
    obs = pd.DataFrame(index=[f"r{i}" for i in range(2000)])
    var = pd.DataFrame(index=[f"G{j}" for j in range(50)])
    with pytest.raises(InputError, match="first in cell #1234"):
        ingest(tmp_path / "n", [ad.AnnData(y, obs=obs, var=var)], chunk_rows=700)


def test_state_json_is_checked(tmp_path):
    from scalex_scale.store import transaction

    ingest(tmp_path / "s", [make_adata(10, 5, seed=22)])
    with transaction(tmp_path / "s", "test") as txn:
        state = txn.atlas.state
        state["format_version"] = 7
        txn.atlas.write_state(state)
    with pytest.raises(AtlasFormatError, match="state format_version 7"):
        Atlas.open(tmp_path / "s")


def test_not_an_atlas_hint_names_the_path(tmp_path):
    a = make_adata(10, 5, seed=23)
    for fmt in (2, 3):
        with ad.settings.override(zarr_write_format=fmt):
            a.write_zarr(tmp_path / f"plain{fmt}.zarr")
        with pytest.raises(AtlasFormatError) as err:
            Atlas.open(tmp_path / f"plain{fmt}.zarr")
        assert "{path}" not in str(err.value)
        assert f"scalex-scale ingest NEW_ATLAS {tmp_path / f'plain{fmt}.zarr'}" in str(err.value)


def test_duplicated_cell_names_in_a_file_are_refused_while_streaming(tmp_path):
    """An .h5ad's obs is read in row blocks (not whole): a name repeated blocks apart is still caught, and the
    atlas is left as it was."""
    store = tmp_path / "atlas"
    ingest(store, [make_adata(30, 10, seed=3, batch="ok")])
    before = _snapshot(store)
    b = make_adata(25, 10, seed=4, prefix="z")
    b.obs_names = [f"z{i}" for i in range(24)] + ["z2"]  # the repeat lands in the third chunk of 10
    b.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(InputError, match=r"b.h5ad: duplicated cell names, e.g. \['z2'\]"):
        ingest(store, [tmp_path / "b.h5ad"], batch_names=["b"], chunk_rows=10)
    assert _snapshot(store) == before and not temporaries(store)


def test_append_keeps_obs_columns_and_category_order(tmp_path):
    """Appending streams the atlas' own obs rows: its categories keep their order (sorted when it was made), new
    ones follow, sorted; a column one side lacks is missing there."""
    a = make_adata(20, 10, seed=5, batch="a")
    a.obs["ct"] = pd.Categorical(np.where(np.arange(20) < 8, "T", "B"), categories=["T", "B"])
    a.obs["depth"] = np.arange(20)
    store = tmp_path / "s"
    ingest(store, [a])
    b = make_adata(6, 10, seed=6, prefix="q")
    b.obs["ct"] = ["NK", "Mono", "T", "NK", "B", "Mono"]
    ingest(store, [b], batch_names=["b"], chunk_rows=4)
    back = _read(store).obs
    assert list(back["ct"].cat.categories) == ["B", "T", "Mono", "NK"]
    assert back["ct"].tolist() == a.obs["ct"].tolist() + b.obs["ct"].tolist()
    assert back["depth"].iloc[:20].tolist() == list(range(20)) and back["depth"].iloc[20:].isna().all()
    assert list(back["batch"].cat.categories) == ["a", "b"] and list(back.index[:20]) == list(a.obs_names)


def test_obs_columns_written_later_are_chunked_like_ingest(tmp_path, monkeypatch):
    """write_obs_columns (preprocess' QC flag, transfer's labels) writes row chunks, not one chunk a column, and
    the next ingest streams them back."""
    from scalex_scale.store import atlas as atlas_module
    from scalex_scale.store import transaction

    monkeypatch.setattr(atlas_module, "ROW_CHUNK", 16)
    store = tmp_path / "s"
    ingest(store, [make_adata(50, 8, seed=31, batch="a")])
    labels = pd.Categorical(np.where(np.arange(50) % 3, "x", "y"))
    with transaction(store, "test") as txn:
        txn.atlas.write_obs_columns({"flag": np.arange(50) % 2 == 0, "label": labels})
    obs = zarr.open_group(store / "obs", mode="r")
    assert obs["flag"].chunks == (16,) and obs["label"]["codes"].chunks == (16,)
    ingest(store, [make_adata(20, 8, seed=32, prefix="n", batch="b")])  # appends: streams the chunked columns back
    got = _read(store).obs
    assert got["label"].iloc[:50].astype(str).tolist() == list(labels.astype(str)) and got["label"].iloc[50:].isna().all()
    assert got["flag"].iloc[:50].tolist() == list(np.arange(50) % 2 == 0) and got["flag"].iloc[50:].isna().all()


def test_a_strings_column_of_the_atlas_stays_strings_on_append(tmp_path, monkeypatch):
    """A column the atlas stores as strings (a barcode column, past STRINGS_AFTER distinct values) is streamed back
    by the next append as strings from its first row: no detour through a category dict (which grows with the cells)
    and no switch mid-stream; the new file's values follow."""
    from scalex_scale.store import obs_stream

    monkeypatch.setattr(obs_stream, "STRINGS_AFTER", 8)
    a = make_adata(40, 8, seed=41, batch="a")
    a.obs["barcode"] = [f"bc{i}" for i in range(40)]
    store = tmp_path / "s"
    ingest(store, [a], chunk_rows=10)
    assert dict(zarr.open_group(store / "obs", mode="r")["barcode"].attrs)["encoding-type"] == "string-array"
    switches = []
    real = obs_stream._Column._to_strings
    monkeypatch.setattr(obs_stream._Column, "_to_strings", lambda self: (switches.append(self.name), real(self))[1])
    b = make_adata(12, 8, seed=42, prefix="n", batch="b")
    b.obs["barcode"] = [f"nb{i}" for i in range(12)]
    ingest(store, [b], chunk_rows=5)
    assert switches == []  # started as strings: never coded through categories
    got = _read(store).obs
    assert got["barcode"].tolist() == list(a.obs["barcode"]) + list(b.obs["barcode"])
    assert dict(zarr.open_group(store / "obs", mode="r")["barcode"].attrs)["encoding-type"] == "string-array"
