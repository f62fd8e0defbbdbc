"""What the atlas steps share about a trained model: loading it, matching its genes, recording its latent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import PreprocessError, ScalexError
from ..preprocessing.state import PreprocessState
from ..store import Atlas


def n_workers() -> int:
    """Threads for the reading/transform side of a step."""
    return os.cpu_count() or 1


def preprocess_record(atlas: Atlas, snapshot: dict[str, Any] | None = None) -> dict[str, Any]:
    """The atlas' preprocessing record (from ``snapshot`` when given); raises when it was never preprocessed."""
    prep = (atlas.state if snapshot is None else snapshot).get("preprocess")
    if prep is None:
        raise PreprocessError(f"{atlas.path}: not preprocessed yet; run `scalex-scale preprocess {atlas.path}`")
    return prep


def load_model(model_dir: str | Path, device: str):
    """``(module, model_config, preprocess record, PreprocessState, torch device)`` of a saved model."""
    from ..train import load_checkpoint
    from ..train.config import resolve_device

    dev = resolve_device(device)
    module, model_config, prep = load_checkpoint(model_dir, device=dev)
    if prep is None:
        raise ScalexError(f"{model_dir}: checkpoint has no preprocessing state")
    return module, model_config, prep, PreprocessState.from_dict(prep), dev


def check_genes(atlas: Atlas, model_config: dict[str, Any], model_dir: str | Path, *, projecting: bool = False) -> None:
    """The atlas must have exactly the genes the model was trained on."""
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


def latent_record(model_dir: str | Path, model_config: dict[str, Any], n: int) -> dict[str, Any]:
    """The state's record of an ``obsm`` latent: which model wrote it, and how many cells it embedded."""
    from ..train import model_id

    return {
        "directory": str(Path(model_dir).resolve()),
        "model_id": model_id(model_dir),
        "train_id": model_config.get("train_id"),
        "n_embedded": n,
    }
