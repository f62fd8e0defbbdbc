"""The writer lock of an atlas (or a model directory): an advisory ``flock`` on a hidden sibling file.

One writer at a time; readers take no lock. The kernel releases a ``flock`` when its holder dies, so a lock left
by a killed process is never held: the next writer takes it at once and reads the dead holder's record (pid, host,
command) from the file only to say that it is cleaning up after it. A live holder makes the next writer wait with a
message (``timeout=None``, the default), give up after ``timeout`` seconds, or fail at once (``timeout=0``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .errors import AtlasBusyError

log = logging.getLogger("scalex_scale")

#: Locks held by this process (path -> thread id), to refuse a nested write on the same target.
_HELD: dict[str, int] = {}
_HELD_LOCK = threading.Lock()


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """``with WriterLock(path, "ingest"):`` holds the write lock of ``path`` (which may not exist yet).

    Parameters
    ----------
    target
        The atlas or directory being written.
    command
        What the holder does (shown to waiting writers).
    timeout
        Seconds to wait for a live holder: None waits as long as it takes, 0 fails at once.
    """

    def __init__(self, target: str | os.PathLike[str], command: str, *, timeout: float | None = None) -> None:
        self.target = Path(target).absolute()
        self.command = command
        self.timeout = timeout
        self.path = lock_path(self.target)
        self._fd: int | None = None
        #: The record of a previous holder that died while holding the lock (None if it released it).
        self.previous: dict[str, Any] | None = None

    def _read_record(self, fd: int) -> dict[str, Any] | None:
        try:
            raw = os.pread(fd, 4096, 0)
            return json.loads(raw.decode()) if raw.strip() else None
        except (OSError, ValueError):
            return None

    def _describe(self, record: dict[str, Any] | None) -> str:
        if not record:
            return "another process"
        started = time.strftime("%H:%M:%S", time.localtime(record.get("started", 0)))
        return f"pid {record.get('pid')} on {record.get('host')} (`scalex-scale {record.get('command')}`, since {started})"

    def acquire(self) -> WriterLock:
        key = str(self.target)
        with _HELD_LOCK:
            if _HELD.get(key) == threading.get_ident():
                raise RuntimeError(f"{self.target}: this thread already holds its write lock (nested write)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        said = 0.0
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as err:
                    if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                holder = self._describe(self._read_record(fd))
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise AtlasBusyError(
                        f"{self.target}: is being written by {holder}; wait for it to finish and run the command "
                        "again (a lock of a killed process is released automatically)"
                    )
                if now - said > 30:
                    log.warning("%s: waiting for %s to finish writing", self.target, holder)
                    said = now
                time.sleep(0.05 if deadline is not None and deadline - now < 1 else 0.2)
            record = self._read_record(fd)
            if record and record.get("state") == "held":
                self.previous = record  # its holder died without releasing: it crashed
            mine = {
                "pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.time(), "state": "held",
            }  # fmt: skip
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(mine).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        with _HELD_LOCK:
            _HELD[key] = threading.get_ident()
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with _HELD_LOCK:
            _HELD.pop(str(self.target), None)
        try:
            os.ftruncate(fd, 0)
        except OSError:  # pragma: no cover - e.g. a full or read-only filesystem: the unlock below still counts
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def held_by_other(self) -> dict[str, Any] | None:
        """Without taking it: the live holder's record, or None when the lock is free."""
        if not self.path.exists():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return self._read_record(fd) or {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
