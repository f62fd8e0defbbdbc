"""``ss.project``: new studies through the frozen encoder, appended to the atlas (or a query store) as new batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ScalexError
from ..preprocessing.scaling import maxabs_rows, projection_maxabs
from ..store import AppendOptions, append, transaction
from ..store.readers import open_input
from ._model import check_genes, latent_record, load_model, n_workers
from .embed import embed_rows

log = logging.getLogger(__name__)

__all__ = ["ProjectReport", "project"]


@dataclass(frozen=True)
class ProjectReport:
    store: str
    batches: dict[str, int]
    n_embedded: int
    genes_missing: dict[str, int] = field(default_factory=dict)
    genes_dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"projected {sum(self.batches.values()):,} cells into {self.store} ({self.n_embedded:,} pass QC)"]
        lines += [f"  batch {b}: {n:,} cells" for b, n in self.batches.items()]
        for name, n in self.genes_missing.items():
            lines.append(f"  {name}: {n:,} model genes missing (filled with 0), {self.genes_dropped[name]:,} extra dropped")
        return "\n".join(lines)


def project(
    store: str | Path,
    model_dir: str | Path,
    inputs: Sequence[Any],
    *,
    batch_key: str | None = None,
    batch_names: Sequence[str] | None = None,
    query_store: str | Path | None = None,
    device: str = "auto",
    allow_duplicates: bool = False,
    lock_timeout: float | None = None,
) -> ProjectReport:
    """Embed new data with the frozen encoder and append it to the atlas as new batches.

    New data are aligned to the model's genes (missing ones zero-filled and reported, extra ones dropped),
    filtered and normalized with the stored state, scaled with their own MaxAbs (per new batch, or over all of
    this call's cells with global scaling; recorded per batch, see :mod:`scalex_scale.preprocessing.scaling`) and
    embedded; no retraining, no new feature selection. With ``query_store`` they go to a separate atlas instead.
    A projected batch must be new: its name may not be one the atlas has already.

    One transaction (align + append + embed): a failed or interrupted ``project`` leaves nothing behind, so
    re-running it is safe; cells already projected (same names in the same batch, or the same source) are refused
    unless ``allow_duplicates``.
    """
    module, model_config, _, state, dev = load_model(model_dir, device)
    target = Path(query_store) if query_store is not None else Path(store)
    sources = [open_input(obj, i) for i, obj in enumerate(inputs)]
    try:
        with transaction(target, "project", lock_timeout=lock_timeout) as txn:
            if txn.is_new:
                if query_store is None:
                    raise ScalexError(f"{store}: no such atlas")
                var_names = model_config.get("var_names")
                if var_names is None:
                    raise ScalexError(f"{model_dir}: checkpoint lacks the atlas gene list needed for a query store")
                atlas = txn.create(var_names)
                atlas.update_state("reference", {"atlas": str(Path(store).resolve()), "model": str(Path(model_dir).resolve())})
            else:
                atlas = txn.atlas
            check_genes(atlas, model_config, model_dir, projecting=True)
            existing = set(atlas.batch_categories)
            options = AppendOptions(batch_key, batch_names, allow_duplicates=allow_duplicates, record="projection")
            report = append(atlas, sources, options)
            clash = sorted(existing & set(report.batches_added))
            if clash:
                raise ScalexError(
                    f"{target}: batch {', '.join(map(repr, clash))} exists already; a projected batch is scaled with "
                    "its own MaxAbs, so it needs a new name: pass --batch-names"
                )
            n0, n1 = report.n_rows_before, atlas.n_obs
            projection = atlas.state.get("projection") or {}
            projection.setdefault("maxabs", {}).update(
                projection_maxabs(atlas, state, (n0, n1), list(report.batches_added), n_workers())
            )
            atlas.update_state("projection", projection)
            maxabs = maxabs_rows(atlas, state, projection["maxabs"])
            if "latent" not in atlas.obsm_keys():
                writer = atlas.obsm_writer("latent", module.n_latent)
                writer[:] = np.full(writer.shape, np.nan, dtype=np.float32)
            latent = atlas.root["obsm"]["latent"]
            n = embed_rows(atlas, module, state, maxabs, latent, rows=(n0, n1), device=dev, n_workers=n_workers())
            qc = np.isfinite(latent[n0:n1, 0])
            prev = atlas.obs["scalex_qc_pass"].to_numpy(dtype=bool, na_value=False)[:n0] if "scalex_qc_pass" in atlas.obs else np.zeros(n0, bool)
            atlas.write_obs_columns({"scalex_qc_pass": np.concatenate([prev, qc])})
            obsm = dict(atlas.state.get("obsm") or {})
            record = obsm.get("latent") or latent_record(model_dir, model_config, 0)
            mine = latent_record(model_dir, model_config, 0)["model_id"]
            if record.get("model_id") and mine and record["model_id"] != mine:
                raise ScalexError(
                    f"{target}: obsm['latent'] was written by another model ({record.get('directory')}); embed the "
                    f"atlas with this one first (`scalex-scale embed {target} {model_dir}`) or project with that model"
                )
            record["n_embedded"] = int(record.get("n_embedded", 0)) + n
            obsm["latent"] = record
            atlas.update_state("obsm", obsm)
    finally:
        for src in sources:
            src.close()
    return ProjectReport(str(target), report.batches_added, n, report.genes_missing, report.genes_dropped)
