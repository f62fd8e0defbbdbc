"""Feature selection from merged pass-B statistics: scanpy's seurat HVG per batch (RNA), most variable peaks (ATAC).

RNA: :func:`highly_variable_genes_from_stats` reproduces ``scanpy.pp.highly_variable_genes(adata, flavor="seurat",
n_top_genes=n, batch_key="batch")`` (scanpy 1.11.5) from per-batch sums instead of the matrix. Everything after the
per-gene mean and variance is gene-level (a table of n_genes rows per batch), so it is done with the very pandas
operations scanpy uses, in the same order, which makes the bins, the per-bin statistics, the single-gene-bin rule,
the per-batch cut-off and the tie order of the final sort identical by construction:

per batch (batches in category order, only those with at least one kept cell, as anndata drops unused
categories when subsetting):
    1. genes with no cell ``> 0`` in the batch are left out and later filled with zeros (``highly_variable`` False);
    2. ``mean[mean == 0] = 1e-12``; ``dispersion = var / mean``; ``dispersion[dispersion == 0] = nan``;
       ``dispersion = log(dispersion)``; ``mean = log1p(mean)``;
    3. ``pd.cut(means, bins=n_bins)``; per bin ``mean`` and ``std`` of the dispersions (``observed=True``); bins
       whose ``std`` is NaN (a single gene) get ``dev = avg``, ``avg = 0``;
    4. ``dispersions_norm = (dispersion - avg) / dev``; the batch's HVGs are those with ``dispersions_norm`` at
       least the ``min(n, n_expressed)``-th highest non-NaN value (ties all included);
combination: concatenate the batch tables, ``groupby(gene).agg(mean of means/dispersions/dispersions_norm, sum of
highly_variable)`` (groupby sorts by gene name), then a stable ``sort_values(["highly_variable_nbatches",
"dispersions_norm"], ascending=False, na_position="last")`` and the first ``n`` genes are selected. So ties are
broken by gene name (the groupby order), exactly as in scanpy.

ATAC: :func:`select_variable_peaks` (see its docstring for how it relates to episcanpy's ``select_var_feature``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from .stats import GeneMomentStats

__all__ = [
    "highly_variable_genes_from_stats",
    "nth_highest",
    "seurat_dispersions_single_batch",
    "select_variable_peaks",
]


def nth_highest(x: NDArray[np.float64], n: int) -> float:
    """The ``n``-th highest non-NaN value (scanpy's ``_nth_highest``); ``n`` is clipped to the number of values.

    Returns ``+inf`` when there is no non-NaN value (scanpy raises an ``IndexError`` there), so nothing passes.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float(np.inf)
    n = min(int(n), x.size)
    x[::-1].sort()
    return x[n - 1]


def seurat_dispersions_single_batch(
    mean: NDArray[np.float64],
    var: NDArray[np.float64],
    expressed: NDArray[np.bool_],
    gene_names: pd.Index,
    *,
    n_top: int,
    n_bins: int = 20,
) -> pd.DataFrame:
    """scanpy's ``_highly_variable_genes_single_batch`` (flavor ``"seurat"``, ``n_top_genes``) from mean and var.

    Parameters
    ----------
    mean, var
        (n_genes,) float64 mean and unbiased variance of ``expm1(log1p data)`` over the batch's cells.
    expressed
        (n_genes,) bool: genes with at least one cell ``> 0`` in the batch (the others are filled with zeros).
    gene_names
        (n_genes,) gene names (the index of the result).
    n_top
        Number of top genes per batch.
    n_bins
        Number of mean bins.

    Returns
    -------
    DataFrame indexed by ``gene_names`` with ``means``, ``dispersions``, ``dispersions_norm`` (float64) and
    ``highly_variable`` (bool).
    """
    filt = np.asarray(expressed, dtype=bool)
    n_removed = int(np.sum(~filt))
    mean = np.array(mean[filt], dtype=np.float64)
    var = np.array(var[filt], dtype=np.float64)

    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
    mean = np.log1p(mean)

    df = pd.DataFrame(dict(zip(["means", "dispersions"], (mean, dispersion), strict=True)))
    if len(df):
        df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
        disp_grouped = df.groupby("mean_bin", observed=True)["dispersions"]
        disp_bin_stats = disp_grouped.agg(avg="mean", dev="std")
        one_gene_per_bin = disp_bin_stats["dev"].isnull()
        if len(np.flatnonzero(one_gene_per_bin.loc[df["mean_bin"]])) > 0:
            disp_bin_stats.loc[one_gene_per_bin, "dev"] = disp_bin_stats.loc[one_gene_per_bin, "avg"]
            disp_bin_stats.loc[one_gene_per_bin, "avg"] = 0
        disp_stats = disp_bin_stats.loc[df["mean_bin"]].set_index(df.index)
        df["dispersions_norm"] = (df["dispersions"] - disp_stats["avg"]) / disp_stats["dev"]
        df = df.drop(columns="mean_bin")
    else:
        df["dispersions_norm"] = np.zeros(0, dtype=np.float64)

    dispersion_norm = df["dispersions_norm"].to_numpy()
    n = min(int(n_top), int(filt.sum()))
    cutoff = nth_highest(dispersion_norm, n) if n > 0 else np.inf
    df["highly_variable"] = np.nan_to_num(dispersion_norm, nan=-np.inf) >= cutoff

    names = pd.Index(gene_names)
    df.index = names[filt]
    if n_removed > 0:
        missing = pd.DataFrame(np.zeros((n_removed, len(df.columns))), columns=df.columns)
        missing["highly_variable"] = missing["highly_variable"].astype(bool)
        missing.index = names[~filt]
        df = pd.concat([df, missing]).loc[names]
    return df


def highly_variable_genes_from_stats(
    stats: GeneMomentStats,
    gene_names: Sequence[Any] | pd.Index,
    *,
    n_top_genes: int = 2000,
    n_bins: int = 20,
) -> pd.DataFrame:
    """Batch-aware seurat HVG selection from merged :class:`~.stats.GeneMomentStats`.

    Parameters
    ----------
    stats
        Pass-B statistics over the kept genes; batch ``b`` is row ``b``.
    gene_names
        (n_genes,) names of the kept genes, in var order (must be unique).
    n_top_genes
        Number of genes to select.
    n_bins
        Number of mean bins.

    Batches with no cells are skipped (``highly_variable_intersection`` counts only the others).

    Returns
    -------
    DataFrame indexed by gene name (var order) with scanpy's columns: ``means``, ``dispersions``,
    ``dispersions_norm`` (float64), ``highly_variable`` (bool), ``highly_variable_nbatches`` (int),
    ``highly_variable_intersection`` (bool).
    """
    names = pd.Index(gene_names)
    if len(names) != stats.n_genes:
        raise ValueError(f"{len(names)} gene names for {stats.n_genes} genes")
    if not names.is_unique:
        raise ValueError("gene names must be unique")
    present = [b for b in range(stats.n_batches) if stats.n_cells[b] > 0]
    if not present:
        raise ValueError("no cells passed the filters")

    dfs = []
    for b in present:
        mean, var = stats.mean_var(b)
        dfs.append(
            seurat_dispersions_single_batch(
                mean, var, stats.n_positive[b] > 0, names, n_top=n_top_genes, n_bins=n_bins
            )
        )
    df = pd.concat(dfs, axis=0)
    df["highly_variable"] = df["highly_variable"].astype(int)
    df = df.groupby(df.index, observed=True).agg(
        dict(means="mean", dispersions="mean", dispersions_norm="mean", highly_variable="sum")
    )
    df["highly_variable_nbatches"] = df["highly_variable"]
    df["highly_variable_intersection"] = df["highly_variable_nbatches"] == len(present)
    df.sort_values(
        ["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last", inplace=True
    )
    df["highly_variable"] = np.arange(df.shape[0]) < n_top_genes
    return df.loc[names]


def select_variable_peaks(n_cells_per_peak: NDArray[np.integer], n_cells: int, n_top: int) -> NDArray[np.int64]:
    """Positions of the ``n_top`` most variable binarized peaks, in input order.

    The variance of a binarized peak open in ``c`` of ``n`` cells is ``p (1 - p)`` with ``p = c / n``; peaks are
    ranked by it (largest first), i.e. by ``|2c - n|`` ascending in exact integer arithmetic, ties broken by input
    order (stable sort). This is the ranking of episcanpy's ``select_var_feature`` (variability score
    ``1 - |p - 0.5|``); for peaks open in at most half the cells, as in sparse ATAC data, it is the ranking by the
    number of cells. Unlike episcanpy (which keeps every peak scoring at least the score of the ``(n+1)``-th, so
    ``n + 1`` or more peaks), exactly ``min(n_top, n_peaks)`` peaks are returned.

    Parameters
    ----------
    n_cells_per_peak
        (n_peaks,) cells where each peak is open.
    n_cells
        Number of cells.
    n_top
        Number of peaks to keep.

    Returns
    -------
    int64 positions into ``n_cells_per_peak``, increasing.
    """
    c = np.asarray(n_cells_per_peak, dtype=np.int64)
    if c.size and (c.min() < 0 or c.max() > n_cells):
        raise ValueError("peak counts must lie in [0, n_cells]")
    key = np.abs(2 * c - np.int64(n_cells))
    order = np.argsort(key, kind="stable")
    return np.sort(order[: min(int(n_top), c.size)]).astype(np.int64)
