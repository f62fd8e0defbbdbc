"""Input sources: every supported input becomes an object that streams CSR row chunks.

Supported: ``.h5ad`` (opened backed, read in row chunks, never whole), AnnData Zarr stores, 10x Genomics
MTX directories (``matrix.mtx[.gz]``, ``features.tsv[.gz]``/``genes.tsv[.gz]``, ``barcodes.tsv[.gz]``), 10x
``.h5`` files (v2 and v3 layouts), in-memory :class:`anndata.AnnData`, and any iterable of
``(csr_chunk, obs_chunk)`` pairs (e.g. :func:`scalex_scale.synthetic.synthetic_chunks`). TileDB-SOMA experiments
(CELLxGENE Census) are read by :mod:`.readers_soma`.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._hashset import HashSet, name_hashes
from .errors import InputError
from .obs_stream import ObsReader

Chunk = sp.csr_matrix


@dataclass
class InputSource:
    """A cells x genes matrix that can be read in row chunks, with its cell annotations.

    Attributes
    ----------
    name
        What error messages call this input (a path, or ``AnnData #i``).
    var_names
        Gene names, in column order.
    chunks
        ``chunks(chunk_rows)`` yields ``(csr_chunk, obs_chunk)`` pairs covering all cells in order;
        ``obs_chunk`` is indexed by cell name.
    n_obs
        Number of cells when known up front (``None`` for generators).
    """

    name: str
    var_names: pd.Index
    chunks: Callable[[int], Iterator[tuple[Chunk, pd.DataFrame]]]
    n_obs: int | None = None
    close: Callable[[], None] = field(default=lambda: None)
    #: A cheap fingerprint of the source file(s) (size + head/tail hash), to refuse adding the same file twice.
    fingerprint: str | None = None

    @property
    def stem(self) -> str:
        base = Path(self.name).name
        for suffix in (".h5ad", ".zarr", ".h5", ".mtx.gz", ".mtx"):
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[Chunk, pd.DataFrame]]:
        return self.chunks(chunk_rows)


def _row_chunks(
    name: str, n: int, read_obs: Callable[[int, int], pd.DataFrame], read_rows: Callable[[int, int], Any]
) -> Callable[[int], Iterator[tuple[Chunk, pd.DataFrame]]]:
    """Chunk iterator over random-access row readers (X and obs), wrapping read failures in :class:`InputError`."""

    def chunks(chunk_rows: int) -> Iterator[tuple[Chunk, pd.DataFrame]]:
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            try:
                block, obs = read_rows(start, stop), read_obs(start, stop)
            except InputError:
                raise
            except (OSError, KeyError, ValueError, RuntimeError) as err:
                raise InputError(
                    f"{name}: rows {start}-{stop} cannot be read (corrupt or truncated file?): {err}"
                ) from err
            yield to_csr(block, name), obs

    return chunks


def _source(name: str, var_names: pd.Index, obs: pd.DataFrame, read_rows, close=lambda: None) -> InputSource:
    """An input whose obs is in memory (names checked already)."""
    chunks = _row_chunks(name, obs.shape[0], lambda a, b: obs.iloc[a:b], read_rows)
    return InputSource(name, var_names, chunks, obs.shape[0], close)


def _streamed_obs(name: str, reader: ObsReader) -> Callable[[int, int], pd.DataFrame]:
    """Row blocks of an on-disk obs, refusing duplicated cell names as they come (hashes of the names seen: 8
    bytes a cell, not the names)."""
    seen = HashSet()

    def read(start: int, stop: int) -> pd.DataFrame:
        if start == 0:  # a new pass over the cells
            seen.runs.clear()
        obs = reader.read(start, stop)
        hashes = name_hashes(np.asarray(obs.index, dtype=object))
        dup = seen.contains(hashes) | obs.index.duplicated()
        if dup.any():
            raise InputError(f"{name}: duplicated cell names, e.g. {obs.index[dup].unique()[:5].tolist()}")
        seen.add(hashes)
        return obs

    return read


def to_csr(block: Any, name: str) -> Chunk:
    """Convert a dense or sparse block to CSR, rejecting non-numeric dtypes with a message naming it."""
    dtype = getattr(block, "dtype", None)
    if dtype is None or np.dtype(dtype).kind not in "biuf":
        raise InputError(f"{name}: expression matrix has dtype {dtype}; numeric counts are required")
    if np.dtype(dtype) == np.float16:  # scipy.sparse has no float16: widen (exactly) first
        block = block.astype(np.float32)
    if sp.issparse(block):
        return sp.csr_matrix(block)
    return sp.csr_matrix(np.asarray(block))


def _check_names(names: pd.Index, name: str, what: str) -> pd.Index:
    names = pd.Index(names.astype(str))
    if len(names) == 0:
        raise InputError(f"{name}: has no {what}s (empty input)")
    if not names.is_unique:
        dup = names[names.duplicated()].unique()[:5].tolist()
        hint = " (call var_names_make_unique() first)" if what == "gene" else ""
        raise InputError(f"{name}: duplicated {what} names, e.g. {dup}{hint}")
    return names


# ----------------------------------------------------------------------------------------------
# AnnData on disk (.h5ad / Zarr) and in memory
# ----------------------------------------------------------------------------------------------


def _anndata_group_source(group: Any, name: str, close: Callable[[], None]) -> InputSource:
    from anndata.io import read_elem, sparse_dataset

    try:
        obs = ObsReader(group["obs"])
        var = read_elem(group["var"])
        x = group["X"]
    except KeyError as err:
        raise InputError(f"{name}: not an AnnData file (missing {err})") from err
    except Exception as err:  # corrupt metadata
        raise InputError(f"{name}: cannot be read as AnnData: {err}") from err
    enc = dict(x.attrs).get("encoding-type", "array")
    if enc in ("csr_matrix", "csc_matrix"):
        matrix = sparse_dataset(x)

        def read_rows(start: int, stop: int) -> Any:
            return matrix[start:stop]

    elif enc == "array":

        def read_rows(start: int, stop: int) -> Any:
            return x[start:stop]

    else:
        raise InputError(f"{name}: X has unsupported encoding {enc!r}")
    if obs.n_obs == 0:
        raise InputError(f"{name}: has no cells (empty input)")
    var_names = _check_names(var.index, name, "gene")
    chunks = _row_chunks(name, obs.n_obs, _streamed_obs(name, obs), read_rows)
    return InputSource(name, var_names, chunks, obs.n_obs, close)


def open_h5ad(path: Path) -> InputSource:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"{path}: cannot be opened as .h5ad (corrupt or truncated file?): {err}") from err
    return _anndata_group_source(f, str(path), f.close)


def open_zarr(path: Path) -> InputSource:
    import zarr

    try:
        g = zarr.open_group(str(path), mode="r")
    except Exception as err:
        raise InputError(f"{path}: cannot be opened as an AnnData Zarr store: {err}") from err
    return _anndata_group_source(g, str(path), lambda: None)


def from_anndata(adata: Any, name: str) -> InputSource:
    x = adata.X
    if x is None:
        raise InputError(f"{name}: AnnData has no X")
    obs = adata.obs.copy()
    obs.index = _check_names(adata.obs_names, name, "cell")
    var_names = _check_names(adata.var_names, name, "gene")

    def read_rows(start: int, stop: int) -> Any:
        return x[start:stop]

    return _source(name, var_names, obs, read_rows)


# ----------------------------------------------------------------------------------------------
# 10x Genomics
# ----------------------------------------------------------------------------------------------


def _find(directory: Path, *names: str) -> Path | None:
    for n in names:
        for candidate in (directory / n, directory / f"{n}.gz"):
            if candidate.exists():
                return candidate
    return None


def _read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", header=None, dtype=str, compression="infer")


def _make_unique(names: pd.Index) -> pd.Index:
    """scanpy/anndata ``var_names_make_unique``: later duplicates get ``-1``, ``-2``, ..."""
    values = names.astype(str).tolist()
    seen: dict[str, int] = {}
    taken = set(values)
    out = []
    for v in values:
        if v in seen:
            k = seen[v]
            while True:
                k += 1
                cand = f"{v}-{k}"
                if cand not in taken:
                    break
            seen[v] = k
            taken.add(cand)
            out.append(cand)
        else:
            seen[v] = 0
            out.append(v)
    return pd.Index(out)


def open_10x_mtx(directory: Path) -> InputSource:
    """A 10x MTX directory (genes x cells on disk). Read once into CSR (cells x genes)."""
    import scipy.io

    matrix = _find(directory, "matrix.mtx")
    features = _find(directory, "features.tsv", "genes.tsv")
    barcodes = _find(directory, "barcodes.tsv")
    missing = [
        n
        for n, p in [("matrix.mtx", matrix), ("features.tsv/genes.tsv", features), ("barcodes.tsv", barcodes)]
        if p is None
    ]
    if missing:
        raise InputError(f"{directory}: not a 10x MTX directory (missing {', '.join(missing)})")
    try:
        opener = gzip.open if str(matrix).endswith(".gz") else open
        with opener(matrix, "rb") as fh:
            mat = sp.csr_matrix(scipy.io.mmread(fh).T)
        feat = _read_tsv(features)
        bc = _read_tsv(barcodes)
    except Exception as err:
        raise InputError(f"{directory}: cannot read 10x MTX files (corrupt or truncated?): {err}") from err
    if mat.shape != (len(bc), len(feat)):
        raise InputError(
            f"{directory}: matrix.mtx is {mat.shape[1]} x {mat.shape[0]} (genes x cells) but there are "
            f"{len(feat)} features and {len(bc)} barcodes"
        )
    symbols = feat[1] if feat.shape[1] > 1 else feat[0]
    keep = np.ones(len(feat), dtype=bool)
    if feat.shape[1] > 2:
        types = feat[2].to_numpy()
        if (types == "Gene Expression").any():
            keep = types == "Gene Expression"
    mat = mat[:, np.flatnonzero(keep)] if not keep.all() else mat
    var_names = _make_unique(pd.Index(symbols[keep]))
    obs = pd.DataFrame(index=_check_names(pd.Index(bc[0]), str(directory), "cell"))

    def read_rows(start: int, stop: int) -> Any:
        return mat[start:stop]

    return _source(str(directory), var_names, obs, read_rows)


def open_10x_h5(path: Path) -> InputSource:
    """A Cell Ranger ``.h5`` file (v3 ``matrix/features``, or v2 ``GENOME/genes``), streamed by cells."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"{path}: cannot be opened as a 10x .h5 file (corrupt or truncated?): {err}") from err
    try:
        if "matrix" in f:
            g = f["matrix"]
            names = g["features/name"][:].astype(str)
            types = g["features/feature_type"][:].astype(str) if "features/feature_type" in g else None
        else:
            genome = next(iter(f.keys()))
            g = f[genome]
            names = g["gene_names"][:].astype(str)
            types = None
        barcodes = g["barcodes"][:].astype(str)
        n_genes, n_cells = (int(s) for s in g["shape"][:])
        indptr = g["indptr"][:].astype(np.int64)
        data, indices = g["data"], g["indices"]
    except Exception as err:
        f.close()
        raise InputError(f"{path}: not a 10x Genomics .h5 matrix: {err}") from err
    keep = np.ones(n_genes, dtype=bool)
    if types is not None and (types == "Gene Expression").any():
        keep = types == "Gene Expression"
    keep_idx = np.flatnonzero(keep)

    def read_rows(start: int, stop: int) -> Any:
        a, b = indptr[start], indptr[stop]
        m = sp.csr_matrix((data[a:b], indices[a:b], indptr[start : stop + 1] - a), shape=(stop - start, n_genes))
        return m if keep_idx.size == n_genes else m[:, keep_idx]

    obs = pd.DataFrame(index=_check_names(pd.Index(barcodes), str(path), "cell"))
    if len(barcodes) != n_cells:
        f.close()
        raise InputError(f"{path}: shape says {n_cells} cells but there are {len(barcodes)} barcodes")
    return _source(str(path), _make_unique(pd.Index(names[keep])), obs, read_rows, f.close)


# ----------------------------------------------------------------------------------------------
# Chunk iterables (synthetic data, generators)
# ----------------------------------------------------------------------------------------------


def from_chunks(
    chunk_factory: Callable[[], Iterable[tuple[Any, pd.DataFrame]]],
    var_names: Iterable[str],
    *,
    n_obs: int | None = None,
    name: str = "chunks",
) -> InputSource:
    """An input made of ``(matrix_chunk, obs_chunk)`` pairs from ``chunk_factory()`` (e.g. a generator).

    The chunk size is the factory's own; the ``chunk_rows`` argument of :meth:`InputSource.iter_chunks`
    is ignored for such inputs.
    """
    var = _check_names(pd.Index(list(var_names)), name, "gene")

    def chunks(_: int) -> Iterator[tuple[Chunk, pd.DataFrame]]:
        for block, obs in chunk_factory():
            csr = to_csr(block, name)
            if csr.shape[1] != len(var):
                raise InputError(f"{name}: chunk has {csr.shape[1]} genes, expected {len(var)}")
            if csr.shape[0] != obs.shape[0]:
                raise InputError(f"{name}: chunk has {csr.shape[0]} rows but {obs.shape[0]} obs rows")
            yield csr, obs

    return InputSource(name, var, chunks, n_obs)


def file_fingerprint(path: Path, *, head: int = 1 << 20) -> str:
    """Size and hash of the first and last MiB of a file; of a directory, every file's name and size plus the
    first MiB of its four largest files."""
    digest = hashlib.blake2b(digest_size=16)
    if path.is_file():
        files, sample = [(path, "")], [path]
    else:
        found = sorted(p for p in path.rglob("*") if p.is_file())
        files = [(p, str(p.relative_to(path))) for p in found]
        sample = sorted(found, key=lambda p: (-p.stat().st_size, str(p)))[:4]
    for f, rel in files:
        digest.update(f"{rel}:{f.stat().st_size};".encode())
    for f in sample:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            digest.update(fh.read(head))
            if size > 2 * head:
                fh.seek(size - head)
                digest.update(fh.read(head))
    return digest.hexdigest()


def open_input(obj: Any, index: int = 0, *, soma: dict[str, Any] | None = None) -> InputSource:
    """Open any supported input (path, SOMA URI or in-memory AnnData) as an :class:`InputSource`.

    ``soma``: keyword arguments of :func:`~scalex_scale.store.readers_soma.open_soma` (``measurement``, ``layer``,
    ``obs_filter``); an error for an input that is not a SOMA experiment, rather than silently unused. Local files
    get a :func:`file_fingerprint` (a SOMA experiment is identified by its content hash only).
    """
    from .readers_soma import is_soma_uri, open_soma

    if is_soma_uri(obj):
        return open_soma(str(obj), **(soma or {}))
    if soma:
        raise InputError(
            f"input #{index} ({obj if isinstance(obj, str | Path) else type(obj).__name__}): "
            f"{', '.join(sorted(soma))} apply to TileDB-SOMA experiments only, and this is not one"
        )
    source = _open_input(obj, index)
    if source.fingerprint is None and isinstance(obj, str | Path):
        source.fingerprint = file_fingerprint(Path(obj))
    return source


def _open_input(obj: Any, index: int = 0) -> InputSource:
    try:
        import anndata

        if isinstance(obj, anndata.AnnData):
            return from_anndata(obj, f"AnnData #{index}")
    except ImportError:  # pragma: no cover - anndata is a dependency
        pass
    if isinstance(obj, InputSource):
        return obj
    if not isinstance(obj, str | Path):
        raise InputError(f"input #{index}: unsupported type {type(obj).__name__} (expected a path or AnnData)")
    path = Path(obj)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        if _find(path, "matrix.mtx") is not None:
            return open_10x_mtx(path)
        if (path / "zarr.json").exists() or (path / ".zgroup").exists():
            return open_zarr(path)
        raise InputError(f"{path}: directory is neither a 10x MTX directory nor a Zarr store")
    if path.suffix == ".h5ad":
        return open_h5ad(path)
    if path.suffix == ".h5":
        return open_10x_h5(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    raise InputError(f"{path}: unrecognised input format (expected .h5ad, .h5, a .zarr store or a 10x MTX directory)")
