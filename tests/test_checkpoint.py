"""Tests of scalex_scale.train.checkpoint: safetensors + JSON checkpoints and resume from files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalex_scale.train import (
    FORMAT_VERSION,
    Trainer,
    load_checkpoint,
    load_trainer_state,
    save_checkpoint,
)

from test_train import (
    N_DOMAINS,
    N_FEATURES,
    assert_same_weights,
    cpu_config,
    make_loader,
    make_module,
    synthetic_problem,
)

DOMAINS = ["batch-a", "batch-b", "batch-c"]
PREPROCESS = {"profile": "RNA", "features": [f"g{i}" for i in range(N_FEATURES)], "scale": "batch"}


def _trained(max_iterations: int = 12) -> tuple[Trainer, torch.nn.Module]:
    module = make_module()
    trainer = Trainer(module, cpu_config(max_iterations=max_iterations, lr=1e-3))
    trainer.fit(make_loader())
    return trainer, module


def test_save_load_embed_is_bit_identical(tmp_path: Path) -> None:
    _, module = _trained()
    save_checkpoint(tmp_path, module, model_config={"domains": DOMAINS}, preprocess_state=PREPROCESS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "preprocess.json",
    ]
    loaded, config, preprocess = load_checkpoint(tmp_path)
    assert not loaded.training
    assert_same_weights(loaded, module)
    assert config["format_version"] == FORMAT_VERSION
    assert config["domains"] == DOMAINS
    assert config["torch_version"] == torch.__version__
    assert {k: config[k] for k in module.hparams} == module.hparams
    assert preprocess == PREPROCESS
    x = torch.from_numpy(synthetic_problem(20)[0])
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), module.embed(x))


def test_no_pickles_and_safetensors_only(tmp_path: Path) -> None:
    trainer, module = _trained()
    save_checkpoint(tmp_path, module, trainer_state=trainer.state())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    for path in tmp_path.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # pickle protocol marker
        if path.suffix == ".json":
            json.loads(path.read_text())


def test_unknown_format_version_is_named(tmp_path: Path) -> None:
    _, module = _trained(2)
    save_checkpoint(tmp_path, module)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 99"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_and_inconsistent_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a scalex-scale checkpoint"):
        load_checkpoint(tmp_path / "empty")
    module = make_module()
    with pytest.raises(ValueError, match="n_features"):
        save_checkpoint(tmp_path, module, model_config={"n_features": N_FEATURES + 1})
    with pytest.raises(ValueError, match="domains"):
        save_checkpoint(tmp_path, module, model_config={"domains": ["only-one"]})
    assert load_trainer_state(tmp_path) is None


def test_stale_trainer_state_is_removed(tmp_path: Path) -> None:
    trainer, module = _trained(2)
    save_checkpoint(tmp_path, module, preprocess_state=PREPROCESS, trainer_state=trainer.state())
    assert load_trainer_state(tmp_path) is not None
    save_checkpoint(tmp_path, module)
    assert load_trainer_state(tmp_path) is None
    assert not (tmp_path / "preprocess.json").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_trainer_state_roundtrip(tmp_path: Path) -> None:
    trainer, module = _trained(9)
    state = trainer.state()
    save_checkpoint(tmp_path, module, trainer_state=state)
    back = load_trainer_state(tmp_path)
    assert back is not None
    for name in ("epoch", "batch", "iteration", "best_loss", "best_epoch", "bad_epochs", "history"):
        assert getattr(back, name) == getattr(state, name), name
    assert torch.equal(back.generator_state, state.generator_state)
    assert torch.equal(back.epoch_sums, state.epoch_sums)
    assert back.best_state is not None and state.best_state is not None
    for key, value in state.best_state.items():
        assert torch.equal(back.best_state[key], value)
    assert back.optimizer_state["param_groups"] == state.optimizer_state["param_groups"]
    for index, entries in state.optimizer_state["state"].items():
        for name, value in entries.items():
            assert torch.equal(back.optimizer_state["state"][index][name], value)


@pytest.mark.parametrize("pause_at", [15, 12])  # mid-epoch, and at an epoch boundary
def test_resume_from_files_is_bit_identical(tmp_path: Path, pause_at: int) -> None:
    cfg = cpu_config(max_iterations=30, lr=1e-3)
    reference = make_module()
    expected = Trainer(reference, cfg).fit(make_loader())

    first_module = make_module()
    first = Trainer(first_module, cfg)
    first.fit(make_loader(), pause_at_iteration=pause_at)
    save_checkpoint(
        tmp_path, first_module, model_config={"domains": DOMAINS}, trainer_state=first.state()
    )
    del first, first_module

    module, config, _ = load_checkpoint(tmp_path)
    state = load_trainer_state(tmp_path)
    assert state is not None and config["n_domains"] == N_DOMAINS
    result = Trainer(module, cfg).fit(make_loader(), start_state=state)
    assert result.history == expected.history
    assert result.best_epoch == expected.best_epoch
    assert_same_weights(module, reference)


def test_resume_of_a_finished_run_is_a_no_op(tmp_path: Path) -> None:
    module = make_module()
    trainer = Trainer(module, cpu_config(max_iterations=10))
    done = trainer.fit(make_loader())
    save_checkpoint(tmp_path, module, trainer_state=trainer.state())
    state = load_trainer_state(tmp_path)
    assert state is not None and state.iteration == done.n_iterations
    loader = make_loader()
    again = Trainer(load_checkpoint(tmp_path)[0], cpu_config(max_iterations=10)).fit(loader, start_state=state)
    assert again.n_iterations == state.iteration and loader.calls == []


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    module = make_module()
    with torch.no_grad():
        module.dsbn.bias[0, 0] = float("nan")
    save_checkpoint(tmp_path, module)
    with pytest.raises(ValueError, match="not finite"):
        load_checkpoint(tmp_path)


def test_torn_or_mixed_checkpoint_is_refused(tmp_path: Path) -> None:
    trainer, module = _trained(6)
    save_checkpoint(tmp_path / "a", module, trainer_state=trainer.state())
    trainer, module = _trained(9)
    save_checkpoint(tmp_path / "b", module, trainer_state=trainer.state())
    # pieces of two saves: b's trainer tensors beside a's trainer JSON
    (tmp_path / "a" / "trainer_state.safetensors").write_bytes((tmp_path / "b" / "trainer_state.safetensors").read_bytes())
    with pytest.raises(ValueError, match="pieces disagree"):
        load_trainer_state(tmp_path / "a")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["n_hidden"] = 10**9  # would allocate terabytes: refused before anything is allocated
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_hidden = 1000000000 is not an integer between"):
        load_checkpoint(tmp_path / "b")
    config["n_hidden"] = 2048  # plausible, but not what the weights hold
    (tmp_path / "b" / "manifest.json").unlink()
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="manifest"):
        load_checkpoint(tmp_path / "b")
    config["format_version"] = 1
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="implies"):
        load_checkpoint(tmp_path / "b")


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    from scalex_scale._faults import InjectedFault, inject

    trainer, module = _trained(6)
    save_checkpoint(tmp_path / "m", module, trainer_state=trainer.state())
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    trainer, module = _trained(9)
    with inject("count") as plan:
        save_checkpoint(tmp_path / "n", module, trainer_state=trainer.state())
    for k in range(1, plan.count + 1):
        with inject("raise", k), pytest.raises(InjectedFault):
            save_checkpoint(tmp_path / "m", module, trainer_state=trainer.state())
        after = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
        assert after == before, k
        assert load_trainer_state(tmp_path / "m") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "n"]  # no temporaries left
