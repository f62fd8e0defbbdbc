"""Out-of-core preprocessing: wall time and peak RSS at growing atlas sizes (each stage in a fresh process).

    python bench/bench_preprocess.py --sizes 100000,1000000 [--n-genes 5000] [--genes-per-cell 500]

Writes ``bench/results/<machine>/preprocess.json``. The claim it checks: peak RSS of preprocessing stays under
2 GB at 1M cells and differs by less than 25% between 100k and 1M cells.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import REPO, results_dir, run_stage, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--n-genes", type=int, default=5000)
    p.add_argument("--genes-per-cell", type=int, default=500)
    p.add_argument("--min-features", type=int, default=200, help="cell filter (default 200: most cells are kept)")
    p.add_argument("--workdir", default=str(REPO / "bench" / "_work"))
    p.add_argument("--keep", action="store_true", help="keep the generated atlases")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        store = str(Path(args.workdir) / f"preprocess_{n}.zarr")
        print(f"[{n:,} cells] generating + ingesting", file=sys.stderr, flush=True)
        gen = run_stage("synthetic", {"store": store, "n_cells": n, "n_genes": args.n_genes, "genes_per_cell": args.genes_per_cell})
        print(f"[{n:,} cells] preprocessing", file=sys.stderr, flush=True)
        prep = run_stage("preprocess", {"store": store, "min_features": args.min_features})
        print(f"[{n:,} cells] ingest {gen.get('wall_s', 0):.0f} s / {gen.get('peak_rss_mb', 0):.0f} MB; "
              f"preprocess {prep.get('wall_s', 0):.0f} s / {prep.get('peak_rss_mb', 0):.0f} MB", file=sys.stderr, flush=True)
        rows.append({"n_cells": n, "ingest": gen, "preprocess": prep})
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    summary = {}
    if len(rows) >= 2 and all(r["preprocess"].get("status") == "ok" for r in rows):
        small, big = rows[0]["preprocess"]["peak_rss_mb"], rows[-1]["preprocess"]["peak_rss_mb"]
        summary = {"rss_ratio_largest_vs_smallest": big / small, "largest_peak_rss_mb": big}
    path = write_json(
        results_dir(args.out) / "preprocess.json",
        {"benchmark": "preprocess", "settings": vars(args), "results": rows, "summary": summary},
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
