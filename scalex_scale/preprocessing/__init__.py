"""Streaming, chunk-wise preprocessing that reproduces the SCALEX reference (scanpy 1.11.5 arithmetic). No torch.

Modules: ``kernels`` (numba CSR kernels), ``stats`` (mergeable accumulators), ``transform`` (chunk functions of the
passes and the final transform), ``hvg`` (feature selection), ``state`` (config and JSON state), ``passes`` (the
passes strung together over a runner), ``runner`` (the runner over an atlas' row ranges, with dask), ``scaling``
(which MaxAbs scales which batch: the one rule for training, embed and project). The atlas step is
:func:`scalex_scale.workflows.preprocess.preprocess`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule (imported on first use: the CLI reads the configs without compiling numba kernels)
_LAZY = {
    "CellFilterStats": "stats",
    "ComputeOptions": "runner",
    "DEFAULT_MIN_FEATURES": "state",
    "DEFAULT_N_TOP": "state",
    "DaskRunner": "runner",
    "FilterPlan": "state",
    "GLOBAL_MAXABS_KEY": "state",
    "GeneMomentStats": "stats",
    "MaxAbsStats": "stats",
    "PeakTotalStats": "stats",
    "PreprocessConfig": "state",
    "PreprocessResult": "passes",
    "PreprocessState": "state",
    "SequentialRunner": "passes",
    "cell_filter_chunk": "transform",
    "gene_moments_chunk": "transform",
    "highly_variable_genes_from_stats": "hvg",
    "maxabs_chunk": "transform",
    "merge": "stats",
    "normalize_chunk": "transform",
    "peak_totals_chunk": "transform",
    "preprocess_chunks": "passes",
    "qc_feature_mask": "state",
    "select_variable_peaks": "hvg",
    "transform_chunk": "transform",
    "tree_merge": "stats",
    "unscaled_chunk": "transform",
}

__all__ = [
    "DEFAULT_MIN_FEATURES",
    "DEFAULT_N_TOP",
    "GLOBAL_MAXABS_KEY",
    "ComputeOptions",
    "DaskRunner",
    "SequentialRunner",
    "CellFilterStats",
    "FilterPlan",
    "GeneMomentStats",
    "MaxAbsStats",
    "PeakTotalStats",
    "PreprocessConfig",
    "PreprocessResult",
    "PreprocessState",
    "cell_filter_chunk",
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
    "tree_merge",
    "unscaled_chunk",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
