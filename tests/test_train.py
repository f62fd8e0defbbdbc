"""Tests of scalex_scale.train: config, the training loop, early stopping and resume."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from scalex_scale.data.batch import CSRBatch
from scalex_scale.kernels import triton_available
from scalex_scale.nn import SCALEXModule
from scalex_scale.train import (
    EpochRecord,
    TrainConfig,
    Trainer,
    all_reduce_epoch_loss,
    cpu_has_bf16,
    resolve_device,
)

N_FEATURES, N_DOMAINS, N_HIDDEN = 32, 3, 48


# ------------------------------------------------------------------------- helpers
def synthetic_problem(
    n_per_domain: int = 128, n_features: int = N_FEATURES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Three cell types observed in three batches with gene-wise multiplicative batch effects,
    log1p-normalized and max-abs scaled to [0, 1] within each batch."""
    rng = np.random.default_rng(seed)
    profiles = rng.gamma(0.6, 2.0, size=(3, n_features))
    xs, domains = [], []
    for d in range(N_DOMAINS):
        effect = np.exp(rng.normal(0.0, 0.7, size=n_features))
        types = rng.integers(0, 3, size=n_per_domain)
        counts = rng.poisson(profiles[types] * effect * rng.uniform(0.5, 1.5, (n_per_domain, 1)))
        x = np.log1p(counts.astype(np.float64))
        x /= np.maximum(x.max(axis=0), 1e-12)
        xs.append(x.astype(np.float32))
        domains.append(np.full(n_per_domain, d, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(domains)


def to_csr_batch(x: np.ndarray, domain: np.ndarray) -> CSRBatch:
    rows, cols = np.nonzero(x)
    indptr = np.concatenate([[0], np.cumsum(np.count_nonzero(x, axis=1))]).astype(np.int64)
    return CSRBatch(
        indptr=torch.from_numpy(indptr),
        indices=torch.from_numpy(cols.astype(np.int32)),
        values=torch.from_numpy(x[rows, cols].astype(np.float16)),
        domain=torch.from_numpy(domain.astype(np.int64)),
        n_features=x.shape[1],
    )


class InMemoryLoader:
    """A tiny loader honouring the Trainer's contract: a fresh permutation per epoch (seeded by
    the epoch number), drop_last, and ``start_batch`` skipping to a batch of that same epoch."""

    def __init__(self, x: np.ndarray, domain: np.ndarray, batch_size: int = 64, seed: int = 0):
        self.x, self.domain, self.batch_size, self.seed = x, domain, batch_size, seed
        self.calls: list[tuple[int, int]] = []

    @property
    def batches_per_epoch(self) -> int:
        return self.x.shape[0] // self.batch_size

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[CSRBatch]:
        self.calls.append((epoch, start_batch))
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.x.shape[0])
        for b in range(start_batch, self.batches_per_epoch):
            rows = perm[b * self.batch_size : (b + 1) * self.batch_size]
            yield to_csr_batch(self.x[rows], self.domain[rows])


def make_loader(n_per_domain: int = 128, seed: int = 0) -> InMemoryLoader:
    x, domain = synthetic_problem(n_per_domain, seed=seed)
    return InMemoryLoader(x, domain, batch_size=64, seed=seed)


def make_module(seed: int = 0) -> SCALEXModule:
    return SCALEXModule(N_FEATURES, N_DOMAINS, n_hidden=N_HIDDEN, seed=seed)


def cpu_config(**kwargs: object) -> TrainConfig:
    base: dict[str, object] = {"device": "cpu", "progress": False}
    base.update(kwargs)
    return TrainConfig(**base)  # type: ignore[arg-type]


def assert_same_weights(a: SCALEXModule, b: SCALEXModule) -> None:
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


# -------------------------------------------------------------------------- config
def test_config_defaults_match_scalex() -> None:
    cfg = TrainConfig()
    assert (cfg.max_iterations, cfg.batch_size, cfg.lr, cfg.weight_decay) == (30000, 64, 2e-4, 5e-4)
    assert (cfg.patience, cfg.kl_weight, cfg.device, cfg.precision) == (10, 0.5, "auto", "fp32")
    assert cfg.dsbn_singleton == "passthrough"  # the reference package's DSBN rule for a domain's lone row


def test_config_json_roundtrip() -> None:
    cfg = TrainConfig(max_iterations=123, lr=1e-3, precision="bf16", device="cuda:1", seed=9)
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig field.*bogus"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_config_loader_field_roundtrip_and_rules() -> None:
    from scalex_scale.data import LoaderConfig

    cfg = TrainConfig(batch_size=128, seed=3, loader=LoaderConfig(buffer_shards=2, shard_size=4096, num_workers=1))
    as_json = json.loads(json.dumps(cfg.to_dict()))
    assert as_json["loader"]["buffer_shards"] == 2
    back = TrainConfig.from_dict(as_json)
    assert back == cfg and isinstance(back.loader, LoaderConfig)
    # TrainConfig's batch_size and seed win: the loader config is built from them
    assert cfg.loader_config() == LoaderConfig(batch_size=128, seed=3, buffer_shards=2, shard_size=4096, num_workers=1)
    # a dict written before the loader field existed still loads, with the default loader
    old = {k: v for k, v in cfg.to_dict().items() if k != "loader"}
    assert TrainConfig.from_dict(old).loader == LoaderConfig()
    with pytest.raises(ValueError, match="unknown LoaderConfig field.*bogus"):
        TrainConfig.from_dict({**cfg.to_dict(), "loader": {"bogus": 1}})
    for name, value in (("batch_size", 256), ("seed", 5)):  # set on TrainConfig, not on its loader
        with pytest.raises(ValueError, match=f"TrainConfig.loader.{name}=.*TrainConfig.{name}"):
            TrainConfig(loader=LoaderConfig(**{name: value}))
    with pytest.raises(TypeError, match="LoaderConfig"):
        TrainConfig(loader={"buffer_shards": 2})  # type: ignore[arg-type]
    # replacing the trainer seed (as rank_config does) keeps the config valid
    assert dataclasses.replace(cfg, seed=1003).loader_config().seed == 1003


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_iterations": 0}, "max_iterations"),
        ({"patience": 0}, "patience"),
        ({"precision": "fp16"}, "precision"),
        ({"device": "tpu"}, "device"),
        ({"batch_size": 1}, "batch_size"),
        ({"dsbn_singleton": "skip"}, "dsbn_singleton"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_errors_without_cuda() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Trainer(make_module(), TrainConfig(device="cuda"))
    with pytest.raises(ValueError, match="cuda_graphs"):
        Trainer(make_module(), cpu_config(cuda_graphs=True))


def test_bf16_on_cpu_needs_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    import scalex_scale.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="bf16.*AVX512-BF16"):
        Trainer(make_module(), cpu_config(precision="bf16"))


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_on_cpu_trains_like_fp32() -> None:
    """bf16 autocast on CPU: weights stay float32, and the loss curve follows fp32's closely."""
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(make_module(), cpu_config(precision=precision, max_iterations=60))
        result = trainer.fit(make_loader())
        assert all(p.dtype == torch.float32 for p in trainer.module.parameters())
        losses[precision] = np.array([r.loss for r in result.history])
    assert losses["bf16"][-1] < losses["bf16"][0]
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.01)


