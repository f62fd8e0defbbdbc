"""The public names and the one scaling rule (the two bugs of the house issue, pinned).

1. ``ss.<verb>`` stays the function after anything imports the workflows (no submodule shadows a verb).
2. ``embed`` after ``project`` leaves the projected cells' latent exactly as ``project`` wrote it, with per-batch
   and with global scaling (projected batches are scaled with the MaxAbs their projection recorded).
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scalex_scale as ss
from scalex_scale.errors import ScalexError
from scalex_scale.synthetic import SyntheticConfig, make_synthetic
from scalex_scale.train import TrainConfig

VERBS = ("ingest", "check", "preprocess", "fit", "embed", "integrate", "project", "transfer", "evaluate")


def test_every_public_name_is_callable_after_importing_the_api():
    # a fresh interpreter: the order of imports is what broke it (``import scalex_scale.api`` first)
    code = (
        "import scalex_scale as ss, scalex_scale.api, scalex_scale.cli, scalex_scale.workflows.transfer;"
        "import scalex_scale.workflows.preprocess, scalex_scale.metrics.label_transfer;"
        "bad = [n for n in ss.__all__ if n != '__version__' and not callable(getattr(ss, n))];"
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_verbs_live_in_workflows_and_no_submodule_shares_a_verb_name():
    import scalex_scale.api as api

    for verb in VERBS:
        module = importlib.import_module(f"scalex_scale.workflows.{verb}")
        assert getattr(ss, verb) is getattr(module, verb) is getattr(api, verb)
        assert callable(getattr(ss, verb))
    names = {m.name.rsplit(".", 1)[-1] for m in pkgutil.iter_modules(ss.__path__)}
    assert not names & set(ss.__all__), names & set(ss.__all__)


@pytest.fixture(scope="module")
def data():
    cfg = SyntheticConfig(n_cells=900, n_genes=500, n_batches=3, n_celltypes=3, mean_genes_per_cell=200, seed=5)
    return make_synthetic(cfg)


@pytest.mark.parametrize("scale", ["batch", "global"])
def test_latent_of_project_equals_latent_of_embed(data, tmp_path, scale):
    names = sorted(data.obs["batch"].unique())
    ref = data[data.obs["batch"].isin(names[:2])].copy()
    q1 = data[data.obs["batch"] == names[2]][:150].copy()
    q2 = data[data.obs["batch"] == names[2]][150:].copy()
    train = TrainConfig(max_iterations=30, progress=False, seed=1, device="cpu")
    out = ss.integrate([ref], tmp_path / "run", batch_key="batch", train=train, min_features=50, n_top_features=200,
                       scale=scale)  # fmt: skip
    ss.project(out.atlas, out.model_dir, [q1, q2], batch_names=["q1", "q2"], device="cpu")
    projected = ad.read_zarr(out.atlas).obsm["latent"].copy()
    ss.embed(out.atlas, out.model_dir, device="cpu")
    embedded = ad.read_zarr(out.atlas).obsm["latent"]
    assert np.isfinite(projected[ref.n_obs :]).any()
    np.testing.assert_array_equal(embedded, projected)
    record = ss.Atlas.open(out.atlas).state["projection"]["maxabs"]
    assert set(record) == {"q1", "q2"}
    if scale == "global":  # the query's own MaxAbs, over all the cells of that project call
        assert record["q1"] == record["q2"]
    else:
        assert record["q1"] != record["q2"]


def test_project_refuses_an_existing_batch_name(data, tmp_path):
    names = sorted(data.obs["batch"].unique())
    ref = data[data.obs["batch"].isin(names[:2])].copy()
    train = TrainConfig(max_iterations=10, progress=False, seed=1, device="cpu")
    out = ss.integrate([ref], tmp_path / "run", batch_key="batch", train=train, min_features=50, n_top_features=100)
    before = sorted(p.name for p in out.atlas.rglob("*"))
    q = data[data.obs["batch"] == names[2]][:50].copy()
    with pytest.raises(ScalexError, match="exists already.*--batch-names"):
        ss.project(out.atlas, out.model_dir, [q], batch_names=[names[0]], device="cpu")
    assert sorted(p.name for p in out.atlas.rglob("*")) == before
    shutil.rmtree(tmp_path / "run")


@pytest.mark.parametrize("rule", ["passthrough", "running"])
def test_fit_trains_with_the_configured_dsbn_singleton_rule(data, tmp_path, monkeypatch, rule):
    import scalex_scale.nn as nn_pkg

    seen = []

    class Recording(nn_pkg.SCALEXModule):
        def forward(self, *args, **kwargs):
            seen.append(self.dsbn.singleton)
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(nn_pkg, "SCALEXModule", Recording)
    ref = data[data.obs["batch"].isin(sorted(data.obs["batch"].unique())[:2])].copy()
    train = TrainConfig(max_iterations=3, progress=False, seed=1, device="cpu", dsbn_singleton=rule)
    ss.integrate([ref], tmp_path / "run", batch_key="batch", train=train, min_features=50, n_top_features=100)
    assert seen and set(seen) == {rule}


def test_cli_options_come_from_the_config_dataclasses(capsys):
    from scalex_scale.cli import _preprocess_kwargs, _train_config, build_parser
    from scalex_scale.preprocessing import PreprocessConfig

    parser = build_parser()
    assert _train_config(parser.parse_args(["fit", "a.zarr", "m"])) == TrainConfig()  # defaults: the dataclass'
    cfg = _train_config(parser.parse_args(["fit", "a.zarr", "m", "--lr", "1e-3", "--patience", "3", "--no-progress"]))
    assert (cfg.lr, cfg.patience, cfg.progress) == (1e-3, 3, False)
    assert _train_config(parser.parse_args(["fit", "a.zarr", "m", "--dsbn-singleton", "running"])).dsbn_singleton == "running"
    kwargs = _preprocess_kwargs(parser.parse_args(["preprocess", "a.zarr"]))
    assert kwargs.pop("scheduler") is None and kwargs.pop("profile") is None
    assert PreprocessConfig(**kwargs) == PreprocessConfig()
    assert PreprocessConfig().min_features == 600 and PreprocessConfig(profile="ATAC").min_features == 100
    assert PreprocessConfig(profile="ATAC", min_features=7).min_features == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["preprocess", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "RNA 600 genes, ATAC 100 peaks" in text and "(default: 3)" in text


def test_plots_compare_reference_with_projected_cells(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from scalex_scale.workflows import plots

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(120, 10)).astype(np.float32)
    batches = np.array(["r1"] * 40 + ["r2"] * 50 + ["q"] * 30, dtype=object)
    labels = np.array(["A", "B", "C"] * 40, dtype=object)
    import scalex_scale.metrics as M

    seen, original = [], M.similarity_matrix

    def spy(x, celltypes, groups, a, b):
        seen.append((a, b, sorted(set(groups))))
        return original(x, celltypes, groups, a, b)

    monkeypatch.setattr(M, "similarity_matrix", spy)
    confusion = pd.DataFrame([[90.0, 10.0], [5.0, 95.0]], index=["A", "B"], columns=["A", "unassigned"])
    files = plots.write_plots(tmp_path, latent, batches, labels, confusion, projected=["q"], umap=False)
    assert {p.rsplit("/", 1)[-1] for p in files} == {"confusion.png", "similarity.png"}
    assert seen == [("reference", "query", ["query", "reference"])]  # not the two largest batches
    seen.clear()
    plots.write_plots(tmp_path, latent, batches, labels, None, umap=False)  # no projection: the two largest batches
    assert seen[0][:2] == ("r2", "r1")
