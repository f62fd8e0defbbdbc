"""TileDB-SOMA inputs (``scalex_scale.store.readers_soma``): equality with AnnData ingest, filters, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scalex_scale.cli import main
from scalex_scale.store import InputError, ingest
from scalex_scale.store.readers_soma import INSTALL_HINT, is_soma_uri, open_soma
from scalex_scale.store.txn import temporaries

from conftest import make_adata


def _adata(n_cells: int = 90, n_genes: int = 30, seed: int = 4) -> ad.AnnData:
    a = make_adata(n_cells, n_genes, seed=seed)
    rng = np.random.default_rng(seed)
    a.obs["dataset_id"] = pd.Categorical(np.array(["d1", "d2", "d3"])[np.arange(n_cells) * 3 // n_cells])
    a.obs["n_umis"] = rng.integers(0, 1000, n_cells).astype(np.int64)
    a.obs["score"] = rng.random(n_cells)
    a.obs["is_primary"] = rng.random(n_cells) < 0.7
    a.obs["donor"] = np.array([f"donor{i % 4}" for i in range(n_cells)], dtype=object)
    return a


@pytest.fixture(scope="module")
def soma_exp(tmp_path_factory) -> tuple[str, ad.AnnData]:
    tio = pytest.importorskip("tiledbsoma.io")
    a = _adata()
    uri = str(tmp_path_factory.mktemp("soma") / "exp")
    tiles = {"tiledb": {"create": {"dims": {"soma_dim_0": {"tile": 8}, "soma_dim_1": {"tile": 8}}}}}
    tio.from_anndata(uri, a, "RNA", X_layer_name="raw", platform_config=tiles)  # small tiles, as in the Census
    return uri, a  # (X then comes back tile by tile, not row by row)


def _read(path: Path) -> ad.AnnData:
    return ad.read_zarr(path)


def _assert_same_atlas(soma_store: Path, direct_store: Path) -> None:
    s, d = _read(soma_store), _read(direct_store)
    assert s.shape == d.shape
    assert list(s.var_names) == list(d.var_names)
    assert list(s.obs_names) == list(d.obs_names)
    for attr in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(s.X, attr), getattr(d.X, attr))
    assert s.X.dtype == d.X.dtype
    pd.testing.assert_frame_equal(s.obs.drop(columns="soma_joinid"), d.obs, check_categorical=False)
    assert list(s.obs["batch"].cat.categories) == list(d.obs["batch"].cat.categories)


def test_equals_anndata_ingest_cell_for_cell(soma_exp, tmp_path):
    uri, a = soma_exp
    r_soma = ingest(tmp_path / "soma", [uri], batch_key="dataset_id", chunk_rows=7)
    r_direct = ingest(tmp_path / "direct", [a], batch_key="dataset_id", chunk_rows=7)
    assert r_soma.batches_added == r_direct.batches_added == {"d1": 30, "d2": 30, "d3": 30}
    _assert_same_atlas(tmp_path / "soma", tmp_path / "direct")
    back = _read(tmp_path / "soma")
    np.testing.assert_array_equal(back.obs["soma_joinid"].to_numpy(), np.arange(a.n_obs))  # kept: back to the row


def test_obs_filter_and_cli_flags(soma_exp, tmp_path):
    uri, a = soma_exp
    expr = "dataset_id != 'd2' and score > 0.4 and is_primary == True"  # non-contiguous joinids
    keep = (a.obs["dataset_id"] != "d2") & (a.obs["score"] > 0.4) & a.obs["is_primary"]
    assert 5 < keep.sum() < 60
    ingest(tmp_path / "direct", [a[keep.to_numpy()].copy()], batch_key="dataset_id", chunk_rows=4)
    store = tmp_path / "soma"
    argv = ["ingest", str(store), f"soma://{uri}", "--batch-key", "dataset_id", "--obs-filter", expr]
    assert main([*argv, "--measurement", "RNA", "--layer", "raw"]) == 0
    _assert_same_atlas(store, tmp_path / "direct")
    np.testing.assert_array_equal(_read(store).obs["soma_joinid"].to_numpy(), np.flatnonzero(keep))


def test_append_from_soma_then_failure_rolls_back(soma_exp, tmp_path, monkeypatch):
    uri, a = soma_exp
    store = tmp_path / "s"
    ingest(store, [uri], obs_filter="dataset_id == 'd1'", batch_key="dataset_id")
    ingest(store, [uri], obs_filter="dataset_id == 'd3'", batch_key="dataset_id")
    back = _read(store)
    assert back.n_obs == 60 and list(back.obs["batch"].cat.categories) == ["d1", "d3"]
    np.testing.assert_array_equal(back.X[30:].toarray(), a.X[60:].toarray())
    before = {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}

    from scalex_scale.store import readers_soma

    real = readers_soma._BlockReader.read
    calls = []

    def flaky(self, ids):
        calls.append(ids.size)
        if len(calls) == 3:
            raise InputError(f"{self.name}: simulated read failure")
        return real(self, ids)

    monkeypatch.setattr(readers_soma._BlockReader, "read", flaky)
    with pytest.raises(InputError, match="simulated read failure"):
        ingest(store, [uri], obs_filter="dataset_id == 'd2'", batch_key="dataset_id", chunk_rows=10)
    after = {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    assert after == before and not temporaries(store)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"measurement": "ATAC"}, r"no measurement 'ATAC' \(measurements: RNA\)"),
        ({"layer": "counts"}, r"measurement 'RNA' has no X layer 'counts' \(layers: raw\)"),
        ({"obs_filter": "dataset_id == 'lung'"}, r"obs filter \"dataset_id == 'lung'\" matches no cell"),
        ({"obs_filter": "dataset_id === 'd1'"}, r"bad obs filter .*parse"),
        ({"obs_filter": "tissue == 'blood'"}, r"bad obs filter .*tissue.*obs columns: soma_joinid, obs_id"),
    ],
)
def test_clear_errors(soma_exp, tmp_path, kwargs, match):
    uri, _ = soma_exp
    with pytest.raises(InputError, match=match) as info:
        ingest(tmp_path / "s", [uri], **kwargs)
    message = str(info.value)
    assert message.startswith(f"{uri}: ") and "\n" not in message
    assert not (tmp_path / "s").exists()


def test_not_an_experiment_and_missing(soma_exp, tmp_path):
    uri, _ = soma_exp
    with pytest.raises(InputError, match="is a SOMA Collection, not an Experiment"):
        open_soma(f"{uri}/ms")
    with pytest.raises(InputError, match="no SOMA experiment there"):
        open_soma(f"soma://{tmp_path / 'nothing'}")


def test_soma_options_on_other_inputs_are_an_error(tmp_path):
    with pytest.raises(InputError, match="obs_filter apply to TileDB-SOMA experiments only"):
        ingest(tmp_path / "s", [make_adata(10, 5)], obs_filter="x == 1")
    assert not (tmp_path / "s").exists()


def test_detection_rule(soma_exp, tmp_path):
    uri, a = soma_exp
    a.write_zarr(tmp_path / "a.zarr")
    assert is_soma_uri(uri) and is_soma_uri(Path(uri)) and is_soma_uri("soma:///anywhere")
    assert is_soma_uri("s3://bucket/census/homo_sapiens") and is_soma_uri("tiledb://ns/exp")
    assert not is_soma_uri("file:///x.h5ad") and not is_soma_uri(tmp_path / "a.zarr") and not is_soma_uri("a.h5ad")


def test_names_feature_name_and_joinid(tmp_path):
    tio = pytest.importorskip("tiledbsoma.io")
    a = make_adata(12, 6, seed=5)
    a.var["feature_name"] = ["CD3E", "CD4", "CD4", "MS4A1", "LYZ", "NKG7"]  # symbols need not be unique
    tio.from_anndata(str(tmp_path / "exp"), a, "RNA", X_layer_name="raw", obs_id_name="barcode", var_id_name="ensembl")
    src = open_soma(str(tmp_path / "exp"))
    assert list(src.var_names) == ["CD3E", "CD4", "CD4-1", "MS4A1", "LYZ", "NKG7"]
    (x, obs), = src.iter_chunks(100)
    src.close()
    assert list(obs.index) == [str(i) for i in range(12)]  # no obs_id column: the soma_joinid names the cell
    assert list(obs["barcode"]) == list(a.obs_names)
    np.testing.assert_array_equal(x.toarray(), a.X.toarray())
    src = open_soma(str(tmp_path / "exp"), var_key="ensembl")
    assert list(src.var_names) == list(a.var_names)
    src.close()
    with pytest.raises(InputError, match="var has no column 'gene_ids'"):
        open_soma(str(tmp_path / "exp"), var_key="gene_ids")


def test_missing_tiledbsoma_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # makes `import tiledbsoma` raise ImportError
    with pytest.raises(InputError, match="needs the optional package tiledbsoma") as info:
        ingest(tmp_path / "s", ["soma:///data/census/homo_sapiens"], batch_key="dataset_id")
    assert str(info.value) == (
        "soma:///data/census/homo_sapiens: reading a TileDB-SOMA experiment needs the optional package tiledbsoma: "
        f"{INSTALL_HINT}"
    )
    assert 'pip install "scalex-scale[soma]"' in INSTALL_HINT


def test_block_to_csr_any_tiledb_order():
    from scalex_scale.store.readers_soma import _csr

    rng = np.random.default_rng(6)
    dense = (rng.random((40, 25)) < 0.2) * rng.integers(1, 9, (40, 25)).astype(np.float32)
    rows, cols = np.nonzero(dense)
    for order in (np.arange(rows.size), rng.permutation(rows.size), np.lexsort((rows, cols))):  # CSR, any, by column
        out = _csr(rows[order].astype(np.int32), cols[order].astype(np.int32), dense[rows, cols][order], 40, 25)
        assert out.has_sorted_indices and out.shape == (40, 25)
        np.testing.assert_array_equal(out.toarray(), dense)
