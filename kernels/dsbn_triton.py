"""Triton kernels for Domain-Specific BatchNorm (DSBN): training forward, backward, eval forward.

Only ``@triton.jit`` functions live here; launchers and the autograd Function are in ``dsbn_launch.py``. This module
imports triton at import time and is itself imported lazily (never by ``import scalex_scale.kernels``).

Design: segmented reductions over domain-sorted rows
----------------------------------------------------
The host sorts the row indices by domain once per call (``torch.sort(domain, stable=True)``, on device) and builds
per-domain ``starts``/``counts`` (``index_add`` + ``cumsum``; no host synchronisation). Each program then owns ONE
(domain, feature block) pair: it walks only that domain's rows (gathered through the permutation, ``BLOCK_B`` rows
at a time), so per-domain accumulators are just ``BLOCK_B x BLOCK_F`` registers whatever ``D`` is, and every output
element ((D, F) statistics, running stats, dweight, dbias, and each row of y/dx) is written by exactly one program:
no atomics, no (D, F) workspace, deterministic results, and in-place running-stat updates are race-free.
Correct for any D (programs of empty domains exit after a few masked loads); the grid is ``(D, cdiv(F, BLOCK_F))``.
For small D (2..16) the launcher narrows BLOCK_F so the grid still fills the GPU; each program then loops over
its domain's ``n_d`` rows (``n_d / BLOCK_B`` iterations), twice (statistics, then normalize) in the forward and
twice (reductions, then dx) in the backward; the second pass mostly hits L2. When even that leaves the GPU
under-filled with long serial loops (few domains, many rows each: D = 1-2 at B = 4,096), the launcher uses the
row-split variants at the end of this file (a third grid axis of row chunks, partial sums in a workspace).

Numerics: statistics in float32 whatever the input dtype. The variance uses sums shifted by the domain's first
row (``sum(x - k)``, ``sum((x - k)^2)``), which avoids the catastrophic cancellation of the raw sum-of-squares form
when |mean| >> std.

Rules (same as ``dsbn_reference``): a domain with >= ``MIN_ROWS`` rows (the launcher passes
``reference.MIN_ROWS_FOR_BATCH_STATS``, 2, as a ``tl.constexpr``) uses batch statistics and updates its running
stats (unbiased variance); a domain with exactly one row (SINGLETON RULE) is not updated and its row either passes
through unchanged (``PASS``, the ``"passthrough"`` rule: mean 0, invstd 1, weight 1, bias 0 for that domain, so
``y = x`` and ``dx = dy`` exactly, and its dweight/dbias are 0) or is normalized with its running statistics
(``"running"``); an empty domain is untouched. Eval: every row uses running statistics.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "INTERPRETED", "dsbn_bwd_kernel", "dsbn_eval_fwd_kernel", "dsbn_split_bwd_kernel", "dsbn_split_bwd_sums_kernel",
    "dsbn_split_fwd_kernel", "dsbn_split_stats_kernel", "dsbn_train_fwd_kernel",
]  # fmt: skip

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


@triton.jit
def _passthrough(n_vec, mean, invstd, w, b):
    """The ``"passthrough"`` singleton rule: a domain with one row gets mean 0, invstd 1, weight 1, bias 0."""
    lone = n_vec == 1
    return tl.where(lone, 0.0, mean), tl.where(lone, 1.0, invstd), tl.where(lone, 1.0, w), tl.where(lone, 0.0, b)


@triton.jit
def dsbn_train_fwd_kernel(
    X, Y, PERM, STARTS, COUNTS, W, B, RM, RV, MEAN_OUT, INVSTD_OUT,
    n_rows, n_features, stride_x, stride_y, momentum, eps,
    MIN_ROWS: tl.constexpr, PASS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Training forward for one (domain, feature block): statistics, running-stat update, normalize + affine."""
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    start = tl.load(STARTS + pid_d)
    n = tl.load(COUNTS + pid_d)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < n_features
    n_vec = offs_f * 0 + n  # n broadcast to the feature block (vector masks work in the interpreter too)
    param = pid_d * n_features + offs_f
    seg = PERM + start
    # shift k = the segment's first row (clamped so that an empty last domain still reads in bounds)
    first = tl.load(PERM + tl.minimum(start, n_rows - 1))
    k = tl.load(X + first * stride_x + offs_f, mask=mask_f & (n_vec >= 1), other=0.0).to(tl.float32)
    acc_s = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
    for i in range(0, n, BLOCK_B):
        rows = i + tl.arange(0, BLOCK_B)
        idx = tl.load(seg + rows, mask=rows < n, other=0)
        mask = (rows < n)[:, None] & mask_f[None, :]
        x = tl.load(X + idx[:, None] * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - k[None, :], 0.0)
        acc_s += d
        acc_q += d * d
    nf = tl.maximum(n_vec.to(tl.float32), 1.0)
    s = tl.sum(acc_s, axis=0) / nf
    var_b = tl.maximum(tl.sum(acc_q, axis=0) / nf - s * s, 0.0)
    mean_b = k + s
    use_batch = n_vec >= MIN_ROWS
    rm = tl.load(RM + param, mask=mask_f, other=0.0).to(tl.float32)
    rv = tl.load(RV + param, mask=mask_f, other=1.0).to(tl.float32)
    mean = tl.where(use_batch, mean_b, rm)
    invstd = 1.0 / tl.sqrt(tl.where(use_batch, var_b, rv) + eps)
    var_u = var_b * nf / tl.maximum(nf - 1.0, 1.0)
    upd = mask_f & use_batch
    tl.store(RM + param, ((1.0 - momentum) * rm + momentum * mean_b).to(RM.dtype.element_ty), mask=upd)
    tl.store(RV + param, ((1.0 - momentum) * rv + momentum * var_u).to(RV.dtype.element_ty), mask=upd)
    w = tl.load(W + param, mask=mask_f, other=0.0).to(tl.float32)
    b = tl.load(B + param, mask=mask_f, other=0.0).to(tl.float32)
    if PASS:  # a lone row passes through: y = x
        mean, invstd, w, b = _passthrough(n_vec, mean, invstd, w, b)
    tl.store(MEAN_OUT + param, mean, mask=mask_f)
    tl.store(INVSTD_OUT + param, invstd, mask=mask_f)
    scale = w * invstd
    for i in range(0, n, BLOCK_B):
        rows = i + tl.arange(0, BLOCK_B)
        idx = tl.load(seg + rows, mask=rows < n, other=0)
        mask = (rows < n)[:, None] & mask_f[None, :]
        x = tl.load(X + idx[:, None] * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + b[None, :]
        tl.store(Y + idx[:, None] * stride_y + offs_f[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _passthrough_grad(n_vec, sum_dy, sum_dyx, w):
    """The ``"passthrough"`` rule in backward: a domain with one row gets no dweight/dbias and weight 1 (dx = dy)."""
    lone = n_vec == 1
    return tl.where(lone, 0.0, sum_dy), tl.where(lone, 0.0, sum_dyx), tl.where(lone, 1.0, w)


@triton.jit
def dsbn_bwd_kernel(
    X, DY, DX, DW, DB, PERM, STARTS, COUNTS, W, MEAN, INVSTD,
    n_features, stride_x, stride_dy, stride_dx,
    TRAINING: tl.constexpr, MIN_ROWS: tl.constexpr, PASS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Backward for one (domain, feature block): dweight, dbias, then dx.

    Batch-statistics domains (training, n >= MIN_ROWS): ``dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``.
    Running-statistics rows (eval, or singleton domains in training): ``dx = w * invstd * dy``. Passed-through
    singletons (``PASS``, training only; the forward saved mean 0, invstd 1): ``dx = dy``, dweight = dbias = 0.
    """
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    start = tl.load(STARTS + pid_d)
    n = tl.load(COUNTS + pid_d)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < n_features
    n_vec = offs_f * 0 + n
    param = pid_d * n_features + offs_f
    seg = PERM + start
    mean = tl.load(MEAN + param, mask=mask_f, other=0.0)
    invstd = tl.load(INVSTD + param, mask=mask_f, other=0.0)
    w = tl.load(W + param, mask=mask_f, other=0.0).to(tl.float32)
    acc_dy = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
    for i in range(0, n, BLOCK_B):
        rows = i + tl.arange(0, BLOCK_B)
        idx = tl.load(seg + rows, mask=rows < n, other=0)
        mask = (rows < n)[:, None] & mask_f[None, :]
        x = tl.load(X + idx[:, None] * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + idx[:, None] * stride_dy + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[None, :]) * invstd[None, :], 0.0)
        acc_dy += dy
        acc_dyx += dy * xhat
    sum_dy = tl.sum(acc_dy, axis=0)
    sum_dyx = tl.sum(acc_dyx, axis=0)
    if PASS:
        sum_dy, sum_dyx, w = _passthrough_grad(n_vec, sum_dy, sum_dyx, w)
    tl.store(DW + param, sum_dyx.to(DW.dtype.element_ty), mask=mask_f)
    tl.store(DB + param, sum_dy.to(DB.dtype.element_ty), mask=mask_f)
    nf = tl.maximum(n_vec.to(tl.float32), 1.0)
    if TRAINING:
        use_batch = n_vec >= MIN_ROWS
        c_dy = tl.where(use_batch, sum_dy / nf, 0.0)
        c_dyx = tl.where(use_batch, sum_dyx / nf, 0.0)
    else:
        c_dy = tl.zeros([BLOCK_F], dtype=tl.float32)
        c_dyx = tl.zeros([BLOCK_F], dtype=tl.float32)
    scale = w * invstd
    for i in range(0, n, BLOCK_B):
        rows = i + tl.arange(0, BLOCK_B)
        idx = tl.load(seg + rows, mask=rows < n, other=0)
        mask = (rows < n)[:, None] & mask_f[None, :]
        x = tl.load(X + idx[:, None] * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + idx[:, None] * stride_dy + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = scale[None, :] * (dy - c_dy[None, :] - xhat * c_dyx[None, :])
        tl.store(DX + idx[:, None] * stride_dx + offs_f[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def dsbn_eval_fwd_kernel(
    X, Y, DOMAIN, W, B, RM, RV,
    n_rows, n_features, stride_x, stride_y, eps,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Eval forward for one (row block, feature block): ``(x - rm[d]) / sqrt(rv[d] + eps) * w[d] + b[d]``."""
    pid_b = tl.program_id(0)
    pid_f = tl.program_id(1)
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_r = rows < n_rows
    mask = mask_r[:, None] & (offs_f < n_features)[None, :]
    dom = tl.load(DOMAIN + rows, mask=mask_r, other=0).to(tl.int64)
    param = dom[:, None] * n_features + offs_f[None, :]
    x = tl.load(X + rows[:, None] * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    rm = tl.load(RM + param, mask=mask, other=0.0).to(tl.float32)
    rv = tl.load(RV + param, mask=mask, other=1.0).to(tl.float32)
    w = tl.load(W + param, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + param, mask=mask, other=0.0).to(tl.float32)
    y = (x - rm) / tl.sqrt(rv + eps) * w + b
    tl.store(Y + rows[:, None] * stride_y + offs_f[None, :], y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- row-split variants
# With few domains and many rows per domain (e.g. D = 1-2 at B = 4,096), the (domain, feature block) grid is
# too small to fill the GPU and every program walks thousands of rows serially. The split variants add a third
# grid axis of S row chunks per domain: a first kernel writes per-chunk partial sums to an (S, D, F) float32
# workspace, a second one combines the S partials (every chunk program of a (domain, feature block) sums the
# same S values in the same order, so all agree exactly) and then normalizes (forward) or writes dx
# (backward) for its own chunk. Chunk 0 alone writes the (D, F) outputs (statistics, running statistics,
# dweight, dbias). Partial sums of one domain share one shift (the domain's first row), so they add up exactly
# like the unsplit kernel's accumulators. Still no atomics: deterministic.
#
# Running statistics: every chunk program reads RM/RV, chunk 0 writes them, and only for domains with >= MIN_ROWS
# rows; the values read are used only for domains with fewer rows (never written), so the read/write overlap is
# benign.


@triton.jit
def _chunk_bounds(n, pid_s, n_splits, BLOCK_B: tl.constexpr):
    """Rows [lo, hi) of chunk ``pid_s`` of a domain of ``n`` rows: chunks of a whole number of BLOCK_B."""
    chunk = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_B) * BLOCK_B
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, n)
    return lo, hi


@triton.jit
def dsbn_split_stats_kernel(
    X, PERM, STARTS, COUNTS, WS_S, WS_Q,
    n_rows, n_features, stride_x, n_splits,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Partial shifted sums ``sum(x - k)``, ``sum((x - k)^2)`` of one (domain, feature block, row chunk)."""
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_domains = tl.num_programs(0)
    start = tl.load(STARTS + pid_d)
    n = tl.load(COUNTS + pid_d)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < n_features
    n_vec = offs_f * 0 + n
    seg = PERM + start
    first = tl.load(PERM + tl.minimum(start, n_rows - 1))
    k = tl.load(X + first * stride_x + offs_f, mask=mask_f & (n_vec >= 1), other=0.0).to(tl.float32)
    lo, hi = _chunk_bounds(n, pid_s, n_splits, BLOCK_B)
    acc_s = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
    for i in range(lo, hi, BLOCK_B):
        rows = i + tl.arange(0, BLOCK_B)
        idx = tl.load(seg + rows, mask=rows < hi, other=0)
        mask = (rows < hi)[:, None] & mask_f[None, :]
        x = tl.load(X + idx[:, None] * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - k[None, :], 0.0)
        acc_s += d
        acc_q += d * d
    ws = (pid_s * n_domains + pid_d) * n_features + offs_f
    tl.store(WS_S + ws, tl.sum(acc_s, axis=0), mask=mask_f)
    tl.store(WS_Q + ws, tl.sum(acc_q, axis=0), mask=mask_f)


@triton.jit
def dsbn_split_fwd_kernel(
    X, Y, PERM, STARTS, COUNTS, W, B, RM, RV, MEAN_OUT, INVSTD_OUT, WS_S, WS_Q,
    n_rows, n_features, stride_x, stride_y, momentum, eps, n_splits,
    MIN_ROWS: tl.constexpr, PASS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Combine the partial sums of one (domain, feature block), then normalize + affine this program's chunk."""
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_domains = tl.num_programs(0)
    start = tl.load(STARTS + pid_d)
    n = tl.load(COUNTS + pid_d)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < n_features
    n_vec = offs_f * 0 + n
    param = pid_d * n_features + offs_f
    seg = PERM + start
    first = tl.load(PERM + tl.minimum(start, n_rows - 1))
    k = tl.load(X + first * stride_x + offs_f, mask=mask_f & (n_vec >= 1), other=0.0).to(tl.float32)
    tot_s = tl.zeros([BLOCK_F], dtype=tl.float32)
    tot_q = tl.zeros([BLOCK_F], dtype=tl.float32)
    for s in range(0, n_splits):
        ws = (s * n_domains + pid_d) * n_features + offs_f
        tot_s += tl.load(WS_S + ws, mask=mask_f, other=0.0)
        tot_q += tl.load(WS_Q + ws, mask=mask_f, other=0.0)
    nf = tl.maximum(n_vec.to(tl.float32), 1.0)
    s_mean = tot_s / nf
    var_b = tl.maximum(tot_q / nf - s_mean * s_mean, 0.0)
    mean_b = k + s_mean
    use_batch = n_vec >= MIN_ROWS
    rm = tl.load(RM + param, mask=mask_f, other=0.0).to(tl.float32)
    rv = tl.load(RV + param, mask=mask_f, other=1.0).to(tl.float32)
    mean = tl.where(use_batch, mean_b, rm)
    invstd = 1.0 / tl.sqrt(tl.where(use_batch, var_b, rv) + eps)
    w = tl.load(W + param, mask=mask_f, other=0.0).to(tl.float32)
    b = tl.load(B + param, mask=mask_f, other=0.0).to(tl.float32)
    if PASS:
        mean, invstd, w, b = _passthrough(n_vec, mean, invstd, w, b)
    if pid_s == 0:
        var_u = var_b * nf / tl.maximum(nf - 1.0, 1.0)
        upd = mask_f & use_batch
        tl.store(RM + param, ((1.0 - momentum) * rm + momentum * mean_b).to(RM.dtype.element_ty), mask=upd)
        tl.store(RV + param, ((1.0 - momentum) * rv + momentum * var_u).to(RV.dtype.element_ty), mask=upd)
        tl.store(MEAN_OUT + param, mean, mask=mask_f)
        tl.store(INVSTD_OUT + param, invstd, mask=mask_f)
    scale = w * invstd
    lo, hi = _chunk_bounds(n, pid_s, n_splits, BLOCK_B)
    for i in range(lo, hi, BLOCK_B):
        rows = i + tl.arange(0, BLOCK_B)
        idx = tl.load(seg + rows, mask=rows < hi, other=0)
        mask = (rows < hi)[:, None] & mask_f[None, :]
        x = tl.load(X + idx[:, None] * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + b[None, :]
        tl.store(Y + idx[:, None] * stride_y + offs_f[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def dsbn_split_bwd_sums_kernel(
    X, DY, PERM, STARTS, COUNTS, MEAN, INVSTD, WS_DY, WS_DYX,
    n_features, stride_x, stride_dy, n_splits,
    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Partial ``sum(dy)`` and ``sum(dy * xhat)`` of one (domain, feature block, row chunk)."""
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_domains = tl.num_programs(0)
    start = tl.load(STARTS + pid_d)
    n = tl.load(COUNTS + pid_d)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < n_features
    param = pid_d * n_features + offs_f
    seg = PERM + start
    mean = tl.load(MEAN + param, mask=mask_f, other=0.0)
    invstd = tl.load(INVSTD + param, mask=mask_f, other=0.0)
    lo, hi = _chunk_bounds(n, pid_s, n_splits, BLOCK_B)
    acc_dy = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_B, BLOCK_F], dtype=tl.float32)
    for i in range(lo, hi, BLOCK_B):
        rows = i + tl.arange(0, BLOCK_B)
        idx = tl.load(seg + rows, mask=rows < hi, other=0)
        mask = (rows < hi)[:, None] & mask_f[None, :]
        x = tl.load(X + idx[:, None] * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + idx[:, None] * stride_dy + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[None, :]) * invstd[None, :], 0.0)
        acc_dy += dy
        acc_dyx += dy * xhat
    ws = (pid_s * n_domains + pid_d) * n_features + offs_f
    tl.store(WS_DY + ws, tl.sum(acc_dy, axis=0), mask=mask_f)
    tl.store(WS_DYX + ws, tl.sum(acc_dyx, axis=0), mask=mask_f)


@triton.jit
def dsbn_split_bwd_kernel(
    X, DY, DX, DW, DB, PERM, STARTS, COUNTS, W, MEAN, INVSTD, WS_DY, WS_DYX,
    n_features, stride_x, stride_dy, stride_dx, n_splits,
    TRAINING: tl.constexpr, MIN_ROWS: tl.constexpr, PASS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Combine the partial sums of one (domain, feature block); chunk 0 writes dweight/dbias; dx of this chunk."""
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_domains = tl.num_programs(0)
    start = tl.load(STARTS + pid_d)
    n = tl.load(COUNTS + pid_d)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < n_features
    n_vec = offs_f * 0 + n
    param = pid_d * n_features + offs_f
    seg = PERM + start
    mean = tl.load(MEAN + param, mask=mask_f, other=0.0)
    invstd = tl.load(INVSTD + param, mask=mask_f, other=0.0)
    w = tl.load(W + param, mask=mask_f, other=0.0).to(tl.float32)
    sum_dy = tl.zeros([BLOCK_F], dtype=tl.float32)
    sum_dyx = tl.zeros([BLOCK_F], dtype=tl.float32)
    for s in range(0, n_splits):
        ws = (s * n_domains + pid_d) * n_features + offs_f
        sum_dy += tl.load(WS_DY + ws, mask=mask_f, other=0.0)
        sum_dyx += tl.load(WS_DYX + ws, mask=mask_f, other=0.0)
    if PASS:
        sum_dy, sum_dyx, w = _passthrough_grad(n_vec, sum_dy, sum_dyx, w)
    if pid_s == 0:
        tl.store(DW + param, sum_dyx.to(DW.dtype.element_ty), mask=mask_f)
        tl.store(DB + param, sum_dy.to(DB.dtype.element_ty), mask=mask_f)
    nf = tl.maximum(n_vec.to(tl.float32), 1.0)
    if TRAINING:
        use_batch = n_vec >= MIN_ROWS
        c_dy = tl.where(use_batch, sum_dy / nf, 0.0)
        c_dyx = tl.where(use_batch, sum_dyx / nf, 0.0)
    else:
        c_dy = tl.zeros([BLOCK_F], dtype=tl.float32)
        c_dyx = tl.zeros([BLOCK_F], dtype=tl.float32)
    scale = w * invstd
    lo, hi = _chunk_bounds(n, pid_s, n_splits, BLOCK_B)
    for i in range(lo, hi, BLOCK_B):
        rows = i + tl.arange(0, BLOCK_B)
        idx = tl.load(seg + rows, mask=rows < hi, other=0)
        mask = (rows < hi)[:, None] & mask_f[None, :]
        x = tl.load(X + idx[:, None] * stride_x + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + idx[:, None] * stride_dy + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = scale[None, :] * (dy - c_dy[None, :] - xhat * c_dyx[None, :])
        tl.store(DX + idx[:, None] * stride_dx + offs_f[None, :], dx.to(DX.dtype.element_ty), mask=mask)
