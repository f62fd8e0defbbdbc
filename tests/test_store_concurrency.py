"""Concurrent writers and readers, and real ``kill -9`` of command-line runs at random moments.

Writers hold the atlas' writer lock: a second writer waits (or, with ``--no-wait``, fails with a clear message),
never rolls back a live writer, and readers keep seeing the last commit. A long reader (``fit``) works on a
frozen snapshot and refuses to record a model trained on a training matrix that was replaced meanwhile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scalex_scale import api
from scalex_scale.store import Atlas, check
from scalex_scale.store.txn import temporaries
from scalex_scale.train import TrainConfig

from conftest import make_adata
from test_store_crash import atlas_digest

ENV = {**os.environ, "SCALEX_SCALE_FSYNC": "0", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "scalex_scale.cli", *args],
        env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the writer ended before pausing: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the writer never reached its pause point")
        time.sleep(0.02)


@pytest.fixture
def atlas_and_inputs(tmp_path):
    store = tmp_path / "atlas.zarr"
    api.ingest(store, [make_adata(80, 30, seed=1, prefix="a", batch="b1")])
    files = []
    for i in range(3):
        p = tmp_path / f"in{i}.h5ad"
        make_adata(40, 30, seed=10 + i, prefix=f"n{i}-").write_h5ad(p)
        files.append(p)
    return store, files


def test_two_appends_started_together_both_land(atlas_and_inputs):
    store, files = atlas_and_inputs
    procs = [_cli("ingest", str(store), str(f), "--batch-names", f"x{i}") for i, f in enumerate(files[:2])]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    atlas = Atlas.open(store)
    assert atlas.n_obs == 80 + 40 + 40
    assert sorted(atlas.batch_categories) == ["b1", "x0", "x1"]
    assert check(store).ok and not temporaries(store)


def test_a_live_writer_is_waited_for_never_rolled_back_and_readers_see_the_last_commit(atlas_and_inputs, tmp_path):
    store, files = atlas_and_inputs
    before = atlas_digest(store)
    signal = tmp_path / "paused"
    writer = _cli("ingest", str(store), str(files[0]), "--batch-names", "x0",
                  env={"SCALEX_SCALE_FAULT": f"pause:30:{signal}"})  # fmt: skip
    _wait_for(signal, writer)
    # readers need no lock and see the last commit, exactly
    assert atlas_digest(store) == before
    assert ad.read_zarr(store).n_obs == 80
    # a second writer fails at once with --no-wait, naming the live one...
    busy = _cli("--no-wait", "ingest", str(store), str(files[1]), "--batch-names", "x1")
    out, err = busy.communicate(timeout=120)
    assert busy.returncode == 2 and "is being written by pid" in err and err.count("\n") == 1, err
    # ...or waits for it, without touching its transaction
    waiting = _cli("ingest", str(store), str(files[1]), "--batch-names", "x1")
    time.sleep(1.0)
    assert waiting.poll() is None, "the second writer did not wait"
    assert atlas_digest(store) == before
    signal.unlink()
    assert writer.wait(timeout=300) == 0, writer.communicate()
    assert waiting.wait(timeout=300) == 0, waiting.communicate()
    atlas = Atlas.open(store)
    assert atlas.batch_categories == ["b1", "x0", "x1"] and atlas.n_obs == 160
    assert check(store).ok and not temporaries(store)


@pytest.fixture
def preprocessed(tmp_path):
    store = tmp_path / "atlas.zarr"
    api.ingest(store, [make_adata(80, 30, seed=1, prefix="a", batch="b1"), make_adata(60, 30, seed=2, prefix="b", batch="b2")])
    api.preprocess(store, min_features=5, min_cells=1, n_top_features=20, n_workers=1)
    return store


FIT_ARGS = ["--max-iterations", "20", "--batch-size", "16", "--device", "cpu", "--no-progress"]


def test_fit_refuses_to_record_a_model_of_a_replaced_training_matrix(preprocessed, tmp_path):
    signal = tmp_path / "paused"
    # point 2 is the first checkpoint write: training on the pinned snapshot is done by then
    fit = _cli("fit", str(preprocessed), str(tmp_path / "m"), *FIT_ARGS, env={"SCALEX_SCALE_FAULT": f"pause:2:{signal}"})
    _wait_for(signal, fit)
    api.preprocess(preprocessed, min_features=5, min_cells=1, n_top_features=12, n_workers=1, seed=7)
    signal.unlink()
    out, err = fit.communicate(timeout=300)
    assert fit.returncode == 2 and "was preprocessed again while fit trained" in err, err
    assert Atlas.open(preprocessed).state.get("model") is None
    assert (tmp_path / "m" / "model.safetensors").exists()  # the model is kept; only the record is refused
    assert check(preprocessed).ok and not temporaries(preprocessed)


def test_fit_survives_a_project_committed_while_it_trains(preprocessed, tmp_path):
    api.fit(preprocessed, tmp_path / "m0", TrainConfig(max_iterations=10, batch_size=16, device="cpu", progress=False))
    api.embed(preprocessed, tmp_path / "m0", device="cpu")
    signal = tmp_path / "paused"
    fit = _cli("fit", str(preprocessed), str(tmp_path / "m1"), *FIT_ARGS, env={"SCALEX_SCALE_FAULT": f"pause:2:{signal}"})
    _wait_for(signal, fit)
    api.project(preprocessed, tmp_path / "m0", [make_adata(30, 30, seed=5, prefix="q")], batch_names=["q"], device="cpu")
    signal.unlink()
    out, err = fit.communicate(timeout=300)
    assert fit.returncode == 0, err
    atlas = Atlas.open(preprocessed)
    assert atlas.state["model"]["directory"] == str((tmp_path / "m1").resolve())
    assert "q" in atlas.batch_categories and np.isfinite(atlas.root["obsm"]["latent"][-30:]).all()
    assert check(preprocessed).ok


# ---------------------------------------------------------------------- kill -9 at random moments
@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A 3,000-cell atlas with a model and an embedding, and two new studies (commands take a few seconds)."""
    base = tmp_path_factory.mktemp("medium")
    store = base / "atlas.zarr"
    api.ingest(store, [make_adata(1500, 300, seed=1, prefix="a", batch="b1"), make_adata(1500, 300, seed=2, prefix="b", batch="b2")])
    api.preprocess(store, min_features=20, min_cells=1, n_top_features=200, n_workers=1)
    model = base / "m"
    api.fit(store, model, TrainConfig(max_iterations=30, batch_size=64, device="cpu", progress=False))
    api.embed(store, model, device="cpu")
    files = []
    for i in range(2):
        p = base / f"new{i}.h5ad"
        make_adata(1500, 300, seed=20 + i, prefix=f"n{i}-").write_h5ad(p)
        files.append(p)
    return store, model, files


