"""Checkpoints as safetensors + JSON (no pickles), each save one atomic directory swap.

A checkpoint directory holds

``model.safetensors``          the module's parameters and buffers;
``config.json``                ``format_version``, the module's hyper-parameters, the caller's model
                               config (e.g. ``domains``: batch names in code order), torch version;
``preprocess.json``            the preprocessing state, when given;
``trainer_state.safetensors``  resume tensors: current and best weights, Adam moments, generator,
``trainer_state.json``         partial epoch sums; and the counters, history and optimizer groups;
``manifest.json``              every other file's size and SHA-256, and the model's id.

A save writes all files into a hidden sibling directory and publishes it in one atomic step
(:func:`scalex_scale._fs.publish_dir`), so a crash leaves the previous checkpoint or the new one, never
pieces of both; files of a previous save that this save does not produce (a stale trainer state) are gone
with it, files that are not ours are kept. Loading checks every piece it reads against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from scalex_scale._faults import point
from scalex_scale._fs import FSYNC, publish_dir, remove_tree, sibling
from scalex_scale.errors import CheckpointError, MissingCheckpointError
from scalex_scale.nn.vae import SCALEXModule
from scalex_scale.train.trainer import EpochRecord, TrainerState

#: The checkpoint format this code writes (2: with manifest.json) and the ones it reads.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESS_FILE = "preprocess.json"
STATE_TENSORS_FILE = "trainer_state.safetensors"
STATE_JSON_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
OUR_FILES = (MODEL_FILE, CONFIG_FILE, PREPROCESS_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE, MANIFEST_FILE)

_HPARAM_KEYS = ("n_features", "n_domains", "n_latent", "n_hidden", "dsbn_momentum", "dsbn_eps")


# ------------------------------------------------------------------ file helpers
def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    point("checkpoint.write", str(path))
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if FSYNC:
            os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata={"format": "pt"})


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as err:
        raise CheckpointError(f"{path}: is not valid JSON ({err}); the checkpoint is damaged") from err


def _check_version(found: Any, path: Path) -> None:
    if found not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has format_version {found!r}; this scalex-scale reads format_version "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )


def _manifest(directory: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    if config.get("format_version", 1) < 2:
        return None
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: has no {MANIFEST_FILE}; the checkpoint is incomplete or damaged")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: is not a checkpoint manifest; the checkpoint is damaged")
    return manifest


def _read_verified(directory: Path, name: str, manifest: Mapping[str, Any] | None) -> bytes:
    """A checkpoint file's bytes, checked against the manifest (when the checkpoint has one)."""
    path = directory / name
    data = path.read_bytes()
    if manifest is not None:
        expect = manifest["files"].get(name)
        if expect is None:
            raise CheckpointError(f"{path}: is not listed in {MANIFEST_FILE}; the checkpoint's pieces disagree")
        if len(data) != expect.get("bytes") or hashlib.sha256(data).hexdigest() != expect.get("sha256"):
            raise CheckpointError(
                f"{path}: does not match {MANIFEST_FILE} (size or SHA-256 differs); the checkpoint's pieces "
                "disagree (damaged or mixed with another save): use another checkpoint or train again"
            )
    return data


