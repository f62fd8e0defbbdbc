"""Pure-torch Domain-Specific BatchNorm (DSBN): the vectorized reference and the original SCALEX loop.

``dsbn_reference`` is the torch backend of :func:`scalex_scale.kernels.dsbn` and the oracle the Triton kernels are
tested against. It is vectorized over domains (per-domain sums as a one-hot matrix product when there are few
domains, ``index_add`` otherwise; per-row gathers by ``index_select``), does no host synchronisation and has no
data-dependent shapes, so it runs under ``torch.compile(fullgraph=True)`` and CUDA-graph capture. Statistics are computed without autograd and the
normalize + affine step is a small ``torch.autograd.Function`` with the analytic batch-norm backward (about half
the full-size ops of differentiating through the statistics; first-order gradients only, double backward raises).
It is validated independently of the Triton kernels: against ``torch.nn.functional.batch_norm`` (D = 1), the
original loop (domains with >= 2 rows) and ``torch.autograd.gradcheck``.

``dsbn_loop_reference`` reproduces the ORIGINAL SCALEX 1.0.4 ``DSBatchNorm.forward`` (a Python loop over domains
with ``np.where`` on host copies of the ids), for benchmarks and side-by-side checks only.

Rules (both training and eval, ``dsbn_reference`` and the Triton kernels alike)
-----------------------------------------------------------------------------
- Training, a domain with ``n >= MIN_ROWS_FOR_BATCH_STATS`` (2) rows in the mini-batch: its rows are normalized with that domain's mini-batch
  mean and biased variance, then scaled and shifted by ``weight[d]``, ``bias[d]``; its running statistics are
  updated in place, ``new = (1 - momentum) * old + momentum * batch_stat``, with the UNBIASED variance for
  ``running_var`` (as ``torch.nn.BatchNorm1d``).
- Training, SINGLETON RULE (``singleton``): a domain with exactly one row does not update its running statistics,
  and its row is
  - ``"passthrough"`` (default; the reference package's rule): passed through unchanged (``y = x``: no
    normalization, no ``weight[d]``/``bias[d]``), its gradient straight to the input (``dx = dy``), none to
    ``weight[d]``/``bias[d]``;
  - ``"running"``: normalized with that domain's running statistics (then ``weight[d]``, ``bias[d]``); gradients
    flow as in eval mode for that row (``dx = weight * dy / sqrt(running_var + eps)``).
  (A domain with ``2 <= n < MIN_ROWS_FOR_BATCH_STATS`` rows, possible only when the threshold is raised, takes
  the running statistics under either rule.)
- Training, a domain absent from the mini-batch: its running statistics are unchanged (and its weight/bias get
  zero gradient).
- Eval (``training=False``): every row uses its domain's running statistics; nothing is updated.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .validation import Singleton, check_dsbn_inputs

__all__ = ["MIN_ROWS_FOR_BATCH_STATS", "dsbn_reference", "dsbn_loop_reference"]

#: The SINGLETON RULE's threshold, the one definition shared by the torch reference, both Triton kernels (the
#: segmented and the row-split ones, as a ``tl.constexpr`` argument) and SyncDSBN: in training, a domain with at
#: least this many rows in the mini-batch (all ranks together, for SyncDSBN) is normalized with its batch mean and
#: biased variance and updates its running statistics; a domain with fewer rows (one: a variance of one row is 0)
#: leaves them unchanged and is normalized with them, except a lone row under the ``"passthrough"`` rule, which
#: passes through unchanged.
MIN_ROWS_FOR_BATCH_STATS: int = 2


# Up to this many domains, per-domain sums are one-hot matrix products (D x B x F multiply-adds, done by BLAS): on
# a CPU that is ~3x faster than ``index_add_``'s scatter at B = 64, D = 4. Beyond it (atlases with one domain per
# donor) the O(B x F) scatter wins. Gathers are always ``index_select`` (faster than the one-hot product).
ONE_HOT_MAX_DOMAINS = 64


class _Segments:
    """Per-domain sums ``(D, F) <- (B, F)`` and per-row gathers ``(B, F) <- (D, F)`` for one domain vector.

    The one-hot matrix is built by comparison (not ``F.one_hot``, whose range check syncs with the host on CUDA).
    """

    def __init__(self, dom: torch.Tensor, n_domains: int, dtype: torch.dtype) -> None:
        self.dom = dom
        self.n_domains = n_domains
        self.one_hot = (
            (dom[:, None] == torch.arange(n_domains, device=dom.device)).to(dtype)
            if n_domains <= ONE_HOT_MAX_DOMAINS
            else None
        )  # (B, D)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.one_hot is not None:
            return self.one_hot.t().mm(values)
        return values.new_zeros(self.n_domains, values.shape[1]).index_add_(0, self.dom, values)

    def gather(self, table: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, self.dom)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _domain_moments(
    xc: torch.Tensor, seg: _Segments
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-domain row counts ``(D,)``, means ``(D, F)`` and sums of squared deviations ``(D, F)``.

    Two-pass (mean first, then centred squares) for accuracy. Empty domains get count 0, mean 0, sum 0.
    """
    counts = xc.new_zeros(seg.n_domains).index_add_(0, seg.dom, xc.new_ones(seg.dom.shape[0]))
    mean = seg.sum(xc) / counts.clamp_min(1.0)[:, None]
    centred = xc - seg.gather(mean)
    sq = seg.sum(centred.square())
    return counts, mean, sq


