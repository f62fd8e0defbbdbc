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
bounded by the writer's pending buffer (``flush_values`` stored values, written out per bucket in one record
each) and then by one bucket (``bucket_values`` stored values).
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
        Stored values per bucket held in memory at once (default 2**23: ~150 MB peak while shuffling). Raised
        where the buckets would need more open files than the process may hold (see :func:`max_open_buckets`).
    n_features
        Width of the matrix (chooses uint16 or int32 feature indices).
    flush_values
        Stored values held in the pending buffer before it is written out (default 2**22: ~20 MB of pending
        fields with uint16 indices, ~30 MB with int32 ones, and about twice that while one flush regroups them).
        Any value gives the same matrix; smaller ones give more, shorter spill records.

    :meth:`add` only draws each row's bucket and appends the rows to a pending buffer; once ``flush_values``
    values are pending (and at :meth:`finish`) they are written out, grouped by bucket with one stable sort, as
    one record per non-empty bucket. Each bucket is one spill file of such records (at most one per flush): a
    header ``[rows, values]`` (int64) then the rows' lengths, atlas rows and batch codes and the values' feature
    indices and data. Rows keep the order they were added in within a bucket, so the result does not depend on
    ``flush_values`` or on how the rows were fed, and the number of writes grows with the flushes, not with
    (chunks x buckets): the whole write stays linear in the number of cells. Memory: the pending buffer, then one
    bucket at a time while shuffling.
    """

    def __init__(
        self,
        spill_dir: Path,
        expected_values: int,
        rng: np.random.Generator,
        *,
        n_features: int,
        bucket_values: int = 1 << 23,
        flush_values: int = 1 << 22,
    ) -> None:
        if flush_values < 1:
            raise ValueError(f"flush_values must be at least 1, got {flush_values}")
        self.dir = Path(spill_dir)
        wanted = n_buckets(expected_values, bucket_values, 1 << 62)
        self.n_buckets = n_buckets(expected_values, bucket_values, max_open_buckets(wanted))
        self.rng = rng
        self.n_features = int(n_features)
        self.flush_values = int(flush_values)
        self.dtypes = {**_FIELDS, "indices": index_dtype(n_features)}
        self._bucket_dtype = np.uint16 if self.n_buckets <= 1 << 16 else np.int32
        self.dir.mkdir(parents=True, exist_ok=False)
        self._files = [open(self.dir / f"{b}.spill", "wb") for b in range(self.n_buckets)]
        self._pending: dict[str, list[np.ndarray]] = {f: [] for f in (*_ROW_FIELDS, *_VALUE_FIELDS, "bucket")}
        self._pending_values = 0
        self.n_rows = 0
        self.n_flushes = 0  #: flushes that wrote rows (each writes at most one record per bucket)

    def add(
        self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, cells: np.ndarray, batch: np.ndarray
    ) -> None:
        """Add rows (CSR pieces with ``indptr`` starting at 0) with their atlas row and batch code.

        The pieces are copied: the caller may reuse its arrays.
        """
        n = cells.shape[0]
        if n == 0:
            return
        bucket = self.rng.integers(0, self.n_buckets, size=n)
        lo, hi = int(indptr[0]), int(indptr[-1])
        pieces = {"lengths": np.diff(indptr), "cells": cells, "batch": batch, "bucket": bucket,
                  "indices": indices[lo:hi], "data": data[lo:hi]}  # fmt: skip
        dtypes = {**self.dtypes, "bucket": self._bucket_dtype}
        for f, a in pieces.items():
            self._pending[f].append(np.array(a, dtype=dtypes[f]))  # a copy
        self._pending_values += hi - lo
        self.n_rows += n
        if self._pending_values >= self.flush_values:
            self._flush()

    def _flush(self) -> None:
        """Write the pending rows: one record per non-empty bucket, rows in the order they were added."""
        if not self._pending["bucket"]:
            return
        pending = {f: np.concatenate(p) for f, p in self._pending.items()}
        self._pending = {f: [] for f in self._pending}
        self._pending_values = 0
        point("spill.write", str(self.dir))
        bucket = pending.pop("bucket")
        order = np.argsort(bucket, kind="stable")  # rows keep their order within a bucket
        counts = np.bincount(bucket, minlength=self.n_buckets)
        del bucket
        lengths = pending["lengths"].astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        gather = _gather_index(starts[order], lengths[order])
        del starts, lengths
        out = {f: pending[f][order] for f in _ROW_FIELDS}
        out.update({f: pending[f][gather] for f in _VALUE_FIELDS})
        del pending, order, gather
        row_end = np.cumsum(counts)
        value_cum = np.concatenate([[0], np.cumsum(out["lengths"], dtype=np.int64)])
        for b in np.flatnonzero(counts):
            r0, r1 = int(row_end[b] - counts[b]), int(row_end[b])
            v0, v1 = int(value_cum[r0]), int(value_cum[r1])
            record = [np.asarray([r1 - r0, v1 - v0], np.int64)]
            record += [out[f][r0:r1] for f in _ROW_FIELDS] + [out[f][v0:v1] for f in _VALUE_FIELDS]
            self._files[b].write(b"".join(record))
        self.n_flushes += 1

    def _load(self, b: int) -> dict[str, np.ndarray]:
        """Bucket ``b``'s records, each field concatenated in the order the rows were added."""
        raw = np.fromfile(self.dir / f"{b}.spill", dtype=np.uint8)
        parts: dict[str, list[np.ndarray]] = {f: [] for f in self.dtypes}
        pos = 0
        while pos < raw.shape[0]:
            rows, values = (int(v) for v in raw[pos : pos + 16].view(np.int64))
            pos += 16
            for f in _ROW_FIELDS + _VALUE_FIELDS:
                dt = np.dtype(self.dtypes[f])
                count = rows if f in _ROW_FIELDS else values
                parts[f].append(raw[pos : pos + count * dt.itemsize].view(dt))
                pos += count * dt.itemsize
        return {f: np.concatenate(p) if p else np.zeros(0, self.dtypes[f]) for f, p in parts.items()}

    def finish(self, atlas: Any, identity: dict[str, Any]) -> str:
        """Write the shuffled rows as ``uns/scalex_scale/train`` of a writable atlas (replacing any earlier one).

        ``identity`` (JSON-able: what the matrix was made from) and the content's size give the matrix its id,
        returned and stored in the group's attributes.
        """
        from .atlas import STATE_GROUP

        self._flush()
        for fh in self._files:
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
            load = self._load(b)
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
            del load
        for app in out.values():
            app.flush()
        digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
        digest.update(np.asarray([self.n_rows, offset, self.n_features], np.int64).tobytes())
        train_id = digest.hexdigest()
        group.attrs.update({"n_features": self.n_features, "n_rows": int(self.n_rows), "id": train_id})
        shutil.rmtree(self.dir, ignore_errors=True)
        return train_id

    def abort(self) -> None:
        """Discard the pending rows and the spill."""
        self._pending = {f: [] for f in self._pending}
        self._pending_values = 0
        for fh in self._files:
            fh.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_ROW_FIELDS = ("lengths", "cells", "batch")