def model_id(directory: str | os.PathLike[str]) -> str | None:
    """The id of the model saved in ``directory`` (from its manifest; None for older checkpoints)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    return _read_json(path).get("model_id")


def _float_to_json(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # "inf", "-inf", "nan": JSON has no literal for them


# --------------------------------------------------------------------- model
def save_checkpoint(
    directory: str | os.PathLike[str],
    module: SCALEXModule,
    *,
    model_config: Mapping[str, Any] | None = None,
    preprocess_state: Mapping[str, Any] | None = None,
    trainer_state: TrainerState | None = None,
) -> Path:
    """Write ``module`` (and optionally preprocessing and trainer state) to ``directory``.

    Parameters
    ----------
    directory
        Created if missing; files of the same names are replaced.
    module
        The trained module; its current weights and buffers are saved.
    model_config
        JSON-able extra model description, e.g. ``{"domains": [...batch names in code order]}``.
        Hyper-parameter keys (``n_features``...) must agree with the module.
    preprocess_state
        JSON-able preprocessing state (features, scaling...), written to ``preprocess.json``.
    trainer_state
        A :meth:`~scalex_scale.train.Trainer.state` snapshot, for resuming training.

    Returns
    -------
    Path
        The directory.
    """
    directory = Path(directory)
    hparams = module.hparams
    config: dict[str, Any] = dict(model_config or {})
    for key, value in hparams.items():
        if key in config and config[key] != value:
            raise ValueError(f"model_config[{key!r}] = {config[key]!r} but the module has {value!r}")
    domains = config.get("domains")
    if domains is not None and len(domains) != module.n_domains:
        raise ValueError(
            f"model_config['domains'] names {len(domains)} domains but the module has {module.n_domains}"
        )
    config.update(hparams)
    config["format_version"] = FORMAT_VERSION
    config["torch_version"] = torch.__version__

    directory.parent.mkdir(parents=True, exist_ok=True)
    work = sibling(directory, "tmp")
    work.mkdir()
    try:
        files = {MODEL_FILE: _write_file(work / MODEL_FILE, _tensor_bytes(module.state_dict()))}
        if preprocess_state is not None:
            files[PREPROCESS_FILE] = _write_file(work / PREPROCESS_FILE, _json_bytes(dict(preprocess_state)))
        if trainer_state is not None:
            tensors, meta = _trainer_state_to_files(trainer_state)
            files[STATE_TENSORS_FILE] = _write_file(work / STATE_TENSORS_FILE, _tensor_bytes(tensors))
            files[STATE_JSON_FILE] = _write_file(work / STATE_JSON_FILE, _json_bytes(meta))
        files[CONFIG_FILE] = _write_file(work / CONFIG_FILE, _json_bytes(config))
        manifest = {"format_version": FORMAT_VERSION, "model_id": files[MODEL_FILE]["sha256"][:16], "files": files}
        _write_file(work / MANIFEST_FILE, _json_bytes(manifest))
        if directory.is_dir():  # keep what is not ours (a user's notes) in the new copy
            for p in directory.iterdir():
                if p.name not in OUR_FILES and not p.name.startswith("."):
                    os.link(p, work / p.name) if p.is_file() else None
        old = publish_dir(work, directory)
    except BaseException:
        remove_tree(work)
        raise
    if old is not None:
        remove_tree(old)
    return directory


def _positive_int(config: Mapping[str, Any], key: str, path: Path, limit: int) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise CheckpointError(f"{path}: {key} = {value!r} is not an integer between 1 and {limit:,}")
    return value


def _header(data: bytes, path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), read without loading tensors."""
    if len(data) < 8:
        raise CheckpointError(f"{path}: is not a safetensors file (too short); the checkpoint is damaged")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: is not a safetensors file ({err}); the checkpoint is damaged") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: is not a safetensors file; the checkpoint is damaged")
    header.pop("__metadata__", None)
    return header


