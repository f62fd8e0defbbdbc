#!/usr/bin/env python
"""scVI peer run for bench/annotation_real.py (runs in its own venv: bench/.scvi-venv or the shared peer venv).

One reference -> query split: scvi-tools' ``SCVI`` with its defaults except ``n_latent=10`` (the SCALEX latent size),
trained on the reference cells (``train()`` with its default epochs), then the query mapped scArches-style:
``SCVI.prepare_query_anndata`` + ``SCVI.load_query_data`` + ``train(max_epochs=200, plan_kwargs={"weight_decay":
0.0})`` (the scvi-tools scArches tutorial's settings). Genes: the HVGs our model used for the same split and seed
(``--hvg``); cells: those our run kept (``--cells``, QC), so both tools are scored on the same query cells.

Writes ``latent.npy`` (reference rows, then query rows; the query model's latent for both), ``obs.csv`` and
``run.json`` (timings, epochs, versions) to ``--outdir``. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--hvg", required=True, help="text file, one gene per line")
    p.add_argument("--cells", default=None, help="text file of the cell names to keep (both sides)")
    p.add_argument("--outdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-epochs", type=int, default=200)
    a = p.parse_args()

    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = a.seed
    scvi.settings.dl_num_workers = 0
    out = Path(a.outdir)
    genes = [g for g in Path(a.hvg).read_text().split("\n") if g]
    ref, query = ad.read_h5ad(a.ref), ad.read_h5ad(a.query)
    if a.cells:
        keep = set(Path(a.cells).read_text().split("\n"))
        ref, query = ref[ref.obs_names.isin(keep)].copy(), query[query.obs_names.isin(keep)].copy()
    ref, query = ref[:, genes].copy(), query[:, genes].copy()
    for x in (ref, query):
        x.obs = x.obs[["batch", "celltype"]].astype(str).astype("category")
        x.X = x.X.astype(np.float32)
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
    model = scvi.model.SCVI(ref, n_latent=10)
    model.train(accelerator="cpu", enable_progress_bar=False)
    t1 = time.perf_counter()
    scvi.model.SCVI.prepare_query_anndata(query, model)
    qmodel = scvi.model.SCVI.load_query_data(query, model)
    qmodel.train(max_epochs=a.query_epochs, plan_kwargs={"weight_decay": 0.0}, accelerator="cpu", enable_progress_bar=False)
    t2 = time.perf_counter()
    lat = np.vstack([qmodel.get_latent_representation(ref), qmodel.get_latent_representation(query)]).astype(np.float32)
    ref_lat_before = model.get_latent_representation(ref)
    np.save(out / "latent.npy", lat)
    pd.DataFrame({"cell": np.r_[ref.obs_names, query.obs_names], "batch": np.r_[ref.obs["batch"].astype(str), query.obs["batch"].astype(str)],
                  "celltype": np.r_[ref.obs["celltype"].astype(str), query.obs["celltype"].astype(str)],
                  "is_query": np.r_[np.zeros(ref.n_obs, bool), np.ones(query.n_obs, bool)]}).to_csv(out / "obs.csv", index=False)
    (out / "run.json").write_text(json.dumps({
        "reference_train_s": t1 - t0, "query_train_s": t2 - t1, "n_genes": len(genes), "n_ref": int(ref.n_obs),
        "n_query": int(query.n_obs), "reference_epochs": int(model.history["elbo_train"].shape[0]),
        "query_epochs": int(qmodel.history["elbo_train"].shape[0]),
        "reference_latent_unchanged_by_query_training": float(np.abs(ref_lat_before - lat[: ref.n_obs]).max()),
        "versions": {"scvi-tools": scvi.__version__, "torch": torch.__version__}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