def _update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    use_batch: torch.Tensor,
    batch_mean: torch.Tensor,
    var_unbiased: torch.Tensor,
    momentum: float,
) -> None:
    """In-place momentum update of the rows of domains with >= 2 rows (``use_batch``, ``(D, 1)`` bool)."""
    rm = running_mean.to(batch_mean.dtype)
    rv = running_var.to(batch_mean.dtype)
    new_rm = torch.where(use_batch, (1.0 - momentum) * rm + momentum * batch_mean, rm)
    new_rv = torch.where(use_batch, (1.0 - momentum) * rv + momentum * var_unbiased, rv)
    running_mean.copy_(new_rm)
    running_var.copy_(new_rv)


def _batch_statistics(
    xc: torch.Tensor,
    seg: _Segments,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training statistics: (mean, var) each domain uses, ``use_batch`` (D, 1) and counts (D,); updates running.

    Domains with >= ``MIN_ROWS_FOR_BATCH_STATS`` rows use their batch mean / biased variance; singletons and absent
    domains the running ones.
    """
    rm = running_mean.to(xc.dtype)
    rv = running_var.to(xc.dtype)
    counts, batch_mean, sq = _domain_moments(xc, seg)
    use_batch = (counts >= MIN_ROWS_FOR_BATCH_STATS)[:, None]
    mean = torch.where(use_batch, batch_mean, rm)
    var = torch.where(use_batch, sq / counts.clamp_min(1.0)[:, None], rv)
    var_unbiased = sq / (counts - 1.0).clamp_min(1.0)[:, None]
    _update_running(running_mean, running_var, use_batch, batch_mean, var_unbiased, momentum)
    return mean, var, use_batch, counts


class _DomainNormAffine(torch.autograd.Function):
    """``y = (x - mean[d]) * invstd[d] * weight[d] + bias[d]`` with the analytic (batch-norm) backward.

    ``mean``/``invstd`` are constants for autograd; where ``use_batch[d]`` they are domain ``d``'s mini-batch
    statistics and the backward adds their dependence on x (standard BN backward over the domain's rows):
    ``dx = w * invstd * (dy - mean_d(dy) - xhat * mean_d(dy * xhat))``; elsewhere (running statistics)
    ``dx = w * invstd * dy``. ``dweight[d] = sum_d(dy * xhat)``, ``dbias[d] = sum_d(dy)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        seg: _Segments,
        weight: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        use_batch: torch.Tensor,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        # One gather of the four (D, F) tables instead of four.
        n_features = x.shape[1]
        rows = seg.gather(torch.cat([invstd, -mean * invstd, weight, bias], dim=1))
        scale, shift, w, b = rows.split(n_features, dim=1)
        xhat = torch.addcmul(shift, x, scale)
        ctx.seg = seg
        ctx.save_for_backward(xhat, weight, invstd, use_batch, counts)
        return torch.addcmul(b, xhat, w)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        with _no_autocast(dy.device):  # per-domain sums are one-hot matmuls: keep them float32
            return _DomainNormAffine._backward(ctx, dy)

    @staticmethod
    def _backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, weight, invstd, use_batch, counts = ctx.saved_tensors
        seg: _Segments = ctx.seg
        n_features = dy.shape[1]
        sums = seg.sum(torch.cat([dy, dy * xhat], dim=1))
        dbias, dweight = sums.split(n_features, dim=1)
        dx = None
        if ctx.needs_input_grad[0]:
            n = counts.clamp_min(1.0)[:, None]
            c_dy = torch.where(use_batch, dbias / n, 0.0)
            c_dyx = torch.where(use_batch, dweight / n, 0.0)
            rows = seg.gather(torch.cat([c_dy, c_dyx, weight * invstd], dim=1))
            r_dy, r_dyx, r_scale = rows.split(n_features, dim=1)
            dx = (dy - torch.addcmul(r_dy, xhat, r_dyx)) * r_scale
        return dx, None, dweight, dbias, None, None, None, None


def _no_autocast(device: torch.device) -> torch.autocast:
    """Autocast off for ``device``'s type: under bf16 autocast the one-hot ``mm`` of the per-domain
    sums would otherwise run in bfloat16 (3 significant digits: statistics of 1e3 rows off by ~1%)."""
    return torch.autocast(device_type=device.type, enabled=False)


def dsbn_reference(
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
) -> torch.Tensor:
    """Domain-specific batch normalization, vectorized over domains, in pure torch.

    Parameters
    ----------
    x
        ``(B, F)`` input (float32, float16, bfloat16 or float64).
    domain
        ``(B,)`` int64 (or int32) domain id of each row, in ``[0, D)``; need not be sorted.
    weight, bias
        ``(D, F)`` per-domain affine parameters (gamma, beta).
    running_mean, running_var
        ``(D, F)`` per-domain running statistics, updated IN PLACE in training mode.
    training
        Use mini-batch statistics (and update the running ones) if True, else the running statistics.
    momentum
        Running-statistics momentum, as ``torch.nn.BatchNorm1d`` (``new = (1 - m) * old + m * batch``).
    eps
        Added to the variance before the inverse square root.
    singleton
        What training does with a domain's lone row: ``"passthrough"`` (unchanged) or ``"running"`` (normalized
        with the running statistics); see the module docstring.

    Returns
    -------
    torch.Tensor
        ``(B, F)`` output in ``x.dtype``. Statistics are computed in float32 (float64 for float64 input).

    Raises
    ------
    ValueError
        Bad shapes, dtypes or devices (see :func:`scalex_scale.kernels.validation.check_dsbn_inputs`).

    Notes
    -----
    Training mode: a domain with >= 2 rows uses its mini-batch mean and biased variance and its running stats are
    updated with the unbiased variance. SINGLETON RULE: a domain with exactly one row in the mini-batch does not
    update its running statistics; its row passes through unchanged (``"passthrough"``) or is normalized with the
    domain's running statistics (``"running"``). Domains absent from the mini-batch keep their running statistics. Eval mode: every row uses
    its domain's running statistics. With ``D = 1`` and ``B >= 2`` this equals ``torch.nn.functional.batch_norm``.

    No host synchronisation, no Python loop over domains, no data-dependent shapes; autograd-correct.
    Under autocast (e.g. bf16) everything here still runs in the compute dtype: autocast is switched
    off inside, forward and backward.
    """
    check_dsbn_inputs(x, domain, weight, bias, running_mean, running_var, momentum, eps, singleton)
    with _no_autocast(x.device):
        return _dsbn_reference(x, domain, weight, bias, running_mean, running_var, training, momentum, eps,
                               training and singleton == "passthrough")


def _dsbn_reference(
    x: torch.Tensor,
    domain: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
    passthrough: bool,
) -> torch.Tensor:
    cdt = _compute_dtype(x)
    xc = x.to(cdt)
    dom = domain.long()
    n_domains = weight.shape[0]
    seg = _Segments(dom, n_domains, cdt)
    with torch.no_grad():
        if training:
            mean, var, use_batch, counts = _batch_statistics(xc, seg, running_mean, running_var, momentum)
        else:
            mean, var = running_mean.to(cdt), running_var.to(cdt)
            use_batch = torch.zeros(n_domains, 1, dtype=torch.bool, device=x.device)
            counts = xc.new_zeros(n_domains)
        invstd = torch.rsqrt(var + eps)
    w, b = weight.to(cdt), bias.to(cdt)
    if passthrough:
        # a lone row: mean 0, invstd 1, weight 1, bias 0, so y = x and dx = dy exactly; torch.where gives the
        # domain's weight and bias no gradient
        lone = (counts == 1.0)[:, None]
        mean, invstd = torch.where(lone, 0.0, mean), torch.where(lone, 1.0, invstd)
        w, b = torch.where(lone, 1.0, w), torch.where(lone, 0.0, b)
    y = _DomainNormAffine.apply(xc, seg, w, b, mean, invstd, use_batch, counts)
    return y.to(x.dtype)


def dsbn_loop_reference(
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
) -> torch.Tensor:
    """The ORIGINAL SCALEX 1.0.4 DSBN, kept for benchmarks and comparisons only (do not use in models).

    Mirrors ``scalex.net.layer.DSBatchNorm.forward``: a Python loop over all ``D`` domains, each doing
    ``np.where(y.cpu().numpy() == i)`` (a host synchronisation per domain), then a per-domain BatchNorm1d
    (here ``F.batch_norm`` on row ``i`` of the ``(D, F)`` parameters, whose running-stat rows are views updated in
    place) when the domain has > 1 row. A domain with exactly one row is passed through UNNORMALIZED, without
    weight/bias (the original behaviour, ``dsbn_reference``'s default ``singleton="passthrough"``). Output starts
    from zeros like the original.

    Parameters
    ----------
    x, domain, weight, bias, running_mean, running_var, training, momentum, eps
        As :func:`dsbn_reference`.

    Returns
    -------
    torch.Tensor
        ``(B, F)`` output in ``x.dtype``.
    """
    out = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    for i in range(weight.shape[0]):
        indices = torch.from_numpy(np.where(domain.cpu().numpy() == i)[0]).to(x.device)
        if len(indices) > 1:
            out[indices] = F.batch_norm(
                x[indices], running_mean[i], running_var[i], weight[i], bias[i], training, momentum, eps
            ).to(x.dtype)
        elif len(indices) == 1:
            out[indices] = x[indices]
    return out
