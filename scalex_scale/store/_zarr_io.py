"""Low-level Zarr helpers: array creation with our codecs, chunk-aligned appends."""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import BloscCodec

#: Elements per chunk of the 1-D CSR arrays (data/indices): 4 MiB of float32.
ELEMENT_CHUNK = 1 << 20
#: Rows per chunk of indptr and per-row arrays.
ROW_CHUNK = 1 << 16


def _compressor(dtype: np.dtype) -> BloscCodec:
    shuffle = "bitshuffle" if np.dtype(dtype).itemsize <= 2 else "shuffle"
    return BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)


def create_1d(group: zarr.Group, name: str, dtype, *, chunk: int, encoding: bool = True) -> zarr.Array:
    """Create an empty, growable 1-D array (an anndata "array" element when ``encoding``)."""
    arr = group.create_array(
        name, shape=(0,), chunks=(chunk,), dtype=np.dtype(dtype), compressors=_compressor(dtype)
    )
    if encoding:
        arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return arr


def create_2d(group: zarr.Group, name: str, dtype, n_cols: int, *, chunk_rows: int = ROW_CHUNK) -> zarr.Array:
    arr = group.create_array(
        name,
        shape=(0, n_cols),
        chunks=(chunk_rows, n_cols),
        dtype=np.dtype(dtype),
        compressors=_compressor(dtype),
    )
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return arr


class Appender:
    """Append to a growable zarr array in whole chunks, so each chunk is written once.

    The pending tail (less than one chunk) is kept in memory until :meth:`flush`.
    Memory: at most about two chunks per array.
    """

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.length = array.shape[0]
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self._chunk = array.chunks[0]
        # Realign to a chunk boundary: the partial last chunk is re-read once and rewritten whole.
        start = (self.length // self._chunk) * self._chunk
        if start < self.length:
            self._pending.append(np.asarray(array[start : self.length]))
            self._n_pending = self.length - start
        self._written = start

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.array.dtype)
        if values.shape[0] == 0:
            return
        self._pending.append(values)
        self._n_pending += values.shape[0]
        self.length += values.shape[0]
        if self._n_pending >= self._chunk:
            self._write(full_only=True)

    def _write(self, *, full_only: bool) -> None:
        block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n = (block.shape[0] // self._chunk) * self._chunk if full_only else block.shape[0]
        if n == 0:
            return
        end = self._written + n
        if self.array.shape[0] < end:
            self.array.resize((end,) + self.array.shape[1:])
        self.array[self._written : end] = block[:n]
        self._written = end
        rest = block[n:]
        self._pending = [rest] if rest.shape[0] else []
        self._n_pending = rest.shape[0]

    def flush(self) -> None:
        if self._n_pending:
            self._write(full_only=False)
        if self.array.shape[0] != self.length:
            self.array.resize((self.length,) + self.array.shape[1:])
