"""The Python API: ingest, preprocess, fit, embed, integrate, project, transfer, evaluate.

Each function works on an atlas path; the CLI (:mod:`scalex_scale.cli`) is a thin layer over these.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .preprocess.pipeline import preprocess
from .preprocess.state import PreprocessState
from .store import Atlas, IngestReport, ingest, transaction
from .store.errors import ConflictError, PreprocessError, ScalexError

log = logging.getLogger(__name__)

from .annotate import transfer
from .evaluation import evaluate

__all__ = [
    "IntegrateResult", "ProjectReport", "embed", "evaluate", "fit", "ingest", "integrate", "preprocess", "project",
    "transfer",
]  # fmt: skip


def _n_workers() -> int:
    return os.cpu_count() or 1


def _state(atlas: Atlas) -> dict[str, Any]:
    prep = atlas.state.get("preprocess")
    if prep is None:
        raise PreprocessError(f"{atlas.path}: not preprocessed yet; run `scalex-scale preprocess {atlas.path}`")
    return prep


def _preprocess_state(record: dict[str, Any]) -> PreprocessState:
    return PreprocessState.from_dict(record)  # extra keys (n_train, permutation_seed, n_obs) are ignored


# ---------------------------------------------------------------------------------------------- fit / embed
def fit(
    store: str | Path,
    model_dir: str | Path,
    config: Any = None,
    *,
    resume: bool = False,
    distributed: bool = False,
    sync_dsbn: bool = False,
    checkpoint_iterations: int = 5000,
):
    """Train the SCALEX model on the atlas' training matrix and save it to ``model_dir``.

    Parameters
    ----------
    store
        A preprocessed atlas.
    model_dir
        Checkpoint directory (weights as safetensors, config and preprocessing state as JSON).
    config
        A :class:`~scalex_scale.train.TrainConfig` (default: the method's defaults).
    resume
        Continue from the trainer state saved in ``model_dir`` (exact to the batch).
    distributed
        Data-parallel training under ``torchrun`` (global rank and world size from the launcher). Each rank reads
        its own shards; ``config.batch_size`` is per rank.
    sync_dsbn
        With ``distributed``: normalize each domain with statistics all-reduced across ranks.
    checkpoint_iterations
        Save a resumable trainer state at the end of the epoch after every this many iterations.

    Returns
    -------
    TrainResult
    """
    from .nn import SCALEXModule
    from .train import TrainConfig, check_resumable

    config = config or TrainConfig()
    atlas = Atlas.open(store)
    _state(atlas)
    with atlas.pinned_training_matrix() as (source, snapshot):  # a re-preprocess meanwhile cannot change it
        prep = snapshot.get("preprocess")
        if prep is None:
            raise PreprocessError(f"{atlas.path}: not preprocessed yet; run `scalex-scale preprocess {atlas.path}`")
        state = _preprocess_state(prep)
        model_config = {
            "domains": list(state.batches),
            "var_names": [str(v) for v in atlas.var_names],
            "atlas": str(Path(store).resolve()),
            "train_id": prep.get("train_id"),
            "train_config": config.to_dict(),
        }
        if resume:
            fingerprint = {k: model_config[k] for k in ("var_names", "domains", "train_id")}
            check_resumable(model_dir, {**fingerprint, "batch_size": config.batch_size})
        module = SCALEXModule(state.n_features, len(state.batches), seed=config.seed)
        run = _fit_distributed if distributed else _fit_local
        result = run(store, model_dir, module, source, config, prep, model_config, resume, sync_dsbn, checkpoint_iterations)
    return result


def _loader(source: Any, config: Any, rank: int, world: int, device: Any):
    from .data.loader import TrainingLoader

    return TrainingLoader(
        source, batch_size=config.batch_size, seed=config.seed, rank=rank, world_size=world, drop_last=True,
        pin_memory=device.type == "cuda",
    )  # fmt: skip


def _every(loader: Any, iterations: int):
    """``on_epoch_end`` predicate: true about every ``iterations`` optimizer steps (same answer on all ranks)."""
    epochs = max(1, round(iterations / max(1, loader.batches_per_epoch)))
    return lambda record: (record.epoch + 1) % epochs == 0


def _record_model(store: str | Path, model_dir: str | Path, result: Any, train_id: str | None, world_size: int = 1) -> None:
    """Record the trained model in the atlas (a transaction), unless the atlas was re-preprocessed meanwhile."""
    from .train import model_id

    model = {
        "directory": str(Path(model_dir).resolve()),
        "model_id": model_id(model_dir),
        "train_id": train_id,
        "n_iterations": result.n_iterations,
        "n_epochs": result.n_epochs,
        "best_epoch": result.best_epoch,
        "best_loss": result.best_loss,
        "stopped_early": result.stopped_early,
        "seconds": result.seconds,
        "world_size": world_size,
    }
    with transaction(store, "fit") as txn:
        current = (txn.atlas.state.get("preprocess") or {}).get("train_id")
        if current != train_id:
            raise ConflictError(
                f"{store}: was preprocessed again while fit trained (training matrix {train_id} is now {current}); "
                f"the model in {model_dir} is saved but does not match the atlas any more: run fit again"
            )
        txn.atlas.update_state("model", model)


def _fit_local(store, model_dir, module, source, config, prep, model_config, resume, sync_dsbn, every):
    from .train import Trainer, load_trainer_state, save_checkpoint
    from .train.config import resolve_device

    if sync_dsbn:
        raise ScalexError("--sync-dsbn needs --distributed (it all-reduces DSBN statistics across ranks)")
    loader = _loader(source, config, 0, 1, resolve_device(config.device))
    trainer = Trainer(module, config)
    start_state = load_trainer_state(model_dir) if resume else None
    if resume and start_state is None:
        raise ScalexError(f"{model_dir}: no trainer state to resume from")

    def save(trainer_state: Any) -> None:
        save_checkpoint(model_dir, module, model_config=model_config, preprocess_state=prep, trainer_state=trainer_state)

    due = _every(loader, every)
    with loader:  # the loader's pipeline runs across epochs; stop it when fit returns
        result = trainer.fit(loader, start_state=start_state, on_epoch_end=lambda rec, tr: save(tr.state()) if due(rec) else None)
    save(trainer.state())
    _record_model(store, model_dir, result, prep.get("train_id"))
    return result


def _fit_distributed(store, model_dir, module, source, config, prep, model_config, resume, sync_dsbn, every):
    from .train import Trainer, all_reduce_epoch_loss, load_trainer_state
    from .train import distributed as D

    if config.cuda_graphs:
        raise ScalexError("--cuda-graphs is not supported with --distributed")
    ctx = D.init_distributed(config.device)
    try:
        loader = _loader(source, config, ctx.rank, ctx.world_size, ctx.device)
        start_state = load_trainer_state(model_dir) if resume else None
        if resume and start_state is None:
            raise ScalexError(f"{model_dir}: no trainer state to resume from")
        D.check_agreement(
            ctx,
            D.training_fingerprint(
                store=store, n_train=source.n_rows, preprocess_state=prep, model_config=module.hparams,
                train_config=config, batches_per_epoch=loader.batches_per_epoch, sync_dsbn=sync_dsbn,
                resume_iteration=None if start_state is None else start_state.iteration,
            ),
        )  # fmt: skip
        ddp = D.wrap_ddp(module, ctx, sync_dsbn=sync_dsbn)
        trainer = Trainer(module, D.rank_config(config, ctx), train_module=ddp, reduce_epoch_loss=all_reduce_epoch_loss())
        if start_state is not None:
            D.restore_trainer_state(trainer, start_state, ctx)

        def save() -> None:
            D.save_distributed_checkpoint(ctx, trainer, model_dir, model_config=model_config, preprocess_state=prep)

        due = _every(loader, every)
        with loader:  # the loader's pipeline runs across epochs; stop it when fit returns
            result = trainer.fit(loader, on_epoch_end=lambda rec, tr: save() if due(rec) else None)
        D.sync_buffers(module, ctx)
        save()
        if ctx.is_main:
            _record_model(store, model_dir, result, prep.get("train_id"), ctx.world_size)
        D.barrier(ctx)
        return result
    finally:
        D.shutdown()


def _load_model(model_dir: str | Path, device: str):
    from .train import load_checkpoint
    from .train.config import resolve_device

    dev = resolve_device(device)
    module, model_config, prep = load_checkpoint(model_dir, device=dev)
    if prep is None:
        raise ScalexError(f"{model_dir}: checkpoint has no preprocessing state")
    return module, model_config, prep, _preprocess_state(prep), dev


def _check_genes(atlas: Atlas, model_config: dict[str, Any], model_dir: str | Path, *, projecting: bool = False) -> None:
    names = model_config.get("var_names")
    if names is not None and list(map(str, atlas.var_names)) != names:
        hint = (
            "project into the atlas the model was trained on, or into a separate --query-store"
            if projecting
            else "use `scalex-scale project` to align new data to the model"
        )
        raise ScalexError(
            f"{atlas.path}: its {atlas.n_vars:,} genes differ from the {len(names):,} the model in {model_dir} was "
            f"trained on (the model belongs to another atlas); {hint}"
        )


def _latent_record(model_dir: str | Path, model_config: dict[str, Any], n: int) -> dict[str, Any]:
    from .train import model_id

    return {
        "directory": str(Path(model_dir).resolve()),
        "model_id": model_id(model_dir),
        "train_id": model_config.get("train_id"),
        "n_embedded": n,
    }


def embed(
    store: str | Path, model_dir: str | Path, *, device: str = "auto", key: str = "latent", lock_timeout: float | None = None
) -> int:
    """Write ``obsm[key]`` (encoder mean, float32, n_cells x 10) for every cell, in the atlas' cell order.

    Cells failing QC get NaN (see ``obs['scalex_qc_pass']``). Streams row ranges: memory does not grow with cells.
    One transaction: the atlas gets the whole new ``obsm[key]`` (and the record of the model that wrote it) or
    nothing. Returns the number of cells embedded.
    """
    from .embedding import embed_rows, maxabs_rows

    module, model_config, prep, state, dev = _load_model(model_dir, device)
    with transaction(store, "embed", lock_timeout=lock_timeout) as txn:
        if txn.is_new:
            raise ScalexError(f"{store}: no such atlas")
        atlas = txn.atlas
        _check_genes(atlas, model_config, model_dir)
        maxabs = maxabs_rows(atlas, state, atlas.state.get("projection", {}).get("maxabs"))
        writer = atlas.obsm_writer(key, module.n_latent)
        n = embed_rows(atlas, module, state, maxabs, writer, device=dev, n_workers=_n_workers())
        obsm = dict(atlas.state.get("obsm") or {})
        obsm[key] = _latent_record(model_dir, model_config, n)
        atlas.update_state("obsm", obsm)
    return n


# ---------------------------------------------------------------------------------------------- integrate
@dataclass(frozen=True)
class IntegrateResult:
    atlas: Path
    model_dir: Path
    ingest: IngestReport
    state: PreprocessState
    train: Any


def integrate(
    inputs: Sequence[Any],
    outdir: str | Path,
    *,
    batch_key: str | None = None,
    batch_names: Sequence[str] | None = None,
    join: str = "inner",
    train: Any = None,
    **preprocess_kwargs: Any,
) -> IntegrateResult:
    """Ingest, preprocess, fit and embed in one go; writes ``OUTDIR/atlas.zarr`` and ``OUTDIR/model``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    atlas_path, model_dir = outdir / "atlas.zarr", outdir / "model"
    if atlas_path.exists():
        raise ScalexError(f"{atlas_path} exists already; choose another --outdir or remove it")
    profile = preprocess_kwargs.get("profile") or "RNA"
    report = ingest(atlas_path, inputs, batch_key=batch_key, batch_names=batch_names, join=join, profile=profile)
    state = preprocess(atlas_path, **preprocess_kwargs)
    result = fit(atlas_path, model_dir, train)
    embed(atlas_path, model_dir, device=train.device if train is not None else "auto")
    return IntegrateResult(atlas_path, model_dir, report, state, result)


# ---------------------------------------------------------------------------------------------- project
@dataclass(frozen=True)
class ProjectReport:
    store: str
    batches: dict[str, int]
    n_embedded: int
    genes_missing: dict[str, int] = field(default_factory=dict)
    genes_dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"projected {sum(self.batches.values()):,} cells into {self.store} ({self.n_embedded:,} pass QC)"]
        lines += [f"  batch {b}: {n:,} cells" for b, n in self.batches.items()]
        for name, n in self.genes_missing.items():
            lines.append(f"  {name}: {n:,} model genes missing (filled with 0), {self.genes_dropped[name]:,} extra dropped")
        return "\n".join(lines)


