"""The peer tools of ``run_scaling.py`` (scVI, Harmony): one fresh process each, in ``bench/.peer-venv``.

Each run executes ``bench/peer_runner.py TOOL`` with the peer venv's interpreter under a time and a memory budget
(:func:`_budget.run_with_budget`) and turns its report (``run.json``; after a kill, the stages it finished, from
``stages.jsonl``) into result rows: one per stage and a ``total`` (the process' wall time, its tree's peak RSS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from _budget import run_with_budget
from _env import REPO

# the peer venv's interpreter; SCALEX_BENCH_PEER_PY points elsewhere (a venv built in another place)
PEER_PY = Path(os.environ.get("SCALEX_BENCH_PEER_PY") or REPO / "bench" / ".peer-venv" / "bin" / "python")
PEER_TOOLS = ("scvi", "harmony")
IMPORTS = {"scvi": "import scvi, scanpy", "harmony": "import harmonypy, scanpy"}
HINT = "build bench/.peer-venv with `bash bench/make_peer_env.sh` (scvi-tools, harmonypy, scanpy; torch pinned)"
# what each peer gives a user beyond the embedding of the cells it was run on (recorded beside the results)
NOTES = {
    "scvi": "scVI (scvi-tools): the latent of the cells it was trained on; a new study is embedded only by "
            "further training (scArches: surgery on the trained model, then training on the query).",
    "harmony": "Harmony (harmonypy): corrected PCs of the cells it was run on; no model, so a new study cannot be "
               "projected: it is integrated by running Harmony again on everything.",
}  # fmt: skip


def availability(tool: str, python: Path = PEER_PY) -> str | None:
    """None when ``tool`` can run, else why not (with the install hint)."""
    if not python.exists():
        return f"{python} is missing: {HINT}"
    try:
        r = subprocess.run([str(python), "-c", IMPORTS[tool]], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{python} cannot run: {err}; {HINT}"
    if r.returncode:
        return f"{python} -c {IMPORTS[tool]!r} failed: {r.stderr.strip().splitlines()[-1:]}; {HINT}"
    return None


def scvi_epochs(setting: str | int, n_obs: int, our_iterations: int, our_batch: int) -> int:
    """``--scvi-max-epochs``: 0 (scVI's default), N, or ``match``: scVI sees as many cells as our fit
    (iterations x batch size) over its training split (90% of the cells, scvi-tools' default), at least one epoch."""
    if str(setting) == "match":
        return max(1, round(our_iterations * our_batch / (0.9 * n_obs)))
    return int(setting)


def command(tool: str, n: int, h5ad: Path, outdir: Path, args: Any) -> list[str]:
    """The runner's command line for one run (settings from run_scaling's arguments)."""
    cmd = [str(PEER_PY), str(REPO / "bench" / "peer_runner.py"), tool, "--input", str(h5ad), "--outdir", str(outdir),
           "--min-features", str(args.min_features), "--seed", str(args.seed), "--label-key", "celltype"]  # fmt: skip
    if tool == "scvi":
        cmd += ["--accelerator", {"cpu": "cpu", "cuda": "gpu"}.get(args.device, "auto")]
        epochs = scvi_epochs(args.scvi_max_epochs, n, args.max_iterations, args.batch_size)
        if epochs:
            cmd += ["--max-epochs", str(epochs)]
    else:
        if args.harmony_scale:
            cmd.append("--scale")
        if args.harmony_max_iter:
            cmd += ["--max-iter-harmony", str(args.harmony_max_iter)]
    return cmd


def _hvg_overlap(outdir: Path, ours: Path | None) -> float | None:
    """Share of our preprocessing's features that the peer selected too (None when either list is missing)."""
    mine = outdir / "hvg.txt"
    if ours is None or not ours.exists() or not mine.exists():
        return None
    a, b = set(ours.read_text().split()), set(mine.read_text().split())
    return len(a & b) / max(len(a), 1)


def _finished_stages(outdir: Path) -> tuple[list[dict], str | None]:
    """Stages a run finished (from its ``stages.jsonl``) and the one it was in when it stopped."""
    done, current = [], None
    path = outdir / "stages.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        if rec.pop("event") == "start":
            current = rec["stage"]
        else:
            done.append(rec)
            current = None
    return done, current


STAGE_KEYS = ("wall_s", "cpu_s", "peak_rss_mb", "n_obs", "n_features", "epochs", "n_pcs", "iterations", "n_clusters",
              "dim", "scaled", "elbo_train_last", "torch_threads", "default_epochs")  # fmt: skip
SETTING_KEYS = {"scvi": ("n_latent", "max_epochs", "accelerator"), "harmony": ("n_pcs", "scale", "max_iter_harmony")}


def run_peer(tool: str, n: int, h5ad: Path, work: Path, args: Any, budget_s: float, budget_mb: float,
             ours_hvg: Path | None) -> tuple[list[dict], Path | None]:  # fmt: skip
    """One peer run at ``n`` cells: (rows, output directory holding latent.npy + obs.csv, or None on failure)."""
    outdir = work / f"{tool}_{n}"
    shutil.rmtree(outdir, ignore_errors=True)
    start = time.perf_counter()
    status, err, tree_peak = run_with_budget(command(tool, n, h5ad, outdir, args), work / f"{tool}_{n}.log", budget_s, budget_mb)
    wall = time.perf_counter() - start
    base = {"tool": tool, "n_cells": n}
    report = outdir / "run.json"
    if status == "ok" and report.exists():
        run = json.loads(report.read_text())
        rows = [{**base, "stage": s["stage"], "status": "ok", **{k: s[k] for k in STAGE_KEYS if k in s}} for s in run["stages"]]
        rows.append({**base, "stage": "total", "status": "ok", "wall_s": wall, "runner_wall_s": run["wall_seconds"],
                     "peak_rss_mb": max(run["peak_rss_mb"], tree_peak), "peak_rss_mb_observed": tree_peak,
                     "hvg_overlap_with_ours": _hvg_overlap(outdir, ours_hvg), "versions": run["versions"],
                     "settings": {k: run["settings"][k] for k in SETTING_KEYS[tool]}, "model": run.get("model")})
        return rows, outdir
    done, current = _finished_stages(outdir)
    rows = [{**base, "stage": s["stage"], "status": "ok", **{k: s[k] for k in STAGE_KEYS if k in s}} for s in done]
    rows.append({**base, "stage": "total", "status": status if status != "ok" else "failed", "wall_s": wall,
                 "error": err or "no run.json written", "failed_in_stage": current, "peak_rss_mb_observed": tree_peak,
                 "budget_s": budget_s, "budget_mb": budget_mb})  # fmt: skip
    return rows, None
