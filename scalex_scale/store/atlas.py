"""The atlas: an AnnData Zarr store plus scalex-scale's versioned state (see DESIGN.md for the layout)."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from ._zarr_io import ELEMENT_CHUNK, ROW_CHUNK, create_1d, create_2d, swap_dirs
from .errors import AtlasFormatError

#: Version of our own state (``uns/scalex_scale``); bump on incompatible layout changes.
FORMAT_VERSION = 1
STATE_GROUP = "uns/scalex_scale"
JOURNAL_SUFFIX = ".scalex-journal.json"


def _zarr_settings():
    import anndata

    return anndata.settings.override(zarr_write_format=3)


def write_elem(group: zarr.Group, key: str, value: Any) -> None:
    """anndata's ``write_elem`` in zarr format 3 (replacing an existing element)."""
    from anndata.io import write_elem as _write

    if key in group:
        del group[key]
    with _zarr_settings(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        _write(group, key, value)


def read_elem(elem: Any) -> Any:
    from anndata.io import read_elem as _read

    return _read(elem)


class Atlas:
    """A scalex-scale atlas on disk.

    Open with :meth:`Atlas.open`; create with :func:`scalex_scale.store.ingest`. The object reads lazily: ``obs``
    and ``var`` are loaded on first use (they are small), ``X`` is read in row ranges.
    """

    def __init__(self, path: Path, root: zarr.Group, mode: str) -> None:
        self.path = path
        self.root = root
        self.mode = mode

    # ------------------------------------------------------------------ opening / creating
    @classmethod
    def open(cls, path: str | Path, mode: Literal["r", "r+"] = "r") -> Atlas:
        """Open an existing atlas, checking that scalex-scale wrote it with a known format version.

        In ``"r+"`` mode an interrupted append (a journal left by a killed process) is rolled back first.
        """
        path = Path(path)
        if not path.exists():
            raise AtlasFormatError(f"{path}: no such atlas")
        if (path / ".zgroup").exists() or (path / ".zarray").exists():
            raise AtlasFormatError(
                f"{path}: is a Zarr format 2 store written by another tool, not a scalex-scale atlas"
            )
        if not (path / "zarr.json").exists():
            raise AtlasFormatError(f"{path}: is not a Zarr store (no zarr.json), so not a scalex-scale atlas")
        if mode == "r+" and journal_path(path).exists():
            recover(path)
        try:
            root = zarr.open_group(str(path), mode=mode, use_consolidated=False)
        except Exception as err:
            raise AtlasFormatError(f"{path}: cannot be opened as a Zarr group: {err}") from err
        if STATE_GROUP not in root:
            raise AtlasFormatError(
                f"{path}: is not a scalex-scale atlas (no {STATE_GROUP}); "
                "ingest it into a new atlas instead: `scalex-scale ingest NEW_ATLAS {path}`"
            )
        version = root[STATE_GROUP].attrs.get("scalex_scale_format")
        if version != FORMAT_VERSION:
            raise AtlasFormatError(
                f"{path}: atlas format version {version!r} is not supported by this scalex-scale "
                f"(which reads version {FORMAT_VERSION})"
            )
        return cls(path, root, mode)

    @classmethod
    def create(cls, path: str | Path, var_names: pd.Index) -> Atlas:
        """Create an empty atlas (0 cells) with the given genes. ``path`` must not exist."""
        path = Path(path)
        root = zarr.open_group(str(path), mode="w-", zarr_format=3)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = root.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [0, len(var_names)]})
        create_1d(x, "data", np.float32, chunk=ELEMENT_CHUNK, encoding=False)
        create_1d(x, "indices", np.int32, chunk=ELEMENT_CHUNK, encoding=False)
        indptr = create_1d(x, "indptr", np.int64, chunk=ROW_CHUNK, encoding=False)
        indptr.resize((1,))
        indptr[0:1] = np.zeros(1, np.int64)
        write_elem(root, "obs", pd.DataFrame(index=pd.Index([], dtype=str)))
        write_elem(root, "var", pd.DataFrame(index=pd.Index(var_names, dtype=str)))
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(root, key, {})
        write_elem(root, "uns", {})
        state = root.create_group(STATE_GROUP)
        state.attrs.update(
            {"encoding-type": "dict", "encoding-version": "0.1.0", "scalex_scale_format": FORMAT_VERSION}
        )
        atlas = cls(path, root, "r+")
        atlas.write_state({"format_version": FORMAT_VERSION})
        return atlas

    # ------------------------------------------------------------------ basic shape
    @property
    def n_obs(self) -> int:
        return int(self.root["X"].attrs["shape"][0])

    @property
    def n_vars(self) -> int:
        return int(self.root["X"].attrs["shape"][1])

    @cached_property
    def obs(self) -> pd.DataFrame:
        return read_elem(self.root["obs"])

    @cached_property
    def var(self) -> pd.DataFrame:
        return read_elem(self.root["var"])

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    @cached_property
    def batch(self) -> pd.Categorical:
        """``obs['batch']``, read alone (not the whole obs: it is large at millions of cells)."""
        if "obs" in self.__dict__:
            return pd.Categorical(self.obs["batch"]) if "batch" in self.obs else pd.Categorical([])
        obs = self.root["obs"]
        return read_elem(obs["batch"]) if "batch" in obs else pd.Categorical([])

    @property
    def batch_categories(self) -> list[str]:
        return [str(c) for c in self.batch.categories]

    @property
    def batch_codes(self) -> np.ndarray:
        return np.asarray(self.batch.codes, dtype=np.int32)

    def refresh(self) -> None:
        """Forget cached obs/var after a write."""
        for key in ("obs", "var", "batch"):
            self.__dict__.pop(key, None)

    # ------------------------------------------------------------------ state JSON
    @property
    def state(self) -> dict[str, Any]:
        group = self.root[STATE_GROUP]
        if "state" not in group:
            return {"format_version": FORMAT_VERSION}
        return json.loads(str(read_elem(group["state"])))

    def write_state(self, state: dict[str, Any]) -> None:
        write_elem(self.root[STATE_GROUP], "state", json.dumps(state, sort_keys=True))

    def update_state(self, section: str, value: Any) -> None:
        state = self.state
        if value is None:
            state.pop(section, None)
        else:
            state[section] = value
        self.write_state(state)

    # ------------------------------------------------------------------ X access
    def _x(self, name: str) -> zarr.Array:
        return self.root["X"][name]

    @cached_property
    def indptr(self) -> np.ndarray:
        """Row pointers of X (n_obs + 1 int64: 8 MB per million cells)."""
        return np.asarray(self._x("indptr")[: self.n_obs + 1])

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw counts of rows ``[start, stop)`` as CSR float32."""
        ptr = self.indptr[start : stop + 1]
        a, b = int(ptr[0]), int(ptr[-1])
        data = np.asarray(self._x("data")[a:b])
        indices = np.asarray(self._x("indices")[a:b])
        return sp.csr_matrix((data, indices, ptr - a), shape=(stop - start, self.n_vars))

    def row_ranges(self, target_nnz: int = 4 * ELEMENT_CHUNK, max_rows: int = 50_000) -> list[tuple[int, int]]:
        """Split rows into contiguous ranges of about ``target_nnz`` stored values (balanced I/O)."""
        ptr = self.indptr
        n = self.n_obs
        if n == 0:
            return []
        bounds = [0]
        while bounds[-1] < n:
            start = bounds[-1]
            stop = int(np.searchsorted(ptr, ptr[start] + target_nnz, side="right")) - 1
            stop = min(max(stop, start + 1), start + max_rows, n)
            bounds.append(stop)
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def iter_rows(self, **kwargs: Any) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        for start, stop in self.row_ranges(**kwargs):
            yield start, stop, self.read_rows(start, stop)

    # ------------------------------------------------------------------ derived elements
    @property
    def has_training_matrix(self) -> bool:
        return f"{STATE_GROUP}/train" in self.root

    def training_matrix(self):
        """The preprocessed training matrix as a loader ``TrainingSource``."""
        from .training import TrainingMatrix

        if not self.has_training_matrix:
            raise AtlasFormatError(f"{self.path}: has no training matrix; run `scalex-scale preprocess {self.path}`")
        return TrainingMatrix(self.root[f"{STATE_GROUP}/train"], n_domains=len(self.batch_categories))

    def obs_column(self, name: str) -> Any:
        """One obs column, read alone (categorical, numeric or string array)."""
        if "obs" in self.__dict__:
            return self.obs[name].to_numpy() if name in self.obs else None
        obs = self.root["obs"]
        return read_elem(obs[name]) if name in obs else None

    def obsm_keys(self) -> list[str]:
        return sorted(self.root["obsm"].array_keys())

    def new_obsm_writer(self, key: str, n_cols: int, dtype=np.float32) -> zarr.Array:
        """A temporary (n_obs, n_cols) array; publish it with :meth:`publish_obsm`."""
        tmp = f"{key}__tmp"
        obsm = self.root["obsm"]
        if tmp in obsm:
            del obsm[tmp]
        arr = create_2d(obsm, tmp, dtype, n_cols, chunk_rows=ROW_CHUNK)
        arr.resize((self.n_obs, n_cols))
        return arr

    def publish_obsm(self, key: str) -> None:
        """Atomically replace ``obsm[key]`` by the temporary array written with :meth:`new_obsm_writer`."""
        base = self.path / "obsm"
        swap_dirs(base / f"{key}__tmp", base / key)
        self.consolidate()

    def write_obs_columns(self, columns: dict[str, Any]) -> None:
        """Add or replace obs columns without reading or rewriting the rest of obs.

        Each column is written aside and swapped in, then listed in ``column-order``: a failure leaves obs readable.
        """
        obs = self.root["obs"]
        for name, values in columns.items():
            if not isinstance(values, pd.Categorical | pd.api.extensions.ExtensionArray):
                values = np.asarray(values)
            if values.shape != (self.n_obs,):
                raise ValueError(f"obs column {name!r} has shape {values.shape}, expected ({self.n_obs},)")
            write_elem(obs, f"{name}__new", values)
            swap_dirs(self.path / "obs" / f"{name}__new", self.path / "obs" / name)
            order = list(obs.attrs.get("column-order", []))
            if name not in order:
                obs.attrs["column-order"] = order + [name]
        self.refresh()
        self.consolidate()

    def write_obs(self, obs: pd.DataFrame) -> None:
        write_elem(self.root, "obs__new", obs)
        swap_dirs(self.path / "obs__new", self.path / "obs")
        self.refresh()
        self.consolidate()

    def write_var(self, var: pd.DataFrame) -> None:
        write_elem(self.root, "var__new", var)
        swap_dirs(self.path / "var__new", self.path / "var")
        self.refresh()
        self.consolidate()

    def consolidate(self) -> None:
        """Refresh the consolidated metadata (so ``anndata.experimental.read_lazy`` opens it quietly)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
            zarr.consolidate_metadata(str(self.path))
        self.root = zarr.open_group(str(self.path), mode=self.mode, use_consolidated=False)
        self.__dict__.pop("indptr", None)

    # ------------------------------------------------------------------ summary
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: cells, genes, batches with counts, preprocessing/model state held."""
        obs = self.obs
        counts = obs["batch"].value_counts(sort=False) if "batch" in obs else pd.Series(dtype=int)
        state = self.state
        prep = state.get("preprocess")
        return {
            "path": str(self.path),
            "n_cells": self.n_obs,
            "n_genes": self.n_vars,
            "nnz": int(self.indptr[-1]),
            "batches": {str(k): int(v) for k, v in counts.items()},
            "obs_columns": [c for c in obs.columns],
            "obsm": self.obsm_keys(),
            "ingest": state.get("ingest"),
            "preprocess": None
            if prep is None
            else {
                "profile": prep.get("profile"),
                "n_features": len(prep.get("features", [])),
                "n_train": prep.get("n_train"),
                "n_obs_at_preprocess": prep.get("n_obs"),
            },
            "model": state.get("model"),
        }

    def summary(self) -> str:
        info = self.info()
        lines = [
            f"atlas      {info['path']}",
            f"cells      {info['n_cells']:,}",
            f"genes      {info['n_genes']:,}",
            f"stored     {info['nnz']:,} non-zero counts",
            f"batches    {len(info['batches'])}",
        ]
        for name, n in info["batches"].items():
            lines.append(f"  {name:<24} {n:>10,}")
        if info["preprocess"]:
            p = info["preprocess"]
            line = f"preprocess {p['profile']}: {p['n_features']:,} features, {p['n_train']:,} training cells"
            if p["n_obs_at_preprocess"] is not None and p["n_obs_at_preprocess"] != info["n_cells"]:
                line += f" ({info['n_cells'] - p['n_obs_at_preprocess']:,} cells added since)"
            lines.append(line)
        else:
            lines.append("preprocess none (run `scalex-scale preprocess`)")
        lines.append(f"obsm       {', '.join(info['obsm']) or 'none'}")
        model = info["model"]
        lines.append(f"model      {model.get('directory') if model else 'none'}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- journal (interrupted appends)
def journal_path(path: Path) -> Path:
    """The journal of an append in progress sits beside the store (Zarr lists no stray files then)."""
    return path.with_name(path.name + JOURNAL_SUFFIX)


def write_journal(path: Path, record: dict[str, Any]) -> None:
    tmp = journal_path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(journal_path(path))


def clear_journal(path: Path) -> None:
    journal_path(path).unlink(missing_ok=True)


def recover(path: Path) -> None:
    """Roll back an interrupted append: shrink X to its recorded size and drop half-written groups."""
    record = json.loads(journal_path(path).read_text())
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    x = root["X"]
    n_obs, nnz, n_vars = record["n_obs"], record["nnz"], record["n_vars"]
    x["data"].resize((nnz,))
    x["indices"].resize((nnz,))
    x["indptr"].resize((n_obs + 1,))
    x.attrs["shape"] = [n_obs, n_vars]
    for key in record.get("obsm", {}):
        arr = root["obsm"][key]
        arr.resize((n_obs,) + arr.shape[1:])
    for name in ("obs__new", "var__new"):
        if (path / name).exists():
            shutil.rmtree(path / name)
    for name in ("obs", "var"):
        old = path / f"{name}.__old__"
        if old.exists() and not (path / name).exists():
            old.replace(path / name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
        zarr.consolidate_metadata(str(path))
    clear_journal(path)
