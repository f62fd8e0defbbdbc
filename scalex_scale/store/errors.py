"""Errors raised by the store layer (defined in :mod:`scalex_scale.errors`)."""

from __future__ import annotations

from ..errors import (
    AtlasBusyError,
    AtlasFormatError,
    ConflictError,
    DuplicateError,
    InputError,
    PreprocessError,
    ScalexError,
)

__all__ = [
    "AtlasBusyError", "AtlasFormatError", "ConflictError", "DuplicateError", "InputError", "PreprocessError",
    "ScalexError",
]  # fmt: skip
