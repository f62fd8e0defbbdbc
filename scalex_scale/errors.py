"""scalex-scale's own errors. Every message names the file, batch, gene or dtype at fault and what to do.

The command line prints them as one ``scalex-scale CMD: error: ...`` line (``--debug`` shows the traceback).
"""

from __future__ import annotations


class ScalexError(Exception):
    """Base class of scalex-scale's own errors."""


class InputError(ScalexError, ValueError):
    """An input (file, AnnData, matrix) cannot be ingested as given."""


class AtlasFormatError(ScalexError):
    """A path is not a scalex-scale atlas, was written by an unknown format version, or is damaged."""


class PreprocessError(ScalexError, ValueError):
    """Preprocessing cannot proceed (e.g. a batch has no cells left after filtering)."""


class AtlasBusyError(ScalexError):
    """Another live process holds the write lock (the message names it)."""


class DuplicateError(InputError):
    """The input's cells are already in the atlas (same names in the same batch, or the same source)."""


class ConflictError(ScalexError):
    """The atlas changed under a long-running command (e.g. re-preprocessed while ``fit`` trained)."""


class CheckpointError(ScalexError, ValueError):
    """A model directory is not a usable scalex-scale checkpoint (missing, damaged, or made for other data)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A model directory does not exist or holds no checkpoint."""
