"""Tests for scalex_scale.kernels: the DSBN reference, the Triton kernels, backend selection and errors.

Without CUDA the Triton kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1, set below before any
triton import) with small shapes; with CUDA the same comparisons run on the GPU, plus full-size ones (``gpu``).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any triton import: kernels are decorated in interpreter mode

import logging
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch.nn.functional as F

import scalex_scale.kernels as kernels
from scalex_scale.kernels import backend as backend_mod
from scalex_scale.kernels import dsbn, dsbn_loop_reference, dsbn_reference, resolve_backend, triton_available

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
HAS_TRITON = triton_available(DEVICE)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton cannot run here (not installed?)")

TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
STAT_TOL = dict(rtol=1e-5, atol=1e-5)  # running stats and dweight/dbias are float32 in every case
GRAD_PARAM_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-3, atol=1e-3),
                  torch.bfloat16: dict(rtol=1e-3, atol=1e-3)}


# ----------------------------------------------------------------------------------------------------------- helpers
@dataclass
class Case:
    x: torch.Tensor
    domain: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    grad_out: torch.Tensor


def _gen(seed: int, device: torch.device = torch.device("cpu")) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def layout(name: str, n_rows: int, n_domains: int, gen: torch.Generator) -> torch.Tensor:
    """Domain ids (CPU int64) for a named layout, always in shuffled (unsorted) order unless 'sorted'."""
    if name in ("random", "sorted"):
        ids = torch.arange(n_rows) % n_domains  # every domain populated (n_rows >= 2 * n_domains)
    elif name == "singleton_empty":  # domain 0: one row; last domain: empty; others: the rest
        ids = torch.cat([torch.zeros(1, dtype=torch.int64), 1 + torch.arange(n_rows - 1) % (n_domains - 2)])
    elif name == "all_singletons":
        ids = torch.arange(n_rows) % n_domains
    else:
        raise ValueError(name)
    if name == "sorted":
        return ids.sort().values
    return ids[torch.randperm(n_rows, generator=gen)]


def make_case(
    n_rows: int,
    n_features: int,
    n_domains: int,
    *,
    dtype: torch.dtype = torch.float32,
    layout_name: str = "random",
    seed: int = 0,
    loc: float = 0.5,
    scale: float = 2.0,
    device: torch.device = DEVICE,
) -> Case:
    g = _gen(seed)
    x = torch.randn(n_rows, n_features, generator=g) * scale + loc
    domain = layout(layout_name, n_rows, n_domains, g)
    weight = 1.0 + 0.5 * torch.randn(n_domains, n_features, generator=g)
    bias = 0.5 * torch.randn(n_domains, n_features, generator=g)
    rm = torch.randn(n_domains, n_features, generator=g)
    rv = 0.5 + torch.rand(n_domains, n_features, generator=g)
    grad_out = torch.randn(n_rows, n_features, generator=g)
    return Case(x.to(device, dtype), domain.to(device), weight.to(device), bias.to(device), rm.to(device),
                rv.to(device), grad_out.to(device, dtype))


def run(fn, case: Case, *, training: bool, **kw) -> dict[str, torch.Tensor]:
    """Forward + backward on clones; returns outputs, updated running stats and gradients (all float32)."""
    x = case.x.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    b = case.bias.clone().requires_grad_(True)
    rm, rv = case.running_mean.clone(), case.running_var.clone()
    y = fn(x, case.domain, w, b, rm, rv, training=training, **kw)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), case.grad_out)
    return dict(y=y, rm=rm, rv=rv, dx=dx, dw=dw, db=db)


def assert_results_close(got: dict, want: dict, dtype: torch.dtype) -> None:
    assert got["y"].dtype == want["y"].dtype == dtype
    assert got["dx"].dtype == dtype
    for key in ("y", "dx"):
        torch.testing.assert_close(got[key].float(), want[key].float(), **TOL[dtype], msg=lambda m, key=key: f"{key}: {m}")
    for key in ("rm", "rv"):
        torch.testing.assert_close(got[key], want[key], **STAT_TOL, msg=lambda m, key=key: f"{key}: {m}")
    for key in ("dw", "db"):
        torch.testing.assert_close(got[key], want[key], **GRAD_PARAM_TOL[dtype], msg=lambda m, key=key: f"{key}: {m}")


def triton_fn(*args, **kw):
    return dsbn(*args, backend="triton", **kw)


# ------------------------------------------------------------------------------------------------- reference: rules
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("threshold", [2, 3])
def test_singleton_threshold_is_the_one_constant(backend: str, threshold: int, monkeypatch) -> None:
    """Both backends read ``kernels.reference.MIN_ROWS_FOR_BATCH_STATS``: with 3, a 2-row domain uses running stats."""
    assert kernels.MIN_ROWS_FOR_BATCH_STATS == 2  # the documented SINGLETON RULE
    monkeypatch.setattr(kernels.reference, "MIN_ROWS_FOR_BATCH_STATS", threshold)
    case = make_case(12, 37, 3)
    case.domain = torch.tensor([1, 0, 1, 1, 2, 1, 0, 2, 1, 2, 1, 1], device=case.domain.device)  # counts 2, 7, 3
    got = run(lambda *a, **kw: dsbn(*a, backend=backend, **kw), case, training=True)
    rows0 = case.domain == 0
    eval_y = run(dsbn_reference, case, training=False)["y"]
    if threshold == 3:  # domain 0 (2 rows) now follows the singleton rule: running statistics, not updated
        torch.testing.assert_close(got["y"][rows0], eval_y[rows0], **TOL[torch.float32])
        torch.testing.assert_close(got["rm"][0], case.running_mean[0], rtol=0, atol=0)
    else:
        assert not torch.allclose(got["y"][rows0], eval_y[rows0], **TOL[torch.float32])
        assert not torch.allclose(got["rm"][0], case.running_mean[0])
    for d in (1, 2):  # 7 and 3 rows: batch statistics, running statistics updated, either way
        assert not torch.allclose(got["rm"][d], case.running_mean[d])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_reference_d1_equals_batch_norm(dtype: torch.dtype, training: bool) -> None:
    case = make_case(33, 37, 1, dtype=dtype, device=torch.device("cpu"))
    for name in ("weight", "bias", "running_mean", "running_var"):
        setattr(case, name, getattr(case, name).to(dtype))

    def batch_norm(x, domain, w, b, rm, rv, *, training):
        return F.batch_norm(x, rm[0], rv[0], w[0], b[0], training, 0.1, 1e-5)

    got = run(dsbn_reference, case, training=training)
    want = run(batch_norm, case, training=training)
    tol = dict(rtol=1e-5, atol=1e-5)
    for key in got:
        torch.testing.assert_close(got[key], want[key].to(got[key].dtype), **tol, msg=lambda m, key=key: f"{key}: {m}")


def test_reference_matches_original_loop_without_singletons() -> None:
    """With every present domain >= 2 rows, the original loop DSBN and the vectorized one agree (empty domain too)."""
    case = make_case(40, 37, 5, layout_name="random", device=torch.device("cpu"))
    case.domain = torch.where(case.domain == 4, torch.tensor(3), case.domain)  # domain 4 empty
    got = run(dsbn_reference, case, training=True)
    want = run(dsbn_loop_reference, case, training=True)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(got["rm"][4], case.running_mean[4], rtol=0, atol=0)
    torch.testing.assert_close(got["dw"][4], torch.zeros(37))


@pytest.mark.parametrize("singleton", ["passthrough", "running"])
def test_reference_singleton_and_empty_domain_rules(singleton: str) -> None:
    case = make_case(21, 37, 5, layout_name="singleton_empty", device=torch.device("cpu"))
    rm0, rv0 = case.running_mean.clone(), case.running_var.clone()
    out = run(dsbn_reference, case, training=True, singleton=singleton)
    row = int(torch.nonzero(case.domain == 0)[0, 0])
    if singleton == "passthrough":  # the lone row leaves as it came; its gradient goes straight to x, none to w/b
        assert torch.equal(out["y"][row], case.x[row]) and torch.equal(out["dx"][row], case.grad_out[row])
        assert not out["dw"][0].any() and not out["db"][0].any()
    else:
        invstd = torch.rsqrt(rv0[0] + 1e-5)
        expected = (case.x[row] - rm0[0]) * invstd * case.weight[0] + case.bias[0]
        torch.testing.assert_close(out["y"][row], expected)
        torch.testing.assert_close(out["dx"][row], case.weight[0] * invstd * case.grad_out[row])
        torch.testing.assert_close(out["db"][0], case.grad_out[row])
    for d in (0, 4):  # singleton and empty: running stats untouched
        assert torch.equal(out["rm"][d], rm0[d]) and torch.equal(out["rv"][d], rv0[d])
    assert not torch.equal(out["rm"][1], rm0[1])  # populated domains updated
    torch.testing.assert_close(out["db"][4], torch.zeros(37))
    other = case.domain != 0  # the rows of the other domains do not depend on the rule
    want = run(dsbn_reference, case, training=True, singleton="running" if singleton == "passthrough" else "passthrough")
    assert torch.equal(out["y"][other], want["y"][other]) and torch.equal(out["dx"][other], want["dx"][other])


def test_reference_passthrough_matches_original_loop_with_singletons() -> None:
    """The default rule is the original SCALEX DSBN's: a domain's lone row passes unnormalized, without affine."""
    case = make_case(21, 37, 5, layout_name="singleton_empty", device=torch.device("cpu"))
    got = run(dsbn_reference, case, training=True)
    want = run(dsbn_loop_reference, case, training=True)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_unknown_singleton_rule_is_refused() -> None:
    case = make_case(8, 5, 2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="singleton must be one of passthrough, running, got 'skip'"):
        dsbn(case.x, case.domain, case.weight, case.bias, case.running_mean, case.running_var, singleton="skip")


def test_reference_running_stats_update_formula() -> None:
    case = make_case(30, 37, 3, layout_name="random", device=torch.device("cpu"))
    out = run(dsbn_reference, case, training=True, momentum=0.3)
    rows = case.domain == 2
    xs = case.x[rows]
    torch.testing.assert_close(out["rm"][2], 0.7 * case.running_mean[2] + 0.3 * xs.mean(0))
    torch.testing.assert_close(out["rv"][2], 0.7 * case.running_var[2] + 0.3 * xs.var(0, unbiased=True))


def test_reference_gradcheck_float64() -> None:
    case = make_case(9, 5, 4, layout_name="singleton_empty", device=torch.device("cpu"))
    x = case.x.double().requires_grad_(True)
    w = case.weight.double().requires_grad_(True)
    b = case.bias.double().requires_grad_(True)
    rm, rv = case.running_mean.double(), case.running_var.double()

    def f(x, w, b):
        return dsbn_reference(x, case.domain, w, b, rm.clone(), rv.clone(), training=True)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_half_inputs_use_float32_statistics(dtype: torch.dtype) -> None:
    case = make_case(40, 100, 3, dtype=dtype, device=torch.device("cpu"))
    rm, rv = case.running_mean.clone(), case.running_var.clone()
    y = dsbn_reference(case.x, case.domain, case.weight, case.bias, rm, rv)
    rm32, rv32 = case.running_mean.clone(), case.running_var.clone()
    y32 = dsbn_reference(case.x.float(), case.domain, case.weight, case.bias, rm32, rv32)
    assert y.dtype == dtype and rm.dtype == torch.float32
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(rm, rm32, rtol=0, atol=0)


@pytest.mark.parametrize("backward_inside", [False, True], ids=["bwd-outside", "bwd-inside"])
def test_reference_statistics_stay_float32_under_bf16_autocast(backward_inside: bool) -> None:
    """Under bf16 autocast the per-domain sums (one-hot matmuls) must not drop to bfloat16: the output, the
    running statistics and every gradient equal the run without autocast, bit for bit (CPU autocast)."""
    case = make_case(512, 64, 4, loc=5.0, scale=3.0, device=torch.device("cpu"))

    def go(autocast: bool) -> dict[str, torch.Tensor]:
        x = case.x.clone().requires_grad_(True)
        w, b = case.weight.clone().requires_grad_(True), case.bias.clone().requires_grad_(True)
        rm, rv = case.running_mean.clone(), case.running_var.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = dsbn_reference(x, case.domain, w, b, rm, rv, training=True)
            if backward_inside:
                grads = torch.autograd.grad(y, (x, w, b), case.grad_out)
        if not backward_inside:
            grads = torch.autograd.grad(y, (x, w, b), case.grad_out)
        return dict(zip(("y", "rm", "rv", "dx", "dw", "db"), (y, rm, rv, *grads), strict=True))

    plain, mixed = go(False), go(True)
    for key, value in plain.items():
        assert mixed[key].dtype == torch.float32, key
        assert torch.equal(mixed[key], value), key


def test_reference_compiles_fullgraph_without_host_sync() -> None:
    """No .item()/nonzero/data-dependent shapes: dynamo captures one graph (aot_eager: quick on CPU), fwd + bwd."""
    case = make_case(24, 37, 4, layout_name="singleton_empty", device=torch.device("cpu"))
    compiled = torch.compile(dsbn_reference, fullgraph=True, backend="aot_eager")
    got = run(compiled, case, training=True)
    want = run(dsbn_reference, case, training=True)
    for key in got:  # includes the in-place running-stat update surviving compilation
        torch.testing.assert_close(got[key], want[key], msg=lambda m, key=key: f"{key}: {m}")


def test_public_dsbn_auto_compiles_fullgraph_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend='auto' resolves and (not) logs inside a fullgraph compile, even before any eager call."""
    monkeypatch.setattr(backend_mod, "_logged_choices", set())
    case = make_case(12, 5, 3, layout_name="singleton_empty", device=torch.device("cpu"))

    def f(*args, **kw):
        return dsbn(*args, backend="auto", **kw)

    got = run(torch.compile(f, fullgraph=True, backend="aot_eager"), case, training=True)
    want = run(dsbn_reference, case, training=True)
    for key in got:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_reference_cuda_graph_and_sync_free() -> None:
    case = make_case(256, 100, 8, layout_name="singleton_empty", device=DEVICE)
    rm, rv = case.running_mean.clone(), case.running_var.clone()
    x_static = case.x.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dsbn_reference(x_static, case.domain, case.weight, case.bias, rm.clone(), rv.clone())  # sync-free eager
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dsbn_reference(x_static, case.domain, case.weight, case.bias, rm.clone(), rv.clone())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    rm_g, rv_g = case.running_mean.clone(), case.running_var.clone()
    with torch.cuda.graph(graph):
        y_static = dsbn_reference(x_static, case.domain, case.weight, case.bias, rm_g, rv_g)
    rm_g.copy_(case.running_mean)
    rv_g.copy_(case.running_var)
    graph.replay()
    y = dsbn_reference(case.x, case.domain, case.weight, case.bias, rm, rv)
    torch.testing.assert_close(y_static, y)
    torch.testing.assert_close(rm_g, rm)


