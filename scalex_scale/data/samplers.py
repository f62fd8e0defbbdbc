"""Sharded, shuffled mini-batch plans: numpy only, no torch, no disk.

A :class:`ShardSampler` turns ``(seed, epoch)`` into a list of plain :class:`LoadRequest` objects, one
per *buffer*: which contiguous row ranges of the training matrix to read, in which order to emit the
buffer's rows, and where the mini-batches end. The loader (:mod:`scalex_scale.data.loader`) only
executes these requests, so all randomness and all rank sharding are decided, and tested, here.

The plan of one epoch
---------------------
1. **Shards.** Rows ``0 .. n_rows-1`` are cut into contiguous shards of ``shard_size`` rows (the last
   one may be shorter).
2. **Shard order.** The shard order is permuted by a generator derived from ``(seed, epoch)`` only,
   so every rank computes the same order.
3. **Ranks.** The permuted shards are laid end to end into one virtual sequence of ``n_rows`` rows and
   rank ``r`` takes positions ``[r * n_rows // W, (r + 1) * n_rows // W)`` of it (``W = world_size``).
   The ranks are disjoint and together cover every row; their row counts differ by at most one.
   A shard that straddles a rank boundary is split between the two ranks (each reads its piece).
4. **Buffers.** Each rank groups its consecutive pieces into buffers of ``buffer_shards`` pieces (the
   last buffer may hold fewer), reads a buffer as a few contiguous ranges (adjacent pieces merged),
   and emits its rows in a random order drawn from a generator derived from
   ``(seed, epoch, rank, buffer)``.
5. **Batches.** The rank's buffers, each shuffled, form one stream of rows that is cut into
   consecutive mini-batches of ``batch_size`` rows. A batch may straddle two buffers (the loader
   carries the tail of one buffer into the next), so no row is lost at buffer ends.

Equal step counts (DDP)
-----------------------
Every rank yields exactly :attr:`ShardSampler.batches_per_epoch` batches. The count depends only on the
ranks' row counts (step 3), which every rank knows without reading anything:

- ``drop_last=True`` (the SCALEX default): ``min_r floor(rows_r / batch_size)`` full batches. Rows
  dropped: the tail of each rank's shuffled stream beyond ``batches_per_epoch * batch_size``, i.e. at
  most ``batch_size`` random rows of the rank's *last* buffer (fewer than ``world_size * batch_size``
  rows per epoch in total). Which rows are dropped changes every epoch.
- ``drop_last=False``: ``max_r ceil(rows_r / batch_size)`` batches and every row exactly once. All batches
  are full except the last one or two of a rank: a rank whose rows fill one batch fewer than the
  others splits its last ``batch_size + remainder`` rows into two near-equal batches so that it has
  as many (non-empty) batches as the others. Impossible only when a rank has fewer rows than there
  are batches (e.g. ``batch_size=1`` with ``n_rows % world_size != 0``), which is an error.

Randomness
----------
No global RNG. Generators are ``np.random.default_rng(np.random.SeedSequence(seed, spawn_key=...))``
with spawn keys ``(0, epoch)`` for the shard order and ``(1, epoch, rank, buffer)`` for a buffer's row
order. A buffer's order does not depend on the batches before it, so ``epoch_plan(epoch, start_batch=k)``
(mid-epoch resume) costs nothing beyond the buffer that holds batch ``k`` and reproduces exactly the
tail of the full epoch.

How random is it? For a store written in a random row permutation (the atlas layout), any fixed
rearrangement of a uniformly permuted sequence is uniformly permuted, so every mini-batch is a
uniform random sample of the cells, exactly as with a full shuffle; :func:`batch_composition_tv`
measures this. Shards and buffers then only tune I/O (contiguous reads) and memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "DEFAULT_BUFFER_SHARDS",
    "DEFAULT_SHARD_SIZE",
    "LoadRequest",
    "ShardSampler",
    "assemble_batches",
    "batch_composition_tv",
]

DEFAULT_SHARD_SIZE = 8192
"""Rows per shard. At ~400 non-zeros per row a shard is ~3.3M elements, i.e. ~3 zarr chunks of 2**20
elements, so the partially used chunks at both ends of a random-shard read cost at most ~30% extra."""

DEFAULT_BUFFER_SHARDS = 8
"""Shards per buffer: 65,536 rows, ~26M non-zeros at ~400 per row, ~105 MB as float16 + uint16. That
is 1,024 batches of 64 or 16 batches of 4,096."""

_SHARD_ORDER_STREAM = 0
_BUFFER_ORDER_STREAM = 1

T = TypeVar("T")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in key)))


@dataclass(frozen=True, eq=False)
class LoadRequest:
    """What to read for one buffer and how to cut it into mini-batches.

    The rows of the buffer are the concatenation of ``slices`` (row ranges of the source, in this
    order). ``order`` lists buffer-row positions in emission order. The emitted rows are preceded by
    ``carry_in`` rows left over from earlier requests; on that virtual sequence
    ``V = carry + rows[order]``, batch ``j`` is ``V[bounds[j]:bounds[j + 1]]``; rows after
    ``bounds[-1]`` are carried into the next request.

    Attributes
    ----------
    epoch, rank, buffer
        Identity of the buffer (``buffer`` counts this rank's buffers in the epoch).
    first_batch
        Index, within the rank's epoch, of the first batch that ends in this request.
    slices
        ``(start, stop)`` row ranges to read, adjacent ranges merged.
    order
        (n,) int64 positions into the concatenated buffer rows.
    carry_in
        Rows carried in from earlier requests (they head the first batch).
    bounds
        (n_batches + 1,) int64 batch boundaries on ``V``; ``bounds[0] == 0``.
    """

    epoch: int
    rank: int
    buffer: int
    first_batch: int
    slices: tuple[tuple[int, int], ...]
    order: np.ndarray
    carry_in: int
    bounds: np.ndarray

    @property
    def n_read(self) -> int:
        """Rows read from the source for this request."""
        return sum(stop - start for start, stop in self.slices)

    @property
    def n_batches(self) -> int:
        """Batches that end in this request."""
        return len(self.bounds) - 1

    @property
    def carry_out(self) -> int:
        """Rows left over for the next request."""
        return self.carry_in + len(self.order) - int(self.bounds[-1])

    def buffer_rows(self) -> np.ndarray:
        """Source row of each buffer row (the concatenated ``slices``)."""
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.slices])

    def rows(self) -> np.ndarray:
        """Source rows in emission order."""
        return self.buffer_rows()[self.order]

    def segments(self) -> Iterator[tuple[np.ndarray, bool]]:
        """Cut ``order`` at the batch boundaries.

        Yields
        ------
        positions
            A run of consecutive entries of ``order``.
        ends_batch
            Whether a batch ends after this run (the last run, a carry, may not end one).
        """
        start = 0
        for cut in (self.bounds[1:] - self.carry_in).tolist():
            yield self.order[start:cut], True
            start = cut
        if start < len(self.order):
            yield self.order[start:], False


def assemble_batches(
    pieces: Iterable[tuple[T, bool]], concat: Callable[[list[T]], T]
) -> Iterator[T]:
    """Join runs of rows into batches.

    Parameters
    ----------
    pieces
        ``(piece, ends_batch)`` in stream order, e.g. from :meth:`LoadRequest.segments`.
    concat
        Joins the pieces of a batch that straddles requests (called only with two or more).

    Raises
    ------
    RuntimeError
        If the stream ends inside a batch (a plan that is not self-consistent).
    """
    pending: list[T] = []
    for piece, ends_batch in pieces:
        pending.append(piece)
        if ends_batch:
            yield pending[0] if len(pending) == 1 else concat(pending)
            pending = []
    if pending:
        raise RuntimeError("the load plan ended inside a mini-batch")


def _merge_ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[tuple[int, int], ...]:
    merged: list[list[int]] = []
    for a, b in zip(starts.tolist(), stops.tolist()):
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return tuple((a, b) for a, b in merged)


def _cut_points(n_rows: int, n_batches: int, batch_size: int) -> np.ndarray:
    """Batch boundaries of one rank's stream: full batches first, never an empty batch."""
    full = -(-n_rows // batch_size)
    if full >= n_batches:
        return np.minimum(np.arange(n_batches + 1, dtype=np.int64) * batch_size, n_rows)
    # Fewer rows than the other ranks: keep m full batches and spread the rest over n_batches - m.
    m = min(n_batches - 1, (n_rows - n_batches) // (batch_size - 1))
    rest, slots = n_rows - m * batch_size, n_batches - m
    sizes = np.full(n_batches, batch_size, dtype=np.int64)
    sizes[m:] = rest // slots + (np.arange(slots) < rest % slots)
    return np.concatenate([[0], np.cumsum(sizes)])


@dataclass(frozen=True)
class ShardSampler:
    """Deterministic sharded shuffle plan (see the module docstring for the algorithm).

    Parameters
    ----------
    n_rows
        Rows of the training matrix.
    batch_size
        Rows per mini-batch.
    shard_size
        Rows per contiguous shard (the unit of shuffling across the matrix and of reading).
    buffer_shards
        Shards per in-memory shuffle buffer.
    drop_last
        Drop the rows that do not fill a last batch (SCALEX: True). See "Equal step counts".
    rank, world_size
        This process' rank among ``world_size`` data-parallel ranks.
    seed
        Non-negative seed; with the epoch it determines the whole plan.
    """

    n_rows: int
    batch_size: int = 64
    shard_size: int = DEFAULT_SHARD_SIZE
    buffer_shards: int = DEFAULT_BUFFER_SHARDS
    drop_last: bool = True
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_rows", "batch_size", "shard_size", "buffer_shards", "world_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        _ = self.batches_per_epoch  # validates feasibility

    # ------------------------------------------------------------------ epoch-independent sizes
    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_size)

    def rank_sizes(self) -> np.ndarray:
        """(world_size,) rows assigned to each rank (the same every epoch)."""
        edges = [(r * self.n_rows) // self.world_size for r in range(self.world_size + 1)]
        return np.diff(np.asarray(edges, dtype=np.int64))

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch (equal across ranks)."""
        sizes = self.rank_sizes()
        if self.drop_last:
            n = int(sizes.min()) // self.batch_size
        else:
            n = int(-(-sizes.max() // self.batch_size))
            if int(sizes.min()) < n:
                raise ValueError(
                    f"drop_last=False cannot give every rank {n} non-empty batches: a rank has only "
                    f"{int(sizes.min())} rows (n_rows={self.n_rows}, world_size={self.world_size}, "
                    f"batch_size={self.batch_size}); use drop_last=True"
                )
        if n == 0:
            raise ValueError(
                f"no full batch of {self.batch_size} rows per rank: n_rows={self.n_rows}, "
                f"world_size={self.world_size}; lower batch_size or use drop_last=False"
            )
        return n

    def batch_bounds(self, rank: int | None = None) -> np.ndarray:
        """(batches_per_epoch + 1,) batch boundaries on a rank's row stream."""
        rank = self.rank if rank is None else rank
        rows = int(self.rank_sizes()[rank])
        return _cut_points(rows, self.batches_per_epoch, self.batch_size)

    def for_rank(self, rank: int) -> ShardSampler:
        """The same plan seen from another rank."""
        return replace(self, rank=rank)

    # ------------------------------------------------------------------ per-epoch plan
    def shard_order(self, epoch: int) -> np.ndarray:
        """Permuted shard ids of ``epoch`` (identical on every rank)."""
        return _rng(self.seed, _SHARD_ORDER_STREAM, epoch).permutation(self.n_shards)

    def rank_pieces(self, epoch: int, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Row ranges of a rank in stream order: ``(starts, stops)``, int64."""
        rank = self.rank if rank is None else rank
        shard = self.shard_order(epoch).astype(np.int64)
        starts = shard * self.shard_size
        stops = np.minimum(starts + self.shard_size, self.n_rows)
        ends = np.cumsum(stops - starts)
        begins = ends - (stops - starts)
        lo = (rank * self.n_rows) // self.world_size
        hi = ((rank + 1) * self.n_rows) // self.world_size
        sel = (ends > lo) & (begins < hi)
        piece_starts = starts[sel] + np.maximum(lo - begins[sel], 0)
        piece_stops = stops[sel] - np.maximum(ends[sel] - hi, 0)
        return piece_starts, piece_stops

    def epoch_plan(self, epoch: int, start_batch: int = 0) -> Iterator[LoadRequest]:
        """Load requests of this rank for ``epoch``, skipping its first ``start_batch`` batches.

        Parameters
        ----------
        epoch
            Non-negative epoch number.
        start_batch
            Batches already consumed (mid-epoch resume); ``0 <= start_batch <= batches_per_epoch``.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        n = self.batches_per_epoch
        if not 0 <= start_batch <= n:
            raise ValueError(f"start_batch must be in [0, {n}], got {start_batch}")
        return self._plan(epoch, start_batch)

    def _plan(self, epoch: int, start_batch: int) -> Iterator[LoadRequest]:
        starts, stops = self.rank_pieces(epoch)
        group = np.arange(0, len(starts), self.buffer_shards)
        buf_len = np.add.reduceat(stops - starts, group)
        buf_end = np.cumsum(buf_len)
        bounds = self.batch_bounds()
        used, first = int(bounds[-1]), int(bounds[start_batch])
        for b, (g, length, end) in enumerate(zip(group.tolist(), buf_len.tolist(), buf_end.tolist())):
            off = end - length
            a, z = max(off, first), min(end, used)
            if a >= z:
                if off >= used:
                    break
                continue
            i0 = int(np.searchsorted(bounds, a, side="right")) - 1
            i1 = int(np.searchsorted(bounds, z, side="right")) - 1
            order = _rng(self.seed, _BUFFER_ORDER_STREAM, epoch, self.rank, b).permutation(length)
            yield LoadRequest(
                epoch=epoch,
                rank=self.rank,
                buffer=b,
                first_batch=i0,
                slices=_merge_ranges(starts[g : g + self.buffer_shards], stops[g : g + self.buffer_shards]),
                order=order[a - off : z - off],
                carry_in=a - int(bounds[i0]),
                bounds=bounds[i0 : i1 + 1] - bounds[i0],
            )

    def batch_rows(self, epoch: int, start_batch: int = 0) -> Iterator[np.ndarray]:
        """Source rows of each of this rank's batches (the reference the loader must reproduce)."""

        def pieces() -> Iterator[tuple[np.ndarray, bool]]:
            for request in self.epoch_plan(epoch, start_batch):
                rows = request.buffer_rows()
                for positions, ends_batch in request.segments():
                    yield rows[positions], ends_batch

        return assemble_batches(pieces(), np.concatenate)


# ---------------------------------------------------------------------- randomness statistic
def _composition_tv(counts: np.ndarray, sizes: np.ndarray, freq: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(counts / sizes[:, None] - freq[None, :]).sum(axis=1)


def _batch_counts(batches: list[np.ndarray], domains: np.ndarray, n_domains: int) -> np.ndarray:
    sizes = np.array([len(b) for b in batches], dtype=np.int64)
    labels = domains[np.concatenate(batches)].astype(np.int64)
    batch_id = np.repeat(np.arange(len(batches), dtype=np.int64), sizes)
    flat = np.bincount(batch_id * n_domains + labels, minlength=len(batches) * n_domains)
    return flat.reshape(len(batches), n_domains)


def batch_composition_tv(
    loader_or_plan: Any,
    domains: np.ndarray,
    n_batches: int | None = 2000,
    *,
    epoch: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """How far mini-batch domain compositions are from the global mix, against i.i.d. sampling.

    For each batch, the total-variation distance ``0.5 * sum_d |p_batch(d) - p(d)|`` between its domain
    frequencies and the global frequencies ``p`` of ``domains``; averaged over batches. The same
    statistic for i.i.d. uniform sampling with replacement of the same batch sizes (multinomial
    draws with an explicit generator) is the reference: a loader that mixes domains like random
    sampling gives a ratio near 1 (a full shuffle without replacement is a hair *below* 1, by the
    finite-population factor ``sqrt(1 - (B - 1) / (N - 1))``).

    Parameters
    ----------
    loader_or_plan
        A :class:`ShardSampler`, anything with a ``sampler`` attribute holding one (a
        ``TrainingLoader``), or an iterable of per-batch row-index arrays.
    domains
        (n_rows,) non-negative integer domain code of every source row.
    n_batches
        Evaluate the first ``n_batches`` batches of the epoch (``None``: all).
    epoch
        Epoch of the plan to evaluate (ignored for an iterable of batches).
    seed
        Seed of the i.i.d. reference draws.

    Returns
    -------
    dict
        ``loader_tv``, ``iid_tv`` (means), their standard errors ``loader_tv_se``, ``iid_tv_se``
        (sample SD / sqrt(n); conservative for the loader, whose batches within an epoch are
        negatively correlated), ``ratio`` (loader / iid), ``difference`` (loader - iid),
        ``n_batches``, ``mean_batch_size``, ``n_domains``.
    """
    sampler = getattr(loader_or_plan, "sampler", loader_or_plan)
    batches_iter = sampler.batch_rows(epoch) if isinstance(sampler, ShardSampler) else iter(loader_or_plan)
    batches = [np.asarray(b, dtype=np.int64) for b in itertools.islice(batches_iter, n_batches)]
    if not batches:
        raise ValueError("no batches to evaluate")
    domains = np.asarray(domains)
    if domains.ndim != 1 or not np.issubdtype(domains.dtype, np.integer) or domains.min() < 0:
        raise ValueError("domains must be a 1-d array of non-negative integer codes")
    n_domains = int(domains.max()) + 1
    freq = np.bincount(domains, minlength=n_domains) / len(domains)
    sizes = np.array([len(b) for b in batches], dtype=np.int64)
    tv = _composition_tv(_batch_counts(batches, domains, n_domains), sizes, freq)
    iid_counts = np.random.default_rng(seed).multinomial(sizes, freq)
    iid = _composition_tv(iid_counts, sizes, freq)
    n = len(batches)
    return {
        "loader_tv": float(tv.mean()),
        "loader_tv_se": float(tv.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "iid_tv": float(iid.mean()),
        "iid_tv_se": float(iid.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "ratio": float(tv.mean() / iid.mean()) if iid.mean() > 0 else float("nan"),
        "difference": float(tv.mean() - iid.mean()),
        "n_batches": float(n),
        "mean_batch_size": float(sizes.mean()),
        "n_domains": float(n_domains),
    }
