"""Domain-Specific BatchNorm (DSBN) for scalex-scale: a pure-torch reference and fused Triton kernels.

Public API
----------
dsbn(x, domain, weight, bias, running_mean, running_var, *, training, momentum, eps, singleton, backend)
    DSBN forward (autograd-aware) with backend ``"auto" | "torch" | "triton"``.
dsbn_reference(...)
    The vectorized pure-torch implementation (the ``"torch"`` backend).
MIN_ROWS_FOR_BATCH_STATS
    The batch-statistics threshold (2): a domain with fewer rows in a training batch updates no running statistics.
SINGLETON_RULES
    What training does with a domain's lone row: ``"passthrough"`` (the reference package's rule, the default:
    the row passes unchanged, its gradient straight to the input) or ``"running"`` (normalized with the domain's
    running statistics).
triton_available() -> bool
    Whether the Triton kernels can run in this process (CUDA, or CPU with ``TRITON_INTERPRET=1``).
resolve_backend(backend, device) -> "torch" | "triton"
    The backend a call on ``device`` uses.

Triton is never imported by ``import scalex_scale.kernels``; it is probed on the first backend question and the
kernels are imported only when the Triton backend runs. See ``reference.py`` for the singleton / empty-domain
rules, and ``dsbn_triton.py`` for the kernel design.
"""

from __future__ import annotations

import torch

from .backend import INSTALL_HINT, Backend, resolve_backend, triton_available
from .reference import MIN_ROWS_FOR_BATCH_STATS, dsbn_loop_reference, dsbn_reference
from .validation import SINGLETON_RULES, Singleton, check_dsbn_inputs

__all__ = [
    "INSTALL_HINT",
    "MIN_ROWS_FOR_BATCH_STATS",
    "SINGLETON_RULES",
    "Backend",
    "Singleton",
    "dsbn",
    "dsbn_loop_reference",
    "dsbn_reference",
    "resolve_backend",
    "triton_available",
]


def dsbn(
    x: torch.Tensor,
    domain: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    singleton: Singleton = "passthrough",
    backend: str = "auto",
) -> torch.Tensor:
    """Domain-specific batch normalization.

    Parameters
    ----------
    x
        ``(B, F)`` input.
    domain
        ``(B,)`` int64 (or int32) domain ids in ``[0, D)``, any order.
    weight, bias
        ``(D, F)`` per-domain affine parameters.
    running_mean, running_var
        ``(D, F)`` per-domain running statistics, updated in place when ``training``.
    training
        Mini-batch statistics (True) or running statistics (False).
    momentum
        ``new = (1 - momentum) * old + momentum * batch_stat`` (unbiased variance for ``running_var``).
    eps
        Variance epsilon.
    singleton
        What training does with a domain's lone row: ``"passthrough"`` (unchanged, as the reference package) or
        ``"running"`` (normalized with the domain's running statistics). Eval ignores it.
    backend
        ``"auto"`` (Triton on CUDA when available, else torch; logged once), ``"torch"`` or ``"triton"``
        (RuntimeError with the install hint ``pip install 'scalex-scale[gpu]'`` when it cannot run).

    Returns
    -------
    torch.Tensor
        ``(B, F)`` in ``x.dtype``.

    Notes
    -----
    Training: a domain with >= ``MIN_ROWS_FOR_BATCH_STATS`` (2) rows uses its mini-batch mean and biased variance
    and updates its running statistics. SINGLETON RULE: a domain with exactly one row updates no running statistics;
    its row passes through unchanged (``"passthrough"``; no gradient to its weight/bias) or is normalized with the
    running statistics, then its weight/bias (``"running"``). Absent domains keep their running statistics.
    Eval: running statistics for every row.
    """
    check_dsbn_inputs(x, domain, weight, bias, running_mean, running_var, momentum, eps, singleton)
    if resolve_backend(backend, x.device) == "triton":
        from .dsbn_launch import dsbn_triton

        return dsbn_triton(
            x, domain, weight, bias, running_mean, running_var, training=training, momentum=momentum, eps=eps,
            singleton=singleton,
        )
    return dsbn_reference(
        x, domain, weight, bias, running_mean, running_var, training=training, momentum=momentum, eps=eps,
        singleton=singleton,
    )
