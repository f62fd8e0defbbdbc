"""Domain-Specific Batch Normalization as a thin ``nn.Module`` over :func:`scalex_scale.kernels.dsbn`."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from scalex_scale.kernels import Singleton, dsbn, resolve_backend
from scalex_scale.kernels.validation import check_singleton
from scalex_scale.nn.sync_dsbn import sync_dsbn, sync_world_size

Backend = Literal["auto", "torch", "triton"]


class DSBN(nn.Module):
    """One batch normalization per domain (batch), with per-domain statistics and affine parameters.

    The computation lives in :func:`scalex_scale.kernels.dsbn` (every backend, and
    :func:`~scalex_scale.nn.sync_dsbn.sync_dsbn`, applies the *singleton rule* itself); this module owns the
    parameters and buffers and chooses the rule (``singleton``): what a training mini-batch does with a domain
    that has exactly one row in it, whose variance the batch cannot give.

    Parameters
    ----------
    singleton
        ``"passthrough"`` (default; the reference package's rule): the row leaves the layer as it came,
        unnormalized and without the domain's affine, its gradient flows straight to the input, and the
        domain's parameters and running statistics are not touched by it. ``"running"`` (the rule of
        scalex-scale before 2026-12-02): the row is normalized with the domain's running statistics and
        affine, gradient ``weight * invstd * dy`` (running statistics not updated). Measured on real data
        with many small domains (OneK1K, 30 donors, 64-cell batches: ~12% of the training rows are such
        singletons), ``"running"`` made the epoch loss rise after epoch 2 (KL 5 -> 280) so that early stopping
        kept the epoch-2 weights, query kNN ARI 0.60; ``"passthrough"`` trains smoothly (loss 790 -> 531 in
        3,000 iterations, ARI 0.96; seed 0, ``bench/annotation_real.py`` split ``onek1k_a``). With few
        domains a singleton is rare and the rules give bit-identical training when none occurs. Eval mode
        uses the running statistics for every row under both rules.

    n_features
        Number of features ``F``.
    n_domains
        Number of domains ``D``.
    momentum
        Running-statistics momentum, as in :class:`torch.nn.BatchNorm1d`
        (``new = (1 - momentum) * old + momentum * batch``).
    eps
        Variance epsilon.
    backend
        Kernel backend passed to :func:`scalex_scale.kernels.dsbn` (``"auto" | "torch" | "triton"``).
    sync
        Data-parallel training only (default False). When True and a ``torch.distributed`` process
        group of more than one rank is initialized, training-mode calls use
        :func:`scalex_scale.nn.sync_dsbn.sync_dsbn`: every domain is normalized with the statistics
        of the GLOBAL mini-batch (all ranks' rows; the singleton rule applies to the global count),
        and running statistics are updated identically on all ranks. Costs one all-reduce of
        ``D * (2F + 1)`` floats in forward and one of ``2 * D * F`` in backward per step, not
        overlapped with compute, and uses the pure-torch path (no fused Triton kernel). Worth it
        when per-rank batches are small for the number of domains (noisy local statistics, many
        local singletons); with False each rank normalizes with its own rows' statistics (what plain
        DDP does with BatchNorm). Eval mode, a single process, or no process group: no effect.
        Not saved in checkpoints (a runtime option); see also
        :func:`convert_sync_dsbn`.
    process_group
        The group ``sync`` synchronizes over (None: the default world group).

    Attributes
    ----------
    weight, bias
        (D, F) affine parameters, initialized to ones and zeros.
    running_mean, running_var
        (D, F) buffers, initialized to zeros and ones; updated in place in training mode.
    """

    def __init__(
        self,
        n_features: int,
        n_domains: int,
        *,
        momentum: float = 0.1,
        eps: float = 1e-5,
        backend: Backend = "auto",
        sync: bool = False,
        process_group: Any = None,
        singleton: Singleton = "passthrough",
    ) -> None:
        super().__init__()
        check_singleton(singleton)
        if n_features < 1 or n_domains < 1:
            raise ValueError(
                f"DSBN needs n_features >= 1 and n_domains >= 1, got {n_features} and {n_domains}"
            )
        self.n_features = int(n_features)
        self.n_domains = int(n_domains)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.backend: Backend = backend
        self.sync = bool(sync)
        self.process_group = process_group
        self.singleton: Singleton = singleton
        self.weight = nn.Parameter(torch.ones(n_domains, n_features))
        self.bias = nn.Parameter(torch.zeros(n_domains, n_features))
        self.register_buffer("running_mean", torch.zeros(n_domains, n_features))
        self.register_buffer("running_var", torch.ones(n_domains, n_features))

    def reset_parameters(self) -> None:
        """Reset the affine parameters and the running statistics to their initial values."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def resolved_backend(self, device: torch.device | str) -> str:
        """The kernel backend (``"torch"`` or ``"triton"``) this layer uses for tensors on ``device``.

        Raises ``RuntimeError`` when ``backend="triton"`` cannot run there. Calling it once before
        ``torch.compile`` also keeps the kernels' one-time backend log out of the compiled graph.
        """
        return resolve_backend(self.backend, torch.device(device))

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` (N, F) row-wise by the domain of each row, ``domain`` (N,) int64 codes."""
        if self.sync and self.training and sync_world_size(self.process_group) > 1:
            return sync_dsbn(
                x,
                domain,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                training=True,
                momentum=self.momentum,
                eps=self.eps,
                process_group=self.process_group,
                singleton=self.singleton,
            )
        return dsbn(
            x,
            domain,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            singleton=self.singleton,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"n_features={self.n_features}, n_domains={self.n_domains}, momentum={self.momentum}, "
            f"eps={self.eps}, backend={self.backend!r}, singleton={self.singleton!r}" + (", sync=True" if self.sync else "")
        )


def convert_sync_dsbn(module: torch.nn.Module, process_group: Any = None, *, sync: bool = True) -> torch.nn.Module:
    """Switch every :class:`~scalex_scale.nn.DSBN` layer of ``module`` to synchronized statistics.

    The analogue of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` for DSBN, but in place:
    parameters, buffers and state-dict keys are unchanged (checkpoints do not record the option).

    Parameters
    ----------
    module
        Any module (e.g. a :class:`~scalex_scale.nn.SCALEXModule`).
    process_group
        Group to synchronize over (None: the world).
    sync
        False switches synchronization off again.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.
    """
    for layer in module.modules():
        if isinstance(layer, DSBN):
            layer.sync = bool(sync)
            layer.process_group = process_group
    return module
