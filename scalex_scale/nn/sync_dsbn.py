"""Per-domain *synchronized* DSBN: domain statistics of the global (all-ranks) mini-batch.

With data parallelism each rank holds ``B`` rows of a global mini-batch of ``W * B`` rows. Plain DSBN
normalizes every domain with the statistics of this rank's rows only; with many domains and small
per-rank batches a domain may have 2 or 3 rows on a rank (noisy statistics) or one (the singleton
rule applies). :func:`sync_dsbn` instead gives every rank the result
one process would compute on the concatenated global mini-batch, like :class:`torch.nn.SyncBatchNorm`
but per domain:

Forward (one collective)
    Each rank computes, for every domain ``d``, its row count and the sums of ``x - K[d]`` and of
    ``(x - K[d])**2`` over its rows (vectorised ``index_add_``, no host sync), with the shift
    ``K = running_mean`` (identical on every rank; shifting by a value near the mean keeps
    ``E[(x-K)^2] - E[x-K]^2`` accurate in float32). The ``(D, 2F + 1)`` tensor
    ``[count | sum | sum of squares]`` is summed over ranks by ONE ``all_reduce``. Each domain with a
    global count ``>= MIN_ROWS_FOR_BATCH_STATS`` (2) is normalized with its global mini-batch mean and biased variance and its
    running statistics are updated with the unbiased variance ``var * n / (n - 1)`` of the global
    count ``n``: the same values on every rank. SINGLETON RULE on the GLOBAL count (the kernels' rules):
    a domain with exactly one row across all ranks does not update its running statistics, and that
    row passes through unchanged (``"passthrough"``, the default; no gradient to the domain's weight
    and bias) or is normalized with the running statistics (``"running"``); a domain absent from every
    rank keeps its running statistics. A domain present on one rank only is normal: the other ranks
    contribute zeros.

Backward (one collective)
    The per-domain sums of ``dy`` and ``dy * xhat`` over this rank's rows are summed over ranks by
    ONE ``all_reduce`` of a ``(2, D, F)`` tensor and ``dx = w * invstd * (dy - sum(dy) / n -
    xhat * sum(dy * xhat) / n)`` uses those global sums and the global count. ``weight``/``bias``
    receive this rank's own contribution (``sum(dy * xhat)``, ``sum(dy)`` over its rows), exactly as
    in :class:`torch.nn.SyncBatchNorm`: :class:`~torch.nn.parallel.DistributedDataParallel`'s
    gradient averaging then yields, for every parameter, the gradient one process would get on the
    concatenated mini-batch with the mean loss. (Equivalently: with the *sum* of the per-rank losses,
    ``x.grad`` on each rank equals the rows of the single-process ``x.grad`` and the rank sum of
    ``weight.grad`` equals the single-process ``weight.grad``.)

Costs and trade-offs
    Two extra all-reduces per training step (forward and backward) of ``D * (2F + 1)`` and ``2 * D * F``
    floats (D = domains, F = features; 2,000 features and 100 domains: 1.6 MB each), which cannot
    overlap with compute because the normalization (and ``dx``) waits for them; the fused Triton DSBN
    kernel is not used on this path (pure torch). Worth it when per-rank batches are small relative to
    the number of domains (local statistics noisy, many local singletons); unnecessary when each rank
    already sees many rows of every domain. Eval mode uses running statistics and never communicates.

Without an initialized process group (or with a group of one rank) :func:`sync_dsbn` performs no
collective and equals :func:`scalex_scale.kernels.dsbn_reference` up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from scalex_scale.kernels import MIN_ROWS_FOR_BATCH_STATS, dsbn
from scalex_scale.kernels.validation import check_dsbn_inputs

__all__ = ["sync_dsbn", "sync_world_size"]


def sync_world_size(process_group: Any = None) -> int:
    """Ranks in ``process_group`` (default: the world), or 1 without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(process_group))


