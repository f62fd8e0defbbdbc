"""The atlas steps, one room per public verb: ``ss.X`` lives in ``workflows/X.py``.

This layer is the only place that joins the store (:mod:`scalex_scale.store`) with the engines below it
(:mod:`~scalex_scale.preprocessing`, :mod:`~scalex_scale.nn`, :mod:`~scalex_scale.train`,
:mod:`~scalex_scale.metrics`): each step opens an atlas, runs an engine on it, and writes the result in one
transaction. Modules are imported on use (``import scalex_scale.workflows`` loads nothing heavy).
"""

from __future__ import annotations

#: public name -> module of this package that defines it
STEPS = {
    "ingest": "ingest",
    "check": "check",
    "preprocess": "preprocess",
    "fit": "fit",
    "embed": "embed",
    "integrate": "integrate",
    "project": "project",
    "transfer": "transfer",
    "evaluate": "evaluate",
}
