"""k-nearest-neighbour graphs for the metrics and label transfer (Euclidean, self excluded).

Two engines:

- ``"exact"``: a scikit-learn ``KDTree`` for low-dimensional data such as the 10-d SCALEX latent
  (brute-force ``NearestNeighbors`` above :data:`KD_TREE_MAX_DIM` dimensions), queried in row
  chunks (in the tree's leaf order for self-queries, which halves cache misses) over ``n_jobs``
  threads, so temporaries stay small.
- ``"nndescent"``: pynndescent ``NNDescent`` with the UMAP/scib-metrics build settings
  (``n_trees = min(64, 5 + round(sqrt(n) / 20))``, ``n_iters = max(5, round(log2 n))``,
  ``max_candidates = 60``), which reach recall >= 0.98 against exact neighbours on clustered
  10-d latents (tested in ``tests/test_metrics.py``).

``method="auto"`` picks ``"exact"`` when ``n <= EXACT_MAX_CELLS`` (any dimension) or when the
dimension is at most :data:`KD_TREE_MAX_DIM` and ``n <= KD_TREE_MAX_CELLS``, and
``"nndescent"`` otherwise: the kd-tree is faster up to a few hundred thousand 10-d cells, then
slows per query as n grows (cache misses) while NN-descent scales better but needs more memory
(timings and peaks: ``bench/README.md``, "Figures behind design choices").

Memory: the outputs are ``int64`` indices and ``float32`` distances of shape (n, k); nothing of
size n x n is ever formed.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np

from ._utils import as_float_matrix, as_generator

__all__ = [
    "knn",
    "knn_query",
    "knn_ref_and_query",
    "knn_recall",
    "exact_knn_rows",
    "resolve_method",
    "EXACT_MAX_CELLS",
    "KD_TREE_MAX_DIM",
    "KD_TREE_MAX_CELLS",
]

KNNMethod = Literal["auto", "exact", "nndescent"]

#: ``method="auto"`` uses exact search up to this many cells whatever the dimension.
EXACT_MAX_CELLS = 20_000
#: ``method="auto"`` uses an exact kd-tree up to ``KD_TREE_MAX_CELLS`` cells when the dimension is at most this.
KD_TREE_MAX_DIM = 16
#: See :data:`KD_TREE_MAX_DIM`.
KD_TREE_MAX_CELLS = 200_000
#: Rows per exact-query chunk (bounds the temporary float64 blocks inside scikit-learn).
_CHUNK = 32_768


def resolve_method(n: int, dim: int, method: KNNMethod) -> Literal["exact", "nndescent"]:
    """Resolve ``method="auto"`` to a concrete engine for ``n`` points of dimension ``dim``."""
    if method == "auto":
        if n <= EXACT_MAX_CELLS or (dim <= KD_TREE_MAX_DIM and n <= KD_TREE_MAX_CELLS):
            return "exact"
        return "nndescent"
    if method not in ("exact", "nndescent"):
        raise ValueError(f"method must be 'auto', 'exact' or 'nndescent', got {method!r}")
    return method


def _nndescent_params(n: int) -> dict[str, int]:
    """Build settings used by UMAP / scanpy / scib-metrics for ``n`` points."""
    return {
        "n_trees": min(64, 5 + int(round(n**0.5 / 20.0))),
        "n_iters": max(5, int(round(np.log2(max(n, 2))))),
        "max_candidates": 60,
    }


def _nndescent(X: np.ndarray, k: int, n_jobs: int | None, rng: Any) -> Any:
    """A pynndescent index of ``X`` whose graph holds each row's ``k`` neighbours plus itself."""
    from pynndescent import NNDescent

    return NNDescent(
        X,
        metric="euclidean",
        n_neighbors=k + 1,
        random_state=int(as_generator(rng).integers(2**31 - 1)),
        low_memory=True,
        compressed=False,
        n_jobs=-1 if n_jobs is None else n_jobs,
        verbose=False,
        **_nndescent_params(X.shape[0]),
    )


