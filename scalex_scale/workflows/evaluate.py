"""``ss.evaluate``: an atlas' integration scored (metrics table + JSON) and, with the ``plot`` extra, plotted.

The scores themselves (arrays in, numbers out) are :func:`scalex_scale.metrics.evaluate`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..store import Atlas
from .transfer import _labels, _latent

log = logging.getLogger(__name__)


@dataclass
class EvaluationReport:
    """Scores (``metrics``), per-step seconds, and the label-transfer confusion when there is one."""

    n_cells: int
    metrics: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    confusion: pd.DataFrame | None = None
    files: list[str] = field(default_factory=list)

    def table(self) -> str:
        width = max((len(k) for k in self.metrics), default=10)
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
        lines += [f"{k:<{width}}  {v:.4f}" if v == v else f"{k:<{width}}  n/a" for k, v in self.metrics.items()]
        lines.append(f"({self.n_cells:,} cells)")
        lines += [f"wrote {f}" for f in self.files]
        return "\n".join(lines)


def evaluate(
    store: str | Path,
    *,
    label_key: str | None = None,
    out: str | Path | None = None,
    umap: bool = True,
    seed: int = 0,
    config: Any = None,
) -> EvaluationReport:
    """Integration metrics on ``obsm['latent']`` (cells passing QC), with ``label_key`` as cell types.

    The paper's batch entropy mixing score (reference-compatible, max ln 2, and normalized) and silhouette, and
    the scIB-style iLISI/cLISI, kBET, graph connectivity, isolated-label ASW and batch ASW
    (:func:`scalex_scale.metrics.evaluate`). When ``obs['<label_key>_transfer']`` exists: ARI, NMI, F1 of the
    transferred labels on the query cells, and the confusion matrix. With ``out``: ``metrics.json``,
    ``confusion.csv`` and, when umap-learn and matplotlib are installed, PNG plots.
    """
    from ..metrics import EvaluateConfig, ari, batch_entropy_mixing_score, confusion_percent, f1_scores, nmi
    from ..metrics import evaluate as evaluate_arrays

    atlas = Atlas.open(store)
    latent = _latent(atlas)
    ok = np.isfinite(latent).all(axis=1)
    batches = np.asarray(atlas.batch.astype(str))
    report = EvaluationReport(int(ok.sum()), {})
    if label_key is not None:
        labels = _labels(atlas, label_key).astype(str).to_numpy()
        res = evaluate_arrays(latent[ok], batches[ok], labels[ok], config=config or EvaluateConfig(), rng=seed)
        report.metrics.update(res.scores)
        report.seconds.update(res.seconds)
        transferred = atlas.obs_column(f"{label_key}_transfer")
        if transferred is not None:
            pred = pd.Series(transferred).astype(object)
            q = pred.notna().to_numpy() & ok
            if q.any():
                t, p = labels[q], pred[q].astype(str).to_numpy()
                report.metrics.update({"transfer_ARI": ari(t, p), "transfer_NMI": nmi(t, p)})
                report.metrics.update({f"transfer_{k}": v for k, v in f1_scores(t, p).items()})
                report.confusion = confusion_percent(t, p)
    elif len(set(batches[ok])) > 1:
        report.metrics["batch_entropy_mixing"] = batch_entropy_mixing_score(latent[ok], batches[ok], rng=seed)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"n_cells": report.n_cells, "metrics": report.metrics, "seconds": report.seconds}, indent=2, default=float))
        report.files.append(str(out / "metrics.json"))
        if report.confusion is not None:
            report.confusion.to_csv(out / "confusion.csv")
            report.files.append(str(out / "confusion.csv"))
        try:
            from .plots import write_plots
        except ImportError as err:
            log.warning("plots skipped (%s): pip install 'scalex-scale[plot]'", err)
        else:
            labels_all = _labels(atlas, label_key).astype(str).to_numpy() if label_key else None
            projected = sorted((atlas.state.get("projection") or {}).get("maxabs", {}))
            report.files += write_plots(out, latent[ok], batches[ok], None if labels_all is None else labels_all[ok],
                                        report.confusion, projected=projected, umap=umap, seed=seed)  # fmt: skip
    return report
