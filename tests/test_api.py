"""End-to-end API: ingest -> preprocess -> fit -> embed -> project, the SCALEX drop-in, and the CLI."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from scalex_scale import api
from scalex_scale.cli import main
from scalex_scale.datasets import SyntheticConfig, make_synthetic
from scalex_scale.store import Atlas
from scalex_scale.train import TrainConfig


@pytest.fixture(scope="module")
def synthetic() -> ad.AnnData:
    cfg = SyntheticConfig(n_cells=1200, n_genes=800, n_batches=3, n_celltypes=4, mean_genes_per_cell=250, seed=3)
    return make_synthetic(cfg)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _train(max_iterations: int = 60) -> TrainConfig:
    return TrainConfig(max_iterations=max_iterations, progress=False, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic):
    """An atlas of batches 0 and 1 with a model; batch 2 held back for projection."""
    root = tmp_path_factory.mktemp("api")
    names = sorted(synthetic.obs["batch"].unique())
    ref = synthetic[synthetic.obs["batch"].isin(names[:2])].copy()
    query = synthetic[synthetic.obs["batch"] == names[2]].copy()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = api.integrate([ref], root / "run", batch_key="batch", train=_train(), min_features=100, n_top_features=300)
    torch.set_num_threads(old)
    return root, out, ref, query


def test_integrate_writes_latent_for_every_cell(trained):
    _, out, ref, _ = trained
    a = ad.read_zarr(out.atlas)
    assert a.obsm["latent"].shape == (ref.n_obs, 10) and a.obsm["latent"].dtype == np.float32
    qc = a.obs["scalex_qc_pass"].to_numpy(bool)
    assert np.isfinite(a.obsm["latent"][qc]).all() and np.isnan(a.obsm["latent"][~qc]).all()
    assert qc.sum() == Atlas.open(out.atlas).training_matrix().n_rows
    state = Atlas.open(out.atlas).state
    assert state["model"]["n_iterations"] == 60 and state["preprocess"]["n_train"] == qc.sum()


def test_embed_is_reproducible_from_checkpoint(trained):
    _, out, _, _ = trained
    first = ad.read_zarr(out.atlas).obsm["latent"].copy()
    api.embed(out.atlas, out.model_dir, device="cpu")
    np.testing.assert_array_equal(ad.read_zarr(out.atlas).obsm["latent"], first)


def test_project_appends_new_batch_without_retraining(trained, tmp_path):
    root, out, ref, query = trained
    import shutil

    atlas = tmp_path / "atlas.zarr"
    shutil.copytree(out.atlas, atlas)
    weights = (out.model_dir / "model.safetensors").read_bytes()
    before = ad.read_zarr(atlas)
    q = query.copy()
    q = q[:, q.var_names[::-1]].copy()  # different gene order: aligned by name
    report = api.project(atlas, out.model_dir, [q], batch_key="batch")
    after = ad.read_zarr(atlas)
    assert after.n_obs == ref.n_obs + query.n_obs
    assert report.batches == {str(query.obs["batch"].iloc[0]): query.n_obs}
    np.testing.assert_array_equal(after.obsm["latent"][: ref.n_obs], before.obsm["latent"])
    new = after.obsm["latent"][ref.n_obs :]
    qc = after.obs["scalex_qc_pass"].to_numpy(bool)[ref.n_obs :]
    assert qc.sum() == report.n_embedded > 0 and np.isfinite(new[qc]).all()
    assert (out.model_dir / "model.safetensors").read_bytes() == weights  # frozen model
    # separate query store: same embedding as appending
    report2 = api.project(out.atlas, out.model_dir, [query], batch_key="batch", query_store=tmp_path / "q.zarr")
    qa = ad.read_zarr(tmp_path / "q.zarr")
    np.testing.assert_allclose(qa.obsm["latent"], new, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert report2.n_embedded == report.n_embedded
    assert ad.read_zarr(out.atlas).n_obs == ref.n_obs  # the reference atlas is untouched


def test_project_reports_missing_genes(trained, tmp_path):
    _, out, _, query = trained
    q = query[:, query.var_names[50:]].copy()
    report = api.project(out.atlas, out.model_dir, [q], batch_key="batch", query_store=tmp_path / "q.zarr")
    assert list(report.genes_missing.values()) == [50]


def test_scalex_dropin(synthetic, tmp_path):
    from scalex_scale import SCALEX

    a = synthetic[:600].copy()
    out = SCALEX(a, batch_name="batch", min_features=100, n_top_features=200, max_iteration=30, outdir=tmp_path / "o", device="cpu")
    assert out.obsm["latent"].shape[1] == 10 and np.isfinite(out.obsm["latent"]).all()
    assert out.var["highly_variable"].sum() == 200
    with pytest.raises(TypeError, match="unexpected arguments"):
        SCALEX(a, not_an_argument=1)


def test_cli_pipeline(synthetic, tmp_path, capsys):
    a = synthetic[:500].copy()
    a.write_h5ad(tmp_path / "a.h5ad")
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", store, str(tmp_path / "a.h5ad"), "--batch-key", "batch"]) == 0
    assert main(["preprocess", store, "--min-features", "100", "--n-top-features", "150"]) == 0
    assert main(["fit", store, str(tmp_path / "m"), "--max-iterations", "20", "--device", "cpu", "--no-progress"]) == 0
    assert main(["embed", store, str(tmp_path / "m"), "--device", "cpu"]) == 0
    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "150 features" in out and "latent" in out
    assert main(["preprocess", str(tmp_path / "missing.zarr")]) == 2
    assert "no such atlas" in capsys.readouterr().err
