"""``ss.transfer``: label transfer on an atlas, reference cells' labels -> query cells, in the latent space.

The vote itself (arrays in, labels out) is :func:`scalex_scale.metrics.label_transfer.transfer_labels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ScalexError
from ..metrics.label_transfer import transfer_labels
from ..store import Atlas, transaction

UNASSIGNED = "unassigned"


@dataclass(frozen=True)
class TransferSummary:
    """What :func:`transfer` did; ``metrics`` holds ARI/NMI/F1 when the query cells carry true labels."""

    label_key: str
    n_reference: int
    n_query: int
    counts: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"transferred '{self.label_key}' from {self.n_reference:,} reference cells to {self.n_query:,} query cells",
            f"  written to obs['{self.label_key}_transfer'] and obs['{self.label_key}_transfer_confidence']",
        ]
        lines += [f"  {label:<24} {n:>10,}" for label, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
        if self.metrics:
            lines.append("  against the query's own labels: " + ", ".join(f"{k} {v:.3f}" for k, v in self.metrics.items()))
        return "\n".join(lines)


def _labels(atlas: Atlas, key: str) -> pd.Series:
    values = atlas.obs_column(key)
    if values is None:
        raise ScalexError(f"{atlas.path}: no obs column {key!r} (columns: {', '.join(atlas.root['obs'].attrs.get('column-order', []))})")
    return pd.Series(pd.Categorical(values) if not isinstance(values, pd.Categorical) else values).astype(object)


def _latent(atlas: Atlas) -> np.ndarray:
    if "latent" not in atlas.obsm_keys():
        raise ScalexError(f"{atlas.path}: no obsm['latent']; run `scalex-scale embed` first")
    return np.asarray(atlas.root["obsm"]["latent"][:], dtype=np.float32)


def split_batches(
    atlas: Atlas, reference_batches: Sequence[str] | None, query_batches: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Reference batches default to those the model was trained on; query batches to all others."""
    names = atlas.batch_categories
    for b in [*(reference_batches or []), *(query_batches or [])]:
        if b not in names:
            raise ScalexError(f"{atlas.path}: no batch {b!r} (batches: {', '.join(names)})")
    if reference_batches is None:
        trained = (atlas.state.get("preprocess") or {}).get("batches", names)
        reference_batches = [b for b in names if b in trained and b not in (query_batches or [])]
    if query_batches is None:
        query_batches = [b for b in names if b not in reference_batches]
    if not query_batches:
        raise ScalexError(f"{atlas.path}: no query batches (all batches are reference); give --query-batches")
    return list(reference_batches), list(query_batches)


def transfer(
    store: str | Path,
    label_key: str,
    *,
    reference_batches: Sequence[str] | None = None,
    query_batches: Sequence[str] | None = None,
    k: int = 30,
    threshold: float = 0.5,
    seed: int = 0,
    lock_timeout: float | None = None,
) -> TransferSummary:
    """kNN label transfer in the latent space, with a confidence and an ``unassigned`` call.

    Writes ``obs['<label_key>_transfer']`` (the label, ``unassigned`` below ``threshold``; empty for non-query
    cells) and ``obs['<label_key>_transfer_confidence']`` (NaN for non-query cells). See
    :func:`scalex_scale.metrics.label_transfer.transfer_labels` for the vote, the confidence and the novelty check.
    """
    with transaction(store, "transfer", lock_timeout=lock_timeout) as txn:
        if txn.is_new:
            raise ScalexError(f"{store}: no such atlas")
        return _transfer(txn.atlas, label_key, reference_batches, query_batches, k, threshold, seed)


def _transfer(atlas: Atlas, label_key, reference_batches, query_batches, k, threshold, seed) -> TransferSummary:
    from ..metrics import ari, f1_scores, nmi

    latent = _latent(atlas)
    labels = _labels(atlas, label_key)
    ref_b, query_b = split_batches(atlas, reference_batches, query_batches)
    batch = np.asarray(atlas.batch.astype(str))
    ok = np.isfinite(latent).all(axis=1)
    ref = ok & np.isin(batch, ref_b) & labels.notna().to_numpy() & (labels.astype(str) != "nan").to_numpy()
    query = ok & np.isin(batch, query_b)
    if not ref.any():
        raise ScalexError(f"{atlas.path}: no labelled reference cells in batches {ref_b}")
    result = transfer_labels(latent[ref], labels[ref].astype(str).to_numpy(), latent[query], k=k, threshold=threshold, unassigned=UNASSIGNED, rng=seed)
    out = np.full(atlas.n_obs, None, dtype=object)
    out[query] = result.labels
    conf = np.full(atlas.n_obs, np.nan, dtype=np.float32)
    conf[query] = result.confidence
    atlas.write_obs_columns({f"{label_key}_transfer": pd.Categorical(out), f"{label_key}_transfer_confidence": conf})
    counts = pd.Series(result.labels).value_counts().to_dict()
    metrics = {}
    truth = labels[query]
    if truth.notna().all() and query.any():
        t, p = truth.astype(str).to_numpy(), result.labels.astype(str)
        metrics = {"ARI": ari(t, p), "NMI": nmi(t, p), **f1_scores(t, p)}
    return TransferSummary(label_key, int(ref.sum()), int(query.sum()), {str(k_): int(v) for k_, v in counts.items()}, metrics)
