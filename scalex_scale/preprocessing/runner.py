"""Running a pass over an atlas on disk: row ranges read from the Zarr store and folded or mapped with dask.

Pass A and pass B of :mod:`.passes` fold row ranges into mergeable accumulators, in parallel partitions (dask
threads by default, or a ``dask.distributed`` client's workers), merged in a tree; the transform pass maps ranges
in order, a few ahead. The atlas-level step that strings them together is
:func:`scalex_scale.workflows.preprocess.preprocess`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import dask
import numpy as np
import scipy.sparse as sp
import zarr

from .passes import PassFn
from .stats import tree_merge

M = TypeVar("M")

#: Stored values per row range read by one task (about 32 MB of raw CSR).
RANGE_VALUES = 1 << 22


@lru_cache(maxsize=8)
def _x_arrays(path: str, n_obs: int) -> tuple[zarr.Array, zarr.Array, zarr.Array, int]:
    """X's arrays, opened once per process and atlas size (an append changes the size, so reopens)."""
    x = zarr.open_group(path, mode="r", use_consolidated=False)["X"]
    return x["indptr"], x["indices"], x["data"], int(x.attrs["shape"][1])


def read_atlas_rows(path: str, start: int, stop: int, n_obs: int) -> sp.csr_matrix:
    """Raw counts of atlas rows ``[start, stop)`` of an atlas of ``n_obs`` cells (works on dask workers)."""
    indptr, indices, data, n_vars = _x_arrays(path, n_obs)
    ptr = np.asarray(indptr[start : stop + 1])
    a, b = int(ptr[0]), int(ptr[-1])
    return sp.csr_matrix(
        (np.asarray(data[a:b]), np.asarray(indices[a:b]), ptr - a), shape=(stop - start, n_vars)
    )


def _fold_ranges(path: str, n_obs: int, ranges: Sequence[tuple[int, int]], codes: Sequence[np.ndarray], fn: PassFn, empty):
    acc = empty()
    extras = [fn(read_atlas_rows(path, a, b, n_obs), c, acc) for (a, b), c in zip(ranges, codes, strict=True)]
    return acc, extras


def _map_range(path: str, n_obs: int, start: int, stop: int, codes: np.ndarray, fn: Callable[[sp.csr_matrix, np.ndarray], Any]) -> Any:
    # module-level (not a closure over the runner): tasks must pickle for dask.distributed workers
    return fn(read_atlas_rows(path, start, stop, n_obs), codes)


@dataclass(frozen=True)
class ComputeOptions:
    """Where and how a pass over an atlas runs (not what it computes: that is :class:`~.state.PreprocessConfig`).

    Attributes
    ----------
    client
        A ``dask.distributed.Client``; default: dask's threaded scheduler.
    scheduler
        A scheduler address to connect a client to (ignored with ``client``).
    n_workers
        Threads of the local scheduler (default: the CPU count).
    bucket_values
        Memory bound of the permuted write of the training matrix: stored values shuffled in memory at once.
    """

    client: Any = None
    scheduler: str | None = None
    n_workers: int | None = None
    bucket_values: int = 1 << 23

    @property
    def threads(self) -> int:
        return self.n_workers or os.cpu_count() or 1


def atlas_ranges(all_ranges: Sequence[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """The parts of ``all_ranges`` inside rows ``[start, stop)``."""
    out = []
    for a, b in all_ranges:
        a, b = max(a, start), min(b, stop)
        if b > a:
            out.append((a, b))
    return out


@dataclass
class DaskRunner:
    """Runs a pass over atlas row ranges as dask tasks (one task per partition of contiguous ranges).

    Parameters
    ----------
    path
        Atlas path (tasks open it themselves, so they can run on distributed workers).
    ranges
        Row ranges ``[(start, stop), ...]`` covering the atlas in order.
    codes
        (n_obs,) batch code of every row.
    client
        A ``dask.distributed.Client``; default: dask's threaded scheduler with ``n_workers`` threads.
    n_workers
        Threads (without a client).
    """

    path: str
    ranges: list[tuple[int, int]]
    codes: np.ndarray
    client: Any = None
    n_workers: int = 2

    @property
    def n_obs(self) -> int:
        return int(self.codes.shape[0])

    @property
    def _parallelism(self) -> int:
        if self.client is not None:
            return max(1, sum(self.client.nthreads().values()))
        return self.n_workers

    def _compute(self, tasks: list[Any]) -> list[Any]:
        if self.client is not None:
            return self.client.gather(self.client.compute(tasks))
        return list(dask.compute(*tasks, scheduler="threads", num_workers=self.n_workers))

    def _codes(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        return [self.codes[a:b] for a, b in ranges]

    def fold(self, fn: PassFn, empty: Callable[[], M]) -> tuple[M, list[Any]]:
        n_parts = min(len(self.ranges), 2 * self._parallelism)
        bounds = np.linspace(0, len(self.ranges), n_parts + 1).astype(int)
        parts = [self.ranges[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        fold = dask.delayed(_fold_ranges, pure=False)
        results = self._compute([fold(self.path, self.n_obs, p, self._codes(p), fn, empty) for p in parts])
        acc = tree_merge([r[0] for r in results])
        return acc, [e for r in results for e in r[1]]

    def map_ordered(self, fn: Callable[[sp.csr_matrix, np.ndarray], Any]) -> Iterator[Any]:
        """``fn(rows, codes)`` of every range, in order, computed a few ranges ahead (bounded memory)."""
        wave = 2 * self._parallelism
        task = dask.delayed(_map_range, pure=False)
        for w in range(0, len(self.ranges), wave):
            batch = self.ranges[w : w + wave]
            codes = self._codes(batch)
            yield from self._compute([task(self.path, self.n_obs, a, b, c, fn) for (a, b), c in zip(batch, codes, strict=True)])
