#!/usr/bin/env python
"""Integration quality, scalex-scale vs the reference scalex==1.0.4, side by side on the same data and settings.

Usage (our venv; the reference runs through ``bench/reference_runner.py`` with ``bench/.ref-venv/bin/python``)::

    source /work/venv/bin/activate
    python bench/compare_reference.py                      # 2 datasets x seeds 0,1,2 x 2 tools, 3000 iterations
    python bench/compare_reference.py --quick              # smoke run: CellBench + synthetic, seed 0, 100 iterations
    python bench/compare_reference.py --default-schedule   # also 1 seed on CellBench with the default 30,000 budget

Defaults: min_features 600, min_cells 3, 2000 HVGs, batch 64, lr 2e-4, SAME max_iteration for both tools
(``--iterations``, default 3000 - a REDUCED budget, not the reference default 30,000), seeds 0,1,2, ``--jobs 2``
runs two trainings at a time with 1 torch thread each (timings then are not speed benchmarks: see
bench_train.py). GOMP_SPINCOUNT=10000 for both tools; reference DataLoader ``--num-workers 0``. ``--precision bf16``
runs ours with bfloat16 autocast (cached apart, written to ``compare_reference_bf16.json``).
Our preprocessing scales per batch (the method; our default); the reference 1.0.4 scales globally. ``--scale global``
runs ours with global scaling too (cached apart, written to ``compare_reference[_bf16]_global.json``).

Datasets: ``cellbench`` (/work/shared/data/cellbench_lung_celllines.h5ad, obs batch/celltype) and ``synthetic``
(scalex_scale.synthetic, 4000 cells x 3000 genes, 4 batches, 6 types, partial overlap, mean 1000 genes/cell,
seed 0, written to an .h5ad in the work dir; which types are batch-specific is recorded).

Per tool and seed: the latent (reference: its own ``latent.npy`` = train-mode embedding, what its users get;
``latent_eval.npy`` as a side column), restricted to the cells both tools kept (by cell name); batch entropy
mixing score (METHOD.md, reference-compatible value, max ln 2) and cell-type silhouette on the latent; mean over
seeds; ours - reference (goal >= -0.02 for both). Over-correction (synthetic): for each batch-specific type, the
mean silhouette of its cells (labels = all types) and the fraction of their 30 nearest neighbours with the same
type; ours must not be worse than the reference.

Writes ``bench/results/<machine>/compare_reference.json`` and ``compare_reference.csv``. Runs are cached in
``--workdir`` (a run whose ``done`` marker exists is reused; ``--fresh`` reruns).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scalex_scale._openmp import bound_openmp_spin  # noqa: E402

bound_openmp_spin()  # before torch is imported (both tools run with it: see bench/README.md)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import REPO, results_dir, write_json  # noqa: E402

REF_PY = HERE / ".ref-venv" / "bin" / "python"
REF_RUNNER = HERE / "reference_runner.py"
CELLBENCH = Path("/work/shared/data/cellbench_lung_celllines.h5ad")
SETTINGS = dict(min_features=600, min_cells=3, n_top_features=2000, batch_size=64, lr=2e-4)
SYNTH = dict(n_cells=4000, n_genes=3000, n_batches=4, n_celltypes=6, mean_genes_per_cell=1000, partial_overlap=True, seed=0)


# ----------------------------------------------------------------------------------------------- data
def synthetic_h5ad(workdir: Path, overrides: dict | None = None, name: str = "synthetic_4k") -> tuple[Path, dict]:
    """Write the synthetic partially-overlapping set (SYNTH, updated with ``overrides``) to ``workdir/name.h5ad``;
    return its path and the presence table."""
    from scalex_scale.synthetic import SyntheticConfig, celltype_presence, make_synthetic

    config = {**SYNTH, **(overrides or {})}
    cfg = SyntheticConfig(**config)
    pres = celltype_presence(cfg)
    path = workdir / f"{name}.h5ad"
    if not path.exists():
        a = make_synthetic(cfg)
        a.uns = {}
        a.obs = a.obs[["batch", "celltype"]].astype(str).astype("category")
        a.var = a.var[[]]
        tmp = path.with_suffix(".tmp.h5ad")
        a.write_h5ad(tmp, compression="gzip")
        os.replace(tmp, path)
    info = {
        "config": config,
        "presence": {b: [t for t in pres.columns if pres.loc[b, t]] for b in pres.index},
        "batch_specific_types": {t: str(pres.index[pres[t]][0]) for t in pres.columns if pres[t].sum() == 1},
    }
    return path, info


def dataset(name: str, workdir: Path) -> tuple[Path, dict]:
    if name == "cellbench":
        return CELLBENCH, {"path": str(CELLBENCH)}
    if name == "synthetic":
        return synthetic_h5ad(workdir)
    raise SystemExit(f"unknown dataset {name!r}")


# ----------------------------------------------------------------------------------------------- runs
def _run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}), see {log}: {' '.join(cmd)}")
    return wall


def cached_run(outdir: Path, fresh: bool, run) -> Path:
    """Run ``run()`` into a fresh ``outdir`` unless an earlier run completed there (marker file ``done``)."""
    if (outdir / "done").exists() and not fresh:
        return outdir
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    (outdir / "done").write_text(json.dumps(run()))
    return outdir


def ref_fit_cmd(inp: Path, outdir: Path, seed: int, iterations: int, threads: int) -> list[str]:
    """``reference_runner.py fit`` with the comparison SETTINGS."""
    cmd = [str(REF_PY), str(REF_RUNNER), "fit", "--input", str(inp), "--outdir", str(outdir), "--seed", str(seed),
           "--max-iteration", str(iterations), "--num-workers", "0", "--min-features", str(SETTINGS["min_features"]),
           "--min-cells", str(SETTINGS["min_cells"]), "--n-top-features", str(SETTINGS["n_top_features"]),
           "--batch-size", str(SETTINGS["batch_size"]), "--lr", str(SETTINGS["lr"])]
    return cmd + (["--threads", str(threads)] if threads else [])


def ours_integrate(inp: Path, outdir: Path, seed: int, iterations: int, threads: int, precision: str = "fp32",
                   **preprocess):
    """scalex-scale's ``api.integrate`` with the comparison SETTINGS (in this process)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from scalex_scale import api
    from scalex_scale.train import TrainConfig

    cfg = TrainConfig(max_iterations=iterations, batch_size=SETTINGS["batch_size"], lr=SETTINGS["lr"], seed=seed,
                      progress=False, precision=precision)
    return api.integrate([inp], outdir, batch_key="batch", train=cfg, min_features=SETTINGS["min_features"],
                         min_cells=SETTINGS["min_cells"], n_top_features=SETTINGS["n_top_features"], **preprocess)


