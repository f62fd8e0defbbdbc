"""The overlapped embedding pipeline: bit identical to the serial path on CPU, errors, shutdown."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scalex_scale.nn import SCALEXModule
from scalex_scale.nn import encode as encode_module
from scalex_scale.nn.encode import encode_chunks

N_FEATURES = 30


def _module() -> SCALEXModule:
    module = SCALEXModule(N_FEATURES, 3, n_hidden=24, seed=2)
    module.eval()
    return module


def _chunks(sizes: list[int], seed: int = 0) -> list[tuple[int, sp.csr_matrix]]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        x = sp.random(n, N_FEATURES, density=0.3, format="csr", dtype=np.float32, random_state=int(rng.integers(1 << 30)))
        out.append((i, x))
    return out


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("scalex-embed")]


def _no_threads(timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not _threads()


@pytest.mark.parametrize("threads, queue_blocks", [(1, 1), (3, 4)])
def test_bit_identical_to_the_serial_path_on_cpu(monkeypatch: pytest.MonkeyPatch, threads: int, queue_blocks: int):
    block = 7
    monkeypatch.setattr(encode_module, "ENCODE_BLOCK", block)
    module = _module()
    chunks = _chunks([0, 3, 7, 15, 1, 22])  # empty, smaller than a block, one block, several, a remainder
    got = list(encode_chunks(module, chunks, "cpu", block=block, threads=threads, queue_blocks=queue_blocks))
    assert [k for k, _ in got] == [k for k, _ in chunks]
    for (_, x), (_, mu) in zip(chunks, got, strict=True):
        want = encode_module.encode(module, x, torch.device("cpu"))
        assert mu.dtype == np.float32 and mu.shape == (x.shape[0], module.n_latent)
        assert np.array_equal(mu, want)
    assert _no_threads()


def test_upstream_error_reaches_the_consumer_and_threads_stop():
    def chunks():
        yield from _chunks([5, 5])
        raise OSError("chunk 2 unreadable")

    got = []
    with pytest.raises(OSError, match="chunk 2 unreadable"):
        for item in encode_chunks(_module(), chunks(), "cpu", block=4):
            got.append(item)
    assert len(got) == 2
    assert _no_threads()


def test_consumer_leaving_early_stops_the_threads():
    gen = encode_chunks(_module(), _chunks([9] * 20), "cpu", block=4, queue_blocks=2)
    next(gen)
    gen.close()
    assert _no_threads()


@pytest.mark.gpu
def test_pipelined_embedding_on_cuda_matches_the_serial_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(encode_module, "ENCODE_BLOCK", 64)
    module = _module().to("cuda")
    chunks = _chunks([0, 100, 64, 300])
    got = list(encode_chunks(module, chunks, "cuda", block=64, inflight=2))
    for (_, x), (_, mu) in zip(chunks, got, strict=True):
        want = encode_module.encode(module, x, torch.device("cuda"))
        np.testing.assert_array_equal(mu, want)  # same kernels on the same blocks


def test_pinned_densify_adds_into_a_zeroed_float32_buffer(monkeypatch: pytest.MonkeyPatch):
    """The CUDA path densifies into page-locked float32 memory (toarray(out=...) adds: it must start at zero);
    checked here with ordinary memory standing in for pinned memory, and float64 input."""
    from scalex_scale.nn import encode as encode_pipeline

    zeros = torch.zeros
    monkeypatch.setattr(encode_pipeline.torch, "zeros", lambda *a, pin_memory=False, **k: zeros(*a, **k))
    x = sp.random(9, N_FEATURES, density=0.4, format="csr", dtype=np.float64, random_state=3)
    got = encode_pipeline._densify(x, 2, 8, pinned=True)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), x[2:8].toarray().astype(np.float32))
