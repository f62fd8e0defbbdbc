"""store/obs_stream.py: obs written block by block reads back as the outer join pandas would give, and
ObsReader's row blocks equal anndata's whole read (Zarr and HDF5); store/_hashset.py membership."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from anndata.io import read_elem

from scalex_scale.store import _zarr_io, obs_stream
from scalex_scale.store._hashset import HashSet, name_hashes, pair_hashes


def _outer(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The documented join: pandas' outer concat; text, categorical and mixed columns as sorted categoricals,
    a boolean column with gaps nullable-boolean."""
    obs = pd.concat(frames, axis=0, join="outer")
    for col in obs.columns:
        values = obs[col]
        if values.dtype == object and values.dropna().map(lambda v: isinstance(v, bool | np.bool_)).all():
            obs[col] = values.astype("boolean")
        elif values.dtype == object or isinstance(values.dtype, pd.CategoricalDtype):
            obs[col] = values.astype(str).where(values.notna(), None).astype("category")
    return obs


def _frames(rng: np.random.Generator) -> list[pd.DataFrame]:
    n = [700, 450, 900]
    a = pd.DataFrame(
        {
            "ct": pd.Categorical(rng.choice(["T", "B", "NK"], n[0])),
            "s": rng.choice(["x", "y", None], n[0]),
            "i": np.arange(n[0]),
            "f": rng.random(n[0]),
            "b": rng.random(n[0]) < 0.5,
        },  # fmt: skip
        index=[f"a{i}" for i in range(n[0])],
    )
    b = pd.DataFrame(
        {"ct": rng.choice(["B", "Mono"], n[1]).astype(object), "f": rng.random(n[1]), "extra": 1.5},
        index=[f"b{i}" for i in range(n[1])],
    )
    c = pd.DataFrame(
        {"i": np.arange(n[2]) * 2, "b": rng.random(n[2]) < 0.1, "s": pd.Categorical(rng.choice(["z", "x"], n[2]))},
        index=[f"c{i}" for i in range(n[2])],
    )
    return [a, b, c]


def _write(tmp_path, frames: list[pd.DataFrame], block: int, order=None) -> pd.DataFrame:
    root = zarr.open_group(tmp_path / "o.zarr", mode="w", zarr_format=3)
    writer = obs_stream.ObsWriter(root)
    for frame in frames:
        for start in range(0, frame.shape[0], block):
            writer.append(frame.iloc[start : start + block])
    writer.finish(order)
    assert obs_stream.STAGE not in root
    return read_elem(root["obs"])


@pytest.mark.parametrize("block", [64, 333, 5000])
def test_streamed_obs_is_the_outer_join(tmp_path, monkeypatch, block):
    monkeypatch.setattr(obs_stream, "ROW_CHUNK", 256)  # several chunks per column, blocks across chunk edges
    frames = _frames(np.random.default_rng(0))
    got = _write(tmp_path, frames, block)
    want = _outer(frames)
    assert list(got.columns) == list(want.columns)
    assert list(got.index) == list(want.index)
    for col in want.columns:
        if isinstance(want[col].dtype, pd.CategoricalDtype):
            assert list(got[col].cat.categories) == list(want[col].cat.categories), col
            assert (
                got[col].astype(object).where(got[col].notna(), None).tolist()
                == want[col].astype(object).where(want[col].notna(), None).tolist()
            ), col
        else:
            assert got[col].dtype == want[col].dtype, col
            pd.testing.assert_series_equal(got[col], want[col], check_names=False)
    assert str(got["i"].dtype) == "float64" and str(got["b"].dtype) == "boolean"  # gaps: NaN and <NA>


