"""Benchmark data-parallel training: throughput (cells/s) and scaling efficiency with 1, 2, 4 processes.

Each configuration starts ``n`` processes with ``torch.multiprocessing.spawn`` (the same environment
variables torchrun sets), joins them with :func:`scalex_scale.train.distributed.init_distributed`
(Gloo on CPU, NCCL on CUDA), and trains a full-size :class:`~scalex_scale.nn.SCALEXModule`
(``n_hidden=1024``) with the real :class:`~scalex_scale.train.Trainer`, ``DistributedDataParallel``
(:func:`wrap_ddp`) and the sharded :class:`~scalex_scale.data.TrainingLoader` over a synthetic
in-memory training source (random sparse rows, ~``nnz_per_row`` non-zeros, float16 values, uint16
indices, like the atlas training matrix). ``warmup`` steps are run first (``fit(pause_at_iteration)``),
then ``steps`` steps are timed; the slowest rank's time counts.

- throughput = ``n * per_rank_batch * steps / seconds`` (cells/s over all processes);
- efficiency = ``throughput_n / (n * throughput_1)`` for the same batch mode and DSBN mode.

Batch modes: fixed per-rank batch (default 64; the global batch grows with ``n``) and, with
``--global-batch G``, fixed global batch (per-rank ``G / n``). DSBN modes: plain (per-rank DSBN
statistics) and ``sync`` (per-domain synchronized DSBN: two more all-reduces per step).
On CPU each process gets ``max(1, cores // n)`` torch threads.

Usage::

    python bench/bench_distributed.py --quick                    # short runs, smoke test
    python bench/bench_distributed.py --processes 1,2,4 --global-batch 256 --modes plain,sync

Writes ``bench/results/<machine>/distributed.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import machine_info, results_dir, usable_cores, versions, write_json  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- synthetic source
def write_synthetic(
    directory: Path, n_cells: int, n_features: int, nnz_per_row: int, n_domains: int, seed: int
) -> None:
    """CSR arrays as .npy files (memory-mapped by every process): float16 values, uint16 indices."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.poisson(nnz_per_row, n_cells), 1, n_features)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    # Sorted-unique column indices are not needed by the loader; random columns with few duplicates are fine.
    indices = rng.integers(0, n_features, int(indptr[-1]), dtype=np.int64).astype(np.uint16)
    data = np.minimum(np.log1p(rng.geometric(0.35, int(indptr[-1]))) / np.log1p(20.0), 1.0).astype(np.float16)
    domain = rng.integers(0, n_domains, n_cells).astype(np.int32)
    for name, arr in (("indptr", indptr), ("indices", indices), ("data", data), ("domain", domain)):
        np.save(directory / f"{name}.npy", arr)


# ---------------------------------------------------------------------- one process
def _worker(rank: int, world: int, port: int, spec: dict[str, Any], data_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(spec["threads"]))
    torch.set_num_threads(spec["threads"])
    from scalex_scale.data import InMemorySource, LoaderConfig, TrainingLoader
    from scalex_scale.nn import SCALEXModule
    from scalex_scale.train import TrainConfig, Trainer, all_reduce_epoch_loss
    from scalex_scale.train.distributed import init_distributed, rank_config, shutdown, wrap_ddp

    ctx = init_distributed(spec["device"])
    try:
        arrays = {k: np.load(Path(data_dir) / f"{k}.npy", mmap_mode="r")
                  for k in ("indptr", "indices", "data", "domain")}
        source = InMemorySource.from_arrays(arrays["indptr"], arrays["indices"], arrays["data"], arrays["domain"],
                                            spec["n_features"], spec["n_domains"])
        module = SCALEXModule(spec["n_features"], spec["n_domains"], seed=0)
        ddp = wrap_ddp(module, ctx, sync_dsbn=spec["sync_dsbn"])
        per_rank = spec["per_rank_batch"]
        config = TrainConfig(max_iterations=spec["warmup"] + spec["steps"], batch_size=per_rank, device=spec["device"],
                             progress=False, patience=10**9)
        loader = TrainingLoader(
            source,
            LoaderConfig(batch_size=per_rank, seed=0, num_workers=1, prefetch=2),
            rank=ctx.rank, world_size=ctx.world_size,
        )
        trainer = Trainer(module, rank_config(config, ctx), train_module=ddp,
                          reduce_epoch_loss=all_reduce_epoch_loss())
        trainer.fit(loader, pause_at_iteration=spec["warmup"])
        dist.barrier()
        result = trainer.fit(loader)
        seconds = torch.tensor([result.seconds], dtype=torch.float64)
        fastest = seconds.clone()
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        dist.all_reduce(fastest, op=dist.ReduceOp.MIN)
        n_params = sum(p.numel() for p in module.parameters())
        comm = {
            "allreduce_ms_gradients": _allreduce_ms(n_params, ctx.device),
            "allreduce_ms_sync_dsbn_forward": _allreduce_ms(
                spec["n_domains"] * (2 * spec["n_features"] + 1), ctx.device
            ),
        }
        if ctx.rank == 0:
            Path(out).write_text(json.dumps({
                "n_parameters": n_params,
                **comm,
                "seconds_slowest_rank": seconds.item(),
                "seconds_fastest_rank": fastest.item(),
                "steps": result.n_iterations - spec["warmup"],
                "final_epoch_loss": result.history[-1].loss if result.history else None,
            }))
    finally:
        shutdown()


