"""Keyword shortcuts for fields of option dataclasses (``preprocess(store, min_features=300)`` for
``preprocess(store, PreprocessConfig(min_features=300))``): the one rule that routes them and refuses the rest."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any


def field_names(cls: type, *, exclude: Collection[str] = ()) -> frozenset[str]:
    """The field names of dataclass ``cls`` less ``exclude``."""
    return frozenset(f.name for f in dataclasses.fields(cls)) - frozenset(exclude)


def split_shortcuts(function: str, given: Mapping[str, Any], *groups: Collection[str]) -> list[dict[str, Any]]:
    """``given`` split into one dict per group of names (the groups are disjoint); a TypeError naming ``function``
    and every name that belongs to no group, as Python's own for an unknown keyword."""
    unknown = sorted(set(given).difference(*groups))
    if unknown:
        raise TypeError(f"{function}() got unexpected options {unknown}")
    return [{k: v for k, v in given.items() if k in group} for group in groups]
