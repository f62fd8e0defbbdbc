"""The atlas store: an AnnData Zarr store with scalex-scale's versioned state. Never imports torch.

Every write is a transaction (:mod:`.txn`): a writer lock, a private copy, one atomic publish.
"""

from .atlas import FORMAT_VERSION, Atlas
from .check import CheckReport, check
from .errors import (
    AtlasBusyError,
    AtlasFormatError,
    ConflictError,
    DuplicateError,
    InputError,
    PreprocessError,
    ScalexError,
)
from .ingest import AppendOptions, IngestReport, append, ingest
from .readers import InputSource, from_chunks, open_input
from .readers_soma import open_soma
from .txn import Transaction, pinned, transaction

__all__ = [
    "FORMAT_VERSION",
    "AppendOptions",
    "Atlas",
    "AtlasBusyError",
    "CheckReport",
    "AtlasFormatError",
    "ConflictError",
    "DuplicateError",
    "IngestReport",
    "InputError",
    "InputSource",
    "PreprocessError",
    "ScalexError",
    "Transaction",
    "append",
    "check",
    "from_chunks",
    "ingest",
    "open_input",
    "pinned",
    "transaction",
    "open_soma",
]
