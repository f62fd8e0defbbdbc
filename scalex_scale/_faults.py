"""Fault injection for the crash tests: every durable write calls :func:`point` first.

A write point is one store operation (a Zarr key set or delete, a directory link, the publishing rename, a
checkpoint file, a cleanup). The crash tests count a command's points, then re-run it failing at the k-th one:

- in-process, with :func:`inject` (``raise`` an :class:`InjectedFault`, ``interrupt`` = ``KeyboardInterrupt``,
  ``enospc`` = ``OSError(ENOSPC)``): the command's own clean-up runs, as for Ctrl-C or a full disk;
- in a child process, with ``SCALEX_SCALE_FAULT=exit:K`` in its environment: ``os._exit`` at the k-th point,
  no clean-up at all, as for ``kill -9``. ``SCALEX_SCALE_FAULT=count:FILE`` writes the number of points to FILE.
  ``SCALEX_SCALE_FAULT=pause:K:FILE`` creates FILE at the k-th point and waits there until FILE is removed (the
  concurrency tests hold a writer mid-transaction that way).

Disabled (one global read per point) unless a test installs a plan.
"""

from __future__ import annotations

import _thread
import atexit
import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["count", "raise", "interrupt", "enospc", "exit", "pause"]


class InjectedFault(RuntimeError):
    """The failure a crash test injects (in-process)."""


@dataclass
class FaultPlan:
    """Counts write points; at point number ``at`` (1-based) acts according to ``mode``."""

    mode: Mode = "count"
    at: int = 0
    count: int = 0
    signal: str = ""
    log: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, op: str, detail: str) -> None:
        with self._lock:
            self.count += 1
            n = self.count
            self.log.append((op, detail))
        if self.mode == "count" or n != self.at:
            return
        if self.mode == "exit":
            os._exit(137)
        if self.mode == "pause":
            open(self.signal, "w").close()
            while os.path.exists(self.signal):
                time.sleep(0.02)
            return
        if self.mode == "interrupt":
            if threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt
            # Ctrl-C reaches the main thread, never Zarr's I/O thread: send SIGINT there, as a terminal does (a
            # real signal also wakes the main thread from its wait on this write, so the KeyboardInterrupt is
            # raised now, not whenever it next runs bytecode), then fail this write too (a KeyboardInterrupt
            # inside Zarr's event loop would kill the loop instead)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            else:  # pragma: no cover - a host that installed its own SIGINT handler
                _thread.interrupt_main()
            time.sleep(0.2)
            raise InjectedFault(f"write point {n} ({op} {detail}) interrupted")
        if self.mode == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), detail)
        raise InjectedFault(f"injected fault at write point {n} ({op} {detail})")


_plan: FaultPlan | None = None


def point(op: str, detail: str = "") -> None:
    """Mark a durable write about to happen (a no-op unless a fault plan is installed)."""
    plan = _plan
    if plan is not None:
        plan(op, detail)


@contextmanager
def inject(mode: Mode = "count", at: int = 0) -> Iterator[FaultPlan]:
    """Install a :class:`FaultPlan` for the duration of the block (tests)."""
    global _plan
    previous, plan = _plan, FaultPlan(mode, at)
    # "interrupt" is Ctrl-C: Python must turn SIGINT into KeyboardInterrupt, also in a process that inherited
    # SIGINT ignored (a background job of a non-interactive shell), where a real Ctrl-C could not reach it
    handler = None
    if mode == "interrupt" and threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    _plan = plan
    try:
        yield plan
    finally:
        _plan = previous
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


def _from_environment() -> None:
    global _plan
    spec = os.environ.get("SCALEX_SCALE_FAULT")
    if not spec:
        return
    mode, _, arg = spec.partition(":")
    if mode == "count":
        plan = FaultPlan("count")
        atexit.register(lambda: open(arg, "w").write(str(plan.count)))
    elif mode == "pause":
        at, _, path = arg.partition(":")
        plan = FaultPlan("pause", int(at), signal=path)
    else:
        plan = FaultPlan(mode, int(arg))  # type: ignore[arg-type]
    _plan = plan


_from_environment()
