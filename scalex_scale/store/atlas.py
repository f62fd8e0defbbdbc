"""The atlas: an AnnData Zarr store plus scalex-scale's versioned state (see DESIGN.md for the layout).

:meth:`Atlas.open` gives a read-only view of the last commit. Writes happen only inside a transaction
(:mod:`scalex_scale.store.txn`), on a writable :class:`Atlas` over the transaction's private copy.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .._fs import complete_publish, intent_path
from .._lock import WriterLock
from ._zarr_io import ELEMENT_CHUNK, ROW_CHUNK, create_1d, create_2d
from .errors import AtlasBusyError, AtlasFormatError

#: Version of our own state (``uns/scalex_scale``); bump on incompatible layout changes.
FORMAT_VERSION = 1
STATE_GROUP = "uns/scalex_scale"
#: The append journal of scalex-scale < 0.2 (in-place appends); its presence means an old, unsafe interruption.
LEGACY_JOURNAL_SUFFIX = ".scalex-journal.json"


def _zarr_settings():
    import anndata

    return anndata.settings.override(zarr_write_format=3)


def write_elem(group: zarr.Group, key: str, value: Any, chunks: tuple[int, ...] | None = None) -> None:
    """anndata's ``write_elem`` in zarr format 3 (replacing an existing element); ``chunks`` of its arrays."""
    from anndata.io import write_elem as _write

    if key in group:
        del group[key]
    with _zarr_settings(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        _write(group, key, value, dataset_kwargs={"chunks": chunks} if chunks else {})


def read_elem(elem: Any) -> Any:
    from anndata.io import read_elem as _read

    return _read(elem)


def _wait_for_publish(path: Path) -> None:
    """A two-rename publish (filesystems without an atomic exchange) hides the atlas for a moment; finish it."""
    for _ in range(100):
        if path.exists() or not intent_path(path).exists():
            return
        lock = WriterLock(path, "recover", timeout=0)
        try:
            with lock:
                complete_publish(path)  # its writer died between the renames: roll forward
            return
        except AtlasBusyError:
            time.sleep(0.05)  # the writer is finishing the publish right now


def _check_directory(path: Path, directory: Path) -> None:
    if not directory.exists():
        raise AtlasFormatError(f"{path}: no such atlas")
    if (directory / ".zgroup").exists() or (directory / ".zarray").exists():
        raise AtlasFormatError(
            f"{path}: is a Zarr format 2 store written by another tool, not a scalex-scale atlas; ingest it into a new "
            f"atlas instead: `scalex-scale ingest NEW_ATLAS {path}`"
        )
    if not (directory / "zarr.json").exists():
        raise AtlasFormatError(f"{path}: is not a Zarr store (no zarr.json), so not a scalex-scale atlas")
    legacy = path.with_name(path.name + LEGACY_JOURNAL_SUFFIX)
    if legacy.exists():
        raise AtlasFormatError(
            f"{path}: an append by an older scalex-scale was interrupted ({legacy.name} is present) and may have "
            f"left it inconsistent; run `scalex-scale check {path}` to see what is wrong"
        )


def _check_root(path: Path, root: zarr.Group) -> None:
    if STATE_GROUP not in root:
        raise AtlasFormatError(
            f"{path}: is not a scalex-scale atlas (no {STATE_GROUP}); "
            f"ingest it into a new atlas instead: `scalex-scale ingest NEW_ATLAS {path}`"
        )
    version = root[STATE_GROUP].attrs.get("scalex_scale_format")
    if version != FORMAT_VERSION:
        raise AtlasFormatError(
            f"{path}: atlas format version {version!r} is not supported by this scalex-scale "
            f"(which reads version {FORMAT_VERSION})"
        )


class Atlas:
    """A scalex-scale atlas on disk.

    Open the last commit with :meth:`Atlas.open` (read-only); write inside :func:`scalex_scale.store.transaction`.
    The object reads lazily: ``obs`` and ``var`` are loaded on first use (they are small), ``X`` is read in row
    ranges.

    Attributes
    ----------
    path
        The atlas' path (what messages name).
    directory
        Where its files are: ``path`` itself, or a transaction's private copy.
    writable
        True inside a transaction.
    """

    def __init__(self, path: Path, directory: Path, root: zarr.Group, *, writable: bool = False) -> None:
        self.path = path
        self.directory = directory
        self.root = root
        self.writable = writable
        #: State changes of a transaction, written once when it commits (:meth:`flush_state`).
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ opening / creating
    @classmethod
    def open(cls, path: str | Path) -> Atlas:
        """Open the last commit of an atlas (read-only), checking that scalex-scale wrote it."""
        path = Path(path)
        _wait_for_publish(path)
        return cls._open_directory(path, path)

    @classmethod
    def _open_directory(cls, path: Path, directory: Path, store: Any = None) -> Atlas:
        _check_directory(path, directory)
        try:
            if store is None:
                root = zarr.open_group(str(directory), mode="r", use_consolidated=False)
            else:
                root = zarr.open_group(store=store, mode="r+", use_consolidated=False)
        except Exception as err:
            raise AtlasFormatError(f"{path}: cannot be opened as a Zarr group: {err}") from err
        _check_root(path, root)
        atlas = cls(path, directory, root, writable=store is not None)
        atlas.state  # noqa: B018 - parses and checks the state JSON now
        return atlas

    @classmethod
    def _from_directory(cls, path: Path, directory: Path, *, store: Any) -> Atlas:
        return cls._open_directory(path, directory, store)

    @classmethod
    def _create(cls, path: Path, directory: Path, store: Any, var_names: Sequence[str]) -> Atlas:
        """Write an empty atlas (0 cells, these genes) into ``directory`` (a transaction's private copy)."""
        root = zarr.open_group(store=store, mode="w-", zarr_format=3)
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
        atlas = cls(path, directory, root, writable=True)
        atlas.write_state({"format_version": FORMAT_VERSION, "generation": 0})
        atlas.flush_state()
        return atlas

    def _require_writable(self) -> None:
        if not self.writable:
            raise RuntimeError(f"{self.path}: opened read-only; write inside scalex_scale.store.transaction()")

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
        for key in ("obs", "var", "batch", "indptr"):
            self.__dict__.pop(key, None)

    # ------------------------------------------------------------------ state JSON
    @property
    def state(self) -> dict[str, Any]:
        """The state record (``uns/scalex_scale/state``), checked: valid JSON of a known ``format_version``.

        A copy: change it and pass it to :meth:`write_state` (inside a transaction).
        """
        if self._pending_state is not None:
            return json.loads(json.dumps(self._pending_state))
        group = self.root[STATE_GROUP]
        if "state" not in group:
            return {"format_version": FORMAT_VERSION, "generation": 0}
        where = f"{self.path}/{STATE_GROUP}/state"
        try:
            state = json.loads(str(read_elem(group["state"])))
        except (ValueError, TypeError) as err:
            raise AtlasFormatError(f"{where}: is not valid JSON ({err}); run `scalex-scale check {self.path}`") from err
        if not isinstance(state, dict):
            raise AtlasFormatError(f"{where}: is not a JSON object; run `scalex-scale check {self.path}`")
        version = state.get("format_version")
        if version != FORMAT_VERSION:
            raise AtlasFormatError(
                f"{where}: state format_version {version!r} is not supported by this scalex-scale "
                f"(which reads version {FORMAT_VERSION})"
            )
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace the state (kept in memory; written once by :meth:`flush_state` when the transaction commits)."""
        self._require_writable()
        self._pending_state = json.loads(json.dumps(state))

    def flush_state(self) -> None:
        if self._pending_state is not None:
            write_elem(self.root[STATE_GROUP], "state", json.dumps(self._pending_state, sort_keys=True))
            self._pending_state = None

    def update_state(self, section: str, value: Any) -> None:
        state = self.state
        if value is None:
            state.pop(section, None)
        else:
            state[section] = value
        self.write_state(state)

    @property
    def generation(self) -> int:
        """Commits so far (bumped by every transaction)."""
        return int(self.state.get("generation", 0))

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

    @contextmanager
    def pinned_training_matrix(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        """``(TrainingMatrix, state)`` of a frozen snapshot: a re-preprocess while it is used cannot change it."""
        from .training import TrainingMatrix
        from .txn import pinned

        if not self.has_training_matrix:
            raise AtlasFormatError(f"{self.path}: has no training matrix; run `scalex-scale preprocess {self.path}`")
        with pinned(self.path, [STATE_GROUP]) as pin:
            group = zarr.open_group(str(pin / STATE_GROUP), mode="r", use_consolidated=False)
            state = json.loads(str(read_elem(group["state"])))
            n_domains = len((state.get("preprocess") or {}).get("batches", self.batch_categories))
            yield TrainingMatrix(group["train"], n_domains=n_domains), state

    def obs_column(self, name: str) -> Any:
        """One obs column, read alone (categorical, numeric or string array)."""
        if "obs" in self.__dict__:
            return self.obs[name].to_numpy() if name in self.obs else None
        obs = self.root["obs"]
        return read_elem(obs[name]) if name in obs else None

    def obs_columns(self) -> list[str]:
        return [str(c) for c in self.root["obs"].attrs.get("column-order", [])]

    def obsm_keys(self) -> list[str]:
        return sorted(self.root["obsm"].array_keys())

    # ------------------------------------------------------------------ writes (inside a transaction)
    def obsm_writer(self, key: str, n_cols: int, dtype=np.float32) -> zarr.Array:
        """A new (n_obs, n_cols) ``obsm[key]`` (replacing any existing one), to be filled by the caller."""
        self._require_writable()
        obsm = self.root["obsm"]
        if key in obsm:
            del obsm[key]
        arr = create_2d(obsm, key, dtype, n_cols, chunk_rows=ROW_CHUNK)
        arr.resize((self.n_obs, n_cols))
        return arr

    def write_obs_columns(self, columns: dict[str, Any]) -> None:
        """Add or replace obs columns without reading or rewriting the rest of obs (written in chunks of
        ``ROW_CHUNK`` rows, as ingest writes obs, so a reader of a row block reads only its chunks)."""
        self._require_writable()
        obs = self.root["obs"]
        for name, values in columns.items():
            if not isinstance(values, pd.Categorical | pd.api.extensions.ExtensionArray):
                values = np.asarray(values)
            if values.shape != (self.n_obs,):
                raise ValueError(f"obs column {name!r} has shape {values.shape}, expected ({self.n_obs},)")
            write_elem(obs, name, values, chunks=(ROW_CHUNK,))
            order = list(obs.attrs.get("column-order", []))
            if name not in order:
                obs.attrs["column-order"] = order + [name]
        self.refresh()

    def write_obs(self, obs: pd.DataFrame) -> None:
        self._require_writable()
        write_elem(self.root, "obs", obs)
        self.refresh()

    def write_var(self, var: pd.DataFrame) -> None:
        self._require_writable()
        write_elem(self.root, "var", var)
        self.refresh()

    def consolidate(self) -> None:
        """Refresh the consolidated metadata (so ``anndata.experimental.read_lazy`` opens it quietly)."""
        self._require_writable()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
            zarr.consolidate_metadata(self.root.store)
        self.root = zarr.open_group(store=self.root.store, mode="r+", use_consolidated=False)
        self.refresh()

    # ------------------------------------------------------------------ summary
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: cells, genes, batches with counts, preprocessing/model state held."""
        counts = pd.Series(self.batch).value_counts(sort=False) if self.n_obs else pd.Series(dtype=int)
        state = self.state
        prep = state.get("preprocess")
        return {
            "path": str(self.path),
            "n_cells": self.n_obs,
            "n_genes": self.n_vars,
            "nnz": int(self.indptr[-1]),
            "generation": int(state.get("generation", 0)),
            "batches": {str(k): int(v) for k, v in counts.items()},
            "obs_columns": self.obs_columns(),
            "obsm": self.obsm_keys(),
            "ingest": state.get("ingest"),
            "preprocess": None
            if prep is None
            else {
                "profile": prep.get("profile"),
                "n_features": len(prep.get("features", [])),
                "n_train": prep.get("n_train"),
                "n_obs_at_preprocess": prep.get("n_obs"),
                "train_id": prep.get("train_id"),
            },
            "model": state.get("model"),
            "latent": state.get("latent"),
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
        lines.append(f"obs        {', '.join(info['obs_columns']) or 'none'}")
        lines.append(f"obsm       {', '.join(info['obsm']) or 'none'}")
        model = info["model"]
        lines.append(f"model      {model.get('directory') if model else 'none'}")
        latent = info["latent"]
        if latent:
            lines.append(f"latent     by model {latent.get('directory')}")
        lines.append(f"commits    {info['generation']}")
        return "\n".join(lines)
