"""A bounded hand-off from one background producer thread to one consumer that either side can stop.

The training loader (:mod:`scalex_scale.data.loader`) and the embedding feeder (:mod:`scalex_scale.nn.encode`)
both run a producer thread into a bounded queue. The two rules they share live here: a producer blocked on a
full queue gives up once the consumer stops (it never hangs on ``put``), and a consumer waiting on an empty
queue notices when the producer died without a word (it never hangs on ``get``). Torch-free.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

#: How often a blocked put / get looks at the other side (seconds).
POLL_S = 0.05


@dataclass
class Failure:
    """A producer's exception, carried to the consumer to be re-raised there."""

    exc: BaseException


class Handoff:
    """``queue.Queue(maxsize)`` with a stop flag: :meth:`put` returns False once stopped, :meth:`get` returns a
    :class:`Failure` when ``producer`` ended without leaving an item."""

    def __init__(self, maxsize: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()

    @property
    def stop_event(self) -> threading.Event:
        """Set once stopped (for waits elsewhere in the producer that must give up too)."""
        return self._stop

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def empty(self) -> bool:
        return self._queue.empty()

    def put(self, item: object) -> bool:
        """Producer side: queue ``item``, waiting for room; False (item dropped) once :meth:`stop` was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self, producer: threading.Thread, what: str) -> object:
        """Consumer side: the next item, or a :class:`Failure` naming ``what`` stopped if ``producer`` is gone."""
        while True:
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if not producer.is_alive():
                    try:
                        return self._queue.get_nowait()
                    except queue.Empty:
                        return Failure(RuntimeError(f"{what} stopped without a result"))

    def stop(self) -> None:
        """Tell the producer to give up (its next or current :meth:`put` returns False)."""
        self._stop.set()

    def drain(self) -> None:
        """Drop what is still queued (after the producer stopped), releasing its buffers."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