def test_type_change_mid_stream_becomes_text_and_orders_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(obs_stream, "ROW_CHUNK", 8)
    a = pd.DataFrame({"donor": np.arange(20) % 3, "batch": ["p"] * 20}, index=[f"a{i}" for i in range(20)])
    b = pd.DataFrame({"donor": ["d9"] * 5, "batch": ["o"] * 5}, index=[f"b{i}" for i in range(5)])
    got = _write(tmp_path, [a, b], 7, {"batch": ["p", "o"]})
    assert got["donor"].tolist() == [str(v) for v in np.arange(20) % 3] + ["d9"] * 5
    assert list(got["donor"].cat.categories) == ["0", "1", "2", "d9"]
    assert list(got["batch"].cat.categories) == ["p", "o"]  # a given order, not sorted


def test_adopted_categories_stay_first(tmp_path):
    root = zarr.open_group(tmp_path / "o.zarr", mode="w", zarr_format=3)
    writer = obs_stream.ObsWriter(root)
    writer.adopt_categories({"ct": ["z", "a"]})
    writer.append(pd.DataFrame({"ct": ["a", "m", "b"]}, index=["x", "y", "w"]))
    writer.finish()
    assert list(read_elem(root["obs"])["ct"].cat.categories) == ["z", "a", "b", "m"]


def test_a_column_unique_per_cell_is_stored_as_strings(tmp_path, monkeypatch):
    """A barcode-like column (distinct values past STRINGS_AFTER, most rows distinct) leaves its categories (memory
    growing with the cells) for strings mid-stream; values, gaps and an always-categorical column survive."""
    monkeypatch.setattr(obs_stream, "ROW_CHUNK", 16)
    monkeypatch.setattr(obs_stream, "STRINGS_AFTER", 40)
    n = 300
    a = pd.DataFrame(
        {"barcode": [f"bc{i}" for i in range(n)], "ct": np.where(np.arange(n) % 2, "T", "B"), "batch": [f"b{i}" for i in range(n)]},
        index=[f"a{i}" for i in range(n)],
    )  # fmt: skip
    b = pd.DataFrame({"ct": ["NK"] * 20, "batch": ["z"] * 20}, index=[f"x{i}" for i in range(20)])  # no barcode: gaps
    root = zarr.open_group(tmp_path / "o.zarr", mode="w", zarr_format=3)
    writer = obs_stream.ObsWriter(root, categorical=("batch",))
    for start in range(0, n, 25):
        writer.append(a.iloc[start : start + 25])
    col = writer.columns["barcode"]
    assert col.kind == "str" and col.cats == {}  # switched, categories dropped
    assert writer.columns["ct"].kind == "text" and writer.columns["batch"].kind == "text"
    writer.append(b)
    writer.finish()
    assert dict(root["obs"]["barcode"].attrs)["encoding-type"] == "nullable-string-array"
    got = read_elem(root["obs"])
    assert got["barcode"].astype(object).where(got["barcode"].notna(), None).tolist() == list(a["barcode"]) + [None] * 20
    assert list(got["ct"].cat.categories) == ["B", "NK", "T"] and got["ct"].tolist() == list(a["ct"]) + ["NK"] * 20
    assert isinstance(got["batch"].dtype, pd.CategoricalDtype) and len(got["batch"].cat.categories) == n + 1
    reader = obs_stream.ObsReader(root["obs"])  # the next append reads it back in blocks
    back = pd.concat([reader.read(s, min(s + 33, n + 20)) for s in range(0, n + 20, 33)])
    assert back["barcode"].tolist() == list(a["barcode"]) + [None] * 20
    root2 = zarr.open_group(tmp_path / "p.zarr", mode="w", zarr_format=3)
    writer = obs_stream.ObsWriter(root2)
    writer.append(a[["barcode"]])  # no gaps: a plain string-array
    writer.finish()
    assert dict(root2["obs"]["barcode"].attrs)["encoding-type"] == "string-array"
    assert read_elem(root2["obs"])["barcode"].tolist() == list(a["barcode"])


