"""``ss.integrate``: ingest, preprocess, fit and embed in one go (``OUTDIR/atlas.zarr`` + ``OUTDIR/model``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ScalexError, TrainingInterrupted
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

    def summary(self) -> str:
        """What was done, where things are, and what to run next (printed by ``scalex-scale integrate``)."""
        r, s, t = self.ingest, self.state, self.train
        lines = [
            f"integrated {r.n_cells_added:,} cells of {len(r.batches_added)} batches x {r.n_genes:,} genes",
            f"  preprocess: {s.n_cells_kept:,} cells pass QC, {s.n_features:,} features ({s.profile}, scale {s.scale})",
        ]
        lines += [f"    batch {b}: {k:,} of {n:,} cells pass QC ({n - k:,} removed)" for b, (n, k) in s.qc_cells.items()]
        stop = ", stopped early" if t.stopped_early else ""
        lines += [
            f"  fit: {t.n_iterations:,} iterations, {t.n_epochs:,} epochs in {t.seconds:.1f} s (best epoch loss "
            f"{t.best_loss:.4g}{stop})",
            f"  atlas: {self.atlas} (obsm['latent']: every cell passing QC)",
            f"  model: {self.model_dir}",
            "next:",
            f"  scalex-scale info {self.atlas}                         obs columns (for --label-key), batches, model",
            f"  scalex-scale evaluate {self.atlas} --label-key COLUMN --out {self.atlas.parent / 'report'}",
            f"  scalex-scale project {self.atlas} {self.model_dir} NEW.h5ad   add new studies without retraining",
        ]  # fmt: skip
        return "\n".join(lines)


def integrate(
    inputs: Sequence[Any],
    outdir: str | Path,
    *,
    batch_key: str | None = None,
    batch_names: Sequence[str] | None = None,
    join: str = "inner",
    train: Any = None,
    checkpoint_iterations: int = 5000,
    checkpoint_minutes: float = 5.0,
    **preprocess_options: Any,
) -> IntegrateResult:
    """Ingest, preprocess, fit and embed in one go; writes ``OUTDIR/atlas.zarr`` and ``OUTDIR/model``.

    ``preprocess_options`` are those of :func:`~scalex_scale.workflows.preprocess.preprocess` (config fields such as
    ``profile`` or ``n_top_features``, or ``config=PreprocessConfig(...)``); ``train`` a
    :class:`~scalex_scale.train.TrainConfig`; ``checkpoint_iterations``/``checkpoint_minutes`` those of
    :func:`~scalex_scale.workflows.fit.fit` (interrupted, it says how to resume the fit and embed after it).
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
    try:
        result = fit(atlas_path, model_dir, train, checkpoint_iterations=checkpoint_iterations,
                     checkpoint_minutes=checkpoint_minutes)  # fmt: skip
    except TrainingInterrupted as err:
        raise TrainingInterrupted(f"{err}; then: scalex-scale embed {atlas_path} {model_dir}", err.signum) from None
    embed(atlas_path, model_dir, device=train.device if train is not None else "auto")
    return IntegrateResult(atlas_path, model_dir, report, state, result)