def ref_fit(inp: Path, outdir: Path, seed: int, iterations: int, threads: int, fresh: bool) -> Path:
    """reference_runner.py fit; returns outdir (latent.npy, latent_eval.npy, obs.csv, run.json)."""
    cmd = ref_fit_cmd(inp, outdir, seed, iterations, threads)
    return cached_run(outdir, fresh, lambda: {"wall_seconds_subprocess": _run(cmd, outdir.parent / f"{outdir.name}.log"), "cmd": cmd})


def ours_fit(inp: Path, outdir: Path, seed: int, iterations: int, threads: int, fresh: bool, precision: str = "fp32",
             scale: str = "batch") -> Path:
    """This script's ``_ours`` subcommand in a fresh process: api.integrate; writes latent.npy, obs.csv, run.json."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_ours", "--input", str(inp), "--outdir", str(outdir),
           "--seed", str(seed), "--iterations", str(iterations), "--threads", str(threads), "--precision", precision,
           "--scale", scale]
    return cached_run(outdir, fresh, lambda: {"wall_seconds_subprocess": _run(cmd, outdir.parent / f"{outdir.name}.log"), "cmd": cmd})


def cmd_ours(a) -> None:
    """Internal: integrate one .h5ad with scalex-scale and dump the latent in the reference runner's layout."""
    from scalex_scale.store import Atlas

    outdir = Path(a.outdir)
    t0 = time.perf_counter()
    res = ours_integrate(a.input, outdir / "run", a.seed, a.iterations, a.threads, a.precision, scale=a.scale)
    wall = time.perf_counter() - t0
    atlas = Atlas.open(res.atlas)
    lat = np.asarray(atlas.root["obsm"]["latent"][:], dtype=np.float32)
    obs = atlas.obs
    keep = np.isfinite(lat).all(axis=1)
    np.save(outdir / "latent.npy", lat[keep])
    cols = [c for c in ("batch", "celltype") if c in obs]
    o = obs.loc[keep, cols].copy()
    o.insert(0, "cell", obs.index[keep].astype(str))
    o.to_csv(outdir / "obs.csv", index=False)
    tr = res.train
    info = {"wall_seconds": wall, "n_cells_in": int(atlas.n_obs), "n_cells_out": int(keep.sum()),
            "train": {"n_iterations": tr.n_iterations, "n_epochs": tr.n_epochs, "seconds": tr.seconds,
                      "iterations_per_s": tr.n_iterations / tr.seconds if tr.seconds else None,
                      "stopped_early": tr.stopped_early, "best_epoch": tr.best_epoch, "best_loss": tr.best_loss},
            "n_features": int(res.state.n_features)}
    (outdir / "run.json").write_text(json.dumps(info, indent=2, default=str))
    shutil.rmtree(outdir / "run" / "atlas.zarr" / "layers", ignore_errors=True)


