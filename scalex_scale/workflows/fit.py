"""``ss.fit``: train the SCALEX model on an atlas' training matrix and record the model in the atlas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConflictError, ScalexError, TrainingInterrupted
from ..preprocessing.state import PreprocessState
from ..store import Atlas, transaction
from ._model import preprocess_record

__all__ = ["fit"]


def fit(
    store: str | Path,
    model_dir: str | Path,
    config: Any = None,
    *,
    resume: bool = False,
    distributed: bool = False,
    sync_dsbn: bool = False,
    checkpoint_iterations: int = 5000,
    checkpoint_minutes: float = 5.0,
    overwrite: bool = False,
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
    checkpoint_minutes
        Also save one after every this many minutes of training (0: never; with ``distributed`` at an epoch's
        end). On SIGINT/SIGTERM a one-process run saves one too and raises
        :class:`~scalex_scale.errors.TrainingInterrupted`.
    overwrite
        Replace a model already in ``model_dir`` (without it, or ``resume``, that is refused).

    Returns
    -------
    TrainResult

    Raises
    ------
    TrainingDivergedError
        The loss became non-finite (the message names the iteration); the last good checkpoint is kept.
    TrainingInterrupted
        Stopped by a signal after saving a resumable checkpoint (the message says how to resume).
    """
    from ..nn import SCALEXModule
    from ..train import TrainConfig, check_resumable
    from ..train.run import RunOptions, run_training

    config = config or TrainConfig()
    options = RunOptions(resume, distributed, sync_dsbn, checkpoint_iterations, checkpoint_minutes)
    if not resume and not overwrite:
        _refuse_existing(store, model_dir)
    atlas = Atlas.open(store)
    preprocess_record(atlas)
    with atlas.pinned_training_matrix() as (source, snapshot):  # a re-preprocess meanwhile cannot change it
        prep = preprocess_record(atlas, snapshot)
        state = PreprocessState.from_dict(prep)
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
        # the domain count comes from the training matrix' owner (store.training), one DSBN branch per batch
        module = SCALEXModule(state.n_features, source.n_domains, seed=config.seed, dsbn_singleton=config.dsbn_singleton)

        def record(result: Any, world_size: int) -> None:
            _record_model(store, model_dir, result, prep.get("train_id"), world_size)

        try:
            return run_training(source, model_dir, module, config, options, model_config=model_config,
                                preprocess_state=prep, on_saved=record)  # fmt: skip
        except TrainingInterrupted as err:
            raise TrainingInterrupted(f"{err}; resume with: scalex-scale fit {store} {model_dir} --resume", err.signum) from None


def _refuse_existing(store: str | Path, model_dir: str | Path) -> None:
    """``fit`` does not silently replace a model: it takes ``overwrite`` (or ``resume``)."""
    from ..train.checkpoint import CONFIG_FILE, MANIFEST_FILE, MODEL_FILE

    path = Path(model_dir)
    if path.is_dir() and any((path / f).exists() for f in (MODEL_FILE, CONFIG_FILE, MANIFEST_FILE)):
        raise ScalexError(
            f"{model_dir}: holds a model already; pass --overwrite to replace it, --resume to continue its training "
            f"(scalex-scale fit {store} {model_dir} --resume), or choose another model directory"
        )


def _record_model(store: str | Path, model_dir: str | Path, result: Any, train_id: str | None, world_size: int) -> None:
    """Record the trained model in the atlas (a transaction), unless the atlas was re-preprocessed meanwhile."""
    from ..train import model_id

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
