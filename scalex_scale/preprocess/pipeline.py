"""Preprocessing of an atlas on disk: the passes of :mod:`.reference_driver` run over row ranges with dask.

Pass A and pass B fold row ranges into mergeable accumulators, in parallel partitions (dask threads by default,
or a ``dask.distributed`` client's workers), merged in a tree. A third pass transforms the rows of the cells that
pass QC and writes the training matrix in a random row permutation (:mod:`scalex_scale.store.training`). The run is
one transaction: matrix, var, obs and state are committed together, so a failed run leaves the atlas as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import dask
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .._fs import sibling
from ..store.atlas import Atlas
from ..store.errors import PreprocessError
from ..store.training import PermutedWriter
from ..store.txn import transaction
from .reference_driver import PassFn, preprocess_chunks
from .state import PreprocessConfig, PreprocessState
from .stats import tree_merge
from .transform import transform_chunk

log = logging.getLogger(__name__)
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


def preprocess(
    store: str | Path,
    *,
    profile: Literal["RNA", "ATAC"] | None = None,
    n_top_features: int | None = None,
    min_features: int | None = None,
    min_cells: int = 3,
    scale: Literal["batch", "global"] = "batch",
    keep_mt: bool = False,
    seed: int = 0,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    bucket_values: int = 1 << 23,
    lock_timeout: float | None = None,
) -> PreprocessState:
    """Preprocess an atlas: QC filters, normalization, feature selection, scaling; write the training matrix.

    Parameters
    ----------
    store
        Atlas path.
    profile
        ``"RNA"`` or ``"ATAC"``; default: the profile recorded at ingest.
    n_top_features
        Features to select (RNA: 2000 HVGs; ATAC: 30000 peaks).
    min_features, min_cells
        Cell filter (features > 0 per cell; default 600) and feature filter (kept cells per feature).
    scale
        MaxAbs scaling per batch (the paper) or global (reference package 1.0.4).
    keep_mt
        Keep ``MT-``/``mt-``/``ERCC`` genes (RNA).
    seed
        Seed of the training matrix' random row order (stored in the state).
    client, scheduler
        A ``dask.distributed.Client``, or a scheduler address to connect one; default: local threads.
    n_workers
        Threads of the local scheduler (default: the CPU count).
    bucket_values
        Memory bound of the permuted write: stored values shuffled in memory at once.
    lock_timeout
        Seconds to wait for another writer of the atlas (None: wait; 0: fail at once).

    Returns
    -------
    PreprocessState
        Also stored in the atlas (``uns/scalex_scale/state``), with ``n_train`` and ``permutation_seed``.
    """
    import os

    t0 = time.perf_counter()
    with transaction(store, "preprocess", lock_timeout=lock_timeout) as txn:
        if txn.is_new:
            raise PreprocessError(f"{store}: no such atlas; create it with `scalex-scale ingest {store} INPUTS`")
        atlas = txn.atlas
        state = _preprocess(atlas, profile, n_top_features, min_features, min_cells, scale, keep_mt, seed, client,
                            scheduler, n_workers, bucket_values, t0)  # fmt: skip
    return state


def _preprocess(atlas, profile, n_top_features, min_features, min_cells, scale, keep_mt, seed, client, scheduler,
                n_workers, bucket_values, t0) -> PreprocessState:  # fmt: skip
    import os

    ingest = atlas.state.get("ingest") or {}
    profile = profile or ingest.get("profile", "RNA")
    config = PreprocessConfig(
        profile=profile,
        min_features=600 if min_features is None else min_features,
        min_cells=min_cells,
        n_top_features=n_top_features,
        scale=scale,
        keep_mt=keep_mt,
    )
    if atlas.n_obs == 0:
        raise PreprocessError(f"{atlas.path}: the atlas has no cells")
    own_client = False
    if client is None and scheduler is not None:
        from distributed import Client

        client, own_client = Client(scheduler), True
    try:
        runner = DaskRunner(
            str(atlas.directory),
            atlas.row_ranges(target_nnz=RANGE_VALUES),
            atlas.batch_codes,
            client=client,
            n_workers=n_workers or os.cpu_count() or 1,
        )
        batches = atlas.batch_categories
        try:
            result = preprocess_chunks(None, atlas.var_names, batches, config, runner=runner)
        except ValueError as err:
            raise PreprocessError(f"{atlas.path}: {err}") from err
        kept = result.cell_stats.n_cells_kept
        empty = [b for b, n in zip(batches, kept, strict=True) if n == 0]
        if empty:
            raise PreprocessError(
                f"{atlas.path}: batch {', '.join(map(repr, empty))} has no cells left after filtering "
                f"(min_features={config.min_features}); lower --min-features or leave the batch out"
            )
        log.info(
            "preprocess: %d of %d cells pass QC, %d features selected (%.1f s)",
            int(kept.sum()), atlas.n_obs, result.state.n_features, time.perf_counter() - t0,
        )
        state = result.state
        n_train = int(result.cell_mask.sum())
        record = {**state.to_dict(), "n_train": n_train, "permutation_seed": int(seed), "n_obs": atlas.n_obs}
        record["train_id"] = _write_training_matrix(atlas, runner, state, result.cell_mask, seed, bucket_values, record)
    finally:
        if own_client:
            client.close()
    var = atlas.var.drop(columns=[c for c in result.var.columns if c in atlas.var.columns])
    var = pd.concat([var, result.var.drop(columns=["qc"])], axis=1)
    atlas.write_var(var)
    atlas.write_obs_columns({"scalex_qc_pass": result.cell_mask})
    atlas.update_state("preprocess", record)
    log.info("preprocess: wrote %d training rows in %.1f s", n_train, time.perf_counter() - t0)
    return state


def _write_training_matrix(
    atlas: Atlas, runner: DaskRunner, state: PreprocessState, cell_mask: np.ndarray, seed: int, bucket_values: int,
    record: dict[str, Any],
) -> str:  # fmt: skip
    """Third pass: transform QC-passing rows and write them permuted as the training matrix; returns its id."""
    spill = sibling(atlas.path, "spill")
    writer = PermutedWriter(
        spill, int(atlas.indptr[-1]), np.random.default_rng(seed), n_features=state.n_features, bucket_values=bucket_values
    )
    try:
        for (start, stop), (values, mask) in zip(
            runner.ranges, runner.map_ordered(lambda x, codes: transform_chunk(x, codes, state)), strict=True
        ):
            rows = start + np.flatnonzero(mask)
            writer.add(values.indptr, values.indices, values.data, rows, runner.codes[rows])
        return writer.finish(atlas, record)  # the id names the content: the same inputs give the same id
    except BaseException:
        writer.abort()
        raise
