#!/usr/bin/env python
"""Run the ORIGINAL SCALEX package (``scalex==1.0.4``) for side-by-side comparisons with scalex-scale.

Run it with the reference venv's interpreter (built by ``bench/make_reference_env.sh``)::

    PY=bench/.ref-venv/bin/python
    $PY bench/reference_runner.py fit --input A.h5ad --outdir DIR --max-iteration 300 --seed 124
    $PY bench/reference_runner.py project --input Q.h5ad --model DIR --outdir DIR2
    $PY bench/reference_runner.py bench-train --input A.h5ad --iterations 1000 [--outdir DIR3]

``fit`` calls ``scalex.SCALEX([input], ...)`` and writes, beside the reference's own outputs (``adata.h5ad``,
``checkpoint/model.pt``, ``checkpoint/config.pt``, ``log.txt``) in DIR:

* ``latent.npy``       the reference's ``obsm['latent']`` (float32) - embedded the way the reference does it:
                       network in TRAIN mode, mini-batches of 64 cells of one batch each (so mu depends on the
                       mini-batch statistics of the encoder's BatchNorm);
* ``latent_eval.npy``  mu of the same trained network in EVAL mode (BatchNorm running statistics), computed on the
                       same preprocessed matrix just before the reference's own embedding pass (RNG state saved
                       and restored, so the reference's latent is unchanged); this is what scalex-scale reports;
* ``obs.csv``          the cells kept after the reference's filtering, in the row order of both latents
                       (columns: cell, batch, celltype when present);
* ``genes.txt``        the features (HVGs) the model was trained on, in model order;
* ``run.json``         timings, iterations, epochs, early stopping, peak RSS, output sizes, versions.

``project`` calls ``scalex.SCALEX([query], projection=MODEL_DIR, ...)`` and writes the same files for the query
cells only (``latent.npy``, ``latent_eval.npy``, ``obs.csv``, ``run.json``); the reference itself writes the
reference+query concatenation to DIR2/adata.h5ad (unless ``--repeat``).

``bench-train`` calls SCALEX with ``max_iteration=N`` (no UMAP) and reports training throughput (iterations/s at
the given batch size, timing ``VAE.fit`` only) and peak RSS; the reference's outputs go to a temporary directory
that is deleted unless ``--outdir`` is given.

Defects of scalex 1.0.4 worked around here WITHOUT changing the method (see ``apply_compat_patches``):

1. ``torch.load`` of ``checkpoint/config.pt`` (a pickled pandas Index) fails on torch >= 2.6, whose default is
   ``weights_only=True``: ``torch.load`` is wrapped so that ``weights_only`` defaults to False.
2. ``scalex/function.py`` has ``from anndata import AnnData`` commented out, so projection without ``repeat``
   dies with ``NameError: name 'AnnData' is not defined``: ``AnnData`` is injected into that module's namespace.
3. ``np.Inf`` (removed in numpy 2) in ``EarlyStopping``: handled by the venv (numpy 1.26.4), nothing patched.

Everything else (instrumentation: timers, iteration counter, early-stopping log, eval-mode latent) only wraps
reference functions and calls the originals unchanged.

Run-time knobs that do not change the numbers (verified bit-identical losses and latents on CellBench):
``--num-workers 0`` (reference default 4 forks 4 DataLoader processes every epoch; 0 is much faster on 2 cores)
and ``OMP_WAIT_POLICY=PASSIVE``, which this script sets unless the environment already sets it (with the default
ACTIVE policy the 2 torch threads spin against other jobs on a shared machine, many times the CPU per iteration:
``bench/README.md``).
``--threads`` DOES change float rounding (1 vs 2 threads give slightly different losses). ``--progress FILE``
appends one JSON line per epoch (loss, early-stopping counter), useful for long runs.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # the reference plots UMAPs; never open a window
# On a shared, oversubscribed machine torch's OpenMP threads spin while waiting for each other: measured here
# (2 cores, load ~7) 436 CPU-ms per iteration with 2 threads vs 27 with OMP_WAIT_POLICY=PASSIVE, bit-identical
# losses; a short bounded spin (GOMP_SPINCOUNT=10000) is faster still (56 vs 41 it/s at load ~1). The same setting
# as scalex-scale's CLI (scalex_scale/_openmp.py; this script runs in the reference's venv, without scalex_scale), so
# both tools run alike. Not part of the method; set OMP_WAIT_POLICY in the environment to override.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Process-tree RSS sampler (the DataLoader forks num_workers worker processes every epoch)
# ---------------------------------------------------------------------------------------------------------------


def _proc_kb(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _rss_kb(pid: int) -> int:
    return _proc_kb(pid, "status", "VmRSS:")


def _pss_kb(pid: int) -> int:
    """Proportional set size: pages shared copy-on-write with forked workers are split between them."""
    return _proc_kb(pid, "smaps_rollup", "Pss:")


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # field 4 (ppid) comes after the ')' closing the command name
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) > 1 and int(rest[1]) == pid:
            out.append(int(d))
    return out


class TreeRssSampler:
    """Samples the memory of this process and its direct children (DataLoader workers) every `interval` s.

    The summed RSS of forked workers double-counts pages shared copy-on-write with the parent (an upper bound);
    the summed PSS splits them (the best estimate of the memory the whole run really holds).
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_tree_kb = 0
        self.peak_tree_pss_kb = 0
        self.peak_self_kb = 0
        self.max_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            kids = _children(me)
            s = _rss_kb(me)
            tot = s + sum(_rss_kb(k) for k in kids)
            pss = _pss_kb(me) + sum(_pss_kb(k) for k in kids)
            self.peak_tree_pss_kb = max(self.peak_tree_pss_kb, pss)
            self.peak_self_kb = max(self.peak_self_kb, s)
            self.peak_tree_kb = max(self.peak_tree_kb, tot)
            self.max_children = max(self.max_children, len(kids))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def rusage_mb() -> dict:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "ru_maxrss_self_mb": round(self_kb / 1024, 1),
        "ru_maxrss_children_mb": round(child_kb / 1024, 1),  # max over terminated children, not a sum
        "ru_maxrss_self_plus_children_mb": round((self_kb + child_kb) / 1024, 1),
    }


