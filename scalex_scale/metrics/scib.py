"""scIB-style integration metrics (Luecken et al. 2022), as pure array functions.

All take an embedding ``X`` (n, d) and labels; those built on a kNN graph also accept a
precomputed graph ``knn=(indices, distances)`` from :func:`scalex_scale.metrics.knn.knn`
(self excluded, sorted by distance), so one graph (89 columns serves every default here) can
be shared. Memory is O(n * k); nothing n x n is formed.

Neighbour-count convention
--------------------------
scib-metrics builds its graphs with pynndescent *including the cell itself* as the first
neighbour, so its "90 neighbours" are the cell plus 89 others. Our graphs exclude the cell, so
every ``n_neighbors`` argument below **counts the cell itself** (as scib-metrics and Harmony do)
and uses the first ``n_neighbors - 1`` columns of the graph. Defaults: LISI 90 (Harmony:
``3 * perplexity``), kBET 50, graph connectivity 15 (the scib-metrics Benchmarker's).

Scoring a subset of cells
-------------------------
LISI and kBET are per-cell quantities summarized by a median / mean, so at atlas scale they can
score a uniform random subset of cells (``sample_size=`` or ``cells=``) whose neighbourhoods are
still **exact** among all cells: the full 89-neighbour graph of 1M cells is never built (see
:class:`scalex_scale.metrics.evaluate.EvaluateConfig.neighborhood_sample_size`). Graph
connectivity is a property of the whole graph and always needs all cells.

Metrics
-------
- :func:`lisi`, :func:`ilisi`, :func:`clisi`: Korsunsky et al. (Harmony) LISI.
- :func:`kbet`: scib-metrics ``kbet`` (chi-square test of each neighbourhood's batch counts).
- :func:`kbet_per_label`: scib's per-cell-type kBET, on Euclidean label-restricted neighbours.
- :func:`graph_connectivity`: scib-metrics ``graph_connectivity``.
- :func:`isolated_labels_asw`: scib/scib-metrics ``isolated_labels`` (ASW variant).
- :func:`batch_asw`: scib/scib-metrics ``silhouette_batch``.
- :func:`silhouette_label`: scib-metrics ``silhouette_label`` (rescaled cell-type ASW).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numba
import numpy as np
import pandas as pd
from numba import float32, float64, int32, int64, prange

from ._silhouette import silhouette_samples_subset
from ._utils import as_float_matrix, as_generator, check_lengths, encode_labels, numba_threads
from .knn import KNNMethod, exact_knn_rows
from .knn import knn as _knn
from .paper import silhouette

__all__ = [
    "lisi",
    "ilisi",
    "clisi",
    "scale_ilisi",
    "scale_clisi",
    "KBETResult",
    "kbet",
    "kbet_per_label",
    "graph_connectivity",
    "isolated_labels",
    "isolated_labels_asw",
    "batch_asw",
    "silhouette_label",
]

KNNLike = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------------------
# shared plumbing
# ---------------------------------------------------------------------------------------------


def _neighbourhoods(
    X: np.ndarray | None,
    knn: KNNLike | None,
    n_cols: int,
    n: int,
    *,
    cells: np.ndarray | None = None,
    sample_size: int | None = None,
    method: KNNMethod = "auto",
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Neighbourhoods of the scored cells: ``(cells, indices, distances)``.

    ``cells`` is None when every cell is scored (row i of the graph = cell i); otherwise the
    sorted int64 ids of the scored cells (row r of the graph = cell ``cells[r]``). Indices are
    global cell ids, self excluded, exactly ``n_cols`` columns.

    - ``knn`` given: used as is (its rows are ``cells`` if given, else all n cells);
    - else ``cells`` given, or ``sample_size < n`` (uniform draw without replacement from
      ``rng``): exact neighbours of those cells among all cells (kd-tree);
    - else the full graph by :func:`scalex_scale.metrics.knn.knn` with ``method``.
    """
    if cells is not None:
        cells = np.asarray(cells, dtype=np.int64)
        if cells.ndim != 1 or (cells.size and (cells.min() < 0 or cells.max() >= n)):
            raise ValueError(f"cells must be a 1-d array of cell ids in [0, {n})")
    if knn is not None:
        indices, distances = knn
        indices = np.asarray(indices)
        distances = np.asarray(distances)
        rows = n if cells is None else cells.size
        if indices.shape != distances.shape or indices.shape[0] != rows:
            raise ValueError(
                f"knn indices {indices.shape} and distances {distances.shape} must both be (n_rows={rows}, k)"
            )
        if indices.shape[1] < n_cols:
            raise ValueError(
                f"knn has {indices.shape[1]} neighbour columns but {n_cols} are needed "
                f"(n_neighbors counts the cell itself: {n_cols + 1})"
            )
        return (
            cells,
            np.ascontiguousarray(indices[:, :n_cols], dtype=np.int64),
            np.ascontiguousarray(distances[:, :n_cols], dtype=np.float32),
        )
    if X is None:
        raise ValueError("pass either X or a precomputed knn")
    X = as_float_matrix(X, np.float32)
    if X.shape[0] != n:
        raise ValueError(f"X has {X.shape[0]} rows but the labels have {n}")
    k = min(n_cols, n - 1)
    if cells is None and sample_size is not None and sample_size < n:
        cells = np.sort(as_generator(rng).choice(n, size=sample_size, replace=False)).astype(np.int64)
    if cells is not None:
        idx, dist = exact_knn_rows(X, cells, k, n_jobs=n_jobs)
        return cells, idx, dist
    idx, dist = _knn(X, k, method=method, rng=rng, n_jobs=n_jobs)
    return None, idx, dist


