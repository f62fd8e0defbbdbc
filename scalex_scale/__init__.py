"""scalex-scale: out-of-core, GPU-ready single-cell data integration with the SCALEX method.

Python API (each step works on a Zarr atlas path)::

    import scalex_scale as ss
    ss.ingest("atlas.zarr", ["a.h5ad", "b.h5ad"])
    ss.preprocess("atlas.zarr")
    ss.fit("atlas.zarr", "model")
    ss.embed("atlas.zarr", "model")            # obsm['latent']
    ss.project("atlas.zarr", "model", ["new.h5ad"])
    ss.transfer("atlas.zarr", "celltype")
    ss.evaluate("atlas.zarr", label_key="celltype")

or the drop-in ``ss.SCALEX(data_list, batch_categories=...)`` of the reference package.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Atlas": "store",
    "check": "store",
    "ingest": "store",
    "preprocess": "preprocess.pipeline",
    "fit": "api",
    "embed": "api",
    "integrate": "api",
    "project": "api",
    "transfer": "api",
    "evaluate": "api",
    "SCALEX": "compat",
    "TrainConfig": "train",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import on first use: ``import scalex_scale`` stays light (no torch until a torch-side name is used)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
