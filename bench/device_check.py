#!/usr/bin/env python
"""GPU first contact in one command: every phase in its own process, bounded by ``timeout``, results as it goes.

Run it through ``bench/device_check.sh`` (which installs the carried wheels first); see bench/README.md.

Phases (in this order; ``--phases`` picks some):

``env``
    versions, device, measured kernel-launch latency (host µs per eager launch, device µs per kernel in a
    replayed graph), bf16 / fp32 GEMM TFLOP/s, host-to-device copy GB/s (pinned and pageable).
``fit``
    ``bench/fit_matrix.py``: the real trainer + loader at batch 64 and 4,096, fp32 / bf16, eager / graphs: it/s,
    cells/s, kernels, launches, H2D copies and host syncs per step, graphed loss vs eager loss.
``dsbn``
    ``bench/bench_dsbn.py``: Triton vs torch vs the per-domain loop, forward + backward, D = 1, 8, 16, 40,
    B = 64 and 4,096.
``tests``
    every ``gpu``-marked test plus the test files whose code runs on CUDA when it is there (kernels, loader,
    trainer, embedding pipeline), with a per-test timeout; JUnit XML and a summary.
``scaling``
    ``bench/run_scaling.py --pipeline-only`` on CUDA (ingest, preprocess, fit with the default 30,000
    iterations, embed) at ``--scaling-cells`` (250,000; 1,000,000 as a second invocation); end to end =
    preprocess + fit + embed.
``ddp``
    a 1-rank NCCL data-parallel fit through torchrun and the CLI (``fit --distributed``) on the scaling
    phase's atlas (or a small one), against the single-process rate.

Every phase writes into ``--out`` (``$OUT`` on the device machine) as soon as it ends: ``device_check.json``
(everything, rewritten after each phase, with the targets' pass/fail), ``device_check.log``, ``fit_matrix.csv``,
``dsbn.csv``, ``scaling.json``, ``scaling.csv``, ``tests_junit.xml`` (7 files: the device tool brings back 8).
A phase that times out or fails is recorded as such and the next one runs.

``--dry-run``: every phase on the CPU at tiny sizes (tests: the gpu-marked ones, skipped; scaling at 1,500 cells;
ddp over Gloo), in well under a minute: tests/test_device_check.py runs it in CI so this script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

PHASES = ("env", "fit", "dsbn", "tests", "scaling", "ddp")
#: Seconds per phase (full run). Sum + install stays under 9 minutes; most phases end well before their limit.
TIMEOUTS = {"env": 20, "fit": 120, "dsbn": 40, "tests": 140, "scaling": 140, "ddp": 40}
#: The scaling phase at more than 250,000 cells (the 1M invocation: ingest alone is ~2.5 min there).
SCALING_1M_TIMEOUT = 480
DRY_TIMEOUTS = {"env": 30, "fit": 60, "dsbn": 60, "tests": 90, "scaling": 180, "ddp": 90}
#: Files whose tests run their code on CUDA when it is there (besides the gpu-marked tests of every file).
TEST_FILES = ("tests/test_kernels_dsbn.py", "tests/test_loader.py", "tests/test_train.py",
              "tests/test_nn_encode.py")  # fmt: skip

#: The issue's targets: (key, description, comparison, threshold).
TARGETS = (
    ("train_b64_graphs_it_s", "training at batch 64, captured step (CUDA graphs): it/s", ">=", 3000.0),
    ("train_b64_eager_it_s", "training at batch 64, eager step: it/s", ">=", 1500.0),
    ("train_b4096_bf16_cells_s", "loader + step at batch 4,096 in bf16 (best of eager / graphs): cells/s", ">=", 500_000.0),
    ("e2e_1m_s", "1M cells end to end (preprocess + fit 30k iterations + embed): s", "<", 60.0),
    ("dsbn_triton_beats_torch_everywhere", "DSBN: Triton faster than torch at every shape", "==", True),
    ("dsbn_triton_vs_loop_d16", "DSBN: Triton speed-up over the per-domain loop at D = 16 (min over B)", ">=", 10.0),
)


def log(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------ shared
def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
            return r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = REPO / "bench" / ".device-wheels" / "commit.txt"  # written by --fetch-wheels, travels with the wheels
    return stamp.read_text().strip() + " (from bench/.device-wheels/commit.txt)" if stamp.exists() else None


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "triton", "numpy", "scipy", "numba", "zarr", "anndata", "dask", "numcodecs", "pynndescent",
                 "pandas", "scikit-learn", "scalex-scale"):  # fmt: skip
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ env phase
def _cuda_timing(fn, reps: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def phase_env(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    res: dict[str, Any] = {"versions": _versions(), "commit": _commit(), "cpu_count": os.cpu_count(),
                           "platform": platform.platform(), "torch_cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)  # fmt: skip
        res["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        res["nvidia_smi"] = repr(exc)
    on_cuda = torch.cuda.is_available() and not args.dry_run
    g = torch.Generator(device="cuda" if on_cuda else "cpu").manual_seed(0)
    if on_cuda:
        props = torch.cuda.get_device_properties(0)
        res["device"] = {"name": props.name, "sms": props.multi_processor_count, "memory_gb": props.total_memory / 2**30,
                         "capability": f"{props.major}.{props.minor}"}  # fmt: skip
        dev = torch.device("cuda")
        x = torch.zeros(1, device=dev)
        for _ in range(100):
            x.add_(1)
        torch.cuda.synchronize()
        n = 20_000
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        host_us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        res["launch_host_us_per_op"] = host_us  # host cost of one eager op (the launch-bound step's unit)
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            x.add_(1)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            for _ in range(200):
                x.add_(1)
        graph.replay()
        torch.cuda.synchronize()
        res["graph_device_us_per_kernel"] = _cuda_timing(graph.replay, 20) / 200 * 1e6
        for dtype, n_mm in ((torch.bfloat16, 8192), (torch.float32, 4096)):
            a = torch.randn(n_mm, n_mm, device=dev, generator=g).to(dtype)
            b = torch.randn(n_mm, n_mm, device=dev, generator=g).to(dtype)
            for _ in range(3):
                a @ b
            sec = _cuda_timing(lambda a=a, b=b: a @ b, 10)
            res[f"gemm_{str(dtype).removeprefix('torch.')}_{n_mm}_tflops"] = 2 * n_mm**3 / sec / 1e12
            del a, b
        for kind in ("pinned", "pageable"):
            host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=kind == "pinned").random_(generator=None)
            dst = torch.empty(host.shape, dtype=torch.uint8, device=dev)
            dst.copy_(host, non_blocking=True)
            sec = _cuda_timing(lambda dst=dst, host=host: dst.copy_(host, non_blocking=True), 5)
            res[f"h2d_{kind}_gb_s"] = host.numel() / sec / 1e9
        src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        dst.copy_(src)
        sec = _cuda_timing(lambda: dst.copy_(src), 5)
        res["d2d_gb_s_read_plus_write"] = 2 * src.numel() / sec / 1e9
        del src, dst
    else:
        res["device"] = {"name": "cpu (dry run)" if args.dry_run else "cpu (no CUDA)"}
        x = torch.zeros(1)
        n = 20_000
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        res["launch_host_us_per_op"] = (time.perf_counter() - t0) / n * 1e6
        a = torch.randn(512, 512, generator=g)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        res["gemm_float32_512_gflops_cpu"] = 5 * 2 * 512**3 / (time.perf_counter() - t0) / 1e9
    return res


# ------------------------------------------------------------------------------------------------ tests phase
def _junit_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"status": "no junit file"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                               "message": (el.get("message") or "")[:400], "text": (el.text or "")[-1500:]})
    return {**total, "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed_tests": failed}


def _merge_junit(parts: list[Path], into: Path) -> None:
    root = ET.Element("testsuites")
    for part in parts:
        if part.exists():
            got = ET.parse(part).getroot()
            root.extend([got] if got.tag == "testsuite" else list(got))
    ET.ElementTree(root).write(into, encoding="utf-8", xml_declaration=True)


def phase_tests(args: argparse.Namespace) -> dict[str, Any]:
    """Two pytest runs, output streamed to the log as it comes (a timeout keeps what ran): first every
    ``gpu``-marked test, then the rest of the files whose code runs on CUDA when it is there."""
    work = Path(args.work) / "tests"
    work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if _has_module("pytest_timeout") and not args.dry_run:
        base += ["--timeout", "90"]
    if args.dry_run:
        runs = [("gpu", ["-m", "gpu", "tests/test_train_gpu.py", "tests/test_nn_encode.py"])]
    else:
        runs = [("gpu", ["-m", "gpu", "tests/"]), ("cuda_files", ["-m", "not gpu", *TEST_FILES])]
    t0 = time.perf_counter()
    codes, parts = {}, []
    for name, extra in runs:
        junit = work / f"junit_{name}.xml"
        parts.append(junit)
        cmd = [*base, f"--junitxml={junit}", *extra]
        log("$ " + " ".join(cmd[1:]))
        codes[name] = subprocess.run(cmd, cwd=REPO).returncode
        _merge_junit(parts, Path(args.out) / "tests_junit.xml")
    rc = max(codes.values()) if codes else 0
    return {"returncode": rc, "returncodes": codes, "seconds": time.perf_counter() - t0,
            **_junit_summary(Path(args.out) / "tests_junit.xml")}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------ bench phases
def _run_script(cmd: list[str]) -> int:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=REPO).returncode


def phase_fit(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) / "fit"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "fit_matrix.py"), "--out", str(work)]
    cmd += ["--device", "cpu", "--tiny"] if args.dry_run else ["--device", "cuda"]
    rc = _run_script(cmd)
    return {"returncode": rc, **collect_fit(args)}


def collect_fit(args: argparse.Namespace) -> dict[str, Any]:
    """What fit_matrix.py wrote so far (it rewrites its files after every configuration)."""
    work = Path(args.work) / "fit"
    out = json.loads((work / "fit_matrix.json").read_text()) if (work / "fit_matrix.json").exists() else {}
    if (work / "fit_matrix.csv").exists():
        shutil.copy(work / "fit_matrix.csv", Path(args.out) / "fit_matrix.csv")
    return {k: out.get(k) for k in ("settings", "results", "loader_only", "step_only", "graphed_vs_eager")}


def phase_dsbn(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) / "dsbn"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "bench_dsbn.py"), "--out", str(work)]
    if args.dry_run:
        cmd += ["--device", "cpu", "--batch-sizes", "16,64", "--n-domains", "1,16", "--n-features", "50", "--repeats", "2"]
    else:
        cmd += ["--device", "cuda", "--batch-sizes", "64,4096", "--n-domains", "1,8,16,40"]
    rc = _run_script(cmd)
    return {"returncode": rc, **collect_dsbn(args)}


def collect_dsbn(args: argparse.Namespace) -> dict[str, Any]:
    """What bench_dsbn.py wrote so far (it rewrites its files after every shape)."""
    work = Path(args.work) / "dsbn"
    out = json.loads((work / "dsbn.json").read_text()) if (work / "dsbn.json").exists() else {}
    if (work / "dsbn.csv").exists():
        shutil.copy(work / "dsbn.csv", Path(args.out) / "dsbn.csv")
    return {"results": out.get("results")}


def _scaling_store(args: argparse.Namespace) -> Path:
    return Path(args.work) / "scaling" / f"atlas_{args.scaling_cells}.zarr"


def phase_scaling(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    work = Path(args.work) / "scaling"
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "run_scaling.py"), "--sizes", str(args.scaling_cells), "--pipeline-only",
           "--no-quality", "--keep", "--workdir", str(work), "--out", str(out_dir)]  # fmt: skip
    graphs = False
    if args.dry_run:
        cmd += ["--device", "cpu", "--max-iterations", "20", "--n-genes", "1200", "--genes-per-cell", "700",
                "--n-batches", "3", "--min-features", "200"]  # fmt: skip
    else:
        cmd += ["--device", "cuda"]
        # the captured step when the fit phase showed it works (else the eager step)
        fit_rows = (results.get("fit") or {}).get("results") or []
        graphs = any(r.get("mode") == "graphs" and r.get("status") == "ok" for r in fit_rows)
        if graphs:
            cmd.append("--cuda-graphs")
    rc = _run_script(cmd)
    for name in ("scaling.json", "scaling.csv"):
        if (out_dir / name).exists():
            shutil.copy(out_dir / name, Path(args.out) / name)
    rows = json.loads((out_dir / "scaling.json").read_text()).get("results", []) if (out_dir / "scaling.json").exists() else []
    stages = {r["stage"]: r for r in rows if r.get("n_cells") == args.scaling_cells}
    e2e = None
    if all(stages.get(s, {}).get("status") == "ok" for s in ("preprocess", "fit", "embed")):
        e2e = sum(stages[s]["wall_s"] for s in ("preprocess", "fit", "embed"))
    return {"returncode": rc, "cells": args.scaling_cells, "cuda_graphs": graphs, "end_to_end_s": e2e,
            "stages": {k: {f: v.get(f) for f in ("status", "wall_s", "process_wall_s", "peak_rss_mb", "peak_gpu_mb",
                                                 "iterations", "iterations_per_s", "cells_per_s")}
                       for k, v in stages.items()}}  # fmt: skip


def phase_ddp(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    store = _scaling_store(args)
    res: dict[str, Any] = {"store": str(store)}
    if not store.exists():  # the scaling phase did not leave its atlas: make a small one
        store = Path(args.work) / "ddp" / "atlas.zarr"
        from _env import run_stage

        n = 3000 if args.dry_run else 50_000
        for stage, stage_args in (("synthetic", {"store": str(store), "n_cells": n, "n_genes": 1200 if args.dry_run else 5000,
                                                 "n_batches": 3, "genes_per_cell": 700 if args.dry_run else 1000}),
                                  ("preprocess", {"store": str(store), "min_features": 200})):  # fmt: skip
            r = run_stage(stage, stage_args)
            if r.get("status") != "ok":
                return {**res, "status": f"{stage} failed", "stage": r}
        res["store"] = str(store)
    model = Path(args.work) / "ddp" / "model"
    shutil.rmtree(model, ignore_errors=True)
    device = "cpu" if args.dry_run else "cuda"
    iterations = 40 if args.dry_run else 3000
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
           "scalex_scale.cli", "fit", str(store), str(model), "--distributed", "--device", device,
           "--max-iterations", str(iterations), "--no-progress"]  # fmt: skip
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
    res.update({"returncode": proc.returncode, "process_wall_s": time.perf_counter() - t0, "device": device,
                "stderr_tail": proc.stderr[-2500:]})  # fmt: skip
    if proc.returncode == 0:
        from scalex_scale.store import Atlas

        model_state = Atlas.open(store).state.get("model", {})
        res["model"] = model_state
        if model_state.get("seconds"):
            res["it_per_s"] = model_state["n_iterations"] / model_state["seconds"]
        local = ((results.get("scaling") or {}).get("stages") or {}).get("fit") or {}
        if local.get("iterations_per_s") and res.get("it_per_s"):
            res["ratio_to_single_process"] = res["it_per_s"] / local["iterations_per_s"]
    return res


# ------------------------------------------------------------------------------------------------ targets
def evaluate_targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target's measured value and pass/fail (None when its phase did not produce it)."""
    fit = [r for r in ((results.get("fit") or {}).get("results") or []) if r.get("status") == "ok"]
    on_cuda = str(((results.get("fit") or {}).get("settings") or {}).get("device", "")).startswith("cuda")

    def best(batch: int, mode: str | None, precision: str | None, key: str) -> float | None:
        vals = [r[key] for r in fit if r["batch_size"] == batch and (mode is None or r["mode"] == mode)
                and (precision is None or r["precision"] == precision)]  # fmt: skip
        return max(vals) if vals else None

    value: dict[str, Any] = {
        "train_b64_graphs_it_s": best(64, "graphs", None, "it_per_s"),
        "train_b64_eager_it_s": best(64, "eager", None, "it_per_s"),
        "train_b4096_bf16_cells_s": best(4096, None, "bf16", "cells_per_s"),
        "e2e_1m_s": None,
        "dsbn_triton_beats_torch_everywhere": None,
        "dsbn_triton_vs_loop_d16": None,
    }
    scaling = results.get("scaling") or {}
    if scaling.get("cells") == 1_000_000 and scaling.get("end_to_end_s") is not None:
        value["e2e_1m_s"] = scaling["end_to_end_s"]
    dsbn = (results.get("dsbn") or {}).get("results") or []
    triton = {(r["batch_size"], r["n_domains"]): r for r in dsbn if r["method"] == "triton"}
    torch_ = {(r["batch_size"], r["n_domains"]): r for r in dsbn if r["method"] == "torch"}
    if triton:
        slower = [k for k, r in triton.items() if k in torch_ and not r["ms_median"] < torch_[k]["ms_median"]]
        value["dsbn_triton_beats_torch_everywhere"] = not slower
        value["dsbn_triton_slower_shapes"] = [f"B={b} D={d}" for b, d in slower]
        d16 = [r["speedup_vs_loop"] for (b, d), r in triton.items() if d == 16 and r.get("speedup_vs_loop")]
        value["dsbn_triton_vs_loop_d16"] = min(d16) if d16 else None
    out = {}
    for key, what, op, threshold in TARGETS:
        v = value[key]
        ok = None
        if v is not None and (on_cuda or key.startswith("dsbn") or key == "e2e_1m_s"):
            ok = {">=": v >= threshold, "<": v < threshold, "==": v == threshold}[op]
        out[key] = {"what": what, "target": f"{op} {threshold}", "value": v, "pass": ok}
    if "dsbn_triton_slower_shapes" in value:
        out["dsbn_triton_beats_torch_everywhere"]["slower_shapes"] = value["dsbn_triton_slower_shapes"]
    return out


