"""Benchmark DSBN forward + backward: the original SCALEX loop, the vectorized torch reference, the Triton kernels.

For B in {64, 512, 4096}, F = 2000, D in {2, 16, 256} (training mode, random unsorted domain ids; other shapes with
``--batch-sizes`` / ``--n-domains``), times one forward + backward call of

- ``loop``:   the original SCALEX 1.0.4 DSBN (Python loop over domains, ``np.where`` on host copies);
- ``torch``:  ``scalex_scale.kernels.dsbn_reference`` (vectorized, sync-free);
- ``triton``: the fused Triton kernels (CUDA only).

GPU: CUDA events after warm-up; CPU: ``time.perf_counter``. Writes ``dsbn.json`` and ``dsbn.csv`` under
``bench/results/<machine>/`` (or ``--out``), with machine info, versions and the git commit.

Usage::

    python bench/bench_dsbn.py                 # CUDA when available, else CPU
    python bench/bench_dsbn.py --device cpu --quick --threads 1
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from scalex_scale.kernels import dsbn, dsbn_loop_reference, dsbn_reference, triton_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import results_dir, write_json  # noqa: E402

DsbnFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class BenchConfig:
    """What to run."""

    device: torch.device
    batch_sizes: tuple[int, ...]
    n_features: int
    n_domains: tuple[int, ...]
    dtype: torch.dtype
    warmup: int
    repeats: int
    seed: int


@dataclass(frozen=True)
class Result:
    """One timed (method, shape) cell; times in milliseconds per forward + backward call."""

    method: str
    device: str
    dtype: str
    batch_size: int
    n_features: int
    n_domains: int
    ms_median: float
    ms_min: float
    repeats: int
    speedup_vs_loop: float | None = None


# --------------------------------------------------------------------------------------------------------- timing
def make_inputs(cfg: BenchConfig, n_rows: int, n_domains: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (n_domains, cfg.n_features)
    tensors = {
        "x": torch.randn(n_rows, cfg.n_features, generator=g).to(cfg.dtype),
        "domain": torch.randint(0, n_domains, (n_rows,), generator=g),
        "weight": torch.ones(shape),
        "bias": torch.zeros(shape),
        "running_mean": torch.zeros(shape),
        "running_var": torch.ones(shape),
        "grad": torch.randn(n_rows, cfg.n_features, generator=g).to(cfg.dtype),
    }
    tensors = {k: v.to(cfg.device) for k, v in tensors.items()}
    for k in ("x", "weight", "bias"):
        tensors[k].requires_grad_(True)
    return tensors


def step(fn: DsbnFn, t: dict[str, torch.Tensor]) -> None:
    """One training forward + backward (gradients of x, weight, bias)."""
    y = fn(t["x"], t["domain"], t["weight"], t["bias"], t["running_mean"], t["running_var"], training=True)
    torch.autograd.grad(y, (t["x"], t["weight"], t["bias"]), t["grad"])


def time_once_gpu(fn: DsbnFn, t: dict[str, torch.Tensor]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step(fn, t)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_once_cpu(fn: DsbnFn, t: dict[str, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    step(fn, t)
    return (time.perf_counter() - t0) * 1e3


def time_methods(
    fns: dict[str, DsbnFn], inputs: dict[str, dict[str, torch.Tensor]], cfg: BenchConfig
) -> dict[str, list[float]]:
    """Milliseconds per call for each method, repeats interleaved across methods (fair under shared machines)."""
    on_gpu = cfg.device.type == "cuda"
    timer = time_once_gpu if on_gpu else time_once_cpu
    for _ in range(cfg.warmup):
        for name, fn in fns.items():
            step(fn, inputs[name])
    if on_gpu:
        torch.cuda.synchronize(cfg.device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(cfg.repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn, inputs[name]))
    return times


def triton_dsbn(*args: torch.Tensor, **kw: object) -> torch.Tensor:
    return dsbn(*args, backend="triton", **kw)


def methods(device: torch.device) -> dict[str, DsbnFn]:
    out: dict[str, DsbnFn] = {"loop": dsbn_loop_reference, "torch": dsbn_reference}
    if device.type == "cuda" and triton_available(device):
        out["triton"] = triton_dsbn
    return out


def run_all(cfg: BenchConfig, on_shape: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Every (B, D) shape; ``on_shape(results so far)`` after each (e.g. to write the files as it goes)."""
    fns = methods(cfg.device)
    results: list[Result] = []
    for n_rows in cfg.batch_sizes:
        for n_domains in cfg.n_domains:
            inputs = {name: make_inputs(cfg, n_rows, n_domains) for name in fns}
            times = time_methods(fns, inputs, cfg)
            loop_ms = statistics.median(times["loop"])
            for name, ts in times.items():
                med = statistics.median(ts)
                r = Result(name, cfg.device.type, str(cfg.dtype).removeprefix("torch."), n_rows, cfg.n_features,
                           n_domains, med, min(ts), len(ts), round(loop_ms / med, 2))
                results.append(r)
                print(f"B={n_rows:5d} F={cfg.n_features} D={n_domains:4d} {name:7s} {med:9.3f} ms "
                      f"(min {min(ts):.3f}, x{r.speedup_vs_loop} vs loop)", flush=True)
            if on_shape is not None:
                on_shape(results)
    return results


# ------------------------------------------------------------------------------------------------------ output
def write_results(out_dir: Path, results: list[Result], cfg: BenchConfig, quiet: bool = False) -> None:
    """``dsbn.json`` (with the machine, versions and git commit of ``_env.header``) and ``dsbn.csv``."""
    payload = {
        "benchmark": "dsbn forward+backward (training mode), ms per call",
        "config": {**asdict(cfg), "device": str(cfg.device), "dtype": str(cfg.dtype)},
        "results": [asdict(r) for r in results],
    }
    write_json(out_dir / "dsbn.json", payload)
    with open(out_dir / "dsbn.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(results[0]).keys()) if results else ["method"])
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))
    if not quiet:
        print(f"wrote {out_dir / 'dsbn.json'} and {out_dir / 'dsbn.csv'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="B in {64, 512}, D in {2, 16}, few repeats (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<machine>)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-sizes", default=None, help="comma-separated B (default 64,512,4096; --quick 64,512)")
    p.add_argument("--n-domains", default=None, help="comma-separated D (default 2,16,256; --quick 2,16)")
    p.add_argument("--n-features", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method and shape")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> BenchConfig:
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    on_gpu = dev == "cuda"

    def ints(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
        return default if not text else tuple(int(v) for v in text.split(","))

    repeats = (5 if args.quick else 50) if on_gpu else (3 if args.quick else 10)
    return BenchConfig(
        device=torch.device(dev),
        batch_sizes=ints(args.batch_sizes, (64, 512) if args.quick else (64, 512, 4096)),
        n_features=int(args.n_features),
        n_domains=ints(args.n_domains, (2, 16) if args.quick else (2, 16, 256)),
        dtype=getattr(torch, args.dtype),
        warmup=(2 if args.quick else 10) if on_gpu else 1,
        repeats=int(args.repeats) if args.repeats else repeats,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args)
    out = results_dir(args.out, device=cfg.device.type)
    results = run_all(cfg, on_shape=lambda so_far: write_results(out, so_far, cfg, quiet=True))
    write_results(out, results, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
