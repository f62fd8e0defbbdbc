"""TrainingLoader: correct rows, determinism across thread settings, resume, errors, shutdown."""

from __future__ import annotations

import threading
import time
import traceback

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scalex_scale.data import CSRBatch, InMemorySource, LoaderConfig, TrainingLoader, TrainingSource
from scalex_scale.data.samplers import batch_composition_tv

N_ROWS, N_FEATURES, N_DOMAINS = 3000, 37, 5


def _matrix(dtype=np.float32, n_rows: int = N_ROWS, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = sp.random(n_rows, N_FEATURES, density=0.15, format="csr", dtype=np.float32, random_state=seed)
    x.data = rng.random(x.nnz, dtype=np.float32)  # values in [0, 1), as the scaled store
    x.data = x.data.astype(dtype)
    domain = rng.integers(0, N_DOMAINS, n_rows).astype(np.int32)
    return x, domain


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny CPU densifies with several OpenMP threads can take ~20 ms each on an oversubscribed host.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return _matrix()


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("scalex-loader")]


def _wait_no_threads(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _loader_threads()


def _check_epoch(loader: TrainingLoader, x, domain, epoch: int, start_batch: int = 0) -> int:
    dense = x.astype(np.float32).toarray()
    expected = list(loader.sampler.batch_rows(epoch, start_batch))
    n = 0
    with loader.epoch(epoch, start_batch) as batches:
        assert len(batches) == len(expected)
        for batch, rows in zip(batches, expected, strict=True):
            assert isinstance(batch, CSRBatch)
            assert batch.indices.dtype == torch.int32 and batch.domain.dtype == torch.int64
            assert batch.indptr.dtype == torch.int64 and batch.values.dtype == torch.from_numpy(x.data).dtype
            xb, db = batch.to_dense("cpu")
            np.testing.assert_array_equal(xb.numpy(), dense[rows])
            np.testing.assert_array_equal(db.numpy(), domain[rows])
            n += 1
    return n


def test_in_memory_source_is_a_training_source(data):
    x, domain = data
    source = InMemorySource(x, domain)
    assert isinstance(source, TrainingSource)
    assert (source.n_rows, source.n_features, source.n_domains) == (N_ROWS, N_FEATURES, N_DOMAINS)
    indptr, indices, values, dom = source.read(10, 20)
    assert indptr[0] == 0 and len(indptr) == 11 and indptr.dtype == np.int64
    np.testing.assert_array_equal(sp.csr_matrix((values, indices, indptr), shape=(10, N_FEATURES)).toarray(),
                                  x[10:20].toarray())
    np.testing.assert_array_equal(dom, domain[10:20])
    with pytest.raises(IndexError):
        source.read(0, N_ROWS + 1)


@pytest.mark.parametrize("drop_last", [True, False])
def test_yields_the_planned_rows(data, drop_last):
    x, domain = data
    loader = TrainingLoader(
        InMemorySource(x, domain),
        LoaderConfig(batch_size=64, shard_size=100, buffer_shards=3, drop_last=drop_last, seed=5),
    )
    n = _check_epoch(loader, x, domain, epoch=1)
    assert n == loader.batches_per_epoch == len(loader)
    if not drop_last:
        rows = np.concatenate(list(loader.sampler.batch_rows(1)))
        np.testing.assert_array_equal(np.sort(rows), np.arange(N_ROWS))


def test_float16_uint16_source():
    x, domain = _matrix(np.float16)
    source = InMemorySource.from_arrays(x.indptr, x.indices.astype(np.uint16), x.data, domain, N_FEATURES)
    assert source.read(0, 5)[1].dtype == np.uint16 and source.read(0, 5)[2].dtype == np.float16
    loader = TrainingLoader(source, LoaderConfig(batch_size=100, shard_size=256, buffer_shards=2, seed=0))
    _check_epoch(loader, x, domain, epoch=0)


def test_same_batches_for_any_thread_setting(data):
    x, domain = data
    source = InMemorySource(x, domain)
    runs = []
    for prefetch, workers in [(1, 1), (2, 2), (4, 3)]:
        loader = TrainingLoader(
            source,
            LoaderConfig(
                batch_size=50, shard_size=128, buffer_shards=2, seed=9, prefetch=prefetch, num_workers=workers
            ),
        )
        runs.append([b.to_dense("cpu")[0] for b in loader.epoch(2)])
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_resume_and_iter(data):
    x, domain = data
    loader = TrainingLoader(
        InMemorySource(x, domain), LoaderConfig(batch_size=64, shard_size=100, buffer_shards=3, seed=5)
    )
    n = loader.batches_per_epoch
    for k in (1, 7, n - 1, n):
        assert _check_epoch(loader, x, domain, epoch=3, start_batch=k) == n - k
    first = next(iter(loader))
    expected = next(loader.sampler.batch_rows(0))
    np.testing.assert_array_equal(first.to_dense("cpu")[1].numpy(), domain[expected])
    _wait_no_threads()


def test_ranks_are_disjoint_with_equal_counts(data):
    x, domain = data
    source = InMemorySource(x, domain)
    seen, counts = [], []
    for rank in range(3):
        loader = TrainingLoader(
            source, LoaderConfig(batch_size=64, shard_size=100, buffer_shards=2), rank=rank, world_size=3
        )
        counts.append(_check_epoch(loader, x, domain, epoch=0))
        seen.append(np.concatenate(list(loader.sampler.batch_rows(0))))
    assert len(set(counts)) == 1
    rows = np.concatenate(seen)
    assert len(np.unique(rows)) == len(rows)


class _FailingSource:
    """Raises from ``read`` on its ``fail_at``-th call."""

    def __init__(self, inner: InMemorySource, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.n_rows, self.n_features, self.n_domains = inner.n_rows, inner.n_features, inner.n_domains

    def read(self, start: int, stop: int):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise OSError(f"disk on fire at rows {start}:{stop}")
        return self.inner.read(start, stop)


def test_read_errors_propagate_with_traceback(data):
    x, domain = data
    source = _FailingSource(InMemorySource(x, domain), fail_at=4)
    loader = TrainingLoader(source, LoaderConfig(batch_size=32, shard_size=100, buffer_shards=1, seed=0))
    got = 0
    with pytest.raises(OSError, match="disk on fire") as info:
        for _ in loader.epoch(0):
            got += 1
    assert 0 < got < loader.batches_per_epoch
    frames = "".join(traceback.format_tb(info.value.__traceback__))
    assert "in _load" in frames and "in read" in frames  # the reader thread's frames are kept
    assert 'raise OSError(f"disk on fire' in frames
    _wait_no_threads()


def test_bad_source_output_is_reported(data):
    x, domain = data

    class Short(_FailingSource):
        def read(self, start, stop):
            indptr, indices, values, dom = self.inner.read(start, stop)
            return indptr, indices, values, dom[:-1]

    loader = TrainingLoader(Short(InMemorySource(x, domain), 10**9), LoaderConfig(batch_size=32, shard_size=100))
    with pytest.raises(ValueError, match="source.read"):
        next(iter(loader))
    _wait_no_threads()


class _SlowSource(InMemorySource):
    def read(self, start, stop):
        time.sleep(0.002)
        return super().read(start, stop)


def test_early_break_does_not_hang(data):
    x, domain = data
    loader = TrainingLoader(
        _SlowSource(x, domain),
        LoaderConfig(batch_size=16, shard_size=50, buffer_shards=1, prefetch=3, num_workers=2, seed=0),
    )
    for i, _ in enumerate(loader.epoch(0)):
        if i == 2:
            break
    _wait_no_threads()  # the iterator was dropped: its finalizer stopped and joined the threads
    it = loader.epoch(1)
    next(it)
    time.sleep(0.05)  # let the queue fill up: the producer blocks on a full queue
    t = time.monotonic()
    it.close()
    assert time.monotonic() - t < 2
    assert not _loader_threads()
    with pytest.raises(StopIteration):
        next(it)


def test_consumer_exception_inside_with_stops_threads(data):
    x, domain = data
    loader = TrainingLoader(InMemorySource(x, domain), LoaderConfig(batch_size=16, shard_size=50, seed=0))
    with pytest.raises(KeyError):
        with loader.epoch(0) as batches:
            for _ in batches:
                raise KeyError("training step failed")
    assert not _loader_threads()


def test_unstarted_iterator_starts_no_threads(data):
    x, domain = data
    loader = TrainingLoader(InMemorySource(x, domain), LoaderConfig(batch_size=16, shard_size=50, seed=0))
    it = loader.epoch(0)
    assert not _loader_threads()
    it.close()


def test_config_validation(data):
    x, domain = data
    source = InMemorySource(x, domain)
    with pytest.raises(ValueError, match="prefetch"):
        TrainingLoader(source, LoaderConfig(prefetch=0))
    with pytest.raises(ValueError, match="start_batch"):
        TrainingLoader(source, LoaderConfig(batch_size=64)).epoch(0, start_batch=10**6)
    loader = TrainingLoader(source, LoaderConfig(batch_size=128, shard_size=512))
    assert loader.batches_per_epoch == N_ROWS // 128
    for field in ("batch_size", "shard_size", "buffer_shards", "num_workers"):
        with pytest.raises(ValueError, match=f"LoaderConfig.{field}"):
            LoaderConfig(**{field: 0})
    with pytest.raises(TypeError, match="LoaderConfig"):
        TrainingLoader(source, {"batch_size": 64})  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            TrainingLoader(source, pin_memory=True)


def test_loader_from_train_config(data):
    """TrainConfig's batch_size and seed plus TrainConfig.loader's knobs make the loader; runtime args stay apart."""
    from scalex_scale.train import TrainConfig

    x, domain = data
    source = InMemorySource(x, domain)
    knobs = LoaderConfig(shard_size=100, buffer_shards=3, drop_last=False, num_workers=1, prefetch=3)
    train = TrainConfig(batch_size=48, seed=7, loader=knobs)
    loader = TrainingLoader.from_train_config(source, train, rank=1, world_size=2)
    assert loader.config == LoaderConfig(48, 100, 3, False, 7, 3, 1, True) == train.loader_config()
    assert (loader.rank, loader.world_size, loader.pin_memory) == (1, 2, False)
    direct = TrainingLoader(source, train.loader_config(), rank=1, world_size=2)
    assert [r.tolist() for r in loader.sampler.batch_rows(0)] == [r.tolist() for r in direct.sampler.batch_rows(0)]
    _check_epoch(loader, x, domain, epoch=0)


def test_batch_composition_tv_on_a_prepermuted_source():
    """Loader batches on a store in random row order mix domains like i.i.d. sampling.

    Bound and its justification: see ``test_tv_prepermuted_matches_iid`` in test_samplers.py.
    """
    x, domain = _matrix(n_rows=60_000, seed=2)
    loader = TrainingLoader(InMemorySource(x, domain), LoaderConfig(batch_size=64, seed=0))
    stats = batch_composition_tv(loader, domain, n_batches=900, seed=3)
    assert abs(stats["difference"]) < 4 * np.hypot(stats["loader_tv_se"], stats["iid_tv_se"])
    assert stats["ratio"] < 1.1
    # The statistic is computed from the plan; the loader delivers exactly the planned domains.
    with loader.epoch(0) as batches:
        for batch, rows, _ in zip(batches, loader.sampler.batch_rows(0), range(20)):
            np.testing.assert_array_equal(batch.domain.numpy(), domain[rows])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_densify_on_cuda(data):
    x, domain = data
    loader = TrainingLoader(
        InMemorySource(x, domain), LoaderConfig(batch_size=64, shard_size=100, seed=0), pin_memory=True
    )
    dense = torch.from_numpy(x.toarray())
    for batch, rows in zip(loader.epoch(0), loader.sampler.batch_rows(0)):
        assert batch.values.is_pinned()
        xb, db = batch.to_dense("cuda")
        torch.testing.assert_close(xb.cpu(), dense[rows], rtol=0, atol=0)
        np.testing.assert_array_equal(db.cpu().numpy(), domain[rows])


def test_rows_without_entries():
    """Empty rows (first, last, consecutive) survive the vectorised gather."""
    rng = np.random.default_rng(4)
    x = sp.random(500, N_FEATURES, density=0.05, format="csr", dtype=np.float32, random_state=4)
    keep = rng.random((500, 1)) < 0.5
    keep[[0, -1]] = False
    x = sp.csr_matrix(x.multiply(keep))
    x.eliminate_zeros()
    domain = rng.integers(0, 2, 500).astype(np.int32)
    assert (np.diff(x.indptr) == 0).sum() > 200
    loader = TrainingLoader(
        InMemorySource(x, domain),
        LoaderConfig(batch_size=16, shard_size=20, buffer_shards=2, drop_last=False, seed=0),
    )
    assert _check_epoch(loader, x, domain, epoch=0) == loader.batches_per_epoch


# ---------------------------------------------------------------------- persistent pipeline, packed batches
def _cpu_ring(loader: TrainingLoader, n_slots: int = 6):
    """The pinned ring with ordinary (pageable) memory: the packing and slot logic, testable without CUDA."""
    from scalex_scale.data.pinned import PinnedRing

    loader._ring = PinnedRing(n_slots, allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    return loader._ring


def test_persistent_pipeline_runs_across_epochs_without_restarting(data):
    x, domain = data
    source = InMemorySource(x, domain)
    loader = TrainingLoader(source, LoaderConfig(batch_size=64, shard_size=100, buffer_shards=3, seed=5))
    for epoch in range(3):
        assert _check_epoch(loader, x, domain, epoch=epoch) == loader.batches_per_epoch
        assert _loader_threads()  # still reading ahead: the next epoch's plan
    assert loader.restarts == 1
    loader.close()
    _wait_no_threads()
    # a restart where asked: another epoch, or mid-epoch (resume), gives exactly the planned batches
    assert _check_epoch(loader, x, domain, epoch=7, start_batch=5) == loader.batches_per_epoch - 5
    assert _check_epoch(loader, x, domain, epoch=8) == loader.batches_per_epoch
    assert _check_epoch(loader, x, domain, epoch=2) == loader.batches_per_epoch
    assert loader.restarts == 3  # (7, 5) and (2, 0) restarted; (8, 0) continued from epoch 7
    del loader
    _wait_no_threads()  # dropping the loader stops the pipeline it left running


def test_persistent_and_per_epoch_pipelines_yield_the_same_batches(data):
    x, domain = data
    source = InMemorySource(x, domain)
    runs = []
    for persistent in (True, False):
        with TrainingLoader(
            source,
            LoaderConfig(batch_size=50, shard_size=128, buffer_shards=2, seed=9, persistent=persistent),
            rank=1, world_size=2,
        ) as loader:
            runs.append([b.to_dense("cpu")[0] for e in range(3) for b in loader.epoch(e)])
        assert loader.restarts == (1 if persistent else 3)
    assert len(runs[0]) == len(runs[1]) and all(torch.equal(a, b) for a, b in zip(*runs))
    _wait_no_threads()


def test_every_row_once_per_epoch_across_ranks_with_persistent_pipelines(data):
    x, domain = data
    ids = sp.csr_matrix(np.arange(1, N_ROWS + 1, dtype=np.float32)[:, None])  # column 0 = row id + 1
    source = InMemorySource(sp.hstack([ids, x], format="csr"), domain)
    config = LoaderConfig(batch_size=25, shard_size=64, buffer_shards=2, seed=1, drop_last=False)
    loaders = [TrainingLoader(source, config, rank=r, world_size=3) for r in range(3)]
    for epoch in range(2):
        rows = [int(v) - 1 for ld in loaders for b in ld.epoch(epoch) for v in b.to_dense("cpu")[0][:, 0].tolist()]
        assert sorted(rows) == list(range(N_ROWS))
    assert all(ld.restarts == 1 for ld in loaders)
    for ld in loaders:
        ld.close()
    _wait_no_threads()


def test_packed_batches_in_a_ring_of_slots(data):
    x, domain = data
    loader = TrainingLoader(
        InMemorySource(x, domain), LoaderConfig(batch_size=64, shard_size=100, buffer_shards=3, seed=5)
    )
    ring = _cpu_ring(loader)
    n = _check_epoch(loader, x, domain, epoch=0)
    assert n == loader.batches_per_epoch > ring.n_slots  # slots were reused
    stats = loader.pinned_stats()
    assert stats["slots"] == 6 and stats["added"] == 0 and stats["grown"] == 0
    with loader.epoch(1) as batches:
        batch = next(batches)
        assert batch.packed is not None and batch.flat is not None and batch.flat.dtype == torch.int32
        o = batch.packed.data_ptr()
        for view in (batch.domain, batch.flat, batch.values):  # views of the one buffer (one H2D copy)
            assert o <= view.data_ptr() < o + batch.packed.numel()
        cols = torch.repeat_interleave(torch.arange(batch.n_cells), batch.indptr.diff()) * N_FEATURES
        assert torch.equal(batch.flat.long(), cols + batch.indices.long())
        batch.stage("cpu")
        with pytest.raises(RuntimeError, match="stage each batch once"):
            batch.stage("cpu")
    loader.close()


def test_ring_grows_instead_of_deadlocking_when_batches_are_held(data):
    x, domain = data
    loader = TrainingLoader(
        InMemorySource(x, domain), LoaderConfig(batch_size=200, shard_size=500, buffer_shards=2, seed=0)
    )
    _cpu_ring(loader, n_slots=2)
    held = list(loader.epoch(0))  # never staged, never dropped: the ring must add slots
    assert len(held) == loader.batches_per_epoch
    assert loader.pinned_stats()["added"] >= len(held) - 2
    dense = x.astype(np.float32).toarray()
    for batch, rows in zip(held, loader.sampler.batch_rows(0)):
        np.testing.assert_array_equal(batch.to_dense("cpu")[0].numpy(), dense[rows])  # no slot was overwritten
    loader.close()


def test_ring_slot_waits_for_the_release_event():
    from scalex_scale.data.pinned import PinnedRing

    class Event:
        def __init__(self):
            self.waited = False

        def synchronize(self):
            self.waited = True

    ring = PinnedRing(1, allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    stop = threading.Event()
    index, slot = ring.acquire(100, stop=stop, consumer_starved=lambda: False)
    assert slot.numel() >= 100
    event = Event()
    ring.release(index, event)
    again, slot2 = ring.acquire(10_000_000, stop=stop, consumer_starved=lambda: False)
    assert again == index and event.waited  # the copy out of the slot is waited for before reuse
    assert slot2.numel() >= 10_000_000 and ring.stats()["grown"] == 1
    stop.set()
    assert ring.acquire(1, stop=stop, consumer_starved=lambda: False) is None  # all slots out, stopping


def test_batches_without_flat_positions_densify_the_same(data):
    from scalex_scale.data.batch import CSRBatch

    x, domain = data
    loader = TrainingLoader(InMemorySource(x, domain), LoaderConfig(batch_size=64, shard_size=100, seed=5))
    with loader.epoch(0) as batches:
        for batch, _ in zip(batches, range(5)):
            plain = CSRBatch(batch.indptr, batch.indices, batch.values, batch.domain, batch.n_features)
            assert torch.equal(plain.to_dense("cpu")[0], batch.to_dense("cpu")[0])
    loader.close()
