#!/usr/bin/env python
"""Operations per training step (torch profiler), per configuration: the launch budget of the eager step.

On a CPU, ``ops`` counts the leaf aten operators of one steady-state step (the kernels the same step
launches on CUDA); on CUDA the script also counts device kernels, host launch calls, host-to-device
copies and host syncs. See :mod:`scalex_scale.train.profiling` for the method.

Usage::

    python bench/step_ops.py                          # CPU: fp32 and bf16, batch 64 and 4096
    python bench/step_ops.py --device cuda --configs fp32,bf16,fp32+graphs,bf16+graphs
    python bench/step_ops.py --label before --out bench/results/amd-epyc-2c/step_ops.json  # adds/replaces one label

Writes ``step_ops.json`` under ``bench/results/<machine>/`` (or ``--out``); with ``--label`` the file keeps one
entry per label (e.g. ``before`` / ``after`` a change).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, results_dir  # noqa: E402


def synthetic_batch(n_cells: int, n_features: int, n_domains: int, nnz_per_row: int, seed: int = 0,
                    pin_memory: bool = False):
    """A CSRBatch like the loader's: float16 values in (0, 1], int32 columns, int64 domains."""
    from scalex_scale.data.loader import InMemorySource, LoaderConfig, TrainingLoader

    rng = np.random.default_rng(seed)
    n_rows = max(n_cells, 256)
    nnz = np.full(n_rows, min(nnz_per_row, n_features), dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(nnz)])
    indices = np.concatenate([np.sort(rng.choice(n_features, k, replace=False)) for k in nnz]).astype(np.uint16)
    data = rng.uniform(0.01, 1.0, int(indptr[-1])).astype(np.float16)
    domain = rng.integers(0, n_domains, n_rows).astype(np.int32)
    source = InMemorySource.from_arrays(indptr, indices, data, domain, n_features, n_domains)
    loader = TrainingLoader(
        source, LoaderConfig(batch_size=n_cells, shard_size=n_rows, buffer_shards=1, seed=seed), pin_memory=pin_memory
    )
    with loader.epoch(0) as batches:
        return next(iter(batches))


def parse_config(text: str) -> dict[str, Any]:
    precision, *flags = text.split("+")
    return {"precision": precision, "cuda_graphs": "graphs" in flags, "compile": "compile" in flags}


def main(argv: list[str] | None = None) -> int:
    from scalex_scale.nn import SCALEXModule
    from scalex_scale.train import TrainConfig
    from scalex_scale.train.profiling import count_step_ops

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default="fp32,bf16")
    p.add_argument("--batch-sizes", default="64,4096")
    p.add_argument("--n-features", type=int, default=2000)
    p.add_argument("--n-domains", type=int, default=8)
    p.add_argument("--nnz-per-row", type=int, default=400)
    p.add_argument("--dsbn-backend", choices=["auto", "torch", "triton"], default="auto",
                   help="triton on a CPU needs TRITON_INTERPRET=1 (its launches are counted; the rest as on CUDA)")
    p.add_argument("--k1", type=int, default=8)
    p.add_argument("--k2", type=int, default=24)
    p.add_argument("--label", default=None, help="store under this label in --out (keeps other labels)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for bs in (int(b) for b in a.batch_sizes.split(",")):
        batch = synthetic_batch(bs, a.n_features, a.n_domains, a.nnz_per_row)
        for text in a.configs.split(","):
            cfg = TrainConfig(device=a.device, batch_size=bs, progress=False, **parse_config(text))

            def make() -> SCALEXModule:
                return SCALEXModule(a.n_features, a.n_domains, seed=0, dsbn_backend=a.dsbn_backend)

            r = count_step_ops(make, cfg, batch, k1=a.k1, k2=a.k2).to_dict()
            r["config"] = text
            rows.append(r)
            r["dsbn_backend"] = a.dsbn_backend
            print(f"batch {bs:5d} {text:14s} ops/step {r['ops']:6.1f} triton {r['triton']:.0f} syncs {r['host_syncs']:.2f}"
                  + (f" kernels {r['kernels']:.1f} launches {r['launches']:.1f} h2d {r['h2d_copies']:.1f}"
                     if r.get("kernels") is not None else ""), flush=True)
    run = {**header(), "settings": vars(a) | {"out": str(a.out)}, "results": rows}
    out = a.out or results_dir(device=a.device if a.device == "cpu" else None) / "step_ops.json"
    if a.label:
        old = json.loads(out.read_text()) if out.exists() else {}
        old[a.label] = run
        payload = old
    else:
        payload = run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