def _get_knn(
    X: np.ndarray | None,
    knn: KNNLike | None,
    n_cols: int,
    n: int,
    *,
    method: KNNMethod,
    rng: np.random.Generator | int | None,
    n_jobs: int | None,
) -> KNNLike:
    """Full graph of all n cells with exactly ``n_cols`` columns (self excluded)."""
    _, idx, dist = _neighbourhoods(X, knn, n_cols, n, method=method, rng=rng, n_jobs=n_jobs)
    return idx, dist


# ---------------------------------------------------------------------------------------------
# LISI
# ---------------------------------------------------------------------------------------------


@numba.njit(float64(float64[:], float64, float64[:]), cache=True)
def _hbeta(dist: np.ndarray, beta: float, P: np.ndarray) -> float:
    """Entropy H of P = exp(-beta * dist) / sum; fills ``P`` (zeros and H = 0 if the sum is 0)."""
    sum_p = 0.0
    sum_dp = 0.0
    for j in range(dist.shape[0]):
        p = np.exp(-dist[j] * beta)
        P[j] = p
        sum_p += p
        sum_dp += dist[j] * p
    if sum_p == 0.0:
        for j in range(dist.shape[0]):
            P[j] = 0.0
        return 0.0
    for j in range(dist.shape[0]):
        P[j] /= sum_p
    return np.log(sum_p) + beta * sum_dp / sum_p


@numba.njit(float64(float64[:], int32[:], int64, float64, float64, int64), cache=True)
def _simpson_row(dist: np.ndarray, nbr_codes: np.ndarray, n_labels: int, perplexity: float, tol: float, n_iter: int) -> float:
    """Simpson index of one cell (Harmony ``compute_simpson``: bisection on beta, then sum P^2)."""
    P = np.empty(dist.shape[0])
    beta = 1.0
    betamin = -np.inf
    betamax = np.inf
    log_u = np.log(perplexity)
    H = _hbeta(dist, beta, P)
    h_diff = H - log_u
    tries = 0
    while np.abs(h_diff) >= tol and tries < n_iter:
        if h_diff > 0:
            betamin = beta
            if betamax == np.inf:
                beta *= 2.0
            else:
                beta = (beta + betamax) / 2.0
        else:
            betamax = beta
            if betamin == -np.inf:
                beta /= 2.0
            else:
                beta = (beta + betamin) / 2.0
        H = _hbeta(dist, beta, P)
        h_diff = H - log_u
        tries += 1
    if H == 0.0:
        return -1.0
    mass = np.zeros(n_labels)
    for j in range(dist.shape[0]):
        mass[nbr_codes[j]] += P[j]
    s = 0.0
    for b in range(n_labels):
        s += mass[b] * mass[b]
    return s


@numba.njit(float64[:](float32[:, :], int64[:, :], int32[:], int64, float64, float64, int64), parallel=True, cache=True)
def _simpson_index(dist: np.ndarray, idx: np.ndarray, codes: np.ndarray, n_labels: int, perplexity: float, tol: float, n_iter: int) -> np.ndarray:
    """Simpson index of every cell from its kNN distances/indices (parallel over cells)."""
    n, k = dist.shape
    out = np.empty(n)
    for i in prange(n):
        d = np.empty(k)
        c = np.empty(k, dtype=np.int32)
        for j in range(k):
            d[j] = dist[i, j]
            c[j] = codes[idx[i, j]]
        out[i] = _simpson_row(d, c, n_labels, perplexity, tol, n_iter)
    return out


