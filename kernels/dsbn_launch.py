"""Host side of the Triton DSBN: input checks, block sizes, launchers and the ``torch.autograd.Function``.

Imports triton (through ``dsbn_triton``) at import time; :mod:`scalex_scale.kernels` imports this module lazily,
only when the Triton backend is chosen.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton

from . import dsbn_triton as K
from . import reference
from .backend import INSTALL_HINT, triton_unavailable_reason
from .validation import check_dsbn_inputs, shape_str

__all__ = ["DSBNFunction", "DomainSegments", "domain_segments", "dsbn_triton", "row_splits"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# BLOCK_B * BLOCK_F per loop iteration. sm_90 ptxas (bf16 x): forward 80 registers at 32 x 64, no spills; the
# backward needs 142 at 2048 elements but 64 at 1024, so it gets the smaller tile (more resident warps).
_TILE_ELEMENTS = 2048
_TILE_ELEMENTS_BWD = 1024
_NUM_WARPS = 4


@dataclass(frozen=True)
class DomainSegments:
    """Rows grouped by domain: ``perm`` (B,) int64 row order sorted by domain; ``starts``/``counts`` (D,) int32."""

    perm: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor


def domain_segments(domain: torch.Tensor, n_domains: int) -> DomainSegments:
    """Group rows by domain on device, without host synchronisation.

    Parameters
    ----------
    domain
        ``(B,)`` int64/int32 domain ids in ``[0, n_domains)`` (``index_add_`` rejects ids out of range).
    n_domains
        ``D``.

    Returns
    -------
    DomainSegments
        Rows ``perm[starts[d] : starts[d] + counts[d]]`` are those of domain ``d``, in their original order.
    """
    perm = torch.sort(domain, stable=True).indices
    ones = torch.ones_like(domain, dtype=torch.int32)
    counts = torch.zeros(n_domains, dtype=torch.int32, device=domain.device).index_add_(0, domain, ones)
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    return DomainSegments(perm=perm, starts=starts, counts=counts)


@functools.lru_cache(maxsize=16)
def _min_programs(device: torch.device) -> int:
    """Programs wanted to fill the device: two waves of SMs on CUDA; few (fast interpreter) on CPU."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pow2_clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(1, value))))


