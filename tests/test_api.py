"""End-to-end API: ingest -> preprocess -> fit -> embed -> project, the SCALEX drop-in, and the CLI."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from scalex_scale import api
from scalex_scale.cli import main
from scalex_scale.errors import ScalexError
from scalex_scale.metrics.label_transfer import TransferConfig
from scalex_scale.store import Atlas
from scalex_scale.synthetic import SyntheticConfig, make_synthetic
from scalex_scale.train import TrainConfig


@pytest.fixture(scope="module")
def synthetic() -> ad.AnnData:
    cfg = SyntheticConfig(n_cells=1200, n_genes=800, n_batches=3, n_celltypes=4, mean_genes_per_cell=250, seed=3)
    return make_synthetic(cfg)


def _train(max_iterations: int = 60) -> TrainConfig:
    return TrainConfig(max_iterations=max_iterations, progress=False, seed=1, device="cpu")  # stated: see the embed test


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic):
    """An atlas of batches 0 and 1 with a model; batch 2 held back for projection."""
    root = tmp_path_factory.mktemp("api")
    names = sorted(synthetic.obs["batch"].unique())
    ref = synthetic[synthetic.obs["batch"].isin(names[:2])].copy()
    query = synthetic[synthetic.obs["batch"] == names[2]].copy()
    out = api.integrate([ref], root / "run", batch_key="batch", train=_train(), min_features=100, n_top_features=300)
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
    """Trained and embedded on the CPU (``_train``'s device), embedded again on the CPU: bit identical."""
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
    report = api.project(atlas, out.model_dir, [q], batch_key="batch", device="cpu")
    after = ad.read_zarr(atlas)
    assert after.n_obs == ref.n_obs + query.n_obs
    assert report.batches == {str(query.obs["batch"].iloc[0]): query.n_obs}
    np.testing.assert_array_equal(after.obsm["latent"][: ref.n_obs], before.obsm["latent"])
    new = after.obsm["latent"][ref.n_obs :]
    qc = after.obs["scalex_qc_pass"].to_numpy(bool)[ref.n_obs :]
    assert qc.sum() == report.n_embedded > 0 and np.isfinite(new[qc]).all()
    assert (out.model_dir / "model.safetensors").read_bytes() == weights  # frozen model
    # separate query store: same embedding as appending
    report2 = api.project(out.atlas, out.model_dir, [query], batch_key="batch", query_store=tmp_path / "q.zarr", device="cpu")
    qa = ad.read_zarr(tmp_path / "q.zarr")
    np.testing.assert_allclose(qa.obsm["latent"], new, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert report2.n_embedded == report.n_embedded
    assert ad.read_zarr(out.atlas).n_obs == ref.n_obs  # the reference atlas is untouched


def test_project_reports_missing_genes(trained, tmp_path):
    _, out, _, query = trained
    q = query[:, query.var_names[50:]].copy()
    report = api.project(out.atlas, out.model_dir, [q], batch_key="batch", query_store=tmp_path / "q.zarr", device="cpu")
    assert list(report.genes_missing.values()) == [50]


def test_scalex_dropin(synthetic, tmp_path):
    from scalex_scale import SCALEX

    a = synthetic[:600].copy()
    out = SCALEX(a, batch_name="batch", min_features=100, n_top_features=200, max_iteration=30, outdir=tmp_path / "o",
                 device="cpu", batch_key="study")  # fmt: skip
    assert out.obsm["latent"].shape[1] == 10 and np.isfinite(out.obsm["latent"]).all()
    assert "study" in out.obs and "batch" not in out.obs  # the reference's batch_key names the batch column
    assert set(out.obs["study"]) == set(a.obs["batch"])
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


def test_training_mixes_batches(trained):
    """The latent mixes batches clearly better than the model input itself (PCA to the same 10 dimensions)."""
    from sklearn.decomposition import PCA

    from scalex_scale.metrics import batch_entropy_mixing_score

    _, out, _, _ = trained
    atlas = Atlas.open(out.atlas)
    tm = atlas.training_matrix()
    indptr, indices, data, batch = tm.read(0, tm.n_rows)
    import scipy.sparse as sp

    x = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int32), indptr), shape=(tm.n_rows, tm.n_features))
    raw = PCA(10, random_state=0).fit_transform(x.toarray())
    latent = ad.read_zarr(out.atlas).obsm["latent"][tm.cells]
    kw = dict(n_neighbors=30, n_pools=20, n_samples_per_pool=100, rng=0)
    mixed, before = batch_entropy_mixing_score(latent, batch, **kw), batch_entropy_mixing_score(raw, batch, **kw)
    assert mixed > before + 0.1, (mixed, before)
    hist = Atlas.open(out.atlas).state["model"]
    assert hist["best_loss"] < float("inf")


