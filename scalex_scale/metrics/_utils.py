"""Small shared helpers for the metrics package: RNG coercion, label encoding, thread limits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numba
import numpy as np

__all__ = ["as_generator", "encode_labels", "as_float_matrix", "numba_threads", "check_lengths"]


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """Return a :class:`numpy.random.Generator` for ``rng``.

    Parameters
    ----------
    rng
        A Generator (returned as is), an integer seed, or ``None`` (fresh OS entropy).

    Returns
    -------
    numpy.random.Generator
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy Generator, an int or None, not {type(rng).__name__}")


def encode_labels(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Encode labels as dense integer codes.

    Parameters
    ----------
    labels
        Array-like of shape (n,), any hashable dtype (pandas Categorical accepted).
        Missing values (NaN / None) are not allowed.

    Returns
    -------
    codes
        int32 array of shape (n,) with values in ``[0, n_categories)``.
    categories
        Array of the sorted unique labels (``np.unique`` order; for a pandas Categorical, the
        categories actually present, in category order).
    """
    import pandas as pd

    if isinstance(labels, (pd.Series, pd.Index)):
        labels = labels.array
    if isinstance(labels, pd.Categorical):
        cat = labels.remove_unused_categories()
        codes = np.asarray(cat.codes)
        if (codes < 0).any():
            raise ValueError("labels contain missing values")
        return codes.astype(np.int32, copy=False), np.asarray(cat.categories)
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind == "O":
        if pd.isna(arr).any():
            raise ValueError("labels contain missing values")
    elif arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError("labels contain missing values")
    categories, codes = np.unique(arr, return_inverse=True)
    return codes.astype(np.int32, copy=False), categories


def as_float_matrix(X: Any, dtype: type = np.float32, name: str = "X") -> np.ndarray:
    """Return ``X`` as a C-contiguous 2-D array of ``dtype`` (no copy when already so)."""
    arr = np.ascontiguousarray(X, dtype=dtype)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be two-dimensional (cells x dims), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def check_lengths(n: int, **arrays: Any) -> None:
    """Raise ``ValueError`` unless every array in ``arrays`` has length ``n``."""
    for name, arr in arrays.items():
        if arr is not None and len(arr) != n:
            raise ValueError(f"{name} has length {len(arr)}, expected {n} (one per cell)")


@contextlib.contextmanager
def numba_threads(n_jobs: int | None) -> Iterator[None]:
    """Temporarily cap the number of numba threads used by ``parallel=True`` kernels.

    ``None`` keeps numba's current setting; ``-1`` means all configured threads.
    """
    if n_jobs is None or n_jobs == -1:
        yield
        return
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive integer, -1 or None, got {n_jobs}")
    old = numba.get_num_threads()
    numba.set_num_threads(min(int(n_jobs), numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(old)
