"""Synthetic single-cell RNA-seq counts for tests, the demo and benchmarks (up to millions of cells).

The generator streams cells in row chunks with flat memory, is deterministic for a given
:class:`SyntheticConfig`, and its output does not depend on ``chunk_size``: cells are drawn in fixed
internal blocks of :data:`BLOCK_CELLS` rows whose random state comes from
``np.random.SeedSequence(seed, spawn_key=(stream, block))``, so any row range can be generated on its own
(see :func:`synthetic_rows`), e.g. by parallel workers.

Generative model
----------------
* Genes: ``n_genes - n_mt_genes - n_ercc_genes`` regular genes ``GENE00001 ...``, then mitochondrial genes
  ``MT-ND1 ...`` and ERCC spike-ins ``ERCC-00001 ...`` (last, as in a 10x feature list), so the
  preprocessing drop rule (``ERCC``, ``MT-``) has something to drop.
* Cell types form a two-level tree: ``n_lineages`` lineages, each with a lineage program (a set of genes
  with log fold changes), and every type adds its own marker program. Types of one lineage share the
  lineage program and so are more similar to each other than to types of other lineages.
* Relative expression of type ``t`` in batch ``b``: ``p[b, t, g] ∝ a[g] * exp(lineage[l(t), g] +
  marker[t, g]) * e[b, g]`` with gene abundance ``a`` log-normal, and the batch effect ``e[b, g]`` a
  gene-wise log-normal multiplicative factor. MT and ERCC genes take fixed shares of the counts.
* Library size (expected total counts) of a cell: log-normal, ``log L ~ N(m + d[b], library_sd)``, with a
  batch offset ``d[b] ~ N(0, batch_library_sd)``; ``m`` is calibrated so that the expected mean number of
  detected genes per cell (all cells, low-quality ones included) equals ``mean_genes_per_cell``. A
  fraction ``low_quality_fraction`` of cells has its library multiplied by ``low_quality_scale`` (cells
  with very few genes, as damaged cells or empty droplets).
* Counts: ``x[g] ~ NegativeBinomial(mean = L * p[b, t, g], dispersion = phi[g])`` (variance
  ``mu + phi * mu**2``, i.e. gamma-Poisson), independent across genes, with gene-specific ``phi``
  log-normal around ``dispersion``.
* Partial overlap (``partial_overlap=True``, at least two batches and two types): about a quarter of the
  types are batch-specific (each lives in one batch), every other type lives in at least two batches
  (each batch with probability 0.7), every batch lacks at least one type, and every type lives somewhere
  (with 2 batches x 2 types a batch cannot lack a type without losing the shared one: it keeps both).
  With one batch or one type all types live everywhere. Within a batch, type proportions are Dirichlet;
  :func:`celltype_presence` returns the design.

Sampling never touches the undetected genes of a cell: the negative binomial is written as a compound
Poisson distribution (a Poisson number of events, each adding 0 or a logarithmic-series count), and the
events are a Poisson(L) stream of genes drawn from the alias table of ``p[b, t]``. The work per cell is
proportional to its library size, not to ``n_genes`` (throughput: bench/README.md, "Figures behind design
choices").

Detected genes and the SCALEX cell filter (600 genes)
-----------------------------------------------------
With the defaults (``library_sd=0.45``, ``batch_library_sd=0.25``, ``gene_abundance_sd=1.8``, 2 %
low-quality cells) detected genes per cell are roughly log-normal (log-sd 0.34), with about 2.2 counts per
detected gene and 68 % of the non-zero counts equal to 1, close to 10x PBMC data (Kang et al.: 0.36, 2.7
and 69 %). The default ``mean_genes_per_cell=500`` gives 10 % density at 5,000 genes, but only about 26 %
of the cells pass the 600-gene filter; ``mean_genes_per_cell=1000`` gives about 93 % passing (all but the
low-quality cells and a thin tail). Pass ``mean_genes_per_cell=1000`` for a pipeline demo with the
default filter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Literal

import anndata
import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import brentq

__all__ = [
    "BLOCK_CELLS",
    "SyntheticConfig",
    "celltype_presence",
    "make_synthetic",
    "synthetic_chunks",
    "synthetic_rows",
    "synthetic_var",
]

BLOCK_CELLS = 4096
"""Cells per internal random block; the unit of the per-block ``SeedSequence`` (independent of ``chunk_size``)."""

_MT_NAMES = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3",
    "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB",
)  # fmt: skip
_FEATURE_TYPES = ("gene", "mitochondrial", "spike-in")
_STREAM_MODEL, _STREAM_LAYOUT, _STREAM_BLOCK = 0, 1, 2  # SeedSequence spawn_key streams
_SHARED_PRESENCE = 0.7  # probability that a shared (non batch-specific) type lives in a given batch
_N_QUADRATURE = 12  # Gauss-Hermite nodes for the library-size calibration


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of a synthetic single-cell RNA-seq data set.

    Attributes
    ----------
    n_cells, n_genes
        Shape of the count matrix (``n_genes`` includes the MT and ERCC genes).
    n_batches, n_celltypes
        Number of batches (studies) and of cell types.
    n_lineages
        Number of lineages the cell types are grouped in; ``None``: ``round(sqrt(n_celltypes))``.
    mean_genes_per_cell
        Target mean number of detected (non-zero) genes per cell, over all cells. The default 500 (10 %
        density at 5,000 genes) leaves only ~26 % of the cells above SCALEX's 600-gene filter; 1000
        leaves ~93 % (see the module docstring).
    partial_overlap
        Each batch lacks some cell types and some types are batch-specific (see module docstring).
    seed
        Seed of everything; the data are a function of the config (``chunk_size`` excepted).
    chunk_size
        Rows per chunk yielded by :func:`synthetic_chunks`; does not change the data.
    order
        ``"batch"``: cells batch by batch, like concatenated studies; ``"shuffled"``: batches interleaved
        at random (same batch sizes).
    library_sd
        Standard deviation of the log library size within a batch.
    batch_library_sd
        Standard deviation of the per-batch offsets of the mean log library size.
    batch_effect_sd
        Standard deviation of the per-batch, per-gene log multiplicative batch effect.
    dispersion, dispersion_sd
        Median negative-binomial dispersion ``phi`` (variance ``mu + phi mu^2``) and the log-sd of its
        gene-to-gene variation.
    gene_abundance_sd
        Log-sd of the baseline relative abundance of the regular genes.
    lineage_gene_fraction, marker_gene_fraction
        Fraction of the regular genes in each lineage program and in each type's marker program.
    lineage_lfc, marker_lfc
        Mean absolute log fold change of lineage and marker genes (75 % up, 25 % down).
    celltype_concentration, batch_size_concentration
        Dirichlet concentrations of the type proportions within a batch and of the batch sizes.
    low_quality_fraction, low_quality_scale
        Fraction of low-quality cells and the factor on their library size.
    n_mt_genes, n_ercc_genes
        Number of mitochondrial genes (at most 13) and of ERCC spike-ins.
    mt_fraction, ercc_fraction
        Share of the expected counts that goes to the MT genes and to the ERCC spike-ins.
    """

    n_cells: int = 10_000
    n_genes: int = 5_000
    n_batches: int = 4
    n_celltypes: int = 8
    n_lineages: int | None = None
    mean_genes_per_cell: float = 500.0
    partial_overlap: bool = True
    seed: int = 0
    chunk_size: int = 10_000
    order: Literal["batch", "shuffled"] = "batch"
    library_sd: float = 0.45
    batch_library_sd: float = 0.25
    batch_effect_sd: float = 0.3
    dispersion: float = 0.3
    dispersion_sd: float = 0.5
    gene_abundance_sd: float = 1.8
    lineage_gene_fraction: float = 0.04
    marker_gene_fraction: float = 0.02
    lineage_lfc: float = 1.5
    marker_lfc: float = 2.0
    celltype_concentration: float = 5.0
    batch_size_concentration: float = 10.0
    low_quality_fraction: float = 0.02
    low_quality_scale: float = 0.05
    n_mt_genes: int = 13
    n_ercc_genes: int = 8
    mt_fraction: float = 0.04
    ercc_fraction: float = 0.005

    def __post_init__(self) -> None:
        for name in ("n_cells", "n_genes", "n_batches", "n_celltypes", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_lineages is not None and not 1 <= self.n_lineages <= self.n_celltypes:
            raise ValueError(f"n_lineages must be in [1, n_celltypes], got {self.n_lineages}")
        if self.n_cells < self.n_batches:
            raise ValueError(f"n_cells ({self.n_cells}) must be >= n_batches ({self.n_batches})")
        if not 0 <= self.n_mt_genes <= len(_MT_NAMES):
            raise ValueError(f"n_mt_genes must be in [0, {len(_MT_NAMES)}], got {self.n_mt_genes}")
        if self.n_ercc_genes < 0:
            raise ValueError(f"n_ercc_genes must be >= 0, got {self.n_ercc_genes}")
        if self.n_regular_genes < 2:
            raise ValueError("n_genes must exceed n_mt_genes + n_ercc_genes by at least 2")
        if not 0 < self.mean_genes_per_cell < 0.9 * self.n_genes:
            raise ValueError(f"mean_genes_per_cell must be in (0, 0.9 * n_genes), got {self.mean_genes_per_cell}")
        if self.order not in ("batch", "shuffled"):
            raise ValueError(f"order must be 'batch' or 'shuffled', got {self.order!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("low_quality_fraction", "lineage_gene_fraction", "marker_gene_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.low_quality_scale <= 1:
            raise ValueError(f"low_quality_scale must be in (0, 1], got {self.low_quality_scale}")
        if self.mt_fraction < 0 or self.ercc_fraction < 0 or self.mt_fraction + self.ercc_fraction >= 1:
            raise ValueError("mt_fraction and ercc_fraction must be >= 0 with a sum below 1")
        if self.dispersion <= 0 or self.celltype_concentration <= 0 or self.batch_size_concentration <= 0:
            raise ValueError("dispersion and the Dirichlet concentrations must be > 0")

    @property
    def n_regular_genes(self) -> int:
        """Number of regular (non-MT, non-ERCC) genes."""
        return self.n_genes - self.n_mt_genes - self.n_ercc_genes

    @property
    def resolved_n_lineages(self) -> int:
        """``n_lineages``, or its default ``round(sqrt(n_celltypes))``."""
        if self.n_lineages is not None:
            return int(self.n_lineages)
        return max(1, round(math.sqrt(self.n_celltypes)))


# ---------------------------------------------------------------------------------------------------------
# Numba kernels
# ---------------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _build_alias(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias table of the probability vector ``p`` (float64, sums to 1)."""
    n = p.size
    prob = np.ones(n, dtype=np.float64)
    alias = np.arange(n).astype(np.int32)
    scaled = p * (n / p.sum())
    small = np.empty(n, dtype=np.int64)
    large = np.empty(n, dtype=np.int64)
    n_small = 0
    n_large = 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[n_small] = i
            n_small += 1
        else:
            large[n_large] = i
            n_large += 1
    while n_small > 0 and n_large > 0:
        n_small -= 1
        s = small[n_small]
        n_large -= 1
        big = large[n_large]
        prob[s] = scaled[s]
        alias[s] = big
        scaled[big] = (scaled[big] + scaled[s]) - 1.0
        if scaled[big] < 1.0:
            small[n_small] = big
            n_small += 1
        else:
            large[n_large] = big
            n_large += 1
    return prob, alias  # leftovers keep prob 1 and alias to themselves


@numba.njit(cache=True)
def _logseries(rng: np.random.Generator, theta: float) -> int:
    """One draw of the logarithmic-series distribution (Kemp's algorithm, as numpy's ``logseries``)."""
    r = math.log1p(-theta)
    while True:
        v = rng.random()
        if v >= theta:
            return 1
        u = rng.random()
        q = -math.expm1(r * u)
        if v <= q * q:
            if v == 0.0:
                continue
            result = int(math.floor(1.0 + math.log(v) / math.log(q)))
            if result < 1:
                continue
            return result
        if v >= q:
            return 1
        return 2


@numba.njit(cache=True)
def _logseries_ge2(rng: np.random.Generator, theta: float) -> int:
    """One draw of the logarithmic-series distribution conditioned on being >= 2."""
    if theta >= 0.5:  # P(LS >= 2) >= 0.27: rejection
        while True:
            k = _logseries(rng, theta)
            if k >= 2:
                return k
    w = rng.random() * (-math.log1p(-theta) - theta)  # sequential inversion of theta^k / k, k >= 2
    power = theta * theta
    k = 2
    while True:
        term = power / k
        if w < term or term == 0.0:
            return k
        w -= term
        power *= theta
        k += 1


@numba.njit(cache=True)
def _event_constants(x: float) -> tuple[float, float, float]:
    """``(P(Y = 0), P(Y <= 1), theta)`` of one Poisson event's count ``Y`` for ``x = mean / size``.

    ``Y = 0`` with probability ``1 - log1p(x) / x``, else logarithmic-series(``theta = x / (1 + x)``), so
    ``P(Y = k) = theta^k / (k x)`` for ``k >= 1``; a Poisson(``mean``) number of such events sums to
    NB(``mean``, ``size``).
    """
    if x < 1e-4:
        p0 = x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    else:
        p0 = 1.0 - math.log1p(x) / x
    return p0, p0 + 1.0 / (1.0 + x), x / (1.0 + x)


@numba.njit(cache=True)
def _draw_cell(
    rng: np.random.Generator,
    prob: np.ndarray,
    alias: np.ndarray,
    p: np.ndarray,
    inv_r: np.ndarray,
    lib: float,
    n_draws: int,
    tag: int,
    counts: np.ndarray,
    cache: np.ndarray,
    stamp: np.ndarray,
    touched: np.ndarray,
) -> int:
    """Add one cell's negative-binomial counts into ``counts``; return how many genes it touched.

    ``n_draws ~ Poisson(lib)`` events pick genes from the alias table of ``p``; an event at gene ``g``
    adds a count ``Y`` (see :func:`_event_constants`, ``x = lib p[g] / r[g]``), so that gene ``g`` gets
    NB(mean ``lib p[g]``, size ``r[g]``). The touched genes are listed, unsorted, in ``touched``.
    ``cache[g]`` holds the constants of gene ``g`` for the cell ``stamp[g]`` (``tag`` is this cell).
    """
    n_genes = p.size
    n_touched = 0
    for _ in range(n_draws):
        u = rng.random() * n_genes
        g = int(u)
        if g >= n_genes:
            g = n_genes - 1
        if u - g >= prob[g]:
            g = alias[g]
        if stamp[g] != tag:
            stamp[g] = tag
            cache[g, 0], cache[g, 1], cache[g, 2] = _event_constants(lib * p[g] * inv_r[g])
        v = rng.random()
        if v < cache[g, 0]:
            continue
        if counts[g] == 0:
            touched[n_touched] = g
            n_touched += 1
        if v < cache[g, 1]:
            counts[g] += 1
        else:
            counts[g] += _logseries_ge2(rng, cache[g, 2])
    return n_touched


@numba.njit(cache=True)
def _emit_row(
    counts: np.ndarray, touched: np.ndarray, n_touched: int, indices: np.ndarray, data: np.ndarray, pos: int
) -> None:
    """Write the touched genes of ``counts`` in gene order at ``pos`` and zero them in ``counts``."""
    if 32 * n_touched >= counts.size:  # dense enough: one scan (~0.2 ns a gene) beats a sort
        for g in range(counts.size):
            if counts[g] != 0:
                indices[pos] = g
                data[pos] = counts[g]
                counts[g] = 0
                pos += 1
        return
    genes = np.sort(touched[:n_touched])
    for j in range(n_touched):
        g = genes[j]
        indices[pos + j] = g
        data[pos + j] = counts[g]
        counts[g] = 0


@numba.njit(cache=True)
def _sample_block(
    rng: np.random.Generator,
    pair: np.ndarray,
    lib: np.ndarray,
    n_draws: np.ndarray,
    prob_tab: np.ndarray,
    alias_tab: np.ndarray,
    p_tab: np.ndarray,
    inv_r: np.ndarray,
    capacity: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of the cells of one block as CSR (sorted indices): ``indptr`` int64, int32, float32."""
    n_cells = pair.size
    n_genes = p_tab.shape[1]
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    indices = np.empty(max(capacity, 16), dtype=np.int32)
    data = np.empty(max(capacity, 16), dtype=np.float32)
    counts = np.zeros(n_genes, dtype=np.int64)
    cache = np.empty((n_genes, 3), dtype=np.float64)
    stamp = np.full(n_genes, -1, dtype=np.int64)
    touched = np.empty(n_genes, dtype=np.int64)
    pos = 0
    for c in range(n_cells):
        k = pair[c]
        n_touched = _draw_cell(
            rng, prob_tab[k], alias_tab[k], p_tab[k], inv_r, lib[c], n_draws[c], c, counts, cache, stamp, touched
        )
        if pos + n_touched > indices.size:
            new_size = max(2 * indices.size, pos + n_touched)
            grown_i = np.empty(new_size, dtype=np.int32)
            grown_i[:pos] = indices[:pos]
            indices = grown_i
            grown_d = np.empty(new_size, dtype=np.float32)
            grown_d[:pos] = data[:pos]
            data = grown_d
        _emit_row(counts, touched, n_touched, indices, data, pos)
        pos += n_touched
        indptr[c + 1] = pos
    return indptr, indices[:pos].copy(), data[:pos].copy()


# ---------------------------------------------------------------------------------------------------------
# The model: gene programs, overlap layout, alias tables (built once per config, cached)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    """Fixed parameters of a synthetic data set (everything but the per-cell draws)."""

    gene_names: np.ndarray  # (G,) object
    feature_type: np.ndarray  # (G,) int8 codes into _FEATURE_TYPES
    dispersion: np.ndarray  # (G,) phi
    lineage_of: np.ndarray  # (T,) int64
    present: np.ndarray  # (B, T) bool
    batch_sizes: np.ndarray  # (B,) int64
    type_cdf: np.ndarray  # (B, T) cumulative type proportions per batch (last column exactly 1)
    log_lib_mean: np.ndarray  # (B,) mean log library size (calibrated)
    pair_index: np.ndarray  # (B, T) row of (b, t) in the tables, -1 when absent
    p_tab: np.ndarray  # (K, G) relative expression of each present (b, t)
    prob_tab: np.ndarray  # (K, G) alias probabilities
    alias_tab: np.ndarray  # (K, G) int32 aliases
    inv_r: np.ndarray  # (G,) 1 / NB size = phi


def _model_key(config: SyntheticConfig) -> SyntheticConfig:
    """The config with the fields that do not change the model normalized (for caching)."""
    return replace(config, chunk_size=1, order="batch")


def _rng(config: SyntheticConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=key))


def _gene_names(config: SyntheticConfig) -> np.ndarray:
    width = max(5, len(str(config.n_regular_genes)))
    names = [f"GENE{i:0{width}d}" for i in range(1, config.n_regular_genes + 1)]
    names += list(_MT_NAMES[: config.n_mt_genes])
    names += [f"ERCC-{i:05d}" for i in range(1, config.n_ercc_genes + 1)]
    return np.asarray(names, dtype=object)


def _presence(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """(B, T) bool: which cell types live in which batch (see the module docstring)."""
    n_b, n_t = config.n_batches, config.n_celltypes
    present = np.ones((n_b, n_t), dtype=bool)
    if not config.partial_overlap or n_b < 2 or n_t < 2:
        return present
    types = rng.permutation(n_t)
    n_specific = min(max(1, n_t // 4), n_t - 1)
    specific, shared = types[:n_specific], types[n_specific:]
    owners = rng.permutation(n_b)
    present[:] = False
    for i, t in enumerate(specific):
        present[owners[i % n_b], t] = True
    for t in shared:
        where = rng.random(n_b) < _SHARED_PRESENCE
        if where.sum() < 2:
            where[rng.choice(np.flatnonzero(~where), 2 - where.sum(), replace=False)] = True
        present[:, t] = where
    for b in range(n_b):
        if not present[b].any():  # an empty batch gets a shared type
            present[b, rng.choice(shared)] = True
        if present[b].all():  # a complete batch loses a shared type, preferably one that stays shared
            n_where = present.sum(axis=0)
            droppable = [t for t in shared if n_where[t] >= 3]
            if not droppable and (n_where[shared] >= 2).sum() >= 2:
                droppable = [t for t in shared if n_where[t] == 2]  # becomes specific to the other batch
            if droppable:
                present[b, rng.choice(droppable)] = False
    return present


def _batch_sizes(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Dirichlet batch proportions turned into sizes summing to n_cells (each >= 1)."""
    frac = rng.dirichlet(np.full(config.n_batches, config.batch_size_concentration))
    raw = frac * (config.n_cells - config.n_batches)
    sizes = np.floor(raw).astype(np.int64)
    rest = config.n_cells - config.n_batches - int(sizes.sum())
    sizes[np.argsort(raw - sizes)[::-1][:rest]] += 1
    return sizes + 1


def _program(
    rng: np.random.Generator, n_programs: int, n_genes: int, fraction: float, lfc: float
) -> np.ndarray:
    """(n_programs, n_genes) log fold changes: ``fraction`` of the genes each, 75 % up, 25 % down."""
    out = np.zeros((n_programs, n_genes))
    size = max(1, round(fraction * n_genes)) if fraction > 0 else 0
    for i in range(n_programs):
        genes = rng.choice(n_genes, size, replace=False)
        sign = np.where(rng.random(size) < 0.75, 1.0, -1.0)
        out[i, genes] = sign * np.abs(rng.normal(lfc, 0.25 * lfc, size))
    return out


def _relative_expression(config: SyntheticConfig, rng: np.random.Generator, lineage_of: np.ndarray) -> np.ndarray:
    """(B, T, G) relative expression ``p[b, t]`` (each sums to 1)."""
    n_reg = config.n_regular_genes
    log_base = rng.normal(0.0, config.gene_abundance_sd, n_reg)
    lineage = _program(rng, config.resolved_n_lineages, n_reg, config.lineage_gene_fraction, config.lineage_lfc)
    marker = _program(rng, config.n_celltypes, n_reg, config.marker_gene_fraction, config.marker_lfc)
    log_type = log_base + lineage[lineage_of] + marker  # (T, n_reg)
    regular = np.exp(log_type - log_type.max(axis=1, keepdims=True))
    regular /= regular.sum(axis=1, keepdims=True)
    mt = rng.lognormal(0.0, 1.0, config.n_mt_genes)
    ercc = rng.lognormal(0.0, 1.5, config.n_ercc_genes)
    reg_share = 1.0 - (config.mt_fraction if mt.size else 0.0) - (config.ercc_fraction if ercc.size else 0.0)
    parts = [reg_share * regular]
    if mt.size:
        parts.append(np.broadcast_to(config.mt_fraction * mt / mt.sum(), (config.n_celltypes, mt.size)))
    if ercc.size:
        parts.append(np.broadcast_to(config.ercc_fraction * ercc / ercc.sum(), (config.n_celltypes, ercc.size)))
    p_type = np.concatenate(parts, axis=1)  # (T, G)
    batch_effect = rng.lognormal(0.0, config.batch_effect_sd, (config.n_batches, config.n_genes))
    p = p_type[None, :, :] * batch_effect[:, None, :]
    return p / p.sum(axis=2, keepdims=True)


def _mean_detected(
    log_scale: float,
    p_tab: np.ndarray,
    weight: np.ndarray,
    log_offset: np.ndarray,
    size: np.ndarray,
    config: SyntheticConfig,
) -> float:
    """Expected detected genes per cell when the mean log library size is ``log_scale + offset``.

    ``E[#{g: x_g > 0}] = sum_g 1 - (1 + L p_g / r_g)^(-r_g)``, averaged over the log-normal library size
    (Gauss-Hermite), the low-quality mixture and the (batch, type) pairs with weights ``weight``.
    """
    nodes, node_w = np.polynomial.hermite_e.hermegauss(_N_QUADRATURE)
    node_w = node_w / node_w.sum()
    q = config.low_quality_fraction
    lowq = np.array([0.0, math.log(config.low_quality_scale)])
    mix_w = np.array([1.0 - q, q])
    total = 0.0
    for k in range(p_tab.shape[0]):
        log_lib = (log_scale + log_offset[k] + config.library_sd * nodes)[:, None] + lowq[None, :]
        lib = np.exp(log_lib).reshape(-1, 1)  # (nodes * 2, 1)
        zero = np.exp(-size * np.log1p(lib * p_tab[k] / size))  # P(x_g = 0)
        detected = config.n_genes - zero.sum(axis=1)
        total += weight[k] * float(detected @ (node_w[:, None] * mix_w[None, :]).reshape(-1))
    return total


@lru_cache(maxsize=8)
def _build_model(config: SyntheticConfig) -> _Model:
    rng = _rng(config, _STREAM_MODEL)
    n_b, n_t = config.n_batches, config.n_celltypes
    lineage_of = (np.arange(n_t) * config.resolved_n_lineages) // n_t
    present = _presence(config, rng)
    batch_sizes = _batch_sizes(config, rng)
    prop = np.zeros((n_b, n_t))
    for b in range(n_b):
        prop[b, present[b]] = rng.dirichlet(np.full(int(present[b].sum()), config.celltype_concentration))
    type_cdf = np.cumsum(prop, axis=1)
    type_cdf /= type_cdf[:, -1:]
    phi = config.dispersion * np.exp(rng.normal(0.0, config.dispersion_sd, config.n_genes))
    batch_offset = rng.normal(0.0, config.batch_library_sd, n_b)
    p_all = _relative_expression(config, rng, lineage_of)

    pair_index = np.full((n_b, n_t), -1, dtype=np.int64)
    pair_b, pair_t = np.nonzero(present)
    pair_index[pair_b, pair_t] = np.arange(pair_b.size)
    p_tab = np.ascontiguousarray(p_all[pair_b, pair_t])
    weight = (batch_sizes / batch_sizes.sum())[pair_b] * prop[pair_b, pair_t]

    size = 1.0 / phi
    target = config.mean_genes_per_cell
    offsets = batch_offset[pair_b]

    def gap(s: float) -> float:
        return _mean_detected(s, p_tab, weight, offsets, size, config) - target

    log_scale = brentq(gap, math.log(1e-3), math.log(1e12), xtol=1e-4)

    prob_tab = np.empty_like(p_tab)
    alias_tab = np.empty(p_tab.shape, dtype=np.int32)
    for k in range(p_tab.shape[0]):
        prob_tab[k], alias_tab[k] = _build_alias(p_tab[k])
    feature_type = np.repeat(np.arange(3, dtype=np.int8), [config.n_regular_genes, config.n_mt_genes, config.n_ercc_genes])
    return _Model(
        gene_names=_gene_names(config),
        feature_type=feature_type,
        dispersion=phi,
        lineage_of=lineage_of,
        present=present,
        batch_sizes=batch_sizes,
        type_cdf=type_cdf,
        log_lib_mean=log_scale + batch_offset,
        pair_index=pair_index,
        p_tab=p_tab,
        prob_tab=prob_tab,
        alias_tab=alias_tab,
        inv_r=phi.copy(),
    )


def _model(config: SyntheticConfig) -> _Model:
    return _build_model(_model_key(config))


def _block_batch_counts(config: SyntheticConfig) -> np.ndarray:
    """(n_blocks, B) number of cells of each batch in each block (exact batch sizes in both orders)."""
    return _build_block_batch_counts(replace(config, chunk_size=1))


@lru_cache(maxsize=8)
def _build_block_batch_counts(config: SyntheticConfig) -> np.ndarray:
    sizes = _model(config).batch_sizes
    n_blocks = -(-config.n_cells // BLOCK_CELLS)
    starts = np.arange(n_blocks + 1) * BLOCK_CELLS
    starts[-1] = config.n_cells
    if config.order == "batch":
        edges = np.concatenate([[0], np.cumsum(sizes)])
        lo = np.maximum(starts[:-1, None], edges[None, :-1])
        hi = np.minimum(starts[1:, None], edges[None, 1:])
        return np.maximum(hi - lo, 0)
    rng = _rng(config, _STREAM_LAYOUT)
    out = np.empty((n_blocks, sizes.size), dtype=np.int64)
    remaining = sizes.copy()
    for k in range(n_blocks):  # sequential draws without replacement: a uniform interleaving
        out[k] = rng.multivariate_hypergeometric(remaining, int(starts[k + 1] - starts[k]))
        remaining -= out[k]
    return out


# ---------------------------------------------------------------------------------------------------------
# Blocks and row ranges
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    indptr: np.ndarray  # int64
    indices: np.ndarray  # int32
    data: np.ndarray  # float32
    batch: np.ndarray  # int64
    celltype: np.ndarray  # int64
    low_quality: np.ndarray  # bool


def _generate_block(config: SyntheticConfig, k: int) -> _Block:
    """Cells ``[k * BLOCK_CELLS, ...)`` from the block's own ``SeedSequence(seed, (2, k))``."""
    model = _model(config)
    counts = _block_batch_counts(config)[k]
    rng = _rng(config, _STREAM_BLOCK, k)
    batch = np.repeat(np.arange(counts.size), counts)
    if config.order == "shuffled":
        rng.shuffle(batch)
    n = batch.size
    celltype = (rng.random(n)[:, None] >= model.type_cdf[batch]).sum(axis=1)
    low_quality = rng.random(n) < config.low_quality_fraction
    log_lib = model.log_lib_mean[batch] + config.library_sd * rng.standard_normal(n)
    log_lib[low_quality] += math.log(config.low_quality_scale)
    lib = np.exp(log_lib)
    n_draws = rng.poisson(lib)
    capacity = int(1.25 * n * config.mean_genes_per_cell) + 64
    indptr, indices, data = _sample_block(
        rng, model.pair_index[batch, celltype], lib, n_draws,
        model.prob_tab, model.alias_tab, model.p_tab, model.inv_r, capacity,
    )  # fmt: skip
    return _Block(indptr, indices, data, batch, celltype, low_quality)


class _RowReader:
    """Assembles arbitrary row ranges from blocks, keeping the last block for the next range."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self._cached: tuple[int, _Block] | None = None

    def _block(self, k: int) -> _Block:
        if self._cached is None or self._cached[0] != k:
            self._cached = (k, _generate_block(self.config, k))
        return self._cached[1]

    def rows(self, start: int, stop: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        pieces: list[tuple[_Block, int, int]] = []
        for k in range(start // BLOCK_CELLS, -(-stop // BLOCK_CELLS)):
            lo = max(start, k * BLOCK_CELLS) - k * BLOCK_CELLS
            hi = min(stop, (k + 1) * BLOCK_CELLS) - k * BLOCK_CELLS
            pieces.append((self._block(k), lo, hi))
        indptr = [np.zeros(1, dtype=np.int64)]
        indices, data, batch, celltype, low_q = [], [], [], [], []
        offset = 0
        for blk, lo, hi in pieces:
            a, b = blk.indptr[lo], blk.indptr[hi]
            indptr.append(blk.indptr[lo + 1 : hi + 1] - a + offset)
            offset += int(b - a)
            indices.append(blk.indices[a:b])
            data.append(blk.data[a:b])
            batch.append(blk.batch[lo:hi])
            celltype.append(blk.celltype[lo:hi])
            low_q.append(blk.low_quality[lo:hi])
        n_genes = self.config.n_genes
        matrix = sp.csr_matrix(
            (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
            shape=(stop - start, n_genes),
        )
        obs = _obs(self.config, start, np.concatenate(batch), np.concatenate(celltype), np.concatenate(low_q))
        return matrix, obs


def _obs(
    config: SyntheticConfig, start: int, batch: np.ndarray, celltype: np.ndarray, low_quality: np.ndarray
) -> pd.DataFrame:
    model = _model(config)
    width = len(str(config.n_cells - 1))
    names = [f"cell{i:0{width}d}" for i in range(start, start + batch.size)]
    return pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch, categories=_batch_names(config)),
            "celltype": pd.Categorical.from_codes(celltype, categories=_celltype_names(config)),
            "lineage": pd.Categorical.from_codes(
                model.lineage_of[celltype], categories=[f"lineage{i}" for i in range(config.resolved_n_lineages)]
            ),
            "low_quality": low_quality,
        },
        index=pd.Index(names, dtype=object),
    )


def _batch_names(config: SyntheticConfig) -> list[str]:
    return [f"batch{i}" for i in range(config.n_batches)]


def _celltype_names(config: SyntheticConfig) -> list[str]:
    return [f"celltype{i}" for i in range(config.n_celltypes)]


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def synthetic_var(config: SyntheticConfig) -> pd.DataFrame:
    """Gene table of the synthetic data.

    Returns
    -------
    pandas.DataFrame
        Index: gene names (``GENE00001``..., then ``MT-...``, then ``ERCC-...``). Columns:
        ``feature_type`` (categorical ``gene`` | ``mitochondrial`` | ``spike-in``) and ``dispersion``
        (the true negative-binomial dispersion of the gene).
    """
    model = _model(config)
    return pd.DataFrame(
        {
            "feature_type": pd.Categorical.from_codes(model.feature_type, categories=list(_FEATURE_TYPES)),
            "dispersion": model.dispersion.astype(np.float32),
        },
        index=pd.Index(model.gene_names, dtype=object),
    )


def celltype_presence(config: SyntheticConfig) -> pd.DataFrame:
    """Which cell types live in which batch (the partial-overlap design).

    Returns
    -------
    pandas.DataFrame
        (n_batches, n_celltypes) bool, index batch names, columns cell-type names. A type with a single
        ``True`` is batch-specific. (A present type can still draw zero cells in a tiny batch.)
    """
    model = _model(config)
    return pd.DataFrame(model.present.copy(), index=_batch_names(config), columns=_celltype_names(config))


def synthetic_rows(config: SyntheticConfig, start: int, stop: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Rows ``[start, stop)`` of the synthetic data, generated on their own.

    Identical to the same rows of :func:`synthetic_chunks` whatever the ``chunk_size``, so disjoint row
    ranges can be generated independently (e.g. in parallel processes).

    Returns
    -------
    matrix
        ``(stop - start, n_genes)`` CSR of float32 integer counts, int32 indices, sorted within rows.
    obs
        Index: unique cell names; columns ``batch``, ``celltype``, ``lineage`` (categoricals with all
        categories of the data set) and ``low_quality`` (bool).
    """
    if not 0 <= start <= stop <= config.n_cells:
        raise ValueError(f"row range [{start}, {stop}) outside [0, {config.n_cells})")
    return _RowReader(config).rows(start, stop)


def synthetic_chunks(config: SyntheticConfig) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
    """Stream the synthetic data set in chunks of ``config.chunk_size`` rows (the last may be shorter).

    Memory stays flat: one chunk and one internal block are held at a time. The concatenated chunks do
    not depend on ``chunk_size``.

    Yields
    ------
    matrix, obs
        As :func:`synthetic_rows`.
    """
    reader = _RowReader(config)
    for start in range(0, config.n_cells, config.chunk_size):
        yield reader.rows(start, min(start + config.chunk_size, config.n_cells))


def make_synthetic(config: SyntheticConfig | None = None) -> anndata.AnnData:
    """The whole synthetic data set in memory (for tests and small demos).

    Returns
    -------
    anndata.AnnData
        ``X``: CSR float32 raw counts; ``obs``/``var`` as :func:`synthetic_rows` / :func:`synthetic_var`;
        ``uns["synthetic"]``: the config (with ``n_lineages`` resolved) and the presence matrix.
    """
    config = config or SyntheticConfig()
    matrices, obs = zip(*synthetic_chunks(config), strict=True)
    x = sp.vstack(matrices, format="csr")
    x.indices = x.indices.astype(np.int32, copy=False)
    settings = asdict(config)
    settings["n_lineages"] = config.resolved_n_lineages
    uns = {"synthetic": {"config": settings, "presence": _model(config).present.copy()}}
    return anndata.AnnData(X=x, obs=pd.concat(obs), var=synthetic_var(config), uns=uns)
