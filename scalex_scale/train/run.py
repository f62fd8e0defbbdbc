"""One training run: loader, trainer and checkpoint cadence, on one process or data-parallel under ``torchrun``.

``train/`` owns the whole story of a run and never opens an atlas: it receives the training matrix (any
:class:`~scalex_scale.data.loader.TrainingLoader` source), the module, the configs and a callback that the main
rank calls once the model is saved (the atlas step :func:`scalex_scale.workflows.fit.fit` records the model there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalex_scale.errors import ScalexError
from scalex_scale.train.config import TrainConfig, resolve_device
from scalex_scale.train.trainer import TrainResult

__all__ = ["RunOptions", "run_training"]


@dataclass(frozen=True)
class RunOptions:
    """How a run is executed (not what it learns: that is :class:`~scalex_scale.train.TrainConfig`).

    Attributes
    ----------
    resume
        Continue from the trainer state saved in the model directory (exact to the batch).
    distributed
        Data-parallel under ``torchrun`` (rank and world size from the launcher); each rank reads its own shards.
    sync_dsbn
        With ``distributed``: normalize each domain with statistics all-reduced across ranks.
    checkpoint_iterations
        Save a resumable trainer state at the end of the epoch after about every this many iterations.
    """

    resume: bool = False
    distributed: bool = False
    sync_dsbn: bool = False
    checkpoint_iterations: int = 5000

    def __post_init__(self) -> None:
        if self.sync_dsbn and not self.distributed:
            raise ScalexError("--sync-dsbn needs --distributed (it all-reduces DSBN statistics across ranks)")
        if self.checkpoint_iterations <= 0:
            raise ScalexError(f"--checkpoint-every must be positive, got {self.checkpoint_iterations}")


def run_training(
    source: Any,
    model_dir: str | Path,
    module: Any,
    config: TrainConfig,
    options: RunOptions,
    *,
    model_config: Mapping[str, Any],
    preprocess_state: Mapping[str, Any],
    on_saved: Callable[[TrainResult, int], None] | None = None,
) -> TrainResult:
    """Train ``module`` on ``source`` and save it to ``model_dir``; ``on_saved(result, world_size)`` runs on the
    main rank after the final checkpoint (before the ranks part)."""
    run = _run_distributed if options.distributed else _run_local
    return run(source, Path(model_dir), module, config, options, dict(model_config), dict(preprocess_state), on_saved)


def _loader(source: Any, config: TrainConfig, rank: int, world: int, device: Any):
    from scalex_scale.data.loader import TrainingLoader

    # the user's config (not rank_config): every rank shuffles the same way and reads its own shards
    return TrainingLoader.from_train_config(source, config, rank=rank, world_size=world, pin_memory=device.type == "cuda")


def _every(loader: Any, iterations: int) -> Callable[[Any], bool]:
    """``on_epoch_end`` predicate: true about every ``iterations`` optimizer steps (same answer on all ranks)."""
    epochs = max(1, round(iterations / max(1, loader.batches_per_epoch)))
    return lambda record: (record.epoch + 1) % epochs == 0


def _start_state(model_dir: Path, resume: bool):
    from scalex_scale.train.checkpoint import load_trainer_state

    state = load_trainer_state(model_dir) if resume else None
    if resume and state is None:
        raise ScalexError(f"{model_dir}: no trainer state to resume from")
    return state


def _run_local(source, model_dir, module, config, options, model_config, prep, on_saved) -> TrainResult:
    from scalex_scale.train.checkpoint import save_checkpoint
    from scalex_scale.train.trainer import Trainer

    loader = _loader(source, config, 0, 1, resolve_device(config.device))
    trainer = Trainer(module, config)
    start_state = _start_state(model_dir, options.resume)

    def save(trainer_state: Any) -> None:
        save_checkpoint(model_dir, module, model_config=model_config, preprocess_state=prep, trainer_state=trainer_state)

    due = _every(loader, options.checkpoint_iterations)
    with loader:  # the loader's pipeline runs across epochs; stop it when the run returns
        result = trainer.fit(loader, start_state=start_state, on_epoch_end=lambda rec, tr: save(tr.state()) if due(rec) else None)
    save(trainer.state())
    if on_saved is not None:
        on_saved(result, 1)
    return result


def _run_distributed(source, model_dir, module, config, options, model_config, prep, on_saved) -> TrainResult:
    from scalex_scale.train import distributed as D
    from scalex_scale.train.trainer import Trainer, all_reduce_epoch_loss

    if config.cuda_graphs:
        raise ScalexError("--cuda-graphs is not supported with --distributed")
    ctx = D.init_distributed(config.device)
    try:
        loader = _loader(source, config, ctx.rank, ctx.world_size, ctx.device)
        start_state = _start_state(model_dir, options.resume)
        D.check_agreement(
            ctx,
            D.training_fingerprint(
                store=model_config.get("atlas"), n_train=source.n_rows, preprocess_state=prep,
                model_config=module.hparams, train_config=config, batches_per_epoch=loader.batches_per_epoch,
                sync_dsbn=options.sync_dsbn, resume_iteration=None if start_state is None else start_state.iteration,
            ),
        )  # fmt: skip
        ddp = D.wrap_ddp(module, ctx, sync_dsbn=options.sync_dsbn)
        trainer = Trainer(module, D.rank_config(config, ctx), train_module=ddp, reduce_epoch_loss=all_reduce_epoch_loss())
        if start_state is not None:
            D.restore_trainer_state(trainer, start_state, ctx)

        def save() -> None:
            D.save_distributed_checkpoint(ctx, trainer, model_dir, model_config=model_config, preprocess_state=prep)

        due = _every(loader, options.checkpoint_iterations)
        with loader:  # the loader's pipeline runs across epochs; stop it when the run returns
            result = trainer.fit(loader, on_epoch_end=lambda rec, tr: save() if due(rec) else None)
        D.sync_buffers(module, ctx)
        save()
        if ctx.is_main and on_saved is not None:
            on_saved(result, ctx.world_size)
        D.barrier(ctx)
        return result
    finally:
        D.shutdown()
