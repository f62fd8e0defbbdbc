"""One-call evaluation of an integrated embedding: one shared kNN graph, every metric.

Designed for atlas scale: at 1M cells x 10-d everything is O(n k) memory (one int64/float32
graph of 89 columns ~ 1.07 GB is the largest object), and the O(n^2) silhouette metrics run on
documented subsamples (:class:`EvaluateConfig`).

The metrics are a table, :data:`STEPS`: one :class:`MetricStep` per metric names the function
that computes it, the inputs it reads (the embedding, the labels, the shared neighbourhoods, the
connectivity graph), the :class:`EvaluateConfig` fields it is given and the score keys it writes.
:func:`evaluate` builds the graphs the selected steps need, then runs them in the order of
:attr:`EvaluateConfig.metrics` (by default the table's). A new metric is one small function and
one table row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ._utils import as_float_matrix, as_generator, check_lengths
from .knn import KNNMethod, exact_knn_rows, knn
from .paper import mixing_score_details, silhouette
from .scib import (
    batch_asw,
    clisi,
    graph_connectivity,
    ilisi,
    isolated_labels_asw,
    kbet,
    kbet_per_label,
    scale_clisi,
    scale_ilisi,
)

__all__ = ["EvaluateConfig", "EvaluationResult", "MetricStep", "SharedGraph", "evaluate", "METRICS", "STEPS"]

KNNLike = tuple[np.ndarray, np.ndarray]
Input = Literal["X", "batches", "labels", "graph", "connectivity_graph"]


@dataclass(frozen=True)
class SharedGraph:
    """The shared neighbourhoods of the scored cells.

    Attributes
    ----------
    knn
        ``(indices, distances)``, self excluded, ``n_neighbors - 1`` columns or more.
    cells
        Sorted ids of the scored cells (row r = cell ``cells[r]``), or None: every cell (row i = cell i).
    n_neighbors
        Neighbourhood size counting the cell (graph columns used + 1).
    """

    knn: KNNLike
    cells: np.ndarray | None
    n_neighbors: int


@dataclass(frozen=True)
class MetricStep:
    """One row of the metric table.

    Attributes
    ----------
    name
        Metric name (an entry of :attr:`EvaluateConfig.metrics`, the key of its time in
        ``EvaluationResult.seconds``, and the key of its RNG stream).
    compute
        ``compute(**inputs, **config_fields, rng=..., n_jobs=...) -> {score key: value}``.
    inputs
        What it reads, passed by name: ``X`` (float32 embedding), ``batches``, ``labels``,
        ``graph`` (a :class:`SharedGraph`), ``connectivity_graph`` (a full graph of all cells).
    config_fields
        The :class:`EvaluateConfig` fields it is given, passed by name.
    keys
        Score keys it writes, in order (all NaN when the step is skipped for a single batch).
    needs_two_batches
        Undefined with a single batch: every key is NaN and the step does not run.
    """

    name: str
    compute: Callable[..., dict[str, float]]
    inputs: tuple[Input, ...]
    config_fields: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    needs_two_batches: bool = False


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------


def _batch_entropy_mixing(
    *, X: np.ndarray, batches: np.ndarray, mixing_neighbors: int, mixing_pools: int, mixing_samples_per_pool: int,
    rng: np.random.Generator, n_jobs: int | None,
) -> dict[str, float]:  # fmt: skip
    res = mixing_score_details(
        X, batches, n_neighbors=mixing_neighbors, n_pools=mixing_pools, n_samples_per_pool=mixing_samples_per_pool,
        rng=rng, n_jobs=n_jobs,
    )  # fmt: skip
    return {"batch_entropy_mixing": res.reference, "batch_entropy_mixing_normalized": res.normalized}


def _silhouette(
    *, X: np.ndarray, labels: np.ndarray, silhouette_sample_size: int | None, rng: np.random.Generator,
    n_jobs: int | None,
) -> dict[str, float]:  # fmt: skip
    return {"silhouette": silhouette(X, labels, sample_size=silhouette_sample_size, rng=rng, n_jobs=n_jobs)}


def _ilisi(
    *, batches: np.ndarray, graph: SharedGraph, perplexity: float, rng: np.random.Generator, n_jobs: int | None
) -> dict[str, float]:
    raw = ilisi(
        None, batches, knn=graph.knn, cells=graph.cells, perplexity=perplexity, n_neighbors=graph.n_neighbors,
        scale=False, n_jobs=n_jobs,
    )  # fmt: skip
    return {"ilisi_raw": raw, "ilisi": scale_ilisi(raw, int(np.unique(batches).size))}


def _clisi(
    *, labels: np.ndarray, graph: SharedGraph, perplexity: float, rng: np.random.Generator, n_jobs: int | None
) -> dict[str, float]:
    raw = clisi(
        None, labels, knn=graph.knn, cells=graph.cells, perplexity=perplexity, n_neighbors=graph.n_neighbors,
        scale=False, n_jobs=n_jobs,
    )  # fmt: skip
    return {"clisi_raw": raw, "clisi": scale_clisi(raw, int(np.unique(labels).size))}


def _kbet(
    *, batches: np.ndarray, graph: SharedGraph, kbet_neighbors: int, kbet_alpha: float, rng: np.random.Generator,
    n_jobs: int | None,
) -> dict[str, float]:  # fmt: skip
    res = kbet(
        None, batches, knn=graph.knn, cells=graph.cells, n_neighbors=min(kbet_neighbors, graph.n_neighbors),
        alpha=kbet_alpha, n_jobs=n_jobs,
    )  # fmt: skip
    return {"kbet": res.acceptance_rate}


def _kbet_per_label(
    *, X: np.ndarray, batches: np.ndarray, labels: np.ndarray, graph: SharedGraph, kbet_alpha: float,
    rng: np.random.Generator, n_jobs: int | None,
) -> dict[str, float]:  # fmt: skip
    score = kbet_per_label(X, batches, labels, knn=graph.knn, cells=graph.cells, alpha=kbet_alpha, n_jobs=n_jobs)
    return {"kbet_per_label": score}


def _graph_connectivity(
    *, labels: np.ndarray, connectivity_graph: KNNLike, graph_connectivity_neighbors: int, rng: np.random.Generator,
    n_jobs: int | None,
) -> dict[str, float]:  # fmt: skip
    k = min(graph_connectivity_neighbors, len(labels))
    return {"graph_connectivity": graph_connectivity(None, labels, knn=connectivity_graph, n_neighbors=k)}


def _isolated_labels_asw(
    *, X: np.ndarray, batches: np.ndarray, labels: np.ndarray, asw_max_cells_per_label: int | None,
    rng: np.random.Generator, n_jobs: int | None,
) -> dict[str, float]:  # fmt: skip
    score = isolated_labels_asw(X, labels, batches, max_cells_per_label=asw_max_cells_per_label, rng=rng, n_jobs=n_jobs)
    return {"isolated_labels_asw": score}


def _batch_asw(
    *, X: np.ndarray, batches: np.ndarray, labels: np.ndarray, asw_max_cells_per_label: int | None,
    rng: np.random.Generator, n_jobs: int | None,
) -> dict[str, float]:  # fmt: skip
    score = batch_asw(X, batches, labels, max_cells_per_label=asw_max_cells_per_label, rng=rng, n_jobs=n_jobs)
    return {"batch_asw": score}


#: The metric table, in evaluation order.
STEPS: tuple[MetricStep, ...] = (
    MetricStep(
        "batch_entropy_mixing", _batch_entropy_mixing, ("X", "batches"),
        ("mixing_neighbors", "mixing_pools", "mixing_samples_per_pool"),
        ("batch_entropy_mixing", "batch_entropy_mixing_normalized"), needs_two_batches=True,
    ),
    MetricStep("silhouette", _silhouette, ("X", "labels"), ("silhouette_sample_size",), ("silhouette",)),
    MetricStep("ilisi", _ilisi, ("batches", "graph"), ("perplexity",), ("ilisi_raw", "ilisi")),
    MetricStep("clisi", _clisi, ("labels", "graph"), ("perplexity",), ("clisi_raw", "clisi")),
    MetricStep(
        "kbet", _kbet, ("batches", "graph"), ("kbet_neighbors", "kbet_alpha"), ("kbet",), needs_two_batches=True
    ),
    MetricStep(
        "kbet_per_label", _kbet_per_label, ("X", "batches", "labels", "graph"), ("kbet_alpha",), ("kbet_per_label",),
        needs_two_batches=True,
    ),
    MetricStep(
        "graph_connectivity", _graph_connectivity, ("labels", "connectivity_graph"),
        ("graph_connectivity_neighbors",), ("graph_connectivity",),
    ),
    MetricStep(
        "isolated_labels_asw", _isolated_labels_asw, ("X", "batches", "labels"), ("asw_max_cells_per_label",),
        ("isolated_labels_asw",),
    ),
    MetricStep(
        "batch_asw", _batch_asw, ("X", "batches", "labels"), ("asw_max_cells_per_label",), ("batch_asw",),
        needs_two_batches=True,
    ),
)  # fmt: skip

#: Metric names in evaluation order (``knn`` is the shared graph, timed on its own).
METRICS: tuple[str, ...] = tuple(step.name for step in STEPS)


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of :func:`evaluate`.

    Attributes
    ----------
    metrics
        Which metrics to compute (subset of :data:`METRICS`).
    graph_neighbors
        Neighbourhood size of the shared graph, counting the cell (90 -> 89 columns): enough
        for LISI (90), kBET (50), graph connectivity (15) and per-label kBET (k0 <= 70).
    neighborhood_sample_size
        Above this many cells, the neighbourhood metrics (iLISI, cLISI, kBET, per-label kBET)
        score a uniform random subset of this many cells, each with its **exact** neighbourhood
        among all cells (kd-tree queries), instead of building the full 89-neighbour graph: at
        1M cells this is faster and needs a fraction of the memory of the full graph, and the
        medians / means move by far less than the differences between integrations (figures:
        ``bench/README.md``, "Figures behind design choices"). Graph connectivity always uses a
        full (15-neighbour) graph. ``None``: always the full graph.
    knn_method
        Engine for the full graphs (``"auto"``: exact kd-tree in low dimension up to 200k cells,
        NN-descent above).
    mixing_neighbors, mixing_pools, mixing_samples_per_pool
        Batch entropy mixing score settings (paper: 100, 100, 100); computed with its own exact
        queries of the sampled cells (the graph has fewer than 100 columns).
    silhouette_sample_size
        Uniform subsample for the cell-type silhouette (paper/reference: 50,000); None = all.
    asw_max_cells_per_label
        Per-label cap for batch ASW and isolated-label ASW; None = exact. Worst case (every label
        isolated, 20 labels) costs (20 x cap)^2 distance evaluations: ~1e10 at 5,000.
    perplexity
        LISI perplexity.
    kbet_neighbors, kbet_alpha
        Global kBET neighbourhood (counting the cell) and significance level.
    graph_connectivity_neighbors
        Neighbourhood (counting the cell) of the connectivity graph.
    """

    metrics: tuple[str, ...] = METRICS
    graph_neighbors: int = 90
    neighborhood_sample_size: int | None = 200_000
    knn_method: KNNMethod = "auto"
    mixing_neighbors: int = 100
    mixing_pools: int = 100
    mixing_samples_per_pool: int = 100
    silhouette_sample_size: int | None = 50_000
    asw_max_cells_per_label: int | None = 5_000
    perplexity: float = 30.0
    kbet_neighbors: int = 50
    kbet_alpha: float = 0.05
    graph_connectivity_neighbors: int = 15


