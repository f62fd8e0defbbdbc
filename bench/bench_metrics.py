"""Benchmark the integration metrics and label transfer on a synthetic atlas-sized latent.

The latent is 10-d with 10 batches and 20 cell types (Gaussian clusters of uneven size and
spread, small per-batch shifts, two types present in only one or two batches so that isolated
labels exist). :func:`scalex_scale.metrics.evaluate` runs every metric on one shared kNN graph;
each step's wall time and peak RSS (sampled from ``/proc/self/statm`` every 10 ms, plus the
process' ``ru_maxrss``) are recorded. Label transfer (``transfer_labels``, and the reference's
``KNeighborsClassifier`` parity helper) is timed with batches 0-6 as reference and 7-9 as query.

Usage::

    python bench/bench_metrics.py --quick              # 100k cells
    python bench/bench_metrics.py                      # 1,000,000 cells
    python bench/bench_metrics.py --n-cells 300000 --n-jobs 2 --no-transfer

Writes ``bench/results/<machine>/metrics.json`` (or ``--out``) with machine info, package
versions and the git commit.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scalex_scale.metrics import EvaluateConfig, evaluate  # noqa: E402
from scalex_scale.metrics.knn import resolve_method  # noqa: E402
from scalex_scale.metrics.label_transfer import knn_classifier_transfer, transfer_labels  # noqa: E402

from _env import cpu_seconds  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


class RSSSampler:
    """Background thread sampling this process' resident set size; ``lap()`` returns the peak since the last lap."""

    def __init__(self, interval: float = 0.01) -> None:
        self._interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def current_bytes() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.current_bytes()
            with self._lock:
                self._peak = max(self._peak, rss)
            time.sleep(self._interval)

    def lap(self) -> float:
        """Peak RSS in MB since the previous lap, then reset to the current RSS."""
        rss = self.current_bytes()
        with self._lock:
            peak = max(self._peak, rss)
            self._peak = rss
        return peak / 2**20

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_latent(
    n_cells: int, *, n_batches: int = 10, n_types: int = 20, dim: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered latent with batch structure; returns (X float32, batch codes int32, type codes int32)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.5, (n_types, dim))
    spread = rng.uniform(0.6, 1.2, n_types)
    weights = rng.dirichlet(np.full(n_types, 2.0))
    presence = np.ones((n_batches, n_types), dtype=bool)
    presence[1:, n_types - 1] = False  # type 19 only in batch 0 -> isolated
    presence[2:, n_types - 2] = False  # type 18 only in batches 0-1
    batches = rng.integers(0, n_batches, n_cells).astype(np.int32)
    types = np.empty(n_cells, dtype=np.int32)
    for b in range(n_batches):
        rows = np.flatnonzero(batches == b)
        p = weights * presence[b]
        types[rows] = rng.choice(n_types, size=rows.size, p=p / p.sum())
    batch_shift = rng.normal(0.0, 0.3, (n_batches, dim))
    X = np.empty((n_cells, dim), dtype=np.float32)
    step = 1 << 18
    for start in range(0, n_cells, step):
        stop = min(start + step, n_cells)
        t = types[start:stop]
        noise = rng.standard_normal((stop - start, dim)) * spread[t, None]
        X[start:stop] = centers[t] + batch_shift[batches[start:stop]] + noise
    return X, batches, types


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-cells", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="100k cells")
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-transfer", action="store_true", help="skip the label-transfer timings")
    ap.add_argument("--silhouette-sample-size", type=int, default=50_000)
    ap.add_argument("--asw-max-cells-per-label", type=int, default=5_000)
    ap.add_argument("--out", type=str, default=None, help="output JSON path")
    args = ap.parse_args(argv)
    n = 100_000 if args.quick else args.n_cells

    sampler = RSSSampler()
    t0 = time.perf_counter()
    X, batches, types = synthetic_latent(n, seed=args.seed)
    steps: dict[str, dict[str, float]] = {"generate": {"seconds": time.perf_counter() - t0, "peak_rss_mb": sampler.lap()}}
    print(f"[bench_metrics] n={n:,} cells, generated in {steps['generate']['seconds']:.1f} s", flush=True)

    config = EvaluateConfig(
        silhouette_sample_size=args.silhouette_sample_size, asw_max_cells_per_label=args.asw_max_cells_per_label
    )

    cpu_mark = [cpu_seconds()]

    def on_step(name: str, seconds: float) -> None:
        now = cpu_seconds()
        steps[name] = {
            "seconds": seconds,
            "cpu_seconds": now - cpu_mark[0],
            "peak_rss_mb": sampler.lap(),
            "ru_maxrss_mb": ru_maxrss_mb(),
        }
        cpu_mark[0] = now
        print(
            f"[bench_metrics] {name:<22s} {seconds:8.1f} s wall {steps[name]['cpu_seconds']:8.1f} s CPU"
            f"  peak RSS {steps[name]['peak_rss_mb']:8.0f} MB",
            flush=True,
        )

    sampler.lap()
    cpu_mark[0] = cpu_seconds()
    t_eval = time.perf_counter()
    result = evaluate(X, batches, types, config=config, rng=args.seed, n_jobs=args.n_jobs, on_step=on_step)
    evaluate_seconds = time.perf_counter() - t_eval
    evaluate_peak = max(v["peak_rss_mb"] for k, v in steps.items() if k != "generate")
    print(f"[bench_metrics] evaluate total {evaluate_seconds:.1f} s, peak RSS {evaluate_peak:.0f} MB", flush=True)

    transfer: dict[str, Any] = {}
    if not args.no_transfer:
        ref = batches < 7
        ref_X, query_X = X[ref], X[~ref]
        ref_lab, query_lab = types[ref], types[~ref]
        sampler.lap()
        c1 = cpu_seconds()
        t1 = time.perf_counter()
        res = transfer_labels(ref_X, ref_lab, query_X, k=30, rng=args.seed, n_jobs=args.n_jobs)
        dt = time.perf_counter() - t1
        labels = res.labels
        assigned = labels != "unassigned"
        transfer["transfer_labels"] = {
            "seconds": dt,
            "cpu_seconds": cpu_seconds() - c1,
            "peak_rss_mb": sampler.lap(),
            "n_ref": int(ref.sum()),
            "n_query": int((~ref).sum()),
            "knn_engine": resolve_method(int(ref.sum()), X.shape[1], "auto"),
            "accuracy_assigned": float(np.mean(labels[assigned].astype(np.int64) == query_lab[assigned])) if assigned.any() else None,
            "unassigned_fraction": float(np.mean(~assigned)),
        }
        print(f"[bench_metrics] transfer_labels        {dt:8.1f} s", flush=True)
        c1 = cpu_seconds()
        t1 = time.perf_counter()
        pred = knn_classifier_transfer(ref_X, ref_lab, query_X)
        dt = time.perf_counter() - t1
        transfer["knn_classifier_transfer"] = {
            "seconds": dt,
            "cpu_seconds": cpu_seconds() - c1,
            "peak_rss_mb": sampler.lap(),
            "accuracy": float(np.mean(pred == query_lab)),
        }
        print(f"[bench_metrics] knn_classifier_transfer {dt:8.1f} s", flush=True)
    sampler.close()

    payload = {
        "benchmark": "metrics",
        "n_cells": n,
        "dim": int(X.shape[1]),
        "n_batches": int(np.unique(batches).size),
        "n_types": int(np.unique(types).size),
        "n_jobs": args.n_jobs,
        "numba_threads": int(__import__("numba").get_num_threads()),
        "knn_engine": resolve_method(n, X.shape[1], config.knn_method),
        "config": {k: v for k, v in vars(config).items()},
        "scores": result.scores,
        "steps": steps,
        "evaluate_seconds": evaluate_seconds,
        "evaluate_cpu_seconds": sum(v.get("cpu_seconds", 0.0) for k, v in steps.items() if k != "generate"),
        "evaluate_peak_rss_mb": evaluate_peak,
        "transfer": transfer,
        "process_ru_maxrss_mb": ru_maxrss_mb(),
        "load_average_at_end": os.getloadavg(),
    }
    from _env import results_dir, write_json  # imported last: machine_info probes torch for a GPU name

    out = Path(args.out) if args.out else results_dir() / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, payload)
    print(f"[bench_metrics] wrote {out}", flush=True)
    return payload


if __name__ == "__main__":
    main()