def load_run(d: Path, which: str = "latent.npy") -> tuple[np.ndarray, pd.DataFrame]:
    lat = np.load(d / which)
    obs = pd.read_csv(d / "obs.csv", dtype=str)
    obs.index = obs["cell"].astype(str)
    return lat, obs


def run_info(d: Path) -> dict:
    info = json.loads((d / "run.json").read_text())
    done = json.loads((d / "done").read_text())
    if "training" in info:  # reference runner
        t = info["training"]
        return {"wall_seconds": info.get("wall_seconds"), "train_seconds": t.get("train_seconds"),
                "iterations": t.get("iterations_done"), "epochs": t.get("epochs_run"),
                "early_stop": t.get("early_stop_fired"), "n_cells_out": info.get("n_cells_out"),
                "wall_seconds_subprocess": done["wall_seconds_subprocess"]}
    t = info["train"]
    return {"wall_seconds": info["wall_seconds"], "train_seconds": t["seconds"], "iterations": t["n_iterations"],
            "epochs": t["n_epochs"], "early_stop": t["stopped_early"], "n_cells_out": info["n_cells_out"],
            "wall_seconds_subprocess": done["wall_seconds_subprocess"]}


# ----------------------------------------------------------------------------------------------- metrics
def overcorrection(X: np.ndarray, labels: np.ndarray, types: list[str], k: int = 30) -> dict:
    """Per batch-specific type: mean silhouette of its cells (labels = all types), kNN same-type fraction."""
    from sklearn.metrics import silhouette_samples
    from sklearn.neighbors import NearestNeighbors

    s = silhouette_samples(X, labels)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
    out = {}
    for t in types:
        m = labels == t
        if not m.any():
            continue
        idx = nn.kneighbors(X[m], return_distance=False)[:, 1:]
        out[t] = {"n": int(m.sum()), "silhouette": float(s[m].mean()),
                  f"knn{k}_same_type": float((labels[idx] == t).mean())}
    return out


def quality(X: np.ndarray, obs: pd.DataFrame, seed: int, specific: list[str]) -> dict:
    from scalex_scale.metrics import batch_entropy_mixing_score, silhouette

    b, t = obs["batch"].to_numpy(), obs["celltype"].to_numpy()
    r = {"mixing": float(batch_entropy_mixing_score(X, b, rng=seed)), "silhouette": float(silhouette(X, t))}
    if specific:
        r["overcorrection"] = overcorrection(X, t, specific)
    return r


