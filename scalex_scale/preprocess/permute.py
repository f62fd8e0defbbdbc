"""Write the training matrix in a uniformly random row order, out-of-core.

Two-level shuffle: every row goes to one of ``n_buckets`` spill files chosen uniformly at random; each bucket
is then loaded alone, shuffled in memory, and appended. With independent uniform bucket choices the result is
a uniformly random permutation, and memory is bounded by one bucket (``bucket_values`` stored values).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import zarr

from ..store._zarr_io import ELEMENT_CHUNK, ROW_CHUNK, Appender, create_1d

_FIELDS = {"data": np.float16, "indices": np.uint16, "lengths": np.int32, "cells": np.int64, "batch": np.int32}


class PermutedWriter:
    """Accumulate CSR rows from any order; :meth:`finish` writes them permuted into a zarr group.

    Parameters
    ----------
    spill_dir
        Scratch directory (created; removed by :meth:`finish` / :meth:`abort`).
    expected_values
        Estimate of the total number of stored values, to size the buckets.
    rng
        Source of the permutation (recorded by the caller as a seed).
    bucket_values
        Stored values per bucket held in memory at once (default 2**23: ~150 MB peak while shuffling).
    index_dtype
        ``uint16`` when there are at most 65,536 features, else ``int32``.
    """

    def __init__(
        self,
        spill_dir: Path,
        expected_values: int,
        rng: np.random.Generator,
        *,
        bucket_values: int = 1 << 23,
        index_dtype: type = np.uint16,
    ) -> None:
        self.dir = Path(spill_dir)
        self.dir.mkdir(parents=True, exist_ok=False)
        self.n_buckets = max(1, math.ceil(expected_values / bucket_values))
        self.rng = rng
        self.dtypes = {**_FIELDS, "indices": index_dtype}
        self._files = {
            (b, f): open(self.dir / f"{b}.{f}", "wb") for b in range(self.n_buckets) for f in self.dtypes
        }
        self.n_rows = 0

    def add(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, cells: np.ndarray, batch: np.ndarray) -> None:
        """Add rows (CSR pieces with ``indptr`` starting at 0) with their atlas row and batch code."""
        n = cells.shape[0]
        if n == 0:
            return
        bucket = self.rng.integers(0, self.n_buckets, size=n)
        lengths = np.diff(indptr).astype(np.int32)
        value_bucket = np.repeat(bucket, lengths)
        for b in range(self.n_buckets):
            rows = bucket == b
            if not rows.any():
                continue
            vals = value_bucket == b
            pieces = {
                "data": data[vals],
                "indices": indices[vals],
                "lengths": lengths[rows],
                "cells": cells[rows],
                "batch": batch[rows],
            }
            for f, arr in pieces.items():
                self._files[(b, f)].write(np.ascontiguousarray(arr, dtype=self.dtypes[f]).tobytes())
        self.n_rows += n

    def finish(self, group: zarr.Group, n_features: int) -> None:
        """Shuffle each bucket in memory and append it to ``group`` (arrays data/indices/indptr/cells/batch)."""
        for fh in self._files.values():
            fh.close()
        arrays = {
            "data": create_1d(group, "data", np.float16, chunk=ELEMENT_CHUNK),
            "indices": create_1d(group, "indices", self.dtypes["indices"], chunk=ELEMENT_CHUNK),
            "indptr": create_1d(group, "indptr", np.int64, chunk=ROW_CHUNK),
            "cells": create_1d(group, "cells", np.int64, chunk=ROW_CHUNK),
            "batch": create_1d(group, "batch", np.int32, chunk=ROW_CHUNK),
        }
        out = {k: Appender(a) for k, a in arrays.items()}
        out["indptr"].append(np.zeros(1, np.int64))
        offset = 0
        for b in range(self.n_buckets):
            load = {f: np.fromfile(self.dir / f"{b}.{f}", dtype=dt) for f, dt in self.dtypes.items()}
            n = load["cells"].shape[0]
            if n == 0:
                continue
            order = self.rng.permutation(n)
            starts = np.concatenate([[0], np.cumsum(load["lengths"], dtype=np.int64)])
            lengths = load["lengths"][order].astype(np.int64)
            gather = _gather_index(starts[order], lengths)
            out["data"].append(load["data"][gather])
            out["indices"].append(load["indices"][gather])
            out["indptr"].append(offset + np.cumsum(lengths))
            out["cells"].append(load["cells"][order])
            out["batch"].append(load["batch"][order])
            offset += int(lengths.sum())
        for app in out.values():
            app.flush()
        group.attrs.update({"n_features": int(n_features), "n_rows": int(self.n_rows)})
        shutil.rmtree(self.dir, ignore_errors=True)

    def abort(self) -> None:
        for fh in self._files.values():
            fh.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat value positions of rows starting at ``starts`` with ``lengths`` (vectorised, no Python loop)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - row_offsets, lengths) + np.arange(total, dtype=np.int64)
