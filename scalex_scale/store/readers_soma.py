"""TileDB-SOMA experiments (the CELLxGENE Census format) as an :class:`~scalex_scale.store.readers.InputSource`.

The counts of one measurement's X layer are streamed in row chunks: the obs ``soma_joinid``\\ s that match the
filter are read first (8 bytes a cell), then each block of ``chunk_rows`` joinids is read from X and obs with
the tiledbsoma query API, its joinids remapped to positions ``0..n-1`` and turned into one CSR chunk. The whole
matrix is never in memory.

Naming
------
- **Genes**: the measurement's var column ``feature_name`` when present (the Census' gene symbols, as .h5ad and
  10x inputs use), made unique the scanpy way (``-1``, ``-2``, ...) since symbols need not be; else
  ``var_id`` (what ``tiledbsoma.io.from_anndata`` writes the AnnData var names to); else the var
  ``soma_joinid``. ``var_key`` picks another column (e.g. the Census' Ensembl ``feature_id``).
- **Cells**: obs ``obs_id`` when present (``from_anndata``'s obs names), else the ``soma_joinid`` as a string.
  ``obs_id`` becomes the index; ``soma_joinid`` stays a column (as in ``cellxgene_census.get_anndata``), so
  every atlas cell can be traced back to its Census row.

``tiledbsoma`` is an optional dependency (``pip install "scalex-scale[soma]"``), imported only here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .readers import Chunk, InputSource, _check_names, _make_unique

SCHEME = "soma://"
INSTALL_HINT = 'pip install "scalex-scale[soma]" (or: pip install tiledbsoma)'
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TILEDB_GROUP = "__tiledb_group.tdb"
_OBS_NAME = "obs_id"
_VAR_NAMES = ("feature_name", "var_id")
_ID = "soma_joinid"
#: TileDB read settings that bound the memory of one chunk's read (each overridable through ``tiledb_config``):
#: tiledbsoma's defaults (one result buffer for the whole chunk, a 10 GB tile budget) peak higher, at the same
#: speed (figures: ``bench/README.md``, "Figures behind design choices").
READ_CONFIG: dict[str, str | float] = {"soma.init_buffer_bytes": 32 * 2**20, "sm.mem.total_budget": 128 * 2**20}


def is_soma_uri(obj: Any) -> bool:
    """Whether ``open_input`` should read ``obj`` as a SOMA experiment.

    The rule: a string starting ``soma://`` (the rest is any URI tiledbsoma opens: a local path, ``s3://``,
    ``tiledb://``); any other ``scheme://`` URI except ``file://`` (no other reader opens remote data); or a
    local directory holding a TileDB group (``__tiledb_group.tdb``), which every SOMA experiment is.
    """
    from pathlib import Path

    if isinstance(obj, str) and _URI.match(obj) and not obj.startswith("file://"):
        return True
    return isinstance(obj, str | Path) and Path(obj).is_dir() and (Path(obj) / _TILEDB_GROUP).exists()


def _strip_scheme(uri: str) -> str:
    return uri[len(SCHEME) :] if uri.startswith(SCHEME) else uri


def _import_tiledbsoma(name: str) -> Any:
    try:
        import tiledbsoma
    except ImportError as err:
        raise InputError(
            f"{name}: reading a TileDB-SOMA experiment needs the optional package tiledbsoma: {INSTALL_HINT}"
        ) from err
    return tiledbsoma


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.removeprefix("SOMAError: ")


def open_soma(
    uri: str,
    *,
    measurement: str = "RNA",
    layer: str = "raw",
    obs_filter: str | None = None,
    var_key: str | None = None,
    tiledb_config: Mapping[str, str | float] | None = None,
) -> InputSource:
    """Open a TileDB-SOMA experiment (e.g. a CELLxGENE Census release) as a streamed input.

    Parameters
    ----------
    uri
        The experiment's URI (local directory, ``s3://...``, ``tiledb://...``), optionally prefixed ``soma://``.
    measurement
        Measurement whose X layer holds the counts (the Census: ``"RNA"``).
    layer
        X layer to read (the Census' raw counts: ``"raw"``).
    obs_filter
        Keep only cells matching this tiledbsoma ``value_filter`` expression on obs columns, e.g.
        ``"tissue_general == 'blood' and is_primary_data == True"``.
    var_key
        var column with the gene names; default ``feature_name``, else ``var_id``, else ``soma_joinid``.
    tiledb_config
        TileDB configuration (e.g. ``{"vfs.s3.region": "us-west-2", "vfs.s3.no_sign_request": "true"}`` for
        the public Census bucket), over :data:`READ_CONFIG`.

    Returns
    -------
    InputSource
        Chunks in obs ``soma_joinid`` order. ``close()`` closes the experiment.
    """
    name = str(uri)
    soma = _import_tiledbsoma(name)
    uri = _strip_scheme(name)
    context = soma.SOMATileDBContext(tiledb_config={**READ_CONFIG, **(tiledb_config or {})})
    try:
        exp = soma.open(uri, mode="r", context=context)
    except soma.DoesNotExistError as err:
        raise InputError(f"{name}: no SOMA experiment there (not a TileDB group or array)") from err
    except Exception as err:  # unreadable metadata, bad credentials, ...
        raise InputError(f"{name}: cannot be opened as a SOMA experiment: {_first_line(err)}") from err
    try:
        if not isinstance(exp, soma.Experiment):
            raise InputError(f"{name}: is a SOMA {type(exp).__name__}, not an Experiment")
        return _experiment_source(soma, exp, name, measurement, layer, obs_filter, var_key)
    except BaseException:
        exp.close()
        raise


def _experiment_source(
    soma: Any, exp: Any, name: str, measurement: str, layer: str, obs_filter: str | None, var_key: str | None
) -> InputSource:
    measurements = sorted(exp.ms.keys()) if "ms" in exp else []
    if measurement not in measurements:
        raise InputError(f"{name}: no measurement {measurement!r} (measurements: {', '.join(measurements) or 'none'})")
    ms = exp.ms[measurement]
    layers = sorted(ms.X.keys()) if "X" in ms else []
    if layer not in layers:
        raise InputError(
            f"{name}: measurement {measurement!r} has no X layer {layer!r} (layers: {', '.join(layers) or 'none'})"
        )
    x = ms.X[layer]
    if not isinstance(x, soma.SparseNDArray):
        raise InputError(f"{name}: X layer {layer!r} is a {type(x).__name__}; only sparse X layers are supported")
    value_type = x.schema.field("soma_data").type
    if not _is_numeric(value_type):
        raise InputError(f"{name}: X layer {layer!r} has dtype {value_type}; numeric counts are required")
    var_names, var_ids = _var_names(ms.var, name, var_key)
    obs_ids = _filtered_joinids(exp.obs, name, obs_filter)
    reader = _BlockReader(name, exp.obs, x, var_ids)

    def chunks(chunk_rows: int) -> Iterator[tuple[Chunk, pd.DataFrame]]:
        for start in range(0, obs_ids.size, chunk_rows):
            yield reader.read(obs_ids[start : start + chunk_rows])

    return InputSource(name, var_names, chunks, int(obs_ids.size), exp.close)


def _is_numeric(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _var_names(var: Any, name: str, var_key: str | None) -> tuple[pd.Index, np.ndarray]:
    """Gene names in var ``soma_joinid`` order, and those joinids (sorted)."""
    columns = var.schema.names
    if var_key is not None and var_key not in columns:
        raise InputError(f"{name}: var has no column {var_key!r} for the gene names (columns: {', '.join(columns)})")
    key = var_key or next((c for c in _VAR_NAMES if c in columns), _ID)
    table = var.read(column_names=sorted({_ID, key})).concat()
    ids = table.column(_ID).to_numpy()
    order = np.argsort(ids, kind="stable")
    names = pd.Index(table.column(key).to_pandas().to_numpy()[order].astype(str))
    if key == "feature_name":
        names = _make_unique(names)
    return _check_names(names, name, "gene"), ids[order]


def _filtered_joinids(obs: Any, name: str, obs_filter: str | None) -> np.ndarray:
    """Sorted obs ``soma_joinid``\\ s of the cells matching ``obs_filter`` (all cells without one)."""
    try:
        table = obs.read(column_names=[_ID], value_filter=obs_filter).concat()
    except Exception as err:  # tiledbsoma raises SOMAError (or ValueError/TypeError) for bad expressions
        if obs_filter is None:
            raise InputError(f"{name}: obs cannot be read: {_first_line(err)}") from err
        raise InputError(
            f"{name}: bad obs filter {obs_filter!r}: {_first_line(err)} (obs columns: {', '.join(obs.schema.names)})"
        ) from err
    ids = np.sort(table.column(_ID).to_numpy())
    if ids.size == 0:
        what = f"obs filter {obs_filter!r} matches no cell" if obs_filter else "obs has no cells (empty input)"
        raise InputError(f"{name}: {what}")
    return ids


def _coords(ids: np.ndarray) -> slice | np.ndarray:
    """A SOMA coordinate for sorted unique joinids: an (inclusive) slice when contiguous, else the points."""
    if int(ids[-1]) - int(ids[0]) + 1 == ids.size:
        return slice(int(ids[0]), int(ids[-1]))
    return ids


class _BlockReader:
    """Reads one block of obs joinids: its CSR rows (positions ``0..n-1``) and its obs frame."""

    def __init__(self, name: str, obs: Any, x: Any, var_ids: np.ndarray) -> None:
        self.name, self.obs, self.x = name, obs, x
        self.var_ids, self.n_vars = var_ids, var_ids.size
        self.var_identity = bool(var_ids[0] == 0 and var_ids[-1] == var_ids.size - 1)  # joinids 0..n_vars-1
        self.dtype = x.schema.field("soma_data").type.to_pandas_dtype()

    def read(self, ids: np.ndarray) -> tuple[Chunk, pd.DataFrame]:
        try:
            matrix = self._matrix(ids)
            obs = self._obs(ids)
        except InputError:
            raise
        except Exception as err:
            raise InputError(
                f"{self.name}: cells with soma_joinid {int(ids[0])}-{int(ids[-1])} cannot be read: {_first_line(err)}"
            ) from err
        return matrix, obs

    def _matrix(self, ids: np.ndarray) -> sp.csr_matrix:
        coords = _coords(ids)
        rows, cols, vals = [], [], []
        for table in self.x.read((coords,)).tables():  # TileDB's batches: each turned into positions at once
            dim0 = table.column("soma_dim_0").to_numpy()
            dim1 = table.column("soma_dim_1").to_numpy()
            data = table.column("soma_data").to_numpy()
            del table
            local = dim0 - ids[0] if isinstance(coords, slice) else np.searchsorted(ids, dim0)
            if self.var_identity:
                col, keep = dim1, dim1 < self.n_vars
            else:
                col = np.searchsorted(self.var_ids, dim1)
                keep = self.var_ids[np.minimum(col, self.n_vars - 1)] == dim1
            if not keep.all():  # entries in columns that have no var row: not genes of this input
                local, col, data = local[keep], col[keep], data[keep]
            rows.append(local.astype(np.int32))
            cols.append(col.astype(np.int32))
            vals.append(data if data.flags.writeable else data.copy())  # Arrow's buffers are read-only
            del dim0, dim1, local, col, keep
        if not vals:
            return sp.csr_matrix((ids.size, self.n_vars), dtype=self.dtype)
        if len(vals) == 1:
            return _csr(rows[0], cols[0], vals[0], ids.size, self.n_vars)
        return _csr(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), ids.size, self.n_vars)

    def _obs(self, ids: np.ndarray) -> pd.DataFrame:
        frame = self.obs.read((_coords(ids),)).concat().to_pandas()
        frame = frame.sort_values(_ID, kind="stable").reset_index(drop=True)
        if frame.shape[0] != ids.size or not np.array_equal(frame[_ID].to_numpy(), ids):
            raise InputError(f"{self.name}: obs rows for soma_joinid {int(ids[0])}-{int(ids[-1])} do not match X")
        if _OBS_NAME in frame.columns:
            index = pd.Index(frame.pop(_OBS_NAME).astype(str).to_numpy(), dtype=object)
        else:
            index = pd.Index(frame[_ID].astype(str).to_numpy(), dtype=object)
        frame.index = _check_names(index, self.name, "cell")
        return frame


def _csr(rows: np.ndarray, cols: np.ndarray, data: np.ndarray, n_rows: int, n_cols: int) -> sp.csr_matrix:
    """CSR from the COO triplets of one block (no duplicates: they are coordinates of a sparse array).

    TileDB returns them in its global (tile) order: row-sorted for one column tile, otherwise sorted here by a
    linear-time bucket pass (scipy's COO to CSR), then columns sorted within rows.
    """
    if rows.size > 1 and np.any(rows[1:] < rows[:-1]):
        out = sp.coo_matrix((data, (rows, cols)), shape=(n_rows, n_cols)).tocsr()
    else:
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
        out = sp.csr_matrix((data, cols, indptr), shape=(n_rows, n_cols))
    out.sort_indices()
    return out