def _allreduce_ms(numel: int, device: torch.device, repeats: int = 10) -> float:
    """Median wall time (ms) of one SUM all-reduce of ``numel`` float32 over all ranks."""
    t = torch.ones(numel, device=device)
    times = []
    for _ in range(repeats + 2):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times[2:])), 3)


def run_config(n: int, spec: dict[str, Any], data_dir: Path, tmp: Path) -> dict[str, Any]:
    out = tmp / f"result-{n}-{spec['per_rank_batch']}-{spec['sync_dsbn']}.json"
    start = time.perf_counter()
    mp.spawn(_worker, args=(n, free_port(), spec, str(data_dir), str(out)), nprocs=n, join=True)
    measured = json.loads(out.read_text())
    cells = n * spec["per_rank_batch"] * measured["steps"]
    return {
        "processes": n,
        "threads_per_process": spec["threads"],
        "per_rank_batch": spec["per_rank_batch"],
        "global_batch": n * spec["per_rank_batch"],
        "sync_dsbn": spec["sync_dsbn"],
        "steps_timed": measured["steps"],
        "seconds": round(measured["seconds_slowest_rank"], 4),
        "seconds_fastest_rank": round(measured["seconds_fastest_rank"], 4),
        "cells_per_s": round(cells / measured["seconds_slowest_rank"], 1),
        "steps_per_s": round(measured["steps"] / measured["seconds_slowest_rank"], 3),
        "wall_seconds_with_startup": round(time.perf_counter() - start, 2),
        "n_parameters": measured["n_parameters"],
        "allreduce_ms_gradients": measured["allreduce_ms_gradients"],
        "allreduce_ms_sync_dsbn_forward": measured["allreduce_ms_sync_dsbn_forward"],
        "step_ms": round(1000 * measured["seconds_slowest_rank"] / max(measured["steps"], 1), 2),
    }


