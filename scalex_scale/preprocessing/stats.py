"""Mergeable accumulators for the streaming preprocessing passes.

Each pass maps a row chunk to one of these dataclasses; ``merge(a, b)`` combines two of them, so chunk results can
be reduced in any tree (dask ``reduction``/``fold``) or folded sequentially (``into=`` arguments in
:mod:`.transform` update an accumulator in place). Merging is associative and commutative: counts add, maxima and
minima combine, and the floating-point sums are double-double pairs (see :mod:`.kernels`) whose rounded value does
not depend on the merge order.

The arrays of a frozen dataclass may still be updated in place by the ``*_chunk(..., into=...)`` functions; ``merge``
itself never mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Protocol, Self, TypeVar

import numpy as np
from numpy.typing import NDArray

from .kernels import INT64_SENTINEL

__all__ = [
    "CellFilterStats",
    "GeneMomentStats",
    "MaxAbsStats",
    "PeakTotalStats",
    "dd_add",
    "dd_value",
    "fold",
    "merge",
    "tree_merge",
]


class _Mergeable(Protocol):
    def merge(self, other: Self) -> Self: ...


M = TypeVar("M", bound=_Mergeable)


def merge(a: M, b: M) -> M:
    """Combine two accumulators of the same type (``a.merge(b)``); neither input is modified."""
    if type(a) is not type(b):
        raise TypeError(f"cannot merge {type(a).__name__} with {type(b).__name__}")
    return a.merge(b)


def tree_merge(items: Iterable[M]) -> M:
    """Merge accumulators pairwise in a balanced tree (what a dask tree reduction does)."""
    level = list(items)
    if not level:
        raise ValueError("nothing to merge")
    while len(level) > 1:
        nxt = [merge(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def dd_add(
    a_hi: NDArray[np.float64], a_lo: NDArray[np.float64], b_hi: NDArray[np.float64], b_lo: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Add two double-double arrays (TwoSum of the high parts, low parts added, then renormalized)."""
    s = a_hi + b_hi
    bp = s - a_hi
    err = (a_hi - (s - bp)) + (b_hi - bp)
    lo = (a_lo + b_lo) + err
    hi = s + lo
    lo = lo - (hi - s)
    return hi, lo


def dd_value(hi: NDArray[np.float64], lo: NDArray[np.float64]) -> NDArray[np.float64]:
    """The float64 value of a double-double array: ``hi + lo`` rounded once."""
    return hi + lo


def _same_shape(a: NDArray, b: NDArray, name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"cannot merge {name} of shapes {a.shape} and {b.shape}")


# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellFilterStats:
    """Pass A: cell QC counts and per-feature counts of expressing *kept* cells.

    Attributes
    ----------
    n_cells_per_feature
        (n_vars,) int64: number of kept cells (passing ``min_features``) with a value ``> 0`` in each feature of
        the input var (all features, including name-dropped ones, which are simply ignored later).
    n_cells
        (n_batches,) int64: cells seen per batch.
    n_cells_kept
        (n_batches,) int64: cells passing ``min_features`` per batch.
    """

    n_cells_per_feature: NDArray[np.int64]
    n_cells: NDArray[np.int64]
    n_cells_kept: NDArray[np.int64]

    @classmethod
    def empty(cls, n_vars: int, n_batches: int) -> CellFilterStats:
        """All-zero statistics."""
        return cls(
            np.zeros(n_vars, dtype=np.int64), np.zeros(n_batches, dtype=np.int64), np.zeros(n_batches, dtype=np.int64)
        )

    def merge(self, other: CellFilterStats) -> CellFilterStats:
        """Sum of the counts."""
        _same_shape(self.n_cells_per_feature, other.n_cells_per_feature, "n_cells_per_feature")
        _same_shape(self.n_cells, other.n_cells, "n_cells")
        return CellFilterStats(
            self.n_cells_per_feature + other.n_cells_per_feature,
            self.n_cells + other.n_cells,
            self.n_cells_kept + other.n_cells_kept,
        )


