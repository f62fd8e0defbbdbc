"""The divergence watch: a non-finite training loss stops the run with an error, never a "trained" model.

What is watched is the running sum of the epoch's per-batch losses (the Trainer's on-device float64 ``_sums[0]``):
it is finite exactly while every loss of the epoch so far is (a float64 sum of finite float32 losses cannot
overflow, and NaN or inf stays in it). So reading one number tells whether anything went wrong since the epoch
began, and the Trainer reads it anyway once per epoch.

How often, without adding a host sync per step:

- on the CPU a read is a plain memory load (no queue to drain; through a NumPy view of the sums, so not even an
  ``aten::item`` call, which :mod:`scalex_scale.train.profiling` counts as a sync): checked after every step, so
  the error names the exact iteration;
- on CUDA, every :data:`CUDA_CHECK_EVERY` steps the sum is copied into pinned host memory without blocking and
  an event recorded; the copy is read at the next check point once the event (recorded that many steps
  earlier) reports done (``cudaEventQuery``, which never blocks; not done, it is looked at again next time). So
  no step waits on the device: one async copy per 200 steps is the whole cost. The error then names the window
  of iterations in which the loss became non-finite (a few hundred steps, well under a second of GPU time);
- with data parallelism (a ``reduce_epoch_loss`` hook) only at the epoch's end, where the reduced loss makes
  every rank take the same decision (a rank raising alone would leave the others waiting in a collective).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scalex_scale.errors import TrainingDivergedError

__all__ = ["CUDA_CHECK_EVERY", "LossWatch", "diverged_error"]

#: Steps between two (lagged, non-blocking) reads of the running loss on CUDA.
CUDA_CHECK_EVERY = 200


def diverged_error(what: str, config: Any) -> TrainingDivergedError:
    """The one-line error for a diverged run: ``what`` happened where, and what to try."""
    hints = [f"a lower --lr (now {config.lr:g}; the default is 2e-4)"]
    if getattr(config, "precision", "fp32") != "fp32":
        hints.append(f"--precision fp32 (now {config.precision})")
    hints.append("inputs of raw counts (preprocess log-normalizes and MaxAbs-scales them; already transformed "
                 "or unscaled inputs can diverge)")  # fmt: skip
    return TrainingDivergedError(f"training diverged: {what}; try " + ", ".join(hints))


def _loss(value: float, where: str) -> str:
    return f"the loss became non-finite ({value}) {where}"


class LossWatch:
    """Checks the Trainer's running epoch loss sum; raises :class:`TrainingDivergedError` when it is not finite."""

    def __init__(self, sums: torch.Tensor, config: Any, *, every_step: bool | None = None) -> None:
        self.sums = sums
        self.config = config
        self.cuda = sums.device.type == "cuda"
        self.enabled = True
        self.finite_through = 0  # the last iteration known to have a finite loss
        self._pending: int | None = None  # iteration of the copy in flight (CUDA)
        if self.cuda:
            self._host = torch.empty(1, dtype=sums.dtype, pin_memory=True)
            self._host_view = self._host.numpy()  # read without an aten::item call
            self._event = torch.cuda.Event()
        else:
            self._view = sums.numpy()  # shares the memory: the Trainer never reallocates its sums

    def reset(self, iteration: int) -> None:
        """A run (re)starts at ``iteration``: what came before was checked (or resumed from a saved state)."""
        self.finite_through = iteration
        self._pending = None

    def after_step(self, iteration: int, epoch: int) -> None:
        """Called after each optimizer step; ``iteration`` counts the steps run so far."""
        if not self.enabled:
            return
        if not self.cuda:
            value = float(self._view[0])
            if not math.isfinite(value):
                raise diverged_error(_loss(value, f"at iteration {iteration:,} (epoch {epoch})"), self.config)
            self.finite_through = iteration
            return
        if iteration % CUDA_CHECK_EVERY:
            return
        if self._pending is not None:
            if not self._event.query():  # not done yet (a deep queue): look again at the next check point
                return
            self._check(float(self._host_view[0]), self._pending, epoch)
        self._host.copy_(self.sums[:1], non_blocking=True)
        self._event.record()
        self._pending = iteration

    def _check(self, value: float, iteration: int, epoch: int) -> None:
        if math.isfinite(value):
            self.finite_through = max(self.finite_through, iteration)
            return
        first = self.finite_through + 1
        where = f"at iteration {iteration:,}" if first >= iteration else f"between iterations {first:,} and {iteration:,}"
        raise diverged_error(_loss(value, f"{where} (epoch {epoch}; checked every {CUDA_CHECK_EVERY} on CUDA)"), self.config)

    def now(self, iteration: int, epoch: int) -> None:
        """A synchronous check (before a checkpoint is taken mid-epoch)."""
        if self.cuda:
            self._pending = None
        self._check(float(self.sums[0]), iteration, epoch)

    def epoch_end(self, loss_sum: float, iteration: int, epoch: int) -> None:
        """The epoch's (reduced) loss sum, read by the Trainer's one sync per epoch."""
        self._pending = None  # the epoch's sum covers it
        if math.isfinite(loss_sum):
            self.finite_through = iteration
            return
        first = self.finite_through + 1
        where = f"at iteration {iteration:,}" if first >= iteration else f"between iterations {first:,} and {iteration:,}"
        raise diverged_error(_loss(loss_sum, f"{where} (epoch {epoch})"), self.config)
