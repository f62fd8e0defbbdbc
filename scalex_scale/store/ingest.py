"""Out-of-core ingest: stream inputs in row chunks into a new atlas, or append them as new batches."""

from __future__ import annotations

import logging
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._zarr_io import Appender
from .atlas import Atlas, clear_journal, recover, write_journal
from .errors import InputError
from .readers import InputSource, open_input

log = logging.getLogger(__name__)

Join = Literal["inner", "outer"]
Profile = Literal["RNA", "ATAC"]


@dataclass(frozen=True)
class IngestReport:
    """What an ingest did (returned to the caller, printed by the CLI)."""

    path: str
    n_cells_added: int
    batches_added: dict[str, int]
    n_genes: int
    genes_missing: dict[str, int]
    genes_dropped: dict[str, int]
    cells_renamed: int


def _joined_genes(sources: Sequence[InputSource], join: Join) -> pd.Index:
    genes = sources[0].var_names
    for src in sources[1:]:
        genes = genes.intersection(src.var_names, sort=False) if join == "inner" else genes.union(src.var_names, sort=False)
    if len(genes) == 0:
        names = ", ".join(s.name for s in sources)
        raise InputError(f"the inputs share no gene names ({names}): check that they use the same gene identifiers")
    return pd.Index(genes)


def _batch_labels(sources: Sequence[InputSource], batch_key: str | None, batch_names: Sequence[str] | None) -> list[Any]:
    """Per input: a fixed batch name (str) or the obs column to read it from (``("column", key)``)."""
    if batch_names is not None:
        if len(batch_names) != len(sources):
            raise InputError(f"{len(batch_names)} batch names given for {len(sources)} inputs")
        return [str(b) for b in batch_names]
    if batch_key is not None:
        return [("column", batch_key)] * len(sources)
    if all(_has_column(s, "batch") for s in sources):
        return [("column", "batch")] * len(sources)
    stems = [s.stem for s in sources]
    out, seen = [], {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if stems.count(s) == 1 else f"{s}-{seen[s]}")
    return out


def _has_column(src: InputSource, key: str) -> bool:
    for _, obs in src.iter_chunks(1):
        return key in obs.columns
    return False


def _validate(chunk: sp.csr_matrix, src: InputSource, row: int, warned: set[str]) -> sp.csr_matrix:
    data = chunk.data
    if not np.all(np.isfinite(data)):
        bad = int(np.flatnonzero(~np.isfinite(chunk.toarray().sum(axis=1)))[0]) + row
        raise InputError(f"{src.name}: NaN or infinite values (first in cell #{bad})")
    if data.size and data.min() < 0:
        r = np.flatnonzero(np.minimum.reduceat(data, chunk.indptr[:-1]) < 0) if chunk.nnz else []
        first = int(r[0]) + row if len(r) else row
        raise InputError(f"{src.name}: negative counts (first in cell #{first}); raw counts are required")
    if src.name not in warned and data.size and not np.array_equal(data, np.round(data)):
        warned.add(src.name)
        warnings.warn(
            f"{src.name}: values are not integers; scalex-scale expects raw counts (normalized or log data "
            "would be normalized twice)",
            UserWarning,
            stacklevel=3,
        )
    chunk = sp.csr_matrix(chunk, dtype=np.float32, copy=False)
    chunk.eliminate_zeros()
    return chunk


def _remap(chunk: sp.csr_matrix, mapping: np.ndarray, n_genes: int) -> sp.csr_matrix:
    """Move columns to atlas positions (``mapping[j] = -1`` drops gene ``j``), indices sorted per row."""
    cols = mapping[chunk.indices]
    keep = cols >= 0
    if keep.all():
        out = sp.csr_matrix((chunk.data, cols.astype(np.int32), chunk.indptr), shape=(chunk.shape[0], n_genes))
    else:
        row = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))[keep]
        out = sp.csr_matrix((chunk.data[keep], (row, cols[keep])), shape=(chunk.shape[0], n_genes))
    out.sort_indices()
    return out


