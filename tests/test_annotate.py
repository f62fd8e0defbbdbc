"""Atlas-level label transfer: a separate query store, the same-model check, --method knn5, the JSON summary."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch

from scalex_scale import api
from scalex_scale.cli import main
from scalex_scale.metrics.label_transfer import knn_classifier_transfer
from scalex_scale.store import Atlas, transaction
from scalex_scale.store.errors import ScalexError
from scalex_scale.synthetic import SyntheticConfig, make_synthetic
from scalex_scale.train import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A reference atlas (batches 0, 1) with its model, a query store of batch 2 projected with it, and a second
    model trained on the same atlas with another seed."""
    root = tmp_path_factory.mktemp("annotate")
    data = make_synthetic(SyntheticConfig(n_cells=1200, n_genes=800, n_batches=3, n_celltypes=4, mean_genes_per_cell=250, seed=5))
    names = sorted(data.obs["batch"].unique())
    ref = data[data.obs["batch"].isin(names[:2])].copy()
    query = data[data.obs["batch"] == names[2]].copy()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = api.integrate([ref], root / "run", batch_key="batch", train=TrainConfig(max_iterations=80, progress=False, seed=1),
                            min_features=100, n_top_features=300)
        api.project(out.atlas, out.model_dir, [query], batch_key="batch", query_store=root / "q.zarr")
        api.fit(out.atlas, root / "other_model", TrainConfig(max_iterations=20, progress=False, seed=2))
    finally:
        torch.set_num_threads(old)
    return root, out, query


def _latent_and_labels(path):
    a = ad.read_zarr(path)
    ok = np.isfinite(a.obsm["latent"]).all(axis=1)
    return a, ok


def test_transfer_into_a_separate_query_store(setup, tmp_path):
    import shutil

    root, out, query = setup
    qs = tmp_path / "q.zarr"
    shutil.copytree(root / "q.zarr", qs)
    summary = api.transfer(qs, "celltype", reference=out.atlas)
    q, ok = _latent_and_labels(qs)
    assert summary.n_query == ok.sum() and summary.query_batches == [str(query.obs["batch"].iloc[0])]
    assert summary.reference == str(out.atlas) and sorted(summary.reference_batches) == sorted(Atlas.open(out.atlas).batch_categories)
    assert q.obs["celltype_transfer"][ok].notna().all()
    assert set(summary.metrics) >= {"ARI", "NMI", "f1_macro", "accuracy", "unassigned"} and summary.metrics["accuracy"] > 0.5
    assert "celltype_transfer" not in ad.read_zarr(out.atlas).obs  # the reference is only read
    # the confusion table and per-type counts add up to the query
    assert sum(sum(r.values()) for r in summary.confusion.values()) == summary.n_query == sum(summary.counts.values())
    assert sum(v["n"] for v in summary.unassigned_by_predicted.values()) == summary.n_query
    with pytest.raises(ScalexError, match="query store itself"):
        api.transfer(qs, "celltype", reference=qs)


def test_query_store_from_another_model_is_refused(setup, tmp_path):
    root, out, query = setup
    other = tmp_path / "other.zarr"
    api.project(out.atlas, root / "other_model", [query], batch_key="batch", query_store=other)
    with pytest.raises(ScalexError, match="not comparable") as err:
        api.transfer(other, "celltype", reference=out.atlas)
    assert "other_model" in str(err.value) and str(out.model_dir) in str(err.value)
    # projecting into an atlas whose latent another model wrote would mix two latent spaces
    with pytest.raises(ScalexError, match="written by another model"):
        api.project(other, out.model_dir, [query], batch_names=["again"], allow_duplicates=True)


def test_query_store_without_a_model_record_is_refused(setup, tmp_path):
    import shutil

    root, out, _ = setup
    qs = tmp_path / "q.zarr"
    shutil.copytree(root / "q.zarr", qs)
    with transaction(qs, "test") as txn:
        txn.atlas.update_state("obsm", None)
    with pytest.raises(ScalexError, match="no record of the model"):
        api.transfer(qs, "celltype", reference=out.atlas)


def test_method_knn5_is_the_reference_rule(setup, tmp_path):
    import shutil

    root, out, _ = setup
    qs = tmp_path / "q.zarr"
    shutil.copytree(root / "q.zarr", qs)
    summary = api.transfer(qs, "celltype", reference=out.atlas, method="knn5")
    r, rok = _latent_and_labels(out.atlas)
    q, qok = _latent_and_labels(qs)
    expected = knn_classifier_transfer(r.obsm["latent"][rok], r.obs["celltype"].astype(str).to_numpy()[rok], q.obsm["latent"][qok])
    np.testing.assert_array_equal(q.obs["celltype_transfer"].astype(str).to_numpy()[qok], expected)
    assert "unassigned" not in summary.counts and summary.method == "knn5" and summary.config["k"] == 5
    conf = q.obs["celltype_transfer_confidence"].to_numpy()[qok]
    assert np.all(np.isin(np.round(conf * 5), [1, 2, 3, 4, 5]))  # vote shares of 5 neighbours
    with pytest.raises(ScalexError, match="unknown transfer method"):
        api.transfer(qs, "celltype", reference=out.atlas, method="knn7")


def test_cli_transfer_reference_and_json(setup, tmp_path, capsys):
    import shutil

    root, out, _ = setup
    qs = tmp_path / "q.zarr"
    shutil.copytree(root / "q.zarr", qs)
    js = tmp_path / "summary.json"
    assert main(["transfer", str(qs), "--reference", str(out.atlas), "--label-key", "celltype", "--out", str(js)]) == 0
    default = json.loads(js.read_text())
    assert default["config"]["k"] is None and default["diagnostics"]["k"] in (5, 30)  # cross-validated by default
    assert main(["transfer", str(qs), "--reference", str(out.atlas), "--label-key", "celltype", "--out", str(js), "--k", "15"]) == 0
    text = capsys.readouterr().out
    assert "of " + str(out.atlas) in text and "summary written to" in text
    report = json.loads(js.read_text())
    assert report["method"] == "scalex" and report["config"]["k"] == 15
    assert set(report) >= {"counts", "confusion", "unassigned_by_predicted", "metrics", "n_query", "reference"}
    for row in report["unassigned_by_predicted"].values():
        assert 0.0 <= row["rate"] <= 1.0
    # a query store without --reference: the atlas it was projected against (recorded by project)
    assert main(["transfer", str(qs), "--label-key", "celltype", "--out", str(js), "--k", "15"]) == 0
    assert json.loads(js.read_text())["reference"] == str(out.atlas.resolve())
    assert json.loads(js.read_text())["counts"] == report["counts"]
    # ... and when that atlas is gone: a clear error, not a crash
    with transaction(qs, "test") as txn:
        txn.atlas.update_state("reference", {"atlas": str(tmp_path / "gone.zarr")})
    assert main(["transfer", str(qs), "--label-key", "celltype"]) == 2
    assert "no query batches" in capsys.readouterr().err
