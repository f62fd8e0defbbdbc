"""``ss.integrate``: ingest, preprocess, fit and embed in one go (``OUTDIR/atlas.zarr`` + ``OUTDIR/model``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ScalexError
from ..preprocessing.state import PreprocessState
from ..store import IngestReport, ingest
from .embed import embed
from .fit import fit
from .preprocess import preprocess

__all__ = ["IntegrateResult", "integrate"]


@dataclass(frozen=True)
class IntegrateResult:
    atlas: Path
    model_dir: Path
    ingest: IngestReport
    state: PreprocessState
    train: Any


def integrate(
    inputs: Sequence[Any],
    outdir: str | Path,
    *,
    batch_key: str | None = None,
    batch_names: Sequence[str] | None = None,
    join: str = "inner",
    train: Any = None,
    **preprocess_options: Any,
) -> IntegrateResult:
    """Ingest, preprocess, fit and embed in one go; writes ``OUTDIR/atlas.zarr`` and ``OUTDIR/model``.

    ``preprocess_options`` are those of :func:`~scalex_scale.workflows.preprocess.preprocess` (config fields such as
    ``profile`` or ``n_top_features``, or ``config=PreprocessConfig(...)``); ``train`` a
    :class:`~scalex_scale.train.TrainConfig`.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    atlas_path, model_dir = outdir / "atlas.zarr", outdir / "model"
    if atlas_path.exists():
        raise ScalexError(f"{atlas_path} exists already; choose another --outdir or remove it")
    config = preprocess_options.get("config")
    profile = preprocess_options.get("profile") or (config.profile if config is not None else "RNA")
    report = ingest(atlas_path, inputs, batch_key=batch_key, batch_names=batch_names, join=join, profile=profile)
    state = preprocess(atlas_path, **preprocess_options)
    result = fit(atlas_path, model_dir, train)
    embed(atlas_path, model_dir, device=train.device if train is not None else "auto")
    return IntegrateResult(atlas_path, model_dir, report, state, result)
