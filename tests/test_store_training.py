"""store/training.py: the permuted writer keeps every row whole whatever the bucket count, its permutation does
not depend on how the rows were fed, and the bucket count stays within the process's open-file limit."""

from __future__ import annotations

import types

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from scalex_scale.store import training
from scalex_scale.store.atlas import STATE_GROUP


def _rows(n: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = sp.random(n, 50, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    x.data = np.round(x.data, 3).astype(np.float32)
    return x


def _write(tmp_path, x: sp.csr_matrix, *, bucket_values: int, feed: int, seed: int = 7, name: str = "a"):
    root = zarr.open_group(tmp_path / f"{name}.zarr", mode="w")
    root.require_group(STATE_GROUP)
    w = training.PermutedWriter(tmp_path / f"{name}.spill", int(x.nnz), np.random.default_rng(seed), n_features=50,
                                bucket_values=bucket_values)  # fmt: skip
    for start in range(0, x.shape[0], feed):
        piece = x[start : start + feed]
        cells = np.arange(start, start + piece.shape[0])
        w.add(piece.indptr, piece.indices, piece.data.astype(np.float16), cells, cells % 3)
    w.finish(types.SimpleNamespace(root=root), {"test": name})
    assert not (tmp_path / f"{name}.spill").exists()
    m = training.TrainingMatrix(root[STATE_GROUP][training.GROUP], n_domains=3)
    indptr, indices, data, batch = m.read(0, m.n_rows)
    got = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int64), indptr), shape=(m.n_rows, 50))
    return m.cells, batch, got, w.n_buckets


@pytest.mark.parametrize("bucket_values", [1 << 26, 500, 37])
def test_every_row_lands_whole_in_a_permutation(tmp_path, bucket_values):
    x = _rows(400)
    cells, batch, got, n_buckets = _write(tmp_path, x, bucket_values=bucket_values, feed=64)
    assert n_buckets == max(1, -(-x.nnz // bucket_values)) or n_buckets == training.max_open_buckets()
    assert sorted(cells) == list(range(400)) and not np.array_equal(cells, np.arange(400))
    np.testing.assert_array_equal(batch, cells % 3)
    expected = x[cells]
    expected.data = expected.data.astype(np.float16).astype(np.float32)
    assert abs(got - expected).max() == 0


def test_permutation_does_not_depend_on_how_rows_are_fed(tmp_path):
    """The same rows in pieces of 17 or of 400 give the same matrix (the bucket draw is per row, in row order)."""
    x = _rows(400, seed=1)
    a = _write(tmp_path, x, bucket_values=300, feed=17, name="a")
    b = _write(tmp_path, x, bucket_values=300, feed=400, name="b")
    np.testing.assert_array_equal(a[0], b[0])
    assert abs(a[2] - b[2]).max() == 0


def test_bucket_count_is_capped_by_open_files():
    assert training.n_buckets(10**12, 1 << 23, 1000) == 1000  # 119,210 buckets of 2**23 would need 119,210 files
    assert training.n_buckets(10**9, 1 << 23, 1000) == 120 and training.n_buckets(0, 1 << 23, 1000) == 1
    assert training.max_open_buckets() >= 16