# ---------------------------------------------------------------------- driver
NOTES = (
    "Measured on a CPU-only machine with Gloo over loopback TCP: every process trains on the same few cores, "
    "so 'efficiency' here measures how the per-step all-reduce of ~2.1M float32 gradients (8.4 MB at 2,000 "
    "features) and core sharing behave on one host, not interconnect scaling. With more processes than "
    "usable cores (see threads_per_process and machine.usable_cores) the processes time-share the cores and "
    "efficiency falls below 1/oversubscription by construction. The machine may be shared with other jobs "
    "(load_average_at_start). NOT measured here: NCCL, multi-GPU (one process per GPU), multi-node (InfiniBand "
    "/ Ethernet), and GPU overlap of DDP's bucketed all-reduce with backward; expect those to behave very "
    "differently (on GPUs the step is ~1 ms of compute, so the gradient all-reduce and, with --sync-dsbn, the "
    "two non-overlapped DSBN all-reduces dominate at small per-rank batches: use large per-rank batches). "
    "Timings start after warm-up steps; the slowest rank's time is used. OMP_WAIT_POLICY (config.omp_wait_policy) "
    "is PASSIVE by default: on a loaded 2-core machine, libgomp's default active spin-waiting of 2 intra-op "
    "threads next to the loader's reader thread made a single process ~30x slower (17 s instead of 0.5 s for "
    "15 steps); this affects the Trainer + TrainingLoader on CPU in general, not only DDP."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", default="1,2,4", help="comma-separated process counts (default 1,2,4)")
    p.add_argument("--per-rank-batch", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=None, help="also measure a fixed global batch")
    p.add_argument("--modes", default="plain,sync", help="DSBN modes: plain, sync (comma-separated)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--n-cells", type=int, default=40_000)
    p.add_argument("--n-features", type=int, default=2000)
    p.add_argument("--nnz-per-row", type=int, default=400)
    p.add_argument("--n-domains", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads-per-process", type=int, default=None,
                   help="torch threads of every process (default: max(1, usable cores // processes))")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for the processes ('' leaves it unset); see the notes")
    p.add_argument("--quick", action="store_true", help="short runs: 15 timed steps, 3 warm-up, 12k cells")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default bench/results/<machine>/distributed.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.n_cells = 15, 3, 12_000
    processes = [int(v) for v in args.processes.split(",") if v]
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"plain", "sync"}:
        raise SystemExit(f"--modes takes plain and/or sync, got {args.modes!r}")
    if args.device == "cuda" and max(processes) > torch.cuda.device_count():
        raise SystemExit(f"{max(processes)} processes need as many GPUs; {torch.cuda.device_count()} visible")
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # inherited by the spawned processes
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    cores = usable_cores()
    batch_modes: list[tuple[str, Any]] = [("fixed_per_rank_batch", args.per_rank_batch)]
    if args.global_batch:
        bad = [n for n in processes if args.global_batch % n]
        if bad:
            raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {bad}")
        batch_modes.append(("fixed_global_batch", args.global_batch))

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmpdir:
        tmp = Path(tmpdir)
        write_synthetic(tmp, args.n_cells, args.n_features, args.nnz_per_row, args.n_domains, seed=0)
        for batch_mode, size in batch_modes:
            for mode in modes:
                base: float | None = None
                for n in processes:
                    per_rank = size if batch_mode == "fixed_per_rank_batch" else size // n
                    spec = {
                        "device": args.device, "threads": args.threads_per_process or max(1, cores // n),
                        "n_features": args.n_features,
                        "n_domains": args.n_domains, "per_rank_batch": per_rank, "sync_dsbn": mode == "sync",
                        "warmup": args.warmup, "steps": args.steps,
                    }
                    row = run_config(n, spec, tmp, tmp)
                    row["batch_mode"] = batch_mode
                    if n == 1:
                        base = row["cells_per_s"]
                    row["efficiency"] = round(row["cells_per_s"] / (n * base), 3) if base else None
                    results.append(row)
                    print(f"{batch_mode:21s} {mode:5s} n={n} threads={spec['threads']} batch={per_rank:4d}x{n}: "
                          f"{row['cells_per_s']:9.1f} cells/s  efficiency {row['efficiency']}  "
                          f"step {row['step_ms']} ms, "
                          f"grad all-reduce {row['allreduce_ms_gradients']} ms", flush=True)

    payload = {
        "benchmark": "data-parallel training throughput (DDP + Trainer + sharded loader), cells/s over all processes",
        # _env's machine description (taken at the end) plus what this benchmark needs; git_commit comes from _env
        "machine": {**machine_info(), "load_average_at_start": load_at_start,
                    "gpu_count": torch.cuda.device_count() if args.device == "cuda" else 0},
        "versions": {**versions(), "gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"n_hidden": 1024, "n_latent": 10, "n_features": args.n_features, "n_domains": args.n_domains},
        "results": results,
        "notes": NOTES,
    }
    out = args.out or results_dir(device=args.device) / "distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
