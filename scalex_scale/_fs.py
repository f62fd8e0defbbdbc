"""Filesystem primitives of the commit protocol (used by the atlas store and by checkpoints).

- :func:`link_tree`: a copy-on-write working copy of a directory (hard links; Zarr replaces files by rename,
  never writes into an existing inode, so the committed copy is never touched). Falls back to copying where hard
  links are not supported.
- :func:`publish_dir`: make a finished working copy the directory's content in one atomic step: a plain rename
  for a new directory; ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15; ext4, xfs, btrfs, tmpfs) to swap it with the
  existing one; elsewhere two renames guarded by an intent file that :func:`complete_publish` rolls forward.
- :func:`fsync_files`: durability of what a transaction wrote, before it is published.

Every step that changes the filesystem is a fault-injection point (:mod:`scalex_scale._faults`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from ._faults import point

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: Set to "0" to skip fsync (scratch atlases, tests); durability against power loss is then not guaranteed.
FSYNC = os.environ.get("SCALEX_SCALE_FSYNC", "1") != "0"
#: Tests set this to exercise the two-rename fallback where renameat2 exists.
_FORCE_FALLBACK = os.environ.get("SCALEX_SCALE_NO_EXCHANGE", "0") == "1"

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = getattr(_libc, "renameat2", None)
except OSError:  # pragma: no cover - not a glibc system
    _renameat2 = None


def sibling(path: Path, tag: str) -> Path:
    """A hidden sibling of ``path`` for temporaries: ``.NAME.TAG-<random>`` (same filesystem, so renames work)."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def intent_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.commit")


def link_tree(src: Path, dst: Path, *, skip_suffix: str = ".partial") -> int:
    """Hard-link every file of ``src`` into a new directory ``dst`` (copies where links fail). Returns files."""
    point("link_tree", str(dst))
    n = 0
    copy = False
    for dirpath, _dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = dst if rel == "." else dst / rel
        target.mkdir(parents=True, exist_ok=rel != ".")
        for name in filenames:
            if name.endswith(skip_suffix):
                continue
            s, d = os.path.join(dirpath, name), target / name
            if not copy:
                try:
                    os.link(s, d)
                    n += 1
                    continue
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
                        raise
                    copy = True  # this filesystem cannot link: copy the rest
            shutil.copy2(s, d)
            n += 1
    return n


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False when the system or filesystem cannot."""
    if _renameat2 is None or _FORCE_FALLBACK:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(work: Path, target: Path) -> Path | None:
    """Make ``work`` the content of ``target`` atomically. Returns the superseded copy to remove (or None).

    Readers see ``target`` either before or after; never a mix. On filesystems without an atomic exchange there is
    a moment when ``target`` is missing: an intent file names both sides, and :func:`complete_publish` (run by the
    next reader or writer) finishes the job after a crash.
    """
    if not target.exists():
        point("publish.rename", str(target))
        os.rename(work, target)
        fsync_dir(target.parent)
        return None
    point("publish.exchange", str(target))
    if _exchange(work, target):
        fsync_dir(target.parent)
        return work
    old = sibling(target, "old")
    intent = intent_path(target)
    write_bytes_atomic(intent, json.dumps({"new": work.name, "old": old.name}).encode())
    point("publish.rename_old", str(target))
    os.rename(target, old)
    point("publish.rename_new", str(target))
    os.rename(work, target)
    fsync_dir(target.parent)
    point("publish.clear_intent", str(intent))
    intent.unlink()
    return old


def complete_publish(target: Path) -> bool:
    """Finish a two-rename publish interrupted by a crash (idempotent). Returns True if there was one."""
    intent = intent_path(target)
    if not intent.exists():
        return False
    try:
        record = json.loads(intent.read_text())
        new, old = target.with_name(record["new"]), target.with_name(record["old"])
    except (ValueError, KeyError, OSError):
        intent.unlink(missing_ok=True)  # torn intent: written before either rename, so nothing moved
        return True
    if not target.exists() and new.exists():
        point("recover.rename_new", str(target))
        os.rename(new, target)  # the old copy was moved aside: roll forward
    elif not target.exists() and old.exists():
        point("recover.rename_old", str(target))
        os.rename(old, target)  # pragma: no cover - cannot happen (new is renamed in before old is removed)
    point("recover.clear_intent", str(intent))
    intent.unlink(missing_ok=True)
    remove_tree(old)
    if new.exists() and target.exists():
        remove_tree(new)  # crashed before the first rename: the working copy was never published
    return True


def remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        point("remove_tree", str(path))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file by temporary file + fsync + rename: readers see the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.partial")
    point("write_file", str(path))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if FSYNC:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_files(root: Path, keys: Iterable[str]) -> None:
    """fsync the files ``root/key`` that exist, then their directories (no-op when ``SCALEX_SCALE_FSYNC=0``)."""
    if not FSYNC:
        return
    dirs = set()
    for key in keys:
        p = root / key
        try:
            fd = os.open(p, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(p.parent)
    for d in dirs:
        fsync_dir(d)


def fsync_dir(path: Path) -> None:
    if not FSYNC:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
