"""Metrics used in the SCALEX paper (Xiong et al.), as pure array functions.

- :func:`batch_entropy_mixing_score`: reference-compatible (SCALEX 1.0.4 ``scalex/metrics.py``),
  plus a properly normalized [0, 1] variant.
- :func:`silhouette`: scikit-learn ``silhouette_score`` of cell-type labels, exact and streaming,
  optionally on a uniform random subsample.
- :func:`ari`, :func:`nmi`, :func:`f1_scores`: annotation agreement (scikit-learn).
- :func:`confusion_percent`: percentage of cells of each true type predicted as each type.
- :func:`similarity_matrix`: Pearson correlation between per-type mean embeddings of two batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ._silhouette import silhouette_samples_subset
from ._utils import as_float_matrix, as_generator, check_lengths, encode_labels
from .knn import exact_knn_rows

__all__ = [
    "MixingScore",
    "batch_entropy_mixing_score",
    "mixing_score_details",
    "silhouette",
    "silhouette_samples",
    "ari",
    "nmi",
    "f1_scores",
    "confusion_percent",
    "similarity_matrix",
]


# ---------------------------------------------------------------------------------------------
# Batch entropy mixing score
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixingScore:
    """Both flavours of the batch entropy mixing score.

    Attributes
    ----------
    reference
        SCALEX 1.0.4 value: mean natural-log entropy divided by ``log2(n_batches)`` (maximum
        ``ln 2 ~= 0.693`` whatever the number of batches). Compare this one with the paper.
    normalized
        Mean natural-log entropy divided by ``ln(n_batches)``: 1 = perfect mixing, 0 = none.
    n_batches
        Number of batches.
    """

    reference: float
    normalized: float
    n_batches: int


def _draw_pools(
    rng: np.random.Generator | np.random.RandomState | int | None, n: int, n_pools: int, n_samples_per_pool: int
) -> np.ndarray:
    """Draw ``n_pools`` x ``n_samples_per_pool`` cell indices with replacement, pool by pool.

    The draw order is the reference's: one ``choice(n, size=n_samples_per_pool)`` call per pool.
    A legacy ``RandomState`` reproduces ``np.random.seed(s); np.random.choice(...)`` exactly.
    """
    if isinstance(rng, np.random.RandomState):
        gen: Any = rng
    else:
        gen = as_generator(rng)
    return np.stack([gen.choice(n, size=n_samples_per_pool) for _ in range(n_pools)])


def _regional_entropy(neighbour_codes: np.ndarray, global_frac: np.ndarray) -> np.ndarray:
    """Reference entropy of each row of batch codes (natural log, ``+1e-8`` inside the log).

    ``p_b`` = fraction of the row's neighbours in batch b; ``q_b = (p_b / P_b) / sum_c p_c / P_c``;
    entropy = ``-sum_b q_b log(q_b + 1e-8)`` exactly as SCALEX 1.0.4.
    """
    n_rows, k = neighbour_codes.shape
    n_batches = global_frac.size
    counts = np.zeros((n_rows, n_batches), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(n_rows), k), neighbour_codes.ravel()), 1.0)
    p = counts / k
    ratio = p / global_frac[None, :]
    adapted = ratio / ratio.sum(axis=1, keepdims=True)
    return -(adapted * np.log(adapted + 1e-8)).sum(axis=1)


def mixing_score_details(
    X: np.ndarray,
    batches: Any,
    *,
    n_neighbors: int = 100,
    n_pools: int = 100,
    n_samples_per_pool: int = 100,
    rng: np.random.Generator | np.random.RandomState | int | None = None,
    knn: tuple[np.ndarray, np.ndarray] | np.ndarray | None = None,
    n_jobs: int | None = None,
) -> MixingScore:
    """Batch entropy mixing score, both the reference-compatible and the normalized value.

    Algorithm (SCALEX 1.0.4 ``batch_entropy_mixing_score``, itself adapted from MNN): let P_b be
    the global fraction of batch b. For each of ``n_pools`` pools, draw ``n_samples_per_pool``
    cells uniformly **with replacement**; for each drawn cell take its ``n_neighbors`` nearest
    neighbours (Euclidean, the cell itself excluded), let p_b be the fraction of them in batch b,
    ``q_b = (p_b / P_b) / sum_c (p_c / P_c)``, and the regional entropy
    ``-sum_b q_b ln(q_b + 1e-8)``. Average within the pool, then over pools.

    Neighbourhood: the reference builds ``NearestNeighbors(n_neighbors + 1).kneighbors_graph(data)``
    (whose rows include the cell itself) and subtracts the identity, and ``.nonzero()`` then drops
    the cell: each neighbourhood is the ``n_neighbors`` nearest *other* cells. We do the same with
    exact neighbours. (Only with more than ``n_neighbors`` exact duplicates of a cell can the two
    differ: the reference then keeps the cell with weight -1 and counts ``n_neighbors + 2``
    entries; we drop the farthest neighbour instead.) ``n_neighbors`` is capped at ``n - 1``.

    Only the drawn cells need neighbours, so at most ``n_pools * n_samples_per_pool`` exact
    queries are made against a kd-tree of all cells: exact at any size, memory O(n).

    Parameters
    ----------
    X
        (n, d) embedding (latent or UMAP).
    batches
        (n,) batch labels; at least two distinct values.
    n_neighbors, n_pools, n_samples_per_pool
        As in the reference (defaults 100, 100, 100).
    rng
        Source of the random cells: a Generator, an int seed, ``None``, or a legacy
        ``np.random.RandomState`` (``RandomState(s)`` reproduces the reference run after
        ``np.random.seed(s)`` draw for draw).
    knn
        Optional precomputed neighbours of **all** cells, self excluded, sorted by distance:
        ``(indices, distances)`` or just ``indices`` with at least ``n_neighbors`` columns. The
        first ``n_neighbors`` columns are used. With approximate neighbours the score is
        approximate.
    n_jobs
        Threads for the exact queries.

    Returns
    -------
    MixingScore
    """
    X = as_float_matrix(X, np.float32)
    n = X.shape[0]
    check_lengths(n, batches=batches)
    codes, cats = encode_labels(batches)
    n_batches = cats.size
    if n_batches < 2:
        raise ValueError("Should be more than one cluster for batch mixing")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
    k = min(n_neighbors, n - 1)
    global_frac = np.bincount(codes, minlength=n_batches) / n

    pools = _draw_pools(rng, n, n_pools, n_samples_per_pool)
    cells, inverse = np.unique(pools, return_inverse=True)
    if knn is not None:
        indices = knn[0] if isinstance(knn, tuple) else knn
        indices = np.asarray(indices)
        if indices.shape[0] != n or indices.shape[1] < k:
            raise ValueError(f"knn must have shape (n_cells, >= {k}), got {indices.shape}")
        nbrs = indices[cells, :k]
    else:
        nbrs, _ = exact_knn_rows(X, cells, k, n_jobs=n_jobs)
    entropy = _regional_entropy(codes[nbrs], global_frac)
    per_pool = entropy[inverse.reshape(pools.shape)].mean(axis=1)
    mean_entropy = float(per_pool.sum() / float(n_pools))
    return MixingScore(
        reference=mean_entropy / float(np.log2(n_batches)),
        normalized=mean_entropy / float(np.log(n_batches)),
        n_batches=int(n_batches),
    )


def batch_entropy_mixing_score(
    X: np.ndarray,
    batches: Any,
    *,
    n_neighbors: int = 100,
    n_pools: int = 100,
    n_samples_per_pool: int = 100,
    rng: np.random.Generator | np.random.RandomState | int | None = None,
    knn: tuple[np.ndarray, np.ndarray] | np.ndarray | None = None,
    normalized: bool = False,
    n_jobs: int | None = None,
) -> float:
    """Batch entropy mixing score (higher = better mixed).

    ``normalized=False`` (default) returns the SCALEX 1.0.4 / paper value: natural-log entropy
    divided by ``log2(n_batches)``, whose maximum is ``ln 2 ~= 0.693`` for any number of batches.
    ``normalized=True`` divides by ``ln(n_batches)`` instead, giving a value in [0, 1].
    See :func:`mixing_score_details` for the algorithm and parameters.
    """
    res = mixing_score_details(
        X,
        batches,
        n_neighbors=n_neighbors,
        n_pools=n_pools,
        n_samples_per_pool=n_samples_per_pool,
        rng=rng,
        knn=knn,
        n_jobs=n_jobs,
    )
    return res.normalized if normalized else res.reference


# ---------------------------------------------------------------------------------------------
# Silhouette
# ---------------------------------------------------------------------------------------------


def silhouette_samples(X: np.ndarray, labels: Any, *, n_jobs: int | None = None) -> np.ndarray:
    """Exact per-cell silhouette widths (= scikit-learn ``silhouette_samples``, Euclidean).

    Streams over cells with O(n * n_labels) memory; time O(n^2 d). Float64 arithmetic.
    """
    X = as_float_matrix(X, np.float64)
    check_lengths(X.shape[0], labels=labels)
    codes, cats = encode_labels(labels)
    _check_n_labels(cats.size, X.shape[0])
    idx = np.arange(X.shape[0])
    return silhouette_samples_subset(X, codes, cats.size, idx, idx, n_jobs=n_jobs)


def _check_n_labels(n_labels: int, n_samples: int) -> None:
    if not 2 <= n_labels <= n_samples - 1:
        raise ValueError(f"Number of labels is {n_labels}. Valid values are 2 to n_samples - 1 (inclusive)")


def silhouette(
    X: np.ndarray,
    labels: Any,
    *,
    sample_size: int | None = None,
    rng: np.random.Generator | int | None = None,
    rescale: bool = False,
    n_jobs: int | None = None,
) -> float:
    """Mean silhouette width of the cell-type labels (scikit-learn ``silhouette_score``).

    Parameters
    ----------
    X
        (n, d) embedding.
    labels
        (n,) cell-type labels.
    sample_size
        If set and smaller than n, the score is computed exactly on ``sample_size`` cells drawn
        uniformly without replacement (``rng.permutation(n)[:sample_size]``), as scikit-learn's
        ``silhouette_score(..., sample_size=)`` does: the returned value is the exact silhouette
        *of that subsample*, an estimate of the full-data score whose sampling error shrinks as
        ``1 / sqrt(sample_size)``. The SCALEX paper/reference subsample to 50,000 cells (seconds;
        ``bench/README.md``). ``None``: all cells, O(n^2) time (1M cells: hours).
    rng
        Generator or seed for the subsample.
    rescale
        Return ``(asw + 1) / 2`` in [0, 1] (scib-metrics ``silhouette_label``) instead of the raw
        value in [-1, 1] (paper, scikit-learn).
    n_jobs
        numba threads.

    Returns
    -------
    float
    """
    X = as_float_matrix(X, np.float32)
    n = X.shape[0]
    check_lengths(n, labels=labels)
    codes, cats = encode_labels(labels)
    if sample_size is not None and sample_size < n:
        idx = np.sort(as_generator(rng).permutation(n)[:sample_size])
        sub_codes, sub_cats = encode_labels(codes[idx])
        _check_n_labels(sub_cats.size, idx.size)
        Xs = X[idx].astype(np.float64)
        local = np.arange(idx.size)
        s = silhouette_samples_subset(Xs, sub_codes, sub_cats.size, local, local, n_jobs=n_jobs)
    else:
        _check_n_labels(cats.size, n)
        idx = np.arange(n)
        s = silhouette_samples_subset(X.astype(np.float64), codes, cats.size, idx, idx, n_jobs=n_jobs)
    asw = float(np.mean(s))
    return (asw + 1.0) / 2.0 if rescale else asw


# ---------------------------------------------------------------------------------------------
# Annotation agreement
# ---------------------------------------------------------------------------------------------


def ari(true: Any, pred: Any) -> float:
    """Adjusted Rand index (scikit-learn ``adjusted_rand_score``)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(true), np.asarray(pred)))


