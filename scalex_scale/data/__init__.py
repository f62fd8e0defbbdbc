"""Mini-batch data path: numpy-only samplers, and the torch loader that executes their plans.

``scalex_scale.data.samplers`` and ``scalex_scale.data.config`` (:class:`LoaderConfig`) never import
torch; the torch-side names (``TrainingLoader``, ``InMemorySource``, ``CSRBatch``, ...) are imported
lazily on first access so that importing the samplers (or this package) stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import LoaderConfig
from .samplers import (
    DEFAULT_BUFFER_SHARDS,
    DEFAULT_SHARD_SIZE,
    LoadRequest,
    ShardSampler,
    assemble_batches,
    batch_composition_tv,
)

_LAZY = {
    "CSRBatch": "batch",
    "EpochIterator": "loader",
    "InMemorySource": "loader",
    "TrainingLoader": "loader",
    "TrainingSource": "loader",
}

__all__ = [
    "DEFAULT_BUFFER_SHARDS",
    "DEFAULT_SHARD_SIZE",
    "LoaderConfig",
    "LoadRequest",
    "ShardSampler",
    "assemble_batches",
    "batch_composition_tv",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
