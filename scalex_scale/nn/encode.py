"""Encoding many cells with overlap: read / densify / copy / encode / copy back, each stage ahead of the next.

The serial path (:func:`encode`) densifies a block of rows on the CPU, copies it,
encodes it and copies ``mu`` back, one block after the other: on a GPU the device idles while the CPU
densifies and the CPU idles while it waits. :func:`encode_chunks` runs the same blocks through a pipeline:

::

    chunks (read + transform, upstream) ──> feeder thread ──> densify pool (threads) ──> consumer (this thread)
                                            splits each      block -> dense float32     H2D on a copy stream,
                                            chunk in blocks  (pinned on CUDA)          encode, D2H into pinned
                                            of ENCODE_BLOCK                            memory; results handed out
                                                                                       ``inflight`` blocks later

Bounded memory: at most ``queue_blocks`` dense blocks wait between the feeder and the consumer, and
``inflight`` blocks are on the device. The blocks (row boundaries within each chunk), the densify
(``toarray``) and the encoder call are exactly those of the serial path, so on a CPU the result is bit
identical to it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scalex_scale._threads import Failure, Handoff
from scalex_scale.nn.vae import SCALEXModule

#: Cells densified and encoded at once.
ENCODE_BLOCK = 4096

__all__ = ["encode_chunks"]


@dataclass(frozen=True)
class _Block:
    chunk: int
    key: Any
    start: int
    stop: int
    n_rows: int  # rows of the whole chunk
    dense: Future[Any]


_END = object()


def _densify(x: sp.csr_matrix, start: int, stop: int, pinned: bool) -> torch.Tensor:
    """Rows ``start:stop`` of ``x`` as a dense float32 tensor (page-locked when ``pinned``)."""
    rows = x[start:stop]
    if not pinned:
        return torch.from_numpy(rows.toarray())
    out = torch.zeros(rows.shape, dtype=torch.float32, pin_memory=True)
    rows.astype(np.float32, copy=False).toarray(out=out.numpy())  # adds into ``out``: it must start at zero
    return out


class _Feeder:
    """Background thread: pulls chunks from upstream, submits their blocks to the densify pool, queues them."""

    def __init__(self, chunks: Iterable[tuple[Any, sp.csr_matrix]], block: int, threads: int, pinned: bool,
                 queue_blocks: int) -> None:  # fmt: skip
        self._chunks = chunks
        self._block = block
        self._pinned = pinned
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="scalex-embed-densify")
        self._handoff = Handoff(queue_blocks)
        self._thread = threading.Thread(target=self._run, name="scalex-embed-feed", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        put = self._handoff.put
        try:
            for index, (key, x) in enumerate(self._chunks):
                x = sp.csr_matrix(x)
                n = int(x.shape[0])
                starts = range(0, n, self._block) if n else [0]
                for s in starts:
                    e = min(s + self._block, n)
                    future = self._pool.submit(_densify, x, s, e, self._pinned)
                    if not put(_Block(index, key, s, e, n, future)):
                        return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            put(Failure(exc))

    def get(self) -> object:
        return self._handoff.get(self._thread, "the embedding feeder")

    def close(self) -> None:
        self._handoff.stop()
        self._thread.join()
        self._handoff.drain()
        self._pool.shutdown(wait=True, cancel_futures=True)


@torch.no_grad()
def encode_chunks(
    module: SCALEXModule,
    chunks: Iterable[tuple[Any, sp.csr_matrix]],
    device: torch.device | str,
    *,
    block: int = ENCODE_BLOCK,
    threads: int = 2,
    queue_blocks: int = 4,
    inflight: int = 2,
) -> Iterator[tuple[Any, np.ndarray]]:
    """``(key, mu)`` for every ``(key, csr)`` of ``chunks``, in order, with the stages overlapped.

    Parameters
    ----------
    module
        The trained module (switched to eval mode).
    chunks
        ``(key, csr_matrix)`` pairs (model input rows); iterated in a background thread.
    device
        Where to encode.
    block
        Rows densified and encoded at once (the serial path's ``ENCODE_BLOCK``).
    threads
        Densify threads.
    queue_blocks
        Dense blocks allowed to wait for the consumer.
    inflight
        Blocks on the device whose ``mu`` is not yet back on the host (CUDA).

    Yields
    ------
    key, mu
        ``mu`` is a float32 (n_rows, n_latent) array.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    module.eval()
    feeder = _Feeder(chunks, block, threads, on_cuda, queue_blocks)
    copy_stream = torch.cuda.Stream(device=device) if on_cuda else None
    pending: deque[tuple[_Block, torch.Tensor, Any]] = deque()
    parts: list[np.ndarray] = []

    def finish(entry: tuple[_Block, torch.Tensor, Any]) -> Iterator[tuple[Any, np.ndarray]]:
        nonlocal parts
        blk, mu, event = entry
        if event is not None:
            event.synchronize()
        parts.append(mu.numpy())
        if blk.stop >= blk.n_rows:
            out = parts[0] if len(parts) == 1 else np.concatenate(parts)
            parts = []
            yield blk.key, (out if out.shape[0] == blk.n_rows else out[: blk.n_rows])

    try:
        while True:
            item = feeder.get()
            if item is _END:
                break
            if isinstance(item, Failure):
                raise item.exc
            assert isinstance(item, _Block)
            host = item.dense.result()
            if item.stop == item.start:  # an empty chunk
                mu = torch.empty(0, module.n_latent, dtype=torch.float32)
                pending.append((item, mu, None))
            elif on_cuda:
                assert copy_stream is not None
                compute = torch.cuda.current_stream(device)
                with torch.cuda.stream(copy_stream):
                    x = host.to(device, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(copy_stream)
                compute.wait_event(copied)
                x.record_stream(compute)
                mu_dev = module.embed(x).float()
                mu = torch.empty(mu_dev.shape, dtype=torch.float32, pin_memory=True)
                mu.copy_(mu_dev, non_blocking=True)
                done = torch.cuda.Event()
                done.record(compute)
                pending.append((item, mu, done))
            else:
                pending.append((item, module.embed(host.to(device)).float(), None))
            while len(pending) > (inflight if on_cuda else 0):
                yield from finish(pending.popleft())
        while pending:
            yield from finish(pending.popleft())
    finally:
        feeder.close()


@torch.no_grad()
def encode(module: SCALEXModule, x: sp.csr_matrix, device: torch.device) -> np.ndarray:
    """``mu`` of the rows of a CSR model-input matrix, in blocks of :data:`ENCODE_BLOCK` (eval mode): the serial
    path that :func:`encode_chunks` overlaps."""
    module.eval()
    out = np.empty((x.shape[0], module.n_latent), dtype=np.float32)
    for s in range(0, x.shape[0], ENCODE_BLOCK):
        block = torch.from_numpy(x[s : s + ENCODE_BLOCK].toarray()).to(device)
        out[s : s + block.shape[0]] = module.embed(block).float().cpu().numpy()
    return out
