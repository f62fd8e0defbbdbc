"""Sharded, shuffled mini-batch loader: a ``TrainingSource`` read ahead in threads, as ``CSRBatch``.

The :class:`~scalex_scale.data.samplers.ShardSampler` decides everything random; this module only
executes its :class:`~scalex_scale.data.samplers.LoadRequest` plan:

::

    plan (sampler) ──> read pool (num_workers threads) ──> assembler thread ──> queue ──> consumer
                       per buffer: a few contiguous       in plan order: joins     (bounded,
                       source.read calls, then a          batches that straddle    _QUEUE_BATCHES)
                       vectorised numpy gather of each    buffers, wraps torch
                       batch's rows (compact CSR) and     tensors; with pin_memory
                       each value's flat position         packs each batch into a
                       row * n_features + column          slot of a pinned ring

At most ``prefetch`` buffers are being read or wait, decoded, ahead of the buffer the assembler is
draining, so the memory in flight is about ``(prefetch + 1)`` gathered buffers (10 bytes per non-zero:
int32 index + int32 flat position + float16 value) plus up to ``num_workers`` raw buffers during reads
(4 bytes per non-zero as stored). With the defaults (65,536-row buffers, prefetch 2, 2 workers) and
~400 non-zeros per row that is 3 x ~260 MB + 2 x ~105 MB, about 1 GB. Batches stay compact until
:meth:`CSRBatch.to_dense` (or :meth:`CSRBatch.stage` + ``densify``) densifies them on the training
device; with ``pin_memory`` a batch is one page-locked buffer (domain, flat positions, values), so it
costs one host-to-device copy (:mod:`scalex_scale.data.batch`, :mod:`scalex_scale.data.pinned`).

A buffer is read and gathered whole before its first batch is passed on, so the first batch of a
pipeline comes after one buffer's read + gather (a fraction of a second for the default 65,536 rows:
``bench/README.md``); after that the pipeline runs ahead of the consumer. The pipeline is
persistent (``persistent=True``, the default): it reads on into the next epoch's plan when an epoch's
last batch was yielded, so epochs do not restart it (at 1M cells and batch 64, the default 30,000
iterations span two epochs; at batch 4,096 one epoch is ~240 iterations, i.e. 120+ restarts without).

Stopping early is safe: :meth:`EpochIterator.close` (also called by ``with``, by garbage collection
of the iterator, and when an error is raised) stops the threads and joins them, waiting at most for
the ``source.read`` in progress; a pipeline left running for the next epoch is stopped by
:meth:`TrainingLoader.close` (or ``with``, or garbage collection of the loader). An exception in a
reader or in the plan is re-raised in the consumer as the original exception object, with the
worker's traceback.
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp
import torch

from scalex_scale._threads import Failure, Handoff

from .batch import CSRBatch, _Lease, pack_layout
from .config import LoaderConfig
from .pinned import PinnedRing
from .samplers import LoadRequest, ShardSampler

if TYPE_CHECKING:
    from scalex_scale.train.config import TrainConfig

__all__ = ["EpochIterator", "InMemorySource", "LoaderConfig", "TrainingLoader", "TrainingSource"]

_QUEUE_BATCHES = 16
"""Assembled batches waiting for the consumer (small: buffers, not batches, hold the read-ahead)."""


# ---------------------------------------------------------------------- sources
@runtime_checkable
class TrainingSource(Protocol):
    """Row-range access to the compact training matrix.

    ``read(start, stop)`` returns rows ``start:stop`` as ``(indptr, indices, data, domain)``:
    ``indptr`` int64 of length ``stop - start + 1`` starting at 0, ``indices`` uint16 or int32 feature
    indices, ``data`` float16 or float32 values, ``domain`` int32 batch codes. Returned arrays may be
    views of the source's memory: callers never write to them. ``read`` must be safe to call from
    several threads at once.
    """

    @property
    def n_rows(self) -> int: ...

    @property
    def n_features(self) -> int: ...

    @property
    def n_domains(self) -> int: ...

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...


class InMemorySource:
    """A ``TrainingSource`` over an in-memory CSR matrix (tests, in-memory AnnData).

    Parameters
    ----------
    matrix
        (n_rows, n_features) scipy sparse matrix or array (converted to CSR; float16/float32 values
        kept, other dtypes cast to float32; indices kept if uint16/int32, else cast to int32). Should
        be canonical (no duplicate entries in a row).
    domain
        (n_rows,) integer domain (batch) codes.
    n_domains
        Number of domains; default ``domain.max() + 1``.
    """

    def __init__(self, matrix: sp.spmatrix | sp.sparray, domain: np.ndarray, n_domains: int | None = None):
        csr = sp.csr_array(matrix)
        self._set(csr.indptr, csr.indices, csr.data, domain, int(csr.shape[1]), n_domains)

    @classmethod
    def from_arrays(
        cls,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray,
        domain: np.ndarray,
        n_features: int,
        n_domains: int | None = None,
    ) -> InMemorySource:
        """Wrap CSR arrays as they are stored (e.g. uint16 indices and float16 data, kept as such)."""
        source = cls.__new__(cls)
        source._set(indptr, indices, data, domain, n_features, n_domains)
        return source

    def _set(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray,
        domain: np.ndarray,
        n_features: int,
        n_domains: int | None,
    ) -> None:
        self._indptr = np.asarray(indptr).astype(np.int64, copy=False)
        indices, data = np.asarray(indices), np.asarray(data)
        self._indices = indices if indices.dtype in (np.uint16, np.int32) else indices.astype(np.int32)
        self._data = data if data.dtype in (np.float16, np.float32) else data.astype(np.float32)
        self._domain = np.asarray(domain).astype(np.int32, copy=False)
        self._n_rows, self._n_features = len(self._indptr) - 1, int(n_features)
        if self._domain.shape != (self._n_rows,):
            raise ValueError(f"domain has shape {self._domain.shape}, expected ({self._n_rows},)")
        if self._indices.shape != self._data.shape or len(self._data) != int(self._indptr[-1]):
            raise ValueError("indices and data must both have indptr[-1] entries")
        self._n_domains = int(self._domain.max()) + 1 if n_domains is None else int(n_domains)

    @property
    def n_rows(self) -> int:
        return self._n_rows

    @property
    def n_features(self) -> int:
        return self._n_features

    @property
    def n_domains(self) -> int:
        return self._n_domains

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= start <= stop <= self._n_rows:
            raise IndexError(f"rows {start}:{stop} out of range for {self._n_rows} rows")
        ptr = self._indptr[start : stop + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        return ptr - lo, self._indices[lo:hi], self._data[lo:hi], self._domain[start:stop]


# ---------------------------------------------------------------------- numpy CSR pieces
@dataclass(frozen=True, slots=True)
class _CSR:
    """Rows as CSR arrays: indptr int64 from 0, indices, data, domain; ``flat`` (row * F + column) once gathered."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    domain: np.ndarray
    flat: np.ndarray | None = None