def _all_reduce_sum(t: torch.Tensor, process_group: Any) -> torch.Tensor:
    """In-place sum of ``t`` over the ranks of ``process_group`` (nothing without one); returns ``t``."""
    if sync_world_size(process_group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    return t


class _SyncDSBNFunction(torch.autograd.Function):
    """Global per-domain statistics (one all-reduce), normalize + affine, running-stat update; the
    backward all-reduces the per-domain sums of ``dy`` and ``dy * xhat`` (one all-reduce)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        dom: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        momentum: float,
        eps: float,
        process_group: Any,
        passthrough: bool,
    ) -> torch.Tensor:
        n_domains, n_features = weight.shape
        shift = running_mean.to(x.dtype)
        rv = running_var.to(x.dtype)
        xs = x - shift.index_select(0, dom)
        # [count | sum(x - K) | sum((x - K)^2)] per domain, summed over ranks in one collective.
        stats = torch.cat(
            [
                x.new_zeros(n_domains, 1).index_add_(0, dom, x.new_ones(dom.shape[0], 1)),
                x.new_zeros(n_domains, n_features).index_add_(0, dom, xs),
                x.new_zeros(n_domains, n_features).index_add_(0, dom, xs.square()),
            ],
            dim=1,
        )
        _all_reduce_sum(stats, process_group)

        counts = stats[:, 0]
        n = counts.clamp_min(1.0)[:, None]
        mean_s = stats[:, 1 : 1 + n_features] / n
        var_b = (stats[:, 1 + n_features :] / n - mean_s.square()).clamp_min(0.0)
        batch_mean = shift + mean_s
        use_batch = (counts >= MIN_ROWS_FOR_BATCH_STATS)[:, None]
        mean = torch.where(use_batch, batch_mean, shift)
        var = torch.where(use_batch, var_b, rv)
        invstd = torch.rsqrt(var + eps)

        # Running statistics: identical inputs on every rank, hence identical results.
        var_unbiased = var_b * (counts / (counts - 1.0).clamp_min(1.0))[:, None]
        new_rm = torch.where(use_batch, (1.0 - momentum) * shift + momentum * batch_mean, shift)
        new_rv = torch.where(use_batch, (1.0 - momentum) * rv + momentum * var_unbiased, rv)
        running_mean.copy_(new_rm)
        running_var.copy_(new_rv)

        # passthrough: a domain's lone row (global count 1) gets mean 0, invstd 1, weight 1, bias 0: y = x
        lone = ((counts == 1.0) & passthrough)[:, None]
        mean, invstd = torch.where(lone, 0.0, mean), torch.where(lone, 1.0, invstd)
        w, b = torch.where(lone, 1.0, weight), torch.where(lone, 0.0, bias)
        xhat = (x - mean.index_select(0, dom)) * invstd.index_select(0, dom)
        ctx.save_for_backward(xhat, dom, w, invstd, use_batch, counts, lone)
        ctx.process_group = process_group
        return torch.addcmul(b.index_select(0, dom), xhat, w.index_select(0, dom))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xhat, dom, weight, invstd, use_batch, counts, lone = ctx.saved_tensors  # weight: 1 where lone
        sums = dy.new_zeros(2, *weight.shape)
        sums[0].index_add_(0, dom, dy)  # this rank's dbias
        sums[1].index_add_(0, dom, dy * xhat)  # this rank's dweight
        dbias, dweight = torch.where(lone, 0.0, sums[0]), torch.where(lone, 0.0, sums[1])
        dx = None
        if ctx.needs_input_grad[0]:  # the same on every rank (the same graph runs everywhere)
            _all_reduce_sum(sums, ctx.process_group)
            n = counts.clamp_min(1.0)[:, None]
            c_dy = torch.where(use_batch, sums[0] / n, 0.0).index_select(0, dom)
            c_dyx = torch.where(use_batch, sums[1] / n, 0.0).index_select(0, dom)
            dx = (dy - torch.addcmul(c_dy, xhat, c_dyx)) * (weight * invstd).index_select(0, dom)
        return dx, None, dweight, dbias, None, None, None, None, None, None


def sync_dsbn(
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
    process_group: Any = None,
    singleton: str = "passthrough",
    backend: str = "auto",
) -> torch.Tensor:
    """DSBN with per-domain statistics of the global mini-batch across the ranks of ``process_group``.

    Parameters
    ----------
    x, domain, weight, bias, running_mean, running_var, momentum, eps
        As :func:`scalex_scale.kernels.dsbn` (``x`` is this rank's ``(B, F)`` rows; the running
        statistics must be identical on every rank, which this function preserves).
    training
        Global mini-batch statistics (True; two collectives per step, see the module docstring) or
        running statistics (False; local, no communication).
    process_group
        The ``torch.distributed`` group to synchronize over; None is the default (world) group.
        Without an initialized process group no collective is issued.
    singleton
        ``"passthrough"`` or ``"running"``: what a domain's lone row of the GLOBAL mini-batch gets (the
        kernels' rules).
    backend
        Kernel backend of the eval path (:func:`scalex_scale.kernels.dsbn`); the training path is
        always pure torch.

    Returns
    -------
    torch.Tensor
        ``(B, F)`` in ``x.dtype`` (statistics in float32, float64 for float64 input).

    Notes
    -----
    Every rank of the group must call this the same number of times, in the same order (true for
    data-parallel training of the same model), also in backward. Ranks may hold different numbers of
    rows (including zero).
    """
    if not training:
        return dsbn(
            x, domain, weight, bias, running_mean, running_var,
            training=False, momentum=momentum, eps=eps, singleton=singleton, backend=backend,
        )
    check_dsbn_inputs(x, domain, weight, bias, running_mean, running_var, momentum, eps, singleton)
    cdt = torch.promote_types(x.dtype, torch.float32)
    y = _SyncDSBNFunction.apply(
        x.to(cdt), domain.long(), weight.to(cdt), bias.to(cdt), running_mean, running_var,
        float(momentum), float(eps), process_group, singleton == "passthrough",
    )
    return y.to(x.dtype)
