"""What one training step launches: the torch profiler over the Trainer's real loop.

The eager step on a GPU is bound by kernel launches (a few microseconds of host time each), so the
number of device operations per step is the number to cut. :func:`count_step_ops` runs
:meth:`Trainer.fit` twice on one repeated batch (``k1`` and ``k2`` steps, fresh trainers, same
config), profiles both, and reports the difference divided by ``k2 - k1``: warm-up, CUDA-graph
capture and the epoch bookkeeping cancel, what remains is the steady-state step, densify included.

Counted per step:

- ``ops``: leaf ``aten::`` operators (all threads: the backward may run on autograd's device thread) that do work (views, allocations and
  other metadata-only operators are left out). On a CPU this is the number of kernels the same step
  launches on CUDA (the same aten operators dispatch there), give or take fused implementations.
- ``triton``: launches of the Triton DSBN kernels (counted at the launcher; under
  ``TRITON_INTERPRET=1`` on a CPU too), so ``ops + triton`` estimates the kernels of the CUDA step.
- ``host_syncs``: ``aten::item`` / ``aten::_local_scalar_dense`` calls (each a device-to-host sync
  on CUDA) and, on CUDA, the runtime's synchronize calls.
- on CUDA only: ``kernels`` (device activity: kernels, memcpys, memsets; a replayed graph's kernels
  are counted too), ``launches`` (host-side runtime launch/copy calls; a graph replay is one) and
  ``h2d_copies`` (host-to-device memcpys).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from scalex_scale.nn.vae import SCALEXModule
from scalex_scale.train.config import TrainConfig
from scalex_scale.train.trainer import Trainer

__all__ = ["KERNEL_OPS", "METADATA_OPS", "StepOps", "count_step_ops", "leaf_op_counts"]

#: aten operators that launch no kernel (views, shape/stride changes, allocations, autograd plumbing).
METADATA_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute", "expand", "expand_as",
        "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "narrow", "chunk", "unbind",
        "alias", "detach", "detach_", "lift_fresh", "empty", "empty_like", "empty_strided", "resize_",
        "set_", "view_as", "resolve_conj", "resolve_neg", "_reshape_alias", "flatten", "unflatten",
        "contiguous", "is_nonzero", "result_type", "promote_types", "scalar_tensor", "to", "requires_grad_",
        "pin_memory", "is_pinned", "record_stream", "new_empty", "new_empty_strided", "lift",
        "_local_scalar_dense", "item",
    )
)  # fmt: skip

#: aten operators counted as ONE kernel whatever they call inside (their CPU helpers, e.g. the bias
#: copy of addmm or the output fill of a reduction, are not separate kernels on CUDA).
KERNEL_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "addmm", "mm", "bmm", "baddbmm", "native_batch_norm", "native_batch_norm_backward", "cudnn_batch_norm",
        "cudnn_batch_norm_backward", "_fused_adam_", "_fused_adamw_", "log_sigmoid_forward", "sum", "mean",
        "cumsum", "sort", "scatter_", "index_put_", "_index_put_impl_", "index_add_", "index_select", "pow",
        "normal_", "uniform_",
    )
)  # fmt: skip

_SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")
TRITON_RANGE = "scalex::triton_launch"
_COPY_OPS = ("aten::copy_", "aten::_to_copy")


def _is_aten(name: str) -> bool:
    return name.startswith("aten::")


def _scalar_wrap(ev: Any) -> bool:
    """A copy of a 0-dim tensor inside another operator: a Python scalar wrapped on the CPU (a kernel
    argument on CUDA, no kernel)."""
    if ev.name not in _COPY_OPS or ev.cpu_parent is None or not _is_aten(ev.cpu_parent.name):
        return False
    shapes = getattr(ev, "input_shapes", None) or []
    return all(isinstance(s, list) and len(s) == 0 for s in shapes[:2]) and bool(shapes)


def leaf_op_counts(events: Any, thread: int | None = None) -> tuple[collections.Counter[str], int]:
    """Kernel-equivalent aten operators in profiler ``events`` (recorded with ``record_shapes=True``),
    and the number of host syncs.

    An operator counts when it is in :data:`KERNEL_OPS` or is a ``_foreach_`` operator (one
    multi-tensor kernel on CUDA; on a CPU it loops over the tensors), its descendants then do not;
    or when it does work (not in :data:`METADATA_OPS`, not a scalar wrap) and no descendant counts. ``thread``:
    keep only the events of this thread id (the profiler's ``FunctionEvent.thread``).
    """
    counts: collections.Counter[str] = collections.Counter()
    syncs = 0

    def visit(ev: Any) -> bool:
        """Count ``ev``'s subtree; True when something in it was counted."""
        if ev.name == TRITON_RANGE:  # counted at the launcher; under the interpreter its copies are no kernels
            return True
        if ev.name in _SYNC_OPS:
            nonlocal syncs
            if ev.name == "aten::_local_scalar_dense" or not any(
                c.name == "aten::_local_scalar_dense" for c in ev.cpu_children
            ):
                syncs += 1
        if ev.name in KERNEL_OPS or ev.name.startswith("aten::_foreach_"):  # a foreach op: one multi-tensor kernel
            counts[ev.name] += 1
            return True
        below = False
        for child in ev.cpu_children:
            below |= visit(child)
        if below or not _is_aten(ev.name) or ev.name in METADATA_OPS or _scalar_wrap(ev):
            return below
        counts[ev.name] += 1
        return True

    for ev in events:
        if ev.cpu_parent is None and (thread is None or ev.thread == thread):
            visit(ev)
    return counts, syncs


@dataclass(frozen=True)
class StepOps:
    """Steady-state operations of one training step (see the module docstring)."""

    device: str
    precision: str
    cuda_graphs: bool
    compile: bool
    batch_size: int
    steps: int
    ops: float
    host_syncs: float
    triton: float = 0.0
    kernels: float | None = None
    launches: float | None = None
    h2d_copies: float | None = None
    by_name: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _RepeatLoader:
    """An EpochLoader yielding one batch over and over (one long epoch)."""

    def __init__(self, batch: Any, n: int) -> None:
        if getattr(batch, "lease", None) is not None:  # a pinned-ring batch: reused here, never handed back
            batch = dataclasses.replace(batch, lease=None)
        self.batch, self.n = batch, n

    @property
    def batches_per_epoch(self) -> int:
        return self.n

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        for _ in range(start_batch, self.n):
            yield self.batch


def _cuda_counts(prof: Any) -> tuple[int, int, int, int]:
    """(device activities, host launch/copy calls, host sync calls, host-to-device memcpys) of a CUDA profile."""
    kernels = launches = syncs = h2d = 0
    for ev in prof.events():
        name = ev.name
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            if "Memcpy HtoD" in name:
                h2d += 1
            continue
        if name.startswith(("cuda", "cu")) and ("Launch" in name or "Memcpy" in name or "Memset" in name):
            launches += 1
        if name.startswith(("cuda", "cu")) and "Synchronize" in name:
            syncs += 1
    return kernels, launches, syncs, h2d


class _CountingKernel:
    """Stands in for a ``@triton.jit`` kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel: Any, counter: collections.Counter[str], name: str) -> None:
        self._kernel, self._counter, self._name = kernel, counter, name

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = self._kernel[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            self._counter[self._name] += 1
            with torch.profiler.record_function(TRITON_RANGE):
                return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def _count_triton_launches() -> Iterator[collections.Counter[str]]:
    """Count launches of the DSBN Triton kernels (when their module is loaded) while the block runs."""
    counter: collections.Counter[str] = collections.Counter()
    module = sys.modules.get("scalex_scale.kernels.dsbn_triton")
    saved = {}
    if module is not None:
        for name in dir(module):
            if name.endswith("_kernel"):
                saved[name] = getattr(module, name)
                setattr(module, name, _CountingKernel(saved[name], counter, name))
    try:
        yield counter
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def _profile_fit(
    make_module: Callable[[], SCALEXModule], config: TrainConfig, batch: Any, steps: int
) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    cfg = TrainConfig.from_dict({**config.to_dict(), "max_iterations": steps, "progress": False, "patience": 10**6})
    trainer = Trainer(make_module(), cfg)
    on_cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize(trainer.device)
    if trainer.dsbn_backend == "triton":
        importlib.import_module("scalex_scale.kernels.dsbn_launch")  # so that its kernels can be counted
    with _count_triton_launches() as launches, profile(activities=activities, record_shapes=True) as prof:
        trainer.fit(_RepeatLoader(batch, steps + 1))
        if on_cuda:
            torch.cuda.synchronize(trainer.device)
    # every thread: on CUDA the backward runs on the autograd engine's device thread (the repeated batch
    # involves no loader threads)
    counts, syncs = leaf_op_counts(prof.events())
    out: dict[str, Any] = {"counts": counts, "syncs": syncs, "triton": sum(launches.values())}
    if on_cuda:
        out["kernels"], out["launches"], out["cuda_syncs"], out["h2d"] = _cuda_counts(prof)
    return out


def count_step_ops(
    make_module: Callable[[], SCALEXModule],
    config: TrainConfig,
    batch: Any,
    *,
    k1: int = 8,
    k2: int = 24,
) -> StepOps:
    """Steady-state operations per training step of ``Trainer(make_module(), config)`` on ``batch``.

    Parameters
    ----------
    make_module
        Builds a fresh module (called twice).
    config
        The training configuration (device, precision, cuda_graphs, compile); ``max_iterations``,
        ``progress`` and ``patience`` are overridden.
    batch
        One batch as the loader yields it (a :class:`~scalex_scale.data.batch.CSRBatch`), repeated.
    k1, k2
        Lengths of the two profiled runs; both must exceed the CUDA-graph warm-up and capture steps.
    """
    if not 0 < k1 < k2:
        raise ValueError(f"need 0 < k1 < k2, got {k1}, {k2}")
    a = _profile_fit(make_module, config, batch, k1)
    b = _profile_fit(make_module, config, batch, k2)
    n = k2 - k1
    names = set(a["counts"]) | set(b["counts"])
    by_name = {k: (b["counts"][k] - a["counts"][k]) / n for k in sorted(names)}
    by_name = {k: v for k, v in by_name.items() if v != 0}
    extra: dict[str, float] = {}
    if "kernels" in a:
        extra = {
            "kernels": (b["kernels"] - a["kernels"]) / n,
            "launches": (b["launches"] - a["launches"]) / n,
            "h2d_copies": (b["h2d"] - a["h2d"]) / n,
        }
        syncs = (b["syncs"] + b["cuda_syncs"] - a["syncs"] - a["cuda_syncs"]) / n
    else:
        syncs = (b["syncs"] - a["syncs"]) / n
    return StepOps(
        device=str(config.device),
        precision=config.precision,
        cuda_graphs=config.cuda_graphs,
        compile=config.compile,
        batch_size=int(getattr(batch, "n_cells", 0)),
        steps=n,
        ops=sum(by_name.values()),
        host_syncs=syncs,
        triton=(b["triton"] - a["triton"]) / n,
        by_name=by_name,
        **extra,
    )