# ---------------------------------------------------------------------------------------- triton vs the reference
TRITON_CASES = [
    # (n_rows, n_features, n_domains, layout, singleton rule)
    pytest.param(48, 100, 3, "random", "passthrough", id="F100-D3-unsorted"),
    pytest.param(21, 37, 5, "singleton_empty", "passthrough", id="F37-D5-singleton-empty"),
    pytest.param(21, 37, 5, "singleton_empty", "running", id="F37-D5-singleton-empty-running"),
    pytest.param(33, 37, 1, "random", "passthrough", id="F37-D1"),
    pytest.param(40, 37, 4, "sorted", "passthrough", id="F37-D4-sorted"),
    pytest.param(6, 37, 6, "all_singletons", "passthrough", id="F37-D6-all-singletons"),
    pytest.param(6, 37, 6, "all_singletons", "running", id="F37-D6-all-singletons-running"),
]


def assert_lone_rows_pass_through(got: dict, case: Case, singleton: str, training: bool) -> None:
    """Under the passthrough rule a domain's lone row leaves unchanged, its gradient is dy, its domain's w/b get none
    (exactly, in every dtype: the kernels compute ``(x - 0) * 1 * 1 + 0``)."""
    if singleton != "passthrough" or not training:
        return
    counts = torch.bincount(case.domain.long(), minlength=case.weight.shape[0])
    lone = counts[case.domain.long()] == 1
    assert lone.any()
    assert torch.equal(got["y"][lone], case.x[lone]) and torch.equal(got["dx"][lone], case.grad_out[lone])
    assert not got["dw"][counts == 1].any() and not got["db"][counts == 1].any()


