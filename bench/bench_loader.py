"""Benchmark the training loader: cells/s of CSRBatch production (with and without CPU densify).

Sources: (a) an :class:`~scalex_scale.data.InMemorySource`, (b) a zarr v3 store on disk holding a
synthetic training matrix in the atlas layout (group with ``data`` float16, ``indices`` uint16,
``indptr`` int64, ``batch`` int32; chunks of 2**20 elements). :func:`measure` accepts any object with
the ``TrainingSource`` protocol, so other sources (e.g. ``scalex_scale.store``'s) can be timed the same
way from Python. Also reports the batch-composition TV statistic for a store in random row order
and for one sorted by domain.

Usage::

    python bench/bench_loader.py --quick                  # 200k cells, short timings
    python bench/bench_loader.py --n-cells 1000000 --out bench/results/mybox/loader.json

Writes ``bench/results/<machine>/loader.json`` unless ``--out`` is given. Tries to drop the page cache
before each on-disk measurement (needs root and a writable ``/proc/sys/vm/drop_caches``) and records
whether that worked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from scalex_scale.data import InMemorySource, LoaderConfig, TrainingLoader, TrainingSource
from scalex_scale.data.samplers import ShardSampler, batch_composition_tv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import REPO, machine_info, peak_rss_mb, results_dir, write_json  # noqa: E402

CHUNK = 2**20


# ---------------------------------------------------------------------- synthetic data
@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the synthetic training matrix."""

    n_cells: int
    n_features: int = 2000
    nnz_per_row: float = 400.0
    n_domains: int = 8
    seed: int = 0


def synthetic_blocks(spec: SyntheticSpec, block_rows: int = 4096) -> Iterator[tuple[np.ndarray, ...]]:
    """Row blocks ``(indptr, indices uint16, data float16, domain int32)`` in random row order.

    Genes get heavy-tailed detection rates averaging ``nnz_per_row / n_features``; values are
    ``log1p(count) / log1p(20)`` of geometric counts, clipped to 1 (few distinct float16 values, like
    real scaled data, which matters for compression).
    """
    rng = np.random.default_rng(spec.seed)
    rate = rng.gamma(0.6, 1.0, spec.n_features)
    rate = np.clip(rate * spec.nnz_per_row / rate.sum(), 0, 1).astype(np.float32)
    for start in range(0, spec.n_cells, block_rows):
        rows = min(block_rows, spec.n_cells - start)
        mask = rng.random((rows, spec.n_features), dtype=np.float32) < rate
        r, c = np.nonzero(mask)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=rows))]).astype(np.int64)
        counts = rng.geometric(0.35, len(c))
        data = np.minimum(np.log1p(counts) / np.log1p(20.0), 1.0).astype(np.float16)
        domain = rng.integers(0, spec.n_domains, rows).astype(np.int32)
        yield indptr, c.astype(np.uint16), data, domain