def lisi(
    X: np.ndarray | None,
    labels: Any,
    *,
    knn: KNNLike | None = None,
    cells: np.ndarray | None = None,
    sample_size: int | None = None,
    perplexity: float = 30.0,
    n_neighbors: int | None = None,
    tol: float = 1e-5,
    n_iter: int = 50,
    method: KNNMethod = "auto",
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
) -> np.ndarray:
    """Per-cell Local Inverse Simpson's Index (Korsunsky et al. 2019, Harmony ``compute_lisi``).

    For each cell, a bisection on ``beta`` (start 1, at most ``n_iter`` = 50 updates, stop when
    ``|H - ln(perplexity)| < tol``) calibrates ``P_j ~ exp(-beta * d_j)`` over its neighbours
    to the target perplexity, exactly as Harmony, the R ``lisi`` package and scib-metrics do
    (note: on Euclidean distances, not squared ones, despite the usual "Gaussian kernel" name).
    LISI = ``1 / sum_label (sum_{j: label} P_j)^2``, the effective number of labels in the
    neighbourhood (1 .. n_labels). A cell whose kernel underflows entirely (H = 0) gets -1, as
    in Harmony/scib-metrics.

    Parameters
    ----------
    X
        (n, d) embedding, or ``None`` when ``knn`` is given.
    labels
        (n,) batch labels (iLISI) or cell-type labels (cLISI), for all cells.
    knn
        Optional precomputed ``(indices, distances)``, self excluded, >= ``n_neighbors - 1``
        columns: rows for all n cells, or for the cells ``cells``.
    cells
        Score only these cells (sorted ids): the rows of ``knn``, or, without ``knn``, the cells
        whose exact neighbourhoods among all cells are computed.
    sample_size
        Without ``knn``/``cells``: score a uniform random subset of this many cells (exact
        neighbourhoods in the full data; the median over >= 1e5 cells moves by ~1e-3).
    perplexity
        Target perplexity (Harmony default 30).
    n_neighbors
        Neighbourhood size counting the cell itself; default ``3 * perplexity`` (Harmony: 90
        neighbours of which the first, the cell, is dropped; scib-metrics: 90 with the self edge
        masked). Uses ``n_neighbors - 1`` graph columns.
    tol, n_iter
        Bisection tolerance and maximum number of updates.
    method, rng, n_jobs
        kNN engine, seed and threads (when ``knn`` is not given); ``n_jobs`` also caps numba threads.

    Returns
    -------
    float64 array of per-cell LISI: (n,), or (len(cells),) for the scored cells.
    """
    codes, cats = encode_labels(labels)
    n = codes.size
    if perplexity <= 0:
        raise ValueError(f"perplexity must be positive, got {perplexity}")
    if n_neighbors is None:
        n_neighbors = int(3 * perplexity)
    _, idx, dist = _neighbourhoods(
        X, knn, n_neighbors - 1, n, cells=cells, sample_size=sample_size, method=method, rng=rng, n_jobs=n_jobs
    )
    with numba_threads(n_jobs):
        simpson = _simpson_index(dist, idx, codes, int(cats.size), float(perplexity), float(tol), int(n_iter))
    return 1.0 / simpson


def _median_lisi(X: np.ndarray | None, labels: Any, **kwargs: Any) -> tuple[float, int]:
    """NaN-ignoring median of the per-cell :func:`lisi` of ``labels`` and the number of label categories."""
    codes, cats = encode_labels(labels)
    return float(np.nanmedian(lisi(X, codes, **kwargs))), int(cats.size)


def scale_ilisi(median: float, n_batches: int) -> float:
    """iLISI scaled to [0, 1]: ``(median - 1) / (n_batches - 1)`` (scib / scib-metrics); NaN with one batch."""
    return (median - 1.0) / (n_batches - 1.0) if n_batches > 1 else float("nan")


def scale_clisi(median: float, n_labels: int) -> float:
    """cLISI scaled to [0, 1], higher is better: ``(n_labels - median) / (n_labels - 1)``; NaN with one label."""
    return (n_labels - median) / (n_labels - 1.0) if n_labels > 1 else float("nan")