def _drop_self(indices: np.ndarray, distances: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its (k+1)-neighbour list.

    If the cell itself is not among the returned neighbours (possible with more than k exact
    duplicates, or approximate search), the farthest neighbour is dropped instead, so exactly
    ``k`` neighbours remain.
    """
    mask = indices == rows[:, None]
    missing = ~mask.any(axis=1)
    mask[missing, -1] = True
    # a row can hold its own index at most once, so every row keeps exactly k entries
    keep = ~mask
    n = indices.shape[0]
    return indices[keep].reshape(n, k), distances[keep].reshape(n, k)


def _exact_index(ref: np.ndarray) -> Any:
    """A kd-tree (low dimension) or a brute-force scikit-learn index over ``ref``."""
    if ref.shape[1] <= KD_TREE_MAX_DIM:
        from sklearn.neighbors import KDTree

        return KDTree(ref, leaf_size=30)
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(algorithm="brute").fit(ref)


def _query_block(index: Any, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import KDTree

    if isinstance(index, KDTree):
        d, i = index.query(q, k=kk, return_distance=True, sort_results=True)
    else:
        d, i = index.kneighbors(q, n_neighbors=kk, return_distance=True)
    return i, d


def _exact_query(
    index: Any,
    query: np.ndarray,
    k: int,
    n_jobs: int | None,
    self_rows: np.ndarray | None = None,
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Query a fitted index in chunks (threads over chunks); drop ``self_rows`` ids if given.

    ``order`` (a permutation of the query rows) sets the processing order: queries in the
    kd-tree's leaf order hit the cache far better than random order (``bench/README.md``).
    """
    from concurrent.futures import ThreadPoolExecutor

    n = query.shape[0]
    kk = k + 1 if self_rows is not None else k
    out_i = np.empty((n, k), dtype=np.int64)
    out_d = np.empty((n, k), dtype=np.float32)
    perm = np.arange(n) if order is None else order
    chunk = 8192

    def work(start: int) -> None:
        rows = perm[start : start + chunk]
        i, d = _query_block(index, query[rows], kk)
        i = i.astype(np.int64, copy=False)
        d = d.astype(np.float32, copy=False)
        if self_rows is not None:
            i, d = _drop_self(i, d, self_rows[rows], k)
        out_i[rows] = i
        out_d[rows] = d

    starts = range(0, n, chunk)
    threads = 1 if n_jobs is None else (os.cpu_count() or 1) if n_jobs == -1 else max(1, int(n_jobs))
    if threads == 1 or n <= chunk:
        for st in starts:
            work(st)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, starts))
    return out_i, out_d


def _tree_order(index: Any) -> np.ndarray | None:
    """Leaf order of a scikit-learn kd-tree (None for other indexes)."""
    from sklearn.neighbors import KDTree

    if isinstance(index, KDTree):
        return np.asarray(index.get_arrays()[1], dtype=np.int64)
    return None