_VALUE_FIELDS = ("indices", "data")

#: Open files kept free for everything else the process holds (the store's own chunk files, sockets, logs).
FD_RESERVE = 256


def max_open_buckets(needed: int = 0) -> int:
    """Spill files the writer may hold open at once: the soft open-file limit less :data:`FD_RESERVE` (at least
    16). Only when ``needed`` files would not fit under it is the process' soft limit raised, as far as needed and
    the hard limit allow (a small atlas leaves the limit alone)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = needed + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < want:
            target = want if hard == resource.RLIM_INFINITY else min(want, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        limit = soft if soft != resource.RLIM_INFINITY else 1 << 16
    except ImportError:  # not POSIX
        limit = 512
    return max(16, int(limit) - FD_RESERVE)


def n_buckets(expected_values: int, bucket_values: int, max_buckets: int) -> int:
    """Buckets of at most ``bucket_values`` values each, unless that needs more than ``max_buckets`` open files:
    then ``max_buckets`` larger buckets (memory per bucket grows rather than the write failing)."""
    return max(1, min(math.ceil(expected_values / bucket_values), max_buckets))


def _gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat value positions of rows starting at ``starts`` with ``lengths`` (vectorised, no Python loop)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - row_offsets, lengths) + np.arange(total, dtype=np.int64)