# ---------------------------------------------------------------------------------------------------------------
# Compatibility patches (defects of scalex 1.0.4) and instrumentation
# ---------------------------------------------------------------------------------------------------------------

STATE: dict = {}


def apply_compat_patches() -> list[str]:
    """Work around the known defects of scalex 1.0.4 without changing what it computes."""
    import importlib

    import anndata

    applied = []
    # (1) torch >= 2.6 defaults to weights_only=True; config.pt holds a pickled pandas Index.
    if not getattr(torch.load, "_ref_runner_patched", False):
        _orig_load = torch.load

        @functools.wraps(_orig_load)
        def _load(*args, **kwargs):
            kwargs.setdefault("weights_only", False)
            return _orig_load(*args, **kwargs)

        _load._ref_runner_patched = True
        torch.load = _load
        applied.append("torch.load: weights_only defaults to False (config.pt is a pickled pandas Index)")
    # (2) `from anndata import AnnData` is commented out in scalex/function.py (used by projection).
    fmod = importlib.import_module("scalex.function")
    if not hasattr(fmod, "AnnData"):
        fmod.AnnData = anndata.AnnData
        applied.append("scalex.function.AnnData = anndata.AnnData (import commented out upstream)")
    return applied


class CountingLoader:
    """Wraps the reference's train DataLoader: counts mini-batches and times each epoch."""

    def __init__(self, loader):
        self._loader = loader
        self.iterations = 0
        self.epochs: list[dict] = []

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        t0 = time.perf_counter()
        first = None
        n = 0
        for item in self._loader:
            if first is None:
                first = time.perf_counter() - t0
            n += 1
            self.iterations += 1
            yield item
        self.epochs.append({"iterations": n, "seconds": time.perf_counter() - t0, "first_batch_seconds": first})


def _eval_mode_mu(model, adata, device: str, chunk: int = 1024) -> np.ndarray:
    """mu of every row of adata.X with the encoder in eval mode (running BN statistics), in row order.

    The reference Block skips BatchNorm for a 1-row input even in eval mode, so chunks never have 1 row.
    """
    import scipy.sparse as sp

    X = adata.X
    n = X.shape[0]
    bounds = list(range(0, n, chunk)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)
    was_training = model.training
    rng_state = torch.get_rng_state()  # the encoder draws z by rsample even in eval mode
    model.eval()
    out = np.zeros((n, model.z_dim), dtype=np.float32)
    try:
        with torch.no_grad():
            for a, b in zip(bounds[:-1], bounds[1:]):
                xb = X[a:b]
                xb = xb.toarray() if sp.issparse(xb) else np.asarray(xb)
                # reference: .astype(float) in the Dataset, then .float() in the model -> float32
                x = torch.from_numpy(np.asarray(xb, dtype=np.float64)).float().to(device)
                out[a:b] = model.encoder(x)[1].cpu().numpy()
    finally:
        model.train(was_training)
        torch.set_rng_state(rng_state)
    return out