@needs_triton
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n_rows", "n_features", "n_domains", "layout_name", "singleton"), TRITON_CASES)
def test_triton_matches_reference(
    n_rows: int, n_features: int, n_domains: int, layout_name: str, singleton: str, dtype: torch.dtype, training: bool
) -> None:
    case = make_case(n_rows, n_features, n_domains, dtype=dtype, layout_name=layout_name)
    got = run(triton_fn, case, training=training, singleton=singleton)
    assert_results_close(got, run(dsbn_reference, case, training=training, singleton=singleton), dtype)
    if "singleton" in layout_name:
        assert_lone_rows_pass_through(got, case, singleton, training)


SPLIT_CASES = [
    # chunks are whole 32-row (forward) / 16-row (backward) tiles: 200 rows in 3 chunks of 96, 96, 8 rows
    pytest.param(200, 37, 1, "random", 3, "passthrough", id="F37-D1-S3"),
    pytest.param(300, 100, 2, "random", 3, "passthrough", id="F100-D2-S3"),
    pytest.param(45, 37, 5, "singleton_empty", 2, "passthrough", id="F37-D5-singleton-empty-S2"),
    pytest.param(45, 37, 5, "singleton_empty", 2, "running", id="F37-D5-singleton-empty-S2-running"),
    pytest.param(40, 37, 2, "sorted", 7, "passthrough", id="F37-D2-sorted-S7-more-chunks-than-tiles"),
]


