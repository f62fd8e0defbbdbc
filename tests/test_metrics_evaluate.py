"""``metrics.evaluate``: the metric-step table gives the scores, keys and steps it always gave.

The expected values were computed with the pre-table implementation of :func:`evaluate` (one long
``if name == ...`` chain, commit e86ebea) on the same synthetic latents, so a refactor of the table
that changes a score, a key, the key order or the step order fails here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scalex_scale.metrics import evaluate, knn
from scalex_scale.metrics.evaluate import METRICS, STEPS, EvaluateConfig

from test_metrics import make_latent

NAN = float("nan")
CHEAP = dict(mixing_pools=5, silhouette_sample_size=500, asw_max_cells_per_label=80)
GRAPH_METRICS = ("ilisi", "clisi", "kbet", "kbet_per_label", "graph_connectivity")

# case -> (scores in key order, step names in order), from the pre-table implementation (rng=7)
EXPECTED = {
    "full": (
        {
            "batch_entropy_mixing": 0.6789037553097244,
            "batch_entropy_mixing_normalized": 0.9794510810262335,
            "silhouette": 0.604461114591936,
            "ilisi_raw": 2.0295180274294373,
            "ilisi": 0.5147590137147187,
            "clisi_raw": 1.0,
            "clisi": 1.0,
            "kbet": 0.33285714285714285,
            "kbet_per_label": 0.4456880934685552,
            "graph_connectivity": 0.9786149168302781,
            "isolated_labels_asw": 0.8053380497036245,
            "batch_asw": 0.8864824585195404,
        },
        (
            "knn", "batch_entropy_mixing", "silhouette", "ilisi", "clisi", "kbet", "kbet_per_label",
            "graph_connectivity", "isolated_labels_asw", "batch_asw",
        ),
    ),
    "sampled": (
        {
            "batch_entropy_mixing": 0.6789037553097244,
            "batch_entropy_mixing_normalized": 0.9794510810262335,
            "silhouette": 0.604461114591936,
            "ilisi_raw": 2.0500685069256543,
            "ilisi": 0.5250342534628272,
            "clisi_raw": 1.0,
            "clisi": 1.0,
            "kbet": 0.32,
            "kbet_per_label": 0.4641310481680552,
            "graph_connectivity": 0.9786149168302781,
            "isolated_labels_asw": 0.8053380497036245,
            "batch_asw": 0.8864824585195404,
        },
        (
            "knn", "knn_connectivity", "batch_entropy_mixing", "silhouette", "ilisi", "clisi", "kbet",
            "kbet_per_label", "graph_connectivity", "isolated_labels_asw", "batch_asw",
        ),
    ),
    "subset": (
        {
            "clisi_raw": 1.0,
            "clisi": 1.0,
            "kbet": 0.33285714285714285,
            "batch_asw": 0.8864824585195404,
        },
        (
            "knn", "clisi", "kbet", "batch_asw",
        ),
    ),
    "graph": (
        {
            "ilisi_raw": 2.0295180274294373,
            "ilisi": 0.5147590137147187,
            "clisi_raw": 1.0,
            "clisi": 1.0,
            "kbet": 0.33285714285714285,
            "kbet_per_label": 0.4456880934685552,
            "graph_connectivity": 0.9786149168302781,
        },
        (
            "ilisi", "clisi", "kbet", "kbet_per_label", "graph_connectivity",
        ),
    ),
    "single_batch": (
        {
            "batch_entropy_mixing": NAN,
            "batch_entropy_mixing_normalized": NAN,
            "silhouette": 0.7545137726046695,
            "ilisi_raw": 1.0000000000000002,
            "ilisi": NAN,
            "clisi_raw": 1.1071691038202718,
            "clisi": 0.9464154480898641,
            "kbet": NAN,
            "kbet_per_label": NAN,
            "graph_connectivity": 1.0,
            "isolated_labels_asw": 0.8775036108891626,
            "batch_asw": NAN,
        },
        (
            "knn", "silhouette", "ilisi", "clisi", "graph_connectivity", "isolated_labels_asw",
        ),
    ),
    "reordered": (
        {
            "batch_asw": 0.8864824585195404,
            "graph_connectivity": 0.9786149168302781,
            "clisi_raw": 1.0,
            "clisi": 1.0,
            "silhouette": 0.6131703305023075,
        },
        ("knn", "batch_asw", "graph_connectivity", "clisi", "silhouette"),
    ),
}


def _case(name: str) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], EvaluateConfig, object]:
    if name == "single_batch":
        return make_latent(80, n_types=3, n_batches=1, seed=4), EvaluateConfig(**CHEAP), None
    data = make_latent(700, seed=3)
    if name == "full":
        return data, EvaluateConfig(**CHEAP), None
    if name == "sampled":
        return data, EvaluateConfig(neighborhood_sample_size=300, **CHEAP), None
    if name == "reordered":  # steps run in the order asked for
        metrics = ("batch_asw", "graph_connectivity", "clisi", "silhouette")
        return data, EvaluateConfig(metrics=metrics, asw_max_cells_per_label=80), None
    if name == "subset":
        return data, EvaluateConfig(metrics=("clisi", "kbet", "batch_asw"), **CHEAP), None
    assert name == "graph"
    return data, EvaluateConfig(metrics=GRAPH_METRICS, **CHEAP), knn(data[0], 89)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scores_keys_and_steps_match_the_pre_table_implementation(name):
    (X, b, t), config, graph = _case(name)
    steps: list[str] = []
    res = evaluate(X, b, t, config=config, rng=7, knn_graph=graph, on_step=lambda s, _: steps.append(s))
    scores, step_names = EXPECTED[name]
    assert list(res.scores) == list(scores)  # same keys, same order
    for key, value in scores.items():
        if np.isnan(value):
            assert np.isnan(res.scores[key]), key
        else:
            assert res.scores[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert tuple(res.seconds) == step_names
    assert tuple(steps) == step_names


def test_table_declares_every_metric_and_every_config_field():
    assert tuple(step.name for step in STEPS) == METRICS
    claimed = {f for step in STEPS for f in step.config_fields}
    graph_fields = {"metrics", "graph_neighbors", "neighborhood_sample_size", "knn_method"}
    assert claimed | graph_fields == {f.name for f in dataclasses.fields(EvaluateConfig)}
    for step in STEPS:
        assert step.name in step.keys, step.name


def test_scores_do_not_depend_on_the_other_selected_metrics():
    (X, b, t), config, _ = _case("full")
    alone = evaluate(X, b, t, config=dataclasses.replace(config, metrics=("batch_asw",)), rng=7)
    assert alone.scores["batch_asw"] == pytest.approx(EXPECTED["full"][0]["batch_asw"], rel=1e-9)
    assert "knn" not in alone.seconds  # no step needed the shared graph


def test_unknown_metric_is_an_error_that_names_it():
    X, b, t = make_latent(50, seed=1)
    with pytest.raises(ValueError, match="nope"):
        evaluate(X, b, t, config=EvaluateConfig(metrics=("ilisi", "nope")))