def synthetic_arrays(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole synthetic matrix as CSR arrays."""
    ptrs, inds, vals, doms = [], [], [], []
    offset = 0
    for indptr, indices, data, domain in synthetic_blocks(spec):
        ptrs.append(indptr[1:] + offset)
        offset += int(indptr[-1])
        inds.append(indices)
        vals.append(data)
        doms.append(domain)
    indptr = np.concatenate([np.zeros(1, np.int64), *ptrs])
    return indptr, np.concatenate(inds), np.concatenate(vals), np.concatenate(doms)


def write_zarr(path: Path, arrays: tuple[np.ndarray, ...], spec: SyntheticSpec) -> None:
    """Write the arrays as a zarr v3 group (chunks of 2**20 elements, zarr's default codecs)."""
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.attrs.update({"n_features": spec.n_features, "n_domains": spec.n_domains})
    for name, arr in zip(("indptr", "indices", "data", "batch"), arrays):
        z = group.create_array(name, shape=arr.shape, chunks=(CHUNK,), dtype=arr.dtype)
        for a in range(0, len(arr), 64 * CHUNK):
            z[a : a + 64 * CHUNK] = arr[a : a + 64 * CHUNK]


class ZarrArraysSource:
    """``TrainingSource`` over a zarr group with ``data``/``indices``/``indptr``/``batch`` arrays."""

    def __init__(self, path: Path) -> None:
        group = zarr.open_group(path, mode="r")
        self._indptr = np.asarray(group["indptr"][:])
        self._indices, self._data, self._batch = group["indices"], group["data"], group["batch"]
        self.n_rows = len(self._indptr) - 1
        self.n_features = int(group.attrs["n_features"])
        self.n_domains = int(group.attrs["n_domains"])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ptr = self._indptr[start : stop + 1]
        a, b = int(ptr[0]), int(ptr[-1])
        return ptr - a, self._indices[a:b], self._data[a:b], self._batch[start:stop]


# ---------------------------------------------------------------------- measurement
def drop_page_cache() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; True if it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def measure(
    source: TrainingSource,
    *,
    batch_size: int,
    densify: bool,
    seconds: float,
    **loader_kwargs: int,
) -> dict[str, object]:
    """Stream batches, epoch after epoch, for ``seconds`` and report the delivered rate.

    ``densify`` adds ``CSRBatch.to_dense("cpu")`` per batch (what a CPU training step would start with).
    The clock starts before the first batch is requested, so the pipeline's start-up (one buffer read
    and gathered) and the restart at each epoch boundary are included.
    """
    loader = TrainingLoader(source, LoaderConfig(batch_size=batch_size, **loader_kwargs))
    cells = batches = 0
    first = 0.0
    t0 = time.perf_counter()
    epoch = 0
    while time.perf_counter() - t0 < seconds:
        with loader.epoch(epoch) as it:
            for batch in it:
                if densify:
                    batch.to_dense("cpu")
                cells += batch.n_cells
                batches += 1
                if batches == 1:
                    first = time.perf_counter() - t0
                if time.perf_counter() - t0 > seconds:
                    break
        epoch += 1
    elapsed = time.perf_counter() - t0
    return {
        "cells_per_s": cells / elapsed,
        "batches_per_s": batches / elapsed,
        "cells": cells,
        "seconds": elapsed,
        "epochs_started": epoch,
        "batches_per_epoch": loader.batches_per_epoch,
        "first_batch_s": first,
    }


def tv_report(domains: np.ndarray, batch_size: int, shard_size: int, buffer_shards: int) -> dict[str, dict]:
    """TV statistic for the store as written (random order) and for the same rows sorted by domain."""
    sampler = ShardSampler(len(domains), batch_size=batch_size, shard_size=shard_size, buffer_shards=buffer_shards)
    return {
        "prepermuted": batch_composition_tv(sampler, domains, n_batches=2000, seed=1),
        "sorted_by_domain": batch_composition_tv(sampler, np.sort(domains), n_batches=2000, seed=1),
    }


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--n-features", type=int, default=2000)
    p.add_argument("--nnz-per-row", type=float, default=400.0)
    p.add_argument("--n-domains", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 4096])
    p.add_argument("--seconds", type=float, default=15.0, help="time limit per measurement")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads for the densify")
    p.add_argument("--quick", action="store_true", help="200k cells (unless --n-cells) and 6 s per measurement")
    p.add_argument("--machine", default=None, help="results folder name (default: _env.machine_label())")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<machine>/loader.json)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / "_work", help="where the zarr store is written")
    p.add_argument("--keep-store", action="store_true", help="do not delete the zarr store afterwards")
    args = p.parse_args(argv)
    if args.quick:
        if "--n-cells" not in (argv if argv is not None else sys.argv[1:]):
            args.n_cells = 200_000
        args.seconds = min(args.seconds, 6.0)
    return args


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, object]:
    torch.set_num_threads(args.torch_threads)
    spec = SyntheticSpec(args.n_cells, args.n_features, args.nnz_per_row, args.n_domains)
    t = time.perf_counter()
    arrays = synthetic_arrays(spec)
    log(f"synthetic matrix: {spec.n_cells} x {spec.n_features}, nnz {len(arrays[1])} ({time.perf_counter() - t:.1f} s)")
    store = args.workdir / f"loader_bench_{spec.n_cells}.zarr"
    store.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    write_zarr(store, arrays, spec)
    store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    log(f"zarr store: {store} ({store_bytes / 2**20:.0f} MiB, {time.perf_counter() - t:.1f} s)")

    sources: dict[str, Callable[[], TrainingSource]] = {
        "in_memory": lambda: InMemorySource.from_arrays(*arrays, n_features=spec.n_features),
        "zarr": lambda: ZarrArraysSource(store),
    }
    loader_kwargs = {"num_workers": args.num_workers, "prefetch": args.prefetch}
    defaults = asdict(LoaderConfig())
    results = []
    for name, make in sources.items():
        for batch_size in args.batch_sizes:
            for densify in (False, True):
                dropped = drop_page_cache() if name == "zarr" else None
                source = make()
                r = measure(source, batch_size=batch_size, densify=densify, seconds=args.seconds, **loader_kwargs)
                r.update(source=name, batch_size=batch_size, densify_cpu=densify, page_cache_dropped=dropped)
                results.append(r)
                log(f"{name:9s} batch {batch_size:5d} densify={densify!s:5s} {r['cells_per_s']:>10,.0f} cells/s "
                    f"({r['epochs_started']} epochs; first batch {r['first_batch_s']:.2f} s; "
                    f"cache dropped: {dropped})")
    shard, k = defaults["shard_size"], defaults["buffer_shards"]
    tv = {str(b): tv_report(arrays[3], b, shard, k) for b in args.batch_sizes}
    for b, rep in tv.items():
        pre, srt = rep["prepermuted"], rep["sorted_by_domain"]
        log(f"TV batch {b}: pre-permuted {pre['loader_tv']:.4f} vs iid {pre['iid_tv']:.4f}; "
            f"sorted by domain {srt['loader_tv']:.4f} vs iid {srt['iid_tv']:.4f}")
    if not args.keep_store:
        shutil.rmtree(store, ignore_errors=True)
    return {
        "benchmark": "loader",
        "machine": {**machine_info(), "hostname": socket.gethostname()},  # versions, git_commit, date: _env.write_json
        "config": {
            **asdict(spec),
            "nnz": int(len(arrays[1])),
            "store_bytes": store_bytes,
            "zarr_chunk_elements": CHUNK,
            "shard_size": defaults["shard_size"],
            "buffer_shards": defaults["buffer_shards"],
            "num_workers": args.num_workers,
            "prefetch": args.prefetch,
            "torch_threads": torch.get_num_threads(),
            "seconds_per_measurement": args.seconds,
        },
        "results": results,
        "batch_composition_tv": tv,
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    out = args.out or results_dir(REPO / "bench" / "results" / args.machine if args.machine else None) / "loader.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
