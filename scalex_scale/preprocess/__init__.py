"""Streaming, chunk-wise preprocessing that reproduces the SCALEX reference (scanpy 1.11.5 arithmetic).

Modules: ``kernels`` (numba CSR kernels), ``stats`` (mergeable accumulators), ``transform`` (chunk functions of the
passes and the final transform), ``hvg`` (feature selection), ``state`` (config and JSON state),
``reference_driver`` (the passes over an iterable of in-memory chunks).
"""

from __future__ import annotations

from .hvg import highly_variable_genes_from_stats, select_variable_peaks
from .reference_driver import PreprocessResult, compute_maxabs, preprocess_chunks, transform_chunks
from .state import GLOBAL_MAXABS_KEY, FilterPlan, PreprocessConfig, PreprocessState, qc_feature_mask
from .stats import CellFilterStats, GeneMomentStats, MaxAbsStats, PeakTotalStats, merge, tree_merge
from .transform import (
    cell_filter_chunk,
    gene_moments_chunk,
    maxabs_chunk,
    normalize_chunk,
    peak_totals_chunk,
    transform_chunk,
    unscaled_chunk,
)

__all__ = [
    "GLOBAL_MAXABS_KEY",
    "CellFilterStats",
    "FilterPlan",
    "GeneMomentStats",
    "MaxAbsStats",
    "PeakTotalStats",
    "PreprocessConfig",
    "PreprocessResult",
    "PreprocessState",
    "cell_filter_chunk",
    "compute_maxabs",
    "gene_moments_chunk",
    "highly_variable_genes_from_stats",
    "maxabs_chunk",
    "merge",
    "normalize_chunk",
    "peak_totals_chunk",
    "preprocess_chunks",
    "qc_feature_mask",
    "select_variable_peaks",
    "transform_chunk",
    "transform_chunks",
    "tree_merge",
    "unscaled_chunk",
]