def _checked(read: tuple[np.ndarray, ...], start: int, stop: int) -> _CSR:
    indptr, indices, data, domain = (np.asarray(a) for a in read)
    n = stop - start
    if indptr.shape != (n + 1,) or domain.shape != (n,) or int(indptr[0]) != 0:
        raise ValueError(f"source.read({start}, {stop}) returned indptr {indptr.shape} / domain {domain.shape}")
    if indices.shape != (int(indptr[-1]),) or data.shape != indices.shape:
        raise ValueError(f"source.read({start}, {stop}): indices/data lengths differ from indptr[-1]")
    if data.dtype not in (np.float16, np.float32):
        data = data.astype(np.float32)
    return _CSR(indptr.astype(np.int64, copy=False), indices, data, domain)


def _concat(pieces: list[_CSR], n_features: int | None = None) -> _CSR:
    """Rows of ``pieces`` one after the other; ``flat`` (when the pieces have it) shifted by the rows before."""
    offsets = np.cumsum([0] + [int(p.indptr[-1]) for p in pieces[:-1]])
    indptr = np.concatenate([pieces[0].indptr[:1]] + [p.indptr[1:] + o for p, o in zip(pieces, offsets)])
    flat = None
    if pieces[0].flat is not None:
        assert n_features is not None
        row0 = np.cumsum([0] + [len(p.domain) for p in pieces[:-1]])
        dtype = pieces[0].flat.dtype
        flat = np.concatenate([p.flat + dtype.type(r * n_features) for p, r in zip(pieces, row0.tolist())])
    return _CSR(
        indptr,
        np.concatenate([p.indices for p in pieces]),
        np.concatenate([p.data for p in pieces]),
        np.concatenate([p.domain for p in pieces]),
        flat,
    )


