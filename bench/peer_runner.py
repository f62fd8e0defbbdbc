#!/usr/bin/env python
"""Run a PEER integration tool (scVI or Harmony) on an .h5ad, stage by stage, for ``bench/run_scaling.py``.

Run it with the peer venv's interpreter (built by ``bench/make_peer_env.sh``)::

    PY=bench/.peer-venv/bin/python
    $PY bench/peer_runner.py scvi    --input data.h5ad --outdir DIR [--max-epochs N] [--accelerator cpu]
    $PY bench/peer_runner.py harmony --input data.h5ad --outdir DIR [--n-pcs 50] [--scale]

Both start from the raw counts in the .h5ad that the reference package reads, and preprocess them the way
scalex-scale (and the SCALEX method) does, with scanpy: drop ERCC/MT- genes, keep cells with >= 600 genes and
genes in >= 3 cells, normalize_total 1e4 + log1p, then the 2,000 highly variable genes of scanpy's ``seurat``
flavor with the batch as ``batch_key`` (the selection scalex-scale reproduces; the harness compares the two lists).
The counts are read in row chunks straight into one matrix and normalized in place, so the whole matrix is never
held twice (the leanest a scanpy user gets; results equal the plain ``filter_cells`` / ``filter_genes`` /
``normalize_total`` / ``log1p`` / ``highly_variable_genes`` pipeline exactly).

* ``scvi``: scvi-tools' SCVI with its defaults and ``n_latent=10`` on the raw COUNTS of those genes (read again from
  the file for the kept cells; ``setup_anndata(batch_key=...)``, ``train()`` with its default epochs heuristic,
  ``get_latent_representation``).
* ``harmony``: harmonypy on a 50-PC PCA (scanpy ``tl.pca``, its defaults) of the log-normalized values of those
  genes, not scaled (``--scale`` adds scanpy's ``pp.scale(max_value=10)`` first: it densifies the matrix).

Stages, each timed with wall and CPU seconds and the peak RSS of this process tree sampled during it (every 0.2 s):
``load`` (read the .h5ad, keeping the cells that pass the cell filter), ``preprocess`` (gene filters,
normalization, HVG selection; scVI: the HVG counts), ``pca`` (Harmony), ``train`` (scVI: setup + training) or
``harmony``, ``embed`` (scVI's latent; Harmony's corrected PCs; written to disk). Writes in DIR: ``latent.npy``
(float32, one row per kept cell), ``obs.csv`` (cell, batch, celltype in the same order), ``hvg.txt`` (the selected
genes), ``stages.jsonl`` (a line when each stage starts and ends, written as it goes: what is left of a run killed
over its budget) and ``run.json`` (the report, also printed at the end).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")
# the same bounded OpenMP spin as both other tools (bench/README.md), unless the environment sets a policy
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


# ---------------------------------------------------------------------------------------------------------------
# Memory: RSS of this process and its descendants, sampled per stage
# ---------------------------------------------------------------------------------------------------------------


def _tree_rss_kb(root: int) -> int:
    parent, rss = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            parent[int(d)], rss[int(d)] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE") // 1024
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(frontier)
    return sum(rss.get(p, 0) for p in tree)


class StageTimer:
    """Times named stages; a background thread keeps the peak tree RSS seen during the current stage."""

    def __init__(self, progress: Path, interval: float = 0.2) -> None:
        self.stages: list[dict[str, Any]] = []
        self._progress = progress  # one JSON line per stage start and end: what a killed run leaves behind
        progress.write_text("")
        self._peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self._peak_kb = max(self._peak_kb, _tree_rss_kb(me))
            self._stop.wait(interval)

    @contextmanager
    def stage(self, name: str, **info: Any) -> Iterator[dict[str, Any]]:
        self._peak_kb = _tree_rss_kb(os.getpid())
        rec: dict[str, Any] = {"stage": name, **info}
        t0, c0 = time.perf_counter(), time.process_time()
        print(f"[peer_runner] {name} ...", file=sys.stderr, flush=True)
        self._log({"event": "start", "stage": name})
        yield rec
        rec["wall_s"] = round(time.perf_counter() - t0, 3)
        rec["cpu_s"] = round(time.process_time() - c0, 3)
        rec["peak_rss_mb"] = round(max(self._peak_kb, _tree_rss_kb(os.getpid())) / 1024, 1)
        rec["ru_maxrss_so_far_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.stages.append(rec)
        self._log({"event": "end", **rec})
        print(f"[peer_runner] {name}: {rec['wall_s']:.1f} s, {rec['peak_rss_mb']:,.0f} MB", file=sys.stderr, flush=True)

    def _log(self, record: dict[str, Any]) -> None:
        with self._progress.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------------------
# Shared preprocessing (the SCALEX RNA recipe, in scanpy)
# ---------------------------------------------------------------------------------------------------------------


DROP_PREFIXES = ("ERCC", "MT-", "mt-")  # genes dropped first, as scalex-scale and the reference do
CHUNK_ROWS = 50_000


def _h5ad_csr(f, path: str):
    x = f["X"]
    if not hasattr(x, "keys") or x.attrs.get("encoding-type") != "csr_matrix":
        raise SystemExit(f"{path}: X must be a CSR matrix (encoding-type csr_matrix), got {dict(x.attrs)}")
    return x["data"], x["indices"], x["indptr"][:], tuple(int(v) for v in x.attrs["shape"])


def read_counts(path: str, a: argparse.Namespace, rows=None, columns=None):
    """Raw counts from the .h5ad in row chunks, straight into one CSR, so the whole file is never held twice.

    Without ``rows``: the genes not named ERCC*/MT-*/mt-* and the cells with at least ``a.min_features`` of them
    detected (scanpy ``filter_cells(min_genes=)`` after that name filter). With ``rows`` (bool mask over the file's
    cells) and ``columns`` (gene indices into the file's var): exactly those. Returns (matrix, row mask, columns).
    """
    import anndata as ad
    import h5py
    import numpy as np
    import scipy.sparse as sp

    with h5py.File(path, "r") as f:
        data, indices, indptr, (n_obs, n_vars) = _h5ad_csr(f, path)
        names = ad.io.read_elem(f["var"]).index.astype(str)
        counted = ~np.asarray(names.str.startswith(DROP_PREFIXES))
        cols = np.flatnonzero(counted) if columns is None else np.asarray(columns)
        subset = cols.size != n_vars or not np.array_equal(cols, np.arange(n_vars))
        # upper bound of the kept entries; pages never written are never resident
        out_data, out_idx = np.empty(int(indptr[-1]), np.float32), np.empty(int(indptr[-1]), np.int32)
        out_ptr, mask, nnz = [np.zeros(1, np.int64)], np.zeros(n_obs, bool), 0
        for start in range(0, n_obs, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, n_obs)
            lo, hi = int(indptr[start]), int(indptr[stop])
            c = sp.csr_matrix((data[lo:hi], indices[lo:hi], indptr[start : stop + 1] - lo), shape=(stop - start, n_vars))
            if rows is None:
                det = c.copy()
                det.data = ((det.data > 0) & counted[det.indices]).astype(np.int32)
                keep = np.asarray(det.sum(axis=1)).ravel() >= a.min_features
            else:
                keep = np.asarray(rows[start:stop])
            mask[start:stop] = keep
            c = c[keep]
            if subset:
                c = c[:, cols]
            c.sort_indices()
            k = c.nnz
            out_data[nnz : nnz + k], out_idx[nnz : nnz + k] = c.data, c.indices
            out_ptr.append(c.indptr[1:].astype(np.int64) + nnz)
            nnz += k
    x = sp.csr_matrix((out_data[:nnz], out_idx[:nnz], np.concatenate(out_ptr)), shape=(int(mask.sum()), cols.size))
    return x, mask, cols


def load(path: str, a: argparse.Namespace):
    """The cells passing the cell filter, in memory (obs, var from the file), and the row mask over the file."""
    import anndata as ad

    backed = ad.read_h5ad(path, backed="r")
    obs, var = backed.obs.copy(), backed.var.copy()
    backed.file.close()
    x, mask, cols = read_counts(path, a)
    return ad.AnnData(x, obs=obs[mask], var=var.iloc[cols]), mask


def normalize_log1p_inplace(x, target_sum: float) -> None:
    """``sc.pp.normalize_total(target_sum=)`` then ``sc.pp.log1p`` on a CSR matrix, in place and in row chunks.

    scanpy's own in-place path allocates two arrays the size of ``x.data`` (the repeated scale factors and the
    quotient); this one allocates a chunk's worth. Same arithmetic, so the same float32 values: the per-cell totals
    from scanpy's own kernel (float64 accumulation), divided by ``target_sum``, each value divided by its cell's
    factor, then ``log1p``.
    """
    import numpy as np

    try:
        from scanpy.preprocessing._normalization import _normalize_csr

        totals, _ = _normalize_csr(x.indptr, x.indices, x.data, rows=x.shape[0], columns=x.shape[1],
                                   exclude_highly_expressed=False, max_fraction=0.05, n_threads=1)
    except ImportError:  # another scanpy: the same sums, in numpy
        totals = np.add.reduceat(x.data.astype(np.float64), x.indptr[:-1]).astype(x.data.dtype)
    factors = totals / target_sum
    factors = factors + (factors == 0)  # scanpy: cells without counts stay as they are
    for start in range(0, x.shape[0], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, x.shape[0])
        lo, hi = x.indptr[start], x.indptr[stop]
        block = x.data[lo:hi]
        np.true_divide(block, np.repeat(factors[start:stop], np.diff(x.indptr[start : stop + 1])), out=block)
        np.log1p(block, out=block)


def select_hvgs(adata, a: argparse.Namespace):
    """Drop the genes in < ``min_cells`` cells, log-normalize ``adata`` IN PLACE (normalize_total
    1e4 + log1p, scanpy) and select the HVGs (scanpy ``seurat`` flavor, ``batch_key``).

    Returns (``adata`` restricted to the kept genes, now holding log-normalized values; the log-normalized values of
    the HVGs (a copy); the HVG names).
    """
    import numpy as np
    import scanpy as sc

    x = adata.X  # the name filter was applied when reading
    detected = x.indices if (x.data > 0).all() else x.indices[x.data > 0]
    keep = np.bincount(detected, minlength=adata.n_vars) >= a.min_cells  # scanpy filter_genes(min_cells=)
    del detected, x
    if not keep.all():
        adata = adata[:, keep].copy()
    normalize_log1p_inplace(adata.X, 1e4)
    adata.uns["log1p"] = {"base": None}  # what sc.pp.log1p records (highly_variable_genes reads it)
    sc.pp.highly_variable_genes(adata, n_top_genes=a.n_top_features, flavor="seurat", batch_key=a.batch_key)
    hvg = np.flatnonzero(adata.var["highly_variable"].to_numpy())
    return adata, adata.X[:, hvg].copy(), adata.var_names[hvg].astype(str).tolist()


def write_outputs(outdir: Path, latent, adata, a: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    np.save(outdir / "latent.npy", np.ascontiguousarray(latent, dtype=np.float32))
    obs = pd.DataFrame(index=pd.Index(adata.obs_names.astype(str), name="cell"))
    obs["batch"] = adata.obs[a.batch_key].astype(str).to_numpy()
    if a.label_key and a.label_key in adata.obs:
        obs[a.label_key] = adata.obs[a.label_key].astype(str).to_numpy()
    obs.to_csv(outdir / "obs.csv")


# ---------------------------------------------------------------------------------------------------------------
# The tools
# ---------------------------------------------------------------------------------------------------------------


def run_scvi(a: argparse.Namespace, timer: StageTimer, info: dict[str, Any], outdir: Path) -> None:
    import anndata as ad
    import scvi
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    scvi.settings.seed = a.seed
    with timer.stage("load") as rec:
        adata, rows = load(a.input, a)
        rec.update(n_obs=int(adata.n_obs), n_vars=int(adata.n_vars), nnz=int(adata.X.nnz))
    with timer.stage("preprocess") as rec:
        adata, lognorm_hvg, hvg = select_hvgs(adata, a)
        obs = adata.obs
        del adata, lognorm_hvg  # scVI models the counts: those of the HVGs, read again from the file
        gc.collect()
        backed = ad.read_h5ad(a.input, backed="r")
        cols = backed.var_names.get_indexer(hvg)
        backed.file.close()
        counts, _, _ = read_counts(a.input, a, rows=rows, columns=cols)
        adata = ad.AnnData(counts, obs=obs)
        adata.var_names = hvg
        rec.update(n_obs=int(adata.n_obs), n_features=len(hvg))
    (outdir / "hvg.txt").write_text("\n".join(hvg) + "\n")
    with timer.stage("train") as rec:
        scvi.model.SCVI.setup_anndata(adata, batch_key=a.batch_key)
        model = scvi.model.SCVI(adata, n_latent=a.n_latent)
        kw: dict[str, Any] = {"accelerator": a.accelerator, "enable_progress_bar": False}
        if a.max_epochs:
            kw["max_epochs"] = a.max_epochs
        model.train(**kw)
        hist = model.history.get("elbo_train")
        rec.update(epochs=int(len(hist)) if hist is not None else None,
                   max_epochs_arg=a.max_epochs, batch_size=128, default_epochs=default_epochs(adata.n_obs),
                   elbo_train_last=float(hist.iloc[-1, 0]) if hist is not None and len(hist) else None,
                   torch_threads=torch.get_num_threads())  # fmt: skip
    with timer.stage("embed") as rec:
        latent = model.get_latent_representation()
        write_outputs(outdir, latent, adata, a)
        rec.update(n_cells=int(latent.shape[0]), dim=int(latent.shape[1]))
    info["model"] = {"class": "scvi.model.SCVI", "n_latent": a.n_latent, "module": str(model.module.__class__.__name__),
                     "n_params": int(sum(p.numel() for p in model.module.parameters())), "train_kwargs": kw}


def default_epochs(n_obs: int) -> int:
    """The epochs scVI's ``train()`` runs when not told (its heuristic: 400 up to 20,000 cells, then 400 * 20,000 / n,
    at least 1), so that a run capped with ``--max-epochs`` can say what its default schedule would have cost."""
    try:
        from scvi.model._utils import get_max_epochs_heuristic  # private, but it is the rule train() applies
    except ImportError:
        return max(1, min(400, round(20_000 / n_obs * 400)))
    return int(get_max_epochs_heuristic(n_obs))


def run_harmony(a: argparse.Namespace, timer: StageTimer, info: dict[str, Any], outdir: Path) -> None:
    import harmonypy
    import numpy as np
    import scanpy as sc

    with timer.stage("load") as rec:
        adata, _ = load(a.input, a)
        rec.update(n_obs=int(adata.n_obs), n_vars=int(adata.n_vars), nnz=int(adata.X.nnz))
    with timer.stage("preprocess") as rec:
        adata, lognorm_hvg, hvg = select_hvgs(adata, a)
        obs = adata.obs[[a.batch_key] + ([a.label_key] if a.label_key in adata.obs else [])].copy()
        del adata
        gc.collect()
        pc_in = sc.AnnData(lognorm_hvg, obs=obs)
        pc_in.var_names = hvg
        rec.update(n_obs=int(pc_in.n_obs), n_features=len(hvg))
    (outdir / "hvg.txt").write_text("\n".join(hvg) + "\n")
    with timer.stage("pca", scaled=bool(a.scale)) as rec:
        if a.scale:
            sc.pp.scale(pc_in, max_value=10)
        sc.tl.pca(pc_in, n_comps=a.n_pcs, random_state=a.seed)
        pcs = np.asarray(pc_in.obsm["X_pca"], dtype=np.float64)
        pc_in.X = None  # free the matrix before Harmony
        rec.update(n_pcs=int(pcs.shape[1]))
    with timer.stage("harmony") as rec:
        ho = harmonypy.run_harmony(pcs, pc_in.obs, a.batch_key, random_state=a.seed, verbose=False,
                                   **({"max_iter_harmony": a.max_iter_harmony} if a.max_iter_harmony else {}))
        z = np.asarray(ho.Z_corr)
        if z.shape[0] != pcs.shape[0]:  # harmonypy < 2 returns PCs x cells
            z = z.T
        rounds = getattr(ho, "kmeans_rounds", None)
        rec.update(iterations=len(rounds) if rounds is not None else None, n_clusters=int(ho.K))
    with timer.stage("embed") as rec:
        write_outputs(outdir, z, pc_in, a)
        rec.update(n_cells=int(z.shape[0]), dim=int(z.shape[1]))
    info["model"] = {"function": "harmonypy.run_harmony", "n_pcs": a.n_pcs, "scaled_before_pca": bool(a.scale),
                     "max_iter_harmony": a.max_iter_harmony or "default (10)"}


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    v: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                         "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}}
    for p in ("scvi-tools", "harmonypy", "scanpy", "anndata", "torch", "lightning", "numpy", "scipy", "scikit-learn"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tool", choices=["scvi", "harmony"])
    p.add_argument("--input", required=True, help=".h5ad with raw counts in X")
    p.add_argument("--outdir", required=True)
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--label-key", default="celltype", help="obs column copied to obs.csv (for the harness' scores)")
    p.add_argument("--min-features", type=int, default=600)
    p.add_argument("--min-cells", type=int, default=3)
    p.add_argument("--n-top-features", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for scVI (0: torch's default)")
    p.add_argument("--n-latent", type=int, default=10, help="scVI latent dimensions")
    p.add_argument("--max-epochs", type=int, default=0, help="scVI epochs (0: scvi-tools' default heuristic)")
    p.add_argument("--accelerator", default="auto", help="scVI/lightning accelerator: auto, cpu, gpu")
    p.add_argument("--n-pcs", type=int, default=50, help="PCs given to Harmony")
    p.add_argument("--scale", action="store_true", help="scanpy pp.scale(max_value=10) before the PCA (Harmony)")
    p.add_argument("--max-iter-harmony", type=int, default=0, help="Harmony iterations (0: harmonypy's default, 10)")
    a = p.parse_args(argv)
    outdir = Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"tool": a.tool, "input": a.input, "settings": vars(a), "versions": versions(),
                            "loadavg_before": list(os.getloadavg())}
    timer = StageTimer(outdir / "stages.jsonl")
    t0 = time.perf_counter()
    try:
        (run_scvi if a.tool == "scvi" else run_harmony)(a, timer, info, outdir)
    finally:
        timer.close()
    info["wall_seconds"] = round(time.perf_counter() - t0, 3)
    info["stages"] = timer.stages
    info["peak_rss_mb"] = max(s["peak_rss_mb"] for s in timer.stages)
    info["ru_maxrss_self_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    info["ru_maxrss_children_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    info["loadavg_after"] = list(os.getloadavg())
    (outdir / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(json.dumps(info, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
