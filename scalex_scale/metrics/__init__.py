"""Integration metrics (paper + scIB-style) and kNN utilities, as pure array functions.

No AnnData, no torch, no files: every function takes arrays (an embedding ``X`` of shape
(n_cells, d), label arrays) and returns numbers, arrays or DataFrames. See
:mod:`scalex_scale.metrics.paper`, :mod:`scalex_scale.metrics.scib`,
:mod:`scalex_scale.metrics.knn` and :mod:`scalex_scale.metrics.evaluate`.
"""

from __future__ import annotations

from .evaluate import EvaluateConfig, evaluate
from .knn import knn, knn_query, knn_recall, knn_ref_and_query
from .paper import (
    MixingScore,
    ari,
    batch_entropy_mixing_score,
    confusion_percent,
    f1_scores,
    mixing_score_details,
    nmi,
    silhouette,
    silhouette_samples,
    similarity_matrix,
)
from .scib import (
    KBETResult,
    batch_asw,
    clisi,
    graph_connectivity,
    ilisi,
    isolated_labels,
    isolated_labels_asw,
    kbet,
    kbet_per_label,
    lisi,
    silhouette_label,
)

__all__ = [
    "EvaluateConfig",
    "KBETResult",
    "MixingScore",
    "ari",
    "batch_asw",
    "batch_entropy_mixing_score",
    "clisi",
    "confusion_percent",
    "evaluate",
    "f1_scores",
    "graph_connectivity",
    "ilisi",
    "isolated_labels",
    "isolated_labels_asw",
    "kbet",
    "kbet_per_label",
    "knn",
    "knn_query",
    "knn_recall",
    "knn_ref_and_query",
    "lisi",
    "mixing_score_details",
    "nmi",
    "silhouette",
    "silhouette_label",
    "silhouette_samples",
    "similarity_matrix",
]