@needs_triton
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n_rows", "n_features", "n_domains", "layout_name", "splits", "singleton"), SPLIT_CASES)
def test_triton_row_split_matches_reference(
    monkeypatch: pytest.MonkeyPatch, n_rows: int, n_features: int, n_domains: int, layout_name: str, splits: int,
    singleton: str, dtype: torch.dtype, training: bool,
) -> None:  # fmt: skip
    """The row-split kernels (few domains, many rows: a third grid axis of row chunks) against the reference."""
    from scalex_scale.kernels import dsbn_launch

    monkeypatch.setattr(dsbn_launch, "FORCE_ROW_SPLITS", splits)
    case = make_case(n_rows, n_features, n_domains, dtype=dtype, layout_name=layout_name, seed=splits)
    got = run(triton_fn, case, training=training, singleton=singleton)
    assert_results_close(got, run(dsbn_reference, case, training=training, singleton=singleton), dtype)
    if "singleton" in layout_name:
        assert_lone_rows_pass_through(got, case, singleton, training)


@needs_triton
def test_row_split_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split only where the (domain, feature block) grid cannot fill a 132-SM GPU: 1-2 domains at large batch."""
    from scalex_scale.kernels import dsbn_launch

    monkeypatch.setattr(dsbn_launch, "_min_programs", lambda device: 2 * 132)
    gpu = torch.device("cuda")
    assert dsbn_launch.row_splits(4096, 1, 2000, gpu) > 8
    assert dsbn_launch.row_splits(4096, 2, 2000, gpu) > 4
    assert dsbn_launch.row_splits(4096, 8, 2000, gpu) == 1  # narrow feature blocks already fill it
    assert dsbn_launch.row_splits(64, 1, 2000, gpu) == 1  # too few rows to split


@needs_triton
def test_triton_float16_and_int32_domain() -> None:
    case = make_case(40, 100, 3, dtype=torch.float16, layout_name="singleton_empty")
    case.domain = case.domain.int()
    assert_results_close(run(triton_fn, case, training=True), run(dsbn_reference, case, training=True), torch.float16)


@needs_triton
def test_triton_large_mean_small_spread() -> None:
    """|mean| >> std: the shifted-sum variance must not cancel catastrophically (checked against float64)."""
    case = make_case(40, 37, 2, loc=50.0, scale=0.1)
    got = run(triton_fn, case, training=True)
    case64 = Case(*(t.cpu().double() if t.is_floating_point() else t.cpu() for t in vars(case).values()))
    want = run(dsbn_reference, case64, training=True)
    for key in got:  # |dx| reaches ~60 here (invstd ~10): absolute error ~3e-4; the float32 reference has ~2e-3
        torch.testing.assert_close(
            got[key].cpu().double(), want[key], rtol=1e-4, atol=1e-3, msg=lambda m, key=key: f"{key}: {m}"
        )


@needs_triton
def test_triton_d1_equals_batch_norm() -> None:
    case = make_case(33, 37, 1)
    y = triton_fn(case.x, case.domain, case.weight, case.bias, case.running_mean.clone(), case.running_var.clone())
    rm, rv = case.running_mean[0].clone(), case.running_var[0].clone()
    want = F.batch_norm(case.x, rm, rv, case.weight[0], case.bias[0], True, 0.1, 1e-5)
    torch.testing.assert_close(y, want, **TOL[torch.float32])


@needs_triton
def test_triton_noncontiguous_x_and_parameters_without_grad() -> None:
    case = make_case(24, 37, 3)
    x_t = case.x.t().contiguous().t()  # same values, column-major
    assert not x_t.is_contiguous()
    x_t.requires_grad_(True)
    y = triton_fn(x_t, case.domain, case.weight, case.bias, case.running_mean.clone(), case.running_var.clone())
    (dx,) = torch.autograd.grad(y, x_t, case.grad_out)
    want = run(dsbn_reference, case, training=True)
    torch.testing.assert_close(y, want["y"], **TOL[torch.float32])
    torch.testing.assert_close(dx, want["dx"], **TOL[torch.float32])


AOT_CODE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from scalex_scale.kernels import MIN_ROWS_FOR_BATCH_STATS, dsbn_triton as K
    assert not K.INTERPRETED
    for xdt in ("fp32", "bf16"):
        seg = dict(PERM="*i64", STARTS="*i32", COUNTS="*i32", W="*fp32")
        fwd = dict(X=f"*{xdt}", Y=f"*{xdt}", B="*fp32", RM="*fp32", RV="*fp32", MEAN_OUT="*fp32",
                   INVSTD_OUT="*fp32", n_rows="i32", n_features="i32", stride_x="i32", stride_y="i32",
                   momentum="fp32", eps="fp32", **seg)
        bwd = dict(X=f"*{xdt}", DY=f"*{xdt}", DX=f"*{xdt}", DW="*fp32", DB="*fp32", MEAN="*fp32", INVSTD="*fp32",
                   n_features="i32", stride_x="i32", stride_dy="i32", stride_dx="i32", **seg)
        ev = dict(X=f"*{xdt}", Y=f"*{xdt}", DOMAIN="*i64", W="*fp32", B="*fp32", RM="*fp32", RV="*fp32",
                  n_rows="i32", n_features="i32", stride_x="i32", stride_y="i32", eps="fp32")
        ws = dict(n_splits="i32")
        sstats = dict(X=f"*{xdt}", PERM="*i64", STARTS="*i32", COUNTS="*i32", WS_S="*fp32", WS_Q="*fp32",
                      n_rows="i32", n_features="i32", stride_x="i32", **ws)
        sfwd = dict(fwd, WS_S="*fp32", WS_Q="*fp32", **ws)
        sfwd = {k: sfwd[k] for k in ("X", "Y", "PERM", "STARTS", "COUNTS", "W", "B", "RM", "RV", "MEAN_OUT",
                                      "INVSTD_OUT", "WS_S", "WS_Q", "n_rows", "n_features", "stride_x", "stride_y",
                                      "momentum", "eps", "n_splits")}
        ssums = dict(X=f"*{xdt}", DY=f"*{xdt}", PERM="*i64", STARTS="*i32", COUNTS="*i32", MEAN="*fp32",
                     INVSTD="*fp32", WS_DY="*fp32", WS_DYX="*fp32", n_features="i32", stride_x="i32",
                     stride_dy="i32", **ws)
        sbwd = dict(X=f"*{xdt}", DY=f"*{xdt}", DX=f"*{xdt}", DW="*fp32", DB="*fp32", PERM="*i64", STARTS="*i32",
                    COUNTS="*i32", W="*fp32", MEAN="*fp32", INVSTD="*fp32", WS_DY="*fp32", WS_DYX="*fp32",
                    n_features="i32", stride_x="i32", stride_dy="i32", stride_dx="i32", **ws)
        blocks = dict(BLOCK_B=32, BLOCK_F=32)
        rule = dict(MIN_ROWS=MIN_ROWS_FOR_BATCH_STATS, **blocks)
        for fn, sig, const in [(K.dsbn_train_fwd_kernel, fwd, rule),
                               (K.dsbn_bwd_kernel, bwd, dict(TRAINING=True, **rule)),
                               (K.dsbn_bwd_kernel, bwd, dict(TRAINING=False, **rule)),
                               (K.dsbn_eval_fwd_kernel, ev, blocks),
                               (K.dsbn_split_stats_kernel, sstats, blocks),
                               (K.dsbn_split_fwd_kernel, sfwd, rule),
                               (K.dsbn_split_bwd_sums_kernel, ssums, blocks),
                               (K.dsbn_split_bwd_kernel, sbwd, dict(TRAINING=True, **rule))]:
            src = triton.compiler.ASTSource(fn, {**sig, **{k: "constexpr" for k in const}}, const)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True})
            assert "cubin" in compiled.asm, fn
    print("ok")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels are compiled and run by the tests above")
@needs_triton
def test_kernels_compile_for_sm90_without_gpu() -> None:
    """The interpreter skips Triton's compiler: compile every kernel to an sm_90 cubin (no GPU needed).

    Runs in a fresh process: the kernels must be imported without TRITON_INTERPRET, and the interpreter's patching
    of ``triton.language`` in this process would break the compiler.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", AOT_CODE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_batch(backend: str) -> None:
    case = make_case(8, 37, 3)
    x = case.x[:0].clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    rm = case.running_mean.clone()
    y = dsbn(x, case.domain[:0], w, case.bias, rm, case.running_var.clone(), backend=backend)
    assert y.shape == (0, 37)
    (dw,) = torch.autograd.grad(y, w, case.grad_out[:0])
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(rm, case.running_mean)


