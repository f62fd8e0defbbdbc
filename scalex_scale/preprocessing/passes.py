"""The preprocessing passes (what ``preprocess`` runs): raw counts -> QC masks, feature selection, MaxAbs.

:func:`preprocess_chunks` strings the passes together over any runner: the shipped one is
:class:`~.runner.DaskRunner` (atlas row ranges read from the store, folded as dask tasks, merged in a tree);
:class:`SequentialRunner` folds a re-iterable source of in-memory ``(csr, batch_codes)`` chunks in place (the same
arithmetic, for data that is already in memory). Two passes over the raw counts:

pass A  :func:`~.transform.cell_filter_chunk` -> cell mask, per-feature expressing-cell counts -> kept features
        (RNA: ``min_cells`` genes; ATAC: ``min_cells`` peaks, then the ``n_top`` most variable ones)
pass B  RNA: :func:`~.transform.gene_moments_chunk` -> per-batch moments -> seurat HVG, per-batch MaxAbs
        ATAC: :func:`~.transform.peak_totals_chunk` -> median total, per-batch MaxAbs

then :func:`~.transform.transform_chunk` (the third pass, mapped by the runner) gives the model input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from .hvg import highly_variable_genes_from_stats, select_variable_peaks
from .kernels import INT64_SENTINEL
from .state import GLOBAL_MAXABS_KEY, FilterPlan, PreprocessConfig, PreprocessState, qc_feature_mask
from .stats import CellFilterStats, GeneMomentStats, PeakTotalStats
from .transform import (
    atac_values_from_totals,
    cell_filter_chunk,
    gene_moments_chunk,
    peak_totals_chunk,
)

__all__ = ["ChunkSource", "PassRunner", "PreprocessResult", "SequentialRunner", "preprocess_chunks"]

ChunkSource = Callable[[], Iterable[tuple[Any, NDArray[np.integer]]]]
"""A callable returning a fresh iterable of ``(csr raw counts (rows, n_vars), batch codes (rows,))`` chunks, the
same rows in the same order on every call."""


M = TypeVar("M")
PassFn = Callable[[Any, NDArray[np.integer], Any], Any]
"""``fn(csr_chunk, batch_codes, accumulator)``: folds one chunk into the accumulator, returns a per-chunk extra."""


class PassRunner(Protocol):
    """Runs one pass: folds every chunk into accumulators made by ``empty()`` and merges them.

    Returns the merged accumulator and the per-chunk extras in row order.
    """

    def fold(self, fn: PassFn, empty: Callable[[], M]) -> tuple[M, list[Any]]: ...


@dataclass(frozen=True)
class SequentialRunner:
    """The plain runner: one accumulator, chunks folded in order."""

    chunk_factory: ChunkSource

    def fold(self, fn: PassFn, empty: Callable[[], M]) -> tuple[M, list[Any]]:
        acc = empty()
        extras = [fn(x, codes, acc) for x, codes in self.chunk_factory()]
        return acc, extras


@dataclass(frozen=True)
class PreprocessResult:
    """What :func:`preprocess_chunks` computed.

    Attributes
    ----------
    state
        The :class:`~.state.PreprocessState` (selected features, MaxAbs, ...).
    cell_mask
        (n_obs,) bool, rows in source order: cells passing the cell filter.
    var
        Per-feature table indexed by the var names: ``qc`` (not dropped by name), ``n_cells`` (kept cells with a
        value > 0), ``kept`` (passes ``min_cells``), ``highly_variable`` (selected); RNA adds scanpy's
        ``means``, ``dispersions``, ``dispersions_norm``, ``highly_variable_nbatches``,
        ``highly_variable_intersection`` (NaN / 0 / False for genes not kept).
    cell_stats
        Merged pass-A statistics.
    feature_stats
        Merged pass-B statistics (:class:`~.stats.GeneMomentStats` over kept genes, or
        :class:`~.stats.PeakTotalStats` over selected peaks).
    """

    state: PreprocessState
    cell_mask: NDArray[np.bool_]
    var: pd.DataFrame
    cell_stats: CellFilterStats
    feature_stats: GeneMomentStats | PeakTotalStats


def _maxabs_dict(
    per_batch: NDArray[np.float32], n_cells: NDArray[np.int64], batches: Sequence[str], scale: str
) -> dict[str, list[float]]:
    if scale == "global":
        return {GLOBAL_MAXABS_KEY: per_batch.max(axis=0, initial=np.float32(0)).tolist()}
    return {batches[b]: per_batch[b].tolist() for b in range(len(batches)) if n_cells[b] > 0}


def preprocess_chunks(
    chunk_factory: ChunkSource,
    var_names: Sequence[Any] | pd.Index,
    batch_categories: Sequence[Any],
    config: PreprocessConfig | None = None,
    *,
    runner: PassRunner | None = None,
) -> PreprocessResult:
    """Run the preprocessing passes over a chunk source and return the state.

    Parameters
    ----------
    chunk_factory
        Called once per pass; returns the chunks (see :data:`ChunkSource`). Chunk sizes are free and may vary.
    var_names
        (n_vars,) unique feature names (the chunks' columns).
    batch_categories
        Batch names; chunk batch codes index into it. Their order is the batch order of the HVG combination
        (scanpy iterates ``obs['batch'].cat.categories``).
    config
        What to do; default :class:`~.state.PreprocessConfig` ().
    runner
        How each pass maps chunks to accumulators and merges them; default: a sequential fold over
        ``chunk_factory()``. The store pipeline passes a dask runner (threads or a ``dask.distributed`` client).

    Returns
    -------
    PreprocessResult

    Raises
    ------
    ValueError
        On duplicate var names, a chunk of the wrong width, or when no cell passes the cell filter.
    """
    config = PreprocessConfig() if config is None else config
    names = pd.Index(var_names)
    if not names.is_unique:
        raise ValueError("var names must be unique")
    batches = [str(b) for b in batch_categories]
    n_vars, n_batches = len(names), len(batches)
    qc = qc_feature_mask(names, config.profile, config.keep_mt)

    runner = SequentialRunner(chunk_factory) if runner is None else runner

    # ---- pass A ----
    def pass_a(x: Any, codes: NDArray[np.integer], acc: CellFilterStats) -> NDArray[np.bool_]:
        if x.shape[1] != n_vars:
            raise ValueError(f"chunk has {x.shape[1]} columns, expected {n_vars}")
        return cell_filter_chunk(x, codes, qc, config.min_features, n_batches, into=acc)[1]

    cell_stats, masks = runner.fold(pass_a, lambda: CellFilterStats.empty(n_vars, n_batches))
    cell_mask = np.concatenate(masks) if masks else np.zeros(0, dtype=np.bool_)
    n_kept = int(cell_stats.n_cells_kept.sum())
    if n_kept == 0:
        raise ValueError(f"no cell has at least min_features={config.min_features} expressed features")
    kept = qc & (cell_stats.n_cells_per_feature >= config.min_cells)
    kept_index = np.flatnonzero(kept).astype(np.int64)
    n_top = config.n_top

    var = pd.DataFrame({"qc": qc, "n_cells": cell_stats.n_cells_per_feature, "kept": kept}, index=names)

    # ---- pass B ----
    if config.profile == "RNA":
        plan = FilterPlan("RNA", n_vars, qc, config.min_features, kept_index, config.target_sum)
        moments, _ = runner.fold(
            lambda x, codes, acc: gene_moments_chunk(x, codes, plan, n_batches, into=acc),
            lambda: GeneMomentStats.empty(n_batches, kept_index.size),
        )
        hvg = highly_variable_genes_from_stats(moments, names[kept_index], n_top_genes=n_top, n_bins=config.n_bins)
        selected_pos = np.flatnonzero(hvg["highly_variable"].to_numpy())
        feature_index = kept_index[selected_pos]
        per_batch = moments.max_log1p[:, selected_pos]
        maxabs = _maxabs_dict(per_batch, moments.n_cells, batches, config.scale)
        for col in ("means", "dispersions", "dispersions_norm"):
            var[col] = np.nan
            var.loc[hvg.index, col] = hvg[col].to_numpy()
        var["highly_variable_nbatches"] = 0
        var.loc[hvg.index, "highly_variable_nbatches"] = hvg["highly_variable_nbatches"].to_numpy()
        var["highly_variable_intersection"] = False
        var.loc[hvg.index, "highly_variable_intersection"] = hvg["highly_variable_intersection"].to_numpy()
        feature_stats: GeneMomentStats | PeakTotalStats = moments
        median_total = None
    else:
        selected_pos = select_variable_peaks(cell_stats.n_cells_per_feature[kept_index], n_kept, n_top)
        feature_index = kept_index[selected_pos]
        plan = FilterPlan("ATAC", n_vars, qc, config.min_features, feature_index, None)
        totals, _ = runner.fold(
            lambda x, codes, acc: peak_totals_chunk(x, codes, plan, n_batches, into=acc),
            lambda: PeakTotalStats.empty(n_batches, feature_index.size),
        )
        median_total = totals.median_total()
        empty = totals.min_total == INT64_SENTINEL
        per_batch = atac_values_from_totals(np.where(empty, 0, totals.min_total), median_total)
        per_batch[empty] = 0
        maxabs = _maxabs_dict(per_batch, totals.n_cells, batches, config.scale)
        feature_stats = totals

    var["highly_variable"] = False
    var.iloc[feature_index, var.columns.get_loc("highly_variable")] = True

    state = PreprocessState(
        profile=config.profile,
        n_vars=n_vars,
        features=[str(n) for n in names[feature_index]],
        feature_index=feature_index.tolist(),
        dropped_index=np.flatnonzero(~qc).tolist(),
        genes_kept_index=kept_index.tolist(),
        min_features=config.min_features,
        min_cells=config.min_cells,
        n_top_features=n_top,
        target_sum=config.target_sum,
        scale=config.scale,
        keep_mt=config.keep_mt,
        n_bins=config.n_bins,
        batches=batches,
        maxabs=maxabs,
        median_total=median_total,
        n_cells_kept=n_kept,
    )
    return PreprocessResult(state, cell_mask, var, cell_stats, feature_stats)
