"""Embedding atlas rows with a trained encoder: raw counts -> model input (stored state) -> mu, streamed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .nn import SCALEXModule
from .preprocess.pipeline import DaskRunner
from .preprocess.state import GLOBAL_MAXABS_KEY, PreprocessState
from .preprocess.stats import MaxAbsStats
from .preprocess.transform import maxabs_chunk, transform_chunk
from .store import Atlas
from .store.errors import PreprocessError

#: Cells densified and encoded at once.
ENCODE_BLOCK = 4096


@torch.no_grad()
def encode(module: SCALEXModule, x: sp.csr_matrix, device: torch.device) -> np.ndarray:
    """``mu`` of the rows of a CSR model-input matrix, in blocks (eval mode)."""
    module.eval()
    out = np.empty((x.shape[0], module.n_latent), dtype=np.float32)
    for s in range(0, x.shape[0], ENCODE_BLOCK):
        block = torch.from_numpy(x[s : s + ENCODE_BLOCK].toarray()).to(device)
        out[s : s + block.shape[0]] = module.embed(block).float().cpu().numpy()
    return out


def maxabs_rows(atlas: Atlas, state: PreprocessState, extra: dict[str, list[float]] | None = None) -> np.ndarray:
    """(n_batches_in_atlas, n_features) MaxAbs per atlas batch code (one row when scaling is global).

    Batches come from the preprocessing state, or from ``extra`` (projected batches); a batch in neither raises.
    """
    if state.scale == "global":
        return np.asarray([state.maxabs[GLOBAL_MAXABS_KEY]], dtype=np.float32)
    known = {**state.maxabs, **(extra or {})}
    missing = [b for b in atlas.batch_categories if b not in known]
    if missing:
        raise PreprocessError(
            f"{atlas.path}: batches {missing} were added after preprocessing and never projected; "
            "embed them with `scalex-scale project` (which computes their own MaxAbs)"
        )
    return np.asarray([known[b] for b in atlas.batch_categories], dtype=np.float32)


def compute_maxabs(atlas: Atlas, state: PreprocessState, rows: tuple[int, int], batches: Sequence[str], n_workers: int) -> dict[str, list[float]]:
    """MaxAbs of the new batches' own cells (projection), from rows ``[start, stop)`` of the atlas."""
    codes = atlas.batch_codes
    names = atlas.batch_categories
    groups = {names.index(b): i for i, b in enumerate(batches)}
    lut = np.full(len(names), 0, dtype=np.int64)
    for code, g in groups.items():
        lut[code] = g
    n_groups = 1 if state.scale == "global" else len(batches)
    runner = DaskRunner(str(atlas.directory), _ranges(atlas, *rows), lut[codes], n_workers=n_workers)
    acc, _ = runner.fold(
        lambda x, c, into: maxabs_chunk(x, c, state, n_groups, into=into),
        lambda: MaxAbsStats.empty(n_groups, state.n_features),
    )
    if state.scale == "global":
        return {GLOBAL_MAXABS_KEY: acc.max_abs[0].tolist()}
    return {b: acc.max_abs[i].tolist() for i, b in enumerate(batches)}


def _ranges(atlas: Atlas, start: int, stop: int) -> list[tuple[int, int]]:
    out = []
    for a, b in atlas.row_ranges():
        a, b = max(a, start), min(b, stop)
        if b > a:
            out.append((a, b))
    return out


def embed_rows(
    atlas: Atlas,
    module: SCALEXModule,
    state: PreprocessState,
    maxabs: np.ndarray,
    target: "zarr.Array",  # noqa: F821
    *,
    rows: tuple[int, int] | None = None,
    device: torch.device,
    n_workers: int = 2,
) -> int:
    """Write ``mu`` of atlas rows ``[start, stop)`` into ``target`` (NaN for cells failing QC).

    Reading + transforming (dask, ``n_workers``), densifying, copying and encoding overlap
    (:func:`scalex_scale.encode_pipeline.encode_chunks`; the same blocks as :func:`encode`, so the
    same result). Returns the number of cells embedded. Memory: a few row ranges at a time.
    """
    from .encode_pipeline import encode_chunks

    start, stop = rows if rows is not None else (0, atlas.n_obs)
    codes = atlas.batch_codes
    runner = DaskRunner(str(atlas.directory), _ranges(atlas, start, stop), codes, n_workers=n_workers)
    results = runner.map_ordered(lambda x, c: transform_chunk(x, c, state, maxabs=maxabs))

    def chunks():
        for (a, b), (values, mask) in zip(runner.ranges, results, strict=True):
            yield (a, b, mask), values

    n = 0
    for (a, b, mask), mu in encode_chunks(module, chunks(), device, block=ENCODE_BLOCK, threads=max(1, min(4, n_workers))):
        out = np.full((b - a, module.n_latent), np.nan, dtype=np.float32)
        out[mask] = mu
        target[a:b] = out
        n += int(mask.sum())
    return n
