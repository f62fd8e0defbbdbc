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
from _env import RESULT_TAG, cpu_seconds, peak_rss_mb  # noqa: E402


def _synthetic_config(a: dict[str, Any]):
    """The SyntheticConfig of the ``synthetic`` and ``synthetic_h5ad`` stages (same args, same data)."""
    from scalex_scale.synthetic import SyntheticConfig

    return SyntheticConfig(
        n_cells=a["n_cells"], n_genes=a.get("n_genes", 5000), n_batches=a.get("n_batches", 8),
        n_celltypes=a.get("n_celltypes", 12), mean_genes_per_cell=a.get("genes_per_cell", 500),
        seed=a.get("seed", 0), chunk_size=a.get("chunk_size", 20_000),
    )  # fmt: skip


def stage_synthetic(a: dict[str, Any]) -> dict[str, Any]:
    """Generate a synthetic atlas straight into a store, chunk by chunk (flat memory)."""
    import shutil

    from scalex_scale.store import from_chunks, ingest
    from scalex_scale.synthetic import synthetic_chunks, synthetic_var

    cfg = _synthetic_config(a)
    shutil.rmtree(a["store"], ignore_errors=True)
    src = from_chunks(lambda: synthetic_chunks(cfg), synthetic_var(cfg).index, n_obs=cfg.n_cells, name="synthetic")
    t0 = time.perf_counter()
    report = ingest(a["store"], [src], batch_key="batch", chunk_rows=cfg.chunk_size)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cells": report.n_cells_added, "cells_per_s": report.n_cells_added / wall}


def stage_synthetic_h5ad(a: dict[str, Any]) -> dict[str, Any]:
    """The same synthetic data (same config and seed as ``synthetic``) as one .h5ad, written chunk by chunk.

    The input every other tool reads (the reference, the peers, ``ingest_h5ad``): ``X`` CSR float32 raw counts
    (int32 indices, int64 indptr, uncompressed), ``obs`` and ``var`` as :func:`scalex_scale.synthetic.make_synthetic`
    gives them, empty ``uns``. Memory stays flat (one generated chunk at a time plus ``obs``), so it also runs past
    the sizes that fit in memory.
    """
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import write_elem

    from scalex_scale.synthetic import synthetic_chunks, synthetic_var

    cfg = _synthetic_config(a)
    path = Path(a["path"])
    tmp = path.with_name(path.name + ".partial")
    t0 = time.perf_counter()
    obs_parts, nnz = [], 0
    with h5py.File(tmp, "w") as f:
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (cfg.n_cells, cfg.n_genes)})
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = x.create_dataset("indptr", shape=(cfg.n_cells + 1,), dtype=np.int64)
        row = 0
        for m, obs in synthetic_chunks(cfg):
            k = m.nnz
            for ds, values in ((data, m.data), (indices, m.indices)):
                ds.resize((nnz + k,))
                ds[nnz:] = values
            indptr[row : row + m.shape[0] + 1] = m.indptr.astype(np.int64) + nnz
            nnz, row = nnz + k, row + m.shape[0]
            obs_parts.append(obs)
        write_elem(f, "obs", pd.concat(obs_parts))
        write_elem(f, "var", synthetic_var(cfg))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    tmp.replace(path)
    return {"wall_s": time.perf_counter() - t0, "cells": cfg.n_cells, "nnz": nnz, "file_bytes": path.stat().st_size}


def stage_ingest_h5ad(a: dict[str, Any]) -> dict[str, Any]:
    """``scalex-scale ingest STORE INPUT.h5ad --batch-key batch`` (the CLI, in this fresh process)."""
    import shutil

    from scalex_scale.cli import main as cli_main
    from scalex_scale.store import Atlas

    shutil.rmtree(a["store"], ignore_errors=True)
    t0 = time.perf_counter()
    rc = cli_main(["ingest", a["store"], a["input"], "--batch-key", a.get("batch_key", "batch")])
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"scalex-scale ingest exited with {rc}")
    n = Atlas.open(a["store"]).n_obs
    return {"wall_s": wall, "cells": n, "cells_per_s": n / wall, "input_bytes": Path(a["input"]).stat().st_size}


def stage_quality(a: dict[str, Any]) -> dict[str, Any]:
    """Batch mixing (the paper's score, reference-compatible) and cell-type silhouette of one tool's embedding.

    The embedding is ``obsm['latent']`` of an atlas (``store``; cells without a latent, i.e. failing QC, dropped) or
    a ``latent`` .npy with an ``obs`` .csv (cell, batch, celltype, same rows). Scored on a fixed subsample of
    ``subsample`` cells: the cells sorted by name, then the first ``subsample`` of a permutation drawn with ``seed``,
    so tools that keep the same cells are scored on the same cells.
    """
    import numpy as np
    import pandas as pd

    from scalex_scale.metrics import mixing_score_details, silhouette

    label_key, batch_key = a.get("label_key", "celltype"), a.get("batch_key", "batch")
    if "store" in a:
        import anndata as ad

        adata = ad.experimental.read_lazy(a["store"])
        x = np.asarray(adata.obsm["latent"], dtype=np.float32)
        obs = pd.DataFrame({"batch": np.asarray(adata.obs[batch_key]).astype(str),
                            label_key: np.asarray(adata.obs[label_key]).astype(str)},
                           index=np.asarray(adata.obs_names).astype(str))  # fmt: skip
        ok = np.isfinite(x).all(axis=1)
        x, obs = x[ok], obs[ok]
    else:
        x = np.load(a["latent"]).astype(np.float32, copy=False)
        obs = pd.read_csv(a["obs"], index_col=0, dtype=str)
        obs = obs.rename(columns={batch_key: "batch"}) if batch_key != "batch" else obs
    if x.shape[0] != len(obs):
        raise ValueError(f"latent has {x.shape[0]} rows but obs {len(obs)}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(a.get("seed", 0))
    order = np.argsort(obs.index.to_numpy(), kind="stable")
    m = min(int(a.get("subsample", 50_000)), x.shape[0])
    idx = np.sort(order[rng.permutation(x.shape[0])[:m]])
    xs, batches, labels = x[idx], obs["batch"].to_numpy()[idx], obs[label_key].to_numpy()[idx]
    mix = mixing_score_details(xs, batches, rng=np.random.default_rng(a.get("seed", 0)))
    sil = silhouette(xs, labels)
    return {"wall_s": time.perf_counter() - t0, "n_cells_embedded": int(x.shape[0]), "n_scored": int(m),
            "dim": int(x.shape[1]), "batch_mixing": mix.reference, "batch_mixing_normalized": mix.normalized,
            "silhouette": sil}  # fmt: skip


def stage_preprocess(a: dict[str, Any]) -> dict[str, Any]:
    from scalex_scale.store import Atlas
    from scalex_scale.workflows.preprocess import preprocess

    t0 = time.perf_counter()
    state = preprocess(a["store"], min_features=a.get("min_features"), n_top_features=a.get("n_top_features"))
    wall = time.perf_counter() - t0
    if a.get("features_out"):  # the selected features, for comparison with other tools' selections
        Path(a["features_out"]).write_text("\n".join(state.features) + "\n")
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
    result = api.fit(a["store"], a["model_dir"], cfg, overwrite=True)  # a harness: repeats reuse the directory
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
    from scalex_scale.metrics.label_transfer import TransferConfig

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
    c0 = cpu_seconds()
    out = STAGES[stage](args)
    out.setdefault("cpu_s", cpu_seconds() - c0)  # the stage's work, imports before it left out
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
