"""``ss.check``: an atlas verified (and with ``repair=True`` restored). Pure store work, so the step is the store's
own (:func:`scalex_scale.store.check.check`), named here so that every ``ss.X`` lives in ``workflows/X.py``."""

from __future__ import annotations

from ..store.check import CheckReport, check

__all__ = ["CheckReport", "check"]
