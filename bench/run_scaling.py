"""Runtime and memory vs number of cells (the paper's Fig. 1e), scalex-scale and optionally the reference.

    python bench/run_scaling.py [--sizes 10000,50000,250000,1000000] [--device auto|cpu|cuda] [--reference]
                                [--max-iterations 30000] [--out bench/results/<machine>]

For every size: one synthetic atlas (same generator, config and seed for every tool), then each stage in a fresh
process, recording wall time, peak RSS (peak GPU memory on CUDA) and throughput:
ingest (generate + write the store), preprocess, fit (the method's schedule: 30,000 iterations at batch 64, or
fewer if early stopping fires), embed, transfer (labels of the last batch from the others), evaluate (no UMAP).
With ``--reference``, the reference package (scalex 1.0.4, venv made by ``bench/make_reference_env.sh``) runs
on the same data written as .h5ad (its one call does preprocessing + training + embedding); a size whose run
exceeds ``--reference-timeout`` or ``--reference-memory-gb`` (RSS of its process tree, polled) is recorded as such
(and larger sizes are skipped for it), not dropped. Results are rewritten after every size. ``--precision bf16``
runs ours as the tool ``scalex-scale-bf16``; ``--merge`` adds a run to the tools already in ``scaling.json``.
The JSON's ``summary`` has, per tool and size, the pipeline's wall time and peak RSS (ingest + preprocess + fit +
embed for ours; the reference's one call) and the ratios to the reference.

Writes ``scaling.json`` and ``scaling.csv`` (one row per tool, size and stage) and, when matplotlib is
installed, ``scaling_runtime.png`` and ``scaling_memory.png`` (log-log).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import REPO, results_dir, write_json  # noqa: E402
from _env import run_stage as _run_stage  # noqa: E402

STAGES = ("ingest", "preprocess", "fit", "embed", "transfer", "evaluate")
REF_PY = REPO / "bench" / ".ref-venv" / "bin" / "python"


def log(t0: float, text: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {text}", file=sys.stderr, flush=True)


def run_ours(n: int, args: argparse.Namespace, work: Path, t0: float) -> list[dict]:
    store, model = str(work / f"atlas_{n}.zarr"), str(work / f"model_{n}")
    data = {"n_cells": n, "n_genes": args.n_genes, "genes_per_cell": args.genes_per_cell, "n_batches": args.n_batches, "seed": args.seed}
    common = {"store": store, "model_dir": model, "device": args.device}
    plan = [
        ("ingest", "synthetic", {**data, "store": store}),
        ("preprocess", "preprocess", {"store": store, "min_features": args.min_features}),
        ("fit", "fit", {**common, "max_iterations": args.max_iterations, "seed": args.seed, "precision": args.precision,
                        "cuda_graphs": args.cuda_graphs}),
        ("embed", "embed", common),
        ("transfer", "transfer", {"store": store, "label_key": "celltype", "query_batches": [f"batch{args.n_batches - 1}"]}),
        ("evaluate", "evaluate", {"store": store, "label_key": "celltype", "seed": args.seed}),
    ]
    if args.pipeline_only:
        plan = [step for step in plan if step[0] in PIPELINE]
    rows = []
    for name, stage, stage_args in plan:
        log(t0, f"{args.tool:<13} {n:>9,} cells  {name} ...")
        r = _run_stage(stage, stage_args)
        rows.append({**r, "tool": args.tool, "n_cells": n, "stage": name})
        log(t0, f"{args.tool:<13} {n:>9,} cells  {name}: {r.get('status')} {r.get('wall_s', 0):.1f} s, {r.get('peak_rss_mb', 0):,.0f} MB")
        if r.get("status") != "ok":
            break
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)
    return rows


def run_reference(n: int, args: argparse.Namespace, work: Path, t0: float) -> list[dict]:
    import subprocess

    h5ad, out = work / f"data_{n}.h5ad", work / f"ref_{n}"
    data = {"n_cells": n, "n_genes": args.n_genes, "genes_per_cell": args.genes_per_cell, "n_batches": args.n_batches, "seed": args.seed, "path": str(h5ad)}
    log(t0, f"reference     {n:>9,} cells  writing .h5ad ...")
    w = _run_stage("synthetic_h5ad", data)
    if w.get("status") != "ok":
        return [{**w, "tool": "reference", "n_cells": n, "stage": "total"}]
    cmd = [str(REF_PY), str(REPO / "bench" / "reference_runner.py"), "fit", "--input", str(h5ad), "--outdir", str(out),
           "--max-iteration", str(args.max_iterations), "--seed", str(args.seed), "--min-features", str(args.min_features),
           "--num-workers", "0", "--no-eval-latent"]  # fmt: skip
    log(t0, f"reference     {n:>9,} cells  fit (preprocess + train + embed) ...")
    start = time.perf_counter()
    status, err, tree_peak = run_with_budget(cmd, work / f"ref_{n}.log", args.reference_timeout, args.reference_memory_gb * 1024)
    wall = time.perf_counter() - start
    rows = []
    run = json.loads((out / "run.json").read_text()) if status == "ok" and (out / "run.json").exists() else {}
    if run:
        rows += reference_rows(n, run, wall, tree_peak)
    else:
        rows.append({"tool": "reference", "n_cells": n, "stage": "total", "status": status, "wall_s": wall, "error": err,
                     "peak_rss_mb_observed": tree_peak})
    log(t0, f"reference     {n:>9,} cells  {status} in {wall:.0f} s")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        h5ad.unlink(missing_ok=True)
    return rows


def reference_rows(n: int, run: dict, wall: float, tree_peak: float | None) -> list[dict]:
    """Rows of one completed reference run from its ``reference_runner.py fit`` report (run.json)."""
    mem, train = run.get("memory", {}), run.get("training", {})
    rss = mem.get("ru_maxrss_self_plus_children_mb") or mem.get("ru_maxrss_self_mb") or tree_peak
    base = {"tool": "reference", "n_cells": n, "status": "ok", "peak_rss_mb": rss}
    rows = [{**base, "stage": "preprocess", "wall_s": run.get("preprocess_seconds")},
            {**base, "stage": "fit", "wall_s": train.get("train_seconds"), "iterations": train.get("iterations_done")},
            {**base, "stage": "total", "wall_s": wall, "iterations": train.get("iterations_done"),
             "reference_wall_seconds": run.get("wall_seconds"), "peak_rss_mb_observed": tree_peak}]
    return [r for r in rows if r["wall_s"] is not None]


def rows_from_log(n: int, log_path: Path, wall: float) -> list[dict]:
    """The same rows from the report the runner prints at the end of its log (``--rebuild-reference``)."""
    text = log_path.read_text()
    return reference_rows(n, json.loads(text[text.rindex("\n{") + 1 :]), wall, None)


def _tree_rss_mb(root: int) -> float:
    """Resident memory (MB) of process ``root`` and all its descendants, from /proc."""
    parent, rss = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(d.name)] = int(fields[1])
            rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(rss.get(p, 0) for p in tree) / 2**20


def run_with_budget(cmd: list[str], log_path: Path, timeout_s: float, max_rss_mb: float) -> tuple[str, str | None, float]:
    """Run ``cmd`` (output to ``log_path``); kill it past ``timeout_s`` or when its process tree's RSS passes
    ``max_rss_mb`` (polled every 0.5 s). Returns (status, error text, peak tree RSS observed in MB)."""
    import subprocess

    peak, status, err = 0.0, None, None
    with log_path.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        start = time.perf_counter()
        while proc.poll() is None:
            peak = max(peak, _tree_rss_mb(proc.pid))
            if peak > max_rss_mb:
                status, err = "memory_budget_exceeded", f"process tree RSS {peak:,.0f} MB > budget {max_rss_mb:,.0f} MB"
            elif time.perf_counter() - start > timeout_s:
                status, err = "time_budget_exceeded", f"over the {timeout_s:.0f} s time budget"
            if status:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.5)
    if status is None:
        status = "ok" if proc.returncode == 0 else "failed"
        if proc.returncode:
            err = log_path.read_text()[-2000:]
    return status, err, peak


PIPELINE = ("ingest", "preprocess", "fit", "embed")  # what the reference's one call covers (+ reading the data)


def summarize(rows: list[dict]) -> list[dict]:
    """Per tool and size: total wall time and peak RSS of the integration pipeline (ours: ingest + preprocess + fit
    + embed, i.e. data generation and store writing included; the reference: its one call, reading the .h5ad
    included, writing it not), and ours / reference ratios where both completed."""
    out = []
    ref = {r["n_cells"]: r for r in rows if r["tool"] == "reference" and r["stage"] == "total"}
    for tool in sorted({r["tool"] for r in rows if r["tool"] != "reference"}):
        for n in sorted({r["n_cells"] for r in rows if r["tool"] == tool}):
            st = {r["stage"]: r for r in rows if r["tool"] == tool and r["n_cells"] == n}
            if not all(st.get(s, {}).get("status") == "ok" for s in PIPELINE):
                continue
            row = {"tool": tool, "n_cells": n, "pipeline_wall_s": sum(st[s]["wall_s"] for s in PIPELINE),
                   "pipeline_peak_rss_mb": max(st[s]["peak_rss_mb"] for s in PIPELINE),
                   "all_stages_peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in st.values())}
            r = ref.get(n)
            if r is not None:
                row["reference_status"] = r["status"]
                if r["status"] == "ok":
                    row["reference_wall_s"], row["reference_peak_rss_mb"] = r["wall_s"], r.get("peak_rss_mb")
                    row["speedup"] = r["wall_s"] / row["pipeline_wall_s"]
                    if r.get("peak_rss_mb"):
                        row["memory_ratio"] = r["peak_rss_mb"] / row["pipeline_peak_rss_mb"]
                else:
                    row["reference_peak_rss_mb_observed"] = r.get("peak_rss_mb_observed")
            out.append(row)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = ["tool", "n_cells", "stage", "status", "wall_s", "peak_rss_mb", "peak_gpu_mb", "cells_per_s", "iterations"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(out: Path, rows: list[dict], summary: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    for metric, fname, label in (("wall_s", "scaling_runtime.png", "wall time (s)"), ("peak_rss_mb", "scaling_memory.png", "peak RSS (MB)")):
        fig, ax = plt.subplots(figsize=(7, 5))
        series = sorted({(r["tool"], r["stage"]) for r in rows if r.get("status") == "ok" and r.get(metric)})
        for tool, stage in series:
            pts = sorted((r["n_cells"], r[metric]) for r in rows if r["tool"] == tool and r["stage"] == stage and r.get("status") == "ok" and r.get(metric))
            ax.plot(*zip(*pts, strict=True), marker="o", linestyle="--" if tool == "reference" else "-", label=f"{tool}: {stage}",
                    linewidth=2.5 if stage == "total" else 1.0, alpha=1.0 if stage == "total" else 0.6)
        key = {"wall_s": "pipeline_wall_s", "peak_rss_mb": "pipeline_peak_rss_mb"}[metric]
        for tool in sorted({r["tool"] for r in summary}):
            pts = sorted((r["n_cells"], r[key]) for r in summary if r["tool"] == tool)
            ax.plot(*zip(*pts, strict=True), marker="s", linewidth=2.5, label=f"{tool}: ingest-preprocess-fit-embed")
        for r in rows:
            if r["tool"] == "reference" and r["stage"] == "total" and r.get("status") not in ("ok", "skipped_after_budget"):
                y = r.get("peak_rss_mb_observed") if metric == "peak_rss_mb" else r.get("wall_s")
                if y:
                    ax.plot([r["n_cells"]], [y], marker="x", markersize=10, color="black", linestyle="none",
                            label=f"reference {r['n_cells']:,}: {r['status']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(str(out / fname))
    return files


def write_all(out: Path, rows: list[dict], args: dict, settings: dict) -> list[str]:
    write_csv(out / "scaling.csv", rows)
    summary = summarize(rows)
    files = plot(out, rows, summary)
    write_json(out / "scaling.json", {"benchmark": "scaling", "settings": args, "settings_by_tool": settings,
                                      "results": rows, "summary": summary, "plots": files})
    return files


def rebuild_reference(out: Path, work: Path) -> int:
    old = json.loads((out / "scaling.json").read_text())
    rows = []
    for r in old["results"]:
        log_path = work / f"ref_{r['n_cells']}.log"
        if r["tool"] == "reference" and r["status"] == "ok":
            if r["stage"] == "total" and log_path.exists():
                rows += rows_from_log(r["n_cells"], log_path, r["wall_s"])
            elif not log_path.exists():
                rows.append(r)
        else:
            rows.append(r)
    settings = old.get("settings_by_tool") or {"scalex-scale": old["settings"]}
    write_all(out, rows, old["settings"], settings)
    print(f"rebuilt {out / 'scaling.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,50000,250000,1000000")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--cuda-graphs", action="store_true", help="fit with the captured step (CUDA only)")
    p.add_argument("--reference", action="store_true", help="also run scalex 1.0.4 (bench/.ref-venv)")
    p.add_argument("--reference-timeout", type=float, default=4 * 3600, help="time budget of one reference run (s)")
    p.add_argument("--reference-memory-gb", type=float, default=20.0,
                   help="memory budget of one reference run (its process tree's RSS), killed above it")
    p.add_argument("--max-iterations", type=int, default=30_000)
    p.add_argument("--n-genes", type=int, default=5000)
    p.add_argument("--genes-per-cell", type=int, default=1000)
    p.add_argument("--n-batches", type=int, default=8)
    p.add_argument("--min-features", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(REPO / "bench" / "_work" / "scaling"))
    p.add_argument("--keep", action="store_true", help="keep atlases, models and .h5ad files")
    p.add_argument("--out", default=None, help="results directory (default bench/results/<machine>)")
    p.add_argument("--pipeline-only", action="store_true", help="only ingest, preprocess, fit, embed (no transfer, evaluate)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of other tools already in OUT/scaling.json (e.g. add a bf16 run of ours beside "
                        "an earlier fp32 + reference run); rows of the tools run now are replaced")
    p.add_argument("--rebuild-reference", action="store_true",
                   help="only rebuild the completed reference rows of OUT/scaling.json from the runner reports in "
                        "WORKDIR/ref_<n>.log (for runs recorded before their report was parsed fully), then exit")
    args = p.parse_args(argv)
    if args.rebuild_reference:
        return rebuild_reference(results_dir(args.out), Path(args.workdir))
    args.tool = ("scalex-scale" if args.precision == "fp32" else f"scalex-scale-{args.precision}") + (
        "-graphs" if args.cuda_graphs else "")
    if args.reference and not REF_PY.exists():
        p.error(f"{REF_PY} is missing: run bench/make_reference_env.sh first")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = results_dir(args.out)
    t0 = time.perf_counter()
    rows: list[dict] = []
    kept: list[dict] = []
    settings = {args.tool: vars(args)}
    if args.merge and (out / "scaling.json").exists():
        old = json.loads((out / "scaling.json").read_text())
        now = {args.tool} | ({"reference"} if args.reference else set())
        kept = [r for r in old["results"] if r["tool"] not in now and r["stage"] != "summary"]
        settings = {**old.get("settings_by_tool", {}), **settings}
    ref_failed = False
    for n in [int(s) for s in args.sizes.split(",")]:
        rows += run_ours(n, args, work, t0)
        if args.reference and not ref_failed:
            ref = run_reference(n, args, work, t0)
            rows += ref
            ref_failed = any(r.get("status") != "ok" for r in ref)
        elif args.reference:
            rows.append({"tool": "reference", "n_cells": n, "stage": "total", "status": "skipped_after_budget"})
        # after every size, so a long run that is stopped keeps what it measured
        files = write_all(out, kept + rows, vars(args), settings)
    log(t0, f"wrote {out / 'scaling.json'}, {out / 'scaling.csv'} {' '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