def ilisi(
    X: np.ndarray | None,
    batches: Any,
    *,
    knn: KNNLike | None = None,
    cells: np.ndarray | None = None,
    sample_size: int | None = None,
    perplexity: float = 30.0,
    n_neighbors: int | None = None,
    scale: bool = True,
    method: KNNMethod = "auto",
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
) -> float:
    """Integration LISI: median per-cell LISI of the batch labels (higher = better mixed).

    ``scale=False``: the raw median (1 .. n_batches), as scib's ``ilisi_graph(scale=False)`` and
    Harmony papers report it. ``scale=True`` (default): ``(median - 1) / (n_batches - 1)`` in
    [0, 1], as scib and scib-metrics ``ilisi_knn``. NaNs are ignored in the median.
    ``knn``, ``cells``, ``sample_size`` and the rest: see :func:`lisi`.
    """
    med, n_cats = _median_lisi(
        X, batches, knn=knn, cells=cells, sample_size=sample_size, perplexity=perplexity,
        n_neighbors=n_neighbors, method=method, rng=rng, n_jobs=n_jobs,
    )  # fmt: skip
    return scale_ilisi(med, n_cats) if scale else med


def clisi(
    X: np.ndarray | None,
    labels: Any,
    *,
    knn: KNNLike | None = None,
    cells: np.ndarray | None = None,
    sample_size: int | None = None,
    perplexity: float = 30.0,
    n_neighbors: int | None = None,
    scale: bool = True,
    method: KNNMethod = "auto",
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
) -> float:
    """Cell-type LISI: median per-cell LISI of the cell-type labels.

    ``scale=False``: raw median (1 = pure neighbourhoods, lower is better). ``scale=True``
    (default): ``(n_labels - median) / (n_labels - 1)`` in [0, 1], higher is better, as scib
    and scib-metrics ``clisi_knn``. Other parameters: see :func:`lisi`.
    """
    med, n_cats = _median_lisi(
        X, labels, knn=knn, cells=cells, sample_size=sample_size, perplexity=perplexity,
        n_neighbors=n_neighbors, method=method, rng=rng, n_jobs=n_jobs,
    )  # fmt: skip
    return scale_clisi(med, n_cats) if scale else med


# ---------------------------------------------------------------------------------------------
# kBET
# ---------------------------------------------------------------------------------------------


@numba.njit(float64[:](int32[:], int64[:, :], int32[:], float64[:]), parallel=True, cache=True)
def _kbet_statistics(self_codes: np.ndarray, idx: np.ndarray, codes: np.ndarray, expected_frac: np.ndarray) -> np.ndarray:
    """Pearson chi-square statistic of each neighbourhood = the cell plus its ``idx`` row.

    ``expected_frac`` are the batch frequencies of the tested population; batches with zero
    expected frequency are left out of the sum (they cannot occur in the neighbourhood).
    """
    m, c = idx.shape
    n_batches = expected_frac.shape[0]
    size = c + 1
    out = np.empty(m)
    for i in prange(m):
        counts = np.zeros(n_batches)
        counts[self_codes[i]] += 1.0
        for j in range(c):
            counts[codes[idx[i, j]]] += 1.0
        stat = 0.0
        for b in range(n_batches):
            e = expected_frac[b] * size
            if e > 0.0:
                diff = counts[b] - e
                stat += diff * diff / e
        out[i] = stat
    return out


@dataclass(frozen=True)
class KBETResult:
    """kBET outcome.

    Attributes
    ----------
    acceptance_rate
        Fraction of tested neighbourhoods with p >= alpha (1 = batches well mixed everywhere).
    statistics
        Per-cell chi-square statistics (float64).
    p_values
        Per-cell p-values (float64).
    """

    acceptance_rate: float
    statistics: np.ndarray
    p_values: np.ndarray


