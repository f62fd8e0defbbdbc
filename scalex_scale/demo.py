"""``scalex-scale demo``: the whole story on built-in synthetic data (no download, no ../shared).

Four studies with partially overlapping cell types; three build the atlas, the fourth is held back, projected
without retraining and annotated by label transfer (a type it has that the atlas lacks should come out
``unassigned``); then metrics and plots.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .errors import ScalexError


def _say(step: int, text: str, t0: float) -> None:
    print(f"[{step}/7 {time.perf_counter() - t0:6.1f}s] {text}", flush=True)


def run_demo(outdir: str | Path = "scalex_demo", *, n_cells: int = 6000, max_iterations: int = 1500, device: str = "auto", seed: int = 0) -> dict:
    """Run the demo into ``outdir`` (replaced if it holds an earlier demo); returns the headline numbers."""
    from . import api
    from .store import Atlas
    from .synthetic import SyntheticConfig, celltype_presence, make_synthetic
    from .train import TrainConfig

    t0 = time.perf_counter()
    out = Path(outdir)
    if out.exists():
        if not (out / "demo.txt").exists():
            raise ScalexError(f"{out}: exists and is not an earlier demo (no demo.txt), so it is left alone; choose another --outdir")
        shutil.rmtree(out)
    (out / "inputs").mkdir(parents=True)
    (out / "demo.txt").write_text("scalex-scale demo output\n")
    cfg = SyntheticConfig(n_cells=n_cells, n_genes=3000, n_batches=4, n_celltypes=8, mean_genes_per_cell=1000, seed=seed)
    _say(1, f"generating {n_cells:,} synthetic cells x {cfg.n_genes:,} genes in 4 studies (partially overlapping types)", t0)
    adata = make_synthetic(cfg)
    presence = celltype_presence(cfg)
    studies = sorted(adata.obs["batch"].unique())
    query = studies[-1]
    paths = []
    for b in studies:
        p = out / "inputs" / f"{b}.h5ad"
        adata[adata.obs["batch"] == b].copy().write_h5ad(p)
        paths.append(p)
    ref_types = set(presence.columns[presence.loc[studies[:-1]].any(axis=0)])
    novel = sorted(set(presence.columns[presence.loc[query]]) - ref_types)
    atlas, model = out / "atlas.zarr", out / "model"

    _say(2, f"ingesting studies {', '.join(studies[:-1])} into {atlas} (study {query} is held back)", t0)
    api.ingest(atlas, paths[:-1], batch_names=studies[:-1])
    _say(3, "preprocessing: QC filters, normalize + log1p, 2,000 HVGs by batch, MaxAbs per batch", t0)
    state = api.preprocess(atlas)
    print(f"        {state.n_cells_kept:,} cells pass QC; {state.n_features:,} features", flush=True)
    _say(4, f"training SCALEX ({max_iterations:,} iterations at batch 64) and embedding", t0)
    api.fit(atlas, model, TrainConfig(max_iterations=max_iterations, device=device, seed=seed))
    api.embed(atlas, model, device=device)
    _say(5, f"projecting held-back study {query} with the frozen encoder", t0)
    print("        " + api.project(atlas, model, [paths[-1]], batch_names=[query], device=device).summary().replace("\n", "\n        "), flush=True)
    _say(6, "transferring cell-type labels from the atlas to the projected study", t0)
    summary = api.transfer(atlas, "celltype", query_batches=[query])
    print("        " + summary.summary().replace("\n", "\n        "), flush=True)
    obs = Atlas.open(atlas).obs
    q = obs[obs["batch"] == query]
    if novel:
        m = q["celltype"].isin(novel).to_numpy()
        frac = float((q["celltype_transfer"][m].astype(str) == "unassigned").mean()) if m.any() else float("nan")
        print(f"        cell types absent from the atlas ({', '.join(novel)}): {frac:.0%} called 'unassigned'", flush=True)
    else:
        frac = float("nan")
    _say(7, f"evaluating the integration and writing plots to {out / 'report'}", t0)
    report = api.evaluate(atlas, label_key="celltype", out=out / "report", seed=seed)
    print("        " + report.table().replace("\n", "\n        "), flush=True)
    print(f"done in {time.perf_counter() - t0:.0f} s: atlas {atlas}, model {model}, report {out / 'report'}", flush=True)
    return {"metrics": report.metrics, "transfer": summary.metrics, "novel_unassigned": frac, "seconds": time.perf_counter() - t0}
