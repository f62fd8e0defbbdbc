"""One training run: loader, trainer and checkpoint cadence, on one process or data-parallel under ``torchrun``.

``train/`` owns the whole story of a run and never opens an atlas: it receives the training matrix (any
:class:`~scalex_scale.data.loader.TrainingLoader` source), the module, the configs and a callback that the main
rank calls once the model is saved (the atlas step :func:`scalex_scale.workflows.fit.fit` records the model there).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalex_scale.errors import CheckpointError, ScalexError, TrainingDivergedError, TrainingInterrupted
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
    checkpoint_minutes
        Also save one after every this many minutes of training, at the next step (resumes exactly); 0: never.
        With ``distributed``: at the next epoch's end (the ranks agree through one tiny all-reduce per epoch).
    handle_signals
        One process only: on SIGINT/SIGTERM stop at the next step, save a resumable state and raise
        :class:`~scalex_scale.errors.TrainingInterrupted` (a second SIGINT aborts without saving). Under
        ``torchrun`` the launcher owns the signals: the timed checkpoints are what a kill leaves.
    """

    resume: bool = False
    distributed: bool = False
    sync_dsbn: bool = False
    checkpoint_iterations: int = 5000
    checkpoint_minutes: float = 5.0
    handle_signals: bool = True

    def __post_init__(self) -> None:
        if self.sync_dsbn and not self.distributed:
            raise ScalexError("--sync-dsbn needs --distributed (it all-reduces DSBN statistics across ranks)")
        if self.checkpoint_iterations <= 0:
            raise ScalexError(f"--checkpoint-every must be positive, got {self.checkpoint_iterations}")
        if not self.checkpoint_minutes >= 0:
            raise ScalexError(f"--checkpoint-minutes must be >= 0 (0: no timed checkpoints), got {self.checkpoint_minutes}")


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
    from scalex_scale.train.finite import diverged_error
    from scalex_scale.train.signals import StopSignals
    from scalex_scale.train.trainer import Trainer

    loader = _loader(source, config, 0, 1, resolve_device(config.device))
    trainer = Trainer(module, config)
    start_state = _start_state(model_dir, options.resume)
    saved: list[int] = [] if start_state is None else [start_state.iteration]  # iterations of good checkpoints
    period = options.checkpoint_minutes * 60.0
    next_due = [time.monotonic() + period]

    def save(trainer_state: Any) -> None:
        try:
            save_checkpoint(model_dir, module, model_config=model_config, preprocess_state=prep, trainer_state=trainer_state)
        except CheckpointError as err:
            if "not finite" not in str(err):
                raise
            what = f"the weights became non-finite by iteration {trainer_state.iteration:,}"
            raise diverged_error(what, config) from err
        saved.append(trainer_state.iteration)
        next_due[0] = time.monotonic() + period

    def checkpoint_now(tr: Any) -> None:
        tr.check_finite()  # a diverged run is an error, not a checkpoint
        save(tr.state())

    due = _every(loader, options.checkpoint_iterations)
    stop = StopSignals()

    def on_step(tr: Any) -> bool | None:
        if stop.signum is not None:
            return True  # pause here: saved below, then TrainingInterrupted
        if period > 0 and time.monotonic() >= next_due[0]:
            checkpoint_now(tr)
        return None

    def on_epoch_end(record: Any, tr: Any) -> None:
        if due(record):
            save(tr.state())

    try:
        with loader, (stop if options.handle_signals else contextlib.nullcontext()):  # the loader's pipeline runs across epochs
            result = trainer.fit(loader, start_state=start_state, on_step=on_step, on_epoch_end=on_epoch_end)
            if not result.completed:
                checkpoint_now(trainer)
    except TrainingDivergedError as err:
        kept = (f"the last good checkpoint (iteration {saved[-1]:,}) in {model_dir} is kept"
                if saved else f"nothing was saved to {model_dir}")  # fmt: skip
        raise TrainingDivergedError(f"{err}; {kept}") from err
    if not result.completed:
        raise TrainingInterrupted(
            f"{stop.name or 'stopped'} at iteration {result.n_iterations:,} of {config.max_iterations:,}: a resumable "
            f"checkpoint is saved in {model_dir}", stop.signum or 0,
        )  # fmt: skip
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
        clock = _EpochClock(ctx, options.checkpoint_minutes)

        def on_epoch_end(record: Any, tr: Any) -> None:
            timed = clock.due()  # a collective: every rank calls it at every epoch's end
            if due(record) or timed:
                save()
                clock.restart()

        with loader:  # the loader's pipeline runs across epochs; stop it when the run returns
            result = trainer.fit(loader, on_epoch_end=on_epoch_end)
        D.sync_buffers(module, ctx)
        save()
        if ctx.is_main and on_saved is not None:
            on_saved(result, ctx.world_size)
        D.barrier(ctx)
        return result
    finally:
        D.shutdown()


class _EpochClock:
    """The timed cadence under data parallelism: at an epoch's end, due when any rank's clock says so (one
    one-element all-reduce per epoch, so the ranks agree; their clocks may differ)."""

    def __init__(self, ctx: Any, minutes: float) -> None:
        self.ctx, self.period = ctx, minutes * 60.0
        self.restart()

    def restart(self) -> None:
        self.next = time.monotonic() + self.period

    def due(self) -> bool:
        if self.period <= 0:
            return False
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(time.monotonic() >= self.next)], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
