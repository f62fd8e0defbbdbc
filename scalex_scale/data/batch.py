"""The unit that travels from the loader to the training step: a compact CSR mini-batch.

On its way to a CUDA device a batch costs ONE host-to-device copy and three kernels:

- the loader computes each value's flat destination ``row * n_features + column`` (``flat``) on the
  CPU, in its reader threads, and (with ``pin_memory``) packs ``domain``, ``flat`` and ``values``
  into one page-locked byte buffer (``packed``);
- :meth:`CSRBatch.stage` copies that buffer to the device (one non-blocking copy) and splits it
  there into views (no kernel);
- :meth:`StagedBatch.densify` writes the dense matrix with a fill, a cast of the values and one
  ``index_add_`` at the flat positions (each position appears once, so the add of a value to zero
  is exact).

Without ``flat`` (batches built by hand) the row of each value is computed on the device from
``indptr`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CSRBatch", "StagedBatch", "pack_layout"]

_ALIGN = 16


def pack_layout(n_cells: int, nnz: int, flat_dtype: torch.dtype, value_dtype: torch.dtype) -> tuple[int, ...]:
    """Byte offsets ``(domain, flat, values, end)`` of a packed batch; each section 16-byte aligned.

    ``domain`` is int64 ``(n_cells,)``; ``flat`` ``(nnz,)`` of ``flat_dtype``; ``values`` ``(nnz,)``.
    """

    def up(n: int) -> int:
        return -(-n // _ALIGN) * _ALIGN

    o_flat = up(8 * n_cells)
    o_values = o_flat + up(nnz * torch.empty((), dtype=flat_dtype).element_size())
    end = o_values + up(nnz * torch.empty((), dtype=value_dtype).element_size())
    return 0, o_flat, o_values, end


@dataclass(frozen=True)
class StagedBatch:
    """A batch whose raw arrays are on the training device (ready for the current stream).

    Attributes
    ----------
    domain
        (n_cells,) int64 domain codes.
    values
        (nnz,) float16 or float32 values.
    flat
        (nnz,) int32 or int64 flat positions ``row * n_features + column``, or None (then
        ``indptr`` and ``indices`` are set).
    n_cells, n_features
        Dense shape.
    """

    domain: torch.Tensor
    values: torch.Tensor
    flat: torch.Tensor | None
    n_cells: int
    n_features: int
    indptr: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every device tensor of the batch (for ``record_stream``)."""
        return tuple(t for t in (self.domain, self.values, self.flat, self.indptr, self.indices) if t is not None)

    def densify(
        self, dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The (n_cells, n_features) dense matrix; written into ``out`` when given (same shape, ``dtype``).

        No host synchronization: three kernels with ``flat`` (fill, cast, ``index_add_``).
        """
        n, f = self.n_cells, self.n_features
        if out is None:
            x = torch.zeros(n * f, device=self.values.device, dtype=dtype)
        else:
            if tuple(out.shape) != (n, f) or out.dtype != dtype or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous ({n}, {f}) {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
            x = out.view(-1)
            x.zero_()
        flat = self.flat
        if flat is None:
            assert self.indptr is not None and self.indices is not None
            counts = self.indptr[1:] - self.indptr[:-1]
            rows = torch.repeat_interleave(
                torch.arange(n, device=x.device), counts, output_size=self.values.shape[0]
            )
            flat = rows * f + self.indices
        x.index_add_(0, flat, self.values.to(dtype))
        return x.view(n, f)


class _Lease:
    """One-shot release of the pinned slot a batch lives in (see the loader's ring)."""

    __slots__ = ("_release", "released")

    def __init__(self, release: Callable[[Any], None]) -> None:
        self._release = release
        self.released = False

    def __call__(self, event: Any = None) -> None:
        if not self.released:
            self.released = True
            self._release(event)


@dataclass(frozen=True)
class CSRBatch:
    """A mini-batch of cells as compact CSR, densified on the device.

    Attributes
    ----------
    indptr
        (n_cells + 1,) int64 row pointers, starting at 0.
    indices
        (nnz,) int32 feature indices.
    values
        (nnz,) float16 or float32 scaled expression values in [0, 1].
    domain
        (n_cells,) int64 batch (domain) codes.
    n_features
        Width of the dense matrix.
    flat
        Optional (nnz,) int32/int64 flat positions ``row * n_features + column`` (the loader sets it).
    packed
        Optional page-locked uint8 buffer that holds ``domain``, ``flat`` and ``values`` (those three
        are views of it, at :func:`pack_layout` offsets): one host-to-device copy moves the batch.
        A packed batch lives in a slot of the loader's pinned ring: it may be staged on a device
        once, after which the loader reuses the slot (its host tensors are then no longer valid).
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    domain: torch.Tensor
    n_features: int
    flat: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    lease: _Lease | None = field(default=None, compare=False, repr=False)

    @property
    def n_cells(self) -> int:
        return int(self.domain.shape[0])

    def pin_memory(self) -> CSRBatch:
        """A copy of the batch in page-locked memory (each tensor pinned on its own)."""
        return CSRBatch(
            self.indptr.pin_memory(),
            self.indices.pin_memory(),
            self.values.pin_memory(),
            self.domain.pin_memory(),
            self.n_features,
            None if self.flat is None else self.flat.pin_memory(),
        )

    def stage(self, device: torch.device | str) -> StagedBatch:
        """Copy the batch's arrays to ``device`` (non-blocking; one copy when packed) on the current stream.

        On CUDA, a packed batch's pinned slot is handed back to the loader with an event recorded
        after the copy, so the loader overwrites it only once the copy is done.

        Raises
        ------
        RuntimeError
            A packed batch staged a second time (its slot may already hold another batch).
        """
        device = torch.device(device)
        lease = self.lease
        if lease is not None and lease.released:
            raise RuntimeError(
                "this pinned batch was already copied to the device and its buffer handed back to the loader; "
                "stage each batch once"
            )
        n, f = self.n_cells, self.n_features
        if self.packed is not None and self.flat is not None and device.type != "cpu":
            buf = self.packed.to(device, non_blocking=True)
            o_dom, o_flat, o_val, _ = pack_layout(n, self.values.shape[0], self.flat.dtype, self.values.dtype)
            nnz = self.values.shape[0]
            flat_size = self.flat.element_size()
            val_size = self.values.element_size()
            staged = StagedBatch(
                domain=buf[o_dom : o_dom + 8 * n].view(torch.int64),
                flat=buf[o_flat : o_flat + flat_size * nnz].view(self.flat.dtype),
                values=buf[o_val : o_val + val_size * nnz].view(self.values.dtype),
                n_cells=n,
                n_features=f,
            )
        elif self.flat is not None:
            # a leased (ring) batch staged on the CPU is copied out of its slot before the slot is handed back
            copy = lease is not None and device.type == "cpu"
            staged = StagedBatch(
                domain=self.domain.to(device, non_blocking=True, copy=copy),
                values=self.values.to(device, non_blocking=True, copy=copy),
                flat=self.flat.to(device, non_blocking=True, copy=copy),
                n_cells=n,
                n_features=f,
            )
        else:
            staged = StagedBatch(
                domain=self.domain.to(device, non_blocking=True),
                values=self.values.to(device, non_blocking=True),
                flat=None,
                n_cells=n,
                n_features=f,
                indptr=self.indptr.to(device, non_blocking=True),
                indices=self.indices.to(device, non_blocking=True),
            )
        if lease is not None:
            event = None
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
            lease(event)
        return staged

    def to_dense(
        self, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy to ``device`` (non-blocking) and densify there.

        Returns
        -------
        x
            (n_cells, n_features) dense ``dtype`` tensor.
        domain
            (n_cells,) int64 domain codes on ``device``.
        """
        staged = self.stage(device)
        return staged.densify(dtype), staged.domain