def test_transfer_and_evaluate(trained, tmp_path):
    import shutil

    _, out, ref, query = trained
    atlas = tmp_path / "atlas.zarr"
    shutil.copytree(out.atlas, atlas)
    api.project(atlas, out.model_dir, [query], batch_key="batch", device="cpu")
    qname = str(query.obs["batch"].iloc[0])
    summary = api.transfer(atlas, "celltype", config=TransferConfig(k=10))
    a = ad.read_zarr(atlas)
    is_q = (a.obs["batch"] == qname).to_numpy() & a.obs["scalex_qc_pass"].to_numpy(bool)
    assert summary.n_query == is_q.sum() and set(summary.metrics) >= {"ARI", "NMI", "f1_macro"}
    assert a.obs["celltype_transfer"][is_q].notna().all() and a.obs["celltype_transfer"][~is_q].isna().all()
    conf = a.obs["celltype_transfer_confidence"].to_numpy()
    assert np.all((conf[is_q] >= 0) & (conf[is_q] <= 1)) and np.isnan(conf[~is_q]).all()
    report = api.evaluate(atlas, label_key="celltype", out=tmp_path / "report", umap=False)
    for key in ("batch_entropy_mixing", "silhouette", "ilisi", "kbet", "graph_connectivity", "transfer_ARI"):
        assert key in report.metrics
    assert (tmp_path / "report" / "metrics.json").exists() and (tmp_path / "report" / "confusion.csv").exists()
    with pytest.raises(Exception, match="no batch 'nope'"):
        api.transfer(atlas, "celltype", query_batches=["nope"])


def test_cli_fit_distributed_under_torchrun(synthetic, tmp_path):
    """`scalex-scale fit --distributed` launched by torchrun (2 Gloo processes), then resumed and embedded."""
    import os
    import subprocess
    import sys

    a = synthetic[:600].copy()
    store = str(tmp_path / "s.zarr")
    api.ingest(store, [a], batch_key="batch")
    api.preprocess(store, min_features=100, n_top_features=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "scalex_scale.cli"]
    fit = ["fit", store, str(tmp_path / "m"), "--distributed", "--sync-dsbn", "--device", "cpu", "--no-progress"]
    # a ~0-minute clock: a timed checkpoint at every epoch's end, agreed by all ranks (one all-reduce per epoch)
    proc = subprocess.run([*base, *fit, "--max-iterations", "12", "--checkpoint-minutes", "1e-9"], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = Atlas.open(store).state["model"]
    assert state["world_size"] == 2 and state["n_iterations"] == 12
    proc = subprocess.run([*base, *fit, "--max-iterations", "20", "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Atlas.open(store).state["model"]["n_iterations"] > 12
    assert api.embed(store, tmp_path / "m", device="cpu") > 0


def test_cli_train_options_reach_the_config():
    from scalex_scale.cli import _train_config, build_parser

    args = build_parser().parse_args(["fit", "a.zarr", "model", "--patience", "50", "--max-iterations", "7"])
    cfg = _train_config(args)
    assert cfg.patience == 50 and cfg.max_iterations == 7
    assert _train_config(build_parser().parse_args(["fit", "a.zarr", "model"])).patience == TrainConfig().patience
def test_project_is_one_transaction_and_refuses_duplicates(trained, tmp_path):
    import shutil

    from scalex_scale.store import DuplicateError
    from scalex_scale.store.txn import temporaries

    _, out, ref, query = trained
    atlas = tmp_path / "atlas.zarr"
    shutil.copytree(out.atlas, atlas)
    before = sorted((p.relative_to(atlas), p.read_bytes()) for p in atlas.rglob("*") if p.is_file())
    # a model of another atlas (other genes) fails before anything lands, and every retry too
    other = tmp_path / "other.zarr"
    api.ingest(other, [query[:, query.var_names[:400]].copy()], batch_key="batch")
    for _ in range(2):
        with pytest.raises(ScalexError, match="belongs to another atlas"):
            api.project(other, out.model_dir, [query], batch_key="batch")
    assert ad.read_zarr(other).n_obs == query.n_obs
    q = tmp_path / "q.h5ad"
    query.write_h5ad(q)
    api.project(atlas, out.model_dir, [q], batch_key="batch")
    with pytest.raises(DuplicateError, match="already in batch"):
        api.project(atlas, out.model_dir, [query], batch_key="batch")  # in memory: the same cells
    with pytest.raises(DuplicateError, match="same file was already added"):
        api.project(atlas, out.model_dir, [q], batch_names=["again"])
    assert Atlas.open(atlas).n_obs == ref.n_obs + query.n_obs
    api.project(atlas, out.model_dir, [q], batch_names=["again"], allow_duplicates=True)
    assert Atlas.open(atlas).n_obs == ref.n_obs + 2 * query.n_obs
    assert not temporaries(atlas) and before  # nothing left beside it


def test_resume_refuses_a_checkpoint_of_other_data_or_batch_size(trained, tmp_path):
    import shutil

    _, out, ref, _ = trained
    model = tmp_path / "m"
    shutil.copytree(out.model_dir, model)
    with pytest.raises(ScalexError, match="another batch size"):
        api.fit(out.atlas, model, TrainConfig(max_iterations=60, batch_size=32, progress=False, seed=1), resume=True)
    other = tmp_path / "other.zarr"
    api.ingest(other, [ref], batch_key="batch")
    api.preprocess(other, min_features=100, n_top_features=300, seed=5)  # same data, another training matrix
    with pytest.raises(ScalexError, match="another training matrix"):
        api.fit(other, model, _train(), resume=True)
