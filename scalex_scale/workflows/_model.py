"""What the atlas steps share about a trained model: loading it, matching its genes, recording its latent and
checking that two latents come from the same model."""

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


def check_genes(
    atlas: Atlas, model_config: dict[str, Any], model_dir: str | Path, *, projecting: bool = False, query_store: bool = False
) -> None:
    """The atlas must have exactly the genes the model was trained on.

    The message points to what the user has not tried: the model's own atlas, or for ``project`` a separate
    ``--query-store`` (genes aligned to the model), or for ``embed`` a model trained on this atlas.
    """
    names = model_config.get("var_names")
    if names is not None and list(map(str, atlas.var_names)) != names:
        home = model_config.get("atlas")
        theirs = f"the model's atlas ({home})" if home else "the atlas the model was trained on"
        if query_store:
            hint = "give --query-store a new path (it is then created with the model's genes) or the model's own atlas"
        elif projecting:
            hint = (f"project into {theirs}, or add --query-store NEW.zarr to write the query, aligned to the "
                    "model's genes, to a separate atlas")  # fmt: skip
        else:
            hint = f"embed {theirs} with this model, or train one on this atlas: scalex-scale fit {atlas.path} NEW_MODEL_DIR"
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


# which trained model produced a latent (embed and project record it in state['obsm'][key], inside their
# transaction; transfer --reference compares the two records)


def latent_model(state: dict[str, Any], key: str = "latent") -> dict[str, Any] | None:
    """The recorded model behind ``obsm[key]``: ``{"directory", "id"}`` (``id`` absent when the checkpoint had none);
    for atlases embedded before latents were recorded, the model the atlas was fitted with (``state['model']``);
    ``None`` when nothing is recorded."""
    for found in ((state.get("obsm") or {}).get(key), state.get("model") if key == "latent" else None):
        if found and found.get("directory"):
            out = {"directory": str(found["directory"])}
            if found.get("model_id"):
                out["id"] = str(found["model_id"])
            return out
    return None


def check_same_model(reference: tuple[str, dict[str, Any]], query: tuple[str, dict[str, Any]], key: str = "latent") -> dict[str, Any]:
    """Raise a :class:`ScalexError` unless both atlases' ``obsm[key]`` come from the same model.

    ``reference`` and ``query`` are ``(path, state)`` pairs. Compared by model id when both record one, else by
    model directory. Returns the reference's record.
    """
    (rpath, rstate), (qpath, qstate) = reference, query
    rid, qid = latent_model(rstate, key), latent_model(qstate, key)
    for path, ident, how in ((rpath, rid, "embed"), (qpath, qid, "project")):
        if ident is None:
            raise ScalexError(
                f"{path}: no record of the model that wrote obsm['{key}']; run `scalex-scale {how}` again with this "
                "version so the two latents can be checked to come from the same model"
            )
    same = rid["id"] == qid["id"] if "id" in rid and "id" in qid else rid["directory"] == qid["directory"]
    if not same:
        raise ScalexError(
            f"{qpath} was embedded by the model in {qid['directory']} (id {qid.get('id', '?')}) but {rpath} by "
            f"{rid['directory']} (id {rid.get('id', '?')}): latents of different models are not comparable; project "
            f"the query with the reference's model (`scalex-scale project {rpath} {rid['directory']} ... --query-store`)"
        )
    return rid
