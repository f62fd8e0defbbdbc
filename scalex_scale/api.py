"""The Python API in one import: ``from scalex_scale import api``; each name is defined in ``workflows/<name>.py``.

``api.X is scalex_scale.X is scalex_scale.workflows.X.X``; the CLI (:mod:`scalex_scale.cli`) is a thin layer over
these.
"""

from __future__ import annotations

from .workflows.check import check
from .workflows.embed import embed
from .workflows.evaluate import evaluate
from .workflows.fit import fit
from .workflows.ingest import ingest
from .workflows.integrate import IntegrateResult, integrate
from .workflows.preprocess import preprocess
from .workflows.project import ProjectReport, project
from .workflows.transfer import transfer

__all__ = [
    "IntegrateResult", "ProjectReport", "check", "embed", "evaluate", "fit", "ingest", "integrate", "preprocess",
    "project", "transfer",
]  # fmt: skip
