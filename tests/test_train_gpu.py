"""The CUDA path of training: graphs == eager, capture while the loader thread works, bf16 / compile on CUDA,
the pinned ring under real asynchronous copies. Every test here needs a GPU (``gpu`` marker); on a machine without
CUDA they are skipped (the CPU halves of the same logic are tested in test_train.py / test_loader.py)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scalex_scale.data import InMemorySource, LoaderConfig, TrainingLoader
from scalex_scale.nn import SCALEXModule
from scalex_scale.train import TrainConfig, Trainer

pytestmark = pytest.mark.gpu

N_FEATURES, N_DOMAINS = 200, 4


def _source(n_rows: int = 4096, seed: int = 0) -> InMemorySource:
    rng = np.random.default_rng(seed)
    x = sp.random(n_rows, N_FEATURES, density=0.2, format="csr", dtype=np.float32, random_state=seed)
    x.data = rng.random(x.nnz, dtype=np.float32)
    return InMemorySource.from_arrays(x.indptr, x.indices.astype(np.uint16), x.data.astype(np.float16),
                                      rng.integers(0, N_DOMAINS, n_rows).astype(np.int32), N_FEATURES)


def _loader(batch_size: int = 64) -> TrainingLoader:
    config = LoaderConfig(batch_size=batch_size, shard_size=512, buffer_shards=2)
    return TrainingLoader(_source(), config, pin_memory=True)


def _module(backend: str = "auto") -> SCALEXModule:
    return SCALEXModule(N_FEATURES, N_DOMAINS, n_hidden=256, seed=0, dsbn_backend=backend)


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{"device": "cuda", "progress": False, "max_iterations": 150, "lr": 1e-3, **kw})


def _fit(config: TrainConfig, backend: str = "auto", batch_size: int = 64):
    module = _module(backend)
    with _loader(batch_size) as loader:
        result = Trainer(module, config).fit(loader)
        stats = loader.pinned_stats()
    return module, result, stats


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_step_equals_eager(backend: str, precision: str) -> None:
    """Same seed, same batches: the replayed graph computes what the eager step computes."""
    m_eager, eager, _ = _fit(_config(precision=precision), backend)
    m_graph, graphed, stats = _fit(_config(precision=precision, cuda_graphs=True), backend)
    assert graphed.n_iterations == eager.n_iterations == 150
    for a, b in zip(graphed.history, eager.history, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-6)
    for (name, a), b in zip(m_graph.state_dict().items(), m_eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert stats["added"] == 0  # the ring never had to grow for a held batch


def test_capture_is_not_invalidated_by_another_thread_using_cuda() -> None:
    """thread_local capture: another thread pinning memory and querying events during the capture is legal."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def busy() -> None:
        try:
            while not stop.is_set():
                buf = torch.empty(1 << 16, dtype=torch.uint8, pin_memory=True)
                event = torch.cuda.Event()
                event.query()
                del buf
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        _, result, _ = _fit(_config(cuda_graphs=True, max_iterations=40))
    finally:
        stop.set()
        thread.join()
    assert not errors and result.n_iterations == 40 and math.isfinite(result.history[-1].loss)


def test_compile_on_cuda_trains_like_eager() -> None:
    """Inductor on CUDA (fp32; bf16 with compile is covered on the CPU, each compile here costs ~20 s)."""
    torch._dynamo.reset()
    _, compiled, _ = _fit(_config(compile=True, max_iterations=64))
    _, eager, _ = _fit(_config(max_iterations=64))
    for a, b in zip(compiled.history, eager.history, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=2e-3)


def test_bf16_on_cuda_follows_fp32() -> None:
    _, fp32, _ = _fit(_config())
    _, bf16, _ = _fit(_config(precision="bf16"))
    losses = np.array([r.loss for r in bf16.history])
    np.testing.assert_allclose(losses, [r.loss for r in fp32.history], rtol=0.02)


def test_large_batch_row_split_kernels_train() -> None:
    """Batch 4,096 with one domain takes the row-split DSBN kernels; eager and graphed agree."""
    src = _source(n_rows=8192)
    x = src.read(0, src.n_rows)
    one = InMemorySource.from_arrays(x[0], x[1], x[2], np.zeros(src.n_rows, np.int32), N_FEATURES, 1)
    losses = []
    for graphs in (False, True):
        module = SCALEXModule(N_FEATURES, 1, n_hidden=256, seed=0)
        with TrainingLoader(one, LoaderConfig(batch_size=4096, shard_size=1024, seed=0), pin_memory=True) as loader:
            result = Trainer(module, _config(cuda_graphs=graphs, max_iterations=12)).fit(loader)
        losses.append([r.loss for r in result.history])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_pinned_ring_under_asynchronous_copies() -> None:
    """A small ring, many batches, copies queued far ahead of a slow stream: every batch arrives intact."""
    src = _source()
    loader = TrainingLoader(src, LoaderConfig(batch_size=32, shard_size=256, buffer_shards=2, seed=3), pin_memory=True)
    loader._ring = type(loader._ring)(3)
    from scalex_scale.data.device import device_batches

    dense = sp.csr_matrix((src.read(0, src.n_rows)[2].astype(np.float32), src.read(0, src.n_rows)[1],
                           src.read(0, src.n_rows)[0]), shape=(src.n_rows, N_FEATURES)).toarray()
    slow = torch.randn(2048, 2048, device="cuda")
    got = []
    with loader.epoch(0) as batches:
        for staged in device_batches(batches, "cuda", ahead=2):
            slow @ slow  # keep the compute stream busy: the copies run ahead
            got.append(staged.densify())
    for x, rows in zip(got, loader.sampler.batch_rows(0), strict=True):
        np.testing.assert_array_equal(x.cpu().numpy(), dense[rows])
    loader.close()


def test_graphed_steps_do_not_synchronize_with_the_host() -> None:
    """After warm-up and capture, a step (densify into the static input, domain copy, noise, replay) runs with
    ``set_sync_debug_mode("error")``: no host synchronization."""
    from scalex_scale.data.device import device_batches

    with _loader() as loader:
        trainer = Trainer(_module(), _config(cuda_graphs=True, max_iterations=10, log_every=0))
        trainer.fit(loader)  # warm-up and capture
        assert trainer._graph is not None and trainer._graph.graph is not None
        with loader.epoch(5) as batches:
            staged = [b for b, _ in zip(device_batches(batches, "cuda"), range(5))]
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in staged:
                trainer._step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_compile_inside_the_whole_step_graph() -> None:
    """cuda_graphs with compile: the compiled forward is captured inside the whole-step graph."""
    torch._dynamo.reset()
    _, result, _ = _fit(_config(cuda_graphs=True, compile=True, max_iterations=40))
    assert math.isfinite(result.history[-1].loss)
