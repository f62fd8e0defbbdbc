"""The preprocessed training matrix (``uns/scalex_scale/train``) as a loader ``TrainingSource``."""

from __future__ import annotations

import numpy as np
import zarr


class TrainingMatrix:
    """Row-range reads of the compact, pre-permuted training matrix.

    Implements the ``TrainingSource`` protocol of :mod:`scalex_scale.data.loader`.
    """

    def __init__(self, group: zarr.Group, n_domains: int) -> None:
        self.group = group
        self.n_rows = int(group["indptr"].shape[0]) - 1
        self.n_features = int(group.attrs["n_features"])
        self.n_domains = int(n_domains)
        self._indptr = np.asarray(group["indptr"][:])
        self._data = group["data"]
        self._indices = group["indices"]
        self._batch = group["batch"]

    @property
    def cells(self) -> np.ndarray:
        """Atlas row of each training row (the stored permutation)."""
        return np.asarray(self.group["cells"][:])

    @property
    def domains(self) -> np.ndarray:
        return np.asarray(self._batch[:])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ptr = self._indptr[start : stop + 1]
        a, b = int(ptr[0]), int(ptr[-1])
        return (
            ptr - a,
            np.asarray(self._indices[a:b]),
            np.asarray(self._data[a:b]),
            np.asarray(self._batch[start:stop]),
        )
