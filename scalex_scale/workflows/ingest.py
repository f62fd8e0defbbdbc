"""``ss.ingest``: studies into an atlas. Pure store work, so the step is the store's own
(:func:`scalex_scale.store.ingest.ingest`), named here so that every ``ss.X`` lives in ``workflows/X.py``."""

from __future__ import annotations

from ..store.ingest import IngestReport, ingest

__all__ = ["IngestReport", "ingest"]
