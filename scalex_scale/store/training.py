"""The preprocessed training matrix (``uns/scalex_scale/train``): its one owner, writer and reader.

Layout (a group of anndata "array" elements, so ``read_lazy`` keeps them lazy)::

    data     float16 (nnz,)        scaled [0, 1] values of the selected features
    indices  uint16  (nnz,)        feature index into the selected-feature list (int32 above 65,536 features)
    indptr   int64   (n_train+1,)
    cells    int64   (n_train,)    atlas row of each training row (the stored permutation)
    batch    int32   (n_train,)    batch code of each training row
    attrs    n_features, n_rows, id (names this matrix: the preprocessing record and checkpoints refer to it)

Rows are written in a uniformly random order, out-of-core, by a two-level shuffle: every row goes to one of
``n_buckets`` spill files chosen uniformly at random; each bucket is then loaded alone, shuffled in memory, and
appended. With independent uniform bucket choices the result is a uniformly random permutation, and memory is
bounded by one bucket (``bucket_values`` stored values).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .._faults import point
from ._zarr_io import ELEMENT_CHUNK, ROW_CHUNK, Appender, create_1d

GROUP = "train"
_FIELDS = {"data": np.float16, "indices": np.uint16, "lengths": np.int32, "cells": np.int64, "batch": np.int32}


def index_dtype(n_features: int) -> type:
    return np.uint16 if n_features <= np.iinfo(np.uint16).max + 1 else np.int32


class TrainingMatrix:
    """Row-range reads of the compact, pre-permuted training matrix.

    Implements the ``TrainingSource`` protocol of :mod:`scalex_scale.data.loader`.
    """

    def __init__(self, group: zarr.Group, n_domains: int) -> None:
        self.group = group
        self.n_rows = int(group["indptr"].shape[0]) - 1
        self.n_features = int(group.attrs["n_features"])
        self.n_domains = int(n_domains)
        self.id = group.attrs.get("id")
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

    @property
    def nnz(self) -> int:
        return int(self._indptr[-1])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ptr = self._indptr[start : stop + 1]
        a, b = int(ptr[0]), int(ptr[-1])
        return (
            ptr - a,
            np.asarray(self._indices[a:b]),
            np.asarray(self._data[a:b]),
            np.asarray(self._batch[start:stop]),
        )


class PermutedWriter:
    """Accumulate CSR rows from any order; :meth:`finish` writes them permuted as the atlas' training matrix.

    Parameters
    ----------
    spill_dir
        Scratch directory (created; removed by :meth:`finish` / :meth:`abort`). A writer's temporary: put it
        beside the atlas (``.ATLAS.spill-<id>``) so that a crashed run's spill is removed by the next writer.
    expected_values
        Estimate of the total number of stored values, to size the buckets.
    rng
        Source of the permutation (recorded by the caller as a seed).
    bucket_values
        Stored values per bucket held in memory at once (default 2**23: ~150 MB peak while shuffling).
    n_features
        Width of the matrix (chooses uint16 or int32 feature indices).
    """

    def __init__(
        self,
        spill_dir: Path,
        expected_values: int,
        rng: np.random.Generator,
        *,
        n_features: int,
        bucket_values: int = 1 << 23,
    ) -> None:
        self.dir = Path(spill_dir)
        self.dir.mkdir(parents=True, exist_ok=False)
        self.n_buckets = max(1, math.ceil(expected_values / bucket_values))
        self.rng = rng
        self.n_features = int(n_features)
        self.dtypes = {**_FIELDS, "indices": index_dtype(n_features)}
        self._files = {
            (b, f): open(self.dir / f"{b}.{f}", "wb") for b in range(self.n_buckets) for f in self.dtypes
        }
        self.n_rows = 0

    def add(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, cells: np.ndarray, batch: np.ndarray) -> None:
        """Add rows (CSR pieces with ``indptr`` starting at 0) with their atlas row and batch code."""
        n = cells.shape[0]
        if n == 0:
            return
        point("spill.write", str(self.dir))
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

    def finish(self, atlas: Any, identity: dict[str, Any]) -> str:
        """Write the shuffled rows as ``uns/scalex_scale/train`` of a writable atlas (replacing any earlier one).

        ``identity`` (JSON-able: what the matrix was made from) and the content's size give the matrix its id,
        returned and stored in the group's attributes.
        """
        from .atlas import STATE_GROUP

        for fh in self._files.values():
            fh.close()
        parent = atlas.root[STATE_GROUP]
        if GROUP in parent:
            del parent[GROUP]
        group = parent.create_group(GROUP)
        group.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
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
        digest = hashlib.blake2b(digest_size=8)
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
            digest.update(load["cells"][order].tobytes())
            offset += int(lengths.sum())
        for app in out.values():
            app.flush()
        digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
        digest.update(np.asarray([self.n_rows, offset, self.n_features], np.int64).tobytes())
        train_id = digest.hexdigest()
        group.attrs.update({"n_features": self.n_features, "n_rows": int(self.n_rows), "id": train_id})
        shutil.rmtree(self.dir, ignore_errors=True)
        return train_id

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
