"""numba's cache lives outside the installed package (a regular install followed by an editable one must work)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import scalex_scale


def test_numba_cache_goes_to_the_user_cache_not_the_package(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "SCALEX_SCALE_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = (
        "import numpy as np, numba, scalex_scale.metrics._utils;"  # numba imported first: our config still wins
        "from scalex_scale.preprocessing import kernels as K;"
        "print(numba.config.CACHE_DIR)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cache = Path(out.stdout.strip())
    assert cache == tmp_path / "scalex-scale" / "numba"
    package = Path(scalex_scale.__file__).parent
    assert list(cache.rglob("*.nbi")), "the kernels were cached there"
    assert package not in cache.parents


def test_an_explicit_numba_cache_dir_wins(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "mine")}
    out = subprocess.run([sys.executable, "-c", "import scalex_scale, numba; print(numba.config.CACHE_DIR)"],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == str(tmp_path / "mine")
