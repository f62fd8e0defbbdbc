"""Label transfer from an annotated reference embedding to projected query cells.

Two entry points:

- :func:`knn_classifier_transfer`: parity with the SCALEX reference package
  (``scalex.label_transfer``: scikit-learn ``KNeighborsClassifier()`` with its defaults, k = 5,
  uniform votes, no rejection).
- :func:`transfer_labels`: the scalex-scale method, a weighted kNN vote plus an ``unassigned`` call for
  query cells that no reference type explains (a type absent from the reference), calibrated so that a
  query shifted as a whole relative to the reference (another protocol, donor, species, a stimulation) is
  not called novel.

The vote
--------
The query cell's ``k`` nearest reference cells vote for their labels, each with weight ``1 / distance``
(default), ``1`` or a Gaussian of the distance. ``k`` is chosen per reference between the reference package's 5
and 30 (``k_choices``) by cross-validation: reference batches are grouped into at most 5 folds (random folds of
cells with one batch), each fold is voted from the others, and the ``k`` with the better mean of ARI and macro-F1
wins. Neither value is best everywhere (seed 0, plain kNN ARI: PBMC 3' v3 query 0.976 with k = 5 vs 0.959 with
k = 30; OneK1K donors 0.619 vs 0.659), and a compromise k misses whichever is better by half the gap; the
cross-validated choice is within 0.01 of the better plain kNN on every real split (``bench/annotation_real.py``).

The novelty call: a type margin, calibrated for shift
-----------------------------------------------------
The previous design compared a query cell's distance to its reference neighbours with the reference's own
neighbour distances (null = reference cells against the reference). Any shift between query and reference
(protocol, donor, species, stimulation) raises that ratio for every query cell, and a 10-d latent compresses
it, so a shifted known type looks like a novel one: measured (seed 0, log ratio, median) 0.10 for the
CellBench Drop-seq query against 0.01 in the null, 0.6 for Baron mouse -> human, while the PBMC T/NK cells left
out of the reference reached only 0.12. It left 18% and 24% of the CellBench 3-line queries (every type in the
reference) ``unassigned``, and 75% of Baron mouse -> human.

The statistic now asks instead whether a cell is clearly nearer one reference type than any other. Each
reference type is summarised by 32 k-means prototypes; a cell's distance ``d_t`` to type t is its mean distance
to the 3 nearest prototypes of t, and its *type margin* is ``ln(d_2 / d_1)`` over the two nearest types. A query
cell of a known type keeps a large margin even when shifted off its reference cluster (the shift is mostly not
towards another type), a cell of a type the reference lacks has none (it is about as far from its nearest type
as from the next). The margin is averaged over the cell and its 30 nearest query cells (a novel type is a group).

Calibration, three levels:

1. *Null* (leave-one-batch-fold-out): the reference cells of each fold of batches, seen as a query against the
   prototypes of the other folds (random folds with one reference batch), smoothed the same way; the median
   margin of each type is its *level*. With several reference batches the null holds the between-batch shift.
2. *Query-relative shift factor*: a query may be shifted more than any two reference batches (another protocol
   or species). Most query cells are of known types, so the query's own 75th percentile of margin / level
   (capped at 1) says how much the shift lowers the margins of known cells; levels are multiplied by it. This
   holds as long as a quarter of the query is of known types.
3. *Per-type factor for anchored types*: a shift can be type-specific (a stimulation moves monocytes more than T
   cells). A predicted type at least 25% of whose query cells are mixed with the reference (below) is certainly
   present, so its own 75th percentile sets its factor; a predicted type made only of unmixed cells (e.g. all of
   them a novel type absorbed by it) keeps the query's factor.

A cell passes the per-cell rule when its margin is below ``novelty_cutoff`` (0.5) times its type's calibrated
level AND its neighbourhood is mostly query cells: *mixing* (the share of reference cells among its 30 nearest
pooled cells, divided by the share expected if query and reference were mixed, averaged like the margin) below
``novelty_mixing`` (0.3). A novel type forms an island of query cells; a known type in an integrated latent
mixes, even where types are close (OneK1K: mixing ~1 at margins that are low for every type).

*Neighbourhood vote*: a cell is *novel* (``unassigned``) when more than half of itself and its 30 nearest query
cells pass the per-cell rule (``novelty_vote``). A novel type is a group, so its cells are called together: the
cells of a novel island that sit just above the cutoff are called with the rest of it, and the stray cells of a
known type that fall below it are not (a known population is rescued as a whole when most of it stays above).

Why no ambiguity rejection by default: rejecting cells whose winning label holds < 50% of the vote (the previous
default) only removes cells the vote mostly labels right: 27% of the Baron human -> mouse query and 5.4% of a
OneK1K query came out ``unassigned`` (macro-F1 0.485 vs 0.517 without it on Baron). ``min_vote_fraction``
keeps it available.

Measurements that chose it (``bench/annotation_real.py``; results in
``bench/results/amd-epyc-2c/annotation_real.json``)
--------------------------------------------------------------------------------------------------------------
Tuning splits, declared before tuning: PBMC 3' v2 query (3' v3 + 5' reference) and CellBench Drop-seq query
(three CELseq2 5-line plates), each with all query types present and every leave-one-type-out case (a type
removed from the reference batches, the model trained without it). On those (seed 0), cutoff 0.4 / 0.5 / 0.6 x
mixing 0.2 / 0.3 / none x query quantile 0.5 / 0.75 / 0.9: 0.5 / 0.3 / 0.75 left 0% of the all-types queries
unassigned and 94-100% of the left-out types except HCC827, which its sibling line H1975 absorbs (~1.6x as far
from H1975's reference cells as H1975's own query cells), at <= 2.2% of the other cells; cutoff 0.6 caught 71%
of HCC827 but unassigned 11% of the others. Prototypes (32, 3 nearest) instead of exact distances to each type's
10 nearest cells give the same calls within a few percent there, at 13 s instead of 250 s for 100k reference
cells (a kd-tree query from far away visits most of the tree). The per-type factor (3.) was added after the
held-out Kang ctrl -> stim and Baron mouse -> human queries came out 5.7% and 11.6% unassigned with one factor
(1.9% and 7.2% with it, 3 seeds), with no change on the tuning splits or the leave-one-type-out cases.

The neighbourhood vote was added in a later round (2026-12-02), the rest fixed. It was chosen looking at seeds 0-2
of every split (so no split is held out for it; ``novelty_vote=None`` is the per-cell call it replaced), then
checked on fresh trainings of every split that nothing was chosen on (seeds 3 and 4; Kang at 30,000 iterations
seeds 3-5). Per-cell call -> vote, seeds 0-2: leave-one-type-out median 66% -> 76% of T unassigned (15 -> 16 of
31 cases >= 70%), others 0.9% -> 1.0%; unassigned on the all-types queries: Baron mouse -> human 7.2% -> 1.3%,
Kang at 30,000 iterations 10.7% -> 6.8%. Fresh seeds: the all-types gain holds (Kang 7.4% -> 5.6% at 3,000
iterations, seed 4 alone 12.9% -> 10.9%; 8.5% -> 3.2% at 30,000), the leave-one-type-out gain does not (median
55% -> 46%, 14 of 31 cases >= 70% either way: the cases around the median are bimodal across seeds, a type caught
in one latent and absorbed in the next). All seeds (0-4, Kang 30,000 it. 0-5): median 66% -> 64%; Kang 4.3% ->
3.2% (3,000 it.) and 9.6% -> 5.0% (30,000 it.), the only all-types queries above 2%. Tried and left out, same runs: a higher cutoff (0.6 / 0.7
catch more novel types but leave 12-23% of the all-types Kang query unassigned and lose to kNN on 1-4 splits),
calls per k-means cluster of the query (the median moved between 64% and 79% with the k-means seed alone), a
per-type factor for every predicted type (anchor_share 0: Kang 5.4%, but the CellBench types left out fell to
32-72%), and a "detour" statistic (distance to the two nearest types against their distance apart: no
separation on PBMC or CellBench).

Result (``bench/results/amd-epyc-2c/annotation_real.json``, seeds 0-4, 3,000 iterations, latents trained with the
DSBN passthrough singleton rule of 2026-12-02, one machine; every split except the two tuning ones is held out from
the rule's other settings): the mean over seeds is within 0.01 of the better plain kNN (k = 5 or 30) on ARI and
macro-F1 on 10 of 11 labelled splits; Baron human -> mouse (153 query cells) misses on F1 by 0.017 (0.560 vs the
uniform 30-vote's 0.577; no cell is unassigned there). Its latent does not separate alpha, beta and delta cells even
within the human reference (5-NN accuracy 0.73; alpha F1 <= 0.10 under every vote), the cross-validated k = 5 is the
better k for this vote on 3 of 5 seeds, and no label-free way of choosing k that was tried (density-scaled or
importance-weighted cross-validation, reverse validation) picks 30 there while keeping 5 on the mirror split, where
the 30-vote loses 0.18 (``bench/annotation_vote_probe.py``). Unassigned <= 5% on every split (Baron mouse -> human
0.8%, Kang 3.2%; Kang at 30,000 iterations 5.0% over 6 seeds: in one latent the stimulated CD14 monocytes leave their
ctrl cluster as an unmixed island that plain kNN mostly calls FCGR3A monocytes). Leave-one-type-out, 31 cases: median
79% of T unassigned at 1.3% of the others (64% over the 25 held-out cases; 86% over the 20 cases that no sibling
absorbs; 0% on Baron, whose latent across species leaves most types absorbed). The vote's numbers above were
measured on latents of the earlier DSBN rule, under which OneK1K trained to epoch 2 only (its 4 cases then 0-12%
unassigned, now 0-90%).

Limitations: a novel type that its nearest reference type absorbs (a sibling, as close to that type's reference
cells as the type's own query cells) is indistinguishable from it by any distance rule; a latent that does not
separate the types (Baron across species) leaves nothing to call; more than three quarters of the query novel
defeats the query-relative factor. ``novelty=False`` disables the call.

Cost: one kNN search of the query against the reference (k = 30) and of the query against itself (30), k-means
of each type (at most 20,000 cells) per fold, and a cross-validation and null on at most 20,000 held-out
reference cells: 37 s vs 66 s for the previous design at 200k reference / 25k query cells (12 types, one
core, loaded machine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numba
import numpy as np
import pandas as pd
from numba import float32, int32, int64, prange, types

from ._utils import as_float_matrix, as_generator, check_lengths, encode_labels, numba_threads
from .knn import KNNMethod, knn, knn_query

__all__ = ["TransferConfig", "TransferResult", "transfer_labels", "knn_classifier_transfer"]

Weighting = Literal["distance", "uniform", "gaussian"]
_WEIGHTINGS = ("distance", "uniform", "gaussian")


@dataclass(frozen=True)
class TransferConfig:
    """Settings of :func:`transfer_labels` (defaults: the measured design of the module docstring).

    Parameters
    ----------
    k
        Reference neighbours of each query cell in the vote. ``None`` (default): chosen among ``k_choices`` by
        cross-validation on the reference (see the module docstring).
    k_choices
        Candidate vote sizes for ``k=None`` (default: the reference package's 5, and 30).
    weighting
        Vote weights: ``"distance"`` (1/d, default; a neighbour at distance 0 takes all the weight, as
        scikit-learn's ``weights="distance"``), ``"uniform"``, or ``"gaussian"`` (``exp(-d^2 / 2 sigma^2)``,
        sigma = the cell's median neighbour distance).
    min_vote_fraction
        Ambiguity call: a cell whose winning label holds less than this share of the vote weight is
        ``unassigned``. 0 (default) disables it (see the module docstring: on real data it only removed cells
        the vote would mostly have labelled right).
    unassigned
        The label given to rejected cells.
    novelty
        Apply the novelty call (False: every cell gets its vote winner, unless ``min_vote_fraction``).
    novelty_cutoff
        A query cell is novel when its type margin is below this fraction of the reference level (see the
        module docstring).
    novelty_mixing
        ... and when its share of reference cells among its pooled neighbours, relative to the share expected
        if query and reference were mixed, is below this. ``None``: no mixing condition.
    prototypes
        k-means centres summarising each reference type (the type margin measures distances to them).
    prototype_neighbours
        A cell's distance to a type is its mean distance to that many nearest prototypes of the type.
    query_quantile
        The query-relative shift factor is this quantile of the query cells' relative margins (of the whole query,
        or of an anchored predicted type).
    anchor_share
        A predicted type at least this share of whose query cells are mixed with the reference (mixing >=
        ``novelty_mixing``) gets its own shift factor (a type-specific shift, e.g. a stimulated cell type);
        ``None``: one factor for the whole query.
    novelty_neighbours
        Query neighbours over which the margin and mixing are averaged (the cell itself included; reference
        neighbours within a fold for the null), and the pooled neighbours of the mixing statistic. 0: per-cell
        values.
    novelty_vote
        Neighbourhood vote on the call: a cell is ``unassigned`` when more than this share of itself and its
        ``novelty_neighbours`` nearest query cells pass the per-cell rule (a novel type is a group, so its cells are
        called together and a known type's stray cells are not). ``None``: the per-cell rule alone.
    max_folds
        Folds of the cross-validation and of the null: reference batches grouped into at most this many folds
        (random folds of cells when there is one batch).
    max_null_cells
        Held-out reference cells scored in the cross-validation and the null (a random sample beyond this):
        bounds their cost on large atlases.
    return_probabilities
        Also return the (n_query x n_labels) vote-fraction table.
    method
        kNN engine (``"auto"``, ``"exact"``, ``"nndescent"``; see :mod:`scalex_scale.metrics.knn`).
    """

    k: int | None = None
    k_choices: tuple[int, ...] = (5, 30)
    weighting: Weighting = "distance"
    min_vote_fraction: float = 0.0
    unassigned: str = "unassigned"
    novelty: bool = True
    novelty_cutoff: float = 0.5
    novelty_mixing: float | None = 0.3
    novelty_neighbours: int = 30
    novelty_vote: float | None = 0.5
    prototypes: int = 32
    prototype_neighbours: int = 3
    query_quantile: float = 0.75
    anchor_share: float | None = 0.25
    max_folds: int = 5
    max_null_cells: int = 20_000
    return_probabilities: bool = False
    method: KNNMethod = "auto"

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1 or None, got {self.k}")
        if not self.k_choices or min(self.k_choices) < 1:
            raise ValueError(f"k_choices must be positive neighbour counts, got {self.k_choices}")
        if self.weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be 'distance', 'uniform' or 'gaussian', got {self.weighting!r}")
        if not 0.0 <= self.min_vote_fraction <= 1.0:
            raise ValueError(f"min_vote_fraction must be in [0, 1], got {self.min_vote_fraction}")
        if self.novelty_cutoff <= 0:
            raise ValueError(f"novelty_cutoff must be positive, got {self.novelty_cutoff}")
        if self.novelty_mixing is not None and self.novelty_mixing <= 0:
            raise ValueError(f"novelty_mixing must be positive or None, got {self.novelty_mixing}")
        if self.prototypes < 1 or not 1 <= self.prototype_neighbours <= self.prototypes:
            raise ValueError(f"prototypes must be >= 1 and prototype_neighbours in [1, prototypes], got {self.prototypes}, "
                             f"{self.prototype_neighbours}")
        if self.anchor_share is not None and not 0.0 < self.anchor_share <= 1.0:
            raise ValueError(f"anchor_share must be in (0, 1] or None, got {self.anchor_share}")
        if not 0.0 < self.query_quantile <= 1.0:
            raise ValueError(f"query_quantile must be in (0, 1], got {self.query_quantile}")
        if self.novelty_vote is not None and not 0.0 <= self.novelty_vote < 1.0:
            raise ValueError(f"novelty_vote must be in [0, 1) or None, got {self.novelty_vote}")
        if self.novelty_neighbours < 0:
            raise ValueError(f"novelty_neighbours must be >= 0, got {self.novelty_neighbours}")
        if self.max_folds < 2:
            raise ValueError(f"max_folds must be >= 2, got {self.max_folds}")
        if self.max_null_cells < 2:
            raise ValueError(f"max_null_cells must be >= 2, got {self.max_null_cells}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TransferConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TransferResult:
    """Outcome of :func:`transfer_labels` (one entry per query cell).

    Attributes
    ----------
    labels
        object array: the transferred label, or the ``unassigned`` value.
    confidence
        float32 in [0, 1]: ``vote_fraction * novelty_factor`` with ``novelty_factor = min(1, margin_ratio / (2 *
        novelty_cutoff))`` (0.5 at the cutoff; 1 without the novelty call): a ranking score.
    predicted
        object array: the winning reference label before any rejection.
    vote_fraction
        float32: the winning label's share of the neighbour weight.
    second_label, second_fraction
        The runner-up label (``None`` when all neighbours agree) and its share.
    novel
        bool: the novelty call, after the neighbourhood vote (all False when ``novelty=False``).
    margin_ratio
        float32: the cell's smoothed type margin divided by the level of its predicted type (small = novel);
        NaN when ``novelty=False``.
    mixing
        float32: the smoothed share of reference cells among the cell's pooled neighbours, relative to a mixed
        share (NaN when not computed).
    levels
        Per predicted type: ``level`` (the margin it was compared with) = ``null`` (its reference level) x
        ``shift`` (the query-relative factor), and ``mixed_share`` (share of its query cells mixed with the
        reference); see the module docstring. Empty when ``novelty=False``.
    k
        The vote's neighbour count (``config.k``, or the cross-validated choice).
    cv_scores
        ``{k: score}`` of the cross-validation (mean of ARI and macro-F1 on held-out reference folds); empty when
        ``config.k`` was given.
    probabilities
        Optional DataFrame (query cells x reference labels) of vote fractions.
    """

    labels: np.ndarray
    confidence: np.ndarray
    predicted: np.ndarray
    vote_fraction: np.ndarray
    second_label: np.ndarray
    second_fraction: np.ndarray
    novel: np.ndarray
    margin_ratio: np.ndarray
    mixing: np.ndarray
    levels: dict[str, dict[str, float]]
    k: int
    cv_scores: dict[int, float]
    probabilities: pd.DataFrame | None = None


_VOTE_SIG = types.Tuple((int32[:], float32[:], int32[:], float32[:]))(int64[:, :], float32[:, :], int32[:], int64)


@numba.njit(_VOTE_SIG, parallel=True, cache=True)
def _top2_votes(idx: np.ndarray, w: np.ndarray, ref_codes: np.ndarray, n_labels: int):
    """Per query row: best label, its weight share, runner-up label (-1 if none), its share.

    Ties go to the smaller label code (scikit-learn's argmax convention).
    """
    n, k = idx.shape
    best = np.empty(n, dtype=np.int32)
    best_f = np.empty(n, dtype=np.float32)
    second = np.empty(n, dtype=np.int32)
    second_f = np.empty(n, dtype=np.float32)
    for i in prange(n):
        acc = np.zeros(n_labels)
        total = 0.0
        for j in range(k):
            acc[ref_codes[idx[i, j]]] += w[i, j]
            total += w[i, j]
        b1 = -1
        b2 = -1
        for lab in range(n_labels):
            if acc[lab] <= 0.0:
                continue
            if b1 < 0 or acc[lab] > acc[b1]:
                b2 = b1
                b1 = lab
            elif b2 < 0 or acc[lab] > acc[b2]:
                b2 = lab
        best[i] = b1
        best_f[i] = acc[b1] / total if total > 0 else 0.0
        second[i] = b2
        second_f[i] = acc[b2] / total if (b2 >= 0 and total > 0) else 0.0
    return best, best_f, second, second_f


def _weights(dist: np.ndarray, weighting: str) -> np.ndarray:
    """Neighbour weights (float32, same shape as ``dist``)."""
    if weighting == "uniform":
        return np.ones_like(dist, dtype=np.float32)
    if weighting == "distance":
        zero = dist <= 0.0
        with np.errstate(divide="ignore"):
            w = np.float32(1.0) / dist.astype(np.float32, copy=False)
        rows = zero.any(axis=1)
        # scikit-learn rule: neighbours at distance 0 share all the weight
        w[rows] = zero[rows].astype(np.float32)
        return w
    if weighting == "gaussian":
        sigma = np.median(dist, axis=1, keepdims=True).astype(np.float64)
        sigma[sigma <= 0] = 1.0
        return np.exp(-(dist.astype(np.float64) ** 2) / (2.0 * sigma**2)).astype(np.float32)
    raise ValueError(f"weighting must be 'distance', 'uniform' or 'gaussian', got {weighting!r}")


def transfer_labels(
    ref_X: np.ndarray,
    ref_labels: Any,
    query_X: np.ndarray,
    config: TransferConfig | None = None,
    *,
    ref_batches: Any = None,
    rng: np.random.Generator | int | None = 0,
    n_jobs: int | None = None,
) -> TransferResult:
    """Transfer reference labels to query cells by a weighted kNN vote with a shift-calibrated novelty call.

    Parameters
    ----------
    ref_X
        (n_ref, d) reference embedding (e.g. the atlas latent).
    ref_labels
        (n_ref,) reference labels.
    query_X
        (n_query, d) query embedding, same space.
    config
        A :class:`TransferConfig` (default: its defaults).
    ref_batches
        (n_ref,) batch of each reference cell: with two or more batches the novelty null is
        leave-one-reference-batch-out (see the module docstring); ``None``: one batch.
    rng
        Generator or seed of the random parts (folds and held-out sample, k-means prototypes, NN-descent): a fixed
        seed by default, so a call is reproducible.
    n_jobs
        Threads.

    Returns
    -------
    TransferResult
    """
    cfg = config or TransferConfig()
    ref_X = as_float_matrix(ref_X, np.float32, "ref_X")
    query_X = as_float_matrix(query_X, np.float32, "query_X")
    check_lengths(ref_X.shape[0], ref_labels=ref_labels, ref_batches=ref_batches)
    if ref_X.shape[1] != query_X.shape[1]:
        raise ValueError(f"ref_X has {ref_X.shape[1]} dimensions but query_X has {query_X.shape[1]}")
    n_ref, n_query = ref_X.shape[0], query_X.shape[0]
    if cfg.k is not None and cfg.k > n_ref:
        raise ValueError(f"k must be in [1, n_ref] = [1, {n_ref}], got {cfg.k}")
    codes, cats = encode_labels(ref_labels)
    gen = as_generator(rng)
    folds, held_out = _folds(ref_batches, n_ref, cfg.max_folds, cfg.max_null_cells, gen)
    k, cv_scores = (cfg.k, {}) if cfg.k is not None else _choose_k(ref_X, codes, folds, held_out, cfg, gen, n_jobs)

    use_novelty = cfg.novelty and cats.size >= 2 and n_query >= 2
    k_search = min(n_ref, max(k, cfg.novelty_neighbours if use_novelty else 0))
    idx_all, dist_all = knn_query(ref_X, query_X, k_search, method=cfg.method, rng=gen, n_jobs=n_jobs)
    idx, dist = np.ascontiguousarray(idx_all[:, :k]), np.ascontiguousarray(dist_all[:, :k])
    w = _weights(dist, cfg.weighting)
    with numba_threads(n_jobs):
        best, best_f, second, second_f = _top2_votes(idx, w, codes, int(cats.size))
    predicted = cats[best].astype(object)

    if use_novelty:
        nov = _novelty(ref_X, codes, int(cats.size), query_X, best, dist_all, (folds, held_out), cfg, gen, n_jobs)
        novel, ratio, mixing = nov.novel, nov.ratio, nov.mixing
        levels = {str(cats[c]): v for c, v in nov.levels.items()}
        factor = np.minimum(1.0, ratio / (2.0 * cfg.novelty_cutoff))
    else:
        novel = np.zeros(n_query, dtype=bool)
        ratio = mixing = np.full(n_query, np.nan)
        levels, factor = {}, np.ones(n_query)

    confidence = (best_f.astype(np.float64) * factor).astype(np.float32)
    labels = predicted.copy()
    labels[novel | (best_f < cfg.min_vote_fraction)] = cfg.unassigned
    second_label = np.where(second >= 0, cats[np.maximum(second, 0)].astype(object), None)

    probabilities = None
    if cfg.return_probabilities:
        table = np.zeros((n_query, cats.size), dtype=np.float32)
        rows = np.repeat(np.arange(n_query), k)
        np.add.at(table, (rows, codes[idx.ravel()]), w.ravel())
        table /= np.maximum(table.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)
        probabilities = pd.DataFrame(table, columns=pd.Index(cats, name="label"))

    return TransferResult(
        labels=labels,
        confidence=confidence,
        predicted=predicted,
        vote_fraction=best_f,
        second_label=second_label,
        second_fraction=second_f,
        novel=novel,
        margin_ratio=ratio.astype(np.float32),
        mixing=mixing.astype(np.float32),
        levels=levels,
        k=int(k),
        cv_scores=cv_scores,
        probabilities=probabilities,
    )


# ----------------------------------------------------------------------------------------------- novelty
@dataclass(frozen=True)
class _Novelty:
    novel: np.ndarray
    ratio: np.ndarray
    mixing: np.ndarray
    levels: dict[int, dict[str, float]]


def _smooth(values: np.ndarray, neighbours: np.ndarray | None) -> np.ndarray:
    """Mean of ``values`` over each row itself and its ``neighbours`` (indices into ``values``)."""
    if neighbours is None or neighbours.shape[1] == 0:
        return values.astype(np.float64, copy=True)
    return (values + values[neighbours].sum(axis=1)) / (1 + neighbours.shape[1])


def _neighbour_graph(X: np.ndarray, ks: int, cfg: TransferConfig, rng: Any, n_jobs: int | None) -> np.ndarray | None:
    """Each row's ``ks`` nearest other rows (None when there are none to take)."""
    ks = min(ks, X.shape[0] - 1)
    if ks <= 0:
        return None
    return knn(X, ks, method=cfg.method, rng=rng, n_jobs=n_jobs)[0]


def _prototypes(
    ref_X: np.ndarray, codes: np.ndarray, n_types: int, n_protos: int, gen: np.random.Generator
) -> np.ndarray:
    """(n_types, n_protos, d) k-means centres of each type's reference cells (all its cells when it has at most
    ``n_protos``; k-means on at most 20,000 sampled cells otherwise), padded with NaN; types absent: all NaN."""
    from sklearn.cluster import KMeans

    out = np.full((n_types, n_protos, ref_X.shape[1]), np.nan, dtype=np.float32)
    for t in range(n_types):
        cells = ref_X[codes == t]
        if cells.shape[0] <= n_protos:
            out[t, : cells.shape[0]] = cells
            continue
        if cells.shape[0] > 20_000:
            cells = cells[gen.choice(cells.shape[0], 20_000, replace=False)]
        km = KMeans(n_clusters=n_protos, n_init=1, random_state=int(gen.integers(2**31 - 1))).fit(cells)
        out[t] = km.cluster_centers_
    return out


def _type_margin(X: np.ndarray, protos: np.ndarray, kp: int) -> np.ndarray:
    """``ln(d_2 / d_1)`` per row of ``X``: ``d_t`` = mean distance to the ``kp`` nearest prototypes of type t,
    ``d_1 <= d_2`` the two nearest types (absent types are skipped); +inf with fewer than two types or d_1 = 0."""
    n_types, n_protos, dim = protos.shape
    flat = protos.reshape(-1, dim).astype(np.float64)
    valid = np.isfinite(flat).all(axis=1)
    flat[~valid] = 0.0
    sq = (flat**2).sum(axis=1)
    margin = np.empty(X.shape[0])
    for start in range(0, X.shape[0], 4096):
        x = X[start : start + 4096].astype(np.float64)
        d2 = np.maximum((x**2).sum(axis=1)[:, None] - 2.0 * x @ flat.T + sq[None, :], 0.0)
        d = np.sqrt(d2)
        d[:, ~valid] = np.inf
        d = d.reshape(x.shape[0], n_types, n_protos)
        k = min(kp, n_protos)
        near = np.partition(d, k - 1, axis=2)[:, :, :k] if k < n_protos else d
        finite = np.isfinite(near)
        count = finite.sum(axis=2)  # fewer than kp for types with fewer prototypes; 0 for absent types
        with np.errstate(invalid="ignore", divide="ignore"):
            dt = np.where(finite, near, 0.0).sum(axis=2) / count
        dt[count == 0] = np.inf
        two = np.partition(dt, 1, axis=1)[:, :2] if n_types > 1 else np.full((x.shape[0], 2), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            margin[start : start + x.shape[0]] = np.log(two[:, 1] / two[:, 0])
    margin[~np.isfinite(margin)] = np.inf
    return margin


def _folds(
    ref_batches: Any, n: int, max_folds: int, max_held: int, gen: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Fold of each reference cell, and which cells are scored when their fold is held out.

    Folds: whole batches grouped into at most ``max_folds`` folds of similar size (largest batch first, into the
    smallest fold), or, with fewer than two batches, random folds of cells. Held-out scoring uses a random
    ``max_held`` cells in all (each fold in proportion), which bounds the cost on large atlases.
    """
    folds = None
    if ref_batches is not None:
        names, inverse, sizes = np.unique(np.asarray(ref_batches).astype(str), return_inverse=True, return_counts=True)
        if names.size >= 2:
            n_folds = min(max_folds, names.size)
            load = np.zeros(n_folds)
            fold_of = np.empty(names.size, dtype=np.int64)
            for b in np.argsort(-sizes, kind="stable"):
                fold_of[b] = int(np.argmin(load))
                load[fold_of[b]] += sizes[b]
            folds = fold_of[inverse]
    if folds is None:
        folds = gen.permutation(np.arange(n) % max_folds)
    held = np.ones(n, dtype=bool)
    if n > max_held:
        held[:] = False
        held[gen.choice(n, size=max_held, replace=False)] = True
    return folds, held


def _cv_predictions(ref_X: np.ndarray, codes: np.ndarray, folds: np.ndarray, held_out: np.ndarray, ks: Sequence[int],
                    cfg: TransferConfig, gen: np.random.Generator, n_jobs: int | None) -> dict[int, np.ndarray]:
    """Held-out vote winners of the ``held_out`` reference cells, one array per ``k`` (-1: not scored)."""
    out = {k: np.full(ref_X.shape[0], -1, dtype=np.int32) for k in ks}
    n_labels = int(codes.max()) + 1
    for f in np.unique(folds):
        held, rest = (folds == f) & held_out, folds != f
        if not held.any():
            continue
        kmax = min(max(ks), int(rest.sum()))
        if kmax < 1:
            continue
        idx, dist = knn_query(ref_X[rest], ref_X[held], kmax, method=cfg.method, rng=gen, n_jobs=n_jobs)
        rest_codes = codes[rest]
        for k in ks:
            kk = min(k, kmax)
            w = _weights(dist[:, :kk], cfg.weighting)
            with numba_threads(n_jobs):
                best = _top2_votes(np.ascontiguousarray(idx[:, :kk]), w, rest_codes, n_labels)[0]
            out[k][held] = best
    return out


def _choose_k(ref_X: np.ndarray, codes: np.ndarray, folds: np.ndarray, held_out: np.ndarray, cfg: TransferConfig,
              gen: np.random.Generator, n_jobs: int | None) -> tuple[int, dict[int, float]]:
    """The ``k_choices`` entry with the best held-out mean of ARI and macro-F1 (ties: the larger k)."""
    from .paper import ari, f1_scores

    ks = sorted({min(k, ref_X.shape[0]) for k in cfg.k_choices})
    if len(ks) == 1 or np.unique(folds).size < 2:
        return ks[-1], {}
    preds = _cv_predictions(ref_X, codes, folds, held_out, ks, cfg, gen, n_jobs)
    scores = {}
    for k, p in preds.items():
        ok = p >= 0
        scores[k] = 0.5 * (ari(codes[ok], p[ok]) + f1_scores(codes[ok], p[ok])["f1_macro"]) if ok.any() else -np.inf
    top = max(scores.values())
    return max(k for k, v in scores.items() if v >= top - 1e-12), {int(k): float(v) for k, v in scores.items()}


def _null_margins(
    ref_X: np.ndarray, codes: np.ndarray, n_types: int, split: tuple[np.ndarray, np.ndarray], cfg: TransferConfig,
    gen: np.random.Generator, n_jobs: int | None,
) -> np.ndarray:
    """Smoothed margins of held-out reference cells seen as a query: each fold (of reference batches, or of random
    cells with one batch) against the prototypes of the other folds; NaN for cells not scored and for cells whose
    type the other folds lack."""
    folds, held_out = split
    out = np.full(ref_X.shape[0], np.nan)
    for f in np.unique(folds):
        held, rest = (folds == f) & held_out, folds != f
        if held.sum() < 2 or np.unique(codes[rest]).size < 2:
            continue
        protos = _prototypes(ref_X[rest], codes[rest], n_types, cfg.prototypes, gen)
        m = _type_margin(ref_X[held], protos, cfg.prototype_neighbours)
        m = _smooth(np.where(np.isfinite(m), m, np.nan), _neighbour_graph(ref_X[held], cfg.novelty_neighbours, cfg, gen, n_jobs))
        m[~np.isin(codes[held], codes[rest])] = np.nan
        out[held] = m
    return out


def _mixing(ref_dist: np.ndarray, query_dist: np.ndarray | None, n_ref: int, n_query: int) -> np.ndarray:
    """Per query cell: share of reference cells among its nearest pooled (reference + query) cells, divided by the
    share expected if the two were mixed, ``n_ref / (n_ref + n_query - 1)``. The pooled neighbours are the
    ``m`` smallest of the cell's sorted reference distances and query distances (itself excluded), ``m`` = the
    shorter list: no search of its own."""
    if query_dist is None:
        return np.full(ref_dist.shape[0], np.nan)
    m = min(ref_dist.shape[1], query_dist.shape[1])
    merged = np.concatenate([ref_dist[:, :m], query_dist[:, :m]], axis=1)
    from_ref = np.argsort(merged, axis=1, kind="stable")[:, :m] < m  # ties go to the reference
    return from_ref.mean(axis=1) / (n_ref / (n_ref + n_query - 1))


def _novelty(
    ref_X: np.ndarray, codes: np.ndarray, n_types: int, query_X: np.ndarray, best: np.ndarray, ref_dist: np.ndarray,
    split: tuple[np.ndarray, np.ndarray], cfg: TransferConfig, gen: np.random.Generator, n_jobs: int | None,
) -> _Novelty:
    ks = min(cfg.novelty_neighbours, query_X.shape[0] - 1)
    q_graph, q_dist = knn(query_X, ks, method=cfg.method, rng=gen, n_jobs=n_jobs) if ks > 0 else (None, None)
    margin = _type_margin(query_X, _prototypes(ref_X, codes, n_types, cfg.prototypes, gen), cfg.prototype_neighbours)
    margin = _smooth(np.where(np.isfinite(margin), margin, 1e6), q_graph)
    null = _null_margins(ref_X, codes, n_types, split, cfg, gen, n_jobs)
    finite = np.isfinite(null)
    overall = float(np.median(null[finite])) if finite.any() else np.inf
    null_level = np.full(n_types, overall)
    for t in range(n_types):
        own = finite & (codes == t)
        if own.any():
            null_level[t] = float(np.median(null[own]))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(null_level[best] > 0, margin / null_level[best], np.inf)
    mixing = np.full(query_X.shape[0], np.nan)
    if cfg.novelty_mixing is not None:
        mixing = _smooth(_mixing(ref_dist, q_dist, ref_X.shape[0], query_X.shape[0]), q_graph)
    # query-relative shift factor: most query cells are of known types, so the query's own upper quantile of
    # the relative margin says how far a shift lowers margins of known cells
    shift = float(min(1.0, np.quantile(rel, cfg.query_quantile))) if np.isfinite(rel).any() else 1.0
    type_shift = np.full(n_types, shift)
    anchored = {}
    if cfg.anchor_share is not None and cfg.novelty_mixing is not None:
        for t in np.unique(best):
            group = best == t
            share = float(np.mean(mixing[group] >= cfg.novelty_mixing))
            anchored[int(t)] = share
            if share >= cfg.anchor_share and group.sum() >= 10:
                type_shift[t] = min(shift, float(np.quantile(rel[group], cfg.query_quantile)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(type_shift[best] > 0, rel / type_shift[best], np.inf)
    levels = {int(t): {"level": float(null_level[t] * type_shift[t]), "null": float(null_level[t]), "shift": float(type_shift[t]),
                       **({"mixed_share": anchored[int(t)]} if int(t) in anchored else {})}
              for t in np.unique(best)}
    novel = ratio < cfg.novelty_cutoff
    if cfg.novelty_mixing is not None:
        novel &= ~(mixing >= cfg.novelty_mixing)  # NaN (no query neighbours): no evidence of mixing
    if cfg.novelty_vote is not None and q_graph is not None:
        # a novel type is a group: a cell is called with its neighbourhood's majority
        novel = _smooth(novel.astype(np.float64), q_graph) > cfg.novelty_vote
    return _Novelty(novel, ratio, mixing, levels)


def knn_classifier_transfer(ref_X: np.ndarray, ref_labels: Any, query_X: np.ndarray, k: int = 5) -> np.ndarray:
    """Reference-parity label transfer: scikit-learn ``KNeighborsClassifier(n_neighbors=k)``.

    This is what ``scalex.label_transfer`` (SCALEX 1.0.4) does with ``k = 5``: uniform majority
    vote of the k nearest reference cells (ties to the first label in sorted order), every cell
    gets a reference label (no rejection).

    Returns
    -------
    numpy.ndarray
        (n_query,) predicted labels, dtype of ``ref_labels``.
    """
    from sklearn.neighbors import KNeighborsClassifier

    ref_X = as_float_matrix(ref_X, np.float32, "ref_X")
    query_X = as_float_matrix(query_X, np.float32, "query_X")
    check_lengths(ref_X.shape[0], ref_labels=ref_labels)
    clf = KNeighborsClassifier(n_neighbors=k).fit(ref_X, np.asarray(ref_labels))
    return clf.predict(query_X)


