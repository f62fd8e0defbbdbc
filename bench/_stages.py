"""One benchmark stage per process: ``python bench/_stages.py STAGE '{json args}'``.

Prints ``__STAGE_RESULT__ {json}`` with the stage's own wall time, peak RSS (and peak GPU memory on CUDA) and
throughput. Used by ``bench_preprocess.py`` and ``run_scaling.py`` so every stage starts from a fresh process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from scalex_scale._openmp import bound_openmp_spin

bound_openmp_spin()  # before torch is imported (both tools run with it: see bench/README.md)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import RESULT_TAG, peak_rss_mb  # noqa: E402


def _synthetic_config(a: dict[str, Any]):
    """The SyntheticConfig of the ``synthetic`` and ``synthetic_h5ad`` stages (same args, same data)."""
    from scalex_scale.datasets import SyntheticConfig

    return SyntheticConfig(
        n_cells=a["n_cells"], n_genes=a.get("n_genes", 5000), n_batches=a.get("n_batches", 8),
        n_celltypes=a.get("n_celltypes", 12), mean_genes_per_cell=a.get("genes_per_cell", 500),
        seed=a.get("seed", 0), chunk_size=a.get("chunk_size", 20_000),
    )  # fmt: skip


def stage_synthetic(a: dict[str, Any]) -> dict[str, Any]:
    """Generate a synthetic atlas straight into a store, chunk by chunk (flat memory)."""
    import shutil

    from scalex_scale.datasets import synthetic_chunks, synthetic_var
    from scalex_scale.store import from_chunks, ingest

    cfg = _synthetic_config(a)
    shutil.rmtree(a["store"], ignore_errors=True)
    src = from_chunks(lambda: synthetic_chunks(cfg), synthetic_var(cfg).index, n_obs=cfg.n_cells, name="synthetic")
    t0 = time.perf_counter()
    report = ingest(a["store"], [src], batch_key="batch", chunk_rows=cfg.chunk_size)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cells": report.n_cells_added, "cells_per_s": report.n_cells_added / wall}


def stage_synthetic_h5ad(a: dict[str, Any]) -> dict[str, Any]:
    """The same synthetic data (same config and seed as ``synthetic``) as one .h5ad, for the reference package."""
    from scalex_scale.datasets import make_synthetic

    cfg = _synthetic_config(a)
    t0 = time.perf_counter()
    adata = make_synthetic(cfg)
    adata.uns.clear()
    adata.write_h5ad(a["path"])
    return {"wall_s": time.perf_counter() - t0, "cells": adata.n_obs}


def stage_preprocess(a: dict[str, Any]) -> dict[str, Any]:
    from scalex_scale.preprocess.pipeline import preprocess
    from scalex_scale.store import Atlas

    t0 = time.perf_counter()
    state = preprocess(a["store"], min_features=a.get("min_features"), n_top_features=a.get("n_top_features"))
    wall = time.perf_counter() - t0
    n = Atlas.open(a["store"]).n_obs
    return {"wall_s": wall, "cells": n, "n_train": state.n_cells_kept, "n_features": state.n_features, "cells_per_s": n / wall}


def _train_config(a: dict[str, Any]):
    from scalex_scale.train import TrainConfig

    return TrainConfig(
        max_iterations=a.get("max_iterations", 30_000), batch_size=a.get("batch_size", 64), device=a.get("device", "auto"),
        precision=a.get("precision", "fp32"), seed=a.get("seed", 0), progress=a.get("progress", False),
        cuda_graphs=a.get("cuda_graphs", False), compile=a.get("compile", False),
    )  # fmt: skip


def stage_fit(a: dict[str, Any]) -> dict[str, Any]:
    from scalex_scale import api

    cfg = _train_config(a)
    t0 = time.perf_counter()
    result = api.fit(a["store"], a["model_dir"], cfg)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall, "iterations": result.n_iterations, "epochs": result.n_epochs,
        "stopped_early": result.stopped_early, "train_seconds": result.seconds,
        "iterations_per_s": result.n_iterations / result.seconds, "cells_per_s": result.cells_per_second,
        "final_loss": result.history[-1].loss if result.history else None,
    }  # fmt: skip


def stage_embed(a: dict[str, Any]) -> dict[str, Any]:
    from scalex_scale import api

    t0 = time.perf_counter()
    n = api.embed(a["store"], a["model_dir"], device=a.get("device", "auto"))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cells": n, "cells_per_s": n / wall}


def stage_transfer(a: dict[str, Any]) -> dict[str, Any]:
    from scalex_scale import api

    t0 = time.perf_counter()
    from scalex_scale.transfer import TransferConfig

    config = TransferConfig(k=a["k"]) if a.get("k") else None  # default: k chosen by cross-validation
    summary = api.transfer(a["store"], a.get("label_key", "celltype"), query_batches=a.get("query_batches"), config=config)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cells": summary.n_query, "cells_per_s": summary.n_query / wall, "metrics": summary.metrics}


def stage_evaluate(a: dict[str, Any]) -> dict[str, Any]:
    from scalex_scale import api

    t0 = time.perf_counter()
    result = api.evaluate(a["store"], label_key=a.get("label_key", "celltype"), umap=False, seed=a.get("seed", 0))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cells": result.n_cells, "cells_per_s": result.n_cells / wall, "metrics": result.metrics}


STAGES = {name[len("stage_") :]: fn for name, fn in globals().items() if name.startswith("stage_")}


def main() -> None:
    stage, args = sys.argv[1], json.loads(sys.argv[2])
    if args.get("torch_threads"):
        import torch

        torch.set_num_threads(int(args["torch_threads"]))
    out = STAGES[stage](args)
    out["peak_rss_mb"] = peak_rss_mb()
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    print(RESULT_TAG + json.dumps(out, default=float), flush=True)


if __name__ == "__main__":
    main()
