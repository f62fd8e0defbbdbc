#!/usr/bin/env python
"""Training speed (side by side with scalex==1.0.4) and training memory vs number of cells.

Usage (our venv)::

    source /work/venv/bin/activate
    python bench/bench_train.py                  # (a) speed: CellBench, 1000 iterations, ref/ours alternated 2x each
                                                 # (b) peak RSS of our fit at 100k vs 1M cells, 2000 iterations
    python bench/bench_train.py --skip-rss       # only (a)
    python bench/bench_train.py --profile        # also a per-phase breakdown of our CPU step (loader/fwd/bwd/opt)
    python bench/bench_train.py --quick          # smoke run: 200 iterations, 1 repeat, RSS on 100k only, 300 it

(a) Same data (CellBench, /work/shared/data/cellbench_lung_celllines.h5ad), batch 64, min_features 600, 2000 HVGs,
default torch threads, GOMP_SPINCOUNT=10000 for both (a bounded OpenMP spin, see scalex_scale/_openmp.py). Reference: ``reference_runner.py bench-train --iterations
N --num-workers 0`` (times ``VAE.fit`` only; it runs whole epochs, so ceil(N/22)*22 iterations). Ours: ``api.fit``
on an atlas of the same data preprocessed by our pipeline (``bench/_work/train_cb.zarr``), in a fresh process
(``bench/_stages.py fit``), iterations/s from our ``TrainResult`` (n_iterations / seconds), for each of
``--configs`` (``fp32``, ``bf16`` = bfloat16 autocast of the matmuls on a CPU with native bf16, ``+compile`` =
torch.compile of the loss; compile time is inside the timed fit). The two run
alternately, ``--repeats`` times each (default 2); the median and the ratio ours/reference are reported (goal >= 3x).
The machine is shared: the load average around each run is recorded.

(b) Peak RSS of the ``fit`` stage in a fresh process (``bench/_env.run_stage``) on preprocessed synthetic atlases of
100k cells (``bench/_work/s100k.zarr``, created here if missing: 5000 genes, 8 batches, 12 types, min_features 200)
and 1M cells (``bench/_work/s1m.zarr``, must exist, same generator/preprocessing), ``--rss-iterations`` (default 2000)
iterations each. Goal: the 1M peak within 25% of the 100k peak.

Writes ``bench/results/<machine>/train_speed.json`` (``--quick``: bench/_work/train_speed_quick.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scalex_scale._openmp import bound_openmp_spin  # noqa: E402

bound_openmp_spin()  # before torch is imported (both tools run with it: see bench/README.md)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import REPO, results_dir, run_stage, write_json  # noqa: E402

REF_PY = HERE / ".ref-venv" / "bin" / "python"
CELLBENCH = Path("/work/shared/data/cellbench_lung_celllines.h5ad")
WORK = HERE / "_work"


def our_cellbench_atlas(path: Path) -> dict:
    from scalex_scale import api
    from scalex_scale.store import Atlas
    from scalex_scale.workflows.preprocess import preprocess

    if not (path.exists() and "preprocess" in Atlas.open(path).state):
        shutil.rmtree(path, ignore_errors=True)
        api.ingest(path, [str(CELLBENCH)], batch_key="batch")
        preprocess(path, min_features=600, min_cells=3, n_top_features=2000)
    st = Atlas.open(path).state["preprocess"]
    return {"path": str(path), "n_train": st["n_train"], "n_features": len(st["features"])}


def ref_speed(iterations: int) -> dict:
    cmd = [str(REF_PY), str(HERE / "reference_runner.py"), "bench-train", "--input", str(CELLBENCH), "--iterations",
           str(iterations), "--num-workers", "0", "--min-features", "600", "--n-top-features", "2000", "--batch-size", "64"]
    la0 = os.getloadavg()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        return {"status": "failed", "stderr": r.stderr[-2000:]}
    brief = json.loads(r.stdout[r.stdout.index("{"):])
    t = brief["training"]
    return {"status": "ok", "iterations": t["iterations_done"], "train_seconds": t["train_seconds"],
            "iterations_per_s": t["iterations_per_second"], "cpu_ms_per_iteration": t.get("cpu_ms_per_iteration"),
            "loadavg_before": la0, "loadavg_after": os.getloadavg(), "peak_rss_mb": brief["memory"].get("ru_maxrss_self_mb")}


def our_speed(store: str, iterations: int, model_dir: Path, config: str = "fp32") -> dict:
    """One fit in a fresh process; ``config``: ``fp32`` or ``bf16``, ``+compile`` for torch.compile."""
    shutil.rmtree(model_dir, ignore_errors=True)
    la0 = os.getloadavg()
    precision, _, extra = config.partition("+")
    r = run_stage("fit", {"store": store, "model_dir": str(model_dir), "max_iterations": iterations, "seed": 0, "device": "cpu",
                          "precision": precision, "compile": extra == "compile"})  # fmt: skip
    r["loadavg_before"], r["loadavg_after"] = la0, os.getloadavg()
    return r


def profile_ours(store: str, iterations: int) -> dict:
    """Wall-clock split of our CPU training step, with the real loader: loader (next CSR batch), densify,
    forward (loss), backward, optimizer. Synchronous timers in a standalone loop mirroring the trainer's step."""
    import torch

    from scalex_scale.data.loader import LoaderConfig, TrainingLoader
    from scalex_scale.nn import SCALEXModule
    from scalex_scale.store import Atlas

    atlas = Atlas.open(store)
    st = atlas.state["preprocess"]
    src = atlas.training_matrix()
    loader = TrainingLoader(
        src, LoaderConfig(batch_size=64, seed=0, drop_last=True), rank=0, world_size=1, pin_memory=False
    )
    module = SCALEXModule(len(st["features"]), len(st["batches"]), seed=0)
    opt = torch.optim.Adam(module.parameters(), lr=2e-4, weight_decay=5e-4, fused=True)  # as the Trainer
    module.train()
    timers = {"loader": 0.0, "densify": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    done, warm = 0, 20
    while done < iterations:
        it = iter(loader)
        while done < iterations:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            x, dom = batch.to_dense(torch.device("cpu"), torch.float32)
            t2 = time.perf_counter()
            loss = module.loss(x, dom).loss
            t3 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t4 = time.perf_counter()
            opt.step()
            t5 = time.perf_counter()
            if done >= warm:
                for k, v in zip(timers, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    timers[k] += v
            done += 1
    n = iterations - warm
    return {"note": "standalone loop mirroring the trainer step (not api.fit itself); warm-up excluded",
            "iterations_timed": n, "torch_threads": torch.get_num_threads(),
            "ms_per_iteration": {k: round(1000 * v / n, 3) for k, v in timers.items()},
            "iterations_per_s_from_sum": round(n / sum(timers.values()), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=1000, help="speed run length, both tools")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats per tool")
    p.add_argument("--rss-iterations", type=int, default=2000)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--configs", default="fp32",
                   help="our training configurations, comma-separated: fp32, bf16 (CPU with native bf16), +compile")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    sizes = [("100k", WORK / "s100k.zarr", 100_000), ("1M", WORK / "s1m.zarr", 1_000_000)]
    if a.quick:
        a.iterations, a.repeats, a.rss_iterations = 200, 1, 300
        sizes = sizes[:1]
    payload: dict = {"settings": {"iterations": a.iterations, "repeats": a.repeats, "batch_size": 64,
                                  "rss_iterations": a.rss_iterations, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                                  "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"), "our_configs": a.configs.split(","),
                                  "reference_num_workers": 0, "torch_threads": "default (both)"}, "quick": a.quick}
    if not a.skip_speed:
        atlas = our_cellbench_atlas(WORK / "train_cb.zarr")
        runs = []
        configs = a.configs.split(",")
        for i in range(a.repeats):
            r = ref_speed(a.iterations)
            print("ref", json.dumps(r), flush=True)
            runs.append({"tool": "ref", "repeat": i, **r})
            for c in configs:
                o = our_speed(atlas["path"], a.iterations, WORK / "train_cb_model", c)
                print("ours", c, json.dumps(o), flush=True)
                runs.append({"tool": f"ours:{c}", "repeat": i, **o})
        tools = ["ref"] + [f"ours:{c}" for c in configs]
        med = {t: statistics.median([r["iterations_per_s"] for r in runs if r["tool"] == t and r.get("status") == "ok"])
               for t in tools}
        ratios = {t: med[t] / med["ref"] for t in tools[1:]}
        payload["speed"] = {"dataset": "CellBench", "our_atlas": atlas, "runs": runs,
                            "median_iterations_per_s": med, "ratio_ours_over_ref": ratios,
                            "goal": ">= 3x", "verdict": {t: bool(r >= 3) for t, r in ratios.items()}}
        print("speed", json.dumps(med), "ratios", json.dumps({t: round(r, 2) for t, r in ratios.items()}), flush=True)
    if a.profile:
        atlas = our_cellbench_atlas(WORK / "train_cb.zarr")
        payload["profile_ours"] = profile_ours(atlas["path"], 300)
        print("profile", json.dumps(payload["profile_ours"]), flush=True)
    if not a.skip_rss:
        rss = {}
        for label, store, n in sizes:
            if not store.exists():
                if n > 100_000:
                    rss[label] = {"status": "missing", "store": str(store)}
                    continue
                print(run_stage("synthetic", {"store": str(store), "n_cells": n}), flush=True)
                print(run_stage("preprocess", {"store": str(store), "min_features": 200}), flush=True)
            model = WORK / f"rss_model_{label}"
            shutil.rmtree(model, ignore_errors=True)
            r = run_stage("fit", {"store": str(store), "model_dir": str(model), "max_iterations": a.rss_iterations,
                                  "seed": 0, "device": "cpu"})
            print(label, json.dumps(r), flush=True)
            rss[label] = {"cells": n, **r}
        res = {"runs": rss}
        if all(rss.get(k, {}).get("status") == "ok" for k in ("100k", "1M")):
            g = rss["1M"]["peak_rss_mb"] / rss["100k"]["peak_rss_mb"]
            res.update({"growth_1M_over_100k": g, "goal": "1M peak RSS within 25% of 100k", "verdict": bool(g <= 1.25)})
        payload["rss"] = res
    out = Path(a.out) if a.out else (WORK / "train_speed_quick.json" if a.quick else results_dir() / "train_speed.json")
    write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
