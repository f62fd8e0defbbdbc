"""A training run that refuses to fail silently and loses no work (issue 15, items 3 and 4).

- a non-finite loss is an error naming the iteration, never a "trained" model; the last good checkpoint stays;
- checkpoints come on a clock as well as on the iteration cadence, and on SIGINT, from which ``--resume``
  reaches the very weights of an uninterrupted run;
- ``fit`` does not replace a model without ``--overwrite``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scalex_scale import api
from scalex_scale._faults import inject
from scalex_scale.cli import main
from scalex_scale.errors import ScalexError, TrainingDivergedError
from scalex_scale.synthetic import SyntheticConfig, make_synthetic
from scalex_scale.train import TrainConfig, load_checkpoint, load_trainer_state
from scalex_scale.train.trainer import Trainer


def _config(max_iterations: int = 40, **kw) -> TrainConfig:
    return TrainConfig(max_iterations=max_iterations, device="cpu", progress=False, seed=1, **kw)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "a.zarr"
    a = make_synthetic(SyntheticConfig(n_cells=400, n_genes=300, n_batches=2, n_celltypes=3, mean_genes_per_cell=120, seed=2))
    api.ingest(path, [a], batch_key="batch")
    api.preprocess(path, min_features=50, n_top_features=150)
    return path


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(model_dir)[0].state_dict()


def test_a_huge_learning_rate_is_an_error_and_saves_nothing(atlas, tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["fit", str(atlas), str(model), "--lr", "1e4", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scalex-scale fit: error: training diverged: the loss became non-finite")
    assert "at iteration " in err[0] and "--lr (now 10000" in err[0] and "nothing was saved" in err[0]
    assert not model.exists()
    assert main(["embed", str(atlas), str(model), "--device", "cpu"]) == 2  # nothing to embed with


def test_divergence_mid_run_keeps_the_last_good_checkpoint(atlas, tmp_path, monkeypatch):
    model = tmp_path / "m"
    compute = Trainer._compute
    poison_after: list[int] = []

    def poisoned(self, x, domain, noise):
        compute(self, x, domain, noise)
        if not poison_after:
            poison_after.append(2 * int(self._bpe) + 1)  # the first step of the third epoch
        if self._progress.iteration + 1 == poison_after[0]:
            with torch.no_grad():
                next(self.module.parameters()).fill_(float("nan"))

    monkeypatch.setattr(Trainer, "_compute", poisoned)
    fit = Trainer.fit

    def remember_bpe(self, loader, **kw):
        self._bpe = loader.batches_per_epoch
        return fit(self, loader, **kw)

    monkeypatch.setattr(Trainer, "fit", remember_bpe)
    with pytest.raises(TrainingDivergedError) as info:
        api.fit(atlas, model, _config(lr=1e-3), checkpoint_iterations=1)  # a checkpoint after every epoch
    good = poison_after[0] - 1
    msg = str(info.value)
    # the weights went bad in step `good + 1`; the loss computed with them, in step `good + 2`, is the first NaN
    assert f"at iteration {good + 2:,} (epoch 2)" in msg, msg
    assert f"the last good checkpoint (iteration {good:,}) in {model} is kept" in msg, msg
    state = load_trainer_state(model)
    assert state is not None and state.iteration == good
    assert all(torch.isfinite(v).all() for v in _weights(model).values() if v.is_floating_point())


def test_timed_checkpoints_come_at_step_boundaries(atlas, tmp_path):
    model = tmp_path / "m"
    with inject("count") as plan:  # a clock of ~0 minutes: a checkpoint after every step
        result = api.fit(atlas, model, _config(12), checkpoint_minutes=1e-9, checkpoint_iterations=10_000)
    publishes = sum(op == "checkpoint.write" and d.endswith("model.safetensors") for op, d in plan.log)
    assert result.n_iterations == 12 and publishes >= 12  # 11 timed (never at the last step) + the final one
    with pytest.raises(ScalexError, match="--checkpoint-minutes must be >= 0"):
        api.fit(atlas, tmp_path / "x", _config(), checkpoint_minutes=-1)


def test_fit_refuses_an_existing_model_without_overwrite(atlas, tmp_path, capsys):
    model = str(tmp_path / "m")
    args = ["fit", str(atlas), model, "--max-iterations", "8", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    before = _weights(Path(model))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a model already; pass --overwrite" in err and err.count("\n") == 1
    assert all(torch.equal(before[k], v) for k, v in _weights(Path(model)).items())
    assert main([*args, "--overwrite", "--seed", "7"]) == 0
    assert not all(torch.equal(before[k], v) for k, v in _weights(Path(model)).items())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_from_which_resume_reaches_the_straight_run(atlas, tmp_path, sig):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = ["--max-iterations", "40", "--device", "cpu", "--no-progress", "--seed", "1", "--checkpoint-every", "1"]
    flag = tmp_path / "paused"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALEX_SCALE_FAULT": f"pause:2:{flag}"}
    # write point 1 pins the training matrix; point 2 is the first checkpoint's first file, at epoch 0's end
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalex_scale.cli", "fit", str(atlas), str(interrupted), *common],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)  # handled while the checkpoint is written: training stops at the next step
        time.sleep(0.3)
        flag.unlink()
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"scalex-scale fit: {sig.name} at iteration ") and "of 40: a resumable checkpoint is saved" in last
    assert last.endswith(f"resume with: scalex-scale fit {atlas} {interrupted} --resume"), last
    state = load_trainer_state(interrupted)
    assert state is not None and 0 < state.batch and state.iteration < 40  # mid-epoch: one step after the pause
    if sig == signal.SIGTERM:
        return  # the same path; the resume is checked once
    # the same process environment as the interrupted run (OMP_NUM_THREADS=1 in a fresh process is not
    # bit-identical to torch.set_num_threads(1) in this one)
    for args in ([str(interrupted), "--resume"], [str(straight)]):
        cmd = [sys.executable, "-m", "scalex_scale.cli", "fit", str(atlas), args[0], *common, *args[1:]]
        done = subprocess.run(cmd, env={**env, "SCALEX_SCALE_FAULT": ""}, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
    a, b = _weights(straight), _weights(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert load_trainer_state(interrupted).iteration == load_trainer_state(straight).iteration == 40
