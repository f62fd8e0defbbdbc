#!/usr/bin/env python
"""The real trainer + loader over a matrix of settings: batch size x precision x eager / CUDA graphs.

For every (batch, precision, mode) it trains on one synthetic in-memory training matrix (float16 values,
uint16 feature indices, ``--nnz`` non-zeros per row, like the atlas' compact matrix) through the
:class:`~scalex_scale.data.TrainingLoader` (pinned ring, persistent pipeline, ``--workers`` reader
threads) and records:

- ``it_per_s`` / ``cells_per_s`` of the steady state: ``--iterations`` steps after ``--warmup`` steps
  (which hold Triton compilation, the CUDA-graph warm-up and capture), the device synchronized at both
  marks;
- ``ops`` (CPU), ``kernels``, ``launches``, ``h2d_copies`` and ``host_syncs`` per steady-state step
  (:func:`scalex_scale.train.profiling.count_step_ops`);
- graphed vs eager: same seeds, same batches, same noise, so the epoch losses and final weights of the
  two modes should agree; their relative loss difference and largest weight difference;
- the loader alone (host side, and staged on the device) at each batch size, and the step alone on one
  repeated batch: which of the two limits the combined rate.

Usage::

    python bench/fit_matrix.py --device cuda                      # batch 64 and 4096, fp32/bf16, eager/graphs
    python bench/fit_matrix.py --device cpu --tiny                # the CPU dry run (tiny sizes)

Writes ``fit_matrix.json`` and ``fit_matrix.csv`` under ``--out`` (default ``bench/results/<machine>``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scalex_scale.data import InMemorySource, LoaderConfig, TrainingLoader  # noqa: E402
from scalex_scale.data.device import device_batches  # noqa: E402
from scalex_scale.nn import SCALEXModule  # noqa: E402
from scalex_scale.train import TrainConfig, Trainer, cpu_has_bf16  # noqa: E402
from scalex_scale.train.profiling import count_step_ops  # noqa: E402

from _env import header, results_dir  # noqa: E402


def synthetic_source(n_rows: int, n_features: int, nnz: int, n_domains: int, seed: int = 0) -> InMemorySource:
    """``nnz`` distinct columns per row (a random start, stride 3: coprime with typical widths; unsorted is fine
    for the loader), float16 values in (0, 1], uint16 indices, random domains."""
    rng = np.random.default_rng(seed)
    nnz = min(nnz, n_features)
    stride = 3 if n_features % 3 else 7
    start = rng.integers(0, n_features, n_rows)
    cols = (start[:, None] + stride * np.arange(nnz)[None, :]) % n_features
    indices = cols.astype(np.uint16 if n_features <= 65535 else np.int32).ravel()
    data = rng.uniform(0.01, 1.0, n_rows * nnz).astype(np.float16)
    indptr = np.arange(n_rows + 1, dtype=np.int64) * nnz
    domain = rng.integers(0, n_domains, n_rows).astype(np.int32)
    return InMemorySource.from_arrays(indptr, indices, data, domain, n_features, n_domains)


class TimedLoader:
    """Passes a loader through and records the time (device synchronized) when batch ``marks[i]`` is requested."""

    def __init__(self, loader: TrainingLoader, marks: tuple[int, int], device: torch.device) -> None:
        self.loader, self.marks, self.device = loader, marks, device
        self.count = 0
        self.times: dict[int, float] = {}

    @property
    def batches_per_epoch(self) -> int:
        return self.loader.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        with self.loader.epoch(epoch, start_batch) as batches:
            for batch in batches:
                if self.count in self.marks:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.times[self.count] = time.perf_counter()
                self.count += 1
                yield batch


def _module(args: argparse.Namespace) -> SCALEXModule:
    return SCALEXModule(args.n_features, args.n_domains, seed=0)


def _config(args: argparse.Namespace, batch: int, precision: str, graphs: bool, iterations: int) -> TrainConfig:
    return TrainConfig(max_iterations=iterations, batch_size=batch, precision=precision, cuda_graphs=graphs,
                       device=args.device, progress=False, log_every=0, patience=10**6, seed=0)  # fmt: skip


def _loader(source: InMemorySource, args: argparse.Namespace, batch: int) -> TrainingLoader:
    return TrainingLoader(
        source,
        LoaderConfig(batch_size=batch, seed=0, num_workers=args.workers, prefetch=max(2, args.workers)),
        pin_memory=args.device.startswith("cuda"),
    )  # fmt: skip


def run_fit(source: InMemorySource, args: argparse.Namespace, batch: int, precision: str, mode: str) -> dict[str, Any]:
    """One timed fit; returns the row (and keeps the final weights for the graphed-vs-eager comparison)."""
    n_it = args.iterations_small if batch <= 256 else args.iterations_large
    warm = args.warmup
    module = _module(args)
    cfg = _config(args, batch, precision, mode == "graphs", warm + n_it)
    device = torch.device(args.device)
    loader = _loader(source, args, batch)
    timed = TimedLoader(loader, (warm, warm + n_it), device)
    t0 = time.perf_counter()
    with loader:
        result = Trainer(module, cfg).fit(timed)
        stats = loader.pinned_stats()
        restarts = loader.restarts
    wall = time.perf_counter() - t0
    if warm + n_it in timed.times:
        seconds = timed.times[warm + n_it] - timed.times[warm]
    else:  # the last mark is the batch after the last step: never requested; time to the end of fit instead
        seconds = (t0 + result.seconds) - timed.times[warm] if warm in timed.times else result.seconds
    row = {
        "status": "ok", "batch_size": batch, "precision": precision, "mode": mode, "iterations_timed": n_it,
        "warmup": warm, "seconds_timed": seconds, "it_per_s": n_it / seconds, "cells_per_s": n_it * batch / seconds,
        "fit_wall_s": wall, "final_loss": result.history[-1].loss if result.history else None,
        "epochs": result.n_epochs, "loader_restarts": restarts, "pinned": stats,
    }  # fmt: skip
    row["_state"] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return row


def loader_rate(source: InMemorySource, args: argparse.Namespace, batch: int, n: int, to_device: bool) -> float:
    """Cells/s of the loader alone (host side: batches taken and dropped; or staged on the device)."""
    loader = _loader(source, args, batch)
    device = torch.device(args.device)
    done = 0
    with loader:
        it = iter(loader.epoch(0))
        first = next(it)  # pipeline start-up is not the steady state
        del first
        t0 = time.perf_counter()
        stream = device_batches(it, device) if to_device else it
        for _ in stream:
            done += 1
            if done >= n:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return done * batch / seconds


def step_rate(source: InMemorySource, args: argparse.Namespace, batch: int, precision: str, graphs: bool, n: int) -> float:
    """Cells/s of the training step alone on one repeated batch (no loader in the loop)."""
    from scalex_scale.train.profiling import _RepeatLoader

    loader = _loader(source, args, batch)
    with loader, loader.epoch(0) as batches:
        one = next(batches)
    device = torch.device(args.device)
    timed = TimedLoader(_RepeatLoaderAdapter(_RepeatLoader(one, n + args.warmup + 2)), (args.warmup, args.warmup + n), device)
    Trainer(_module(args), _config(args, batch, precision, graphs, args.warmup + n)).fit(timed)
    if args.warmup + n not in timed.times:
        return float("nan")
    return n * batch / (timed.times[args.warmup + n] - timed.times[args.warmup])


class _RepeatLoaderAdapter:
    """A ``_RepeatLoader`` with the context-manager ``epoch`` the TimedLoader expects."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def batches_per_epoch(self) -> int:
        return self.inner.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0):
        import contextlib

        return contextlib.closing(self.inner.epoch(epoch, start_batch))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default="64,4096")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--modes", default="eager,graphs")
    p.add_argument("--n-rows", type=int, default=262_144)
    p.add_argument("--n-features", type=int, default=2000)
    p.add_argument("--nnz", type=int, default=400)
    p.add_argument("--n-domains", type=int, default=8)
    p.add_argument("--iterations-small", type=int, default=3000, help="timed steps at batch <= 256")
    p.add_argument("--iterations-large", type=int, default=200, help="timed steps at larger batches")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 2)))
    p.add_argument("--no-ops", action="store_true", help="skip the per-step op counts")
    p.add_argument("--tiny", action="store_true", help="dry-run sizes (CPU, seconds)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.n_rows, a.n_features, a.nnz, a.n_domains = 8192, 64, 12, 4
        a.iterations_small, a.iterations_large, a.warmup, a.workers = 20, 3, 3, 1
    device = torch.device(a.device)
    t0 = time.perf_counter()
    source = synthetic_source(a.n_rows, a.n_features, a.nnz, a.n_domains)
    print(f"synthetic source: {a.n_rows} rows x {a.n_features}, {a.nnz} nnz/row in {time.perf_counter() - t0:.1f} s", flush=True)
    out_dir = results_dir(a.out, device=device.type if device.type == "cpu" else None)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"loader_only": [], "step_only": [], "graphed_vs_eager": []}

    def write() -> None:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        payload = {**header(), "benchmark": "fit matrix: real trainer + loader", "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "results": clean, **extra}
        (out_dir / "fit_matrix.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        keys = ["batch_size", "precision", "mode", "status", "it_per_s", "cells_per_s", "kernels", "launches",
                "h2d_copies", "host_syncs", "ops", "triton", "final_loss", "iterations_timed", "seconds_timed", "error"]
        with open(out_dir / "fit_matrix.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in clean:
                w.writerow(r)

    batches = [int(b) for b in a.batch_sizes.split(",")]
    precisions = [x for x in a.precisions.split(",") if x != "bf16" or device.type == "cuda" or cpu_has_bf16()]
    for batch in batches:
        for name, to_dev in (("host", False), ("to_device", True)):
            try:
                n = max(20, (a.iterations_small if batch <= 256 else a.iterations_large) // 2)
                rate = loader_rate(source, a, batch, n, to_dev)
                extra["loader_only"].append({"batch_size": batch, "where": name, "cells_per_s": rate})
                print(f"loader only  batch {batch:5d} {name:9s} {rate:12,.0f} cells/s", flush=True)
            except Exception as exc:  # noqa: BLE001 - recorded, the matrix goes on
                extra["loader_only"].append({"batch_size": batch, "where": name, "status": "failed", "error": repr(exc)})
        for precision in precisions:
            for mode in a.modes.split(","):
                if mode == "graphs" and device.type != "cuda":
                    rows.append({"batch_size": batch, "precision": precision, "mode": mode, "status": "skipped",
                                 "error": "CUDA graphs need a CUDA device"})
                    continue
                try:
                    row = run_fit(source, a, batch, precision, mode)
                except Exception as exc:  # noqa: BLE001
                    row = {"batch_size": batch, "precision": precision, "mode": mode, "status": "failed",
                           "error": "".join(traceback.format_exception(exc))[-3000:]}
                    print(row["error"], file=sys.stderr, flush=True)
                if row["status"] == "ok" and not a.no_ops:
                    try:
                        with _loader(source, a, batch) as ld, ld.epoch(0) as bs:
                            one = next(bs)
                        cfg = _config(a, batch, precision, mode == "graphs", 1)
                        k1, k2 = (3, 6) if a.tiny else (8, 24)
                        ops = count_step_ops(lambda: _module(a), cfg, one, k1=k1, k2=k2).to_dict()
                        row.update({k: ops[k] for k in ("ops", "triton", "host_syncs", "kernels", "launches", "h2d_copies")})
                        row["ops_by_name"] = ops["by_name"]
                    except Exception as exc:  # noqa: BLE001
                        row["ops_error"] = repr(exc)
                rows.append(row)
                if row["status"] == "ok":
                    print(f"fit  batch {batch:5d} {precision} {mode:6s} {row['it_per_s']:9.1f} it/s "
                          f"{row['cells_per_s']:12,.0f} cells/s  kernels {row.get('kernels')} launches {row.get('launches')} "
                          f"ops {row.get('ops')} syncs {row.get('host_syncs')}", flush=True)
                write()
            eager = next((r for r in rows if r.get("status") == "ok" and r["batch_size"] == batch
                          and r["precision"] == precision and r["mode"] == "eager"), None)  # fmt: skip
            graphed = next((r for r in rows if r.get("status") == "ok" and r["batch_size"] == batch
                            and r["precision"] == precision and r["mode"] == "graphs"), None)  # fmt: skip
            if eager and graphed:
                rel = abs(graphed["final_loss"] - eager["final_loss"]) / max(abs(eager["final_loss"]), 1e-12)
                cmp = {"batch_size": batch, "precision": precision, "loss_eager": eager["final_loss"],
                       "loss_graphs": graphed["final_loss"], "loss_rel_diff": rel,
                       "weights_max_abs_diff": max_abs_diff(eager["_state"], graphed["_state"]),
                       "equal_within_1e-5": rel <= 1e-5}  # fmt: skip
                extra["graphed_vs_eager"].append(cmp)
                print(f"graphs vs eager batch {batch} {precision}: loss rel diff {rel:.2e}, "
                      f"weights max diff {cmp['weights_max_abs_diff']:.2e}", flush=True)
            if batch > 256:
                for mode in ("eager", "graphs") if device.type == "cuda" else ("eager",):
                    try:
                        rate = step_rate(source, a, batch, precision, mode == "graphs", a.iterations_large)
                        extra["step_only"].append({"batch_size": batch, "precision": precision, "mode": mode,
                                                   "cells_per_s": rate})
                        print(f"step only    batch {batch:5d} {precision} {mode:6s} {rate:12,.0f} cells/s", flush=True)
                    except Exception as exc:  # noqa: BLE001
                        extra["step_only"].append({"batch_size": batch, "precision": precision, "mode": mode,
                                                   "status": "failed", "error": repr(exc)})
            for r in rows:
                r.pop("_state", None)
            write()
    write()
    print(f"wrote {out_dir / 'fit_matrix.json'} and fit_matrix.csv in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
