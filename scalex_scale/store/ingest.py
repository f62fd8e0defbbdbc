"""Out-of-core ingest: stream inputs in row chunks into a new atlas, or append them as new batches.

Every ingest is one transaction (:mod:`.txn`): the new cells are written into a private copy of the atlas and
published in one atomic step, so a bad input, Ctrl-C, a full disk or a crash leaves the atlas as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._options import field_names, split_shortcuts
from ._hashset import HashSet, name_hashes, pair_hashes
from ._zarr_io import Appender
from .atlas import Atlas
from .errors import DuplicateError, InputError
from .obs_stream import ObsReader, ObsWriter
from .readers import InputSource, open_input
from .txn import transaction

log = logging.getLogger(__name__)

Join = Literal["inner", "outer"]
Profile = Literal["RNA", "ATAC"]
_F32_MAX = float(np.finfo(np.float32).max)


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
    n_rows_before: int = 0


@dataclass(frozen=True)
class AppendOptions:
    """How :func:`append` labels and checks the cells it adds.

    Attributes
    ----------
    batch_key, batch_names
        Where each cell's batch comes from (see :func:`ingest`).
    chunk_rows
        Cells read per chunk.
    profile, join
        Recorded in the ingest record of a new atlas.
    allow_duplicates
        Add cells even when the same cell names are already in the same batch, or the same source file (by
        fingerprint) was added before.
    record
        The state section that lists the inputs (``"ingest"``, or ``"projection"`` for projected data).
    """

    batch_key: str | None = None
    batch_names: Sequence[str] | None = None
    chunk_rows: int = 10_000
    profile: Profile = "RNA"
    join: Join = "inner"
    allow_duplicates: bool = False
    record: str = "ingest"


def _joined_genes(sources: Sequence[InputSource], join: Join) -> pd.Index:
    genes = sources[0].var_names
    for src in sources[1:]:
        genes = (
            genes.intersection(src.var_names, sort=False) if join == "inner" else genes.union(src.var_names, sort=False)
        )
    if len(genes) == 0:
        names = ", ".join(s.name for s in sources)
        raise InputError(f"the inputs share no gene names ({names}): check that they use the same gene identifiers")
    return pd.Index(genes)


def _batch_labels(
    sources: Sequence[InputSource], batch_key: str | None, batch_names: Sequence[str] | None
) -> list[Any]:
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


def _first_row(indptr: np.ndarray, bad: np.ndarray) -> int:
    """Row of the first flagged stored value (no densifying: positions -> rows through indptr)."""
    return int(np.searchsorted(indptr, int(np.flatnonzero(bad)[0]), side="right")) - 1


def _validate(chunk: sp.csr_matrix, src: InputSource, row: int, warned: set[str]) -> sp.csr_matrix:
    """Cast to the stored dtype (float32), then check the stored values: finite, non-negative."""
    raw = chunk.data
    if raw.dtype.kind == "f" and raw.dtype.itemsize > 4 and raw.size:
        over = np.abs(raw) > _F32_MAX
        if over.any():
            bad = _first_row(chunk.indptr, over) + row
            raise InputError(
                f"{src.name}: values beyond float32's range (e.g. {raw[over][0]:.3g} in cell #{bad}); counts are "
                "stored as float32"
            )
    chunk = sp.csr_matrix(chunk, dtype=np.float32, copy=False)
    data = chunk.data
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError(
            f"{src.name}: NaN or infinite values (first in cell #{_first_row(chunk.indptr, ~finite) + row})"
        )
    if data.size and data.min() < 0:
        first = _first_row(chunk.indptr, data < 0) + row
        raise InputError(f"{src.name}: negative counts (first in cell #{first}); raw counts are required")
    if src.name not in warned and data.size and not np.array_equal(data, np.round(data)):
        warned.add(src.name)
        log.warning(
            "%s: values are not integers; scalex-scale expects raw counts (normalized or log data would be "
            "normalized twice)",
            src.name,
        )
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
    """Makes cell names unique across inputs and against the atlas (``name-batch``, then ``-k``), and refuses a
    cell already in the same batch (a duplicate) unless duplicates are allowed.

    Holds hashes, not names (:mod:`._hashset`: 16 bytes a cell, where a dict of names took ~150).
    """

    def __init__(self, allow_duplicates: bool, atlas: Path) -> None:
        self.names, self.pairs = HashSet(), HashSet()
        self.allow = allow_duplicates
        self.atlas = atlas
        self.renamed = 0

    def add_existing(self, names: pd.Index, batches: np.ndarray) -> None:
        """Cells already in the atlas."""
        names = np.asarray(names.astype(str), dtype=object)
        self.names.add(name_hashes(names))
        self.pairs.add(pair_hashes(names, np.asarray(batches).astype(str)))

    def __call__(self, names: pd.Index, batches: np.ndarray, source: str) -> pd.Index:
        names = np.asarray(names.astype(str), dtype=object)
        batches = np.asarray(batches).astype(str).astype(object)
        pairs = pair_hashes(names, batches)
        if not self.allow:
            same = np.flatnonzero(self.pairs.contains(pairs))
            if same.size:
                raise DuplicateError(
                    f"{source}: {same.size:,} of its cells (e.g. {names[same[0]]!r}) are already in batch "
                    f"{batches[same[0]]!r} of {self.atlas}; it looks added before. Give another batch name, "
                    "or pass --allow-duplicates (allow_duplicates=True) to add them again"
                )
        clash = self.names.contains(name_hashes(names)) | pd.Index(names).duplicated()
        out = names.copy()
        if clash.any():
            taken = set(names[~clash])
            for i in np.flatnonzero(clash):
                cand, k = f"{names[i]}-{batches[i]}", 0
                while cand in taken or self.names.contains(name_hashes(np.asarray([cand], dtype=object)))[0]:
                    k += 1
                    cand = f"{names[i]}-{batches[i]}-{k}"
                taken.add(cand)
                out[i] = cand
            self.renamed += int(clash.sum())
            self.pairs.add(pair_hashes(out, batches))
        self.names.add(name_hashes(out))
        self.pairs.add(pairs)
        return pd.Index(out, dtype=object)


def _recorded_inputs(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [*((state.get("ingest") or {}).get("inputs", [])), *((state.get("projection") or {}).get("inputs", []))]


def _refuse_known_source(
    src: InputSource, key: str, value: str | None, known: list[dict[str, Any]], atlas: Path
) -> None:
    if value is None:
        return
    for rec in known:
        if rec.get(key) == value:
            what = "file" if key == "fingerprint" else "data"
            raise DuplicateError(
                f"{src.name}: the same {what} was already added to {atlas} (as {rec.get('name')}, batch "
                f"{rec.get('batch')}); pass --allow-duplicates (allow_duplicates=True) to add its cells again"
            )


#: TileDB-SOMA read options of :func:`ingest` (see :func:`~scalex_scale.store.readers_soma.open_soma`)
SOMA_OPTIONS = ("measurement", "layer", "obs_filter")


def ingest(
    store: str | Path,
    inputs: Sequence[Any],
    options: AppendOptions | None = None,
    *,
    soma: dict[str, Any] | None = None,
    lock_timeout: float | None = None,
    **fields: Any,
) -> IngestReport:
    """Ingest inputs into the atlas at ``store``: create it, or append new batches to it (one transaction).

    Parameters
    ----------
    store
        Atlas path. Created when absent; otherwise the inputs are appended as new cells without rewriting the
        existing ones. Either way the atlas changes in one atomic step, or not at all.
    inputs
        Paths (``.h5ad``, ``.h5``, AnnData ``.zarr``, 10x MTX directories, TileDB-SOMA experiments), in-memory
        AnnData objects, or :class:`~scalex_scale.store.readers.InputSource` objects (e.g. from
        :func:`~scalex_scale.store.readers.from_chunks`).
    options
        How the cells are labelled and checked (:class:`AppendOptions`): ``batch_key`` (read each cell's batch
        from this obs column) or ``batch_names`` (one per input; without either, an obs column ``batch`` present in
        every input is used, otherwise each input is one batch named after its file, ``AnnData #i`` in memory);
        ``join`` of a *new* atlas' genes (``"inner"``: common to all inputs, the reference's behaviour;
        ``"outer"``: their union, zero where missing; when appending the atlas' genes are fixed: missing genes are
        zero-filled and extra genes dropped, both reported); ``profile`` (``"RNA"`` or ``"ATAC"``, the default of
        later preprocessing); ``chunk_rows``; ``allow_duplicates`` (add the cells even if the same cell names are
        already in the same batch, or the same source file or data was added before: refused by default, it is
        almost always a mistake).
    soma
        For TileDB-SOMA experiments (e.g. CELLxGENE Census; ``soma://URI`` or a local experiment directory):
        ``measurement`` (default ``"RNA"``), its X ``layer`` (default ``"raw"``) and ``obs_filter``, a tiledbsoma
        ``value_filter`` on obs (e.g. ``"tissue_general == 'blood'"``). See
        :func:`~scalex_scale.store.readers_soma.open_soma`.
    lock_timeout
        Seconds to wait for another writer of the atlas (None: wait; 0: fail at once).
    **fields
        Shortcuts for single fields of ``options`` or ``soma`` (``batch_key="donor"``, ``measurement="RNA"``).
    """
    option_fields, soma_fields = split_shortcuts(
        "ingest", fields, field_names(AppendOptions, exclude={"record"}), SOMA_OPTIONS
    )
    options = dataclasses.replace(options or AppendOptions(), **option_fields)
    soma = {**(soma or {}), **{k: v for k, v in soma_fields.items() if v is not None}}
    if options.profile not in ("RNA", "ATAC"):
        raise InputError(f"unknown profile {options.profile!r} (expected 'RNA' or 'ATAC')")
    if options.join not in ("inner", "outer"):
        raise InputError(f"unknown join {options.join!r} (expected 'inner' or 'outer')")
    if not inputs:
        raise InputError("no inputs given")
    sources = [open_input(obj, i, soma=soma) for i, obj in enumerate(inputs)]
    try:
        with transaction(store, "ingest", lock_timeout=lock_timeout) as txn:
            atlas = txn.create(_joined_genes(sources, options.join)) if txn.is_new else txn.atlas
            return append(atlas, sources, options)
    finally:
        for src in sources:
            src.close()


def append(atlas: Atlas, sources: Sequence[InputSource], options: AppendOptions = AppendOptions()) -> IngestReport:
    """Append the sources' cells to a writable atlas (inside a transaction): X, obs, obsm rows, the input record.

    New cells get NaN in every existing ``obsm`` array (until embedded).
    """
    genes = atlas.var_names
    gene_pos = pd.Series(np.arange(len(genes)), index=genes)
    labels = _batch_labels(sources, options.batch_key, options.batch_names)
    state = atlas.state
    known = _recorded_inputs(state)
    n0, nnz0 = atlas.n_obs, int(atlas.indptr[-1])
    x = atlas.root["X"]
    data, indices, indptr = Appender(x["data"]), Appender(x["indices"]), Appender(x["indptr"])
    names = _Names(options.allow_duplicates, atlas.path)
    obs_out = ObsWriter(atlas.root, categorical=("batch",))
    batch_order = _copy_obs(atlas, names, obs_out) if n0 else []
    missing, dropped, added = {}, {}, {}
    records = []
    warned: set[str] = set()
    offset = nnz0
    for src, label in zip(sources, labels, strict=True):
        if not options.allow_duplicates:
            _refuse_known_source(src, "fingerprint", src.fingerprint, known + records, atlas.path)
        mapping = gene_pos.reindex(src.var_names).fillna(-1).to_numpy().astype(np.int64)
        n_match = int((mapping >= 0).sum())
        if n_match == 0:
            raise InputError(f"{src.name}: none of its genes are in the atlas (genes are matched by name)")
        missing[src.name] = len(genes) - n_match
        dropped[src.name] = len(src.var_names) - n_match
        content = hashlib.blake2b(digest_size=16)
        n_rows = 0
        for chunk, obs in src.iter_chunks(options.chunk_rows):
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
            for part in (obs.index.astype(str).to_numpy().astype(bytes), chunk.indptr, chunk.indices, chunk.data):
                content.update(np.ascontiguousarray(part).tobytes())
            obs = obs.copy()
            obs.index = names(obs.index, batch, src.name)
            obs["batch"] = batch.astype(str).astype(object)
            obs_out.append(obs)
            for b, n in pd.Series(obs["batch"]).value_counts(sort=False).items():
                added[str(b)] = added.get(str(b), 0) + int(n)
            data.append(chunk.data)
            indices.append(chunk.indices)
            indptr.append(chunk.indptr[1:].astype(np.int64) + offset)
            offset += chunk.nnz
            n_rows += chunk.shape[0]
        if n_rows == 0:
            raise InputError(f"{src.name}: has no cells (empty input)")
        record = {
            "name": src.name,
            "batch": label if isinstance(label, str) else f"obs[{label[1]!r}]",
            "n_cells": n_rows,
            "fingerprint": src.fingerprint,
            "content": content.hexdigest(),
        }
        if not options.allow_duplicates:
            _refuse_known_source(src, "content", record["content"], known + records, atlas.path)
        records.append(record)
        if missing[src.name] and n0 > 0:
            log.warning("%s: %d atlas genes missing (filled with 0)", src.name, missing[src.name])
    for app in (data, indices, indptr):
        app.flush()
    n_total = n0 + sum(added.values())
    for key in atlas.obsm_keys():  # keep obsm aligned: new cells get NaN until embedded
        arr = atlas.root["obsm"][key]
        n_cols = arr.shape[1]
        arr.resize((n_total, n_cols))
        arr[n0:n_total] = np.full((n_total - n0, n_cols), np.nan, dtype=arr.dtype)
    obs_out.finish({"batch": batch_order + [b for b in added if b not in batch_order]})
    x.attrs["shape"] = [n_total, len(genes)]
    section = state.get(options.record) or {}
    if options.record == "ingest":
        section.setdefault("profile", options.profile)
        section.setdefault("join", options.join)
    section["inputs"] = list(section.get("inputs", [])) + records
    state[options.record] = section
    atlas.write_state(state)
    atlas.refresh()
    return IngestReport(str(atlas.path), n_total - n0, added, len(genes), missing, dropped, names.renamed, n0)


def _copy_obs(atlas: Atlas, names: _Names, out: ObsWriter) -> list[str]:
    """Stream the atlas' own obs rows into ``out`` (block by block) and their names into ``names``; returns the
    batch categories in their stored order."""
    reader = ObsReader(atlas.root["obs"])
    out.adopt_categories(reader.categories)
    out.adopt_strings(reader.strings)
    for block in reader.blocks():
        names.add_existing(block.index, np.asarray(block["batch"]).astype(str))
        out.append(block)
    return reader.categories.get("batch", [])


__all__ = ["AppendOptions", "IngestReport", "append", "ingest"]
