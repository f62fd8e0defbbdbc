"""Runtime and memory vs number of cells (the paper's Fig. 1e): scalex-scale beside the reference and its peers.

    python bench/run_scaling.py [--sizes 10000,50000,250000,1000000] [--tools scalex-scale,reference,scvi,harmony]
                                [--device auto|cpu|cuda] [--precision fp32|bf16] [--ingest-from synthetic|h5ad]
                                [--max-iterations 30000] [--merge] [--out bench/results/<machine>]

For every size: one synthetic data set (same generator, config and seed for every tool), then each tool:

* ``scalex-scale`` (ours; ``scalex-scale-bf16`` with ``--precision bf16``): each stage in a fresh process, recording
  wall time, peak RSS (peak GPU memory on CUDA), throughput and the store's disk use: ingest (``--ingest-from
  synthetic``: generating + writing the store; ``h5ad``: ``scalex-scale ingest`` of the .h5ad the other tools
  read, written beforehand and not timed, recorded as stage ``ingest_h5ad``), preprocess, fit (the method's
  schedule: 30,000 iterations at batch 64, or fewer if early stopping fires), embed, transfer (labels of the last
  batch from the others), evaluate (no UMAP). ``--stages`` runs a subset (e.g. ``--stages ingest --ingest-from
  h5ad``: file-ingest throughput only).
* ``reference`` (scalex 1.0.4, venv by ``bench/make_reference_env.sh``): its one call on the .h5ad (preprocessing +
  training + embedding), under ``--reference-timeout`` / ``--reference-memory-gb``.
* ``scvi``, ``harmony`` (venv by ``bench/make_peer_env.sh``; ``bench/peer_runner.py``): on the same .h5ad, the same
  cell/gene filters and the same 2,000 HVGs (scanpy ``seurat`` flavor by batch, the selection ours reproduces; the
  overlap with ours is recorded), stage by stage in one fresh process, under ``--peer-time-budget`` /
  ``--peer-memory-gb``. scVI: its defaults, 10-d latent, on the counts; Harmony: on a 50-PC PCA of the
  log-normalized HVGs (not scaled; ``--harmony-scale`` to scale first).

A run over its budget (RSS of its process tree, polled) is killed and recorded as ``memory_budget_exceeded`` /
``time_budget_exceeded`` with the observed peak (larger sizes are then skipped for that tool); a tool whose venv
is missing is recorded as ``tool_unavailable`` with the install hint. After each tool's pipeline its embedding is
scored (stage ``quality``, in our venv, on a fixed subsample of ``--quality-subsample`` cells: batch entropy mixing
and cell-type silhouette). Results are rewritten after every tool and size, so a long run that stops keeps what it
measured. ``--merge`` keeps the rows of OUT/scaling.json that this run does not replace (same tool and size; with
``--stages``, same tool, size and stage).

Writes ``scaling.json`` (rows, ``summary`` with ratios to ours, ``curves`` per tool with the quality scores,
``scale_checks`` past ``--baseline-size``, notes on what each peer gives), ``scaling.csv`` (one row per tool, size
and stage), ``scaling_summary.md`` (the tables) and, with matplotlib, ``scaling_runtime.png``,
``scaling_memory.png`` (every stage of ours, log-log) and ``scaling_tools_runtime.png``,
``scaling_tools_memory.png`` (one line per tool).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _budget import run_with_budget  # noqa: E402
from _env import REPO, results_dir, write_json  # noqa: E402
from _env import run_stage as _run_stage  # noqa: E402
from _peers import NOTES, PEER_TOOLS, availability, run_peer  # noqa: E402
from _scaling_report import PIPELINE, check_lines, curves, markdown, plot, scale_checks, summarize, write_csv  # noqa: E402

STAGES = ("ingest", "preprocess", "fit", "embed", "transfer", "evaluate")
TOOLS = ("scalex-scale", "reference", *PEER_TOOLS)
REF_PY = REPO / "bench" / ".ref-venv" / "bin" / "python"
REF_HINT = "build bench/.ref-venv with `bash bench/make_reference_env.sh` (scalex 1.0.4, torch pinned)"
BUDGET_STATUSES = ("memory_budget_exceeded", "time_budget_exceeded")
# disk use of our store per cell before one is measured in this run: 3,150 B measured after preprocessing at 250k
# cells (5,000 genes, ~1,000 detected per cell), with some room
DEFAULT_STORE_BYTES_PER_CELL = 4_000


def log(t0: float, text: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {text}", file=sys.stderr, flush=True)


def disk_bytes(path: str | Path) -> int:
    """Bytes ``path`` occupies on disk (allocated blocks of every file under it)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                continue
    return total


