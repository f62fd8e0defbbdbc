"""store/training.py: the permuted writer keeps every row whole whatever the bucket count, its permutation does
not depend on how the rows were fed or how often its pending buffer is flushed, its spill is written per flush
(not per add and bucket), and the bucket count stays within the process's open-file limit."""

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


def _feed(w: training.PermutedWriter, x: sp.csr_matrix, feed: int) -> None:
    for start in range(0, x.shape[0], feed):
        piece = x[start : start + feed]
        cells = np.arange(start, start + piece.shape[0])
        w.add(piece.indptr, piece.indices, piece.data.astype(np.float16), cells, cells % 3)


def _write(tmp_path, x: sp.csr_matrix, *, bucket_values: int, feed: int, seed: int = 7, name: str = "a", **kw):
    root = zarr.open_group(tmp_path / f"{name}.zarr", mode="w")
    root.require_group(STATE_GROUP)
    w = training.PermutedWriter(tmp_path / f"{name}.spill", int(x.nnz), np.random.default_rng(seed), n_features=50,
                                bucket_values=bucket_values, **kw)  # fmt: skip
    _feed(w, x, feed)
    train_id = w.finish(types.SimpleNamespace(root=root), {"test": "same"})
    assert not (tmp_path / f"{name}.spill").exists()
    m = training.TrainingMatrix(root[STATE_GROUP][training.GROUP], n_domains=3)
    indptr, indices, data, batch = m.read(0, m.n_rows)
    got = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int64), indptr), shape=(m.n_rows, 50))
    return m.cells, batch, got, w.n_buckets, train_id, w


@pytest.mark.parametrize("bucket_values", [1 << 26, 500, 37])
def test_every_row_lands_whole_in_a_permutation(tmp_path, bucket_values):
    x = _rows(400)
    cells, batch, got, n_buckets, *_ = _write(tmp_path, x, bucket_values=bucket_values, feed=64)
    wanted = max(1, -(-x.nnz // bucket_values))
    assert n_buckets == wanted or n_buckets == training.max_open_buckets(wanted)
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


def test_open_file_limit_is_raised_only_when_needed():
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * training.FD_RESERVE + 64:
        pytest.skip("hard open-file limit too low to test")
    low = training.FD_RESERVE + 64
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        assert training.max_open_buckets(10) == 64 and resource.getrlimit(resource.RLIMIT_NOFILE)[0] == low
        assert training.max_open_buckets(100) == 100  # raised as far as needed, no further
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == training.FD_RESERVE + 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("bucket_values", [1 << 26, 300, 37])
def test_output_does_not_depend_on_flush_values(tmp_path, bucket_values):
    """Flushing after every add or once at finish writes the same bytes: rows keep their add order per bucket."""
    x = _rows(400, seed=2)
    every = _write(tmp_path, x, bucket_values=bucket_values, feed=17, name="every", flush_values=1)
    some = _write(tmp_path, x, bucket_values=bucket_values, feed=17, name="some", flush_values=1000)
    once = _write(tmp_path, x, bucket_values=bucket_values, feed=17, name="once", flush_values=1 << 40)
    assert every[5].n_flushes == -(-400 // 17) and once[5].n_flushes == 1 and 1 < some[5].n_flushes < 24
    for other in (some, once):
        np.testing.assert_array_equal(every[0], other[0])
        np.testing.assert_array_equal(every[1], other[1])
        for f in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(every[2], f), getattr(other[2], f))
        assert every[4] == other[4]  # the same id


def _records(w: training.PermutedWriter, b: int) -> int:
    raw = (w.dir / f"{b}.spill").read_bytes()
    pos = count = 0
    while pos < len(raw):
        rows, values = np.frombuffer(raw[pos : pos + 16], np.int64)
        assert rows > 0  # no empty records
        pos += 16 + int(rows) * (4 + 8 + 4) + int(values) * (2 + 2)
        count += 1
    assert pos == len(raw)
    return count


@pytest.mark.parametrize("flush_values", [1000, 1 << 40])
def test_writes_are_per_flush_not_per_add(tmp_path, flush_values):
    """Each flush writes at most one record per bucket, and a flush happens only once ``flush_values`` values are
    pending (or at finish): the spill's records do not grow with (adds x buckets)."""
    x = _rows(400, seed=3)
    w = training.PermutedWriter(tmp_path / "s.spill", int(x.nnz), np.random.default_rng(5), n_features=50,
                                bucket_values=150, flush_values=flush_values)  # fmt: skip
    _feed(w, x, 17)  # 24 adds of ~170 values into ~27 buckets
    w._flush()  # what finish does first
    for fh in w._files:
        fh.flush()
    assert w.n_buckets > 20 and 1 <= w.n_flushes <= -(-x.nnz // flush_values) + 1
    records = [_records(w, b) for b in range(w.n_buckets)]
    assert max(records) <= w.n_flushes and sum(records) <= w.n_flushes * w.n_buckets
    if w.n_flushes == 1:
        assert records == [1] * w.n_buckets  # every bucket got rows, each in one record
    assert w.n_rows == 400 and w._pending_values == 0
    w.abort()
    assert not (tmp_path / "s.spill").exists()
