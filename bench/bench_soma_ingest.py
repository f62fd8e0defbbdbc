"""Ingest from a TileDB-SOMA experiment (the CELLxGENE Census format): wall time and peak RSS vs cells.

    python bench/bench_soma_ingest.py [--sizes 100000,1000000] [--n-genes 5000] [--genes-per-cell 1000]

For every size, two fresh processes: one writes a local SOMA experiment of synthetic cells
(:mod:`scalex_scale.synthetic`, the generator of ``run_scaling.py``) chunk by chunk with tiledbsoma's low-level
API (obs ``DataFrame`` with ``obs_id`` and categorical columns, measurement ``RNA``, X layer ``raw``, a float32
``SparseNDArray``), so writing does not hold all cells either; the other times ``ingest(atlas, [experiment],
batch_key="batch")`` and records its peak RSS (``getrusage`` of that process). The experiment and the atlas are
deleted afterwards unless ``--keep``. Writes ``bench/results/<machine>/soma_ingest.json``; the claim it checks:
the ingest's peak RSS is flat in the number of cells (largest within 25% of the smallest).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import REPO, RESULT_TAG, peak_rss_mb, results_dir, write_json  # noqa: E402


def _config(a: dict[str, Any]):
    from scalex_scale.synthetic import SyntheticConfig

    return SyntheticConfig(
        n_cells=a["n_cells"], n_genes=a["n_genes"], n_batches=8, n_celltypes=12,
        mean_genes_per_cell=a["genes_per_cell"], seed=a["seed"], chunk_size=a["write_chunk"],
    )  # fmt: skip


def child_write(a: dict[str, Any]) -> dict[str, Any]:
    """Write the synthetic data as a SOMA experiment, one chunk (one TileDB fragment per array) at a time."""
    import numpy as np
    import pyarrow as pa
    import tiledbsoma as soma

    from scalex_scale.synthetic import synthetic_chunks, synthetic_var

    cfg = _config(a)
    uri = a["uri"]
    shutil.rmtree(uri, ignore_errors=True)
    t0 = time.perf_counter()
    var = synthetic_var(cfg)
    dictionary = pa.dictionary(pa.int32(), pa.large_string())
    obs_schema = pa.schema(
        [("obs_id", pa.large_string()), ("batch", dictionary), ("celltype", dictionary), ("lineage", dictionary),
         ("low_quality", pa.bool_())]
    )  # fmt: skip
    var_table = pa.table(
        {"soma_joinid": np.arange(len(var), dtype=np.int64), "var_id": var.index.astype(str).to_numpy(),
         "feature_name": var.index.astype(str).to_numpy()}
    )  # fmt: skip
    with soma.Experiment.create(uri) as exp:  # the structure only: writes made under this handle share its
        # timestamp with the arrays' creation, and tiledbsoma 2.3 then loses the enumeration (categories) values
        exp.add_new_dataframe("obs", schema=obs_schema, index_column_names=["soma_joinid"], domain=[(0, cfg.n_cells - 1)])
        rna = exp.add_new_collection("ms").add_new_collection("RNA", soma.Measurement)
        rna.add_new_dataframe("var", schema=var_table.schema, index_column_names=["soma_joinid"], domain=[(0, len(var) - 1)])
        one_column_tile = {"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": len(var)}}}}}  # CSR order is then
        # TileDB's global order, and each write can skip the sort (5x faster writes; reads are unchanged)
        rna.add_new_collection("X").add_new_sparse_ndarray(
            "raw", type=pa.float32(), shape=(cfg.n_cells, len(var)), platform_config=one_column_tile
        )
    with soma.DataFrame.open(f"{uri}/ms/RNA/var", "w") as v:
        v.write(var_table)
    nnz, start = 0, 0
    full_schema = pa.schema([("soma_joinid", pa.int64()), *obs_schema])
    unsorted = soma.TileDBWriteOptions(sort_coords=False)  # rows sorted, columns sorted within rows: global order
    with soma.DataFrame.open(f"{uri}/obs", "w") as obs, soma.SparseNDArray.open(f"{uri}/ms/RNA/X/raw", "w") as x:
        for chunk, frame in synthetic_chunks(cfg):
            n = chunk.shape[0]
            rows = np.repeat(np.arange(start, start + n, dtype=np.int64), np.diff(chunk.indptr))
            coo = {"soma_dim_0": rows, "soma_dim_1": chunk.indices.astype(np.int64), "soma_data": chunk.data.astype(np.float32)}
            x.write(pa.table(coo), platform_config=unsorted)
            table = {"soma_joinid": np.arange(start, start + n, dtype=np.int64), "obs_id": frame.index.to_numpy().astype(str)}
            for col in ("batch", "celltype", "lineage"):
                table[col] = pa.array(frame[col].array, type=dictionary)  # every chunk carries all categories
            table["low_quality"] = frame["low_quality"].to_numpy()
            obs.write(pa.table(table, schema=full_schema))
            nnz += chunk.nnz
            start += n
            del rows, chunk, frame
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cells": start, "nnz": nnz, "fragments_per_array": -(-cfg.n_cells // cfg.chunk_size)}


def child_ingest(a: dict[str, Any]) -> dict[str, Any]:
    from scalex_scale.store import ingest

    shutil.rmtree(a["store"], ignore_errors=True)
    t0 = time.perf_counter()
    report = ingest(a["store"], [a["uri"]], batch_key="batch", chunk_rows=a["chunk_rows"])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cells": report.n_cells_added, "cells_per_s": report.n_cells_added / wall, "n_genes": report.n_genes}


def _run_child(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``kind`` in a fresh Python process; its wall time, peak RSS and result (or the failure)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
    result = next((json.loads(line[len(RESULT_TAG) :]) for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)), None)
    if proc.returncode != 0 or result is None:
        return {"status": "failed", "returncode": proc.returncode, "process_wall_s": time.perf_counter() - t0}
    return {"status": "ok", "process_wall_s": time.perf_counter() - t0, **result}


def _du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, payload = sys.argv[2], json.loads(sys.argv[3])
        result = {"write": child_write, "ingest": child_ingest}[kind](payload)
        print(RESULT_TAG + json.dumps({**result, "peak_rss_mb": peak_rss_mb()}), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--n-genes", type=int, default=5000)
    p.add_argument("--genes-per-cell", type=int, default=1000)
    p.add_argument("--write-chunk", type=int, default=10_000, help="cells per tiledbsoma write (one fragment each)")
    p.add_argument("--chunk-rows", type=int, default=10_000, help="ingest's chunk_rows (its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(REPO / "bench" / "_work" / "soma"))
    p.add_argument("--keep", action="store_true", help="keep the experiments and atlases")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import importlib.metadata

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        uri, store = work / f"exp_{n}", work / f"atlas_{n}.zarr"
        data = {"n_cells": n, "n_genes": args.n_genes, "genes_per_cell": args.genes_per_cell, "seed": args.seed, "write_chunk": args.write_chunk}
        print(f"[{n:,} cells] writing the SOMA experiment", file=sys.stderr, flush=True)
        write = _run_child("write", {**data, "uri": str(uri)})
        row: dict[str, Any] = {"n_cells": n, "write": write}
        if write["status"] == "ok":
            row["experiment_mb"] = _du_mb(uri)
            print(f"[{n:,} cells] ingesting from it", file=sys.stderr, flush=True)
            row["ingest"] = _run_child("ingest", {"uri": str(uri), "store": str(store), "chunk_rows": args.chunk_rows})
            if row["ingest"]["status"] == "ok":
                row["atlas_mb"] = _du_mb(store)
            ing = row["ingest"]
            print(f"[{n:,} cells] write {write['wall_s']:.0f} s / {write['peak_rss_mb']:.0f} MB; ingest "
                  f"{ing.get('wall_s', 0):.0f} s / {ing.get('peak_rss_mb', 0):.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
        rows.append(row)
        if not args.keep:
            shutil.rmtree(uri, ignore_errors=True)
            shutil.rmtree(store, ignore_errors=True)
    summary: dict[str, Any] = {}
    ok = [r for r in rows if r.get("ingest", {}).get("status") == "ok"]
    if len(ok) >= 2:
        small, big = ok[0]["ingest"], ok[-1]["ingest"]
        summary = {
            "ingest_rss_ratio_largest_vs_smallest": big["peak_rss_mb"] / small["peak_rss_mb"],
            "ingest_time_ratio_largest_vs_smallest": big["wall_s"] / small["wall_s"],
            "cells_ratio": big["cells"] / small["cells"],
            "rss_flat_within_25pct": big["peak_rss_mb"] <= 1.25 * small["peak_rss_mb"],
        }
    path = write_json(
        results_dir(args.out) / "soma_ingest.json",
        {"benchmark": "soma_ingest", "tiledbsoma": importlib.metadata.version("tiledbsoma"), "settings": vars(args),
         "results": rows, "summary": summary},
    )  # fmt: skip
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
