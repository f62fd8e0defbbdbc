"""``ss.preprocess``: QC, normalization, feature selection and scaling of an atlas; writes the training matrix.

The passes are :mod:`scalex_scale.preprocessing.passes`, run over the atlas' row ranges by
:class:`~scalex_scale.preprocessing.runner.DaskRunner`; a third pass transforms the rows of the cells that pass
QC and writes them in a random row permutation (:mod:`scalex_scale.store.training`). The run is one transaction:
matrix, var, obs and state are committed together, so a failed run leaves the atlas as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._fs import sibling
from .._options import field_names, split_shortcuts
from ..errors import PreprocessError
from ..preprocessing.passes import preprocess_chunks
from ..preprocessing.runner import RANGE_VALUES, ComputeOptions, DaskRunner
from ..preprocessing.state import PreprocessConfig, PreprocessState
from ..preprocessing.transform import transform_chunk
from ..store.atlas import Atlas
from ..store.training import PermutedWriter
from ..store.txn import transaction

log = logging.getLogger(__name__)

__all__ = ["preprocess"]

_CONFIG_FIELDS = field_names(PreprocessConfig)
_COMPUTE_FIELDS = field_names(ComputeOptions)


def preprocess(
    store: str | Path,
    config: PreprocessConfig | None = None,
    *,
    seed: int = 0,
    compute: ComputeOptions | None = None,
    lock_timeout: float | None = None,
    **options: Any,
) -> PreprocessState:
    """Preprocess an atlas: QC filters, normalization, feature selection, scaling; write the training matrix.

    Parameters
    ----------
    store
        Atlas path.
    config
        What to compute (:class:`~scalex_scale.preprocessing.PreprocessConfig`: profile, filters, number of
        features, scaling per batch or global, ...). Default: the method's defaults for the profile recorded at
        ingest.
    seed
        Seed of the training matrix' random row order (stored in the state).
    compute
        Where to run (:class:`~scalex_scale.preprocessing.runner.ComputeOptions`: a dask client or scheduler
        address, local threads, the permuted write's memory bound).
    lock_timeout
        Seconds to wait for another writer of the atlas (None: wait; 0: fail at once).
    **options
        Shortcuts for single fields of ``config`` or ``compute``, e.g. ``n_top_features=500, n_workers=2``
        (scanpy style); ``profile`` defaults to the one recorded at ingest.

    Returns
    -------
    PreprocessState
        Also stored in the atlas (``uns/scalex_scale/state``), with ``n_train`` and ``permutation_seed``.
    """
    fields, compute_fields = split_shortcuts("preprocess", options, _CONFIG_FIELDS, _COMPUTE_FIELDS)
    compute = dataclasses.replace(compute or ComputeOptions(), **compute_fields)
    fields = {k: v for k, v in fields.items() if v is not None}
    t0 = time.perf_counter()
    with transaction(store, "preprocess", lock_timeout=lock_timeout) as txn:
        if txn.is_new:
            raise PreprocessError(f"{store}: no such atlas; create it with `scalex-scale ingest {store} INPUTS`")
        atlas = txn.atlas
        if config is None:
            profile = fields.pop("profile", None) or (atlas.state.get("ingest") or {}).get("profile", "RNA")
            config = PreprocessConfig(profile=profile, **fields)
        elif fields:
            config = dataclasses.replace(config, **fields)
        return _preprocess(atlas, config, seed, compute, t0)


def _preprocess(atlas: Atlas, config: PreprocessConfig, seed: int, compute: ComputeOptions, t0: float) -> PreprocessState:
    if atlas.n_obs == 0:
        raise PreprocessError(f"{atlas.path}: the atlas has no cells")
    client, own_client = compute.client, False
    if client is None and compute.scheduler is not None:
        from distributed import Client

        client, own_client = Client(compute.scheduler), True
    try:
        runner = DaskRunner(
            str(atlas.directory), atlas.row_ranges(target_nnz=RANGE_VALUES), atlas.batch_codes, client=client,
            n_workers=compute.threads,
        )  # fmt: skip
        batches = atlas.batch_categories
        try:
            result = preprocess_chunks(None, atlas.var_names, batches, config, runner=runner)
        except ValueError as err:
            raise PreprocessError(f"{atlas.path}: {err}") from err
        kept = result.cell_stats.n_cells_kept
        empty = [b for b, n in zip(batches, kept, strict=True) if n == 0]
        if empty:
            raise PreprocessError(
                f"{atlas.path}: batch {', '.join(map(repr, empty))} has no cells left after filtering "
                f"(min_features={config.min_features}); lower --min-features or leave the batch out"
            )
        log.info(
            "preprocess: %d of %d cells pass QC, %d features selected (%.1f s)",
            int(kept.sum()), atlas.n_obs, result.state.n_features, time.perf_counter() - t0,
        )
        state = dataclasses.replace(result.state, qc_cells=_qc_cells(atlas, batches, kept, config))
        n_train = int(result.cell_mask.sum())
        record = {**state.to_dict(), "n_train": n_train, "permutation_seed": int(seed), "n_obs": atlas.n_obs}
        record["train_id"] = _write_training_matrix(atlas, runner, state, result.cell_mask, seed, compute.bucket_values, record)
    finally:
        if own_client:
            client.close()
    var = atlas.var.drop(columns=[c for c in result.var.columns if c in atlas.var.columns])
    var = pd.concat([var, result.var.drop(columns=["qc"])], axis=1)
    atlas.write_var(var)
    atlas.write_obs_columns({"scalex_qc_pass": result.cell_mask})
    atlas.update_state("preprocess", record)
    log.info("preprocess: wrote %d training rows in %.1f s", n_train, time.perf_counter() - t0)
    return state


#: A batch losing more than this share of its cells at QC is warned about.
QC_WARN_FRACTION = 0.5


def _qc_cells(atlas: Atlas, batches: Any, kept: np.ndarray, config: PreprocessConfig) -> dict[str, tuple[int, int]]:
    """``{batch: (cells, cells passing QC)}``; logs one warning line per batch that lost more than half."""
    total = np.bincount(np.asarray(atlas.batch_codes), minlength=len(batches))
    out = {str(b): (int(n), int(k)) for b, n, k in zip(batches, total, kept, strict=True)}
    for b, (n, k) in out.items():
        if n and (n - k) > QC_WARN_FRACTION * n:
            log.warning(
                "warning: preprocess: batch %r lost %s of its %s cells (%.0f%%) at QC (fewer than min_features=%s "
                "features); lower --min-features to keep more", b, f"{n - k:,}", f"{n:,}", 100 * (n - k) / n,
                config.min_features,
            )  # fmt: skip
    return out


def _write_training_matrix(
    atlas: Atlas, runner: DaskRunner, state: PreprocessState, cell_mask: np.ndarray, seed: int, bucket_values: int,
    record: dict[str, Any],
) -> str:  # fmt: skip
    """Third pass: transform QC-passing rows and write them permuted as the training matrix; returns its id."""
    spill = sibling(atlas.path, "spill")
    writer = PermutedWriter(
        spill, int(atlas.indptr[-1]), np.random.default_rng(seed), n_features=state.n_features, bucket_values=bucket_values
    )
    try:
        for (start, _stop), (values, mask) in zip(
            runner.ranges, runner.map_ordered(lambda x, codes: transform_chunk(x, codes, state)), strict=True
        ):
            rows = start + np.flatnonzero(mask)
            writer.add(values.indptr, values.indices, values.data, rows, runner.codes[rows])
        return writer.finish(atlas, record)  # the id names the content: the same inputs give the same id
    except BaseException:
        writer.abort()
        raise
