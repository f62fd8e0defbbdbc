#!/usr/bin/env python
"""Label transfer, scalex-scale vs the reference scalex==1.0.4, side by side.

Usage (our venv)::

    source /work/venv/bin/activate
    python bench/compare_transfer.py                 # CellBench + synthetic, seed 0, 3000 iterations
    python bench/compare_transfer.py --seeds 0,1,2
    python bench/compare_transfer.py --quick         # smoke run: seed 0, 100 iterations

Splits:
* CellBench (/work/shared/data/cellbench_lung_celllines.h5ad): reference = CELseq2_5cl_p1, _p2, _p3; query =
  CELseq2_3cl, Dropseq_3cl (all query types are present in the reference).
* synthetic (the set of compare_reference.py: 4000 cells, 4 batches, 6 types in 2 lineages, partial overlap, seed
  0): query = the batch holding a type absent from every other batch (batch0 / celltype5); reference = the other
  batches. The absent type is a SIBLING of reference types (same lineage program, 2% own marker genes).
* synthetic_distinct: the same design with every type its own lineage, so the absent type is unlike every
  reference type (the paper's tumour / plasma cells). Written to compare_transfer_distinct.json when run alone.

Reference: ``reference_runner.py fit`` on the reference split, ``project`` the query, then scikit-learn
``KNeighborsClassifier(n_neighbors=5)`` fitted on the reference cells' latent (the reference's own
``label_transfer``; both latents are the reference's own train-mode ``latent.npy``).
Ours: ``api.integrate`` on the reference split, ``api.project`` the query into the atlas, ``api.transfer`` (k 30,
default threshold, 'unassigned' allowed); also the parity kNN (k 5, ``knn_classifier_transfer``) on our latent.
Metrics on the query cells both tools kept: ARI, NMI, F1 (macro, over the true labels; 'unassigned' counts as
wrong). For the absent type: fraction called 'unassigned' (ours) vs fraction mislabelled (reference: every cell of
a type it never saw gets some reference label); and the cost: fraction of present-type query cells called
'unassigned'. Same max_iteration for both tools (default 3000, REDUCED from the reference default 30,000),
min_features 600, min_cells 3, 2000 HVGs, batch 64, lr 2e-4, GOMP_SPINCOUNT=10000, reference --num-workers 0.

Writes ``bench/results/<machine>/compare_transfer.json``; runs cached in ``--workdir`` (``--fresh`` reruns;
``--retransfer`` reruns only our ``api.transfer`` on the cached atlases, after a change to label transfer).
Committed: ``compare_transfer.json`` (cellbench, synthetic), ``compare_transfer_distinct.json``
(``--datasets synthetic_distinct``), ``compare_transfer_global.json`` (``--datasets synthetic --scale global``: our
MaxAbs scaling global, as scalex 1.0.4 does).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import shutil
import sys
import time
from pathlib import Path

from scalex_scale._openmp import bound_openmp_spin  # noqa: E402

bound_openmp_spin()  # before torch is imported (both tools run with it: see bench/README.md)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import results_dir, write_json  # noqa: E402
from compare_reference import (  # noqa: E402
    CELLBENCH,
    REF_PY,
    REF_RUNNER,
    SETTINGS,
    SYNTH,
    _run,
    cached_run,
    ours_integrate,
    ref_fit_cmd,
    run_setup,
    synthetic_h5ad,
)  # fmt: skip

SCALE = ["batch"]  # our MaxAbs scaling (set from --scale)
CB_REF = ["CELseq2_5cl_p1", "CELseq2_5cl_p2", "CELseq2_5cl_p3"]
CB_QUERY = ["CELseq2_3cl", "Dropseq_3cl"]
# name -> (SyntheticConfig overrides of compare_reference.SYNTH, file stem). "synthetic": 2 lineages of 3 types, so
# the absent type is a SIBLING of reference types (shares their lineage program, differs by its 2% marker genes);
# "synthetic_distinct": every type its own lineage, so the absent type is unlike every reference type (the paper's
# tumour / plasma cells).
SYNTHETIC_SETS = {"synthetic": (None, "synthetic_4k"),
                  "synthetic_distinct": ({"n_lineages": SYNTH["n_celltypes"]}, "synthetic_distinct_4k")}


def split(inp: Path, batches: list[str], out: Path) -> Path:
    if not out.exists():
        _run([str(REF_PY), str(HERE / "split_h5ad.py"), str(inp), "--batches", ",".join(batches), "--out", str(out)],
             out.with_suffix(".log"))
    return out


def datasets(names: list[str], work: Path) -> dict:
    out = {}
    for n in names:
        if n == "cellbench":
            out[n] = {"ref": split(CELLBENCH, CB_REF, work / "cb_ref.h5ad"),
                      "query": split(CELLBENCH, CB_QUERY, work / "cb_query.h5ad"),
                      "ref_batches": CB_REF, "query_batches": CB_QUERY, "absent_types": []}
        elif n in SYNTHETIC_SETS:
            path, info = synthetic_h5ad(work, *SYNTHETIC_SETS[n])
            pre = "syn" if n == "synthetic" else n
            absent = info["batch_specific_types"]  # type -> its only batch
            qb = sorted(set(absent.values()))[:1]
            allb = list(info["presence"])
            rb = [b for b in allb if b not in qb]
            present_ref = {t for b in rb for t in info["presence"][b]}
            out[n] = {"ref": split(path, rb, work / f"{pre}_ref.h5ad"), "query": split(path, qb, work / f"{pre}_query.h5ad"),
                      "ref_batches": rb, "query_batches": qb,
                      "absent_types": sorted(t for t in info["presence"][qb[0]] if t not in present_ref),
                      "presence": info["presence"]}
        else:
            raise SystemExit(f"unknown dataset {n!r}")
    return out


# ----------------------------------------------------------------------------------------------- runs
def ref_run(d: dict, outdir: Path, seed: int, iterations: int, threads: int, fresh: bool) -> Path:
    def run() -> dict:
        w1 = _run(ref_fit_cmd(d["ref"], outdir / "fit", seed, iterations, threads), outdir / "fit.log")
        proj = [str(REF_PY), str(REF_RUNNER), "project", "--input", str(d["query"]), "--model", str(outdir / "fit"),
                "--outdir", str(outdir / "proj"), "--seed", str(seed), "--num-workers", "0",
                "--min-features", str(SETTINGS["min_features"])] + (["--threads", str(threads)] if threads else [])
        w2 = _run(proj, outdir / "proj.log")
        (outdir / "proj" / "adata.h5ad").unlink(missing_ok=True)  # big, not needed
        return {"fit_wall_s": w1, "project_wall_s": w2}

    return cached_run(outdir, fresh, run)


def ours_run(d: dict, outdir: Path, seed: int, iterations: int, threads: int, fresh: bool) -> Path:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_ours", "--ref", str(d["ref"]), "--query", str(d["query"]),
           "--query-batches", ",".join(d["query_batches"]), "--outdir", str(outdir), "--seed", str(seed),
           "--iterations", str(iterations), "--threads", str(threads), "--scale", SCALE[0]]
    return cached_run(outdir, fresh, lambda: {"wall_s": _run(cmd, outdir.parent / f"{outdir.name}.log")})


def cmd_ours(a) -> None:
    from scalex_scale import api

    out = Path(a.outdir)
    t0 = time.perf_counter()
    res = ours_integrate(a.ref, out / "run", a.seed, a.iterations, a.threads, scale=a.scale)
    t1 = time.perf_counter()
    api.project(res.atlas, res.model_dir, [a.query], batch_key="batch")
    t2 = time.perf_counter()
    summ = transfer_and_dump(res.atlas, a.query_batches.split(","), out)
    t3 = time.perf_counter()
    (out / "run.json").write_text(json.dumps({
        "integrate_s": t1 - t0, "project_s": t2 - t1, "transfer_s": t3 - t2,
        "train": {"n_iterations": res.train.n_iterations, "seconds": res.train.seconds, "n_epochs": res.train.n_epochs},
        "transfer_summary": {"n_reference": summ.n_reference, "n_query": summ.n_query, "counts": summ.counts,
                             "metrics": summ.metrics} if hasattr(summ, "n_reference") else str(summ)}, indent=2, default=str))
    shutil.rmtree(out / "run" / "atlas.zarr" / "layers", ignore_errors=True)


def transfer_and_dump(store: Path, query_batches: list[str], out: Path):
    """``api.transfer`` (k 30, defaults) on the atlas; write ``obs.csv`` and ``latent.npy`` to ``out``."""
    from scalex_scale import api
    from scalex_scale.store import Atlas

    summ = api.transfer(store, "celltype", query_batches=query_batches)  # default TransferConfig: k 30
    atlas = Atlas.open(store)
    lat = np.asarray(atlas.root["obsm"]["latent"][:], dtype=np.float32)
    obs = atlas.obs
    df = pd.DataFrame({"cell": obs.index.astype(str), "batch": obs["batch"].astype(str).to_numpy(),
                       "celltype": obs["celltype"].astype(str).to_numpy(),
                       "pred_k30": obs["celltype_transfer"].astype(str).to_numpy(),
                       "conf_k30": obs["celltype_transfer_confidence"].to_numpy(),
                       "ok": np.isfinite(lat).all(axis=1)})
    df.to_csv(out / "obs.csv", index=False)
    np.save(out / "latent.npy", lat)
    return summ


# ----------------------------------------------------------------------------------------------- metrics
def label_metrics(true: np.ndarray, pred: np.ndarray, absent: list[str]) -> dict:
    from scalex_scale.metrics import ari, f1_scores, nmi

    r = {"ARI": float(ari(true, pred)), "NMI": float(nmi(true, pred)), **f1_scores(true, pred),
         "accuracy": float((true == pred).mean()), "n": int(len(true))}
    known = ~np.isin(true, absent)
    r["accuracy_present_types"] = float((true[known] == pred[known]).mean())
    r["unassigned_present_types"] = float((pred[known] == "unassigned").mean())
    for t in absent:
        m = true == t
        vc = pd.Series(pred[m]).value_counts()
        r[f"absent_{t}"] = {"n": int(m.sum()), "fraction_unassigned": float((pred[m] == "unassigned").mean()),
                            "fraction_mislabelled": float((pred[m] != "unassigned").mean()),
                            "called_as": {str(k): int(v) for k, v in vc.items()}}
    return r


def evaluate(name: str, d: dict, seed: int, od: Path, rd: Path) -> dict:
    from scalex_scale.metrics.label_transfer import knn_classifier_transfer

    absent = d["absent_types"]
    # reference
    rlat = np.load(rd / "fit" / "latent.npy")
    robs = pd.read_csv(rd / "fit" / "obs.csv", dtype=str)
    qlat = np.load(rd / "proj" / "latent.npy")
    qobs = pd.read_csv(rd / "proj" / "obs.csv", dtype=str)
    rpred = pd.Series(knn_classifier_transfer(rlat, robs["celltype"].to_numpy(), qlat, k=5).astype(str),
                      index=qobs["cell"].to_numpy())
    # side column: the reference's eval-mode latents (what scalex-scale would report for the same network)
    rpe = pd.Series(knn_classifier_transfer(np.load(rd / "fit" / "latent_eval.npy"), robs["celltype"].to_numpy(),
                                            np.load(rd / "proj" / "latent_eval.npy"), k=5).astype(str),
                    index=qobs["cell"].to_numpy())
    # ours
    o = pd.read_csv(od / "obs.csv", dtype={"cell": str, "celltype": str, "pred_k30": str, "batch": str})
    olat = np.load(od / "latent.npy")
    ok = o["ok"].astype(bool).to_numpy()
    isq = o["batch"].isin(d["query_batches"]).to_numpy()
    ref_m, q_m = ok & ~isq, ok & isq
    opar = knn_classifier_transfer(olat[ref_m], o.loc[ref_m, "celltype"].to_numpy(), olat[q_m], k=5).astype(str)
    ocells = o.loc[q_m, "cell"].to_numpy()
    o30 = pd.Series(o.loc[q_m, "pred_k30"].to_numpy(), index=ocells)
    o5 = pd.Series(opar, index=ocells)
    truth = pd.Series(o.loc[q_m, "celltype"].to_numpy(), index=ocells)
    common = o30.index.intersection(rpred.index)
    t = truth[common].to_numpy()
    ri = json.loads((rd / "done").read_text())
    oi = json.loads((od / "run.json").read_text())
    return {
        "dataset": name, "seed": seed, "n_query_ours": int(q_m.sum()), "n_query_ref": int(len(qobs)),
        "n_query_common": int(len(common)), "n_reference_cells_ours": int(ref_m.sum()), "n_reference_cells_ref": int(len(robs)),
        "ours_k30": label_metrics(t, o30[common].to_numpy(), absent),
        "ours_parity_k5": label_metrics(t, o5[common].to_numpy(), absent),
        "ref_k5": label_metrics(t, rpred[common].to_numpy(), absent),
        "ref_eval_latent_k5": label_metrics(t, rpe[common].to_numpy(), absent),
        "timing": {"ours": {k: oi[k] for k in ("integrate_s", "project_s", "transfer_s")} | {"train": oi["train"]},
                   "ref": ri},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    o = sub.add_parser("_ours", help="internal: one scalex-scale integrate + project + transfer")
    for k in ("--ref", "--query", "--query-batches", "--outdir"):
        o.add_argument(k, required=True)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--iterations", type=int, default=3000)
    o.add_argument("--threads", type=int, default=0)
    o.add_argument("--scale", default="batch", choices=("batch", "global"))
    p.add_argument("--scale", default="batch", choices=("batch", "global"),
                   help="our MaxAbs scaling: per batch (method, default) or global (what scalex 1.0.4 actually does)")
    p.add_argument("--datasets", default="cellbench,synthetic")
    p.add_argument("--seeds", default="0")
    p.add_argument("--iterations", type=int, default=3000, help="max_iteration for BOTH tools (reference default 30000)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with 1 torch thread when > 1)")
    p.add_argument("--workdir", default=str(HERE / "_work" / "xfer"))
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--retransfer", action="store_true",
                   help="rerun only our api.transfer on cached runs (after a change to label transfer; no retraining)")
    p.add_argument("--quick", action="store_true", help="smoke run: seed 0, 100 iterations, separate workdir")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.cmd == "_ours":
        cmd_ours(a)
        return 0
    work, names, seeds, threads = run_setup(a)
    SCALE[0] = a.scale
    sfx = "" if a.scale == "batch" else f"_{a.scale}"
    data = datasets(names, work)
    if a.retransfer:
        for n in names:
            for s in seeds:
                od = work / f"{n}_ours_s{s}_it{a.iterations}{sfx}"
                if (od / "done").exists():
                    transfer_and_dump(od / "run" / "atlas.zarr", data[n]["query_batches"], od)
                    print(f"re-transferred {od.name}", flush=True)
    t0 = time.time()
    with cf.ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = {}
        for n in names:
            for s in seeds:
                for tool, fn in (("ref", ref_run), ("ours", ours_run)):
                    futs[ex.submit(fn, data[n], work / f"{n}_{tool}_s{s}_it{a.iterations}{sfx if tool == 'ours' else ''}", s, a.iterations, threads,
                                   a.fresh)] = (n, s, tool)
        for f in cf.as_completed(futs):
            try:
                f.result()
                print(f"[{time.time() - t0:7.0f}s] done {futs[f]}", flush=True)
            except Exception as e:
                print(f"FAILED {futs[f]}: {e}", flush=True)
    rows = []
    for n in names:
        for s in seeds:
            od, rd = work / f"{n}_ours_s{s}_it{a.iterations}{sfx}", work / f"{n}_ref_s{s}_it{a.iterations}"
            if (od / "done").exists() and (rd / "done").exists():
                rows.append(evaluate(n, data[n], s, od, rd))
    summary = {}
    for n in names:
        rr = [r for r in rows if r["dataset"] == n]
        if not rr:
            continue
        sm = {}
        for tool in ("ours_k30", "ours_parity_k5", "ref_k5", "ref_eval_latent_k5"):
            sm[tool] = {m: float(np.mean([r[tool][m] for r in rr]))
                        for m in ("ARI", "NMI", "f1_macro", "accuracy", "accuracy_present_types", "unassigned_present_types")}
            for t in data[n]["absent_types"]:
                sm[tool][f"absent_{t}_fraction_unassigned"] = float(np.mean([r[tool][f"absent_{t}"]["fraction_unassigned"] for r in rr]))
                sm[tool][f"absent_{t}_fraction_mislabelled"] = float(np.mean([r[tool][f"absent_{t}"]["fraction_mislabelled"] for r in rr]))
        sm["delta_ours_k30_minus_ref"] = {m: sm["ours_k30"][m] - sm["ref_k5"][m] for m in ("ARI", "NMI", "f1_macro")}
        sm["delta_ours_parity_k5_minus_ref"] = {m: sm["ours_parity_k5"][m] - sm["ref_k5"][m] for m in ("ARI", "NMI", "f1_macro")}
        sm["delta_ours_parity_k5_minus_ref_eval_latent"] = {m: sm["ours_parity_k5"][m] - sm["ref_eval_latent_k5"][m]
                                                           for m in ("ARI", "NMI", "f1_macro")}
        sm["n_seeds"] = len(rr)
        summary[n] = sm
    payload = {
        "description": "label transfer on query cells both tools kept: ours = api.transfer (k=30, threshold 0.5, "
                       "'unassigned' allowed) and parity kNN k=5 on our latent; reference = scalex 1.0.4 fit + "
                       "project, KNeighborsClassifier(5) on its own latent (train-mode latent.npy); side column ref_eval_latent_k5: the "
                       "same kNN on the reference's eval-mode latents (latent_eval.npy of fit and project)",
        "budget_note": f"REDUCED budget: max_iteration = {a.iterations} for BOTH tools (reference default 30,000)",
        "settings": {**SETTINGS, "max_iteration": a.iterations, "seeds": seeds, "jobs": a.jobs,
                     "torch_threads_per_run": threads or "default", "reference_num_workers": 0,
                     "scaling": f"ours {a.scale} (method default: batch), reference 1.0.4 global"},
        "splits": {n: {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()} for n, d in data.items()},
        "summary": summary, "per_seed": rows, "quick": a.quick,
    }
    out = Path(a.out) if a.out else (work / "compare_transfer_quick.json" if a.quick else results_dir() / "compare_transfer.json")
    write_json(out, payload)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