class _Names:
    """Makes cell names unique across inputs (and against an existing atlas): ``name-batch``, then ``-k``."""

    def __init__(self, existing: pd.Index) -> None:
        self.seen: set[str] = set(existing.astype(str))
        self.renamed = 0

    def __call__(self, names: pd.Index, batches: np.ndarray) -> pd.Index:
        out = []
        for name, batch in zip(names.astype(str), batches, strict=True):
            if name in self.seen:
                cand, k = f"{name}-{batch}", 0
                while cand in self.seen:
                    k += 1
                    cand = f"{name}-{batch}-{k}"
                name = cand
                self.renamed += 1
            self.seen.add(name)
            out.append(name)
        return pd.Index(out)


def ingest(
    store: str | Path,
    inputs: Sequence[Any],
    *,
    batch_key: str | None = None,
    batch_names: Sequence[str] | None = None,
    join: Join = "inner",
    profile: Profile = "RNA",
    chunk_rows: int = 10_000,
    measurement: str | None = None,
    layer: str | None = None,
    obs_filter: str | None = None,
) -> IngestReport:
    """Ingest inputs into the atlas at ``store``: create it, or append new batches to it.

    Parameters
    ----------
    store
        Atlas path. Created when absent (atomically: written aside, then renamed into place); otherwise the
        inputs are appended as new cells without rewriting the existing ones.
    inputs
        Paths (``.h5ad``, ``.h5``, AnnData ``.zarr``, 10x MTX directories, TileDB-SOMA experiments), in-memory AnnData objects, or
        :class:`~scalex_scale.store.readers.InputSource` objects (e.g. from :func:`~scalex_scale.store.readers.from_chunks`).
    batch_key
        Read each cell's batch from this obs column.
    batch_names
        One batch name per input. Without ``batch_key`` and ``batch_names``: when every input has an obs column
        ``batch`` it is used; otherwise each input is one batch named after its file (``AnnData #i`` in memory).
    join
        How the genes of a *new* atlas are joined: ``"inner"`` keeps the genes common to all inputs (the
        reference's behaviour), ``"outer"`` their union (genes missing from an input are zero there). When
        appending, the atlas' genes are fixed: missing genes are zero-filled and extra genes dropped, both reported.
    profile
        ``"RNA"`` or ``"ATAC"``; the default profile of later preprocessing.
    chunk_rows
        Cells read per chunk.
    measurement, layer, obs_filter
        For TileDB-SOMA experiments (e.g. CELLxGENE Census; ``soma://URI`` or a local experiment directory):
        the measurement (default ``"RNA"``), its X layer (default ``"raw"``) and a tiledbsoma ``value_filter``
        on obs (e.g. ``"tissue_general == 'blood'"``). See :func:`~scalex_scale.store.readers_soma.open_soma`.
    """
    if profile not in ("RNA", "ATAC"):
        raise InputError(f"unknown profile {profile!r} (expected 'RNA' or 'ATAC')")
    if join not in ("inner", "outer"):
        raise InputError(f"unknown join {join!r} (expected 'inner' or 'outer')")
    if not inputs:
        raise InputError("no inputs given")
    store = Path(store)
    soma = {k: v for k, v in {"measurement": measurement, "layer": layer, "obs_filter": obs_filter}.items() if v is not None}
    sources = [open_input(obj, i, soma=soma) for i, obj in enumerate(inputs)]
    try:
        if store.exists():
            atlas = Atlas.open(store, mode="r+")
            return _append(atlas, sources, batch_key, batch_names, chunk_rows, profile, join)
        tmp = store.with_name(f".{store.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            atlas = Atlas.create(tmp, _joined_genes(sources, join))
            report = _append(atlas, sources, batch_key, batch_names, chunk_rows, profile, join)
            tmp.replace(store)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return IngestReport(**{**report.__dict__, "path": str(store)})
    finally:
        for src in sources:
            src.close()


def _append(
    atlas: Atlas,
    sources: Sequence[InputSource],
    batch_key: str | None,
    batch_names: Sequence[str] | None,
    chunk_rows: int,
    profile: Profile,
    join: Join,
) -> IngestReport:
    genes = atlas.var_names
    gene_pos = pd.Series(np.arange(len(genes)), index=genes)
    labels = _batch_labels(sources, batch_key, batch_names)
    old_obs = atlas.obs
    n0, nnz0 = atlas.n_obs, int(atlas.indptr[-1])
    obsm = {k: atlas.root["obsm"][k].shape[1] for k in atlas.obsm_keys()}
    write_journal(atlas.path, {"op": "append", "n_obs": n0, "nnz": nnz0, "n_vars": atlas.n_vars, "obsm": obsm})
    x = atlas.root["X"]
    data, indices, indptr = Appender(x["data"]), Appender(x["indices"]), Appender(x["indptr"])
    names = _Names(old_obs.index)
    obs_parts: list[pd.DataFrame] = []
    missing, dropped, added = {}, {}, {}
    warned: set[str] = set()
    offset = nnz0
    try:
        for src, label in zip(sources, labels, strict=True):
            mapping = gene_pos.reindex(src.var_names).fillna(-1).to_numpy().astype(np.int64)
            n_match = int((mapping >= 0).sum())
            if n_match == 0:
                raise InputError(f"{src.name}: none of its genes are in the atlas (genes are matched by name)")
            missing[src.name] = len(genes) - n_match
            dropped[src.name] = len(src.var_names) - n_match
            n_rows = 0
            for chunk, obs in src.iter_chunks(chunk_rows):
                chunk = _remap(_validate(chunk, src, n_rows, warned), mapping, len(genes))
                if isinstance(label, tuple):
                    if label[1] not in obs.columns:
                        raise InputError(
                            f"{src.name}: no obs column {label[1]!r} for the batch "
                            f"(columns: {', '.join(map(str, obs.columns)) or 'none'})"
                        )
                    batch = obs[label[1]].astype(str).to_numpy()
                else:
                    batch = np.full(chunk.shape[0], label, dtype=object)
                obs = obs.copy()
                obs.index = names(obs.index, batch)
                obs["batch"] = batch
                obs_parts.append(obs)
                for b, n in zip(*np.unique(batch.astype(str), return_counts=True), strict=True):
                    added[str(b)] = added.get(str(b), 0) + int(n)
                data.append(chunk.data)
                indices.append(chunk.indices)
                indptr.append(chunk.indptr[1:].astype(np.int64) + offset)
                offset += chunk.nnz
                n_rows += chunk.shape[0]
            if n_rows == 0:
                raise InputError(f"{src.name}: has no cells (empty input)")
            if missing[src.name] and atlas.n_obs > 0:
                log.warning("%s: %d atlas genes missing (filled with 0)", src.name, missing[src.name])
        for app in (data, indices, indptr):
            app.flush()
        new_obs = _concat_obs(old_obs, obs_parts)
        n_total = new_obs.shape[0]
        for key, n_cols in obsm.items():  # keep obsm aligned: new cells get NaN until embedded
            arr = atlas.root["obsm"][key]
            arr.resize((n_total, n_cols))
            arr[n0:n_total] = np.full((n_total - n0, n_cols), np.nan, dtype=arr.dtype)
        atlas.write_obs(new_obs)
        x.attrs["shape"] = [n_total, len(genes)]
        state = atlas.state
        record = state.get("ingest") or {"profile": profile, "join": join, "inputs": []}
        record["inputs"] = record["inputs"] + [
            {"name": s.name, "batch": lab if isinstance(lab, str) else f"obs[{lab[1]!r}]"} for s, lab in zip(sources, labels, strict=True)
        ]
        state["ingest"] = record
        atlas.write_state(state)
        atlas.consolidate()
        clear_journal(atlas.path)
    except BaseException:
        recover(atlas.path)
        raise
    atlas.refresh()
    return IngestReport(str(atlas.path), n_total - n0, added, len(genes), missing, dropped, names.renamed)


def _concat_obs(old: pd.DataFrame, parts: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [old.astype({"batch": str}) if "batch" in old else old] + parts
    obs = pd.concat([f for f in frames if f.shape[0] or f is old], axis=0, join="outer")
    for col in obs.columns:
        if obs[col].dtype == object or isinstance(obs[col].dtype, pd.CategoricalDtype):
            obs[col] = obs[col].astype(str).where(obs[col].notna(), None).astype("category")
    old_cats = list(old["batch"].cat.categories) if "batch" in old else []
    new_cats = old_cats + [c for c in pd.unique(obs["batch"].astype(str)) if c not in old_cats]
    obs["batch"] = pd.Categorical(obs["batch"].astype(str), categories=new_cats)
    obs.index = obs.index.astype(str)
    return obs