@dataclass(frozen=True)
class GeneMomentStats:
    """Pass B (RNA): per-batch, per-kept-gene moments of the normalized, log1p-transformed data.

    Columns are the kept genes (after ``min_cells``), in var order. With ``y = log1p(normalized)`` (float32) and
    ``e = expm1(y)`` (float32), as scanpy's seurat flavor computes them:

    Attributes
    ----------
    n_cells
        (n_batches,) int64: kept cells per batch (rows accumulated).
    sum_hi, sum_lo
        (n_batches, n_genes) float64 double-double sum of ``e``.
    sumsq_hi, sumsq_lo
        (n_batches, n_genes) float64 double-double sum of ``float32(e * e)``.
    n_positive
        (n_batches, n_genes) int64: cells with ``y > 0`` (scanpy drops genes with none, per batch).
    max_log1p
        (n_batches, n_genes) float32: ``max(0, max y)``, the per-batch MaxAbsScaler scale of ``y``.
    """

    n_cells: NDArray[np.int64]
    sum_hi: NDArray[np.float64]
    sum_lo: NDArray[np.float64]
    sumsq_hi: NDArray[np.float64]
    sumsq_lo: NDArray[np.float64]
    n_positive: NDArray[np.int64]
    max_log1p: NDArray[np.float32]

    @classmethod
    def empty(cls, n_batches: int, n_genes: int) -> GeneMomentStats:
        """All-zero statistics."""
        shape = (n_batches, n_genes)
        return cls(
            np.zeros(n_batches, dtype=np.int64),
            np.zeros(shape, dtype=np.float64),
            np.zeros(shape, dtype=np.float64),
            np.zeros(shape, dtype=np.float64),
            np.zeros(shape, dtype=np.float64),
            np.zeros(shape, dtype=np.int64),
            np.zeros(shape, dtype=np.float32),
        )

    @property
    def n_batches(self) -> int:
        return int(self.sum_hi.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.sum_hi.shape[1])

    def merge(self, other: GeneMomentStats) -> GeneMomentStats:
        """Counts added, sums added as double-doubles, maxima combined."""
        _same_shape(self.sum_hi, other.sum_hi, "GeneMomentStats")
        s_hi, s_lo = dd_add(self.sum_hi, self.sum_lo, other.sum_hi, other.sum_lo)
        q_hi, q_lo = dd_add(self.sumsq_hi, self.sumsq_lo, other.sumsq_hi, other.sumsq_lo)
        return GeneMomentStats(
            self.n_cells + other.n_cells,
            s_hi,
            s_lo,
            q_hi,
            q_lo,
            self.n_positive + other.n_positive,
            np.maximum(self.max_log1p, other.max_log1p),
        )

    def sums(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The float64 sums of ``e`` and of ``float32(e*e)``, each rounded once from the double-double."""
        return dd_value(self.sum_hi, self.sum_lo), dd_value(self.sumsq_hi, self.sumsq_lo)

    def mean_var(self, batch: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Mean and unbiased variance of ``e`` per gene in one batch, with scanpy's arithmetic.

        scanpy (``sparse_mean_var_minor_axis`` then ``_get_mean_var``): ``mean = s / n``,
        ``var = q / n - (s / n) ** 2``, then ``var *= n / (n - 1)`` unless ``n == 1``.
        """
        n = int(self.n_cells[batch])
        if n == 0:
            raise ValueError(f"batch {batch} has no cells")
        s = dd_value(self.sum_hi[batch], self.sum_lo[batch])
        q = dd_value(self.sumsq_hi[batch], self.sumsq_lo[batch])
        mean = s / n
        var = q / n - (s / n) ** 2
        if n != 1:
            var *= n / (n - 1)
        return mean, var


@dataclass(frozen=True)
class PeakTotalStats:
    """Pass B (ATAC): per-cell totals over the selected peaks (binarized) and per-batch minimum totals.

    Attributes
    ----------
    total_hist
        (n_selected + 1,) int64 histogram of the per-cell totals of kept cells (for the exact median).
    n_cells
        (n_batches,) int64 kept cells per batch.
    min_total
        (n_batches, n_selected) int64: smallest total among the batch's cells where the peak is open
        (:data:`~.kernels.INT64_SENTINEL` when none).
    """

    total_hist: NDArray[np.int64]
    n_cells: NDArray[np.int64]
    min_total: NDArray[np.int64]

    @classmethod
    def empty(cls, n_batches: int, n_selected: int) -> PeakTotalStats:
        """No cells seen."""
        return cls(
            np.zeros(n_selected + 1, dtype=np.int64),
            np.zeros(n_batches, dtype=np.int64),
            np.full((n_batches, n_selected), INT64_SENTINEL, dtype=np.int64),
        )

    def merge(self, other: PeakTotalStats) -> PeakTotalStats:
        """Histograms and counts added, minima combined."""
        _same_shape(self.min_total, other.min_total, "PeakTotalStats")
        return PeakTotalStats(
            self.total_hist + other.total_hist,
            self.n_cells + other.n_cells,
            np.minimum(self.min_total, other.min_total),
        )

    def median_total(self) -> float:
        """``np.median`` of the per-cell totals (mean of the two middle values for an even count)."""
        n = int(self.total_hist.sum())
        if n == 0:
            raise ValueError("no cells")
        cum = np.cumsum(self.total_hist)
        lo = int(np.searchsorted(cum, (n - 1) // 2, side="right"))
        hi = int(np.searchsorted(cum, n // 2, side="right"))
        return float((np.float64(lo) + np.float64(hi)) / 2.0)


@dataclass(frozen=True)
class MaxAbsStats:
    """Per-group MaxAbs of already-normalized values (projection of new data onto the atlas features).

    Attributes
    ----------
    n_cells
        (n_groups,) int64 rows accumulated per group.
    max_abs
        (n_groups, n_features) float32, starting at 0.
    """

    n_cells: NDArray[np.int64]
    max_abs: NDArray[np.float32]

    @classmethod
    def empty(cls, n_groups: int, n_features: int) -> MaxAbsStats:
        """All zeros."""
        return cls(np.zeros(n_groups, dtype=np.int64), np.zeros((n_groups, n_features), dtype=np.float32))

    def merge(self, other: MaxAbsStats) -> MaxAbsStats:
        """Counts added, maxima combined."""
        _same_shape(self.max_abs, other.max_abs, "MaxAbsStats")
        return MaxAbsStats(self.n_cells + other.n_cells, np.maximum(self.max_abs, other.max_abs))


def fold(items: Sequence[M] | Iterable[M]) -> M:
    """Merge sequentially (left fold)."""
    return reduce(merge, items)