# ------------------------------------------------------------------------------------------------ driver
def run_phase(name: str, args: argparse.Namespace) -> None:
    """In a child process: run one phase, write its JSON to the work folder."""
    results_path = Path(args.work) / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    fn = {"env": phase_env, "tests": phase_tests, "fit": phase_fit, "dsbn": phase_dsbn}.get(name)
    res = fn(args) if fn is not None else {"scaling": phase_scaling, "ddp": phase_ddp}[name](args, results)
    _write_json(Path(args.work) / f"phase_{name}.json", res)


def drive(args: argparse.Namespace) -> int:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)  # no file of an earlier run may pass for this run's results
    work.mkdir(parents=True, exist_ok=True)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"unknown phase(s) {unknown}; choose from {','.join(PHASES)}")
    limits = DRY_TIMEOUTS if args.dry_run else TIMEOUTS
    payload: dict[str, Any] = {"check": "scalex-scale device check", "dry_run": args.dry_run, "commit": _commit(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
                               "install": _install_report(), "out": str(out), "phases": {}, "results": {}}  # fmt: skip
    log_path = out / "device_check.log"
    t_all = time.perf_counter()
    for name in phases:
        base = limits[name]
        if name == "scaling" and not args.dry_run and args.scaling_cells > 250_000:
            base = SCALING_1M_TIMEOUT
        limit = int(args.timeout_scale * base)
        cmd = ["timeout", "-k", "5", str(limit), sys.executable, str(Path(__file__).resolve()), "phase", name,
               "--out", str(out), "--work", str(work), "--scaling-cells", str(args.scaling_cells)]  # fmt: skip
        if args.dry_run:
            cmd.append("--dry-run")
        log(f"=== phase {name} (limit {limit} s) ===")
        t0 = time.perf_counter()
        with open(log_path, "a") as fh:
            fh.write(f"\n=== phase {name} (limit {limit} s) ===\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                if not line.startswith("USDT:"):
                    sys.stdout.write(line)
            rc = proc.wait()
        seconds = time.perf_counter() - t0
        status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else f"failed (rc {rc})")
        phase_file = work / f"phase_{name}.json"
        if phase_file.exists():
            payload["results"][name] = json.loads(phase_file.read_text())
        elif name in SALVAGE:  # timed out or crashed: keep what it had written
            try:
                payload["results"][name] = {"partial": True, **SALVAGE[name](args)}
            except Exception as exc:  # noqa: BLE001
                payload["results"][name] = {"partial": True, "salvage_error": repr(exc)}
            if status == "ok" and payload["results"][name].get("returncode", 0) not in (0, None):
                status = f"ran; its command returned {payload['results'][name]['returncode']}"
        payload["phases"][name] = {"status": status, "seconds": round(seconds, 1), "limit_s": limit}
        _write_json(work / "results.json", payload["results"])
        payload["targets"] = evaluate_targets(payload["results"])
        payload["elapsed_s"] = round(time.perf_counter() - t_all, 1)
        _write_json(out / "device_check.json", payload)
        log(f"=== phase {name}: {status} in {seconds:.0f} s ===")
    summary(payload)
    return 0 if all(p["status"] == "ok" for p in payload["phases"].values()) else 1


SALVAGE = {
    "fit": collect_fit,
    "dsbn": collect_dsbn,
    "tests": lambda args: _junit_summary(Path(args.out) / "tests_junit.xml"),
}


def _install_report() -> dict[str, Any]:
    path = os.environ.get("SCALEX_DC_INSTALL_REPORT")
    if path and Path(path).exists():
        return {"log_tail": Path(path).read_text()[-3000:]}
    return {}


def summary(payload: dict[str, Any]) -> None:
    log("\n==================== device check summary ====================")
    for name, p in payload["phases"].items():
        log(f"  {name:8s} {p['status']:28s} {p['seconds']:7.1f} s (limit {p['limit_s']})")
    tests = payload["results"].get("tests") or {}
    if tests:
        log(f"  tests: {tests.get('passed')} passed, {tests.get('failures')} failed, {tests.get('errors')} errors, "
            f"{tests.get('skipped')} skipped")
        for f in tests.get("failed_tests", [])[:12]:
            log(f"    FAIL {f['test']}: {f['message'][:150]}")
    fit = (payload["results"].get("fit") or {}).get("results") or []
    for r in fit:
        if r.get("status") == "ok":
            log(f"  fit B={r['batch_size']:<5d} {r['precision']} {r['mode']:6s} {r['it_per_s']:9.1f} it/s "
                f"{r['cells_per_s']:11,.0f} cells/s kernels {r.get('kernels')} launches {r.get('launches')} "
                f"h2d {r.get('h2d_copies')} syncs {r.get('host_syncs')}")
        else:
            log(f"  fit B={r['batch_size']:<5d} {r['precision']} {r['mode']:6s} {r['status']}: {str(r.get('error'))[-160:]}")
    for c in (payload["results"].get("fit") or {}).get("graphed_vs_eager") or []:
        log(f"  graphs vs eager B={c['batch_size']} {c['precision']}: loss rel diff {c['loss_rel_diff']:.2e}, "
            f"weights max diff {c['weights_max_abs_diff']:.2e}")
    for key, t in (payload.get("targets") or {}).items():
        v = t["value"]
        shown = f"{v:,.4g}" if isinstance(v, float) else str(v)
        log(f"  target {key:36s} {shown:>14s} {t['target']:>12s}  "
            f"{'PASS' if t['pass'] else ('FAIL' if t['pass'] is False else 'n/a')}")
    log(f"  total {payload.get('elapsed_s')} s; results in {Path(payload.get('out', '.'))}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "phase"):
        q = sub.add_parser(name)
        if name == "phase":
            q.add_argument("name", choices=PHASES)
        else:
            q.add_argument("--phases", default=",".join(PHASES))
            q.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every phase's time limit")
        q.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "_work" / "device_check"))
        q.add_argument("--work", default=None, help="scratch folder (default: /tmp/scalex-device-check)")
        q.add_argument("--dry-run", action="store_true")
        q.add_argument("--scaling-cells", type=int, default=None)
    a = p.parse_args(argv)
    a.work = a.work or str(Path(os.environ.get("TMPDIR", "/tmp")) / "scalex-device-check")
    if a.scaling_cells is None:
        a.scaling_cells = 1500 if a.dry_run else 250_000
    if a.cmd == "phase":
        run_phase(a.name, a)
        return 0
    return drive(a)


if __name__ == "__main__":
    sys.exit(main())
