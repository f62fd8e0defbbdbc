"""The commit protocol: every write to an atlas is one transaction.

1. **Lock.** The writer takes the atlas' writer lock (:mod:`scalex_scale._lock`): one writer at a time, a dead
   holder's lock is free at once, a live holder is waited for.
2. **Recover.** Under the lock, whatever an earlier crashed writer left is finished or discarded: an interrupted
   two-rename publish is rolled forward, orphaned working copies, superseded copies and spill files are removed
   (they are referenced by no commit), and so are read pins of dead local processes.
3. **Work aside.** The transaction works on a private copy ``.ATLAS.txn-<id>`` beside the atlas: hard links of the
   committed files (copy-on-write: Zarr replaces a file by rename, never writes into it, so the committed files
   are never touched), plus everything the command writes. Readers keep seeing the last commit.
4. **Commit.** The state's ``generation`` is bumped and the command recorded, metadata consolidated, every
   written file fsynced, and the copy published in one atomic step (:func:`scalex_scale._fs.publish_dir`: rename
   for a new atlas, ``renameat2(RENAME_EXCHANGE)`` to swap with the existing one). The superseded copy is then
   removed (a crash here leaves only an orphan, removed by the next writer).

Any exception before the publish (a bad input, Ctrl-C, a full disk) discards the copy: the atlas is exactly as it
was. A crash (``kill -9``) before the publish leaves the atlas exactly as it was plus an orphan; after it, exactly
as the command leaves it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zarr.storage import LocalStore

from .._faults import point
from .._fs import complete_publish, fsync_files, link_tree, publish_dir, remove_tree, sibling
from .._lock import WriterLock, lock_path, pid_alive
from .errors import AtlasFormatError

log = logging.getLogger("scalex_scale")

#: Temporaries beside an atlas that only a writer creates (any of them is an orphan when we hold the lock).
ORPHAN_TAGS = ("txn", "old", "spill", "tmp", "new")
PIN_TAG = "pin"
#: Commits kept in the state's history.
HISTORY = 100


class TxnStore(LocalStore):
    """A Zarr ``LocalStore`` for a transaction's private copy.

    Every set/delete is a fault point; written keys are remembered (fsynced at commit); writes in flight are
    counted, so that an abort can close the store and wait for them before removing the copy (Zarr writes chunks
    concurrently: when one fails, others may still be running and would re-create the deleted directory).
    """

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.written: set[str] = set()
        self._state = {"in_flight": 0, "closed": False}
        self._guard = threading.Lock()

    def with_read_only(self, read_only: bool = False) -> TxnStore:
        other = type(self)(self.root, read_only=read_only)
        other.written, other._state, other._guard = self.written, self._state, self._guard
        return other

    def _enter(self, op: str, key: str) -> None:
        with self._guard:
            if self._state["closed"]:
                raise AtlasFormatError(f"{self.root}: the transaction was aborted")
            self._state["in_flight"] += 1
        try:
            point(op, key)
        except BaseException:
            self._leave()
            raise

    def _leave(self) -> None:
        with self._guard:
            self._state["in_flight"] -= 1

    def close_and_drain(self, timeout: float = 30.0) -> None:
        """Refuse new writes and wait for those in flight (so nothing re-creates the copy after an abort)."""
        with self._guard:
            self._state["closed"] = True
        deadline = time.monotonic() + timeout
        while self._state["in_flight"] > 0 and time.monotonic() < deadline:
            time.sleep(0.005)

    async def set(self, key: str, value: Any) -> None:
        self._enter("zarr.set", key)
        try:
            self.written.add(key)
            await super().set(key, value)
        finally:
            self._leave()

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        self._enter("zarr.set", key)
        try:
            self.written.add(key)
            await super().set_if_not_exists(key, value)
        finally:
            self._leave()

    def set_sync(self, key: str, value: Any) -> None:
        self._enter("zarr.set", key)
        try:
            self.written.add(key)
            super().set_sync(key, value)
        finally:
            self._leave()

    async def delete(self, key: str) -> None:
        self._enter("zarr.delete", key)
        try:
            await super().delete(key)
        finally:
            self._leave()

    def delete_sync(self, key: str) -> None:
        self._enter("zarr.delete", key)
        try:
            super().delete_sync(key)
        finally:
            self._leave()

    async def delete_dir(self, prefix: str) -> None:
        self._enter("zarr.delete", prefix)
        try:
            await super().delete_dir(prefix)
        finally:
            self._leave()


def temporaries(target: Path) -> list[tuple[str, Path]]:
    """``(tag, path)`` of the hidden temporaries beside ``target`` (``.NAME.TAG-<id>``)."""
    out = []
    prefix = f".{target.name}."
    try:
        entries = list(target.parent.iterdir())
    except FileNotFoundError:
        return []
    for p in entries:
        if p.name.startswith(prefix):
            tag = p.name[len(prefix) :].split("-", 1)[0]
            if tag in ORPHAN_TAGS or tag == PIN_TAG:
                out.append((tag, p))
    return out


def _pin_owner_dead(path: Path) -> bool:
    """A pin is named ``.NAME.pin-<host>-<pid>-<id>``; removable when its process on this host is gone."""
    parts = path.name.rsplit("-", 2)
    if len(parts) != 3:
        return True
    head, pid, _ = parts
    host = head.split(".pin-", 1)[-1]
    try:
        return host == socket.gethostname() and not pid_alive(int(pid))
    except ValueError:
        return True


def recover(target: Path) -> list[str]:
    """Finish or discard what crashed writers left beside ``target``. Call only while holding its lock."""
    done = []
    if complete_publish(target):
        done.append("completed an interrupted publish")
    for tag, p in temporaries(target):
        if tag == PIN_TAG and not _pin_owner_dead(p):
            continue
        remove_tree(p)
        done.append(f"removed {p.name}")
    return done


class Transaction:
    """``with Transaction(path, "append") as txn:`` work on ``txn.atlas``; committed when the block exits normally.

    Parameters
    ----------
    path
        The atlas. If it does not exist (checked under the lock), the transaction creates it: ``txn.is_new`` is
        True and the caller makes the atlas with ``txn.create(var_names)``.
    command
        What is being done (recorded in the state's history and shown to waiting writers).
    lock_timeout
        Seconds to wait for another writer (None: as long as it takes; 0: fail at once).
    """

    def __init__(self, path: str | os.PathLike[str], command: str, *, lock_timeout: float | None = None) -> None:
        self.path = Path(path)
        self.command = command
        self.lock = WriterLock(self.path, command, timeout=lock_timeout)
        self.work = sibling(self.path, "txn")
        self.store: TxnStore | None = None
        self.is_new = False
        self._atlas: Any = None
        self.recovered: list[str] = []
        self.committed = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Transaction:
        self.lock.acquire()
        try:
            self.recovered = recover(self.path)
            if self.recovered:
                who = self.lock.previous
                by = f" after an interrupted `{who.get('command')}` (pid {who.get('pid')})" if who else ""
                log.info("%s: cleaned up%s: %s", self.path, by, "; ".join(self.recovered))
            self.is_new = not self.path.exists()
            if not self.is_new:
                from .atlas import Atlas

                Atlas.open(self.path)  # refuse non-atlases before copying anything
                link_tree(self.path, self.work)
                self.store = TxnStore(self.work)
        except BaseException:
            remove_tree(self.work)
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                try:
                    self.commit()
                except BaseException:
                    if not self.committed:
                        self.abort()
                    raise
            else:
                self.abort()
        finally:
            self.lock.release()

    @property
    def atlas(self):
        """The atlas being written (a writable view of the private copy)."""
        from .atlas import Atlas

        if self._atlas is None:
            if self.store is None:
                raise AtlasFormatError(f"{self.path}: does not exist yet (create it first)")
            self._atlas = Atlas._from_directory(self.path, self.work, store=self.store)
        return self._atlas

    def create(self, var_names: Sequence[str]):
        """Make the new atlas (0 cells, these genes) in the private copy; returns it."""
        from .atlas import Atlas

        if not self.is_new or self.store is not None:
            raise AtlasFormatError(f"{self.path}: exists already")
        self.store = TxnStore(self.work)
        self._atlas = Atlas._create(self.path, self.work, self.store, var_names)
        return self._atlas

    def commit(self) -> None:
        if self.store is None:
            remove_tree(self.work)
            return
        atlas = self.atlas
        state = atlas.state
        generation = int(state.get("generation", 0)) + 1
        history = list(state.get("history", []))[-(HISTORY - 1) :]
        history.append({"generation": generation, "command": self.command, "time": time.time()})
        state.update(generation=generation, history=history)
        atlas.write_state(state)
        atlas.flush_state()
        atlas.consolidate()
        for dirpath, _, files in os.walk(self.work):
            for name in files:
                if name.endswith(".partial"):
                    os.unlink(os.path.join(dirpath, name))
        fsync_files(self.work, self.store.written)
        old = publish_dir(self.work, self.path)
        self.committed = True
        if old is not None:
            try:
                remove_tree(old)
            except Exception as err:  # noqa: BLE001 - the commit stands; the next writer removes the orphan
                log.warning("%s: could not remove the superseded copy %s (%s)", self.path, old, err)

    def abort(self) -> None:
        try:
            if self.store is not None:
                self.store.close_and_drain()
            remove_tree(self.work)
        except BaseException:  # noqa: BLE001 - an orphan is removed by the next writer
            pass


@contextmanager
def transaction(path: str | os.PathLike[str], command: str, *, lock_timeout: float | None = None) -> Iterator[Transaction]:
    """Context-manager form of :class:`Transaction`."""
    with Transaction(path, command, lock_timeout=lock_timeout) as txn:
        yield txn


# ---------------------------------------------------------------------- read pins
def _generation(path: Path) -> Any:
    from .atlas import Atlas

    return Atlas.open(path).state.get("generation")


@contextmanager
def pinned(path: str | os.PathLike[str], subpaths: Sequence[str]) -> Iterator[Path]:
    """A private, frozen copy of parts of the committed atlas for a long reader (e.g. ``fit``'s training matrix).

    Hard links, so it is cheap and costs no space; a later commit cannot change it. Taken without the lock: the
    copy is retried until the atlas' generation is the same before and after linking (no commit in between).
    Removed on exit; a pin left by a killed process is removed by the next writer on the same host.
    """
    path = Path(path)
    pin = path.with_name(f".{path.name}.{PIN_TAG}-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}")
    for attempt in range(50):
        before = _generation(path)
        try:
            for sub in subpaths:
                link_tree(path / sub, pin / sub)
            if _generation(path) == before:
                break
        except FileNotFoundError:
            pass
        shutil.rmtree(pin, ignore_errors=True)
        time.sleep(0.05 * attempt)
    else:  # pragma: no cover - 50 commits in a row while pinning
        raise AtlasFormatError(f"{path}: changed too often while taking a read snapshot; try again")
    try:
        yield pin
    finally:
        shutil.rmtree(pin, ignore_errors=True)


__all__ = ["Transaction", "TxnStore", "lock_path", "pinned", "recover", "temporaries", "transaction"]
