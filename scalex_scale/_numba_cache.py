"""Where numba keeps the compiled kernels of ``@numba.njit(cache=True)``: outside the installed package.

By default numba writes its cache into ``__pycache__`` beside each source file, i.e. into
``site-packages/scalex_scale/**`` for a regular install. Those files outlive ``pip uninstall`` (pip removes only
what it installed), so a later editable install of the same package is shadowed by the leftover directory. The
cache goes to ``$SCALEX_SCALE_CACHE_DIR/numba``, default ``$XDG_CACHE_HOME/scalex-scale/numba``
(``~/.cache/scalex-scale/numba``), unless the user set ``NUMBA_CACHE_DIR`` themselves. Imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("SCALEX_SCALE_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "numba"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "scalex-scale" / "numba"


def configure() -> None:
    """Point numba's cache at :func:`cache_dir` (before any of our kernels is decorated)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    path = str(cache_dir())
    os.environ["NUMBA_CACHE_DIR"] = path
    numba = sys.modules.get("numba")
    if numba is not None:  # imported before us: its config was read already, set it there too
        numba.config.CACHE_DIR = path