def evaluate(ds: str, seed: int, ours_dir: Path, ref_dir: Path, specific: list[str]) -> dict:
    lo, oo = load_run(ours_dir)
    lr_, orf = load_run(ref_dir)
    le, _ = load_run(ref_dir, "latent_eval.npy")
    common = oo.index.intersection(orf.index)
    io, ir = oo.index.get_indexer(common), orf.index.get_indexer(common)
    obs = orf.iloc[ir]
    res = {"dataset": ds, "seed": seed, "n_cells_ours": len(oo), "n_cells_ref": len(orf), "n_cells_common": len(common),
           "ours": quality(lo[io], obs, seed, specific), "ref": quality(lr_[ir], obs, seed, specific),
           "ref_eval": quality(le[ir], obs, seed, specific),
           "timing": {"ours": run_info(ours_dir), "ref": run_info(ref_dir)}}
    return res


def ours_train_mode_diagnosis(ours_dir: Path, seed: int) -> dict:
    """Embed OUR trained model the way the reference embeds (encoder in TRAIN mode, mini-batches of 64 cells of one
    batch each, atlas order) and compare with our eval-mode embedding, on all our kept cells. Shows how much of the
    reference's latent.npy mixing comes from its embedding mode rather than from the trained network."""
    import scipy.sparse as sp
    import torch

    from scalex_scale.metrics import batch_entropy_mixing_score, silhouette
    from scalex_scale.store import Atlas
    from scalex_scale.workflows._model import load_model

    run = ours_dir / "run"
    module, _, _, _, _ = load_model(run / "model", "cpu")
    atlas = Atlas.open(run / "atlas.zarr")
    tm = atlas.training_matrix()
    ptr, ind, val, dom = tm.read(0, tm.n_rows)
    X = sp.csr_matrix((val.astype(np.float32), ind, ptr), shape=(tm.n_rows, tm.n_features)).toarray()
    cells = tm.cells
    order = np.argsort(cells, kind="stable")
    X, dom, obs = X[order], dom[order], atlas.obs.iloc[cells[order]]
    ev = np.zeros((len(X), module.mu_head.out_features), np.float32)
    tr = np.zeros_like(ev)
    was = module.training
    with torch.no_grad():
        module.eval()
        ev[:] = module.inference(torch.from_numpy(X))[0].numpy()
        for d in np.unique(dom):
            idx = np.where(dom == d)[0]
            for a in range(0, len(idx), 64):
                j = idx[a:a + 64]
                module.train(len(j) > 1)  # the reference skips BN for a 1-row chunk
                tr[j] = module.inference(torch.from_numpy(X[j]))[0].numpy()
    module.train(was)
    b, t = obs["batch"].astype(str).to_numpy(), obs["celltype"].astype(str).to_numpy()
    return {name: {"mixing": float(batch_entropy_mixing_score(Z, b, rng=seed)), "silhouette": float(silhouette(Z, t))}
            for name, Z in (("eval_mode", ev), ("train_mode_per_batch_chunks", tr))}


def same_embedding_verdict(d: dict, diag: dict) -> dict:
    """Both networks embedded by the same procedure, ours - reference (goal >= -0.02): METHOD.md's (eval-mode mu:
    ours vs ``ref_eval``) and the reference package's (train-mode, per-batch chunks of 64: our models embedded that
    way vs the reference's ``latent.npy``)."""
    pairs = {"method_eval_mode": (d["ours"], d["ref_eval"]),
             "reference_train_mode": (diag["train_mode_per_batch_chunks"], d["ref"])}
    out = {}
    for name, (o, r) in pairs.items():
        delta = {m: o[m] - r[m] for m in ("mixing", "silhouette")}
        out[name] = {"delta": delta, "ok": bool(all(v >= -0.02 for v in delta.values()))}
    return out