# ---------------------------------------------------------------------------- fit
def test_training_reduces_the_loss() -> None:
    loader = make_loader()  # 384 cells, 6 batches per epoch
    module = make_module()
    result = Trainer(module, cpu_config(max_iterations=300, lr=2e-3)).fit(loader)
    assert result.completed and not result.stopped_early
    assert result.n_iterations == 300
    assert result.n_epochs == math.ceil(300 / 6) == len(result.history)
    losses = [r.loss for r in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert min(losses) == pytest.approx(result.best_loss)
    assert result.history[result.best_epoch].loss == result.best_loss
    for r in result.history:
        assert r.loss == pytest.approx(r.recon + 0.5 * r.kl, rel=1e-5)
    assert result.seconds > 0 and result.cells_per_second > 0
    assert not module.training  # finished: best weights, eval mode


def test_max_iterations_stops_mid_epoch() -> None:
    loader = make_loader()
    result = Trainer(make_module(), cpu_config(max_iterations=10)).fit(loader)
    assert result.n_iterations == 10
    assert [r.n_batches for r in result.history] == [6, 4]
    assert loader.calls == [(0, 0), (1, 0)]


def test_early_stopping_restores_best_weights() -> None:
    loader = make_loader(n_per_domain=43)  # 129 cells: 2 batches per epoch, noisy epoch losses
    module = make_module()
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def keep(record: EpochRecord, trainer: Trainer) -> None:
        snapshots[record.epoch] = {k: v.clone() for k, v in trainer.module.state_dict().items()}

    cfg = cpu_config(max_iterations=4000, lr=3e-2, patience=3)
    result = Trainer(module, cfg).fit(loader, on_epoch_end=keep)
    assert result.stopped_early and result.completed
    assert result.n_iterations < 4000
    losses = [r.loss for r in result.history]
    assert result.best_epoch == int(np.argmin(losses))
    assert len(losses) == result.best_epoch + 1 + cfg.patience
    assert all(loss >= result.best_loss for loss in losses[result.best_epoch + 1 :])
    for name, value in module.state_dict().items():
        assert torch.equal(value, snapshots[result.best_epoch][name]), name


def test_non_finite_loss_is_an_error_naming_the_iteration() -> None:
    from scalex_scale.errors import TrainingDivergedError

    x, domain = synthetic_problem(64)
    x[5, 3] = np.nan
    with pytest.raises(TrainingDivergedError, match=r"non-finite \(nan\) at iteration 1 \(epoch 0\); try a lower --lr"):
        Trainer(make_module(), cpu_config(max_iterations=100)).fit(InMemoryLoader(x, domain))
    # with a cross-rank reduction only the epoch's reduced loss is read (every rank decides alike)
    loader = InMemoryLoader(x, domain)
    trainer = Trainer(make_module(), cpu_config(max_iterations=100), reduce_epoch_loss=lambda t: t)
    with pytest.raises(TrainingDivergedError, match=f"between iterations 1 and {loader.batches_per_epoch} \\(epoch 0\\)"):
        trainer.fit(loader)
    assert trainer.state().history == ()  # the NaN epoch is not recorded as a result


def test_reduce_epoch_loss_hook_sees_the_sums() -> None:
    seen: list[torch.Tensor] = []

    def reduce(totals: torch.Tensor) -> torch.Tensor:
        seen.append(totals.clone())
        return totals * 2.0  # as if two identical ranks: means unchanged, batch count doubled

    loader = make_loader()
    result = Trainer(make_module(), cpu_config(max_iterations=12), reduce_epoch_loss=reduce).fit(loader)
    assert len(seen) == 2 and all(t.shape == (4,) for t in seen)
    assert [r.n_batches for r in result.history] == [12, 12]
    assert result.history[0].loss == pytest.approx(float(seen[0][0] / seen[0][3]))


def test_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    loader = make_loader()
    result = Trainer(make_module(), cpu_config(max_iterations=8, progress=True, log_every=2)).fit(loader)
    assert result.n_iterations == 8
    assert "cells_s" in capsys.readouterr().err


# -------------------------------------------------------------------------- resume
def _uninterrupted(cfg: TrainConfig) -> tuple[SCALEXModule, list[EpochRecord]]:
    module = make_module()
    result = Trainer(module, cfg).fit(make_loader())
    return module, list(result.history)


@pytest.mark.parametrize("pause_at", [21, 18])  # mid-epoch, and exactly at an epoch boundary
def test_resume_mid_run_is_bit_identical(pause_at: int) -> None:
    cfg = cpu_config(max_iterations=40, lr=1e-3)
    reference, history = _uninterrupted(cfg)

    first = Trainer(make_module(), cfg)
    paused = first.fit(make_loader(), pause_at_iteration=pause_at)
    assert not paused.completed and paused.n_iterations == pause_at
    state = first.state()
    assert (state.epoch, state.batch) == divmod(pause_at, 6)

    resumed_module = make_module(seed=123)  # different init: the state must bring the weights
    loader = make_loader()
    result = Trainer(resumed_module, cfg).fit(loader, start_state=state)
    assert result.completed and result.n_iterations == 40
    assert loader.calls[0] == divmod(pause_at, 6)
    assert list(result.history) == history
    assert_same_weights(resumed_module, reference)


def test_pause_from_on_epoch_end_and_resume() -> None:
    cfg = cpu_config(max_iterations=40, lr=1e-3)
    reference, history = _uninterrupted(cfg)
    first = Trainer(make_module(), cfg)
    paused = first.fit(make_loader(), on_epoch_end=lambda record, trainer: record.epoch == 2)
    assert not paused.completed and paused.n_epochs == 3 and paused.n_iterations == 18
    module = make_module(seed=5)
    result = Trainer(module, cfg).fit(make_loader(), start_state=first.state())
    assert list(result.history) == history
    assert_same_weights(module, reference)


# ------------------------------------------------------------------------- compile
def test_compile_traces_the_whole_loss_without_graph_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile=True`` wraps the training forward; traced here with a cheap backend and
    ``fullgraph=True`` (inductor itself is too slow for this 2-core test box)."""
    compiled: list[object] = []
    original = torch.compile

    def cheap_compile(model: object, **kwargs: object) -> object:
        compiled.append(model)
        return original(model, backend="aot_eager", fullgraph=True)  # type: ignore[call-overload]

    monkeypatch.setattr(torch, "compile", cheap_compile)
    torch._dynamo.reset()
    cfg = cpu_config(max_iterations=12, lr=1e-3)
    module = make_module()
    result = Trainer(module, dataclasses.replace(cfg, compile=True)).fit(make_loader())
    assert len(compiled) == 1 and compiled[0] is module
    eager = Trainer(make_module(), cfg).fit(make_loader())
    for a, b in zip(result.history, eager.history, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-4)


def test_trainer_resolves_the_dsbn_backend_up_front() -> None:
    assert Trainer(make_module(), cpu_config()).dsbn_backend == "torch"
    if triton_available("cpu"):
        pytest.skip("the Triton interpreter is on: backend='triton' can run on CPU")
    module = SCALEXModule(N_FEATURES, N_DOMAINS, n_hidden=N_HIDDEN, dsbn_backend="triton")
    with pytest.raises(RuntimeError, match="triton"):
        Trainer(module, cpu_config())


def test_all_reduce_epoch_loss_with_a_one_rank_group(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        reduce = all_reduce_epoch_loss()
        loader = make_loader()
        result = Trainer(make_module(), cpu_config(max_iterations=6), reduce_epoch_loss=reduce).fit(
            loader
        )
        assert result.history[0].n_batches == 6
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the real loader, float64 sums
def _real_loader(pinned_ring: bool = False, seed: int = 0):
    """The TrainingLoader over the synthetic problem (packed batches in a CPU ring when ``pinned_ring``)."""
    import scipy.sparse as sp

    from scalex_scale.data import InMemorySource, LoaderConfig, TrainingLoader
    from scalex_scale.data.pinned import PinnedRing

    x, domain = synthetic_problem()
    csr = sp.csr_matrix(x)
    source = InMemorySource.from_arrays(csr.indptr, csr.indices.astype(np.uint16), csr.data.astype(np.float16),
                                        domain, x.shape[1])  # as stored: float16 values, uint16 columns
    loader = TrainingLoader(source, LoaderConfig(batch_size=64, shard_size=64, buffer_shards=2, seed=seed))
    if pinned_ring:
        loader._ring = PinnedRing(4, allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    return loader


def test_packed_batches_train_exactly_like_plain_ones() -> None:
    cfg = cpu_config(max_iterations=30, lr=1e-3)
    results, modules = [], []
    for ring in (False, True):
        module = make_module()
        with _real_loader(pinned_ring=ring) as loader:
            results.append(Trainer(module, cfg).fit(loader))
        modules.append(module)
    assert results[0].history == results[1].history
    assert_same_weights(*modules)


@pytest.mark.parametrize("pause_at", [21, 18])
def test_resume_with_the_persistent_loader_is_bit_identical(pause_at: int) -> None:
    cfg = cpu_config(max_iterations=40, lr=1e-3)
    reference = make_module()
    with _real_loader() as loader:
        history = Trainer(reference, cfg).fit(loader).history
        first = Trainer(make_module(), cfg)
        assert not first.fit(loader, pause_at_iteration=pause_at).completed
        module = make_module(seed=4)
        result = Trainer(module, cfg).fit(loader, start_state=first.state())
    assert result.history == history
    assert_same_weights(module, reference)


def test_epoch_sums_are_float64_and_old_float32_states_load() -> None:
    cfg = cpu_config(max_iterations=40, lr=1e-3)
    first = Trainer(make_module(), cfg)
    first.fit(make_loader(), pause_at_iteration=9)
    state = first.state()
    assert state.epoch_sums.dtype == torch.float64
    old = dataclasses.replace(state, epoch_sums=state.epoch_sums.float())  # a state written before float64 sums
    resumed = Trainer(make_module(), cfg)
    resumed.load_state(old)
    assert resumed._sums.dtype == torch.float64
    assert torch.equal(resumed._sums, state.epoch_sums.float().double())


def test_epoch_loss_is_the_float64_mean_of_the_batch_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    original = SCALEXModule.loss

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(out.loss.detach().clone())
        return out

    monkeypatch.setattr(SCALEXModule, "loss", spy)
    result = Trainer(make_module(), cpu_config(max_iterations=6)).fit(make_loader())
    want = torch.stack(seen).double().mean().item()
    assert result.history[0].loss == want  # sums kept in float64, not float32


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_with_compile_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: original(model, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    cfg = cpu_config(max_iterations=24, lr=1e-3, precision="bf16")
    compiled = Trainer(make_module(), dataclasses.replace(cfg, compile=True)).fit(make_loader())
    eager = Trainer(make_module(), cfg).fit(make_loader())
    for a, b in zip(compiled.history, eager.history, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-3)


def test_loss_watch_lagged_window_logic() -> None:
    """The CUDA path of the divergence watch (train/finite.py), its event faked so it runs here: a copy every
    CUDA_CHECK_EVERY steps, read one check later (or later still while the event is not done)."""
    from scalex_scale.errors import TrainingDivergedError
    from scalex_scale.train.finite import CUDA_CHECK_EVERY as K
    from scalex_scale.train.finite import LossWatch

    class Event:
        done = True

        def record(self) -> None: ...

        def query(self) -> bool:
            return self.done

    sums = torch.zeros(3, dtype=torch.float64)
    watch = LossWatch(sums, cpu_config())
    watch.cuda, watch._event = True, Event()
    watch._host = torch.empty(1, dtype=torch.float64)
    watch._host_view = watch._host.numpy()
    watch.reset(0)
    for it in range(1, 4 * K + 1):
        sums[0] += float("nan") if it == K + 5 else 1.0
        # at 2K the copy taken at K is "not done": no new copy then; at 3K it is read (finite) and 3K's taken
        watch._event.done = it != 2 * K
        if it < 4 * K:
            watch.after_step(it, 0)
            assert watch.finite_through == (K if it >= 3 * K else 0)
            continue
        with pytest.raises(TrainingDivergedError, match=f"between iterations {K + 1:,} and {3 * K:,}"):
            watch.after_step(it, 0)
