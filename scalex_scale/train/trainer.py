"""The SCALEX training loop: Adam, early stopping on the epoch-mean loss, resumable state.

The loop lives apart from the module (:mod:`scalex_scale.nn`) and from files
(:mod:`scalex_scale.train.checkpoint`). Device-to-host syncs happen once per epoch (reading the
epoch's loss sums), once per ``log_every`` steps when the progress bar is shown, when a
:class:`TrainerState` snapshot is taken, and once at the end for the timing. On CUDA each batch
is copied to the device one step ahead, on a side stream (one copy of a packed batch), and
densified on the compute stream; ``bench/step_ops.py`` counts what one step launches.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from scalex_scale.data.device import device_batches
from scalex_scale.nn.vae import LossOutput, SCALEXModule
from scalex_scale.train.config import TrainConfig, cpu_has_bf16, resolve_device

if TYPE_CHECKING:
    from scalex_scale.data.batch import CSRBatch, StagedBatch

#: Warm-up steps (eager, on a side stream) before a CUDA graph is captured.
GRAPH_WARMUP_STEPS = 3

#: Adam switches that describe the implementation, not the optimization; never restored from a state.
_OPTIMIZER_IMPL_KEYS = ("fused", "capturable", "foreach", "differentiable")


class EpochLoader(Protocol):
    """What :meth:`Trainer.fit` needs from a loader.

    ``epoch(e, start_batch=b)`` must yield the same batches as ``epoch(e)`` from its ``b``-th batch
    on (that makes mid-epoch resume exact). Batches need ``stage(device)`` and ``n_cells``
    (:class:`~scalex_scale.data.batch.CSRBatch` has them); the Trainer stages each batch once, one
    batch ahead of the step (:func:`~scalex_scale.data.device.device_batches`).
    """

    @property
    def batches_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[CSRBatch]: ...


ReduceEpochLoss = Callable[[torch.Tensor], torch.Tensor]
"""Hook for data parallelism: receives the (4,) float64 device tensor
``[sum loss, sum recon, sum kl, n_batches]`` of this rank's epoch and returns the sum over ranks."""


def all_reduce_epoch_loss(group: Any = None) -> ReduceEpochLoss:
    """A :data:`ReduceEpochLoss` that sums over the ranks of ``group`` with ``torch.distributed``.

    Every rank then sees the same epoch loss, so early-stopping decisions agree across ranks.
    """
    import torch.distributed as dist

    def reduce(totals: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
        return totals

    return reduce


@dataclass(frozen=True)
class EpochRecord:
    """Mean losses of one epoch (means of the per-batch losses)."""

    epoch: int
    loss: float
    recon: float
    kl: float
    n_batches: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "loss": self.loss,
            "recon": self.recon,
            "kl": self.kl,
            "n_batches": self.n_batches,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochRecord:
        return cls(
            epoch=int(data["epoch"]),
            loss=float(data["loss"]),
            recon=float(data["recon"]),
            kl=float(data["kl"]),
            n_batches=int(data["n_batches"]),
        )


@dataclass(frozen=True)
class TrainResult:
    """Summary of one :meth:`Trainer.fit` call.

    Attributes
    ----------
    history
        One record per epoch run so far (including epochs of resumed-from runs).
    n_iterations
        Total optimizer steps so far.
    n_epochs
        ``len(history)``.
    best_epoch, best_loss
        Epoch with the lowest epoch-mean loss and that loss (None / inf before any epoch).
    stopped_early
        Early stopping fired (patience exhausted, or a non-finite epoch loss).
    completed
        Training finished (budget spent or stopped early) and the best weights were restored.
        False when paused by ``pause_at_iteration`` or by ``on_epoch_end``: the module then holds
        its current weights and :meth:`Trainer.state` resumes the run.
    seconds, cells_per_second
        Wall time and throughput of this call.
    """

    history: tuple[EpochRecord, ...]
    n_iterations: int
    n_epochs: int
    best_epoch: int | None
    best_loss: float
    stopped_early: bool
    completed: bool
    seconds: float
    cells_per_second: float


@dataclass(frozen=True)
class TrainerState:
    """Everything needed to resume training exactly: a CPU snapshot from :meth:`Trainer.state`.

    ``epoch`` is the epoch in progress and ``batch`` the number of its batches already run, so a
    resumed run calls ``loader.epoch(epoch, start_batch=batch)``; ``epoch_sums`` holds the partial
    sums (loss, recon, kl) of that epoch, accumulated in float64 (float32 in states written before).
    """

    epoch: int
    batch: int
    iteration: int
    best_loss: float
    best_epoch: int | None
    bad_epochs: int
    stopped_early: bool
    history: tuple[EpochRecord, ...]
    epoch_sums: torch.Tensor
    model_state: dict[str, torch.Tensor]
    best_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any]
    generator_state: torch.Tensor
    seconds: float = 0.0
    cells: int = 0