@dataclass
class EvaluationResult:
    """Scores and wall-clock seconds per step (``"knn"`` is the shared graph)."""

    scores: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def evaluate(
    X: np.ndarray,
    batches: Any,
    labels: Any,
    *,
    config: EvaluateConfig = EvaluateConfig(),
    rng: np.random.Generator | int | None = None,
    n_jobs: int | None = None,
    knn_graph: tuple[np.ndarray, np.ndarray] | None = None,
    on_step: Callable[[str, float], None] | None = None,
) -> EvaluationResult:
    """Compute the paper and scIB-style metrics of an embedding with one shared kNN graph.

    Steps (keys of ``result.seconds``): ``knn`` (the shared neighbourhoods: full graph, or exact
    neighbourhoods of ``neighborhood_sample_size`` sampled cells), ``knn_connectivity`` (the
    15-neighbour full graph, only when sampling), then one per metric.

    Scores (keys of ``result.scores``): ``batch_entropy_mixing`` (reference-compatible, max ln 2)
    and ``batch_entropy_mixing_normalized`` ([0, 1]); ``silhouette`` (raw cell-type ASW);
    ``ilisi`` / ``ilisi_raw``; ``clisi`` / ``clisi_raw``; ``kbet``; ``kbet_per_label``;
    ``graph_connectivity``; ``isolated_labels_asw``; ``batch_asw``. Batch metrics are NaN when
    there is a single batch.

    Parameters
    ----------
    X
        (n, d) embedding.
    batches, labels
        (n,) batch and cell-type labels.
    config
        :class:`EvaluateConfig`.
    rng
        Generator or seed; child generators are spawned per metric, so the scores do not depend
        on which other metrics are selected.
    n_jobs
        Threads for kNN and numba kernels.
    knn_graph
        Optional precomputed full graph ``(indices, distances)`` of all cells (self excluded,
        >= ``graph_neighbors - 1`` columns); then no neighbour search is done and every cell is
        scored.
    on_step
        Called as ``on_step(name, seconds)`` after each step (for progress / benchmarking).

    Returns
    -------
    EvaluationResult
    """
    X = as_float_matrix(X, np.float32)
    n = X.shape[0]
    check_lengths(n, batches=batches, labels=labels)
    unknown = set(config.metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    batches = np.asarray(batches)
    labels = np.asarray(labels)
    gens = dict(zip(METRICS + ("knn",), as_generator(rng).spawn(len(METRICS) + 1)))
    result = EvaluationResult()

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        result.seconds[name] = dt
        if on_step is not None:
            on_step(name, dt)
        return out

    by_name = {step.name: step for step in STEPS}
    selected = [by_name[name] for name in config.metrics]  # in the order asked for
    graph, connectivity_graph = _graphs(X, config, selected, knn_graph, gens["knn"], n_jobs, timed)
    inputs: Mapping[str, Any] = {
        "X": X, "batches": batches, "labels": labels, "graph": graph, "connectivity_graph": connectivity_graph,
    }  # fmt: skip
    single_batch = np.unique(batches).size < 2
    for step in selected:
        if single_batch and step.needs_two_batches:
            result.scores.update(dict.fromkeys(step.keys, float("nan")))  # undefined with one batch
            continue
        kwargs = {name: inputs[name] for name in step.inputs}
        kwargs.update({name: getattr(config, name) for name in step.config_fields})
        kwargs.update(rng=gens[step.name], n_jobs=n_jobs)
        result.scores.update(timed(step.name, lambda step=step, kwargs=kwargs: step.compute(**kwargs)))
    return result


def _graphs(
    X: np.ndarray,
    config: EvaluateConfig,
    steps: list[MetricStep],
    knn_graph: KNNLike | None,
    gen: np.random.Generator,
    n_jobs: int | None,
    timed: Callable[[str, Callable[[], Any]], Any],
) -> tuple[SharedGraph | None, KNNLike | None]:
    """The shared neighbourhoods and the connectivity graph the selected ``steps`` read (None if none does).

    Given ``knn_graph`` serves both. Otherwise, with more than ``neighborhood_sample_size`` cells,
    the neighbourhood steps get the exact neighbourhoods of a uniform sample of cells (step
    ``knn``) and graph connectivity its own full 15-neighbour graph (step ``knn_connectivity``);
    else one full graph (step ``knn``) serves both.
    """
    n = X.shape[0]
    needs_graph = any("graph" in step.inputs for step in steps)
    needs_connectivity = any("connectivity_graph" in step.inputs for step in steps)
    k = min(config.graph_neighbors - 1, n - 1)
    if knn_graph is not None:
        return SharedGraph(knn_graph, None, k + 1), knn_graph
    if not (needs_graph or needs_connectivity):
        return None, None
    sample = config.neighborhood_sample_size
    if sample is not None and n > sample and needs_graph:
        cells = np.sort(gen.choice(n, size=sample, replace=False)).astype(np.int64)
        graph = SharedGraph(timed("knn", lambda: exact_knn_rows(X, cells, k, n_jobs=n_jobs)), cells, k + 1)
        connectivity = None
        if needs_connectivity:
            kc = min(config.graph_connectivity_neighbors - 1, n - 1)
            connectivity = timed(
                "knn_connectivity", lambda: knn(X, kc, method=config.knn_method, rng=gen, n_jobs=n_jobs)
            )
        return graph, connectivity
    full = timed("knn", lambda: knn(X, k, method=config.knn_method, rng=gen, n_jobs=n_jobs))
    return SharedGraph(full, None, k + 1), full
