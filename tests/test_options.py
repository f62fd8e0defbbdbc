"""_options: keyword shortcuts go to their option dataclass; an unknown one is a TypeError naming the function."""

from __future__ import annotations

import pytest

from scalex_scale._options import field_names, split_shortcuts
from scalex_scale.preprocessing.runner import ComputeOptions
from scalex_scale.preprocessing.state import PreprocessConfig


def test_shortcuts_are_routed_and_unknown_ones_named():
    config, compute = field_names(PreprocessConfig), field_names(ComputeOptions)
    a, b = split_shortcuts("preprocess", {"min_features": 300, "n_workers": 2}, config, compute)
    assert a == {"min_features": 300} and b == {"n_workers": 2}
    with pytest.raises(TypeError, match=r"preprocess\(\) got unexpected options \['bogus', 'nope'\]"):
        split_shortcuts("preprocess", {"nope": 1, "min_features": 1, "bogus": 2}, config, compute)
    assert "profile" not in field_names(PreprocessConfig, exclude={"profile"})
