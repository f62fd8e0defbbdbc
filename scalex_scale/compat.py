"""A drop-in for the reference package's ``scalex.SCALEX(...)``: switch by changing an import.

``from scalex_scale import SCALEX`` accepts the reference's main arguments and returns an AnnData with
``obsm['latent']`` (cells that pass QC, as the reference does). The atlas and model stay in ``outdir``.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_IGNORED = {
    "gpu", "num_workers", "verbose", "show", "assess", "eval", "ignore_umap", "chunk_size", "backed",
    "fraction", "n_obs", "use_layer", "processed", "repeat", "impute", "groupby", "subsets", "cell_type",
    "min_cell_per_batch", "target_sum",
}  # fmt: skip


def SCALEX(  # noqa: N802 - the reference's name
    data_list: Any,
    batch_categories: Sequence[str] | None = None,
    profile: str = "RNA",
    batch_name: str = "batch",
    min_features: int | None = None,
    min_cells: int = 3,
    n_top_features: int | None = None,
    join: str = "inner",
    batch_key: str = "batch",
    keep_mt: bool = False,
    batch_size: int = 64,
    lr: float = 2e-4,
    max_iteration: int = 30000,
    seed: int = 124,
    outdir: str | Path | None = None,
    projection: str | Path | None = None,
    device: str = "auto",
    scale: str = "batch",
    **kwargs: Any,
):
    """Integrate (or, with ``projection``, project) data like the reference ``scalex.SCALEX``.

    Parameters
    ----------
    data_list
        A path / AnnData, or a list of them.
    batch_categories
        One batch name per input (the reference's ``batch_categories``).
    batch_name
        obs column holding the batch when ``batch_categories`` is not given (reference default ``'batch'``).
    batch_key
        Name of the returned obs column holding each cell's batch (the reference's ``batch_key``; the atlas itself
        always calls it ``batch``).
    profile, min_features, min_cells, n_top_features, join, keep_mt
        Preprocessing, as the reference (``min_features`` None: RNA 600, ATAC 100).
    batch_size, lr, max_iteration, seed
        Training, as the reference.
    outdir
        Where the atlas (``atlas.zarr``) and model (``model/``) are written; default: a temporary directory.
    projection
        An earlier ``outdir``: embed ``data_list`` with its model (no retraining) and return the reference cells
        plus the projected ones, with ``obs['projection']`` = ``'reference'`` / ``'query'``.
    device
        ``auto`` / ``cpu`` / ``cuda`` (replaces the reference's ``gpu`` index).
    scale
        ``batch`` (the paper) or ``global`` (the reference package's actual behaviour).
    **kwargs
        Other reference arguments are accepted and ignored with a warning naming them.

    Returns
    -------
    anndata.AnnData
        Raw counts of the cells passing QC, ``var['highly_variable']``, ``obsm['latent']``.

    Notes
    -----
    ``obsm['latent']`` is the encoder's ``mu`` in eval mode: deterministic, and a cell's embedding does not depend
    on which cells it is embedded with. scalex 1.0.4 embeds in train mode, in mini-batches of one batch each, so its
    encoder BatchNorm uses each mini-batch's statistics: for the same trained network that raises the batch-mixing
    score and lowers the cell-type silhouette (measured by ``bench/compare_reference.py``: README, "Measured so
    far"). Expect that shift in the scores when comparing with latents from the reference.
    """
    import anndata as ad
    import numpy as np

    from . import api
    from .train import TrainConfig

    unknown = sorted(set(kwargs) - _IGNORED)
    if unknown:
        raise TypeError(f"SCALEX() got unexpected arguments {unknown}")
    if kwargs:
        warnings.warn(f"SCALEX(): arguments ignored by scalex-scale: {sorted(kwargs)}", UserWarning, stacklevel=2)
    inputs = list(data_list) if isinstance(data_list, list | tuple) else [data_list]
    outdir = Path(outdir) if outdir is not None else Path(tempfile.mkdtemp(prefix="scalex_scale_"))
    bkey = None if batch_categories is not None else batch_name
    if projection is not None:
        ref = Path(projection)
        api.project(ref / "atlas.zarr", ref / "model", inputs, batch_key=bkey, batch_names=batch_categories,
                    query_store=outdir / "query.zarr", device=device)  # fmt: skip
        reference, query = ad.read_zarr(ref / "atlas.zarr"), ad.read_zarr(outdir / "query.zarr")
        adata = ad.concat({"reference": reference, "query": query}, label="projection", join="outer")
    else:
        train = TrainConfig(max_iterations=max_iteration, batch_size=batch_size, lr=lr, seed=seed, device=device)
        api.integrate(
            inputs, outdir, batch_key=bkey, batch_names=batch_categories, join=join, train=train, profile=profile,
            min_features=min_features, min_cells=min_cells, n_top_features=n_top_features, keep_mt=keep_mt,
            scale=scale,
        )  # fmt: skip
        adata = ad.read_zarr(outdir / "atlas.zarr")
    keep = np.isfinite(adata.obsm["latent"][:, 0])
    log.info("SCALEX: atlas and model in %s", outdir)
    adata = adata[keep].copy()
    adata.uns.pop("scalex_scale", None)
    adata.uns["scalex_scale_outdir"] = str(outdir)
    if batch_key != "batch":
        if batch_key in adata.obs:
            raise ValueError(f"SCALEX(batch_key={batch_key!r}): the data already have an obs column of that name")
        adata.obs = adata.obs.rename(columns={"batch": batch_key})
    return adata