def install_instrumentation(eval_latent: bool = True) -> None:
    """Wrap reference functions to time them and record what they did; behaviour unchanged."""
    import scalex.data as sdata
    import scalex.net.utils as sutils
    import scalex.net.vae as svae

    if getattr(svae.VAE.fit, "_ref_runner_wrapped", False):
        return

    _orig_load_data = sdata.load_data

    @functools.wraps(_orig_load_data)
    def load_data(*args, **kwargs):
        t0 = time.perf_counter()
        adata, trainloader, testloader = _orig_load_data(*args, **kwargs)
        STATE["load_data_seconds"] = time.perf_counter() - t0
        STATE["processed_shape"] = list(adata.shape)
        STATE["genes"] = [str(g) for g in adata.var_names]
        STATE["iterations_per_epoch"] = len(trainloader)
        STATE["dataloader_num_workers"] = trainloader.num_workers
        return adata, trainloader, testloader

    sdata.load_data = load_data  # SCALEX does `from .data import load_data` at call time

    _orig_fit = svae.VAE.fit

    @functools.wraps(_orig_fit)
    def fit(self, dataloader, *args, **kwargs):
        counting = CountingLoader(dataloader)
        STATE["loader"] = counting
        STATE["loadavg_before_train"] = os.getloadavg()
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        c0 = time.process_time()
        t0 = time.perf_counter()
        try:
            return _orig_fit(self, counting, *args, **kwargs)
        finally:
            STATE["train_seconds"] = time.perf_counter() - t0
            ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            STATE["train_cpu_seconds_self"] = time.process_time() - c0
            STATE["train_cpu_seconds_children"] = (ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)
            STATE["loadavg_after_train"] = os.getloadavg()
            STATE["max_iteration"] = kwargs.get("max_iteration", args[1] if len(args) > 1 else 30000)

    fit._ref_runner_wrapped = True
    svae.VAE.fit = fit

    _orig_es_call = sutils.EarlyStopping.__call__

    def es_call(self, loss, model):
        r = _orig_es_call(self, loss, model)
        STATE.setdefault("epoch_losses", []).append(float(loss))
        STATE["early_stop"] = bool(self.early_stop)
        STATE["early_stop_counter"] = int(self.counter)
        prog = os.environ.get("REF_RUNNER_PROGRESS")
        if prog:  # one JSON line per epoch, so that a run cut short still tells how far it got
            loader = STATE.get("loader")
            with open(prog, "a") as fh:
                fh.write(json.dumps({"epoch": len(STATE["epoch_losses"]), "loss": float(loss),
                                     "best": float(self.loss_min), "counter": int(self.counter),
                                     "early_stop": bool(self.early_stop),
                                     "iterations": loader.iterations if loader else None,
                                     "time": round(time.time(), 2)}) + "\n")
        return r

    sutils.EarlyStopping.__call__ = es_call

    _orig_encode = svae.VAE.encodeBatch

    @functools.wraps(_orig_encode)
    def encodeBatch(self, dataloader, device="cuda", out="latent", batch_id=None, return_idx=False, eval=False):
        if out == "latent" and eval_latent:
            t0 = time.perf_counter()
            self.to(device)
            STATE["latent_eval"] = _eval_mode_mu(self, dataloader.dataset.adata, device)
            STATE["latent_eval_obs_names"] = list(map(str, dataloader.dataset.adata.obs_names))
            STATE["latent_eval_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = _orig_encode(self, dataloader, device=device, out=out, batch_id=batch_id,
                           return_idx=return_idx, eval=eval)
        if out == "latent":
            STATE["encode_seconds"] = time.perf_counter() - t0
            STATE["encode_mode"] = "eval" if eval else "train"
        return res

    svae.VAE.encodeBatch = encodeBatch


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
         "torch_num_threads": torch.get_num_threads(),
         "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    for p in ["scalex", "torch", "numpy", "scipy", "scanpy", "anndata", "pandas", "scikit-learn", "h5py"]:
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    return v


