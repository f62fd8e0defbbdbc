"""A ring of page-locked (pinned) host buffers that the loader packs batches into and reuses.

Why not ``tensor.pin_memory()`` per batch: each call goes through the caching host allocator, which
may call ``cudaHostAlloc`` and query CUDA events from the loader thread at any time, also while the
training thread captures a CUDA graph; and batch sizes in bytes vary, so new blocks keep being
allocated. The ring allocates its slots once, when the first buffer of data arrives (so before the
first training step, hence before any graph capture), with headroom over the largest batch seen;
a slot grows (one new allocation) only for a batch larger than its capacity, counted in
:attr:`PinnedRing.grown`.

Hand-back: the consumer stages a batch on the device (:meth:`CSRBatch.stage`), which records a CUDA
event after the copy and releases the slot with it; :meth:`PinnedRing.acquire` waits for that event
before the slot is overwritten (``cudaEventSynchronize`` from the loader thread: legal during a
``thread_local`` graph capture of the training thread). A batch that is dropped without being
staged releases its slot when it is garbage collected.

Deadlock guard: when every slot is held by batches the consumer has taken but neither staged nor
dropped (e.g. it collects them in a list) and no batch waits in the queue, the ring adds a slot
instead of waiting forever.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PinnedRing"]

_MIN_SLOT_BYTES = 1 << 16
_HEADROOM = 1.5


class PinnedRing:
    """``n_slots`` pinned uint8 buffers, handed out one batch at a time.

    Parameters
    ----------
    n_slots
        Slots to cycle through (more are added only by the deadlock guard).
    allocate
        ``allocate(n_bytes) -> torch.Tensor``: a uint8 host tensor (default: pinned).
    """

    def __init__(self, n_slots: int, allocate: Callable[[int], torch.Tensor] | None = None) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self._allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self._slots: list[torch.Tensor | None] = [None] * n_slots
        self._events: list[Any] = [None] * n_slots
        self._free: deque[int] = deque(range(n_slots))
        self._cond = threading.Condition()
        self.grown = 0
        self.added = 0
        self.allocated_bytes = 0

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    def reserve(self, n_bytes: int) -> None:
        """Allocate every slot now with ``headroom x n_bytes`` (call before the first batch is handed out)."""
        size = max(_MIN_SLOT_BYTES, int(n_bytes * _HEADROOM))
        with self._cond:
            for i, slot in enumerate(self._slots):
                if slot is None or slot.numel() < size:
                    self._slots[i] = self._allocate(size)
                    self.allocated_bytes += size

    def acquire(self, n_bytes: int, *, stop: threading.Event, consumer_starved: Callable[[], bool]) -> tuple[int, torch.Tensor] | None:
        """A free slot of at least ``n_bytes``: ``(slot id, uint8 tensor)``; None once ``stop`` is set.

        Waits for a slot to be released, then for the device copy out of it to finish.
        ``consumer_starved()`` tells whether the consumer waits with nothing queued (deadlock guard).
        """
        with self._cond:
            starved = 0
            while not self._free:
                if stop.is_set():
                    return None
                starved = starved + 1 if consumer_starved() else 0
                if starved >= 3:  # three polls in a row (0.1 s): not a consumer between get() and stage()
                    self._slots.append(None)
                    self._events.append(None)
                    self._free.append(len(self._slots) - 1)
                    self.added += 1
                    break
                self._cond.wait(timeout=0.05)
            index = self._free.popleft()
            event, self._events[index] = self._events[index], None
        if event is not None:
            event.synchronize()
        slot = self._slots[index]
        if slot is None or slot.numel() < n_bytes:
            if slot is not None:
                self.grown += 1
            size = max(_MIN_SLOT_BYTES, int(n_bytes * _HEADROOM))
            slot = self._allocate(size)
            self.allocated_bytes += size - (0 if self._slots[index] is None else self._slots[index].numel())
            self._slots[index] = slot
        return index, slot

    def release(self, index: int, event: Any = None) -> None:
        """Hand slot ``index`` back; it is reused once ``event`` (if any) has completed."""
        with self._cond:
            self._events[index] = event
            self._free.append(index)
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        """Slots, bytes allocated, slots grown for larger batches, slots added by the deadlock guard."""
        return {"slots": self.n_slots, "allocated_bytes": self.allocated_bytes, "grown": self.grown, "added": self.added}