def exact_knn_rows(X: np.ndarray, rows: np.ndarray, k: int, *, n_jobs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest neighbours (self excluded) of the cells ``rows`` within ``X``.

    Used where only a few cells need neighbours (e.g. the batch entropy mixing score), so the
    cost is one index build plus ``len(rows)`` queries.

    Parameters
    ----------
    X
        (n, d) data, float32 or float64.
    rows
        int array of the cells to query.
    k
        Number of neighbours (``k < n``).
    n_jobs
        Threads for the scikit-learn query.

    Returns
    -------
    indices, distances
        int64 and float32 arrays of shape (len(rows), k), sorted by distance.
    """
    X = as_float_matrix(X, np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    if not 1 <= k < X.shape[0]:
        raise ValueError(f"k must be in [1, n_cells - 1] = [1, {X.shape[0] - 1}], got {k}")
    index = _exact_index(X)
    tree_order = _tree_order(index)
    if tree_order is not None:  # process the rows in the tree's leaf order (cache locality)
        position = np.empty(X.shape[0], dtype=np.int64)
        position[tree_order] = np.arange(X.shape[0])
        q_order = np.argsort(position[rows], kind="stable")
    else:
        q_order = None
    return _exact_query(index, X[rows], k, n_jobs, self_rows=rows, order=q_order)


def knn(
    X: np.ndarray,
    k: int,
    *,
    method: KNNMethod = "auto",
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every cell among the other cells (Euclidean, self excluded).

    Parameters
    ----------
    X
        (n, d) embedding; converted to float32.
    k
        Number of neighbours per cell, ``1 <= k < n``.
    method
        ``"exact"``, ``"nndescent"`` or ``"auto"`` (see the module docstring).
    rng
        Generator or seed; only NN-descent is random (its seed is drawn from ``rng``).
    n_jobs
        Threads (exact query chunks / pynndescent). ``None``: one thread for exact search,
        all cores for pynndescent (its own default); ``-1``: all cores.

    Returns
    -------
    indices
        int64 array (n, k); row i lists i's neighbours, nearest first, never i itself.
    distances
        float32 array (n, k) of the matching Euclidean distances (non-decreasing per row).
    """
    X = as_float_matrix(X, np.float32)
    n, dim = X.shape
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, n_cells - 1] = [1, {n - 1}], got {k}")
    engine = resolve_method(n, dim, method)
    rows = np.arange(n, dtype=np.int64)
    if engine == "exact":
        index = _exact_index(X)
        return _exact_query(index, X, k, n_jobs, self_rows=rows, order=_tree_order(index))

    index = _nndescent(X, k, n_jobs, rng)
    indices, distances = index.neighbor_graph
    del index
    out_i = np.empty((n, k), dtype=np.int64)
    out_d = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, _CHUNK):  # chunked: no full-size temporaries besides the outputs
        stop = min(start + _CHUNK, n)
        i, d = _drop_self(indices[start:stop], distances[start:stop], rows[start:stop], k)
        out_i[start:stop] = i
        out_d[start:stop] = d
    return out_i, out_d