# ---------------------------------------------------------------------------------------------- full size on a GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_domains", [16, 256])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_triton_full_size_gpu(n_domains: int, dtype: torch.dtype, training: bool) -> None:
    case = make_case(4096, 2000, n_domains, dtype=dtype, layout_name="singleton_empty", seed=3)
    got = run(triton_fn, case, training=training)
    want = run(dsbn_reference, case, training=training)
    assert_results_close(got, want, dtype)


# ------------------------------------------------------------------------------------------------------- errors
def _good(n_rows: int = 8, n_features: int = 5, n_domains: int = 3) -> dict[str, torch.Tensor]:
    case = make_case(n_rows, n_features, n_domains, device=torch.device("cpu"))
    return dict(x=case.x, domain=case.domain, weight=case.weight, bias=case.bias,
                running_mean=case.running_mean, running_var=case.running_var)


BAD_INPUTS = [
    pytest.param("x", lambda a: a["x"][0], r"x must be 2-D .*got shape \(5\)", id="x-1d"),
    pytest.param("domain", lambda a: a["domain"][:7], r"domain must be 1-D .*\(8,\).*got shape \(7\)", id="domain-len"),
    pytest.param("domain", lambda a: a["domain"].float(), r"domain must be an int64", id="domain-float"),
    pytest.param("weight", lambda a: a["weight"][:, :4], r"weight .*\(3, 5\).*got shape \(3, 4\)", id="weight-F"),
    pytest.param("weight", lambda a: a["weight"][0], r"weight must be 2-D .*got shape \(5\)", id="weight-1d"),
    pytest.param("bias", lambda a: a["bias"][:2], r"bias must have shape .*\(3, 5\).*got shape \(2, 5\)", id="bias-D"),
    pytest.param("running_var", lambda a: a["running_var"].t(), r"running_var .*got shape \(5, 3\)", id="rv-shape"),
    pytest.param("running_mean", lambda a: a["running_mean"].long(), r"running_mean must be a floating", id="rm-int"),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(("name", "corrupt", "match"), BAD_INPUTS)
def test_bad_inputs_raise_value_error(name: str, corrupt, match: str, backend: str) -> None:
    args = _good()
    args[name] = corrupt(args)
    with pytest.raises(ValueError, match=match):
        dsbn(**args, backend=backend)


def test_bad_scalars_raise_value_error() -> None:
    with pytest.raises(ValueError, match="momentum"):
        dsbn(**_good(), momentum=1.5, backend="torch")
    with pytest.raises(ValueError, match="eps"):
        dsbn(**_good(), eps=0.0, backend="torch")


@needs_triton
def test_triton_rejects_noncontiguous_running_stats_and_float64() -> None:
    args = _good()
    args = {k: v.to(DEVICE) for k, v in args.items()}
    args["running_mean"] = args["running_mean"].t().contiguous().t()
    with pytest.raises(ValueError, match=r"running_mean of shape \(3, 5\) must be contiguous"):
        dsbn(**args, backend="triton")
    args = {k: v.to(DEVICE) for k, v in _good().items()}
    args["x"] = args["x"].double()
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        dsbn(**args, backend="triton")


# ------------------------------------------------------------------------------------------- backend selection
def test_resolve_backend_torch_auto_and_unknown() -> None:
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"  # never the slow interpreter
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", "cpu")


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"pip install 'scalex-scale\[gpu\]'"):
        resolve_backend("triton", "cpu")


