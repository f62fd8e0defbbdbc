"""``ss.evaluate``: an atlas' integration scored (metrics table + JSON) and, with the ``plot`` extra, plotted.

The scores themselves (arrays in, numbers out) are :func:`scalex_scale.metrics.evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..store import Atlas
from .transfer import _labels, _latent

log = logging.getLogger(__name__)


#: For each score: which way is better and its range (the table prints both; a raw LISI next to its scaled
#: value reads as a contradiction otherwise).
METRIC_SCALES: dict[str, tuple[str, str]] = {
    "batch_entropy_mixing": ("higher", "0..ln 2 (0.69)"),
    "batch_entropy_mixing_normalized": ("higher", "0..1"),
    "silhouette": ("higher", "-1..1"),
    "ilisi": ("higher", "0..1"),
    "ilisi_raw": ("higher", "1..#batches"),
    "clisi": ("higher", "0..1"),
    "clisi_raw": ("lower", "1..#types"),
    "kbet": ("higher", "0..1"),
    "kbet_per_label": ("higher", "0..1"),
    "graph_connectivity": ("higher", "0..1"),
    "isolated_labels_asw": ("higher", "0..1"),
    "batch_asw": ("higher", "0..1"),
    "transfer_ARI": ("higher", "-0.5..1"),
    "transfer_NMI": ("higher", "0..1"),
}
#: Scores that need only the batches (computed without --label-key).
BATCH_ONLY = ("ilisi", "kbet")


def _scale(name: str) -> tuple[str, str]:
    if name.startswith("transfer_f1") or name.startswith("transfer_F1"):
        return "higher", "0..1"
    return METRIC_SCALES.get(name, ("", ""))


@dataclass
class EvaluationReport:
    """Scores (``metrics``), per-step seconds, the label-transfer confusion when there is one, and the scores
    that could not be computed (``not_computed``: name -> why)."""

    n_cells: int
    metrics: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    confusion: pd.DataFrame | None = None
    files: list[str] = field(default_factory=list)
    not_computed: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        width = max((len(k) for k in self.metrics), default=10)
        lines = [f"{'metric':<{width}}  value   better  range", f"{'-' * width}  ------  ------  -----"]
        for k, v in self.metrics.items():
            better, span = _scale(k)
            value = f"{v:.4f}" if v == v else "n/a"
            lines.append(f"{k:<{width}}  {value:<6}  {better:<6}  {span}".rstrip())
        lines.append(f"({self.n_cells:,} cells)")
        reasons: dict[str, list[str]] = {}
        for name, why in self.not_computed.items():
            reasons.setdefault(why, []).append(name)
        lines += [f"not computed: {', '.join(names)}: {why}" for why, names in reasons.items()]
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
    config = config or EvaluateConfig()
    n_batches = len(set(batches[ok]))
    if label_key is not None:
        labels = _labels(atlas, label_key).astype(str).to_numpy()
        _scores(report, latent[ok], batches[ok], labels[ok], config, seed, evaluate_arrays)
        transferred = atlas.obs_column(f"{label_key}_transfer")
        if transferred is not None:
            pred = pd.Series(transferred).astype(object)
            q = pred.notna().to_numpy() & ok
            if q.any():
                t, p = labels[q], pred[q].astype(str).to_numpy()
                report.metrics.update({"transfer_ARI": ari(t, p), "transfer_NMI": nmi(t, p)})
                report.metrics.update({f"transfer_{k}": v for k, v in f1_scores(t, p).items()})
                report.confusion = confusion_percent(t, p)
        else:
            report.not_computed["transfer_*"] = f"no obs['{label_key}_transfer']: run `scalex-scale transfer {store} --label-key {label_key}` first"
    elif n_batches > 1:
        report.metrics["batch_entropy_mixing"] = batch_entropy_mixing_score(latent[ok], batches[ok], rng=seed)
        batch_only = dataclasses.replace(config, metrics=tuple(m for m in config.metrics if m in BATCH_ONLY))
        _scores(report, latent[ok], batches[ok], np.zeros(int(ok.sum()), dtype=np.int8), batch_only, seed, evaluate_arrays)
    if label_key is None:
        why = f"they need cell types: pass --label-key COLUMN (`scalex-scale info {store}` lists the obs columns)"
        done = set(report.metrics)
        report.not_computed.update({m: why for m in config.metrics if m not in done and m not in BATCH_ONLY})
        if n_batches < 2:
            report.not_computed.update({m: "batch mixing needs at least two batches" for m in ("batch_entropy_mixing", *BATCH_ONLY)})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        scales = {k: dict(zip(("better", "range"), _scale(k), strict=True)) for k in report.metrics}
        (out / "metrics.json").write_text(json.dumps({"n_cells": report.n_cells, "metrics": report.metrics, "scales": scales, "not_computed": report.not_computed, "seconds": report.seconds}, indent=2, default=float))
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
            t0 = time.perf_counter()
            log.info("evaluate: %splots of %s cells -> %s ...", "UMAP and " if umap else "", f"{report.n_cells:,}", out)
            report.files += write_plots(out, latent[ok], batches[ok], None if labels_all is None else labels_all[ok],
                                        report.confusion, projected=projected, umap=umap, seed=seed)  # fmt: skip
            log.info("evaluate: plots done in %.1f s", time.perf_counter() - t0)
    return report


def _scores(report: EvaluationReport, latent, batches, labels, config, seed: int, evaluate_arrays) -> None:
    """Run the metrics with one progress line before and one per step (the slow ones take tens of seconds)."""
    if not config.metrics:
        return
    log.info(
        "evaluate: %s on %s cells (the first run also compiles the numba kernels) ...",
        ", ".join(config.metrics), f"{latent.shape[0]:,}",
    )  # fmt: skip
    res = evaluate_arrays(latent, batches, labels, config=config, rng=seed,
                          on_step=lambda name, dt: log.log(logging.INFO if dt >= 1.0 else logging.DEBUG,
                                                           "evaluate:   %s %.1f s", name, dt))  # fmt: skip
    report.metrics.update(res.scores)
    report.seconds.update(res.seconds)