def quality_row(tool: str, n: int, source: dict, args: argparse.Namespace) -> dict:
    """Score one tool's embedding (in our venv, a fresh process): ``source`` is {"store"} or {"latent", "obs"}."""
    r = _run_stage("quality", {**source, "subsample": args.quality_subsample, "seed": args.seed, "label_key": "celltype"})
    return {**r, "tool": tool, "n_cells": n, "stage": "quality"}


def run_ours(n: int, args: argparse.Namespace, work: Path, h5ad: Path | None, t0: float) -> list[dict]:
    store, model = str(work / f"atlas_{n}.zarr"), str(work / f"model_{n}")
    data = {"n_cells": n, "n_genes": args.n_genes, "genes_per_cell": args.genes_per_cell, "n_batches": args.n_batches, "seed": args.seed}
    common = {"store": store, "model_dir": model, "device": args.device}
    if args.ingest_from == "h5ad":
        ingest = ("ingest_h5ad", "ingest_h5ad", {"store": store, "input": str(h5ad), "batch_key": "batch"})
    else:
        ingest = ("ingest", "synthetic", {**data, "store": store})
    plan = [
        ingest,
        ("preprocess", "preprocess", {"store": store, "min_features": args.min_features, "features_out": str(work / f"hvg_{n}.txt")}),
        ("fit", "fit", {**common, "max_iterations": args.max_iterations, "batch_size": args.batch_size, "seed": args.seed,
                        "precision": args.precision, "cuda_graphs": args.cuda_graphs}),
        ("embed", "embed", common),
        ("transfer", "transfer", {"store": store, "label_key": "celltype", "query_batches": [f"batch{args.n_batches - 1}"]}),
        ("evaluate", "evaluate", {"store": store, "label_key": "celltype", "seed": args.seed}),
    ]  # fmt: skip
    plan = [step for step, name in zip(plan, STAGES, strict=True) if name in args.our_stages]
    rows = []
    for name, stage, stage_args in plan:
        log(t0, f"{args.tool:<13} {n:>9,} cells  {name} ...")
        r = repeated(stage, stage_args, args.repeats if name in args.repeat_stages else 1)
        row = {**r, "tool": args.tool, "n_cells": n, "stage": name, "ingest_source": args.ingest_from}
        if os.path.exists(store):
            row["store_disk_bytes"] = disk_bytes(store)
        rows.append(row)
        log(t0, f"{args.tool:<13} {n:>9,} cells  {name}: {r.get('status')} {r.get('wall_s', 0):.1f} s, {r.get('peak_rss_mb', 0):,.0f} MB")
        if r.get("status") != "ok":
            break
    if args.quality and any(r["stage"] == "embed" and r["status"] == "ok" for r in rows):
        rows.append(quality_row(args.tool, n, {"store": store}, args))
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)
    return rows