def summarize(rows: list[dict], datasets: list[str]) -> dict:
    out = {}
    for ds in datasets:
        rr = [r for r in rows if r["dataset"] == ds]
        if not rr:
            continue
        d = {}
        for tool in ("ours", "ref", "ref_eval"):
            d[tool] = {m: float(np.mean([r[tool][m] for r in rr])) for m in ("mixing", "silhouette")}
            d[tool].update({f"{m}_sd": float(np.std([r[tool][m] for r in rr])) for m in ("mixing", "silhouette")})
            if "overcorrection" in rr[0][tool]:
                oc = {}
                for t in rr[0][tool]["overcorrection"]:
                    oc[t] = {m: float(np.mean([r[tool]["overcorrection"][t][m] for r in rr]))
                             for m in rr[0][tool]["overcorrection"][t] if m != "n"}
                d[tool]["overcorrection"] = oc
        d["delta_ours_minus_ref"] = {m: d["ours"][m] - d["ref"][m] for m in ("mixing", "silhouette")}
        d["delta_ours_minus_ref_eval"] = {m: d["ours"][m] - d["ref_eval"][m] for m in ("mixing", "silhouette")}
        d["verdict"] = {f"{m}_delta_ge_-0.02": bool(d["delta_ours_minus_ref"][m] >= -0.02) for m in ("mixing", "silhouette")}
        if "overcorrection" in d["ours"]:
            v = {}
            for t, o in d["ours"]["overcorrection"].items():
                rf = d["ref"]["overcorrection"][t]
                v[t] = {m: {"ours": o[m], "ref": rf[m], "ours_not_worse": bool(o[m] >= rf[m] - 1e-9)} for m in o}
            d["verdict"]["overcorrection"] = v
        d["n_seeds"] = len(rr)
        d["timing_mean"] = {tool: {k: float(np.mean([r["timing"][tool][k] for r in rr]))
                                   for k in ("wall_seconds", "train_seconds", "iterations", "epochs")}
                            for tool in ("ours", "ref")}
        out[ds] = d
    return out