def nmi(true: Any, pred: Any) -> float:
    """Normalized mutual information, arithmetic mean normalization (scikit-learn default)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(true), np.asarray(pred)))


def f1_scores(true: Any, pred: Any) -> dict[str, float]:
    """Macro and weighted F1 (scikit-learn ``f1_score``), averaged over the **true** labels.

    ``labels=np.unique(true)`` is passed to scikit-learn: a predicted label that is never a true
    label (e.g. ``"unassigned"``) is not a class of its own; its cells count as misses of their
    true type (lower recall). Labels are compared as strings.

    Returns
    -------
    dict
        ``{"f1_macro": ..., "f1_weighted": ...}``.
    """
    from sklearn.metrics import f1_score

    t = np.asarray(true).astype(str)
    p = np.asarray(pred).astype(str)
    labels = np.unique(t)
    return {
        "f1_macro": float(f1_score(t, p, labels=labels, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(t, p, labels=labels, average="weighted", zero_division=0)),
    }


def confusion_percent(true: Any, pred: Any) -> pd.DataFrame:
    """Confusion matrix in percent of each true type.

    Parameters
    ----------
    true, pred
        (n,) label arrays.

    Returns
    -------
    pandas.DataFrame
        Rows: true types (sorted); columns: predicted labels (sorted, e.g. including
        ``"unassigned"``). Entry (i, j) = 100 * (cells of true type i predicted j) / (cells of
        true type i); each row sums to 100.
    """
    t = pd.Series(np.asarray(true), name="true")
    p = pd.Series(np.asarray(pred), name="predicted")
    if len(t) != len(p):
        raise ValueError(f"true has {len(t)} cells but pred has {len(p)}")
    tab = pd.crosstab(t, p)
    return tab.div(tab.sum(axis=1), axis=0) * 100.0


def similarity_matrix(
    X: np.ndarray, celltypes: Any, batches: Any, batch_a: Any, batch_b: Any
) -> pd.DataFrame:
    """Pearson correlation between mean embeddings of each cell type in two batches.

    For each cell type present in ``batch_a`` (rows) and each present in ``batch_b`` (columns),
    the mean embedding vectors over the cells of that type and batch are correlated (Pearson,
    across the d embedding dimensions), as in the SCALEX paper's similarity heatmaps
    (``scalex.plot.plot_meta2``, which draws the transpose: batch_b types on the y axis).
    Types absent from a batch have no row / column.

    Returns
    -------
    pandas.DataFrame
        (types in batch_a) x (types in batch_b), values in [-1, 1].
    """
    X = as_float_matrix(X, np.float64)
    check_lengths(X.shape[0], celltypes=celltypes, batches=batches)
    ct = np.asarray(celltypes)
    bt = np.asarray(batches)

    def means(batch: Any) -> pd.DataFrame:
        mask = bt == batch
        if not mask.any():
            raise ValueError(f"batch {batch!r} has no cells")
        df = pd.DataFrame(X[mask])
        return df.groupby(ct[mask], sort=True).mean()

    ma = means(batch_a)
    mb = means(batch_b)
    A = ma.to_numpy()
    B = mb.to_numpy()
    A = A - A.mean(axis=1, keepdims=True)
    B = B - B.mean(axis=1, keepdims=True)
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    B /= np.linalg.norm(B, axis=1, keepdims=True)
    return pd.DataFrame(A @ B.T, index=ma.index, columns=mb.index)
