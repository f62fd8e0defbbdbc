"""The atlas store: an AnnData Zarr store with scalex-scale's versioned state. Never imports torch."""

from .atlas import FORMAT_VERSION, Atlas
from .errors import AtlasFormatError, InputError, PreprocessError, ScalexError
from .ingest import IngestReport, ingest
from .readers import InputSource, from_chunks, open_input
from .readers_soma import open_soma

__all__ = [
    "FORMAT_VERSION",
    "Atlas",
    "AtlasFormatError",
    "IngestReport",
    "InputError",
    "InputSource",
    "PreprocessError",
    "ScalexError",
    "from_chunks",
    "ingest",
    "open_input",
    "open_soma",
]
