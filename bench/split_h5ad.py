#!/usr/bin/env python
"""Write the cells of some batches of an .h5ad file to a new .h5ad file.

Usage (any Python with anndata, e.g. the reference venv)::

    bench/.ref-venv/bin/python bench/split_h5ad.py INPUT.h5ad --batches a,b --out OUT.h5ad [--batch-key batch]
    bench/.ref-venv/bin/python bench/split_h5ad.py INPUT.h5ad --exclude a,b --out OUT.h5ad

Used to build a reference/query pair for projection checks (e.g. 3 CellBench batches as the atlas, 2 held out).
The matrix, obs, var and uns are copied unchanged; unused categories of the batch column are dropped. The file is
written gzip-compressed, like the inputs in /work/shared/data.
"""
from __future__ import annotations

import argparse
import sys

import anndata as ad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input")
    sel = p.add_mutually_exclusive_group(required=True)
    sel.add_argument("--batches", help="comma-separated batch names to keep")
    sel.add_argument("--exclude", help="comma-separated batch names to drop (keep all others)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-key", default="batch")
    a = p.parse_args(argv)

    adata = ad.read_h5ad(a.input)
    if a.batch_key not in adata.obs:
        p.error(f"obs has no column {a.batch_key!r}; columns: {list(adata.obs.columns)}")
    col = adata.obs[a.batch_key].astype(str)
    present = sorted(col.unique())
    names = [b.strip() for b in (a.batches or a.exclude).split(",") if b.strip()]
    unknown = [b for b in names if b not in present]
    if unknown:
        p.error(f"unknown batch name(s) {unknown}; present: {present}")
    mask = col.isin(names).to_numpy()
    if a.exclude:
        mask = ~mask
    sub = adata[mask].copy()
    if hasattr(sub.obs[a.batch_key], "cat"):
        sub.obs[a.batch_key] = sub.obs[a.batch_key].cat.remove_unused_categories()
    if sub.n_obs == 0:
        p.error("no cells selected")
    sub.write_h5ad(a.out, compression="gzip")
    counts = sub.obs[a.batch_key].astype(str).value_counts().to_dict()
    print(f"wrote {a.out}: {sub.n_obs} cells x {sub.n_vars} genes; batches {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
