"""Errors raised by the store layer. Every message names the file, batch, gene or dtype at fault."""

from __future__ import annotations


class ScalexError(Exception):
    """Base class of scalex-scale's own errors."""


class InputError(ScalexError, ValueError):
    """An input (file, AnnData, matrix) cannot be ingested as given."""


class AtlasFormatError(ScalexError):
    """A path is not a scalex-scale atlas, or was written by an unknown format version."""


class PreprocessError(ScalexError, ValueError):
    """Preprocessing cannot proceed (e.g. a batch has no cells left after filtering)."""
