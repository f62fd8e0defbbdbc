"""Which trained model produced a latent, read from an atlas' state, so two latents can be checked comparable.

``embed`` and ``project`` record, inside their transaction, ``state['obsm'][key] = {"directory", "model_id",
"train_id", "n_embedded"}`` (``model_id``: the id in the checkpoint's manifest, new for every trained model, see
:func:`scalex_scale.train.model_id`). ``transfer --reference`` compares the two records. No torch needed.
"""

from __future__ import annotations

from typing import Any

from .errors import ScalexError

__all__ = ["latent_model", "check_same_model"]


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