def knn_query(
    ref: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    method: KNNMethod = "auto",
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
    epsilon: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest reference cells of each query cell (Euclidean).

    Parameters
    ----------
    ref
        (n_ref, d) reference embedding.
    query
        (n_query, d) query embedding (same d). The query is not assumed disjoint from the
        reference: a query cell identical to a reference cell gets it at distance 0.
    k
        Number of neighbours, ``1 <= k <= n_ref``.
    method
        ``"exact"``, ``"nndescent"`` or ``"auto"`` (decided on the reference size and dimension).
    rng
        Generator or seed (NN-descent only).
    n_jobs
        Threads.
    epsilon
        NN-descent search breadth (pynndescent ``query(epsilon=...)``); 0.2 gives recall >= 0.98 on
        10-d latents, larger is slower and more accurate.

    Returns
    -------
    indices
        int64 (n_query, k) row indices into ``ref``, nearest first.
    distances
        float32 (n_query, k) Euclidean distances.
    """
    ref = as_float_matrix(ref, np.float32, "ref")
    query = as_float_matrix(query, np.float32, "query")
    if ref.shape[1] != query.shape[1]:
        raise ValueError(f"ref has {ref.shape[1]} dimensions but query has {query.shape[1]}")
    if not 1 <= k <= ref.shape[0]:
        raise ValueError(f"k must be in [1, n_ref] = [1, {ref.shape[0]}], got {k}")
    engine = resolve_method(ref.shape[0], ref.shape[1], method)
    if engine == "exact":
        return _exact_query(_exact_index(ref), query, k, n_jobs)

    from pynndescent import NNDescent

    gen = as_generator(rng)
    n_build = max(k, 30)
    index = NNDescent(
        ref,
        metric="euclidean",
        n_neighbors=min(n_build, ref.shape[0] - 1),
        random_state=int(gen.integers(2**31 - 1)),
        low_memory=True,
        compressed=False,
        n_jobs=-1 if n_jobs is None else n_jobs,
        verbose=False,
        **_nndescent_params(ref.shape[0]),
    )
    index.prepare()
    out_i = np.empty((query.shape[0], k), dtype=np.int64)
    out_d = np.empty((query.shape[0], k), dtype=np.float32)
    for start in range(0, query.shape[0], 8 * _CHUNK):
        stop = min(start + 8 * _CHUNK, query.shape[0])
        i, d = index.query(query[start:stop], k=k, epsilon=epsilon)
        out_i[start:stop] = i
        out_d[start:stop] = d
    return out_i, out_d


def knn_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact neighbours found by an approximate search.

    Parameters
    ----------
    approx, exact
        int arrays (n, k) of neighbour indices (same k).

    Returns
    -------
    float
        ``mean_i |approx_i ∩ exact_i| / k``.
    """
    approx = np.asarray(approx)
    exact = np.asarray(exact)
    if approx.shape != exact.shape:
        raise ValueError(f"shape mismatch: {approx.shape} vs {exact.shape}")
    n, k = exact.shape
    a = np.sort(approx, axis=1)
    e = np.sort(exact, axis=1)
    # count matches row-wise by merging sorted rows via searchsorted on an offset key
    offset = (np.arange(n, dtype=np.int64) * (max(int(a.max(initial=0)), int(e.max(initial=0))) + 1))[:, None]
    ka = (a + offset).ravel()
    ke = (e + offset).ravel()
    pos = np.searchsorted(ka, ke)
    pos = np.minimum(pos, ka.size - 1)
    hits = ka[pos] == ke
    return float(hits.sum() / (n * k))


def knn_ref_and_query(
    ref: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    method: KNNMethod = "auto",
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
    epsilon: float = 0.2,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The reference's own kNN graph (self excluded) and the query's reference neighbours, one index.

    Equivalent to ``(knn(ref, k), knn_query(ref, query, k))`` but builds a single kd-tree or
    NN-descent index (whose neighbour graph is the reference's self graph).

    Returns
    -------
    (ref_indices, ref_distances), (query_indices, query_distances)
        int64 / float32 arrays of shapes (n_ref, k) and (n_query, k).
    """
    ref = as_float_matrix(ref, np.float32, "ref")
    query = as_float_matrix(query, np.float32, "query")
    if ref.shape[1] != query.shape[1]:
        raise ValueError(f"ref has {ref.shape[1]} dimensions but query has {query.shape[1]}")
    n = ref.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, n_ref - 1] = [1, {n - 1}], got {k}")
    engine = resolve_method(n, ref.shape[1], method)
    rows = np.arange(n, dtype=np.int64)
    if engine == "exact":
        index = _exact_index(ref)
        self_graph = _exact_query(index, ref, k, n_jobs, self_rows=rows, order=_tree_order(index))
        return self_graph, _exact_query(index, query, k, n_jobs)

    index = _nndescent(ref, k, n_jobs, rng)
    gi, gd = index.neighbor_graph
    ref_i, ref_d = _drop_self(gi, gd, rows, k)
    ref_i = ref_i.astype(np.int64, copy=False)
    del gi, gd
    index.prepare()
    out_i = np.empty((query.shape[0], k), dtype=np.int64)
    out_d = np.empty((query.shape[0], k), dtype=np.float32)
    for start in range(0, query.shape[0], 8 * _CHUNK):
        stop = min(start + 8 * _CHUNK, query.shape[0])
        i, d = index.query(query[start:stop], k=k, epsilon=epsilon)
        out_i[start:stop] = i
        out_d[start:stop] = d
    return (ref_i, ref_d), (out_i, out_d)
