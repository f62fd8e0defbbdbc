"""bench/annotation_real.py: its internal per-split training command runs as the harness calls it (argv built by
``train``), on a tiny synthetic split (the real data sets are not needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from scalex_scale.synthetic import SyntheticConfig, make_synthetic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import annotation_real as harness  # noqa: E402


def test_train_command_parses_and_runs(tmp_path, monkeypatch):
    data = make_synthetic(SyntheticConfig(n_cells=600, n_genes=600, n_batches=3, n_celltypes=3, mean_genes_per_cell=250, seed=3))
    batches = sorted(data.obs["batch"].astype(str).unique())
    query = data.obs["batch"].astype(str) == batches[-1]
    ref_file, query_file = tmp_path / "ref.h5ad", tmp_path / "query.h5ad"
    data[~query.to_numpy()].copy().write_h5ad(ref_file)
    data[query.to_numpy()].copy().write_h5ad(query_file)
    out = tmp_path / "run"
    out.mkdir()
    # the argv of harness.train: every option the top-level parser also knows a longer form of (--seed vs --seeds,
    # --seed-sets) must reach the subcommand unabbreviated
    argv = ["_train", "--ref", str(ref_file), "--query", str(query_file), "--query-batches", batches[-1],
            "--outdir", str(out), "--seed", "1", "--iterations", "12", "--min-features", "50",
            "--n-top-features", "300", "--patience", "0"]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert harness.main(argv) == 0
    obs = pd.read_csv(out / "obs.csv")
    latent = np.load(out / "latent.npy")
    assert latent.shape == (len(obs), 10)
    assert (np.isfinite(latent).all(axis=1) == obs["ok"].to_numpy()).all() and obs["ok"].mean() > 0.9
    assert set(obs.loc[obs["is_query"], "batch"]) == {batches[-1]}
    assert obs["is_query"].sum() == int(query.sum())
    run = json.loads((out / "run.json").read_text())
    assert run["n_iterations"] == 12
