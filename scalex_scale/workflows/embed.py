"""``ss.embed``: the encoder's ``mu`` for every atlas cell, streamed (raw counts -> model input -> mu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ScalexError
from ..nn import SCALEXModule
from ..nn.encode import ENCODE_BLOCK, encode_chunks
from ..preprocessing.runner import DaskRunner, atlas_ranges
from ..preprocessing.scaling import maxabs_rows
from ..preprocessing.state import PreprocessState
from ..preprocessing.transform import transform_chunk
from ..store import Atlas, transaction
from ._model import check_genes, latent_record, load_model, n_workers

__all__ = ["embed", "embed_rows"]


def embed(
    store: str | Path, model_dir: str | Path, *, device: str = "auto", key: str = "latent", lock_timeout: float | None = None
) -> int:
    """Write ``obsm[key]`` (encoder mean, float32, n_cells x 10) for every cell, in the atlas' cell order.

    Cells failing QC get NaN (see ``obs['scalex_qc_pass']``). Each batch is scaled by the one scaling rule
    (:mod:`scalex_scale.preprocessing.scaling`: projected batches with the MaxAbs their ``project`` recorded), so
    re-embedding reproduces the latent ``project`` wrote. Streams row ranges: memory does not grow with cells.
    One transaction: the atlas gets the whole new ``obsm[key]`` (and the record of the model that wrote it) or
    nothing. Returns the number of cells embedded.
    """
    module, model_config, _, state, dev = load_model(model_dir, device)
    with transaction(store, "embed", lock_timeout=lock_timeout) as txn:
        if txn.is_new:
            raise ScalexError(f"{store}: no such atlas")
        atlas = txn.atlas
        check_genes(atlas, model_config, model_dir)
        maxabs = maxabs_rows(atlas, state, (atlas.state.get("projection") or {}).get("maxabs"))
        writer = atlas.obsm_writer(key, module.n_latent)
        n = embed_rows(atlas, module, state, maxabs, writer, device=dev, n_workers=n_workers())
        obsm = dict(atlas.state.get("obsm") or {})
        obsm[key] = latent_record(model_dir, model_config, n)
        atlas.update_state("obsm", obsm)
    return n


def embed_rows(
    atlas: Atlas,
    module: SCALEXModule,
    state: PreprocessState,
    maxabs: np.ndarray,
    target: zarr.Array,  # noqa: F821
    *,
    rows: tuple[int, int] | None = None,
    device: torch.device,
    n_workers: int = 2,
) -> int:
    """Write ``mu`` of atlas rows ``[start, stop)`` into ``target`` (NaN for cells failing QC).

    ``maxabs`` holds one row per atlas batch code (:func:`~scalex_scale.preprocessing.scaling.maxabs_rows`).
    Reading + transforming (dask, ``n_workers``), densifying, copying and encoding overlap
    (:func:`scalex_scale.nn.encode.encode_chunks`; the same blocks as :func:`scalex_scale.nn.encode.encode`, so
    the same result). Returns the number of cells embedded. Memory: a few row ranges at a time.
    """
    start, stop = rows if rows is not None else (0, atlas.n_obs)
    runner = DaskRunner(str(atlas.directory), atlas_ranges(atlas.row_ranges(), start, stop), atlas.batch_codes, n_workers=n_workers)
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
