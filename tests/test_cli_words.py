"""The command line's words (issue 15, items 6 and 9): help on everything, --version, a useful integrate summary,
QC losses reported per batch, and model/atlas mismatch messages that point somewhere new."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest

from scalex_scale import __version__, api
from scalex_scale.cli import build_parser, main
from scalex_scale.errors import ScalexError
from scalex_scale.store import Atlas
from scalex_scale.synthetic import SyntheticConfig, make_synthetic


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"scalex-scale {__version__}"


def test_every_positional_and_option_of_every_command_has_help():
    parser = build_parser()
    missing = [
        f"{name} {a.dest}"
        for name, sub in _subparsers(parser).items()
        for a in sub._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())
    ]
    assert not missing, missing
    fit = _subparsers(parser)["fit"].format_help()
    assert "ATLAS" in fit and "MODEL_DIR" in fit and "--checkpoint-minutes" in fit and "--overwrite" in fit


@pytest.fixture(scope="module")
def lossy(tmp_path_factory):
    """Two batches; most cells of batch1 keep only a few genes, so QC at min_features=50 removes them."""
    root = tmp_path_factory.mktemp("words")
    a = make_synthetic(SyntheticConfig(n_cells=400, n_genes=300, n_batches=2, n_celltypes=3, mean_genes_per_cell=120, seed=2))
    x = a.X.tolil()
    rows = np.flatnonzero(a.obs["batch"].to_numpy() == "batch1")
    for r in rows[: int(0.7 * rows.size)]:
        x.rows[r], x.data[r] = x.rows[r][:10], x.data[r][:10]
    a.X = x.tocsr()
    path = root / "in.h5ad"
    a.write_h5ad(path)
    return root, path, rows.size, int(0.7 * rows.size)


def test_integrate_summary_and_qc_losses_per_batch(lossy, capsys, caplog):
    root, path, n1, gone = lossy
    outdir = root / "run"
    args = ["integrate", str(path), "--batch-key", "batch", "--outdir", str(outdir), "--min-features", "50",
            "--n-top-features", "150", "--max-iterations", "30", "--device", "cpu", "--no-progress"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "integrated 400 cells of 2 batches x 300 genes" in out, out
    record = Atlas.open(outdir / "atlas.zarr").state["preprocess"]["qc_cells"]
    (n0, k0), (m1, k1) = record["batch0"], record["batch1"]
    assert n0 == 146 and m1 == n1 and k0 > 0.9 * n0 and k1 <= n1 - gone  # the thinned cells are gone
    assert f"batch batch1: {k1:,} of {n1:,} cells pass QC ({n1 - k1:,} removed)" in out
    assert f"batch batch0: {k0:,} of {n0:,} cells pass QC ({n0 - k0:,} removed)" in out
    assert "fit: 30 iterations" in out and f"atlas: {outdir / 'atlas.zarr'}" in out and f"model: {outdir / 'model'}" in out
    assert "next:" in out and "scalex-scale evaluate" in out and "--label-key" in out
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("warning: preprocess: batch 'batch1' lost ")
    assert "\n" not in warned[0] and "lower --min-features" in warned[0]


def test_a_model_of_another_atlas_points_somewhere_new(lossy, tmp_path):
    root, path, _, _ = lossy
    import anndata as ad

    model = root / "run" / "model"
    other = tmp_path / "other.zarr"
    a = ad.read_h5ad(path)
    api.ingest(other, [a[:, :200].copy()], batch_key="batch")
    with pytest.raises(ScalexError, match="belongs to another atlas") as info:
        api.embed(other, model, device="cpu")
    assert f"scalex-scale fit {other} NEW_MODEL_DIR" in str(info.value) and "scalex-scale embed" not in str(info.value)
    with pytest.raises(ScalexError, match="belongs to another atlas") as info:
        api.project(other, model, [a[:50].copy()], batch_names=["q"], device="cpu")
    assert "--query-store NEW.zarr" in str(info.value)
    q = tmp_path / "q.zarr"
    api.ingest(q, [a[:50, :200].copy()], batch_names=["x"])
    with pytest.raises(ScalexError, match="give --query-store a new path"):
        api.project(root / "run" / "atlas.zarr", model, [a[:50].copy()], batch_names=["q"], query_store=q, device="cpu")


def test_project_summary_names_only_real_gene_differences():
    from scalex_scale.workflows.project import ProjectReport

    same = ProjectReport("a.zarr", {"q": 10}, 10, genes_missing={"q.h5ad": 0}, genes_dropped={"q.h5ad": 0})
    assert same.summary().splitlines() == ["projected 10 cells into a.zarr (10 pass QC)", "  batch q: 10 cells"]
    extra = ProjectReport("a.zarr", {"q": 10}, 10, genes_missing={"q.h5ad": 0}, genes_dropped={"q.h5ad": 4})
    assert extra.summary().splitlines()[-1] == "  q.h5ad: every model gene present; 4 extra genes dropped"
    missing = ProjectReport("a.zarr", {"q": 10}, 10, genes_missing={"q.h5ad": 3}, genes_dropped={"q.h5ad": 0})
    assert "3 model genes missing (filled with 0)" in missing.summary()


def test_leiden_runs_on_an_atlas(lossy):
    """The plot extra brings igraph + leidenalg, so scanpy's leiden works on the atlas' latent."""
    pytest.importorskip("leidenalg")
    sc = pytest.importorskip("scanpy")
    import anndata as ad

    root = lossy[0]
    a = ad.read_zarr(root / "run" / "atlas.zarr")
    a = a[np.isfinite(a.obsm["latent"]).all(axis=1)].copy()
    sc.pp.neighbors(a, use_rep="latent", n_neighbors=10)
    sc.tl.leiden(a, flavor="igraph", n_iterations=2, directed=False)
    assert a.obs["leiden"].nunique() >= 2


def test_non_count_input_is_one_log_line_not_a_python_warning(tmp_path, caplog):
    import warnings

    a = make_synthetic(SyntheticConfig(n_cells=60, n_genes=50, n_batches=1, n_celltypes=2, mean_genes_per_cell=20, seed=1))
    a.X = a.X.astype(np.float32)
    a.X.data = np.log1p(a.X.data)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        api.ingest(tmp_path / "a.zarr", [a])
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "values are not integers; scalex-scale expects raw counts" in lines[0]
    assert not [w for w in seen if "integer" in str(w.message) or "count" in str(w.message)]


def test_evaluate_says_direction_range_and_what_it_could_not_compute(lossy, tmp_path, caplog):
    import json

    atlas = lossy[0] / "run" / "atlas.zarr"
    with caplog.at_level(logging.INFO):
        report = api.evaluate(atlas, umap=False, out=tmp_path / "r")
    table = report.table()
    assert {"batch_entropy_mixing", "ilisi", "ilisi_raw", "kbet"} <= set(report.metrics)  # batches suffice for these
    assert "metric" in table and "better  range" in table
    assert [ln.split()[2:] for ln in table.splitlines() if ln.startswith("ilisi")] == [["higher", "1..#batches"], ["higher", "0..1"]]
    assert "not computed: silhouette, clisi" in table and "they need cell types: pass --label-key COLUMN" in table
    assert "evaluate: ilisi, kbet on " in caplog.text  # a line before the slow part
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["scales"]["kbet"] == {"better": "higher", "range": "0..1"} and "batch_asw" in saved["not_computed"]
    report = api.evaluate(atlas, label_key="celltype", umap=False)
    assert [ln.split()[2] for ln in report.table().splitlines() if ln.startswith("clisi_raw")] == ["lower"]
    assert "transfer_*" in report.not_computed and "scalex-scale transfer" in report.not_computed["transfer_*"]
