"""The loader's tuning knobs, as a frozen, JSON-able dataclass (numpy- and torch-free).

Kept apart from :mod:`scalex_scale.data.loader` so that :class:`~scalex_scale.train.TrainConfig` can hold a
:class:`LoaderConfig` (``TrainConfig.loader``) without importing the loader's threads and torch glue.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .samplers import DEFAULT_BUFFER_SHARDS, DEFAULT_SHARD_SIZE

__all__ = ["LoaderConfig"]


@dataclass(frozen=True)
class LoaderConfig:
    """Settings of a :class:`~scalex_scale.data.loader.TrainingLoader` that do not depend on the process.

    The per-process runtime arguments (the source, the data-parallel ``rank`` / ``world_size``,
    ``pin_memory``) are arguments of the loader, not fields here. Inside a
    :class:`~scalex_scale.train.TrainConfig`, ``batch_size`` and ``seed`` come from the TrainConfig
    (:meth:`TrainConfig.loader_config`); leave them at their defaults in ``TrainConfig.loader``.

    Parameters
    ----------
    batch_size, shard_size, buffer_shards, drop_last, seed
        The sampling plan, see :class:`~scalex_scale.data.samplers.ShardSampler`. The defaults
        (8,192-row shards, 8 shards = 65,536 rows per buffer: the shuffle buffer) suit batch sizes 64 to
        4,096: a buffer is 1,024 batches of 64 or 16 of 4,096, ~105 MB raw at ~400 non-zeros per row, and
        a shard spans ~3 zarr chunks of 2**20 elements so a random-shard read wastes little. On a store
        written in random row order they only tune I/O and memory, not randomness. Data-parallel ranks
        must all use the same ``seed`` (and sizes); they then read disjoint rows and yield the same
        number of batches.
    prefetch
        Buffers read and decoded ahead of the one being consumed (>= 1).
    num_workers
        Reader threads (>= 1); more than ``prefetch`` cannot be used.
    persistent
        Keep the pipeline running across epochs: once an epoch's batches are all yielded, the threads
        go on reading the next epoch (the plan of epoch ``e + 1`` from batch 0), so the next
        ``epoch(e + 1)`` call starts without a pipeline restart. Any other call (another epoch, a
        ``start_batch``, an epoch left early) restarts the pipeline where asked.
        :meth:`~scalex_scale.data.loader.TrainingLoader.close` (or dropping the loader) stops it.
    """

    batch_size: int = 64
    shard_size: int = DEFAULT_SHARD_SIZE
    buffer_shards: int = DEFAULT_BUFFER_SHARDS
    drop_last: bool = True
    seed: int = 0
    prefetch: int = 2
    num_workers: int = 2
    persistent: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size", "buffer_shards", "prefetch", "num_workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LoaderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"LoaderConfig.seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown LoaderConfig field(s): {', '.join(unknown)}")
        return cls(**data)