def read_model_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a checkpoint, checked (version, sizes), without loading any weights."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise MissingCheckpointError(f"{directory}: no such model directory; train one with `scalex-scale fit`")
    if not config_path.is_file():
        raise MissingCheckpointError(f"{directory}: is not a scalex-scale checkpoint (no {CONFIG_FILE})")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: is not a JSON object; the checkpoint is damaged")
    _check_version(config.get("format_version"), config_path)
    missing = [k for k in _HPARAM_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}")
    for key, limit in (("n_features", 10_000_000), ("n_domains", 1_000_000), ("n_latent", 4096), ("n_hidden", 1 << 20)):
        _positive_int(config, key, config_path, limit)
    for key in ("dsbn_momentum", "dsbn_eps"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise CheckpointError(f"{config_path}: {key} = {value!r} is not a finite non-negative number")
    for key in ("domains", "var_names"):
        if key in config and not (isinstance(config[key], list) and all(isinstance(v, str) for v in config[key])):
            raise CheckpointError(f"{config_path}: {key} is not a list of names")
    if "domains" in config and len(config["domains"]) != config["n_domains"]:
        raise CheckpointError(f"{config_path}: names {len(config['domains'])} domains but n_domains = {config['n_domains']}")
    return config


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dsbn_backend: str = "auto",
) -> tuple[SCALEXModule, dict[str, Any], dict[str, Any] | None]:
    """Rebuild the module saved by :func:`save_checkpoint`.

    Every piece is checked before anything is allocated: the config's sizes, the manifest's hashes, and the
    weights file's header against the shapes the config implies; the weights must be finite.

    Parameters
    ----------
    directory
        A checkpoint directory.
    device
        Where to put the module.
    dsbn_backend
        DSBN kernel backend of the rebuilt module (not part of the checkpoint).

    Returns
    -------
    module
        The module with the saved weights, on ``device``, in eval mode.
    model_config
        The content of ``config.json``.
    preprocess_state
        The content of ``preprocess.json``, or None.

    Raises
    ------
    MissingCheckpointError
        No such directory, or no ``config.json`` / ``model.safetensors`` in it (also a ``FileNotFoundError``).
    CheckpointError
        Unknown ``format_version``, damaged or inconsistent pieces, non-finite weights (also a ``ValueError``).
    """
    directory = Path(directory)
    config = read_model_config(directory)
    manifest = _manifest(directory, config)
    if manifest is not None:
        _read_verified(directory, CONFIG_FILE, manifest)
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise MissingCheckpointError(f"{directory} has {CONFIG_FILE} but no {MODEL_FILE}")
    data = _read_verified(directory, MODEL_FILE, manifest)
    expect = SCALEXModule.state_shapes(config["n_features"], config["n_domains"], config["n_latent"], config["n_hidden"])
    header = _header(data, model_path)
    found = {k: tuple(v.get("shape", ())) if isinstance(v, dict) else None for k, v in header.items()}
    if found != expect:
        diff = sorted(k for k in set(found) | set(expect) if found.get(k) != expect.get(k))
        k = diff[0]
        raise CheckpointError(
            f"{model_path}: tensor {k!r} has shape {found.get(k)} but {CONFIG_FILE} implies {expect.get(k)}; the "
            "weights and the config do not belong together"
        )
    state = load(data)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{model_path}: weights are not finite ({bad[0]}); training diverged: train again with a lower --lr"
        )
    module = SCALEXModule(
        config["n_features"],
        config["n_domains"],
        n_latent=config["n_latent"],
        n_hidden=config["n_hidden"],
        dsbn_momentum=float(config["dsbn_momentum"]),
        dsbn_eps=float(config["dsbn_eps"]),
        dsbn_backend=dsbn_backend,  # type: ignore[arg-type]
    )
    module.load_state_dict(state)
    module.to(device)
    module.eval()
    preprocess_path = directory / PREPROCESS_FILE
    preprocess = None
    if preprocess_path.is_file():
        preprocess = json.loads(_read_verified(directory, PREPROCESS_FILE, manifest))
        if not isinstance(preprocess, dict):
            raise CheckpointError(f"{preprocess_path}: is not a JSON object; the checkpoint is damaged")
    return module, config, preprocess


