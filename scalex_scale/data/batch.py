"""The unit that travels from the loader to the training step: a compact CSR mini-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    domain: torch.Tensor
    n_features: int

    @property
    def n_cells(self) -> int:
        return int(self.domain.shape[0])

    def pin_memory(self) -> CSRBatch:
        return CSRBatch(
            self.indptr.pin_memory(),
            self.indices.pin_memory(),
            self.values.pin_memory(),
            self.domain.pin_memory(),
            self.n_features,
        )

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
        device = torch.device(device)
        indptr = self.indptr.to(device, non_blocking=True)
        indices = self.indices.to(device, non_blocking=True).long()
        values = self.values.to(device, non_blocking=True).to(dtype)
        domain = self.domain.to(device, non_blocking=True)
        n = self.domain.shape[0]
        counts = indptr[1:] - indptr[:-1]
        rows = torch.repeat_interleave(
            torch.arange(n, device=device), counts, output_size=values.shape[0]
        )
        # One flat scatter: ~2-3x faster than a two-index index_put_ on CPU (rows*F + col is unique per value).
        x = torch.zeros(n * self.n_features, device=device, dtype=dtype)
        x.scatter_(0, rows * self.n_features + indices, values)
        return x.view(n, self.n_features), domain