def kbet(
    X: np.ndarray | None,
    batches: Any,
    *,
    knn: KNNLike | None = None,
    cells: np.ndarray | None = None,
    sample_size: int | None = None,
    n_neighbors: int = 50,
    alpha: float = 0.05,
    method: KNNMethod = "auto",
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
) -> KBETResult:
    """kBET acceptance rate over the whole dataset (scib-metrics ``kbet``; Büttner et al. 2019).

    Each cell's neighbourhood is the cell itself plus its ``n_neighbors - 1`` nearest cells
    (as R kBET's ``cbind(knn[, 1:(k0 - 1)], idx)`` and scib-metrics on a self-including graph).
    Its batch counts are compared with the expected counts ``n_neighbors * P_b`` (P = global
    batch frequencies) by Pearson's chi-square, ``dof = n_batches - 1``,
    ``p = chi2.sf(stat, dof)``; the acceptance rate is the fraction with ``p >= alpha``.

    By default every cell is tested; ``cells`` / ``sample_size`` test a subset (with exact
    neighbourhoods among all cells), as R kBET does (it tests a random 10% by default). No
    ``adapt``/heuristic choice of k0 and no per-component handling.

    Parameters
    ----------
    X
        (n, d) embedding, or None with ``knn``.
    batches
        (n,) batch labels of all cells.
    knn, cells, sample_size, method, rng, n_jobs
        Neighbourhoods, as in :func:`lisi`.
    n_neighbors
        Neighbourhood size counting the cell (scib-metrics Benchmarker: 50).
    alpha
        Significance level.

    Returns
    -------
    KBETResult
        Statistics and p-values of the tested cells.
    """
    from scipy.stats import chi2

    codes, cats = encode_labels(batches)
    n = codes.size
    if cats.size < 2:
        raise ValueError("kBET needs at least two batches")
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors (counting the cell) must be >= 2, got {n_neighbors}")
    tested, idx, _ = _neighbourhoods(
        X, knn, n_neighbors - 1, n, cells=cells, sample_size=sample_size, method=method, rng=rng, n_jobs=n_jobs
    )
    frac = np.bincount(codes, minlength=cats.size) / n
    self_codes = codes if tested is None else codes[tested]
    with numba_threads(n_jobs):
        stats = _kbet_statistics(np.ascontiguousarray(self_codes), idx, codes, frac.astype(np.float64))
    p = chi2.sf(stats, cats.size - 1)
    return KBETResult(float(np.mean(p >= alpha)), stats, p)


def _kbet_k0(batch_codes_in_label: np.ndarray) -> int:
    """scib's neighbourhood size for one label: ``min(70, max(10, floor(mean batch size / 4)))``."""
    counts = np.bincount(batch_codes_in_label)
    counts = counts[counts > 0]
    return int(min(70, max(10, int(np.floor(counts.mean() / 4.0)))))


def _same_label_neighbours(
    X: np.ndarray | None,
    label_rows: np.ndarray,
    tested: np.ndarray,
    tested_nbrs: np.ndarray | None,
    label_codes: np.ndarray,
    lab: int,
    need: int,
    n_jobs: int | None,
) -> np.ndarray:
    """Global ids of the ``need`` nearest same-label cells of each ``tested`` cell (self excluded).

    ``label_rows``: sorted ids of all cells of the label; ``tested``: the tested cells (a subset);
    ``tested_nbrs``: their rows of a global kNN graph, or None. A tested cell with at least
    ``need`` same-label cells among its graph neighbours takes the first ``need`` (exactly its
    nearest same-label cells when the graph is exact); the others are queried exactly against a
    kd-tree of the label's cells.
    """
    m = tested.size
    out = np.empty((m, need), dtype=np.int64)
    bad = np.ones(m, dtype=bool)
    if tested_nbrs is not None:
        same = label_codes[tested_nbrs] == lab
        ok = same.sum(axis=1) >= need
        if ok.any():
            order = np.argsort(~same[ok], axis=1, kind="stable")[:, :need]
            out[ok] = np.take_along_axis(tested_nbrs[ok], order, axis=1)
        bad = ~ok
    if bad.any():
        if X is None:
            raise ValueError("kbet_per_label needs X when the knn graph lacks same-label neighbours")
        from .knn import _exact_index, _exact_query

        Xl = np.ascontiguousarray(X[label_rows], dtype=np.float32)
        index = _exact_index(Xl)
        local = np.searchsorted(label_rows, tested[bad]).astype(np.int64)
        li, _ = _exact_query(index, Xl[local], need, n_jobs, self_rows=local)
        out[bad] = label_rows[li]
    return out


