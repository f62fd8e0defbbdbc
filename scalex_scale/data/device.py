"""Batches onto the training device ahead of the step: copies on a side stream, double-buffered.

:func:`device_batches` turns an iterator of :class:`~scalex_scale.data.batch.CSRBatch` into
:class:`~scalex_scale.data.batch.StagedBatch` es on the device. On CUDA it issues the host-to-device
copy of batch ``i + 1`` on a dedicated copy stream before it hands out batch ``i``, so that copy
overlaps the step of batch ``i`` on the compute stream; the compute stream waits for a batch's
copy with an event (no host sync), and each staged tensor is marked as used by the compute
stream (``record_stream``) so the caching allocator does not recycle it early. Elsewhere (CPU) the
batches are staged in place (no copy).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .batch import StagedBatch

__all__ = ["device_batches"]


def device_batches(batches: Iterable[Any], device: torch.device | str, *, ahead: int = 1) -> Iterator[StagedBatch]:
    """Stage ``batches`` on ``device``, ``ahead`` batches in advance on CUDA.

    Parameters
    ----------
    batches
        Objects with ``stage(device) -> StagedBatch`` (``CSRBatch``).
    device
        Target device.
    ahead
        Batches copied ahead of the one handed out (1: double buffering). Each costs the device
        memory of one compact batch.

    Yields
    ------
    StagedBatch
        Ready for use on the current stream of ``device``.
    """
    device = torch.device(device)
    it = iter(batches)
    if device.type != "cuda":
        for batch in it:
            yield batch.stage(device)
        return
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1, got {ahead}")
    copy_stream = torch.cuda.Stream(device=device)
    pending: deque[tuple[StagedBatch, torch.cuda.Event]] = deque()

    def issue() -> bool:
        batch = next(it, None)
        if batch is None:
            return False
        with torch.cuda.stream(copy_stream):
            staged = batch.stage(device)  # records the event that hands its pinned slot back
            done = torch.cuda.Event()
            done.record(copy_stream)
        pending.append((staged, done))
        return True

    for _ in range(ahead):
        if not issue():
            break
    while pending:
        staged, done = pending.popleft()
        issue()  # the next copy is queued before this batch's step
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)
        for t in staged.tensors():
            t.record_stream(compute)
        yield staged