def file_sizes(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def run_record(mem: dict, patches: list[str], outdir: Path) -> dict:
    """What every run's report ends with: memory, the patches applied, versions, and the output files' sizes."""
    return {"memory": mem, "patches": patches, "versions": versions(), "output_files_bytes": file_sizes(outdir)}


def write_obs(adata, path: Path, batch_key: str) -> None:
    obs = pd.DataFrame(index=pd.Index(adata.obs_names.astype(str), name="cell"))
    obs["batch"] = adata.obs["batch"].astype(str).to_numpy()
    if batch_key != "batch" and batch_key in adata.obs:
        obs[batch_key] = adata.obs[batch_key].astype(str).to_numpy()
    for c in ("celltype", "cell_type"):
        if c in adata.obs:
            obs[c] = adata.obs[c].astype(str).to_numpy()
    obs.to_csv(path)


def training_summary(max_iteration: int) -> dict:
    loader: CountingLoader | None = STATE.get("loader")
    if loader is None:
        return {}
    it = loader.iterations
    ts = STATE.get("train_seconds", float("nan"))
    first = sum(e["first_batch_seconds"] or 0.0 for e in loader.epochs)
    ipe = STATE.get("iterations_per_epoch")
    losses = STATE.get("epoch_losses", [])
    best = int(np.argmin(losses)) + 1 if losses else None
    return {
        "max_iteration": max_iteration,
        "iterations_per_epoch": ipe,
        "epochs_planned": int(np.ceil(max_iteration / ipe)) if ipe else None,
        "epochs_run": len(loader.epochs),
        "iterations_done": it,
        "train_seconds": round(ts, 3),
        "iterations_per_second": round(it / ts, 2) if ts > 0 else None,
        # per-epoch DataLoader start-up (num_workers processes forked every epoch) excluded:
        "worker_startup_seconds_total": round(first, 3),
        "iterations_per_second_excl_worker_startup": round(it / (ts - first), 2) if ts - first > 0 else None,
        # CPU time is much less sensitive than wall time to other jobs competing for the cores
        "train_cpu_seconds_self": round(STATE.get("train_cpu_seconds_self", float("nan")), 3),
        "train_cpu_seconds_workers": round(STATE.get("train_cpu_seconds_children", float("nan")), 3),
        "cpu_ms_per_iteration": (round(1000 * (STATE["train_cpu_seconds_self"]
                                               + STATE["train_cpu_seconds_children"]) / it, 2) if it else None),
        "loadavg_1_5_15_before_train": [round(x, 2) for x in STATE.get("loadavg_before_train", ())],
        "loadavg_1_5_15_after_train": [round(x, 2) for x in STATE.get("loadavg_after_train", ())],
        "early_stop_fired": bool(STATE.get("early_stop", False)),
        "early_stop_counter_at_end": STATE.get("early_stop_counter"),
        "best_epoch": best,
        "epoch_loss_first": losses[0] if losses else None,
        "epoch_loss_best": min(losses) if losses else None,
        "epoch_loss_last": losses[-1] if losses else None,
        "epoch_losses": [round(x, 4) for x in losses],
        "epoch_seconds": [round(e["seconds"], 3) for e in loader.epochs],
        "note_model": ("in-memory model restored to the best epoch's weights (early stopping fired)"
                       if STATE.get("early_stop") else
                       "in-memory model = LAST epoch (latent comes from it); checkpoint/model.pt = BEST epoch "
                       "(projection loads that)"),
    }


def scalex_kwargs(a) -> dict:
    kw = dict(
        batch_name=a.batch_key,
        min_features=a.min_features,
        min_cells=a.min_cells,
        n_top_features=a.n_top_features,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        num_workers=a.num_workers,
        ignore_umap=not a.with_umap,
        show=False,
        verbose=False,
        eval=False,  # reference default: embed in train mode
    )
    return kw


def setup(a) -> list[str]:
    if a.threads:
        torch.set_num_threads(a.threads)
    if getattr(a, "progress", None):
        os.environ["REF_RUNNER_PROGRESS"] = str(a.progress)
    patches = apply_compat_patches()
    install_instrumentation(eval_latent=not a.no_eval_latent)
    STATE.clear()
    return patches


def run_scalex(data_list, **kw):
    from scalex import SCALEX

    with TreeRssSampler() as sampler:
        t0 = time.perf_counter()
        adata = SCALEX(data_list, **kw)
        wall = time.perf_counter() - t0
    mem = rusage_mb()
    mem["sampled_peak_self_mb"] = round(sampler.peak_self_kb / 1024, 1)
    mem["sampled_peak_tree_rss_mb"] = round(sampler.peak_tree_kb / 1024, 1)  # double-counts shared pages
    mem["sampled_peak_tree_pss_mb"] = round(sampler.peak_tree_pss_kb / 1024, 1)  # best estimate of the total
    mem["max_worker_processes_seen"] = sampler.max_children
    return adata, wall, mem


def save_latents(adata, outdir: Path, batch_key: str, info: dict) -> None:
    lat = np.asarray(adata.obsm["latent"], dtype=np.float32)
    np.save(outdir / "latent.npy", lat)
    write_obs(adata, outdir / "obs.csv", batch_key)
    info["latent_saved"] = ("latent.npy = reference's obsm['latent'] (train-mode encoder, per-batch "
                            "mini-batches of 64, float64 cast to float32)")
    if "latent_eval" in STATE:
        le = STATE["latent_eval"]
        names = STATE["latent_eval_obs_names"]
        order = pd.Index(names).get_indexer(adata.obs_names.astype(str))
        if (order < 0).any():
            info["latent_eval_error"] = "could not align eval-mode latent with the output cells"
        else:
            le = le[order]
            np.save(outdir / "latent_eval.npy", le)
            info["latent_eval_saved"] = "latent_eval.npy = mu with the encoder in eval mode, same rows as latent.npy"
            diff = np.abs(le - lat)
            info["train_vs_eval_latent_max_abs_diff"] = float(diff.max())
            info["train_vs_eval_latent_mean_abs_diff"] = float(diff.mean())
            info["train_vs_eval_latent_mean_abs_value"] = float(np.abs(lat).mean())
    info["n_cells_out"] = int(adata.n_obs)


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def cmd_fit(a) -> dict:
    outdir = Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    patches = setup(a)
    kw = scalex_kwargs(a)
    kw.update(max_iteration=a.max_iteration, outdir=str(outdir))
    adata, wall, mem = run_scalex([str(a.input)], **kw)
    info = {"command": "fit", "input": str(a.input), "outdir": str(outdir), "scalex_kwargs": kw,
            "wall_seconds": round(wall, 3), "preprocess_seconds": round(STATE.get("load_data_seconds", 0), 3),
            "processed_shape": STATE.get("processed_shape"), "encode_seconds": STATE.get("encode_seconds"),
            "encode_mode": STATE.get("encode_mode")}
    info["training"] = training_summary(a.max_iteration)
    (outdir / "genes.txt").write_text("\n".join(STATE.get("genes", [])) + "\n")
    save_latents(adata, outdir, a.batch_key, info)
    info.update(run_record(mem, patches, outdir))
    return info


def cmd_project(a) -> dict:
    outdir = Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    model = Path(a.model)
    if not (model / "checkpoint" / "config.pt").exists():
        sys.exit(f"{model}/checkpoint/config.pt not found: --model must be a `fit` output directory")
    patches = setup(a)
    kw = scalex_kwargs(a)
    for k in ("min_cells", "n_top_features", "batch_size", "lr"):  # ignored by the reference's projection
        kw.pop(k)
    kw.update(outdir=str(outdir), projection=str(model), repeat=a.repeat)
    adata, wall, mem = run_scalex([str(a.input)], **kw)
    info = {"command": "project", "input": str(a.input), "model": str(model), "outdir": str(outdir),
            "scalex_kwargs": kw, "wall_seconds": round(wall, 3),
            "preprocess_seconds": round(STATE.get("load_data_seconds", 0), 3),
            "processed_shape": STATE.get("processed_shape"), "encode_seconds": STATE.get("encode_seconds"),
            "encode_mode": STATE.get("encode_mode"), "n_cells_returned": int(adata.n_obs)}
    if "projection" in adata.obs:  # reference + query concatenation; keep the query cells
        q = adata[adata.obs["projection"].astype(str) == "query"].copy()
        info["returned"] = "reference+query concatenation (obs['projection']); files hold the query cells only"
    else:
        q = adata
        info["returned"] = "query only (repeat=True)"
    save_latents(q, outdir, a.batch_key, info)
    info.update(run_record(mem, patches, outdir))
    return info


def cmd_bench_train(a) -> dict:
    keep = a.outdir is not None
    outdir = Path(a.outdir) if keep else Path(tempfile.mkdtemp(prefix="scalex_ref_bench_"))
    outdir.mkdir(parents=True, exist_ok=True)
    patches = setup(a)
    kw = scalex_kwargs(a)
    kw.update(max_iteration=a.iterations, outdir=str(outdir), ignore_umap=True)
    try:
        adata, wall, mem = run_scalex([str(a.input)], **kw)
        info = {"command": "bench-train", "input": str(a.input), "scalex_kwargs": kw,
                "wall_seconds": round(wall, 3),
                "preprocess_seconds": round(STATE.get("load_data_seconds", 0), 3),
                "processed_shape": STATE.get("processed_shape"), "encode_seconds": STATE.get("encode_seconds")}
        info["training"] = training_summary(a.iterations)
        if not a.losses:
            info["training"].pop("epoch_losses", None)
        info.update(run_record(mem, patches, outdir))
    finally:
        if not keep:
            shutil.rmtree(outdir, ignore_errors=True)
    if keep:
        (outdir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the original scalex==1.0.4 for side-by-side checks.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, train: bool = True):
        sp.add_argument("--input", required=True, help=".h5ad with raw counts in X")
        sp.add_argument("--batch-key", default="batch", help="obs column holding the batch (reference batch_name)")
        sp.add_argument("--seed", type=int, default=124, help="reference default 124")
        sp.add_argument("--min-features", type=int, default=600)
        if train:
            sp.add_argument("--min-cells", type=int, default=3)
            sp.add_argument("--n-top-features", type=int, default=2000)
            sp.add_argument("--batch-size", type=int, default=64)
            sp.add_argument("--lr", type=float, default=2e-4)
        else:  # accepted for symmetry; the reference's projection does not use them
            sp.set_defaults(min_cells=0, n_top_features=None, batch_size=64, lr=2e-4)
        sp.add_argument("--num-workers", type=int, default=4, help="DataLoader workers (reference default 4)")
        sp.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
        sp.add_argument("--with-umap", action="store_true",
                        help="let the reference run its neighbours/UMAP/Leiden/plot step (its default; off here)")
        sp.add_argument("--no-eval-latent", action="store_true", help="skip the extra eval-mode latent")
        sp.add_argument("--progress", default=None,
                        help="append one JSON line per training epoch (loss, early-stopping counter) to this file")

    f = sub.add_parser("fit", help="integrate one .h5ad (all its batches) with the reference")
    common(f)
    f.add_argument("--outdir", required=True)
    f.add_argument("--max-iteration", type=int, default=30000)

    pr = sub.add_parser("project", help="project a query .h5ad with a model written by `fit`")
    common(pr, train=False)
    pr.add_argument("--model", required=True, help="a `fit` output directory (holds checkpoint/, adata.h5ad)")
    pr.add_argument("--outdir", required=True)
    pr.add_argument("--repeat", action="store_true",
                    help="reference repeat=True: do not concatenate with the reference's adata.h5ad")

    b = sub.add_parser("bench-train", help="training throughput and peak RSS for N iterations")
    common(b)
    b.add_argument("--iterations", type=int, default=1000)
    b.add_argument("--outdir", default=None, help="keep the reference's outputs and run.json here")
    b.add_argument("--losses", action="store_true", help="include per-epoch losses in the report")

    a = p.parse_args(argv)
    if a.cmd == "fit":
        info = cmd_fit(a)
    elif a.cmd == "project":
        info = cmd_project(a)
    else:
        info = cmd_bench_train(a)
    if a.cmd in ("fit", "project"):
        info["output_files_bytes"] = file_sizes(Path(a.outdir)) | {"run.json": None}
        (Path(a.outdir) / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    brief = {k: info[k] for k in ("command", "wall_seconds", "preprocess_seconds", "processed_shape") if k in info}
    if "training" in info:
        brief["training"] = {k: v for k, v in info["training"].items() if k not in ("epoch_losses", "epoch_seconds")}
    brief["memory"] = info.get("memory")
    for k in ("train_vs_eval_latent_max_abs_diff", "n_cells_out"):
        if k in info:
            brief[k] = info[k]
    print(json.dumps(brief, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
