"""The one place that decides whether the Triton DSBN kernels can run, and which backend a call uses.

Triton is imported lazily, on the first question asked here, never at ``import scalex_scale.kernels``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from typing import Literal

import torch

__all__ = ["Backend", "INSTALL_HINT", "resolve_backend", "triton_available", "triton_unavailable_reason"]

Backend = Literal["torch", "triton"]

INSTALL_HINT = "pip install 'scalex-scale[gpu]'"
KERNEL_MODULE = "scalex_scale.kernels.dsbn_triton"

logger = logging.getLogger("scalex_scale.kernels")
_logged_choices: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    """Import triton once; return None on success, else the import error as text."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001  (a broken install must not break the torch path)
        return f"{type(exc).__name__}: {exc}"
    return None


def _interpret_enabled() -> bool:
    """Whether Triton's CPU interpreter is on (TRITON_INTERPRET=1), as Triton itself reads it."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _kernels_compiled_for_gpu() -> bool:
    """True when the kernel module was already imported WITHOUT the interpreter (its kernels cannot run on CPU)."""
    module = sys.modules.get(KERNEL_MODULE)
    return module is not None and not getattr(module, "INTERPRETED", False)


def triton_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None: they can).

    Parameters
    ----------
    device
        Target device; None asks about "any device of this process" (CUDA, or CPU under the interpreter).

    Returns
    -------
    str or None
        A human-readable reason, or None when Triton is importable and the device is CUDA, or the device is CPU
        and ``TRITON_INTERPRET=1`` was set before the kernels were first imported.
    """
    error = _triton_import_error()
    if error is not None:
        return f"triton cannot be imported ({error})"
    dev_type = None if device is None else torch.device(device).type
    if dev_type == "cuda" or (dev_type is None and torch.cuda.is_available()):
        return None
    if dev_type not in (None, "cpu"):
        return f"the Triton kernels do not support device type {dev_type!r}"
    if not _interpret_enabled():
        where = "CPU tensors" if dev_type == "cpu" else "no CUDA device"
        return f"{where}, and the Triton CPU interpreter is off (set TRITON_INTERPRET=1 before the first DSBN call)"
    if _kernels_compiled_for_gpu():
        return "TRITON_INTERPRET=1 was set after the DSBN kernels were imported for the GPU; set it before"
    return None


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the fused Triton DSBN kernels can run (on ``device``, or on CUDA/interpreter when None)."""
    return triton_unavailable_reason(device) is None


def _log_choice_once(chosen: str, device: torch.device, why: str) -> None:
    """Log the 'auto' choice once per (backend, device type); silent while torch.compile traces (no graph break)."""
    if torch.compiler.is_compiling():
        return
    key = (chosen, device.type)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("DSBN backend 'auto' chose %r on %s (%s)", chosen, device.type, why)


def resolve_backend(backend: str, device: torch.device | str) -> Backend:
    """Pick the DSBN backend for tensors on ``device``.

    Parameters
    ----------
    backend
        ``"auto"``: Triton on CUDA tensors when it can run there, torch otherwise (never the slow CPU
        interpreter); the choice is logged at INFO once per process for each (backend, device type).
        ``"triton"``: Triton or a RuntimeError. ``"torch"``: the pure-torch reference.
    device
        Device of the input tensors.

    Returns
    -------
    {"torch", "triton"}

    Raises
    ------
    ValueError
        Unknown ``backend``.
    RuntimeError
        ``backend="triton"`` where Triton is missing or cannot run; the message holds the install hint.
    """
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(
                f"DSBN backend 'triton' cannot run on {device}: {reason}. "
                f"Install the GPU extra with: {INSTALL_HINT} (and use CUDA tensors), or pass backend='torch'."
            )
        return "triton"
    if backend == "auto":
        if device.type == "cuda":
            reason = triton_unavailable_reason(device)
            if reason is None:
                _log_choice_once("triton", device, "fused Triton kernels")
                return "triton"
            _log_choice_once("torch", device, f"{reason}; for the fused kernels: {INSTALL_HINT}")
            return "torch"
        _log_choice_once("torch", device, "the Triton kernels run only on CUDA")
        return "torch"
    raise ValueError(f"backend must be one of 'auto', 'torch', 'triton', got {backend!r}")
