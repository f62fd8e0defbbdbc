"""A regular install ships every subpackage (pyproject lists them explicitly; a missing one breaks `pip install .`)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "scalex_scale").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    found |= {"scalex_scale.kernels"} if (ROOT / "kernels" / "__init__.py").exists() else set()
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"
    assert config["package-dir"]["scalex_scale.kernels"] == "kernels"