def repeated(stage: str, stage_args: dict, repeats: int) -> dict:
    """Run one of our stages ``repeats`` times back to back (each rerun redoes the stage in place on the same store).

    The row is the run of median wall time (the lower middle one for an even count), with every run's wall time,
    CPU time, steal share and peak RSS beside it and ``peak_rss_mb`` the largest of them (memory is judged on the
    worst run, time on the typical one). Stops at the first failure."""
    runs = []
    for _ in range(repeats):
        runs.append(_run_stage(stage, stage_args))
        if runs[-1].get("status") != "ok":
            return runs[-1]
    if repeats == 1:
        return runs[0]
    median = sorted(runs, key=lambda r: r["wall_s"])[(repeats - 1) // 2]
    return {**median, "repeats": repeats, "wall_s_runs": [r["wall_s"] for r in runs],
            "peak_rss_mb_runs": [r.get("peak_rss_mb") for r in runs], "cpu_s_runs": [r.get("cpu_s") for r in runs],
            "host_steal_share_runs": [r.get("host_steal_share") for r in runs],
            "peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in runs)}  # fmt: skip


def run_reference(n: int, args: argparse.Namespace, work: Path, h5ad: Path, t0: float) -> list[dict]:
    out = work / f"ref_{n}"
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
        if args.quality:
            rows.append(quality_row("reference", n, {"latent": str(out / "latent.npy"), "obs": str(out / "obs.csv")}, args))
    else:
        rows.append({"tool": "reference", "n_cells": n, "stage": "total", "status": status, "wall_s": wall, "error": err,
                     "peak_rss_mb_observed": tree_peak})  # fmt: skip
    log(t0, f"reference     {n:>9,} cells  {status} in {wall:.0f} s")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return rows


def reference_rows(n: int, run: dict, wall: float, tree_peak: float | None) -> list[dict]:
    """Rows of one completed reference run from its ``reference_runner.py fit`` report (run.json)."""
    mem, train = run.get("memory", {}), run.get("training", {})
    rss = mem.get("ru_maxrss_self_plus_children_mb") or mem.get("ru_maxrss_self_mb") or tree_peak
    base = {"tool": "reference", "n_cells": n, "status": "ok", "peak_rss_mb": rss}
    rows = [{**base, "stage": "preprocess", "wall_s": run.get("preprocess_seconds")},
            {**base, "stage": "fit", "wall_s": train.get("train_seconds"), "iterations": train.get("iterations_done")},
            {**base, "stage": "total", "wall_s": wall, "iterations": train.get("iterations_done"),
             "reference_wall_seconds": run.get("wall_seconds"), "peak_rss_mb_observed": tree_peak}]  # fmt: skip
    return [r for r in rows if r["wall_s"] is not None]


def rows_from_log(n: int, log_path: Path, wall: float) -> list[dict]:
    """The same rows from the report the runner prints at the end of its log (``--rebuild-reference``)."""
    text = log_path.read_text()
    return reference_rows(n, json.loads(text[text.rindex("\n{") + 1 :]), wall, None)


def run_other(tool: str, n: int, args: argparse.Namespace, work: Path, h5ad: Path, t0: float) -> list[dict]:
    if tool == "reference":
        return run_reference(n, args, work, h5ad, t0)
    log(t0, f"{tool:<13} {n:>9,} cells  load + preprocess + {'train' if tool == 'scvi' else 'pca + harmony'} + embed ...")
    rows, outdir = run_peer(tool, n, h5ad, work, args, args.peer_time_budget[tool], args.peer_memory_gb[tool] * 1024,
                            work / f"hvg_{n}.txt" if "scalex-scale" in args.tools else None)  # fmt: skip
    total = rows[-1]
    log(t0, f"{tool:<13} {n:>9,} cells  {total['status']} in {total['wall_s']:.0f} s, "
            f"{total.get('peak_rss_mb') or total.get('peak_rss_mb_observed') or 0:,.0f} MB")  # fmt: skip
    if outdir is not None:
        if args.quality:
            rows.append(quality_row(tool, n, {"latent": str(outdir / "latent.npy"), "obs": str(outdir / "obs.csv")}, args))
        if not args.keep:
            shutil.rmtree(outdir, ignore_errors=True)
    return rows


def write_input(n: int, args: argparse.Namespace, work: Path, t0: float) -> tuple[Path, dict]:
    """The size's .h5ad (streamed from the generator; not part of any tool's pipeline)."""
    h5ad = work / f"data_{n}.h5ad"
    data = {"n_cells": n, "n_genes": args.n_genes, "genes_per_cell": args.genes_per_cell, "n_batches": args.n_batches, "seed": args.seed, "path": str(h5ad)}
    log(t0, f"input         {n:>9,} cells  writing .h5ad ...")
    r = _run_stage("synthetic_h5ad", data)
    return h5ad, {**r, "tool": "input", "n_cells": n, "stage": "write_h5ad"}


def disk_needed(n: int, args: argparse.Namespace, rows: list[dict], h5ad: bool) -> float:
    """Bytes a size needs on the work disk: the .h5ad (when written) and our store (bytes per cell measured at the
    largest size run so far, else DEFAULT_STORE_BYTES_PER_CELL), with 15% to spare."""
    measured = [(r["n_cells"], r["store_disk_bytes"]) for r in rows if r.get("store_disk_bytes")]
    per_cell = max(measured)[1] / max(measured)[0] if measured else DEFAULT_STORE_BYTES_PER_CELL
    need = n * per_cell if "scalex-scale" in args.tools else 0.0
    if h5ad:
        need += n * args.genes_per_cell * 8.0  # float32 values + int32 indices
    return 1.15 * need


def per_tool(text: str, default: float) -> dict[str, float]:
    """``"7200"`` (every peer) or ``"scvi=7200,harmony=3600"`` (the others: ``default``) -> {tool: value}."""
    out = dict.fromkeys(PEER_TOOLS, default)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.rpartition("=")
        if key and key not in PEER_TOOLS:
            raise argparse.ArgumentTypeError(f"unknown peer {key!r} in {text!r} (peers: {', '.join(PEER_TOOLS)})")
        for tool in [key] if key else PEER_TOOLS:
            out[tool] = float(value)
    return out


def write_all(out: Path, rows: list[dict], args: dict, settings: dict) -> list[str]:
    write_csv(out / "scaling.csv", rows)
    summary, checks = summarize(rows), scale_checks(rows, args.get("baseline_size", 1_000_000), args.get("rss_tolerance", 0.25),
                                                    args.get("time_tolerance", 0.10))  # fmt: skip
    files = plot(out, rows, summary)
    notes = {t: NOTES[t] for t in PEER_TOOLS if any(r["tool"] == t for r in rows)}
    (out / "scaling_summary.md").write_text(markdown(rows, checks, notes))
    write_json(out / "scaling.json", {"benchmark": "scaling", "settings": args, "settings_by_tool": settings,
                                      "results": rows, "summary": summary, "curves": curves(rows),
                                      "scale_checks": checks, "notes": notes, "plots": files})  # fmt: skip
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


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,50000,250000,1000000")
    p.add_argument("--tools", default=None,
                   help=f"comma-separated, from {','.join(TOOLS)} (default: scalex-scale, plus reference with --reference)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--cuda-graphs", action="store_true", help="fit with the captured step (CUDA only)")
    p.add_argument("--reference", action="store_true", help="also run scalex 1.0.4 (bench/.ref-venv); = adding it to --tools")
    p.add_argument("--reference-timeout", type=float, default=4 * 3600, help="time budget of one reference run (s)")
    p.add_argument("--reference-memory-gb", type=float, default=20.0,
                   help="memory budget of one reference run (its process tree's RSS), killed above it")
    p.add_argument("--peer-time-budget", default="14400", help="time budget (s) of one peer run: N, or scvi=N,harmony=M")
    p.add_argument("--peer-memory-gb", default="20", help="memory budget (GB, process tree RSS) of one peer run: N, or scvi=N,harmony=M")
    p.add_argument("--scvi-max-epochs", default="0",
                   help="scVI epochs: 0 (scvi-tools' default heuristic), N, or 'match' (as many cells seen as our fit's "
                        "--max-iterations x --batch-size, on scVI's 90%% training split; the default schedule's time is then "
                        "projected from the measured time per epoch and labelled so)")  # fmt: skip
    p.add_argument("--harmony-max-iter", type=int, default=0, help="Harmony iterations (0: harmonypy's default, 10)")
    p.add_argument("--harmony-scale", action="store_true", help="scanpy pp.scale before Harmony's PCA (densifies)")
    p.add_argument("--ingest-from", choices=["synthetic", "h5ad"], default="synthetic",
                   help="our ingest: the generator straight into the store, or `scalex-scale ingest` of the .h5ad")
    p.add_argument("--stages", default=None, help=f"our stages to run, from {','.join(STAGES)} (default: all)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each of our --repeat-stages this many times back to back, in place; the checks use the "
                        "median wall time and the largest peak RSS (every run is recorded)")
    p.add_argument("--repeat-stages", default=",".join(STAGES), help="our stages --repeats applies to (default: all)")
    p.add_argument("--max-iterations", type=int, default=30_000)
    p.add_argument("--batch-size", type=int, default=64, help="our fit's mini-batch (the method's: 64)")
    p.add_argument("--n-genes", type=int, default=5000)
    p.add_argument("--genes-per-cell", type=int, default=1000)
    p.add_argument("--n-batches", type=int, default=8)
    p.add_argument("--min-features", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quality", dest="quality", action="store_false", help="do not score the embeddings")
    p.add_argument("--quality-subsample", type=int, default=50_000, help="cells scored per embedding (fixed subsample)")
    p.add_argument("--baseline-size", type=int, default=1_000_000, help="size larger runs are checked against")
    p.add_argument("--rss-tolerance", type=float, default=0.25, help="allowed peak-RSS growth over the baseline size")
    p.add_argument("--time-tolerance", type=float, default=0.10, help="allowed super-linear time growth (timing noise)")
    p.add_argument("--workdir", default=str(REPO / "bench" / "_work" / "scaling"))
    p.add_argument("--keep", action="store_true", help="keep atlases, models, outputs and .h5ad files")
    p.add_argument("--out", default=None, help="results directory (default bench/results/<machine>)")
    p.add_argument("--pipeline-only", action="store_true", help="only ingest, preprocess, fit, embed (no transfer, evaluate)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in OUT/scaling.json that this run does not replace (rows of the same "
                        "tool and size; with --stages, of the same tool, size and stage)")
    p.add_argument("--rebuild-reference", action="store_true",
                   help="only rebuild the completed reference rows of OUT/scaling.json from the runner reports in "
                        "WORKDIR/ref_<n>.log (for runs recorded before their report was parsed fully), then exit")
    args = p.parse_args(argv)
    tools = [t.strip() for t in (args.tools or "scalex-scale").split(",") if t.strip()]
    if args.reference and "reference" not in tools:
        tools.append("reference")
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        p.error(f"unknown tool(s) {unknown}; choose from {', '.join(TOOLS)}")
    args.tools = [t for t in TOOLS if t in tools]  # fixed order: ours first, its HVGs are compared with the peers'
    stages = [s.strip() for s in (args.stages or ",".join(PIPELINE if args.pipeline_only else STAGES)).split(",") if s.strip()]
    if [s for s in stages if s not in STAGES]:
        p.error(f"unknown stage(s) in --stages {args.stages!r}; choose from {', '.join(STAGES)}")
    args.our_stages = [s for s in STAGES if s in stages]
    args.repeat_stages = [s.strip() for s in args.repeat_stages.split(",") if s.strip()]
    if [s for s in args.repeat_stages if s not in STAGES]:
        p.error(f"unknown stage(s) in --repeat-stages {','.join(args.repeat_stages)!r}; choose from {', '.join(STAGES)}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        args.peer_time_budget = per_tool(args.peer_time_budget, 14400.0)
        args.peer_memory_gb = per_tool(args.peer_memory_gb, 20.0)
    except (argparse.ArgumentTypeError, ValueError) as err:
        p.error(str(err))
    args.tool = ("scalex-scale" if args.precision == "fp32" else f"scalex-scale-{args.precision}") + (
        "-graphs" if args.cuda_graphs else "")
    return p, args


def replaced(rows: list[dict], subset: bool) -> set[tuple]:
    """Keys of old rows that this run's ``rows`` replace: (tool, size) or, for ours run with --stages, (tool, size,
    stage)."""
    keys: set[tuple] = set()
    for r in rows:
        by_stage = (subset and r["tool"].startswith("scalex-scale")) or r["tool"] == "input"
        keys.add((r["tool"], r["n_cells"], r["stage"]) if by_stage else (r["tool"], r["n_cells"]))
    return keys


def main(argv: list[str] | None = None) -> int:
    _, args = parse_args(argv)
    if args.rebuild_reference:
        return rebuild_reference(results_dir(args.out), Path(args.workdir))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = results_dir(args.out)
    t0 = time.perf_counter()
    unavailable = {}
    if "reference" in args.tools and not REF_PY.exists():
        unavailable["reference"] = f"{REF_PY} is missing: {REF_HINT}"
    for tool in (t for t in args.tools if t in PEER_TOOLS):
        why = availability(tool)
        if why:
            unavailable[tool] = why
    for tool, why in unavailable.items():
        log(t0, f"WARNING: {tool} unavailable, recorded as tool_unavailable: {why}")
    settings_now = {t if t != "scalex-scale" else args.tool: vars(args) for t in args.tools}
    old_rows, settings = [], settings_now
    if args.merge and (out / "scaling.json").exists():
        old = json.loads((out / "scaling.json").read_text())
        old_rows = [r for r in old["results"] if r["stage"] != "summary"]
        settings = {**old.get("settings_by_tool", {}), **settings_now}
    subset = args.stages is not None
    rows: list[dict] = []
    stopped: dict[str, str] = {}  # tool -> status that stopped it (larger sizes skipped)

    def save() -> list[str]:
        keys = replaced(rows, subset)
        kept = [r for r in old_rows if (r["tool"], r["n_cells"]) not in keys and (r["tool"], r["n_cells"], r["stage"]) not in keys]
        return write_all(out, kept + rows, vars(args), settings)

    files: list[str] = []
    for n in [int(s) for s in args.sizes.split(",")]:
        others = [t for t in args.tools if t != "scalex-scale"]
        for t in others:
            if t in unavailable:
                rows.append({"tool": t, "n_cells": n, "stage": "total", "status": "tool_unavailable", "error": unavailable[t]})
            elif t in stopped:
                rows.append({"tool": t, "n_cells": n, "stage": "total",
                             "status": "skipped_after_budget" if stopped[t] in BUDGET_STATUSES else "skipped_after_failure"})
        runnable = [t for t in others if t not in unavailable and t not in stopped]
        ours_h5ad = "scalex-scale" in args.tools and args.ingest_from == "h5ad" and "ingest" in args.our_stages
        need_h5ad = bool(runnable) or ours_h5ad
        need, free = disk_needed(n, args, rows + old_rows, need_h5ad), shutil.disk_usage(work).free
        if need > free:
            msg = f"needs ~{need / 1e9:.1f} GB on {work}, {free / 1e9:.1f} GB free"
            log(t0, f"{n:,} cells skipped: {msg}")
            rows += [{"tool": t if t != "scalex-scale" else args.tool, "n_cells": n, "stage": "total",
                      "status": "insufficient_disk", "error": msg} for t in args.tools]  # fmt: skip
            files = save()
            continue
        h5ad = None
        if need_h5ad:
            h5ad, w = write_input(n, args, work, t0)
            rows.append(w)
            if w.get("status") != "ok":
                failed = runnable + ([args.tool] if ours_h5ad else [])
                rows += [{"tool": t, "n_cells": n, "stage": "total", "status": "failed", "error": "writing the .h5ad failed"} for t in failed]
                files = save()
                continue
        if "scalex-scale" in args.tools:
            rows += run_ours(n, args, work, h5ad, t0)
            files = save()
        for tool in runnable:
            r = run_other(tool, n, args, work, h5ad, t0)
            rows += r
            total = next(x for x in r if x["stage"] == "total")
            if total["status"] != "ok":
                stopped[tool] = total["status"]
            files = save()  # after every tool, so a long run that is stopped keeps what it measured
        if h5ad is not None and not args.keep:
            h5ad.unlink(missing_ok=True)
        (work / f"hvg_{n}.txt").unlink(missing_ok=True)
        files = save()
    payload = json.loads((out / "scaling.json").read_text())
    for line in check_lines(payload["scale_checks"]):
        log(t0, f"check: {line}")
    log(t0, f"wrote {out / 'scaling.json'}, {out / 'scaling.csv'}, {out / 'scaling_summary.md'} {' '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