def test_missing_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_mod, "_triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    assert not triton_available()
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(RuntimeError, match=r"triton cannot be imported.*pip install 'scalex-scale\[gpu\]'"):
        resolve_backend("triton", "cpu")
    with pytest.raises(RuntimeError, match=r"pip install 'scalex-scale\[gpu\]'"):
        dsbn(**_good(), backend="triton")


def test_auto_logs_choice_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(backend_mod, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="scalex_scale.kernels"):
        for _ in range(3):
            dsbn(**_good(), backend="auto")
    records = [r for r in caplog.records if "DSBN backend 'auto' chose" in r.getMessage()]
    assert len(records) == 1 and "'torch'" in records[0].getMessage()


def test_import_is_lazy_and_works_without_triton() -> None:
    """In a fresh process: importing the package does not import triton; with triton blocked, auto still works."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        import scalex_scale.kernels as k
        assert "triton" not in sys.modules, "triton imported eagerly"
        sys.modules["triton"] = None  # any later 'import triton' raises ImportError
        assert not k.triton_available()
        x = torch.randn(6, 4); d = torch.tensor([0, 1, 0, 1, 1, 0])
        w, b, rm, rv = torch.ones(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4)
        assert k.dsbn(x, d, w, b, rm, rv).shape == (6, 4)
        try:
            k.dsbn(x, d, w, b, rm, rv, backend="triton")
        except RuntimeError as e:
            assert "pip install 'scalex-scale[gpu]'" in str(e), e
        else:
            raise AssertionError("backend='triton' did not raise")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_public_api() -> None:
    for name in ("dsbn", "dsbn_reference", "triton_available", "resolve_backend"):
        assert name in kernels.__all__ and callable(getattr(kernels, name))