@dataclass
class _Progress:
    """Mutable counters of a run (host-side Python values only)."""

    epoch: int = 0
    batch: int = 0
    iteration: int = 0
    best_loss: float = math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0
    cells: int = 0


def _to_cpu(value: Any) -> Any:
    """Deep copy of a nested dict/list/tuple, tensors detached and copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class Trainer:
    """Trains a :class:`~scalex_scale.nn.SCALEXModule` with Adam and early stopping.

    Parameters
    ----------
    module
        The module; moved in place to the configured device.
    config
        Hyper-parameters and runtime switches.
    train_module
        Optional wrapper of ``module`` used for the training forward (e.g.
        ``DistributedDataParallel(module)``); its ``forward(x, domain, *, kl_weight, noise)`` must
        return a :class:`~scalex_scale.nn.LossOutput`. Defaults to ``module``.
    reduce_epoch_loss
        Optional :data:`ReduceEpochLoss` (e.g. :func:`all_reduce_epoch_loss`) applied to the epoch
        sums before early stopping, so that all ranks take the same decision.

    Raises
    ------
    RuntimeError
        CUDA requested but unavailable.
    ValueError
        ``cuda_graphs=True`` on a CPU device, or ``precision="bf16"`` on a CPU without native bfloat16.
    """

    def __init__(
        self,
        module: SCALEXModule,
        config: TrainConfig | None = None,
        *,
        train_module: nn.Module | None = None,
        reduce_epoch_loss: ReduceEpochLoss | None = None,
    ) -> None:
        self.config = config if config is not None else TrainConfig()
        self.device = resolve_device(self.config.device)
        on_cuda = self.device.type == "cuda"
        if self.config.precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            raise ValueError(
                "precision='bf16' on CPU needs native bfloat16 matrix instructions (AVX512-BF16 or AMX), "
                "which this CPU lacks (emulated bf16 is slower than fp32); use precision='fp32'"
            )
        if self.config.cuda_graphs and not on_cuda:
            raise ValueError(
                f"cuda_graphs=True needs a CUDA device, but the device is {self.device}; "
                "set cuda_graphs=False"
            )
        self.module = module.to(self.device)
        # Fails early when the DSBN backend cannot run on this device; logs the choice once, before
        # any compilation.
        self.dsbn_backend = self.module.dsbn.resolved_backend(self.device)
        self.reduce_epoch_loss = reduce_epoch_loss
        forward: nn.Module = train_module if train_module is not None else module
        self._forward: Callable[..., LossOutput] = (
            torch.compile(forward) if self.config.compile else forward
        )
        self.optimizer = torch.optim.Adam(
            self.module.parameters(),
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
            # fused Adam on CPU too: ~5x faster than the default foreach step there (2M parameters per step)
            fused=True,
            **({"capturable": self.config.cuda_graphs} if on_cuda else {}),
        )
        self.generator = torch.Generator(device=self.device).manual_seed(int(self.config.seed))
        # Epoch sums (loss, recon, kl) accumulate here on the device, in float64 (a float32 sum of
        # 15k per-batch losses of ~1e3 would carry ~1e-3 relative error); never reallocated (a CUDA
        # graph captures its address).
        self._sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        self._progress = _Progress()
        self._best_state: dict[str, torch.Tensor] | None = None
        self._graph: _GraphedStep | None = _GraphedStep(self) if self.config.cuda_graphs else None

    # ---------------------------------------------------------------- state
    def state(self) -> TrainerState:
        """CPU snapshot of the run, for :func:`~scalex_scale.train.checkpoint.save_checkpoint`.

        Costs one device-to-host copy of the weights and the optimizer state.
        """
        p = self._progress
        return TrainerState(
            epoch=p.epoch,
            batch=p.batch,
            iteration=p.iteration,
            best_loss=p.best_loss,
            best_epoch=p.best_epoch,
            bad_epochs=p.bad_epochs,
            stopped_early=p.stopped_early,
            history=tuple(p.history),
            epoch_sums=_to_cpu(self._sums),
            model_state=_to_cpu(self.module.state_dict()),
            best_state=_to_cpu(self._best_state) if self._best_state is not None else None,
            optimizer_state=_to_cpu(self.optimizer.state_dict()),
            generator_state=self.generator.get_state().clone(),
            seconds=p.seconds,
            cells=p.cells,
        )

    def load_state(self, state: TrainerState) -> None:
        """Restore weights, optimizer, generator and counters from ``state``."""
        self.module.load_state_dict(state.model_state)
        saved = state.optimizer_state
        current_groups = self.optimizer.state_dict()["param_groups"]
        if len(saved["param_groups"]) != len(current_groups):
            raise ValueError("the trainer state's optimizer does not match this module's parameters")
        groups = []
        for saved_group, current in zip(saved["param_groups"], current_groups, strict=True):
            group = dict(saved_group)
            group["betas"] = tuple(group["betas"])
            for key in _OPTIMIZER_IMPL_KEYS:
                if key in current:
                    group[key] = current[key]
            groups.append(group)
        self.optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
        try:
            self.generator.set_state(state.generator_state)
        except RuntimeError as exc:
            raise ValueError(
                f"the trainer state's generator does not fit a {self.device.type} generator "
                "(it was saved on another device type); resume on the device type it was saved on"
            ) from exc
        if self.config.cuda_graphs:
            self._graph = _GraphedStep(self)  # the optimizer state tensors changed: capture again
        with torch.no_grad():
            self._sums.copy_(state.epoch_sums.to(self.device))
        self._best_state = (
            {k: v.to(self.device, copy=True) for k, v in state.best_state.items()}
            if state.best_state is not None
            else None
        )
        self._progress = _Progress(
            epoch=state.epoch,
            batch=state.batch,
            iteration=state.iteration,
            best_loss=state.best_loss,
            best_epoch=state.best_epoch,
            bad_epochs=state.bad_epochs,
            stopped_early=state.stopped_early,
            history=list(state.history),
            seconds=state.seconds,
            cells=state.cells,
        )

    # ----------------------------------------------------------------- step
    def _autocast(self, *, cache_enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
        if self.config.precision == "bf16":
            return torch.autocast(
                device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled
            )
        return contextlib.nullcontext()

    def _draw_noise(self, n_cells: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(
                n_cells, self.module.n_latent, device=self.device, dtype=torch.float32
            )
        return out.normal_(generator=self.generator)

    def _compute(self, x: torch.Tensor, domain: torch.Tensor, noise: torch.Tensor) -> None:
        """Forward, backward, Adam step and on-device loss accumulation; no host sync.

        Gradients must be None (they are written) or zero (they are accumulated into) on entry.
        """
        with self._autocast(cache_enabled=not self.config.cuda_graphs):
            out = self._forward(x, domain, kl_weight=self.config.kl_weight, noise=noise)
        out.loss.backward()
        self.optimizer.step()
        # float32 terms added into the float64 sums (one kernel: add_ casts)
        self._sums.add_(torch.stack([out.loss, out.recon, out.kl]).detach())

    def _eager_step(self, x: torch.Tensor, domain: torch.Tensor, *, set_to_none: bool = True) -> None:
        noise = self._draw_noise(x.shape[0])
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._compute(x, domain, noise)

    def _step(self, batch: StagedBatch) -> None:
        if self._graph is not None:
            self._graph(batch)
        else:
            self._eager_step(batch.densify(torch.float32), batch.domain)

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        loader: EpochLoader,
        *,
        start_state: TrainerState | None = None,
        on_epoch_end: Callable[[EpochRecord, Trainer], bool | None] | None = None,
        pause_at_iteration: int | None = None,
    ) -> TrainResult:
        """Train until ``max_iterations`` steps or early stopping.

        Parameters
        ----------
        loader
            An :class:`EpochLoader` yielding :class:`~scalex_scale.data.batch.CSRBatch` objects.
        start_state
            Resume from this snapshot (see :meth:`state`); without it, a fresh Trainer starts at
            epoch 0 and a used one continues where it stopped.
        on_epoch_end
            Called after each epoch's bookkeeping with the epoch's record and this trainer (so
            ``trainer.state()`` is a resume point at the next epoch). Returning True pauses training.
        pause_at_iteration
            Pause (resumably) before running step number ``pause_at_iteration``, e.g. mid-epoch.

        Returns
        -------
        TrainResult
            When ``completed``, the module holds the best weights and is in eval mode.
        """
        cfg = self.config
        n_batches = int(loader.batches_per_epoch)
        if n_batches < 1:
            raise ValueError(f"the loader has batches_per_epoch={n_batches}; need at least 1")
        if start_state is not None:
            self.load_state(start_state)
        p = self._progress
        n_epochs = math.ceil(cfg.max_iterations / n_batches)
        self.module.train()

        paused = False
        cells = 0
        start = time.perf_counter()
        bar = tqdm(
            total=cfg.max_iterations,
            initial=min(p.iteration, cfg.max_iterations),
            disable=not cfg.progress,
            unit="it",
            desc="train",
            dynamic_ncols=True,
        )
        try:
            while not p.stopped_early and p.epoch < n_epochs and p.iteration < cfg.max_iterations:
                if pause_at_iteration is not None and p.iteration >= pause_at_iteration:
                    paused = True
                    break
                batches = loader.epoch(p.epoch, start_batch=p.batch)
                try:
                    # host-to-device copies one batch ahead, on a side stream (CUDA)
                    for batch in device_batches(batches, self.device):
                        if p.iteration >= cfg.max_iterations:
                            break
                        if pause_at_iteration is not None and p.iteration >= pause_at_iteration:
                            paused = True
                            break
                        self._step(batch)
                        p.iteration += 1
                        p.batch += 1
                        cells += batch.n_cells
                        bar.update(1)
                        if cfg.progress and cfg.log_every and p.iteration % cfg.log_every == 0:
                            running = (self._sums[0] / p.batch).item()  # one sync per log interval
                            rate = cells / max(time.perf_counter() - start, 1e-9)
                            bar.set_postfix(loss=f"{running:.4g}", cells_s=f"{rate:,.0f}")
                finally:
                    close = getattr(batches, "close", None)
                    if close is not None:
                        close()
                if paused:
                    break
                record = self._end_epoch()
                if cfg.progress and record is not None:
                    rate = cells / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(
                        epoch=record.epoch, loss=f"{record.loss:.4g}", cells_s=f"{rate:,.0f}"
                    )
                if on_epoch_end is not None and record is not None:
                    if on_epoch_end(record, self) is True and not p.stopped_early:
                        paused = True
                        break
        finally:
            bar.close()

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        p.seconds += seconds
        p.cells += cells
        completed = not paused
        if completed:
            if self._best_state is not None:
                self.module.load_state_dict(self._best_state)
            self.module.eval()
        return TrainResult(
            history=tuple(p.history),
            n_iterations=p.iteration,
            n_epochs=len(p.history),
            best_epoch=p.best_epoch,
            best_loss=p.best_loss,
            stopped_early=p.stopped_early,
            completed=completed,
            seconds=seconds,
            cells_per_second=cells / seconds if seconds > 0 else 0.0,
        )

    def _end_epoch(self) -> EpochRecord | None:
        """Close the epoch in progress: record its means, update early stopping, reset the sums."""
        p = self._progress
        totals = torch.cat([self._sums, self._sums.new_tensor([float(p.batch)])])
        if self.reduce_epoch_loss is not None:
            totals = self.reduce_epoch_loss(totals)
        loss_sum, recon_sum, kl_sum, count = totals.tolist()  # the one sync per epoch
        record = None
        if count > 0:
            record = EpochRecord(
                epoch=p.epoch,
                loss=loss_sum / count,
                recon=recon_sum / count,
                kl=kl_sum / count,
                n_batches=int(round(count)),
            )
            p.history.append(record)
            if not math.isfinite(record.loss):
                p.stopped_early = True
            elif record.loss < p.best_loss:
                p.best_loss = record.loss
                p.best_epoch = record.epoch
                p.bad_epochs = 0
                self._best_state = {
                    k: v.detach().clone() for k, v in self.module.state_dict().items()
                }
            else:
                p.bad_epochs += 1
                if p.bad_epochs >= self.config.patience:
                    p.stopped_early = True
        self._sums.zero_()
        p.epoch += 1
        p.batch = 0
        return record


class _GraphedStep:
    """Whole-step CUDA graph: forward, backward, Adam (fused, capturable) and loss accumulation.

    The first :data:`GRAPH_WARMUP_STEPS` batches are ordinary eager steps on a side stream (they
    trigger lazy initialization, Triton autotuning and ``torch.compile``); the next batch fixes the
    static shapes, the step is captured once and then replayed for every batch. Each batch is
    densified straight into the static input buffer (no extra copy), its domains copied into the
    static domain buffer, and the reparameterization noise is drawn eagerly from the trainer's
    generator into a static buffer before each replay, so the generator advances exactly as in
    eager mode. A batch of another size (no drop_last) runs eagerly on the captured gradients.

    The capture runs in ``thread_local`` error mode: CUDA calls of OTHER threads during the capture
    (the loader thread waiting on a copy event, or pinning memory) are legal and do not invalidate
    it; only this thread must not call unsafe CUDA APIs, and nothing in the captured step does.
    (In the default ``global`` mode any thread's ``cudaEventQuery``/``cudaHostAlloc`` during the
    capture invalidates it, and the error then surfaces in whichever thread called.) The loader's
    pinned slots are allocated before the first batch is handed out, hence before the capture.

    Requires every op of the step to be capturable (no host syncs): the fused DSBN kernel is.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.graph: torch.cuda.CUDAGraph | None = None
        self.n_warm = 0
        self.static_x: torch.Tensor | None = None
        self.static_domain: torch.Tensor | None = None
        self.static_noise: torch.Tensor | None = None

    def __call__(self, batch: StagedBatch) -> None:
        t = self.trainer
        if self.graph is None:
            x, domain = batch.densify(torch.float32), batch.domain
            if self.n_warm < GRAPH_WARMUP_STEPS:
                side = torch.cuda.Stream(device=t.device)
                side.wait_stream(torch.cuda.current_stream(t.device))
                with torch.cuda.stream(side):
                    t._eager_step(x, domain)
                torch.cuda.current_stream(t.device).wait_stream(side)
                self.n_warm += 1
                return
            self._capture(x, domain)
        assert self.static_x is not None and self.static_domain is not None
        assert self.static_noise is not None and self.graph is not None
        if batch.n_cells != self.static_x.shape[0]:
            t._eager_step(batch.densify(torch.float32), batch.domain, set_to_none=False)
            return
        batch.densify(torch.float32, out=self.static_x)
        self.static_domain.copy_(batch.domain)
        t._draw_noise(batch.n_cells, out=self.static_noise)
        self.graph.replay()

    def _capture(self, x: torch.Tensor, domain: torch.Tensor) -> None:
        t = self.trainer
        self.static_x = torch.empty_like(x)
        self.static_domain = torch.empty_like(domain)
        self.static_noise = torch.empty(
            x.shape[0], t.module.n_latent, device=t.device, dtype=torch.float32
        )
        # Gradients are None during capture, so the captured backward writes (not accumulates)
        # them into graph-owned memory that the captured optimizer step reads.
        t.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            t._compute(self.static_x, self.static_domain, self.static_noise)
        self.graph = graph
