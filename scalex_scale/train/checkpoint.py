"""Checkpoints as safetensors + JSON (no pickles), written atomically.

A checkpoint directory holds

``model.safetensors``          the module's parameters and buffers;
``config.json``                ``format_version``, the module's hyper-parameters, the caller's model
                               config (e.g. ``domains``: batch names in code order), torch version;
``preprocess.json``            the preprocessing state, when given;
``trainer_state.safetensors``  resume tensors: current and best weights, Adam moments, generator,
``trainer_state.json``         partial epoch sums; and the counters, history and optimizer groups.

Each file is written to a temporary file and moved into place with ``os.replace``; ``config.json``
is written last. Files of a previous save that this save does not produce (a stale trainer state or
preprocessing state) are removed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from scalex_scale.nn.vae import SCALEXModule
from scalex_scale.train.trainer import EpochRecord, TrainerState

#: The checkpoint format this code writes and reads.
FORMAT_VERSION = 1

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESS_FILE = "preprocess.json"
STATE_TENSORS_FILE = "trainer_state.safetensors"
STATE_JSON_FILE = "trainer_state.json"

_HPARAM_KEYS = ("n_features", "n_domains", "n_latent", "n_hidden", "dsbn_momentum", "dsbn_eps")


# ------------------------------------------------------------------ file helpers
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, save(cpu, metadata={"format": "pt"}))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load(path.read_bytes())


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_version(found: Any, path: Path) -> None:
    if found != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {found!r}; this scalex-scale reads format_version "
            f"{FORMAT_VERSION} only"
        )


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
    directory.mkdir(parents=True, exist_ok=True)
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

    _write_tensors(directory / MODEL_FILE, module.state_dict())
    if preprocess_state is not None:
        _write_json(directory / PREPROCESS_FILE, dict(preprocess_state))
    else:
        (directory / PREPROCESS_FILE).unlink(missing_ok=True)
    if trainer_state is not None:
        tensors, meta = _trainer_state_to_files(trainer_state)
        _write_tensors(directory / STATE_TENSORS_FILE, tensors)
        _write_json(directory / STATE_JSON_FILE, meta)
    else:
        (directory / STATE_JSON_FILE).unlink(missing_ok=True)
        (directory / STATE_TENSORS_FILE).unlink(missing_ok=True)
    _write_json(directory / CONFIG_FILE, config)
    return directory


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dsbn_backend: str = "auto",
) -> tuple[SCALEXModule, dict[str, Any], dict[str, Any] | None]:
    """Rebuild the module saved by :func:`save_checkpoint`.

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
    FileNotFoundError
        No ``config.json`` / ``model.safetensors`` in ``directory``.
    ValueError
        Unknown ``format_version``.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a scalex-scale checkpoint (no {CONFIG_FILE})")
    config = _read_json(config_path)
    _check_version(config.get("format_version"), config_path)
    missing = [k for k in _HPARAM_KEYS if k not in config]
    if missing:
        raise ValueError(f"{config_path} lacks {', '.join(missing)}")
    module = SCALEXModule(
        int(config["n_features"]),
        int(config["n_domains"]),
        n_latent=int(config["n_latent"]),
        n_hidden=int(config["n_hidden"]),
        dsbn_momentum=float(config["dsbn_momentum"]),
        dsbn_eps=float(config["dsbn_eps"]),
        dsbn_backend=dsbn_backend,  # type: ignore[arg-type]
    )
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"{directory} has {CONFIG_FILE} but no {MODEL_FILE}")
    module.load_state_dict(_read_tensors(model_path))
    module.to(device)
    module.eval()
    preprocess_path = directory / PREPROCESS_FILE
    preprocess = _read_json(preprocess_path) if preprocess_path.is_file() else None
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
    meta = _read_json(meta_path)
    _check_version(meta.get("format_version"), meta_path)
    if not tensors_path.is_file():
        raise FileNotFoundError(f"{directory} has {STATE_JSON_FILE} but no {STATE_TENSORS_FILE}")
    tensors = _read_tensors(tensors_path)

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