def segment_blocks(
    n_rows: int, n_domains: int, n_features: int, device: torch.device, tile: int = _TILE_ELEMENTS
) -> tuple[int, int]:
    """``(BLOCK_B, BLOCK_F)`` for the per-(domain, feature block) kernels.

    BLOCK_F starts at 64 features and halves (down to 16) while ``D * cdiv(F, BLOCK_F)`` programs would not fill
    the GPU (small D); BLOCK_B follows the mean rows per domain, capped so a tile holds at most ``tile`` elements.
    """
    block_f = _pow2_clamp(n_features, 16, 64)
    while block_f > 16 and n_domains * triton.cdiv(n_features, block_f) < _min_programs(device):
        block_f //= 2
    block_b = _pow2_clamp(triton.cdiv(n_rows, n_domains), 16, max(16, tile // block_f))
    return block_b, block_f


#: Tests only: force this many row chunks per domain (the split kernels) whatever the shape; None decides.
FORCE_ROW_SPLITS: int | None = None
_MAX_ROW_SPLITS = 64


def row_splits(n_rows: int, n_domains: int, n_features: int, device: torch.device, tile: int = _TILE_ELEMENTS) -> int:
    """Row chunks per domain for the training kernels: 1 (one program per (domain, feature block)) unless that grid,
    even with the narrowest feature blocks, would not fill the GPU; then enough chunks for ~4 waves of programs,
    each chunk at least 4 row tiles of the domain's expected rows (``n_rows / n_domains``)."""
    if FORCE_ROW_SPLITS is not None:
        return max(1, int(FORCE_ROW_SPLITS))
    _, block_f = segment_blocks(n_rows, n_domains, n_features, device, tile)
    if n_domains * triton.cdiv(n_features, block_f) >= _min_programs(device):
        return 1
    wide = _pow2_clamp(n_features, 16, 64)
    programs = n_domains * triton.cdiv(n_features, wide)
    max_splits = triton.cdiv(n_rows, n_domains) // (4 * (tile // wide))
    return max(1, min(triton.cdiv(2 * _min_programs(device), programs), max_splits, _MAX_ROW_SPLITS))


def _device_ctx(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_triton_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
) -> None:
    """Checks specific to the Triton kernels (after :func:`check_dsbn_inputs`).

    Raises
    ------
    ValueError
        Unsupported dtype, or non-contiguous running statistics (they are updated in place).
    RuntimeError
        Triton cannot run on ``x.device`` (message with the install hint).
    """
    named = {"x": x, "weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    for name, t in named.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16 for the Triton DSBN, got {t.dtype}")
    for name in ("running_mean", "running_var"):
        if not named[name].is_contiguous():
            raise ValueError(
                f"{name} of shape {shape_str(named[name])} must be contiguous: the Triton DSBN updates it in place"
            )
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"Triton DSBN cannot run on {x.device}: {reason}. Install with: {INSTALL_HINT}")


def launch_train_forward(
    x: torch.Tensor,
    seg: DomainSegments,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
    passthrough: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward. Returns ``y`` (B, F) in x.dtype and the (D, F) float32 mean/invstd each domain used
    (``passthrough``: the lone row of a domain passes unchanged, saved as mean 0 / invstd 1)."""
    n_rows, n_features = x.shape
    n_domains = weight.shape[0]
    y = torch.empty_like(x)
    mean = torch.empty(n_domains, n_features, dtype=torch.float32, device=x.device)
    invstd = torch.empty_like(mean)
    if n_rows == 0:
        return y, mean, invstd
    splits = row_splits(n_rows, n_domains, n_features, x.device)
    if splits > 1:
        block_f = _pow2_clamp(n_features, 16, 64)
        block_b = _TILE_ELEMENTS // block_f
        grid = (n_domains, triton.cdiv(n_features, block_f), splits)
        ws_s = torch.empty(splits, n_domains, n_features, dtype=torch.float32, device=x.device)
        ws_q = torch.empty_like(ws_s)
        with _device_ctx(x.device):
            K.dsbn_split_stats_kernel[grid](
                x, seg.perm, seg.starts, seg.counts, ws_s, ws_q, n_rows, n_features, x.stride(0), splits,
                BLOCK_B=block_b, BLOCK_F=block_f, num_warps=_NUM_WARPS,
            )
            K.dsbn_split_fwd_kernel[grid](
                x, y, seg.perm, seg.starts, seg.counts, weight, bias, running_mean, running_var, mean, invstd,
                ws_s, ws_q, n_rows, n_features, x.stride(0), y.stride(0), float(momentum), float(eps), splits,
                MIN_ROWS=reference.MIN_ROWS_FOR_BATCH_STATS, PASS=passthrough, BLOCK_B=block_b, BLOCK_F=block_f,
                num_warps=_NUM_WARPS,
            )
        return y, mean, invstd
    block_b, block_f = segment_blocks(n_rows, n_domains, n_features, x.device)
    grid = (n_domains, triton.cdiv(n_features, block_f))
    with _device_ctx(x.device):
        K.dsbn_train_fwd_kernel[grid](
            x, y, seg.perm, seg.starts, seg.counts, weight, bias, running_mean, running_var, mean, invstd,
            n_rows, n_features, x.stride(0), y.stride(0), float(momentum), float(eps),
            MIN_ROWS=reference.MIN_ROWS_FOR_BATCH_STATS, PASS=passthrough, BLOCK_B=block_b, BLOCK_F=block_f,
            num_warps=_NUM_WARPS,
        )
    return y, mean, invstd


def launch_eval_forward(
    x: torch.Tensor,
    domain: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Eval forward (running statistics for every row), one program per (row block, feature block)."""
    n_rows, n_features = x.shape
    y = torch.empty_like(x)
    if n_rows == 0:
        return y
    block_f = _pow2_clamp(n_features, 16, 64)
    block_b = _TILE_ELEMENTS // block_f
    grid = (triton.cdiv(n_rows, block_b), triton.cdiv(n_features, block_f))
    with _device_ctx(x.device):
        K.dsbn_eval_fwd_kernel[grid](
            x, y, domain, weight, bias, running_mean, running_var,
            n_rows, n_features, x.stride(0), y.stride(0), float(eps),
            BLOCK_B=block_b, BLOCK_F=block_f, num_warps=_NUM_WARPS,
        )
    return y


def launch_backward(
    x: torch.Tensor,
    dy: torch.Tensor,
    seg: DomainSegments,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    bias_dtype: torch.dtype,
    training: bool,
    passthrough: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward. Returns ``dx`` (x.dtype), ``dweight`` (weight.dtype), ``dbias`` (bias_dtype); ``passthrough``
    (training only): a domain's lone row gets ``dx = dy`` and its domain no dweight/dbias."""
    passthrough = bool(passthrough and training)
    n_rows, n_features = x.shape
    n_domains = weight.shape[0]
    dx = torch.empty_like(x)
    if n_rows == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight, dtype=bias_dtype)
    dw = torch.empty_like(weight)
    db = torch.empty_like(weight, dtype=bias_dtype)
    splits = row_splits(n_rows, n_domains, n_features, x.device, tile=_TILE_ELEMENTS_BWD)
    if splits > 1:
        block_f = _pow2_clamp(n_features, 16, 64)
        block_b = _TILE_ELEMENTS_BWD // block_f
        grid = (n_domains, triton.cdiv(n_features, block_f), splits)
        ws_dy = torch.empty(splits, n_domains, n_features, dtype=torch.float32, device=x.device)
        ws_dyx = torch.empty_like(ws_dy)
        with _device_ctx(x.device):
            K.dsbn_split_bwd_sums_kernel[grid](
                x, dy, seg.perm, seg.starts, seg.counts, mean, invstd, ws_dy, ws_dyx,
                n_features, x.stride(0), dy.stride(0), splits,
                BLOCK_B=block_b, BLOCK_F=block_f, num_warps=_NUM_WARPS,
            )
            K.dsbn_split_bwd_kernel[grid](
                x, dy, dx, dw, db, seg.perm, seg.starts, seg.counts, weight, mean, invstd, ws_dy, ws_dyx,
                n_features, x.stride(0), dy.stride(0), dx.stride(0), splits,
                TRAINING=training, MIN_ROWS=reference.MIN_ROWS_FOR_BATCH_STATS, PASS=passthrough, BLOCK_B=block_b,
                BLOCK_F=block_f, num_warps=_NUM_WARPS,
            )
        return dx, dw, db
    block_b, block_f = segment_blocks(n_rows, n_domains, n_features, x.device, tile=_TILE_ELEMENTS_BWD)
    grid = (n_domains, triton.cdiv(n_features, block_f))
    with _device_ctx(x.device):
        K.dsbn_bwd_kernel[grid](
            x, dy, dx, dw, db, seg.perm, seg.starts, seg.counts, weight, mean, invstd,
            n_features, x.stride(0), dy.stride(0), dx.stride(0),
            TRAINING=training, MIN_ROWS=reference.MIN_ROWS_FOR_BATCH_STATS, PASS=passthrough, BLOCK_B=block_b,
            BLOCK_F=block_f, num_warps=_NUM_WARPS,
        )
    return dx, dw, db


class DSBNFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton DSBN (training and eval). Running statistics are updated in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
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
        x = x.contiguous()
        weight = weight.contiguous()
        bias = bias.contiguous()
        n_domains = weight.shape[0]
        seg = None
        if training:
            seg = domain_segments(domain, n_domains)
            y, mean, invstd = launch_train_forward(
                x, seg, weight, bias, running_mean, running_var, momentum, eps, passthrough
            )
        else:
            y = launch_eval_forward(x, domain, weight, bias, running_mean, running_var, eps)
            mean, invstd = None, None
            if any(ctx.needs_input_grad):  # snapshot: running stats may change before backward
                mean = running_mean.detach().to(torch.float32, copy=True)
                invstd = torch.rsqrt(running_var.detach().to(torch.float32) + eps)
        perm, starts, counts = (seg.perm, seg.starts, seg.counts) if seg is not None else (None, None, None)
        ctx.save_for_backward(x, domain, weight, mean, invstd, perm, starts, counts)
        ctx.training = training
        ctx.passthrough = passthrough
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, domain, weight, mean, invstd, perm, starts, counts = ctx.saved_tensors
        if perm is None:
            seg = domain_segments(domain, weight.shape[0])
        else:
            seg = DomainSegments(perm=perm, starts=starts, counts=counts)
        dx, dw, db = launch_backward(
            x, dy.contiguous(), seg, weight, mean, invstd, ctx.bias_dtype, ctx.training, ctx.passthrough
        )
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            None,
            dw if need[2] else None,
            db if need[3] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


@torch.compiler.disable  # eager island under torch.compile (a graph break; fullgraph=True needs backend="torch")
def dsbn_triton(
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
    singleton: str = "passthrough",
) -> torch.Tensor:
    """Fused Triton DSBN with the same signature and rules as :func:`scalex_scale.kernels.dsbn_reference`.

    Parameters
    ----------
    x
        ``(B, F)`` float32/float16/bfloat16 input (made contiguous if needed).
    domain
        ``(B,)`` int64 (or int32) domain ids in ``[0, D)``, any order.
    weight, bias
        ``(D, F)`` affine parameters (float32/float16/bfloat16).
    running_mean, running_var
        ``(D, F)`` contiguous running statistics, updated in place in training mode.
    training, momentum, eps
        As :func:`torch.nn.functional.batch_norm`.
    singleton
        ``"passthrough"`` or ``"running"``: what training does with a domain's lone row (the reference's rules).

    Returns
    -------
    torch.Tensor
        ``(B, F)`` output in ``x.dtype``; statistics computed in float32.

    Raises
    ------
    ValueError
        Bad shapes, dtypes, devices or non-contiguous running statistics.
    RuntimeError
        Triton cannot run on ``x.device``.
    """
    check_dsbn_inputs(x, domain, weight, bias, running_mean, running_var, momentum, eps, singleton)
    check_triton_inputs(x, weight, bias, running_mean, running_var)
    return DSBNFunction.apply(
        x, domain, weight, bias, running_mean, running_var, training, momentum, eps,
        bool(training and singleton == "passthrough"),
    )