KILLED = {
    "append": lambda s, m, f: ["ingest", str(s), str(f[0]), "--batch-names", "k0"],
    "project": lambda s, m, f: ["project", str(s), str(m), str(f[1]), "--batch-names", "k1", "--device", "cpu"],
    "preprocess": lambda s, m, f: ["preprocess", str(s), "--min-features", "20", "--min-cells", "1", "--n-top-features", "150"],
    "fit": lambda s, m, f: ["fit", str(s), str(m.with_name("m2")), "--max-iterations", "300", "--batch-size", "64",
                            "--device", "cpu", "--no-progress"],
}  # fmt: skip


@pytest.mark.parametrize("name", list(KILLED))
def test_kill_9_at_random_moments(name, medium, tmp_path):
    import shutil

    from scalex_scale._fs import link_tree

    base_store, base_model, files = medium
    store, model = tmp_path / "atlas.zarr", tmp_path / "m"
    args = KILLED[name](store, model, files)

    def reset() -> None:
        for p in (store, model, model.with_name("m2")):
            shutil.rmtree(p, ignore_errors=True)
        for _, p in temporaries(store):
            shutil.rmtree(p, ignore_errors=True)
        link_tree(base_store, store)
        link_tree(base_model, model)

    reset()
    before = atlas_digest(store)
    t0 = time.monotonic()
    clean = _cli(*args)
    assert clean.wait(timeout=600) == 0, clean.communicate()
    duration = time.monotonic() - t0
    after = atlas_digest(store)
    rng = np.random.default_rng(12)
    for trial in range(3):
        reset()
        proc = _cli(*args)
        time.sleep(float(rng.uniform(0.4, 1.0)) * duration)
        proc.kill()  # SIGKILL: no clean-up at all
        proc.wait()
        assert atlas_digest(store) in (before, after), f"trial {trial}: neither before nor after"
        ad.read_zarr(store)
        assert check(store).ok
        again = _cli(*args)
        out, err = again.communicate(timeout=600)
        assert again.returncode == 0 or "already" in err, err  # a landed append/project is refused as a duplicate
        assert atlas_digest(store) == after
        assert not [p for t, p in temporaries(store) if t != "pin"] and check(store).ok
