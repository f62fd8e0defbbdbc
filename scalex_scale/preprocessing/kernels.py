"""Numba kernels over CSR row chunks for the streaming preprocessing passes.

Every kernel does one job, is compiled eagerly for one explicit signature and runs serially (parallelism comes from
processing chunks concurrently, e.g. with dask). The CSR parts the kernels take are always::

    indptr   int64[::1]    (n_rows + 1,) starting at 0
    indices  int32[::1]    (nnz,)
    data     float32[::1]  (nnz,)

The public function next to each kernel validates and casts its inputs (:func:`csr_parts`), then calls the kernel.

What is deliberately *not* here: ``log1p`` / ``expm1`` and the float32 divisions of ``normalize_total``. numpy's
float32 ``log1p``/``expm1`` (SIMD) and numba's (libm) differ in the last bit for a few percent of values, and
scanpy uses numpy's, so those element-wise steps are done with numpy in :mod:`.transform`.

Floating-point sums that feed the highly-variable-gene statistics are kept as *double-double* (``hi``, ``lo``)
pairs, updated with the error-free TwoSum transformation. The represented value ``hi + lo`` is then (for realistic
inputs exactly, in general to ~2**-100 relative) the exact sum, so the rounded float64 result does not depend on
how rows are split into chunks or in which order chunk results are merged.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "accumulate_batch_max",
    "accumulate_batch_min_total",
    "accumulate_batch_moments",
    "accumulate_batch_positive",
    "count_positive_per_column",
    "count_positive_per_row",
    "csr_parts",
    "row_sums",
    "scale_by_group",
    "select_rows_and_columns",
]

INT64_SENTINEL = np.iinfo(np.int64).max
"""Value of an empty minimum-total cell (no cell seen) in :func:`accumulate_batch_min_total`."""


# ----------------------------------------------------------------------------------------------------------------
# validation helpers


def csr_parts(x: Any) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float32], int, int]:
    """Validate a CSR matrix and return its parts in the kernels' dtypes.

    Parameters
    ----------
    x
        A scipy CSR matrix or array (anything with ``format == "csr"``, ``indptr``, ``indices``, ``data``,
        ``shape``).

    Returns
    -------
    indptr, indices, data, n_rows, n_cols
        ``indptr`` int64 starting at 0, ``indices`` int32, ``data`` float32, all C-contiguous (no copy when the
        dtypes already match).

    Raises
    ------
    TypeError
        If ``x`` is not CSR.
    ValueError
        If the parts are inconsistent, a column index is out of range, or the data cannot be float32 exactly
        enough (non-finite values).
    """
    if getattr(x, "format", None) != "csr":
        raise TypeError(f"expected a CSR matrix, got {type(x).__name__}")
    n_rows, n_cols = (int(s) for s in x.shape)
    if n_cols > np.iinfo(np.int32).max:
        raise ValueError(f"too many columns for int32 indices: {n_cols}")
    indptr = np.ascontiguousarray(x.indptr, dtype=np.int64)
    if indptr.shape != (n_rows + 1,):
        raise ValueError(f"indptr has shape {indptr.shape}, expected ({n_rows + 1},)")
    start = int(indptr[0])
    if start != 0:  # a view into larger arrays
        indptr = indptr - start
    nnz = int(indptr[-1])
    if nnz < 0 or np.any(np.diff(indptr) < 0):
        raise ValueError("indptr must be non-decreasing")
    indices, data = x.indices, x.data
    if start != 0 or len(indices) != nnz or len(data) != nnz:
        indices, data = indices[start : start + nnz], data[start : start + nnz]
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if indices.shape != (nnz,) or data.shape != (nnz,):
        raise ValueError("indices/data length does not match indptr[-1]")
    if nnz and (int(indices.min()) < 0 or int(indices.max()) >= n_cols):
        raise ValueError("column index out of range")
    return indptr, indices, data, n_rows, n_cols


def _as_codes(codes: Any, n_rows: int, n_groups: int) -> NDArray[np.int64]:
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    if codes.shape != (n_rows,):
        raise ValueError(f"group codes have shape {codes.shape}, expected ({n_rows},)")
    if n_rows and (int(codes.min()) < 0 or int(codes.max()) >= n_groups):
        raise ValueError(f"group codes must lie in [0, {n_groups})")
    return codes


def _check_2d(a: Any, name: str, dtype: type, shape: tuple[int, int]) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array of shape {shape}")


# ----------------------------------------------------------------------------------------------------------------
# cell / feature counts


@numba.njit("int64[::1](int64[::1], int32[::1], float32[::1], boolean[::1])", cache=True, nogil=True)
def _count_positive_per_row(
    indptr: NDArray[np.int64], indices: NDArray[np.int32], data: NDArray[np.float32], col_mask: NDArray[np.bool_]
) -> NDArray[np.int64]:
    n_rows = indptr.shape[0] - 1
    out = np.zeros(n_rows, dtype=np.int64)
    for r in range(n_rows):
        n = np.int64(0)
        for j in range(indptr[r], indptr[r + 1]):
            if data[j] > np.float32(0.0) and col_mask[indices[j]]:
                n += 1
        out[r] = n
    return out


def count_positive_per_row(x: Any, col_mask: NDArray[np.bool_] | None = None) -> NDArray[np.int64]:
    """Number of stored values ``> 0`` in each row, counting only columns where ``col_mask`` is true.

    This is scanpy's ``filter_cells(min_genes=...)`` statistic (``(X > 0).sum(axis=1)``) on the column subset.
    """
    indptr, indices, data, _, n_cols = csr_parts(x)
    mask = np.ones(n_cols, dtype=np.bool_) if col_mask is None else np.ascontiguousarray(col_mask, dtype=np.bool_)
    if mask.shape != (n_cols,):
        raise ValueError(f"col_mask has shape {mask.shape}, expected ({n_cols},)")
    return _count_positive_per_row(indptr, indices, data, mask)


@numba.njit("void(int64[::1], int32[::1], float32[::1], boolean[::1], int64[::1])", cache=True, nogil=True)
def _count_positive_per_column(
    indptr: NDArray[np.int64],
    indices: NDArray[np.int32],
    data: NDArray[np.float32],
    row_mask: NDArray[np.bool_],
    out: NDArray[np.int64],
) -> None:
    n_rows = indptr.shape[0] - 1
    for r in range(n_rows):
        if not row_mask[r]:
            continue
        for j in range(indptr[r], indptr[r + 1]):
            if data[j] > np.float32(0.0):
                out[indices[j]] += 1


def count_positive_per_column(
    x: Any, row_mask: NDArray[np.bool_] | None = None, out: NDArray[np.int64] | None = None
) -> NDArray[np.int64]:
    """Add, per column, the number of rows (where ``row_mask`` is true) with a stored value ``> 0``.

    This is scanpy's ``filter_genes(min_cells=...)`` statistic (``(X > 0).sum(axis=0)``) over the kept rows.
    ``out`` (int64, ``(n_cols,)``) is updated in place and returned; a new zero array is used when omitted.
    """
    indptr, indices, data, n_rows, n_cols = csr_parts(x)
    mask = np.ones(n_rows, dtype=np.bool_) if row_mask is None else np.ascontiguousarray(row_mask, dtype=np.bool_)
    if mask.shape != (n_rows,):
        raise ValueError(f"row_mask has shape {mask.shape}, expected ({n_rows},)")
    if out is None:
        out = np.zeros(n_cols, dtype=np.int64)
    elif out.dtype != np.int64 or out.shape != (n_cols,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous int64 array of shape ({n_cols},)")
    _count_positive_per_column(indptr, indices, data, mask, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# row selection / column remapping, row sums


@numba.njit(
    "Tuple((int64[::1], int32[::1], float32[::1]))(int64[::1], int32[::1], float32[::1], boolean[::1], int64[::1])",
    cache=True,
    nogil=True,
)
def _select_rows_and_columns(
    indptr: NDArray[np.int64],
    indices: NDArray[np.int32],
    data: NDArray[np.float32],
    row_mask: NDArray[np.bool_],
    col_map: NDArray[np.int64],
) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float32]]:
    n_rows = indptr.shape[0] - 1
    n_out = np.int64(0)
    for r in range(n_rows):
        if row_mask[r]:
            n_out += 1
    new_indptr = np.zeros(n_out + 1, dtype=np.int64)
    k = np.int64(0)
    o = np.int64(0)
    for r in range(n_rows):
        if not row_mask[r]:
            continue
        for j in range(indptr[r], indptr[r + 1]):
            if col_map[indices[j]] >= 0:
                k += 1
        o += 1
        new_indptr[o] = k
    new_indices = np.empty(k, dtype=np.int32)
    new_data = np.empty(k, dtype=np.float32)
    k = 0
    for r in range(n_rows):
        if not row_mask[r]:
            continue
        for j in range(indptr[r], indptr[r + 1]):
            c = col_map[indices[j]]
            if c >= 0:
                new_indices[k] = np.int32(c)
                new_data[k] = data[j]
                k += 1
    return new_indptr, new_indices, new_data


def select_rows_and_columns(
    x: Any, row_mask: NDArray[np.bool_] | None, col_map: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float32]]:
    """Keep the rows where ``row_mask`` is true and the entries whose column maps to ``col_map[c] >= 0``.

    The order of the entries within a row is preserved; the kept entries get column ``col_map[c]``.

    Returns
    -------
    indptr, indices, data
        The parts of the selected CSR matrix (int64, int32, float32).
    """
    indptr, indices, data, n_rows, n_cols = csr_parts(x)
    mask = np.ones(n_rows, dtype=np.bool_) if row_mask is None else np.ascontiguousarray(row_mask, dtype=np.bool_)
    if mask.shape != (n_rows,):
        raise ValueError(f"row_mask has shape {mask.shape}, expected ({n_rows},)")
    cmap = np.ascontiguousarray(col_map, dtype=np.int64)
    if cmap.shape != (n_cols,):
        raise ValueError(f"col_map has shape {cmap.shape}, expected ({n_cols},)")
    if cmap.size and int(cmap.max()) > np.iinfo(np.int32).max:
        raise ValueError("col_map targets exceed int32")
    return _select_rows_and_columns(indptr, indices, data, mask, cmap)


@numba.njit("float64[::1](int64[::1], float32[::1])", cache=True, nogil=True)
def _row_sums(indptr: NDArray[np.int64], data: NDArray[np.float32]) -> NDArray[np.float64]:
    n_rows = indptr.shape[0] - 1
    out = np.zeros(n_rows, dtype=np.float64)
    for r in range(n_rows):
        acc = np.float64(0.0)
        for j in range(indptr[r], indptr[r + 1]):
            acc += np.float64(data[j])
        out[r] = acc
    return out


def row_sums(x: Any) -> NDArray[np.float64]:
    """Per-row sum of the stored values, accumulated in float64 in storage order.

    Mirrors scanpy's ``_normalize_csr`` (float64 ``count += data[j]``), which then stores the total in float32.
    """
    indptr, _, data, _, _ = csr_parts(x)
    return _row_sums(indptr, data)


# ----------------------------------------------------------------------------------------------------------------
# per-group (batch) accumulators


@numba.njit(
    "void(int64[::1], int32[::1], float32[::1], int64[::1], "
    "float64[:, ::1], float64[:, ::1], float64[:, ::1], float64[:, ::1])",
    cache=True,
    nogil=True,
)
def _accumulate_batch_moments(
    indptr: NDArray[np.int64],
    indices: NDArray[np.int32],
    values: NDArray[np.float32],
    codes: NDArray[np.int64],
    sum_hi: NDArray[np.float64],
    sum_lo: NDArray[np.float64],
    sumsq_hi: NDArray[np.float64],
    sumsq_lo: NDArray[np.float64],
) -> None:
    n_rows = indptr.shape[0] - 1
    for r in range(n_rows):
        b = codes[r]
        for j in range(indptr[r], indptr[r + 1]):
            c = indices[j]
            v = values[j]
            # sum of float64(v): TwoSum into (hi, lo)
            x = np.float64(v)
            a = sum_hi[b, c]
            s = a + x
            bp = s - a
            sum_lo[b, c] += (a - (s - bp)) + (x - bp)
            sum_hi[b, c] = s
            # sum of squares: the square is rounded to float32 first, as in scanpy's
            # sparse_mean_var_minor_axis (float32 * float32 in numba), then added in float64
            sq = np.float32(v * v)
            x = np.float64(sq)
            a = sumsq_hi[b, c]
            s = a + x
            bp = s - a
            sumsq_lo[b, c] += (a - (s - bp)) + (x - bp)
            sumsq_hi[b, c] = s


def accumulate_batch_moments(
    x: Any,
    codes: NDArray[np.integer],
    sum_hi: NDArray[np.float64],
    sum_lo: NDArray[np.float64],
    sumsq_hi: NDArray[np.float64],
    sumsq_lo: NDArray[np.float64],
) -> None:
    """Add each row's values ``v`` and ``float32(v * v)`` into its group's per-column double-double sums.

    ``x`` holds the values (for the seurat HVG: ``expm1(log1p(normalized))`` in float32); ``codes[r]`` is row
    ``r``'s group. The four ``(n_groups, n_cols)`` float64 arrays are updated in place.
    """
    indptr, indices, data, n_rows, n_cols = csr_parts(x)
    shape = sum_hi.shape
    if len(shape) != 2 or shape[1] != n_cols:
        raise ValueError(f"accumulators must have shape (n_groups, {n_cols})")
    for name, a in (("sum_hi", sum_hi), ("sum_lo", sum_lo), ("sumsq_hi", sumsq_hi), ("sumsq_lo", sumsq_lo)):
        _check_2d(a, name, np.float64, shape)
    _accumulate_batch_moments(
        indptr, indices, data, _as_codes(codes, n_rows, shape[0]), sum_hi, sum_lo, sumsq_hi, sumsq_lo
    )


@numba.njit("void(int64[::1], int32[::1], float32[::1], int64[::1], int64[:, ::1])", cache=True, nogil=True)
def _accumulate_batch_positive(
    indptr: NDArray[np.int64],
    indices: NDArray[np.int32],
    values: NDArray[np.float32],
    codes: NDArray[np.int64],
    out: NDArray[np.int64],
) -> None:
    n_rows = indptr.shape[0] - 1
    for r in range(n_rows):
        b = codes[r]
        for j in range(indptr[r], indptr[r + 1]):
            if values[j] > np.float32(0.0):
                out[b, indices[j]] += 1


def accumulate_batch_positive(x: Any, codes: NDArray[np.integer], out: NDArray[np.int64]) -> None:
    """Add, per group and column, the number of rows with a stored value ``> 0`` (``out`` updated in place)."""
    indptr, indices, data, n_rows, n_cols = csr_parts(x)
    if out.ndim != 2 or out.shape[1] != n_cols:
        raise ValueError(f"out must have shape (n_groups, {n_cols})")
    _check_2d(out, "out", np.int64, out.shape)
    _accumulate_batch_positive(indptr, indices, data, _as_codes(codes, n_rows, out.shape[0]), out)


@numba.njit("void(int64[::1], int32[::1], float32[::1], int64[::1], float32[:, ::1])", cache=True, nogil=True)
def _accumulate_batch_max(
    indptr: NDArray[np.int64],
    indices: NDArray[np.int32],
    values: NDArray[np.float32],
    codes: NDArray[np.int64],
    out: NDArray[np.float32],
) -> None:
    n_rows = indptr.shape[0] - 1
    for r in range(n_rows):
        b = codes[r]
        for j in range(indptr[r], indptr[r + 1]):
            v = abs(values[j])
            c = indices[j]
            if v > out[b, c]:
                out[b, c] = v


def accumulate_batch_max(x: Any, codes: NDArray[np.integer], out: NDArray[np.float32]) -> None:
    """Per group and column, raise ``out`` to the largest ``|value|`` of the group's rows (in place).

    Start ``out`` at 0: implicit zeros then count, as in scikit-learn's ``MaxAbsScaler`` on sparse input.
    """
    indptr, indices, data, n_rows, n_cols = csr_parts(x)
    if out.ndim != 2 or out.shape[1] != n_cols:
        raise ValueError(f"out must have shape (n_groups, {n_cols})")
    _check_2d(out, "out", np.float32, out.shape)
    _accumulate_batch_max(indptr, indices, data, _as_codes(codes, n_rows, out.shape[0]), out)


@numba.njit(
    "void(int64[::1], int32[::1], float32[::1], int64[::1], int64[::1], int64[:, ::1])", cache=True, nogil=True
)
def _accumulate_batch_min_total(
    indptr: NDArray[np.int64],
    indices: NDArray[np.int32],
    data: NDArray[np.float32],
    codes: NDArray[np.int64],
    totals: NDArray[np.int64],
    out: NDArray[np.int64],
) -> None:
    n_rows = indptr.shape[0] - 1
    for r in range(n_rows):
        b = codes[r]
        t = totals[r]
        for j in range(indptr[r], indptr[r + 1]):
            if data[j] > np.float32(0.0):
                c = indices[j]
                if t < out[b, c]:
                    out[b, c] = t


def accumulate_batch_min_total(
    x: Any, codes: NDArray[np.integer], totals: NDArray[np.integer], out: NDArray[np.int64]
) -> None:
    """Per group and column, lower ``out`` to the smallest row total among rows with a value ``> 0`` there.

    Used for binarized ATAC data: the normalized value ``1 / (total / median)`` decreases with the row total, so
    the per-batch MaxAbs of a peak is the value at the smallest total of the cells where the peak is open. Start
    ``out`` at :data:`INT64_SENTINEL` (no cell).
    """
    indptr, indices, data, n_rows, n_cols = csr_parts(x)
    if out.ndim != 2 or out.shape[1] != n_cols:
        raise ValueError(f"out must have shape (n_groups, {n_cols})")
    _check_2d(out, "out", np.int64, out.shape)
    t = np.ascontiguousarray(totals, dtype=np.int64)
    if t.shape != (n_rows,):
        raise ValueError(f"totals has shape {t.shape}, expected ({n_rows},)")
    _accumulate_batch_min_total(indptr, indices, data, _as_codes(codes, n_rows, out.shape[0]), t, out)


# ----------------------------------------------------------------------------------------------------------------
# scaling


@numba.njit("float32[::1](int64[::1], int32[::1], float32[::1], int64[::1], float32[:, ::1])", cache=True, nogil=True)
def _scale_by_group(
    indptr: NDArray[np.int64],
    indices: NDArray[np.int32],
    data: NDArray[np.float32],
    codes: NDArray[np.int64],
    factors: NDArray[np.float32],
) -> NDArray[np.float32]:
    n_rows = indptr.shape[0] - 1
    out = np.empty(data.shape[0], dtype=np.float32)
    for r in range(n_rows):
        b = codes[r]
        for j in range(indptr[r], indptr[r + 1]):
            out[j] = data[j] * factors[b, indices[j]]
    return out


def scale_by_group(x: Any, codes: NDArray[np.integer], factors: NDArray[np.float32]) -> NDArray[np.float32]:
    """Return the stored values multiplied (in float32) by ``factors[codes[row], column]``.

    With ``factors = float32(1) / maxabs`` this is scikit-learn's ``MaxAbsScaler.transform`` on sparse input
    (``X.data *= (1.0 / scale_).take(X.indices)``), per group.
    """
    indptr, indices, data, n_rows, n_cols = csr_parts(x)
    f = np.ascontiguousarray(factors, dtype=np.float32)
    if f.ndim != 2 or f.shape[1] != n_cols:
        raise ValueError(f"factors must have shape (n_groups, {n_cols})")
    return _scale_by_group(indptr, indices, data, _as_codes(codes, n_rows, f.shape[0]), f)
