"""Exact silhouette widths without an n x n matrix (numba kernel + label bookkeeping).

The silhouette of cell i with label l_i is ``s_i = (b_i - a_i) / max(a_i, b_i)`` with ``a_i`` the
mean distance to the other cells of its label and ``b_i`` the smallest mean distance to the
cells of another label (scikit-learn ``silhouette_samples``; cells alone in their label get 0,
and 0/0 gives 0).

The kernel streams over reference cells sorted by label and accumulates, for each query cell,
the sum of Euclidean distances to each label segment: O(n_query * n_ref * d) time, O(n_query *
n_labels) memory. Query cells may be a subset of the reference cells (then their own zero
distance is excluded from ``a_i``), which lets callers compute per-cell silhouettes for a few
cells against a (stratified) subsample of all cells.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import float64, int64, prange

from ._utils import numba_threads

__all__ = ["label_distance_sums", "silhouette_samples_subset"]

_BLOCK = 256


@numba.njit(float64[:, :](float64[:, :], float64[:, :], int64[:]), parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def _label_distance_sums_kernel(Xq: np.ndarray, XrT: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Sum of Euclidean distances from each query row to each label segment of the reference.

    ``XrT`` is the reference transposed (d, m), its columns sorted by label; label l occupies
    columns ``bounds[l]:bounds[l + 1]``. Returns (n_query, n_labels) float64.
    """
    nq, d = Xq.shape
    n_labels = bounds.shape[0] - 1
    out = np.zeros((nq, n_labels))
    for i in prange(nq):
        tmp = np.empty(_BLOCK)
        for lab in range(n_labels):
            acc = 0.0
            for j0 in range(bounds[lab], bounds[lab + 1], _BLOCK):
                nb = min(_BLOCK, bounds[lab + 1] - j0)
                for jj in range(nb):
                    tmp[jj] = 0.0
                for c in range(d):
                    xc = Xq[i, c]
                    for jj in range(nb):
                        t = xc - XrT[c, j0 + jj]
                        tmp[jj] += t * t
                for jj in range(nb):
                    acc += np.sqrt(tmp[jj])
            out[i, lab] = acc
    return out


def label_distance_sums(
    Xq: np.ndarray, Xr: np.ndarray, ref_codes: np.ndarray, n_labels: int, *, n_jobs: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label sums of distances from query cells to reference cells.

    Parameters
    ----------
    Xq
        (n_query, d) query coordinates.
    Xr
        (m, d) reference coordinates.
    ref_codes
        int labels of the reference cells in ``[0, n_labels)``.
    n_labels
        Number of labels.
    n_jobs
        numba threads (None: numba default).

    Returns
    -------
    sums
        float64 (n_query, n_labels): ``sums[i, l] = sum_{j: ref_codes[j] = l} ||Xq_i - Xr_j||``.
    counts
        int64 (n_labels,): reference cells per label.
    """
    ref_codes = np.asarray(ref_codes, dtype=np.int64)
    order = np.argsort(ref_codes, kind="stable")
    counts = np.bincount(ref_codes, minlength=n_labels).astype(np.int64)
    bounds = np.zeros(n_labels + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    XrT = np.ascontiguousarray(np.asarray(Xr, dtype=np.float64)[order].T)
    Xq64 = np.ascontiguousarray(Xq, dtype=np.float64)
    with numba_threads(n_jobs):
        sums = _label_distance_sums_kernel(Xq64, XrT, bounds)
    return sums, counts


def silhouette_samples_subset(
    X: np.ndarray,
    codes: np.ndarray,
    n_labels: int,
    query: np.ndarray,
    ref: np.ndarray,
    *,
    n_jobs: int | None = None,
) -> np.ndarray:
    """Silhouette widths of the cells ``query`` computed against the cells ``ref``.

    With ``query = ref = arange(n)`` this equals scikit-learn ``silhouette_samples(X, codes)``.
    Every query cell must also be a reference cell (its own distance, 0, is then excluded
    from ``a_i`` by dividing by ``count - 1``).

    Parameters
    ----------
    X
        (n, d) coordinates.
    codes
        int labels (n,) in ``[0, n_labels)``.
    n_labels
        Number of label codes.
    query, ref
        int index arrays into ``X``; ``query`` must be a subset of ``ref``.
    n_jobs
        numba threads.

    Returns
    -------
    float64 array of shape (len(query),).
    """
    codes = np.asarray(codes)
    query = np.asarray(query, dtype=np.int64)
    ref = np.asarray(ref, dtype=np.int64)
    sums, counts = label_distance_sums(X[query], X[ref], codes[ref], n_labels, n_jobs=n_jobs)
    own = codes[query].astype(np.int64)
    rows = np.arange(query.size)
    own_count = counts[own] - 1  # query cells are reference cells: exclude self
    with np.errstate(divide="ignore", invalid="ignore"):
        a = sums[rows, own] / own_count
        means = sums / counts[None, :]
    means[rows, own] = np.inf
    means[:, counts == 0] = np.inf
    b = means.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (b - a) / np.maximum(a, b)
    s[own_count <= 0] = 0.0
    return np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