def kbet_per_label(
    X: np.ndarray | None,
    batches: Any,
    labels: Any,
    *,
    knn: KNNLike | None = None,
    cells: np.ndarray | None = None,
    max_cells_per_label: int | None = None,
    alpha: float = 0.05,
    min_cells: int = 10,
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
    return_per_label: bool = False,
) -> float | tuple[float, pd.DataFrame]:
    """kBET per cell type, averaged (scib ``kBET`` / scib-metrics ``kbet_per_label``).

    For each label with at least ``min_cells`` cells and at least two batches (others are
    skipped, NaN): ``k0 = min(70, max(10, floor(mean cells per present batch / 4)))``; each tested
    cell's neighbourhood is the cell plus its ``k0 - 1`` nearest cells **of the same label**
    (Euclidean in ``X``); expected counts use the label's own batch frequencies (all its cells),
    ``dof`` = batches present in the label - 1. The label's score is the acceptance rate
    (1 - kBET rejection rate) over its tested cells; the result is the ``nanmean`` over labels.

    Tested cells: all cells of the label by default; the label's members of ``cells`` when
    given (labels without any member of ``cells`` test all their cells); or, with
    ``max_cells_per_label``, a uniform subsample of at most that many (R kBET itself tests a
    random 10%). Same-label neighbours come from ``knn`` (rows = all cells, or ``cells``) when a
    tested cell has enough same-label neighbours among its columns, and from an exact kd-tree over
    the label otherwise.

    Differences from scib / scib-metrics, documented on purpose:
    - neighbours are Euclidean in the embedding, restricted to the label; scib-metrics uses
      diffusion-map distances on the label-restricted UMAP connectivity graph (an O(n_label)
      eigendecomposition per label), scib the label-restricted graph through R kBET;
    - no connected-component rule (scib: components smaller than ``3 * k0`` are dropped and the
      label scores 0 if fewer than 75% of its cells remain). With Euclidean neighbours the
      label's cells are always "connected", so this rule has no analogue;
    - no ``adapt`` heuristics.

    Returns
    -------
    float
        Mean acceptance rate over labels (NaN if no label could be scored).
    pandas.DataFrame
        If ``return_per_label``: columns ``label``, ``n_cells``, ``n_tested``, ``k0``, ``kBET``.
    """
    from scipy.stats import chi2

    bcodes, bcats = encode_labels(batches)
    lcodes, lcats = encode_labels(labels)
    n = lcodes.size
    check_lengths(n, batches=bcodes)
    if X is not None:
        X = as_float_matrix(X, np.float32)
        check_lengths(n, X=X)
    knn_idx = None
    row_of = None
    if cells is not None:
        cells = np.asarray(cells, dtype=np.int64)
        if knn is not None and len(knn[0]) != cells.size:
            raise ValueError(f"knn has {len(knn[0])} rows but cells has {cells.size}")
        row_of = np.full(n, -1, dtype=np.int64)
        row_of[cells] = np.arange(cells.size)
    if knn is not None:
        knn_idx = np.asarray(knn[0])
        if cells is None and knn_idx.shape[0] != n:
            raise ValueError(f"knn has {knn_idx.shape[0]} rows, expected {n}")
    gen = as_generator(rng)
    rows_by_label = np.argsort(lcodes, kind="stable")
    bounds = np.zeros(lcats.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(lcodes, minlength=lcats.size), out=bounds[1:])
    records = []
    for lab in range(lcats.size):
        rows = rows_by_label[bounds[lab] : bounds[lab + 1]]  # sorted ids (stable argsort)
        b = bcodes[rows]
        present = np.unique(b)
        if rows.size < min_cells or present.size < 2:
            records.append((lcats[lab], rows.size, 0, 0, np.nan))
            continue
        k0 = _kbet_k0(b)
        tested = rows
        graph_rows = None
        if row_of is not None:
            in_cells = row_of[rows] >= 0
            if in_cells.any():
                tested = rows[in_cells]
                graph_rows = row_of[tested]
        elif max_cells_per_label is not None and rows.size > max_cells_per_label:
            tested = np.sort(gen.choice(rows, size=max_cells_per_label, replace=False))
        if knn_idx is not None:
            if graph_rows is None and row_of is None:
                graph_rows = tested
            tested_nbrs = knn_idx[graph_rows] if graph_rows is not None else None
        else:
            tested_nbrs = None
        nbrs = _same_label_neighbours(X, rows, tested, tested_nbrs, lcodes, lab, k0 - 1, n_jobs)
        frac = np.bincount(b, minlength=bcats.size) / rows.size
        with numba_threads(n_jobs):
            stats = _kbet_statistics(np.ascontiguousarray(bcodes[tested]), nbrs, bcodes, frac.astype(np.float64))
        p = chi2.sf(stats, present.size - 1)
        records.append((lcats[lab], rows.size, tested.size, k0, float(np.mean(p >= alpha))))
    df = pd.DataFrame(records, columns=["label", "n_cells", "n_tested", "k0", "kBET"])
    score = float(np.nanmean(df["kBET"])) if df["kBET"].notna().any() else float("nan")
    return (score, df) if return_per_label else score