def _read_buffer(source: TrainingSource, slices: tuple[tuple[int, int], ...]) -> _CSR:
    parts = [_checked(source.read(a, b), a, b) for a, b in slices]
    return parts[0] if len(parts) == 1 else _concat(parts)


def _element_index(starts: np.ndarray, lengths: np.ndarray, out_starts: np.ndarray, nnz: int) -> np.ndarray:
    """Concatenation of ``arange(starts[i], starts[i] + lengths[i])`` over rows, as one cumsum.

    Steps of +1 everywhere, with a jump at the first element of each non-empty row: one pass and one
    temporary, faster than ``repeat(starts - out_starts, lengths) + arange(nnz)`` (``bench/README.md``).
    """
    steps = np.ones(nnz, dtype=np.int64)
    if nnz == 0:
        return steps
    keep = lengths > 0
    st, ln, at = starts[keep], lengths[keep], out_starts[keep]
    steps[0] = st[0]
    steps[at[1:]] = st[1:] - (st[:-1] + ln[:-1] - 1)
    return np.cumsum(steps, out=steps)


def flat_dtype(batch_size: int, n_features: int) -> np.dtype:
    """int32 flat positions when a batch's ``rows * n_features`` fits, else int64."""
    return np.dtype(np.int32) if batch_size * n_features < 2**31 else np.dtype(np.int64)


