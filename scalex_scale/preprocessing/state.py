"""Preprocessing configuration, the per-pass feature plan, and the JSON-able preprocessing state.

:class:`PreprocessConfig` says what to do; :class:`FilterPlan` is what the chunk functions of pass B and of the
transform need to know about the features (which ones count for the cell filter, which ones enter the normalization
totals); :class:`PreprocessState` is everything needed to transform atlas or new data later, saved as JSON
(``format_version`` 1) in the atlas store and next to the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DROP_PREFIXES",
    "GLOBAL_MAXABS_KEY",
    "FilterPlan",
    "PreprocessConfig",
    "PreprocessState",
    "qc_feature_mask",
]

Profile = Literal["RNA", "ATAC"]
ScaleMode = Literal["batch", "global"]

DROP_PREFIXES: tuple[str, ...] = ("ERCC", "MT-", "mt-")
"""RNA features whose names start with one of these are dropped (the reference's ``keep_mt=False``)."""

GLOBAL_MAXABS_KEY = "__all__"
"""Key of the single MaxAbs vector in :attr:`PreprocessState.maxabs` when ``scale == "global"``."""

DEFAULT_N_TOP: dict[str, int] = {"RNA": 2000, "ATAC": 30000}
#: Default cell filter per profile: the paper's 600 genes for RNA; for ATAC the reference package's
#: ``preprocessing_atac`` default of 100 peaks (binarized peaks per cell are far fewer than genes per cell).
DEFAULT_MIN_FEATURES: dict[str, int] = {"RNA": 600, "ATAC": 100}


@dataclass(frozen=True)
class PreprocessConfig:
    """What the preprocessing does (defaults: the SCALEX reference).

    Attributes
    ----------
    profile
        ``"RNA"`` (filter, normalize_total + log1p, seurat HVG per batch) or ``"ATAC"`` (binarize, filter, most
        variable peaks, median-total normalization).
    min_features
        A cell is kept when it has at least this many features with a value ``> 0`` (after the name filter);
        ``None``: the profile's default (RNA 600, ATAC 100: :data:`DEFAULT_MIN_FEATURES`).
    min_cells
        A feature is kept when at least this many *kept* cells have a value ``> 0``.
    n_top_features
        Number of features selected; ``None``: 2000 for RNA, 30000 for ATAC.
    target_sum
        RNA: each cell's total (over kept genes) is scaled to this before ``log1p``.
    scale
        ``"batch"``: MaxAbs per batch (the paper); ``"global"``: one MaxAbs over all cells (reference 1.0.4).
    keep_mt
        RNA: keep features named ``ERCC*``, ``MT-*``, ``mt-*``. ATAC never drops by name.
    n_bins
        Mean-expression bins of the seurat dispersion normalization.
    """

    profile: Profile = "RNA"
    min_features: int | None = None
    min_cells: int = 3
    n_top_features: int | None = None
    target_sum: float = 1e4
    scale: ScaleMode = "batch"
    keep_mt: bool = False
    n_bins: int = 20

    def __post_init__(self) -> None:
        if self.profile not in ("RNA", "ATAC"):
            raise ValueError(f"profile must be 'RNA' or 'ATAC', got {self.profile!r}")
        if self.min_features is None:
            object.__setattr__(self, "min_features", DEFAULT_MIN_FEATURES[self.profile])
        if self.scale not in ("batch", "global"):
            raise ValueError(f"scale must be 'batch' or 'global', got {self.scale!r}")
        if self.min_features < 0 or self.min_cells < 0:
            raise ValueError("min_features and min_cells must be >= 0")
        if self.n_top_features is not None and self.n_top_features <= 0:
            raise ValueError(f"n_top_features must be positive, got {self.n_top_features}")
        if not self.target_sum > 0:
            raise ValueError(f"target_sum must be positive, got {self.target_sum}")
        if self.n_bins <= 0:
            raise ValueError(f"n_bins must be positive, got {self.n_bins}")

    @property
    def n_top(self) -> int:
        """``n_top_features`` with the profile's default filled in."""
        return DEFAULT_N_TOP[self.profile] if self.n_top_features is None else int(self.n_top_features)


def qc_feature_mask(var_names: Sequence[Any], profile: Profile = "RNA", keep_mt: bool = False) -> NDArray[np.bool_]:
    """Features that take part (True) after the name filter: RNA drops ``ERCC*``, ``MT-*``, ``mt-*``.

    As the reference does, the test is ``str(name).startswith(("ERCC", "MT-", "mt-"))`` (so e.g. the gene ``ERCC1``
    is dropped too).
    """
    names = [str(g) for g in var_names]
    if profile == "ATAC" or keep_mt:
        return np.ones(len(names), dtype=np.bool_)
    return np.fromiter((not g.startswith(DROP_PREFIXES) for g in names), dtype=np.bool_, count=len(names))


def _index_array(values: Sequence[int] | NDArray[np.integer], n_vars: int, name: str) -> NDArray[np.int64]:
    a = np.asarray(values, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= n_vars or np.any(np.diff(a) <= 0)):
        raise ValueError(f"{name} must be strictly increasing indices in [0, {n_vars})")
    return a


@dataclass(frozen=True)
class FilterPlan:
    """What a chunk function needs to know about the features (after pass A; after pass B for ATAC's median).

    Attributes
    ----------
    profile
        ``"RNA"`` or ``"ATAC"``.
    n_vars
        Width of the input chunks (the atlas var).
    qc_mask
        (n_vars,) bool: features counted by the ``min_features`` cell filter (name filter).
    min_features
        Cell filter threshold.
    norm_index
        Strictly increasing var indices of the features that enter the per-cell totals: RNA: the kept genes
        (``min_cells``); ATAC: the selected peaks.
    target_sum
        RNA: normalization target. ATAC: the median total (``None`` until pass B has run).
    """

    profile: Profile
    n_vars: int
    qc_mask: NDArray[np.bool_]
    min_features: int
    norm_index: NDArray[np.int64]
    target_sum: float | None

    def __post_init__(self) -> None:
        qc = np.ascontiguousarray(self.qc_mask, dtype=np.bool_)
        if qc.shape != (self.n_vars,):
            raise ValueError(f"qc_mask has shape {qc.shape}, expected ({self.n_vars},)")
        object.__setattr__(self, "qc_mask", qc)
        object.__setattr__(self, "norm_index", _index_array(self.norm_index, self.n_vars, "norm_index"))

    def col_map(self, index: NDArray[np.int64] | None = None) -> NDArray[np.int64]:
        """(n_vars,) int64 map from var column to position in ``index`` (default ``norm_index``), -1 elsewhere."""
        idx = self.norm_index if index is None else index
        m = np.full(self.n_vars, -1, dtype=np.int64)
        m[idx] = np.arange(idx.size, dtype=np.int64)
        return m


@dataclass(frozen=True)
class PreprocessState:
    """Everything needed to turn raw count chunks into the model input; JSON ``format_version`` 1.

    Attributes
    ----------
    profile
        ``"RNA"`` or ``"ATAC"``.
    n_vars
        Number of features of the atlas var (width of raw chunks given to the transform).
    features
        Selected feature names, in training-matrix column order (= var order).
    feature_index
        Their columns in the atlas var (strictly increasing).
    dropped_index
        Var columns dropped by name (``ERCC``/``MT-``/``mt-``), not counted by the cell filter.
    genes_kept_index
        Var columns kept by the ``min_cells`` filter (RNA: the columns entering the per-cell totals).
    min_features, min_cells, n_top_features, target_sum, scale, keep_mt, n_bins
        The configuration used (``n_top_features`` resolved).
    batches
        Batch names in code order (the atlas' batch categories).
    maxabs
        ``{batch name: per-feature max abs}`` of the unscaled values for every batch with kept cells
        (``{GLOBAL_MAXABS_KEY: [...]}`` when ``scale == "global"``). 0 means "scale 1" (scikit-learn).
    median_total
        ATAC: median over kept cells of the number of open selected peaks (the normalization target).
    n_cells_kept
        Number of cells passing the cell filter.
    """

    FORMAT_VERSION: ClassVar[int] = 1

    profile: Profile
    n_vars: int
    features: tuple[str, ...]
    feature_index: tuple[int, ...]
    dropped_index: tuple[int, ...]
    genes_kept_index: tuple[int, ...]
    min_features: int
    min_cells: int
    n_top_features: int
    target_sum: float
    scale: ScaleMode
    keep_mt: bool
    n_bins: int
    batches: tuple[str, ...]
    maxabs: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    median_total: float | None = None
    n_cells_kept: int = 0

    def __post_init__(self) -> None:
        if self.profile not in ("RNA", "ATAC"):
            raise ValueError(f"profile must be 'RNA' or 'ATAC', got {self.profile!r}")
        if self.scale not in ("batch", "global"):
            raise ValueError(f"scale must be 'batch' or 'global', got {self.scale!r}")
        object.__setattr__(self, "features", tuple(str(f) for f in self.features))
        object.__setattr__(self, "feature_index", tuple(int(i) for i in self.feature_index))
        object.__setattr__(self, "dropped_index", tuple(int(i) for i in self.dropped_index))
        object.__setattr__(self, "genes_kept_index", tuple(int(i) for i in self.genes_kept_index))
        object.__setattr__(self, "batches", tuple(str(b) for b in self.batches))
        object.__setattr__(
            self, "maxabs", {str(k): tuple(float(v) for v in vals) for k, vals in dict(self.maxabs).items()}
        )
        if len(self.features) != len(self.feature_index):
            raise ValueError("features and feature_index differ in length")
        for name in ("feature_index", "dropped_index", "genes_kept_index"):
            _index_array(getattr(self, name), self.n_vars, name)
        n_f = len(self.features)
        for k, vals in self.maxabs.items():
            if len(vals) != n_f:
                raise ValueError(f"maxabs[{k!r}] has {len(vals)} values, expected {n_f}")
            if self.scale == "batch" and k not in self.batches:
                raise ValueError(f"maxabs batch {k!r} is not in batches")
        if self.scale == "global" and set(self.maxabs) - {GLOBAL_MAXABS_KEY}:
            raise ValueError(f"global scaling keeps its MaxAbs under {GLOBAL_MAXABS_KEY!r} only")
        if self.profile == "ATAC" and self.median_total is None and self.maxabs:
            raise ValueError("an ATAC state with MaxAbs needs median_total")

    # ------------------------------------------------------------------------------------------------------------
    @property
    def format_version(self) -> int:
        return self.FORMAT_VERSION

    @property
    def n_features(self) -> int:
        return len(self.features)

    @cached_property
    def feature_index_array(self) -> NDArray[np.int64]:
        return np.asarray(self.feature_index, dtype=np.int64)

    @cached_property
    def qc_mask(self) -> NDArray[np.bool_]:
        m = np.ones(self.n_vars, dtype=np.bool_)
        m[np.asarray(self.dropped_index, dtype=np.int64)] = False
        return m

    def filter_plan(self) -> FilterPlan:
        """The :class:`FilterPlan` the transform uses (RNA: totals over kept genes; ATAC: over selected peaks)."""
        return self._filter_plan

    @cached_property
    def _filter_plan(self) -> FilterPlan:
        if self.profile == "RNA":
            return FilterPlan(
                "RNA", self.n_vars, self.qc_mask, self.min_features, np.asarray(self.genes_kept_index), self.target_sum
            )
        return FilterPlan("ATAC", self.n_vars, self.qc_mask, self.min_features, self.feature_index_array,
                          self.median_total)

    def maxabs_matrix(self) -> NDArray[np.float32]:
        """MaxAbs as a float32 array: ``(n_batches, n_features)`` in batch-code order (zeros for batches without
        kept cells), or ``(1, n_features)`` for global scaling."""
        if self.scale == "global":
            vals = self.maxabs.get(GLOBAL_MAXABS_KEY)
            out = np.zeros((1, self.n_features), dtype=np.float32)
            if vals is not None:
                out[0] = np.asarray(vals, dtype=np.float32)
            return out
        out = np.zeros((len(self.batches), self.n_features), dtype=np.float32)
        for i, b in enumerate(self.batches):
            if b in self.maxabs:
                out[i] = np.asarray(self.maxabs[b], dtype=np.float32)
        return out

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``format_version`` first)."""
        return {
            "format_version": self.FORMAT_VERSION,
            "profile": self.profile,
            "n_vars": int(self.n_vars),
            "features": list(self.features),
            "feature_index": list(self.feature_index),
            "dropped_index": list(self.dropped_index),
            "genes_kept_index": list(self.genes_kept_index),
            "n_genes_kept": len(self.genes_kept_index),
            "min_features": int(self.min_features),
            "min_cells": int(self.min_cells),
            "n_top_features": int(self.n_top_features),
            "target_sum": float(self.target_sum),
            "scale": self.scale,
            "keep_mt": bool(self.keep_mt),
            "n_bins": int(self.n_bins),
            "batches": list(self.batches),
            "maxabs": {k: list(v) for k, v in self.maxabs.items()},
            "median_total": None if self.median_total is None else float(self.median_total),
            "n_cells_kept": int(self.n_cells_kept),
        }

    def to_json(self) -> str:
        """JSON text; float32 MaxAbs values round-trip exactly."""
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessState:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ValueError
            On an unknown ``format_version`` (the message names it) or missing keys.
        """
        version = d.get("format_version")
        if version != cls.FORMAT_VERSION:
            raise ValueError(
                f"unknown preprocessing state format_version {version!r} (this version reads {cls.FORMAT_VERSION})"
            )
        keys = [
            "profile", "n_vars", "features", "feature_index", "dropped_index", "genes_kept_index", "min_features",
            "min_cells", "n_top_features", "target_sum", "scale", "keep_mt", "n_bins", "batches",
        ]  # fmt: skip
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"preprocessing state is missing {missing}")
        return cls(
            **{k: d[k] for k in keys},
            maxabs=d.get("maxabs", {}),
            median_total=d.get("median_total"),
            n_cells_kept=int(d.get("n_cells_kept", 0)),
        )

    @classmethod
    def from_json(cls, text: str) -> PreprocessState:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
