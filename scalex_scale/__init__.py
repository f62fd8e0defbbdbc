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

from . import _numba_cache
from .workflows import STEPS as _STEPS

_numba_cache.configure()  # before any kernel module is imported

__version__ = "0.1.0"

#: public name -> module that defines it (the verbs: ``workflows/<verb>.py``)
_LAZY = {
    "Atlas": "store.atlas",
    **{verb: f"workflows.{module}" for verb, module in _STEPS.items()},
    "SCALEX": "compat",
    "TrainConfig": "train.config",
    "PreprocessConfig": "preprocessing.state",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import on first use: ``import scalex_scale`` stays light (no torch until a torch-side name is used)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # bound once: a submodule imported later cannot shadow it
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