def _gather(raw: _CSR, positions: np.ndarray, n_features: int, flat: np.dtype) -> _CSR:
    """Rows ``positions`` of ``raw`` as a new CSR (int32 indices, int64 domain, flat positions), vectorised."""
    starts = raw.indptr[positions]
    lengths = raw.indptr[positions + 1] - starts
    indptr = np.zeros(len(positions) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    src = _element_index(starts, lengths, indptr[:-1], int(indptr[-1]))
    indices = raw.indices[src].astype(np.int32, copy=False)
    # row * F + column: np.repeat is ~2x faster than a cumsum of row jumps here
    positions_flat = np.repeat(np.arange(len(positions), dtype=flat) * flat.type(n_features), lengths)
    positions_flat += indices.astype(flat, copy=False)
    return _CSR(indptr, indices, raw.data[src], raw.domain[positions].astype(np.int64), positions_flat)


def _load(source: TrainingSource, request: LoadRequest, flat: np.dtype) -> list[tuple[_CSR, bool]]:
    """Read one buffer and gather each of its batch segments (runs in a reader thread)."""
    raw = _read_buffer(source, request.slices)
    n_features = int(source.n_features)
    return [(_gather(raw, positions, n_features, flat), ends) for positions, ends in request.segments()]


def _plain_batch(piece: _CSR, n_features: int) -> CSRBatch:
    return CSRBatch(
        torch.from_numpy(piece.indptr),
        torch.from_numpy(piece.indices),
        torch.from_numpy(piece.data),
        torch.from_numpy(piece.domain),
        n_features,
        flat=None if piece.flat is None else torch.from_numpy(piece.flat),
    )


def _packed_bytes(piece: _CSR) -> int:
    assert piece.flat is not None
    return pack_layout(
        len(piece.domain), len(piece.data), _TORCH_DTYPES[piece.flat.dtype], _TORCH_DTYPES[piece.data.dtype]
    )[-1]


_TORCH_DTYPES = {np.dtype(k): v for k, v in ((np.int32, torch.int32), (np.int64, torch.int64),
                                             (np.float16, torch.float16), (np.float32, torch.float32))}  # fmt: skip


def _packed_batch(piece: _CSR, n_features: int, index: int, slot: torch.Tensor, ring: PinnedRing) -> CSRBatch:
    """Copy ``piece``'s domain, flat and values into the pinned ``slot`` and wrap views of it as a batch."""
    assert piece.flat is not None
    n, nnz = len(piece.domain), len(piece.data)
    flat_t, val_t = _TORCH_DTYPES[piece.flat.dtype], _TORCH_DTYPES[piece.data.dtype]
    o_dom, o_flat, o_val, end = pack_layout(n, nnz, flat_t, val_t)
    buf = slot[:end]
    domain = buf[o_dom : o_dom + 8 * n].view(torch.int64)
    flat = buf[o_flat : o_flat + piece.flat.itemsize * nnz].view(flat_t)
    values = buf[o_val : o_val + piece.data.itemsize * nnz].view(val_t)
    domain.numpy()[:] = piece.domain
    flat.numpy()[:] = piece.flat
    values.numpy()[:] = piece.data
    lease = _Lease(lambda event: ring.release(index, event))
    batch = CSRBatch(
        torch.from_numpy(piece.indptr), torch.from_numpy(piece.indices), values, domain, n_features,
        flat=flat, packed=buf, lease=lease,
    )  # fmt: skip
    weakref.finalize(batch, lease)  # dropped without being staged: the slot comes back too
    return batch


# ---------------------------------------------------------------------- the pipeline
class _End:
    pass


_END = _End()


class _Pipeline:
    """Background read + assembly of batches (one epoch's plan, or several chained) into a bounded queue.

    Holds no reference to the consumer-side iterator or the loader, so dropping those lets them be
    collected and their finalizers stop this pipeline.
    """

    def __init__(
        self,
        source: TrainingSource,
        requests: Iterator[LoadRequest],
        config: LoaderConfig,
        ring: PinnedRing | None = None,
    ) -> None:
        self._source = source
        self._requests = requests
        self._config = config
        self._ring = ring
        self._flat = flat_dtype(config.batch_size, int(source.n_features))
        self._handoff = Handoff(_QUEUE_BATCHES)
        self._lock = threading.Lock()
        self._closed = False
        self._waiting = False
        self._thread: threading.Thread | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    # -- consumer side
    def get(self) -> CSRBatch | None:
        """Next batch; ``None`` at the end or once closed. Re-raises a background failure."""
        if self._closed:
            return None
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="scalex-loader-assemble", daemon=True)
            self._thread.start()
        item = self._next_item()
        if isinstance(item, CSRBatch):
            return item
        self.close()
        if isinstance(item, Failure):
            raise item.exc
        return None

    def _next_item(self) -> object:
        assert self._thread is not None
        self._waiting = True
        try:
            return self._handoff.get(self._thread, "the loader thread")
        finally:
            self._waiting = False

    def close(self) -> None:
        """Stop the threads and wait for them (at most the ``source.read`` in progress)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._handoff.stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._handoff.drain()

    # -- background side
    def _starved(self) -> bool:
        return self._waiting and self._handoff.empty()

    def _submit(self, pool: ThreadPoolExecutor, window: deque[Future[list[tuple[_CSR, bool]]]]) -> None:
        while len(window) < self._config.prefetch:
            request = next(self._requests, None)
            if request is None:
                return
            window.append(pool.submit(_load, self._source, request, self._flat))

    def _batch(self, piece: _CSR, n_features: int) -> CSRBatch | None:
        ring = self._ring
        if ring is None:
            return _plain_batch(piece, n_features)
        got = ring.acquire(_packed_bytes(piece), stop=self._handoff.stop_event, consumer_starved=self._starved)
        if got is None:
            return None
        return _packed_batch(piece, n_features, got[0], got[1], ring)

    def _run(self) -> None:
        cfg, n_features = self._config, int(self._source.n_features)
        pool = ThreadPoolExecutor(max_workers=cfg.num_workers, thread_name_prefix="scalex-loader-read")
        window: deque[Future[list[tuple[_CSR, bool]]]] = deque()
        try:
            self._submit(pool, window)
            pending: list[_CSR] = []
            while window and not self._handoff.stopped:
                segments = window.popleft().result()
                self._submit(pool, window)
                if self._ring is not None and self._ring.allocated_bytes == 0 and segments:
                    # slots sized from the first buffer's largest batch, before the first batch is handed out
                    self._ring.reserve(max(_packed_bytes(piece) for piece, _ in segments))
                segments.reverse()  # pop() from the end frees each segment once it is passed on
                while segments:
                    piece, ends_batch = segments.pop()
                    pending.append(piece)
                    if not ends_batch:
                        continue
                    joined = pending[0] if len(pending) == 1 else _concat(pending, n_features)
                    pending = []
                    batch = self._batch(joined, n_features)
                    if batch is None or not self._handoff.put(batch):
                        return
            if pending and not self._handoff.stopped:
                raise RuntimeError("the load plan ended inside a mini-batch")
            self._handoff.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            self._handoff.put(Failure(exc))
        finally:
            for future in window:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


class EpochIterator:
    """Iterator over one epoch's :class:`CSRBatch` es; a context manager.

    Background threads start at the first ``next()``. Close it (``with``, :meth:`close`, or by
    dropping the last reference) to stop them when leaving an epoch early. Once every batch of the
    epoch was yielded, a persistent loader's pipeline is left running for the next epoch.
    """

    def __init__(self, pipeline: _Pipeline, n_batches: int, on_exhausted: Any = None) -> None:
        self._pipeline = pipeline
        self._remaining = n_batches
        self._on_exhausted = on_exhausted
        self._finalizer = weakref.finalize(self, pipeline.close)
        if n_batches == 0:
            self._exhausted()

    def __iter__(self) -> EpochIterator:
        return self

    def __len__(self) -> int:
        """Batches not yet yielded."""
        return self._remaining

    def _exhausted(self) -> None:
        if self._on_exhausted is not None and not self._pipeline.closed:
            self._finalizer.detach()  # the pipeline lives on, for the next epoch
            self._on_exhausted()
        else:
            self._finalizer()

    def __next__(self) -> CSRBatch:
        if self._remaining <= 0:
            raise StopIteration
        batch = self._pipeline.get()
        if batch is None:
            self.close()
            raise StopIteration
        self._remaining -= 1
        if self._remaining == 0:
            self._exhausted()
        return batch

    def close(self) -> None:
        """Stop and join the background threads (idempotent; a no-op once the epoch was fully yielded)."""
        self._finalizer()

    def __enter__(self) -> EpochIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _chained_plan(sampler: ShardSampler, epoch: int, start_batch: int) -> Iterator[LoadRequest]:
    """The plan of ``epoch`` from ``start_batch``, then of every later epoch from batch 0."""
    yield from sampler.epoch_plan(epoch, start_batch)
    for e in itertools.count(epoch + 1):
        yield from sampler.epoch_plan(e, 0)


# ---------------------------------------------------------------------- the loader
class TrainingLoader:
    """Shuffled, sharded mini-batches of a :class:`TrainingSource`, read ahead in threads.

    Parameters
    ----------
    source
        The training matrix.
    config
        The sampling plan and read-ahead: :class:`~scalex_scale.data.config.LoaderConfig`.
    rank, world_size
        This process's part of every epoch in data-parallel training (all ranks use the same
        ``config``; they then read disjoint rows and yield the same number of batches).
    pin_memory
        Return batches packed in page-locked memory (one fast, asynchronous host-to-CUDA copy per
        batch), in a ring of reused slots (:mod:`scalex_scale.data.pinned`). Needs CUDA.

    Examples
    --------
    >>> with TrainingLoader(source, LoaderConfig(batch_size=64, seed=0)) as loader:
    ...     for epoch in range(n_epochs):
    ...         with loader.epoch(epoch) as batches:
    ...             for batch in batches:
    ...                 x, domain = batch.to_dense(device)
    """

    def __init__(
        self,
        source: TrainingSource,
        config: LoaderConfig = LoaderConfig(),
        *,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        if not isinstance(config, LoaderConfig):
            raise TypeError(f"config must be a LoaderConfig, got {type(config).__name__}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA, which is not available")
        self.source = source
        self.config = config
        self.rank, self.world_size, self.pin_memory = int(rank), int(world_size), bool(pin_memory)
        self.sampler = ShardSampler(
            int(source.n_rows),
            batch_size=config.batch_size,
            shard_size=config.shard_size,
            buffer_shards=config.buffer_shards,
            drop_last=config.drop_last,
            rank=self.rank,
            world_size=self.world_size,
            seed=config.seed,
        )
        self._ring = PinnedRing(_QUEUE_BATCHES + 4) if pin_memory else None
        # The live (persistent) pipeline and the (epoch, batch) its next batch belongs to.
        self._live: list[Any] = [None, None]
        self.restarts = 0
        self._finalizer = weakref.finalize(self, _close_live, self._live)

    @classmethod
    def from_train_config(
        cls,
        source: TrainingSource,
        train_config: TrainConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> TrainingLoader:
        """The loader of a training run: :meth:`TrainConfig.loader_config` (``TrainConfig.loader`` with the
        TrainConfig's ``batch_size`` and ``seed``) plus this process's runtime arguments.

        Pass the user's TrainConfig, not a rank's (:func:`~scalex_scale.train.distributed.rank_config`
        changes the seed per rank, and the ranks' shard orders must agree).
        """
        return cls(source, train_config.loader_config(), rank=rank, world_size=world_size, pin_memory=pin_memory)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch, equal on every rank."""
        return self.sampler.batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def pinned_stats(self) -> dict[str, int] | None:
        """The pinned ring's slots and allocations (None without ``pin_memory``)."""
        return None if self._ring is None else self._ring.stats()

    def epoch(self, epoch: int, start_batch: int = 0) -> EpochIterator:
        """Batches of ``epoch``, skipping the first ``start_batch`` (mid-epoch resume)."""
        n = self.batches_per_epoch
        if not 0 <= start_batch <= n:
            raise ValueError(f"start_batch must be in [0, {n}], got {start_batch}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        pipeline, position = self._live
        if pipeline is None or pipeline.closed or position != (epoch, start_batch):
            _close_live(self._live)
            if self.config.persistent:
                requests = _chained_plan(self.sampler, epoch, start_batch)
            else:
                requests = self.sampler.epoch_plan(epoch, start_batch)
            pipeline = _Pipeline(self.source, requests, self.config, self._ring)
            self.restarts += 1
        self._live[:] = [None, None]
        on_exhausted = functools.partial(_hand_over, self._live, pipeline, epoch + 1) if self.config.persistent else None
        return EpochIterator(pipeline, n - start_batch, on_exhausted)

    def close(self) -> None:
        """Stop a pipeline left running for the next epoch (idempotent)."""
        _close_live(self._live)

    def __enter__(self) -> TrainingLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[CSRBatch]:
        """Batches of epoch 0."""
        return self.epoch(0)


def _hand_over(live: list[Any], pipeline: _Pipeline, next_epoch: int) -> None:
    """An epoch was fully yielded: keep its pipeline as the loader's live one, at (next_epoch, 0)."""
    live[:] = [pipeline, (next_epoch, 0)]


def _close_live(live: list[Any]) -> None:
    pipeline = live[0]
    live[:] = [None, None]
    if pipeline is not None:
        pipeline.close()
