"""Chunk functions of the preprocessing passes, and the transform of raw chunks into the model input.

A chunk is a CSR matrix of raw counts over the full atlas var (``n_vars`` columns) plus its rows' batch codes.
Whether a row passes the cell filter depends only on that row, so every function recomputes the filter itself.

Passes (the driver :func:`~.reference_driver.preprocess_chunks` strings them together):

``cell_filter_chunk`` (pass A, both profiles)
    cells with ``>= min_features`` values ``> 0`` among the name-filtered features are kept; per feature, the
    number of kept cells with a value ``> 0`` (-> ``min_cells`` filter, and ATAC's variability ranking).
``gene_moments_chunk`` (pass B, RNA)
    per batch and kept gene: sums of ``expm1(log1p(normalized))`` and of its float32 square, number of cells
    ``> 0``, and the max of ``log1p(normalized)`` (the MaxAbs scale, known for every kept gene before selection).
``peak_totals_chunk`` (pass B, ATAC)
    per cell, the number of open selected peaks (-> histogram for the median), and per batch and peak the smallest
    such total among the cells where it is open (-> MaxAbs).
``transform_chunk``
    raw chunk -> CSR of the selected features for the kept rows, scaled to [0, 1] (float32), with the atlas' or
    (projection) caller-supplied MaxAbs; ``maxabs_chunk`` computes the latter on new data.

The arithmetic mirrors scanpy 1.11.5 / scikit-learn in float32 (see :func:`normalize_chunk`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from . import kernels as K
from .state import FilterPlan, PreprocessState
from .stats import CellFilterStats, GeneMomentStats, MaxAbsStats, PeakTotalStats

__all__ = [
    "atac_values_from_totals",
    "cell_filter_chunk",
    "cell_mask_chunk",
    "gene_moments_chunk",
    "maxabs_chunk",
    "maxabs_to_factors",
    "normalize_chunk",
    "peak_totals_chunk",
    "transform_chunk",
    "unscaled_chunk",
]

_FLOAT32_SCALE_EPS = 10 * np.finfo(np.float32).eps


def _csr(
    indptr: NDArray[np.int64], indices: NDArray[np.int32], data: NDArray[np.float32], n_cols: int
) -> sp.csr_matrix:
    return sp.csr_matrix((data, indices, indptr), shape=(indptr.shape[0] - 1, n_cols), copy=False)


def _codes(batch_codes: Any, n_rows: int) -> NDArray[np.int64]:
    codes = np.asarray(batch_codes, dtype=np.int64).reshape(-1)
    if codes.shape != (n_rows,):
        raise ValueError(f"batch_codes has {codes.shape[0]} entries for {n_rows} rows")
    return codes


def _check_width(x: Any, n_vars: int) -> None:
    if x.shape[1] != n_vars:
        raise ValueError(f"chunk has {x.shape[1]} columns, expected {n_vars}")


# ----------------------------------------------------------------------------------------------------------------
# pass A


def cell_mask_chunk(x: Any, qc_mask: NDArray[np.bool_], min_features: int) -> NDArray[np.bool_]:
    """Rows with at least ``min_features`` values ``> 0`` in the columns where ``qc_mask`` is true.

    scanpy: ``filter_cells(adata[:, qc_mask], min_genes=min_features)``.
    """
    return K.count_positive_per_row(x, qc_mask) >= min_features


def cell_filter_chunk(
    x: Any,
    batch_codes: NDArray[np.integer],
    qc_mask: NDArray[np.bool_],
    min_features: int,
    n_batches: int,
    *,
    into: CellFilterStats | None = None,
) -> tuple[CellFilterStats, NDArray[np.bool_]]:
    """Pass A on one chunk: the cell mask and the per-feature counts of expressing kept cells.

    Parameters
    ----------
    x
        (n_rows, n_vars) CSR raw counts.
    batch_codes
        (n_rows,) batch code of each row, in ``[0, n_batches)``.
    qc_mask
        (n_vars,) features counted by the cell filter (:func:`~.state.qc_feature_mask`).
    min_features
        Cell filter threshold.
    n_batches
        Number of batches.
    into
        Accumulator updated in place (and returned) instead of a new one.

    Returns
    -------
    stats, cell_mask
        :class:`~.stats.CellFilterStats` of this chunk (or ``into`` updated) and the (n_rows,) kept-row mask.
    """
    n_rows, n_vars = x.shape
    codes = _codes(batch_codes, n_rows)
    cell_mask = cell_mask_chunk(x, qc_mask, min_features)
    stats = CellFilterStats.empty(n_vars, n_batches) if into is None else into
    if stats.n_cells_per_feature.shape != (n_vars,) or stats.n_cells.shape != (n_batches,):
        raise ValueError("accumulator shape does not match the chunk / n_batches")
    if n_rows and (codes.min() < 0 or codes.max() >= n_batches):
        raise ValueError(f"batch codes must lie in [0, {n_batches})")
    K.count_positive_per_column(x, cell_mask, out=stats.n_cells_per_feature)
    stats.n_cells[:] += np.bincount(codes, minlength=n_batches)
    stats.n_cells_kept[:] += np.bincount(codes[cell_mask], minlength=n_batches)
    return stats, cell_mask


# ----------------------------------------------------------------------------------------------------------------
# normalization


def atac_values_from_totals(totals: NDArray[np.integer], median_total: float) -> NDArray[np.float32]:
    """Normalized value of an open peak in a cell with ``totals`` open selected peaks.

    scanpy's ``normalize_total(target_sum=median_total)`` arithmetic on binarized data: ``norm = float32(total) /
    float32(median)`` (zero -> 1), value ``float32(1) / norm``. Non-increasing in ``totals``.
    """
    t = np.asarray(totals)
    norm = t.astype(np.float32) / np.float32(median_total)
    norm = norm + (norm == 0)
    return np.float32(1.0) / norm


def normalize_chunk(
    x: Any, plan: FilterPlan, out_index: NDArray[np.int64] | None = None
) -> tuple[sp.csr_matrix, NDArray[np.bool_]]:
    """Normalized values of the kept rows, for the features ``out_index`` (default: ``plan.norm_index``).

    RNA (scanpy ``normalize_total(target_sum)`` then ``log1p`` on the kept genes)::

        counts = float32(float64 sum of the row over the kept genes, in storage order)
        norm   = counts / float32(target_sum)            (float32; 0 -> 1)
        value  = log1p(float32(x) / norm)                 (float32, numpy's log1p)

    ATAC (binarize, then ``normalize_total(target_sum=median)`` over the selected peaks, no log): value
    :func:`atac_values_from_totals` (total = open selected peaks of the row) for every open peak, 0 for stored
    zeros.

    Returns
    -------
    values, cell_mask
        (n_kept_rows, len(out_index)) float32 CSR (entries in input order, stored zeros kept) and the row mask.
    """
    _check_width(x, plan.n_vars)
    if plan.target_sum is None:
        raise ValueError("the plan has no normalization target (ATAC: median_total is set after pass B)")
    cell_mask = cell_mask_chunk(x, plan.qc_mask, plan.min_features)
    out_index = plan.norm_index if out_index is None else np.asarray(out_index, dtype=np.int64)
    same = out_index is plan.norm_index or np.array_equal(out_index, plan.norm_index)

    ip, ix, dt = K.select_rows_and_columns(x, cell_mask, plan.col_map())
    if plan.profile == "RNA":
        counts = K._row_sums(ip, dt).astype(np.float32)
        norm = counts / np.float32(plan.target_sum)
        norm = norm + (norm == 0)
    else:
        totals = K._count_positive_per_row(ip, ix, dt, np.ones(plan.norm_index.size, dtype=np.bool_))
        value = atac_values_from_totals(totals, plan.target_sum)
    if not same:
        ip, ix, dt = K.select_rows_and_columns(x, cell_mask, plan.col_map(out_index))
    if plan.profile == "RNA":
        data = dt / np.repeat(norm, np.diff(ip))
        np.log1p(data, out=data)
    else:
        data = np.where(dt > 0, np.repeat(value, np.diff(ip)), np.float32(0.0)).astype(np.float32, copy=False)
    return _csr(ip, ix, np.ascontiguousarray(data, dtype=np.float32), out_index.size), cell_mask


# ----------------------------------------------------------------------------------------------------------------
# pass B


def gene_moments_chunk(
    x: Any,
    batch_codes: NDArray[np.integer],
    plan: FilterPlan,
    n_batches: int,
    *,
    into: GeneMomentStats | None = None,
) -> GeneMomentStats:
    """Pass B (RNA) on one chunk: per-batch moments over the kept genes (see :class:`~.stats.GeneMomentStats`).

    ``e = expm1(y)`` with numpy's float32 ``expm1``, as scanpy's seurat flavor un-logs the data.
    """
    if plan.profile != "RNA":
        raise ValueError("gene_moments_chunk is for the RNA profile")
    codes = _codes(batch_codes, x.shape[0])
    y, cell_mask = normalize_chunk(x, plan)
    kept_codes = codes[cell_mask]
    stats = GeneMomentStats.empty(n_batches, plan.norm_index.size) if into is None else into
    if stats.sum_hi.shape != (n_batches, plan.norm_index.size):
        raise ValueError("accumulator shape does not match the plan / n_batches")
    e = _csr(y.indptr, y.indices, np.expm1(y.data), y.shape[1])
    K.accumulate_batch_moments(e, kept_codes, stats.sum_hi, stats.sum_lo, stats.sumsq_hi, stats.sumsq_lo)
    K.accumulate_batch_positive(y, kept_codes, stats.n_positive)
    K.accumulate_batch_max(y, kept_codes, stats.max_log1p)
    stats.n_cells[:] += np.bincount(kept_codes, minlength=n_batches)
    return stats


def peak_totals_chunk(
    x: Any,
    batch_codes: NDArray[np.integer],
    plan: FilterPlan,
    n_batches: int,
    *,
    into: PeakTotalStats | None = None,
) -> PeakTotalStats:
    """Pass B (ATAC) on one chunk: totals histogram and per-batch minimum totals over the selected peaks.

    ``plan.norm_index`` are the selected peaks; ``plan.target_sum`` is not needed (the median is the result).
    """
    if plan.profile != "ATAC":
        raise ValueError("peak_totals_chunk is for the ATAC profile")
    _check_width(x, plan.n_vars)
    codes = _codes(batch_codes, x.shape[0])
    n_sel = plan.norm_index.size
    cell_mask = cell_mask_chunk(x, plan.qc_mask, plan.min_features)
    ip, ix, dt = K.select_rows_and_columns(x, cell_mask, plan.col_map())
    totals = K._count_positive_per_row(ip, ix, dt, np.ones(n_sel, dtype=np.bool_))
    kept_codes = codes[cell_mask]
    stats = PeakTotalStats.empty(n_batches, n_sel) if into is None else into
    if stats.min_total.shape != (n_batches, n_sel):
        raise ValueError("accumulator shape does not match the plan / n_batches")
    stats.total_hist[:] += np.bincount(totals, minlength=n_sel + 1)
    stats.n_cells[:] += np.bincount(kept_codes, minlength=n_batches)
    K.accumulate_batch_min_total(_csr(ip, ix, dt, n_sel), kept_codes, totals, stats.min_total)
    return stats


# ----------------------------------------------------------------------------------------------------------------
# transform


def maxabs_to_factors(maxabs: NDArray[np.floating]) -> NDArray[np.float32]:
    """Per-feature multipliers ``float32(1) / scale`` of scikit-learn's ``MaxAbsScaler`` (float32 input).

    ``scale = maxabs`` with near-constant features (``scale < 10 * float32 eps``, including 0) set to 1.
    """
    scale = np.array(maxabs, dtype=np.float32)
    scale[scale < _FLOAT32_SCALE_EPS] = 1.0
    return np.float32(1.0) / scale


def unscaled_chunk(x: Any, state: PreprocessState) -> tuple[sp.csr_matrix, NDArray[np.bool_]]:
    """Normalized (RNA: log1p) values of the selected features for the kept rows, before MaxAbs scaling."""
    _check_width(x, state.n_vars)
    return normalize_chunk(x, state.filter_plan(), state.feature_index_array)


def maxabs_chunk(
    x: Any,
    batch_codes: NDArray[np.integer],
    state: PreprocessState,
    n_groups: int,
    *,
    into: MaxAbsStats | None = None,
) -> MaxAbsStats:
    """Per-group MaxAbs of the unscaled selected features of new data (projection).

    With ``state.scale == "global"`` all rows go to one group (``n_groups`` must be 1 and codes are ignored).
    """
    codes = _codes(batch_codes, x.shape[0])
    if state.scale == "global":
        if n_groups != 1:
            raise ValueError("global scaling has one MaxAbs group: pass n_groups=1")
        codes = np.zeros_like(codes)
    values, cell_mask = unscaled_chunk(x, state)
    kept_codes = codes[cell_mask]
    stats = MaxAbsStats.empty(n_groups, state.n_features) if into is None else into
    if stats.max_abs.shape != (n_groups, state.n_features):
        raise ValueError("accumulator shape does not match the state / n_groups")
    K.accumulate_batch_max(values, kept_codes, stats.max_abs)
    stats.n_cells[:] += np.bincount(kept_codes, minlength=n_groups)
    return stats


def transform_chunk(
    x: Any,
    batch_codes: NDArray[np.integer],
    state: PreprocessState,
    *,
    maxabs: NDArray[np.floating] | None = None,
) -> tuple[sp.csr_matrix, NDArray[np.bool_]]:
    """Raw chunk -> model input: kept rows, selected features, MaxAbs-scaled to [0, 1], float32.

    Parameters
    ----------
    x
        (n_rows, state.n_vars) CSR raw counts over the atlas var (new data: aligned to it first, missing genes
        absent).
    batch_codes
        (n_rows,) batch code of each row (indexes the rows of ``maxabs``; ignored when it has a single row).
    state
        The preprocessing state.
    maxabs
        (n_groups, n_features) MaxAbs per group, or a single row for all rows; default: the atlas'
        (:meth:`~.state.PreprocessState.maxabs_matrix`). Which MaxAbs scales which batch (projected batches
        included) is decided in one place: :func:`scalex_scale.preprocessing.scaling.maxabs_rows`.

    Returns
    -------
    values, cell_mask
        (n_kept_rows, n_features) CSR: float32 data, int32 indices, int64 indptr; and the (n_rows,) kept-row mask.
    """
    codes = _codes(batch_codes, x.shape[0])
    m = state.maxabs_matrix() if maxabs is None else np.asarray(maxabs, dtype=np.float32)
    if m.ndim != 2 or m.shape[1] != state.n_features:
        raise ValueError(f"maxabs must have shape (n_groups, {state.n_features})")
    if m.shape[0] == 1:  # one MaxAbs for every row (global scaling of one cohort)
        codes = np.zeros_like(codes)
    values, cell_mask = unscaled_chunk(x, state)
    data = K.scale_by_group(values, codes[cell_mask], maxabs_to_factors(m))
    return _csr(values.indptr, values.indices, data, state.n_features), cell_mask