def run_setup(a: argparse.Namespace) -> tuple[Path, list[str], list[int], int]:
    """Shared by this script and compare_transfer.py: apply ``--quick`` (seed 0, 100 iterations, a separate work
    dir), create the work dir; return it, the dataset names, the seeds and the torch threads per run (1 when
    ``--jobs`` > 1, else 0 = torch's default)."""
    if a.quick:
        a.seeds, a.iterations, a.workdir = "0", 100, a.workdir + "_quick"
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    return (work, [d for d in a.datasets.split(",") if d], [int(s) for s in a.seeds.split(",") if s],
            1 if a.jobs > 1 else 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    o = sub.add_parser("_ours", help="internal: one scalex-scale run")
    o.add_argument("--input", required=True)
    o.add_argument("--outdir", required=True)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--iterations", type=int, default=3000)
    o.add_argument("--threads", type=int, default=0)
    o.add_argument("--precision", default="fp32")
    o.add_argument("--scale", default="batch")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="our training precision (bf16: autocast, on CUDA or a CPU with native bf16); the reference: fp32")
    p.add_argument("--scale", default="batch", choices=["batch", "global"],
                   help="our MaxAbs scaling: per batch (the method; default) or global (what the reference 1.0.4 does)")
    p.add_argument("--datasets", default="cellbench,synthetic")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iterations", type=int, default=3000, help="max_iteration for BOTH tools (reference default 30000)")
    p.add_argument("--default-schedule", action="store_true", help="also CellBench seed 0 with 30,000 iterations")
    p.add_argument("--default-seed", type=int, default=0, help="seed of the --default-schedule runs")
    p.add_argument("--diagnose-train-mode", action="store_true",
                   help="also embed our models the reference's way (train mode, per-batch chunks of 64)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time (each with 1 torch thread when > 1)")
    p.add_argument("--workdir", default=str(HERE / "_work" / "cmp"))
    p.add_argument("--fresh", action="store_true", help="rerun cached runs")
    p.add_argument("--quick", action="store_true", help="smoke run: seed 0, 100 iterations, separate workdir")
    p.add_argument("--out", default=None, help="output JSON (default results_dir()/compare_reference.json)")
    a = p.parse_args(argv)
    if a.cmd == "_ours":
        cmd_ours(a)
        return 0
    work, datasets, seeds, threads = run_setup(a)
    data = {ds: dataset(ds, work) for ds in datasets}

    jobs = []
    for ds in datasets:
        for s in seeds:
            jobs.append((ds, s, a.iterations))
    if a.default_schedule and "cellbench" in datasets:
        jobs.append(("cellbench", a.default_seed, 30000))
    tag = "".join(f"_{v}" for v in (a.precision, a.scale) if v not in ("fp32", "batch"))  # e.g. "_bf16_global"
    ours = f"ours{tag}"  # run directories of our runs
    t0 = time.time()
    with cf.ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = {}
        for ds, s, it in jobs:
            inp = data[ds][0]
            futs[ex.submit(ref_fit, inp, work / f"{ds}_ref_s{s}_it{it}", s, it, threads, a.fresh)] = (ds, s, it, "ref")
            futs[ex.submit(ours_fit, inp, work / f"{ds}_{ours}_s{s}_it{it}", s, it, threads, a.fresh, a.precision,
                           a.scale)] = (ds, s, it, "ours")
        for f in cf.as_completed(futs):
            ds, s, it, tool = futs[f]
            try:
                f.result()
                print(f"[{time.time() - t0:7.0f}s] done {tool} {ds} seed {s} it {it}", flush=True)
            except Exception as e:  # report and go on
                print(f"FAILED {tool} {ds} seed {s} it {it}: {e}", flush=True)

    rows, extra = [], []
    for ds, s, it in jobs:
        od, rd = work / f"{ds}_{ours}_s{s}_it{it}", work / f"{ds}_ref_s{s}_it{it}"
        if not ((od / "done").exists() and (rd / "done").exists()):
            continue
        specific = list(data[ds][1].get("batch_specific_types", {}))
        r = evaluate(ds, s, od, rd, specific)
        r["iterations"] = it
        if a.diagnose_train_mode and it == a.iterations:
            r["diagnosis_ours_embedded_reference_way"] = ours_train_mode_diagnosis(od, s)
        (rows if it == a.iterations else extra).append(r)
    summary = summarize(rows, datasets)
    for ds in summary:
        dd = [r["diagnosis_ours_embedded_reference_way"] for r in rows
              if r["dataset"] == ds and "diagnosis_ours_embedded_reference_way" in r]
        if dd:
            diag = {mode: {m: float(np.mean([x[mode][m] for x in dd])) for m in ("mixing", "silhouette")}
                    for mode in dd[0]}
            summary[ds]["diagnosis_ours_embedded_reference_way_mean"] = diag
            summary[ds]["verdict_same_embedding"] = same_embedding_verdict(summary[ds], diag)
    payload = {
        "description": "integration quality scalex-scale vs scalex==1.0.4 on the cells both kept; mixing = batch "
                       "entropy mixing score (METHOD.md, reference-compatible value: natural-log entropy divided by "
                       "log2(n_batches)), silhouette = cell-type silhouette on the 10-d latent; 'ref' = the "
                       "reference's own latent.npy (train-mode embedding), 'ref_eval' = eval-mode mu of the same "
                       "network (side column)",
        "budget_note": f"REDUCED budget: max_iteration = {a.iterations} for BOTH tools (reference default 30,000)",
        "settings": {**SETTINGS, "max_iteration": a.iterations, "seeds": seeds, "jobs": a.jobs, "our_precision": a.precision,
                     "torch_threads_per_run": threads or "default", "reference_num_workers": 0,
                     "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
                     "scaling": f"ours {'per batch (method default)' if a.scale == 'batch' else 'global (as the reference)'}, "
                                "reference 1.0.4 global"},
        "datasets": {ds: {k: v for k, v in info.items()} | {"path": str(path)} for ds, (path, info) in data.items()},
        "summary": summary,
        "per_seed": rows,
        "default_schedule_runs": extra,
        "quick": a.quick,
    }
    name = f"compare_reference{tag}"
    out = Path(a.out) if a.out else (work / f"{name}_quick.json" if a.quick else results_dir() / f"{name}.json")
    write_json(out, payload)
    csv_rows = []
    for r in rows + extra:
        for tool in ("ours", "ref", "ref_eval"):
            row = {"dataset": r["dataset"], "seed": r["seed"], "iterations": r["iterations"], "tool": tool,
                   "n_cells_common": r["n_cells_common"], "mixing": r[tool]["mixing"], "silhouette": r[tool]["silhouette"]}
            for t, oc in r[tool].get("overcorrection", {}).items():
                for m, v in oc.items():
                    if m != "n":
                        row[f"{t}_{m}"] = v
            if tool != "ref_eval":
                row["train_seconds"] = r["timing"][tool]["train_seconds"]
            csv_rows.append(row)
    pd.DataFrame(csv_rows).to_csv(out.with_suffix(".csv"), index=False)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
