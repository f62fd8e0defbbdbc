"""SIGINT/SIGTERM during training: stop at the next step, save a resumable checkpoint, then exit.

The first signal only sets :attr:`StopSignals.signum` (the run's step hook sees it, pauses the trainer at a step
boundary and saves; see :func:`scalex_scale.train.run.run_training`); a second SIGINT aborts at once
(``KeyboardInterrupt``, nothing saved beyond the last checkpoint). Handlers are installed only in the main thread
(Python delivers signals there) and restored on exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["StopSignals"]

log = logging.getLogger("scalex_scale")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: records the first SIGINT/SIGTERM instead of dying of it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s: stopping after this step and saving a resumable checkpoint (Ctrl-C again aborts without saving)",
            signal.Signals(signum).name,
        )

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
