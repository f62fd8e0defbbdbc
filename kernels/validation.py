"""Argument checks shared by every DSBN backend.

All checks here look only at shapes, dtypes and devices (metadata), never at tensor values, so they cost no host
synchronisation and are safe under ``torch.compile`` and CUDA-graph capture. Domain ids outside ``[0, D)`` are
caught by the backends' own indexing (an ``IndexError`` on CPU, a device-side assert on CUDA).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["SINGLETON_RULES", "Singleton", "check_dsbn_inputs", "check_singleton", "shape_str"]

#: What a training mini-batch does with a domain's lone row (``reference.py`` has the rules): ``"passthrough"``
#: (the reference package's rule, the default) or ``"running"``.
Singleton = Literal["passthrough", "running"]
SINGLETON_RULES: tuple[str, ...] = ("passthrough", "running")

_PARAM_NAMES = ("weight", "bias", "running_mean", "running_var")


def check_singleton(rule: str, name: str = "singleton") -> None:
    """ValueError naming ``name`` unless ``rule`` is one of :data:`SINGLETON_RULES`."""
    if rule not in SINGLETON_RULES:
        raise ValueError(f"{name} must be one of {', '.join(SINGLETON_RULES)}, got {rule!r}")


def shape_str(t: torch.Tensor) -> str:
    """Format a tensor shape as ``(a, b)`` for error messages."""
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (batch, features), got shape {shape_str(x)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one feature, got shape {shape_str(x)}")


def _check_domain(domain: torch.Tensor, n_rows: int) -> None:
    if domain.dim() != 1 or domain.shape[0] != n_rows:
        raise ValueError(
            f"domain must be 1-D with one id per row of x, i.e. shape ({n_rows},), got shape {shape_str(domain)}"
        )
    if domain.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"domain must be an int64 (or int32) tensor of domain ids, got dtype {domain.dtype}")


def _check_params(params: dict[str, torch.Tensor], n_features: int) -> None:
    weight = params["weight"]
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be 2-D (n_domains, n_features), got shape {shape_str(weight)}")
    expected = (weight.shape[0], n_features)
    for name, t in params.items():
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (n_domains, n_features) = ({expected[0]}, {expected[1]}) "
                f"(n_domains from weight, n_features from x), got shape {shape_str(t)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_devices(tensors: dict[str, torch.Tensor]) -> None:
    device = tensors["x"].device
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; all DSBN tensors must share a device")


def _check_scalars(momentum: float, eps: float) -> None:
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")


def check_dsbn_inputs(
    x: torch.Tensor,
    domain: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
    singleton: str = "passthrough",
) -> None:
    """Validate the arguments of a DSBN call.

    Parameters
    ----------
    x
        ``(B, F)`` floating-point input.
    domain
        ``(B,)`` int64 (or int32) domain ids in ``[0, D)``.
    weight, bias, running_mean, running_var
        ``(D, F)`` floating-point per-domain affine parameters and running statistics.
    momentum, eps
        Running-statistics momentum in ``[0, 1]`` and variance epsilon ``> 0``.
    singleton
        One of :data:`SINGLETON_RULES`.

    Raises
    ------
    ValueError
        Naming the offending argument and its shape, dtype or device.
    """
    named = {
        "x": _check_tensor("x", x),
        "domain": _check_tensor("domain", domain),
        "weight": _check_tensor("weight", weight),
        "bias": _check_tensor("bias", bias),
        "running_mean": _check_tensor("running_mean", running_mean),
        "running_var": _check_tensor("running_var", running_var),
    }
    _check_x(x)
    _check_domain(domain, x.shape[0])
    _check_params({name: named[name] for name in _PARAM_NAMES}, x.shape[1])
    _check_devices(named)
    _check_scalars(momentum, eps)
    check_singleton(singleton)
