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


def test_singleton_replay_counts_what_training_sees(tmp_path, monkeypatch):
    """bench/annotation_singletons.py replays a run's training loader: its count of rows that are a domain's lone row
    in their mini-batch equals the count the DSBN layer sees while the model trains."""
    import annotation_singletons as replay
    import torch

    import scalex_scale.nn.dsbn as dsbn_module
    from scalex_scale import api
    from scalex_scale.train import TrainConfig

    data = make_synthetic(SyntheticConfig(n_cells=500, n_genes=400, n_batches=24, n_celltypes=3, mean_genes_per_cell=200, seed=4))
    data.write_h5ad(tmp_path / "many.h5ad")
    atlas = tmp_path / "a.zarr"
    api.ingest(atlas, [tmp_path / "many.h5ad"], batch_key="batch")
    api.preprocess(atlas, min_features=50, n_top_features=200, min_cells=3)
    seen = []
    real = dsbn_module.dsbn

    def counting(x, domain, *args, training=False, **kwargs):
        if training:
            c = torch.bincount(domain, minlength=args[0].shape[0])
            seen.append(int((c[domain] == 1).sum()))
        return real(x, domain, *args, training=training, **kwargs)

    monkeypatch.setattr(dsbn_module, "dsbn", counting)
    res = api.fit(atlas, tmp_path / "m", TrainConfig(max_iterations=20, seed=2, progress=False, device="cpu"))
    assert len(seen) == res.n_iterations == 20 and sum(seen) > 0  # 24 domains in 64-cell batches: lone rows occur
    assert replay.singleton_rows(atlas, seed=2, n_iterations=20) == sum(seen)


def test_keep_rows_keeps_the_earlier_runs_and_says_which_rescored_runs_reproduced(tmp_path):
    """``--keep-rows-from``: rows of the earlier file that were not scored now are kept (minus the dropped groups),
    a run scored now without scVI takes the earlier scVI row, and every run scored in both is listed as identical
    (same transfer and kNN rows, e.g. the same machine reproducing it) or changed."""

    def row(split, seed, ari, group="main", scvi=False):
        r = {"split": split, "seed": seed, "iterations": 3000, "group": group,
             "transfer": {"ARI": ari, "diagnostics": {"k": 5, "cv_scores": {5: 0.5, 30: 0.4}}},
             "knn5": {"ARI": ari}, "knn30": {"ARI": ari}}
        if scvi:
            r.update(scvi_knn5={"ARI": 0.9}, scvi_run={"n_genes": 10})
        return r

    old = [row("a", 0, 0.5, scvi=True), row("b", 0, 0.6), row("c", 0, 0.7), row("d", 0, 0.8, group="nostop")]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"git_commit": "abc", "per_run": old}))  # JSON: int keys become strings
    now = [row("a", 0, 0.5), row("b", 0, 0.65)]
    kept = harness.keep_rows(path, now, {"nostop"})
    assert [r["split"] for r in kept["rows"]] == ["c"]
    assert kept["n_dropped"] == 1 and kept["n_scvi_rows_taken"] == 1
    assert now[0]["scvi_knn5"] == {"ARI": 0.9} and now[0]["scvi_from"] == "abc" and "scvi_knn5" not in now[1]
    assert kept["rescored_identical"] == ["a|0|3000|main"]
    assert kept["rescored_changed"] == ["b|0|3000|main"]


def test_vote_probe_runs_on_a_cached_run(tmp_path):
    """bench/annotation_vote_probe.py reads a harness run directory (latent + obs) and reports per-type F1, within-set
    accuracy and the k each label-free rule would choose; on well-separated types everything is right."""
    import annotation_vote_probe as probe

    rng = np.random.default_rng(0)
    types = np.repeat(["a", "b", "c"], 60)
    centres = {"a": 0.0, "b": 8.0, "c": 16.0}
    latent = np.stack([np.array([centres[t], 0.0]) + rng.normal(size=2) for t in types]).astype(np.float32)
    latent = np.concatenate([latent, rng.normal(size=(len(types), 8)).astype(np.float32)], axis=1)
    is_query = np.arange(len(types)) % 3 == 0
    batch = np.where(is_query, "q", np.where(np.arange(len(types)) % 3 == 1, "r1", "r2"))
    split = next(s for s in harness.base_splits() if s.id == "baron_human_to_mouse")
    d = harness.run_dir(tmp_path, split, 0, 3000)
    d.mkdir(parents=True)
    pd.DataFrame({"cell": [f"c{i}" for i in range(len(types))], "batch": batch, "celltype": types, "ok": True,
                  "is_query": is_query}).to_csv(d / "obs.csv", index=False)
    np.save(d / "latent.npy", latent)
    (d / "done").write_text("")
    out = tmp_path / "probe.json"
    assert probe.main(["--workdir", str(tmp_path), "--runs", split.id, "--seeds", "0,1", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert len(got["per_run"]) == 1  # seed 1 is not trained: skipped
    row = got["per_run"][0]
    assert row["within_set_knn5"] == {"ref": 1.0, "query": 1.0}
    assert row["per_type_f1"]["types"] == ["a", "b", "c"] and row["per_type_f1"]["knn5"]["n_right"] == int(is_query.sum())
    assert set(row["k_choice"]["rules"]) == {"cv", "cv_density", "cv_weighted", "reverse"}
    assert all(v["chooses"] in (5, 30) for v in row["k_choice"]["rules"].values())
    assert row["k_choice"]["query_f1"] == {"5": 1.0, "30": 1.0}
    assert got["summary"][split.id]["within_set_knn5_mean"]["ref"] == 1.0
