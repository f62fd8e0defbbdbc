"""Which trained model produced a latent: recorded in an atlas' state so two latents can be checked comparable.

A model is identified by its checkpoint directory and a content hash of its weights file (the first 16 hex digits
of the SHA-256 of ``model.safetensors``): retraining into the same directory changes the hash. No torch needed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .store.errors import ScalexError

__all__ = ["model_identity", "latent_model", "check_same_model"]

#: The weights file of a checkpoint directory (:mod:`scalex_scale.train.checkpoint`).
WEIGHTS_FILE = "model.safetensors"
#: Atlas state section mapping an obsm key to the identity of the model that wrote it.
STATE_SECTION = "embedding"


def model_identity(model_dir: str | Path) -> dict[str, str]:
    """``{"directory": absolute path, "id": 16 hex digits of the weights' SHA-256}`` of a checkpoint directory."""
    path = Path(model_dir).resolve() / WEIGHTS_FILE
    if not path.exists():
        raise ScalexError(f"{model_dir}: no {WEIGHTS_FILE} (not a scalex-scale model directory)")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"directory": str(path.parent), "id": digest.hexdigest()[:16]}


def latent_model(state: dict[str, Any], key: str = "latent") -> dict[str, str] | None:
    """The recorded identity of the model behind ``obsm[key]``; for atlases embedded before identities were
    recorded, the directory the atlas was fitted with (``state['model']``); ``None`` when nothing is recorded."""
    found = (state.get(STATE_SECTION) or {}).get(key)
    if found:
        return dict(found)
    fitted = state.get("model") or {}
    return {"directory": fitted["directory"]} if fitted.get("directory") else None


def check_same_model(reference: tuple[str, dict[str, Any]], query: tuple[str, dict[str, Any]], key: str = "latent") -> dict[str, str]:
    """Raise a :class:`ScalexError` unless both atlases' ``obsm[key]`` come from the same model.

    ``reference`` and ``query`` are ``(path, state)`` pairs. Compared by weights hash when both record one, else by
    model directory. Returns the reference's identity.
    """
    (rpath, rstate), (qpath, qstate) = reference, query
    rid, qid = latent_model(rstate, key), latent_model(qstate, key)
    for path, ident, how in ((rpath, rid, "embed"), (qpath, qid, "project")):
        if ident is None:
            raise ScalexError(
                f"{path}: no record of the model that wrote obsm['{key}']; run `scalex-scale {how}` again with this "
                "version so the two latents can be checked to come from the same model"
            )
    if "id" in rid and "id" in qid:
        same = rid["id"] == qid["id"]
    else:
        same = rid["directory"] == qid["directory"]
    if not same:
        raise ScalexError(
            f"{qpath} was embedded by the model in {qid['directory']} (id {qid.get('id', '?')}) but {rpath} by "
            f"{rid['directory']} (id {rid.get('id', '?')}): latents of different models are not comparable; project "
            f"the query with the reference's model (`scalex-scale project {rpath} {rid['directory']} ... --query-store`)"
        )
    return rid