# -------------------------------------------------------------- trainer state
def _trainer_state_to_files(state: TrainerState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {
        "generator": state.generator_state,
        "epoch_sums": state.epoch_sums,
    }
    tensors.update({f"model.{k}": v for k, v in state.model_state.items()})
    if state.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in state.best_state.items()})
    opt_tensors: dict[str, list[str]] = {}
    opt_values: dict[str, dict[str, Any]] = {}
    for index, param_state in state.optimizer_state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
                opt_tensors.setdefault(str(index), []).append(name)
            else:
                opt_values.setdefault(str(index), {})[name] = value
    meta = {
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "epoch": state.epoch,
        "batch": state.batch,
        "iteration": state.iteration,
        "best_loss": _float_to_json(state.best_loss),
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "stopped_early": state.stopped_early,
        "seconds": state.seconds,
        "cells": state.cells,
        "has_best_state": state.best_state is not None,
        "history": [
            {**r.to_dict(), **{k: _float_to_json(getattr(r, k)) for k in ("loss", "recon", "kl")}}
            for r in state.history
        ],
        "optimizer": {
            "param_groups": [
                {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
                for group in state.optimizer_state["param_groups"]
            ],
            "state_tensors": opt_tensors,
            "state_values": opt_values,
        },
    }
    return tensors, meta


def load_trainer_state(directory: str | os.PathLike[str]) -> TrainerState | None:
    """Read the trainer state of a checkpoint (CPU tensors), or None when it has none.

    Pass it to :meth:`~scalex_scale.train.Trainer.fit` as ``start_state`` to resume.
    """
    directory = Path(directory)
    meta_path = directory / STATE_JSON_FILE
    tensors_path = directory / STATE_TENSORS_FILE
    if not meta_path.is_file():
        return None
    config = read_model_config(directory)
    if config.get("format_version", 1) < 2:
        raise CheckpointError(
            f"{directory}: was written by an older scalex-scale without a manifest, so its trainer state cannot be "
            "verified; start a new fit instead of --resume"
        )
    manifest = _manifest(directory, config)
    meta = json.loads(_read_verified(directory, STATE_JSON_FILE, manifest))
    _check_version(meta.get("format_version"), meta_path)
    if not tensors_path.is_file():
        raise CheckpointError(f"{directory} has {STATE_JSON_FILE} but no {STATE_TENSORS_FILE}")
    tensors = load(_read_verified(directory, STATE_TENSORS_FILE, manifest))

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    opt = meta["optimizer"]
    opt_state: dict[int, dict[str, Any]] = {}
    for index, names in opt["state_tensors"].items():
        opt_state.setdefault(int(index), {}).update(
            {name: tensors[f"optim.{index}.{name}"] for name in names}
        )
    for index, values in opt["state_values"].items():
        opt_state.setdefault(int(index), {}).update(values)
    param_groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in opt["param_groups"]
    ]
    return TrainerState(
        epoch=int(meta["epoch"]),
        batch=int(meta["batch"]),
        iteration=int(meta["iteration"]),
        best_loss=float(meta["best_loss"]),
        best_epoch=meta["best_epoch"],
        bad_epochs=int(meta["bad_epochs"]),
        stopped_early=bool(meta["stopped_early"]),
        history=tuple(EpochRecord.from_dict(r) for r in meta["history"]),
        epoch_sums=tensors["epoch_sums"],
        model_state=prefixed("model."),
        best_state=prefixed("best.") if meta["has_best_state"] else None,
        optimizer_state={"state": dict(sorted(opt_state.items())), "param_groups": param_groups},
        generator_state=tensors["generator"],
        seconds=float(meta["seconds"]),
        cells=int(meta["cells"]),
    )


# -------------------------------------------------------------- resume checks
_FINGERPRINT_WORDS = {
    "var_names": "gene list",
    "domains": "batches",
    "train_id": "training matrix (the atlas was preprocessed again since)",
    "batch_size": "batch size",
}


def check_resumable(directory: str | os.PathLike[str], fingerprint: Mapping[str, Any]) -> None:
    """Refuse to resume from a checkpoint made on other data or with another batch size.

    ``fingerprint`` holds what the new run would use: ``var_names``, ``domains``, ``train_id``, ``batch_size``
    (each compared with what the checkpoint's ``config.json`` records; keys it lacks are not compared).
    """
    config = read_model_config(directory)
    saved_all = {**config, "batch_size": (config.get("train_config") or {}).get("batch_size")}
    for key, value in fingerprint.items():
        saved = saved_all.get(key)
        if saved is not None and value is not None and saved != value:
            what = _FINGERPRINT_WORDS.get(key, key)
            shown = "" if isinstance(value, list) else f" ({saved!r} there, {value!r} now)"
            raise CheckpointError(
                f"{directory}: was trained with another {what}{shown}, so it cannot be resumed on this atlas; "
                "start a new fit into another model directory (or pass --overwrite)"
            )