# ---------------------------------------------------------------------------------------------
# Graph connectivity
# ---------------------------------------------------------------------------------------------


def graph_connectivity(
    X: np.ndarray | None,
    labels: Any,
    *,
    knn: KNNLike | None = None,
    n_neighbors: int = 15,
    connection: Literal["strong", "weak"] = "strong",
    method: KNNMethod = "auto",
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
    return_per_label: bool = False,
) -> float | tuple[float, pd.Series]:
    """Graph connectivity (scib): per label, the fraction of its cells in the largest connected
    component of the kNN graph restricted to that label; averaged over labels.

    The graph is the directed kNN graph with ``n_neighbors - 1`` neighbours per cell (the
    scib-metrics Benchmarker's 15-neighbour, self-including graph). ``connection="strong"``
    (default) follows scib-metrics (``connected_components(knn_graph_distances, "strong")``);
    ``"weak"`` equals components of the symmetrized graph, as scib's use of the symmetric UMAP
    connectivities.

    Returns
    -------
    float
        Mean over labels, in (0, 1].
    pandas.Series
        If ``return_per_label``: the per-label fractions.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    codes, cats = encode_labels(labels)
    n = codes.size
    idx, _ = _get_knn(X, knn, n_neighbors - 1, n, method=method, rng=rng, n_jobs=n_jobs)
    k = idx.shape[1]
    pos = np.full(n, -1, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = np.zeros(cats.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=cats.size), out=bounds[1:])
    fractions = np.empty(cats.size)
    for lab in range(cats.size):
        rows = order[bounds[lab] : bounds[lab + 1]]
        m = rows.size
        pos[rows] = np.arange(m)
        cols = pos[idx[rows]]
        src = np.repeat(np.arange(m, dtype=np.int64), k)
        cols = cols.ravel()
        keep = cols >= 0
        graph = csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (src[keep], cols[keep])), shape=(m, m))
        _, comp = connected_components(graph, directed=True, connection=connection)
        fractions[lab] = np.bincount(comp).max() / m
        pos[rows] = -1
    score = float(fractions.mean())
    if return_per_label:
        return score, pd.Series(fractions, index=cats, name="graph_connectivity")
    return score


# ---------------------------------------------------------------------------------------------
# Silhouette-based metrics
# ---------------------------------------------------------------------------------------------


def _stratified_subsample(codes: np.ndarray, n_labels: int, cap: int | None, gen: np.random.Generator) -> np.ndarray:
    """Up to ``cap`` cells per label, uniformly without replacement (all cells if ``cap`` is None).

    Returned indices are sorted within each label and grouped by label.
    """
    order = np.argsort(codes, kind="stable")
    bounds = np.zeros(n_labels + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=n_labels), out=bounds[1:])
    parts = []
    for lab in range(n_labels):
        rows = order[bounds[lab] : bounds[lab + 1]]
        if cap is not None and rows.size > cap:
            rows = np.sort(gen.choice(rows, size=cap, replace=False))
        parts.append(rows)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def isolated_labels(labels: Any, batches: Any, iso_threshold: int | None = None) -> np.ndarray:
    """Labels present in at most ``iso_threshold`` batches (default: the minimum over labels).

    Same rule as scib / scib-metrics ``_get_isolated_labels``.
    """
    df = pd.DataFrame({"label": np.asarray(labels), "batch": np.asarray(batches)}).drop_duplicates()
    per_label = df.groupby("label")["batch"].count()
    threshold = int(per_label.min()) if iso_threshold is None else int(iso_threshold)
    return np.asarray(per_label.index[per_label <= threshold])


def isolated_labels_asw(
    X: np.ndarray,
    labels: Any,
    batches: Any,
    *,
    iso_threshold: int | None = None,
    rescale: bool = True,
    max_cells_per_label: int | None = None,
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
    return_per_label: bool = False,
) -> float | tuple[float, pd.Series]:
    """Isolated-label score, ASW variant (scib ``isolated_labels_asw``, scib-metrics ``isolated_labels``).

    Isolated labels are those present in the fewest batches (:func:`isolated_labels`). The
    silhouette widths of all cells are computed with respect to *all* cell-type labels; each
    isolated label scores the mean width of its cells, rescaled ``(s + 1) / 2`` when ``rescale``;
    the result is the mean over isolated labels. (scib's default is the cluster-F1 variant; we
    follow scib-metrics' ASW variant: deterministic, no clustering.)

    Scaling: a cell's silhouette needs its mean distance to every label. With
    ``max_cells_per_label`` set, at most that many cells per label (uniform, without replacement)
    form the reference set and the isolated labels' cells are taken from it: each mean is then an
    unbiased estimate from that label's subsample, so per-cell widths stay consistent even though
    label proportions change. Cost O((cells scored) x (reference cells) x d). ``None``: exact.

    Returns
    -------
    float, and the per-label Series if ``return_per_label``.
    """
    X = as_float_matrix(X, np.float32)
    n = X.shape[0]
    check_lengths(n, labels=labels, batches=batches)
    codes, cats = encode_labels(labels)
    bcodes, _ = encode_labels(batches)
    iso_codes = isolated_labels(codes, bcodes, iso_threshold).astype(np.int64)
    gen = as_generator(rng)
    ref = _stratified_subsample(codes, cats.size, max_cells_per_label, gen)
    query = ref[np.isin(codes[ref], iso_codes)]
    s = silhouette_samples_subset(X, codes, cats.size, query, ref, n_jobs=n_jobs)
    if rescale:
        s = (s + 1.0) / 2.0
    per = pd.Series(s).groupby(codes[query]).mean()
    per.index = cats[per.index.to_numpy()]
    score = float(per.mean()) if len(per) else float("nan")
    return (score, per) if return_per_label else score


def batch_asw(
    X: np.ndarray,
    batches: Any,
    labels: Any,
    *,
    rescale: bool = True,
    max_cells_per_label: int | None = None,
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
    return_per_label: bool = False,
) -> float | tuple[float, pd.Series]:
    """Batch ASW (scib / scib-metrics ``silhouette_batch``).

    Per cell type: silhouette widths of the *batch* labels computed among that type's cells
    only; take ``|s|`` and, if ``rescale`` (default), ``1 - |s|`` (1 = batches indistinguishable
    within the type); average per type, then over types. Types with a single batch, or with as
    many batches as cells, are skipped (as scib). ``rescale=False`` returns the mean ``|s|``.

    ``max_cells_per_label`` caps the cells used per type (uniform subsample, exact silhouette
    within it); ``None`` = exact, O(sum over types of n_type^2 d).

    Returns
    -------
    float (NaN if no type could be scored), and the per-type Series if ``return_per_label``.
    """
    X = as_float_matrix(X, np.float32)
    n = X.shape[0]
    check_lengths(n, labels=labels, batches=batches)
    lcodes, lcats = encode_labels(labels)
    bcodes, _ = encode_labels(batches)
    gen = as_generator(rng)
    rows_all = _stratified_subsample(lcodes, lcats.size, max_cells_per_label, gen)
    per: dict[Any, float] = {}
    start = 0
    counts = np.bincount(lcodes[rows_all], minlength=lcats.size)
    for lab in range(lcats.size):
        rows = rows_all[start : start + counts[lab]]
        start += counts[lab]
        b_local, b_cats = encode_labels(bcodes[rows])
        if b_cats.size == 1 or b_cats.size == rows.size:
            continue
        local = np.arange(rows.size)
        s = silhouette_samples_subset(X[rows], b_local, b_cats.size, local, local, n_jobs=n_jobs)
        s = np.abs(s)
        if rescale:
            s = 1.0 - s
        per[lcats[lab]] = float(s.mean())
    series = pd.Series(per, dtype=np.float64, name="batch_asw")
    score = float(series.mean()) if len(series) else float("nan")
    return (score, series) if return_per_label else score


def silhouette_label(
    X: np.ndarray,
    labels: Any,
    *,
    rescale: bool = True,
    sample_size: int | None = None,
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
) -> float:
    """Cell-type ASW, rescaled to [0, 1] by default (scib-metrics ``silhouette_label``).

    Thin wrapper over :func:`scalex_scale.metrics.paper.silhouette`.
    """
    return silhouette(X, labels, sample_size=sample_size, rng=rng, rescale=rescale, n_jobs=n_jobs)