def project(
    store: str | Path,
    model_dir: str | Path,
    inputs: Sequence[Any],
    *,
    batch_key: str | None = None,
    batch_names: Sequence[str] | None = None,
    query_store: str | Path | None = None,
    device: str = "auto",
    allow_duplicates: bool = False,
    lock_timeout: float | None = None,
) -> ProjectReport:
    """Embed new data with the frozen encoder and append it to the atlas as new batches.

    New data are aligned to the model's genes (missing ones zero-filled and reported, extra ones dropped),
    filtered and normalized with the stored state, scaled with their own per-batch MaxAbs, and embedded; no
    retraining, no new feature selection. With ``query_store`` they go to a separate atlas instead.

    One transaction (align + append + embed): a failed or interrupted ``project`` leaves nothing behind, so
    re-running it is safe; cells already projected (same names in the same batch, or the same source) are refused
    unless ``allow_duplicates``.
    """
    from .embedding import compute_maxabs, embed_rows, maxabs_rows
    from .store import AppendOptions, append
    from .store.readers import open_input

    module, model_config, prep, state, dev = _load_model(model_dir, device)
    target = Path(query_store) if query_store is not None else Path(store)
    sources = [open_input(obj, i) for i, obj in enumerate(inputs)]
    try:
        with transaction(target, "project", lock_timeout=lock_timeout) as txn:
            if txn.is_new:
                if query_store is None:
                    raise ScalexError(f"{store}: no such atlas")
                var_names = model_config.get("var_names")
                if var_names is None:
                    raise ScalexError(f"{model_dir}: checkpoint lacks the atlas gene list needed for a query store")
                atlas = txn.create(var_names)
                atlas.update_state("reference", {"atlas": str(Path(store).resolve()), "model": str(Path(model_dir).resolve())})
            else:
                atlas = txn.atlas
            _check_genes(atlas, model_config, model_dir, projecting=True)
            existing = set(atlas.batch_categories)
            options = AppendOptions(batch_key, batch_names, allow_duplicates=allow_duplicates, record="projection")
            report = append(atlas, sources, options)
            n0, n1 = report.n_rows_before, atlas.n_obs
            clash = existing & set(report.batches_added)
            if clash:
                log.warning("batches %s already existed in %s; their new cells are scaled with their own MaxAbs", sorted(clash), target)
            new_batches = list(report.batches_added)
            extra = compute_maxabs(atlas, state, (n0, n1), new_batches, _n_workers())
            projection = atlas.state.get("projection") or {}
            projection.setdefault("maxabs", {}).update(extra)
            atlas.update_state("projection", projection)
            if state.scale != "global":
                maxabs = maxabs_rows(atlas, state, projection["maxabs"])
            else:
                maxabs = np.asarray([extra["__all__"]], dtype=np.float32)
            if "latent" not in atlas.obsm_keys():
                writer = atlas.obsm_writer("latent", module.n_latent)
                writer[:] = np.full(writer.shape, np.nan, dtype=np.float32)
            latent = atlas.root["obsm"]["latent"]
            n = embed_rows(atlas, module, state, maxabs, latent, rows=(n0, n1), device=dev, n_workers=_n_workers())
            qc = np.isfinite(latent[n0:n1, 0])
            prev = atlas.obs["scalex_qc_pass"].to_numpy(dtype=bool, na_value=False)[:n0] if "scalex_qc_pass" in atlas.obs else np.zeros(n0, bool)
            atlas.write_obs_columns({"scalex_qc_pass": np.concatenate([prev, qc])})
            obsm = dict(atlas.state.get("obsm") or {})
            record = obsm.get("latent") or _latent_record(model_dir, model_config, 0)
            mine = _latent_record(model_dir, model_config, 0)["model_id"]
            if record.get("model_id") and mine and record["model_id"] != mine:
                raise ScalexError(
                    f"{target}: obsm['latent'] was written by another model ({record.get('directory')}); embed the "
                    f"atlas with this one first (`scalex-scale embed {target} {model_dir}`) or project with that model"
                )
            record["n_embedded"] = int(record.get("n_embedded", 0)) + n
            obsm["latent"] = record
            atlas.update_state("obsm", obsm)
    finally:
        for src in sources:
            src.close()
    return ProjectReport(str(target), report.batches_added, n, report.genes_missing, report.genes_dropped)