def test_text_columns_stage_no_mask(tmp_path):
    root = zarr.open_group(tmp_path / "o.zarr", mode="w", zarr_format=3)
    writer = obs_stream.ObsWriter(root)
    writer.append(pd.DataFrame({"n": [1.0, 2.0], "s": ["a", None]}, index=["x", "y"]))
    writer.append(pd.DataFrame({"n": ["t", "u"]}, index=["z", "w"]))  # n: number -> text mid-stream
    assert sorted(k for k in writer.stage.array_keys() if "mask" in k) == []
    assert writer.columns["n"].mask is None and writer.columns["s"].any_missing
    writer.finish()
    got = read_elem(root["obs"])
    assert got["n"].tolist() == ["1", "2", "t", "u"] and got["s"].astype(object).where(got["s"].notna(), None).tolist() == ["a", None, None, None]


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_reader_blocks_equal_anndata_read(tmp_path, fmt):
    rng = np.random.default_rng(1)
    n = 300
    obs = pd.DataFrame(
        {
            "ct": pd.Categorical(rng.choice(["T", "B"], n)),
            "i": np.arange(n),
            "f": rng.random(n),
            "nb": pd.array(np.where(rng.random(n) < 0.2, None, rng.random(n) < 0.5), dtype="boolean"),
            "ni": pd.array(np.where(rng.random(n) < 0.2, None, np.arange(n)), dtype="Int64"),
            "s": rng.choice(["p", "q"], n).astype(object),
        },  # fmt: skip
        index=[f"cell{i}" for i in range(n)],
    )
    adata = ad.AnnData(sp.csr_matrix((n, 3), dtype=np.float32), obs=obs)
    path = tmp_path / f"a.{fmt}"
    if fmt == "h5ad":
        import h5py

        adata.write_h5ad(path)
        group = h5py.File(path, "r")
    else:
        adata.write_zarr(path)
        group = zarr.open_group(path, mode="r")
    whole = read_elem(group["obs"])
    reader = obs_stream.ObsReader(group["obs"])
    assert reader.n_obs == n and reader.categories["ct"] == list(whole["ct"].cat.categories)
    got = pd.concat([reader.read(s, min(s + 77, n)) for s in range(0, n, 77)])
    assert list(got.index) == list(whole.index)
    for col in whole.columns:
        assert (
            got[col].astype(object).where(got[col].notna(), None).tolist()
            == whole[col].astype(object).where(whole[col].notna(), None).tolist()
        ), col


def test_blocked_reads_a_large_chunk_once(tmp_path):
    root = zarr.open_group(tmp_path / "b.zarr", mode="w", zarr_format=3)
    arr = root.create_array("a", shape=(3 * _zarr_io.ROW_CHUNK,), chunks=(3 * _zarr_io.ROW_CHUNK,), dtype=np.int64)
    arr[:] = np.arange(arr.shape[0])
    blocked = obs_stream._Blocked(arr)
    assert blocked.block == 3 * _zarr_io.ROW_CHUNK
    np.testing.assert_array_equal(blocked(5, 9), np.arange(5, 9))
    cached = blocked._cache
    np.testing.assert_array_equal(
        blocked(2 * _zarr_io.ROW_CHUNK, 2 * _zarr_io.ROW_CHUNK + 3), 2 * _zarr_io.ROW_CHUNK + np.arange(3)
    )
    assert blocked._cache is cached  # the same block, not read again


def test_hashset_membership_across_merged_runs():
    rng = np.random.default_rng(0)
    s = HashSet()
    members = [rng.integers(0, 2**63, size=int(k), dtype=np.uint64) for k in rng.integers(1, 500, size=40)]
    for m in members:
        s.add(m)
    every = np.concatenate(members)
    assert len(s.runs) < 12 and len(s) == np.unique(every).size
    assert s.contains(every).all()
    others = rng.integers(0, 2**63, size=5000, dtype=np.uint64)
    assert not s.contains(np.setdiff1d(others, every)).any()


def test_hashes_are_stable_and_pairs_differ_by_batch():
    names = np.asarray(["c1", "c2"], dtype=object)
    np.testing.assert_array_equal(name_hashes(names), name_hashes(names.copy()))
    assert (pair_hashes(names, np.asarray(["a", "a"])) != pair_hashes(names, np.asarray(["b", "b"]))).all()
