"""``ss.transfer``: label transfer on an atlas, reference cells' labels -> query cells, in the latent space.

The vote itself (arrays in, labels out) is :func:`scalex_scale.metrics.label_transfer.transfer_labels`.

The reference and the query are either batches of one atlas, or two stores: a query store written by
``project --query-store`` and the reference atlas it was projected against (``reference=``); the two latents must
come from the same model (checked against the model identity recorded at ``embed`` / ``project``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import ScalexError
from ..metrics.label_transfer import TransferConfig, transfer_labels
from ..store import Atlas, transaction
from ._model import check_same_model

UNASSIGNED = "unassigned"
Method = Literal["scalex", "knn5"]
METHODS = ("scalex", "knn5")


@dataclass(frozen=True)
class TransferSummary:
    """What :func:`transfer` did.

    ``counts``: query cells per transferred label (``unassigned`` included); ``unassigned_by_predicted``: per vote
    winner, the share of its cells called ``unassigned`` and how many they were; ``confusion`` (true label ->
    transferred label -> cells) and ``metrics`` (ARI, NMI, macro/weighted F1, accuracy, unassigned share) when the
    query cells carry true labels in the same obs column. ``diagnostics`` (``scalex`` method): the vote's ``k`` and
    its cross-validation scores, and per predicted type the margin level of the novelty call.
    """

    label_key: str
    method: str
    store: str
    reference: str
    reference_batches: list[str]
    query_batches: list[str]
    n_reference: int
    n_query: int
    counts: dict[str, int]
    unassigned_by_predicted: dict[str, dict[str, float]]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, dict[str, int]] | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    def summary(self) -> str:
        src = "" if self.reference == self.store else f" of {self.reference}"
        lines = [
            f"transferred '{self.label_key}' ({self.method}) from {self.n_reference:,} reference cells{src} to "
            f"{self.n_query:,} query cells",
            f"  written to obs['{self.label_key}_transfer'] and obs['{self.label_key}_transfer_confidence'] of {self.store}",
            f"  {'label':<24} {'cells':>10}   unassigned among its vote winners",
        ]
        for label, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            u = self.unassigned_by_predicted.get(label)
            lines.append(f"  {label:<24} {n:>10,}" + (f"   {100 * u['rate']:.1f}% of {int(u['n']):,}" if u else ""))
        if self.diagnostics.get("k"):
            lines.append(f"  vote: k = {self.diagnostics['k']}" + (" (cross-validated)" if self.diagnostics.get("cv_scores") else ""))
        if self.metrics:
            lines.append("  against the query's own labels: " + ", ".join(f"{k} {v:.3f}" for k, v in self.metrics.items()))
        return "\n".join(lines)


def _labels(atlas: Atlas, key: str, required: bool = True) -> pd.Series | None:
    values = atlas.obs_column(key)
    if values is None:
        if not required:
            return None
        raise ScalexError(f"{atlas.path}: no obs column {key!r} (columns: {', '.join(atlas.root['obs'].attrs.get('column-order', []))})")
    return pd.Series(pd.Categorical(values) if not isinstance(values, pd.Categorical) else values).astype(object)


def _latent(atlas: Atlas) -> np.ndarray:
    if "latent" not in atlas.obsm_keys():
        raise ScalexError(f"{atlas.path}: no obsm['latent']; run `scalex-scale embed` (or `project`) first")
    return np.asarray(atlas.root["obsm"]["latent"][:], dtype=np.float32)


def _has_label(labels: pd.Series) -> np.ndarray:
    return (labels.notna() & (labels.astype(str) != "nan")).to_numpy()


def _check_batches(atlas: Atlas, batches: Sequence[str] | None) -> None:
    names = atlas.batch_categories
    for b in batches or []:
        if b not in names:
            raise ScalexError(f"{atlas.path}: no batch {b!r} (batches: {', '.join(names)})")


def split_batches(
    atlas: Atlas, reference_batches: Sequence[str] | None, query_batches: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Reference batches default to those the model was trained on; query batches to all others."""
    names = atlas.batch_categories
    _check_batches(atlas, [*(reference_batches or []), *(query_batches or [])])
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
    reference: str | Path | None = None,
    reference_batches: Sequence[str] | None = None,
    query_batches: Sequence[str] | None = None,
    method: Method = "scalex",
    config: TransferConfig | None = None,
    seed: int = 0,
    lock_timeout: float | None = None,
) -> TransferSummary:
    """Transfer ``obs[label_key]`` from reference cells to query cells in the latent space.

    Parameters
    ----------
    store
        The atlas (reference and query batches in one store) or, with ``reference``, the query store (written by
        ``project --query-store``). The transferred labels are written here.
    label_key
        obs column holding the reference labels (and, when present on the query cells, their true labels).
    reference
        A separate reference atlas (labelled, embedded with the model the query store was projected with), only
        read. Default for a query store written by ``project --query-store``: the atlas it was projected against.
    reference_batches, query_batches
        Which batches are reference and query. One store: reference defaults to the batches the model was trained
        on, query to all others. Two stores: all batches of each.
    method
        ``"scalex"``: :func:`scalex_scale.metrics.label_transfer.transfer_labels` (weighted vote, ``unassigned`` for cells no
        reference type explains); ``"knn5"``: the reference package's rule, scikit-learn
        ``KNeighborsClassifier()`` (k = 5, uniform, never unassigned; confidence = the winner's vote share), as
        :func:`scalex_scale.metrics.label_transfer.knn_classifier_transfer`.
    config
        :class:`~scalex_scale.metrics.label_transfer.TransferConfig` of the ``"scalex"`` method (default: its defaults).
    seed
        Seed of approximate neighbour search (large atlases).

    Writes ``obs['<label_key>_transfer']`` (empty for non-query cells) and ``obs['<label_key>_transfer_confidence']``
    (NaN for non-query cells) to ``store``.
    """
    if method not in METHODS:
        raise ScalexError(f"unknown transfer method {method!r} (choose from {', '.join(METHODS)})")
    if reference is not None and Path(reference).resolve() == Path(store).resolve():
        raise ScalexError(f"{store}: --reference is the query store itself; drop --reference")
    with transaction(store, "transfer", lock_timeout=lock_timeout) as txn:
        if txn.is_new:
            raise ScalexError(f"{store}: no such atlas")
        target = txn.atlas
        if reference is None:
            reference = _recorded_reference(target)
        # the reference atlas is only read (its last commit, read-only); only the query store is written
        ref_atlas = target if reference is None else Atlas.open(reference)
        return _transfer(target, ref_atlas, label_key, reference_batches, query_batches, method, config, seed)


def _recorded_reference(target: Atlas) -> Path | None:
    """The reference atlas a query store was projected against (``project --query-store`` records it), when the
    store is such a query store and that atlas still exists."""
    if "preprocess" in target.state:  # an atlas of its own: its batches are reference and query
        return None
    recorded = (target.state.get("reference") or {}).get("atlas")
    if recorded and Path(recorded).exists():
        return Path(recorded)
    return None


def _transfer(
    target: Atlas, ref_atlas: Atlas, label_key: str, reference_batches: Sequence[str] | None,
    query_batches: Sequence[str] | None, method: str, config: TransferConfig | None, seed: int,
) -> TransferSummary:  # fmt: skip
    from ..metrics import ari, f1_scores, nmi

    if ref_atlas is target:
        ref_b, query_b = split_batches(target, reference_batches, query_batches)
    else:
        check_same_model((str(ref_atlas.path), ref_atlas.state), (str(target.path), target.state))
        _check_batches(ref_atlas, reference_batches)
        _check_batches(target, query_batches)
        ref_b = list(reference_batches or ref_atlas.batch_categories)
        query_b = list(query_batches or target.batch_categories)

    ref_latent = _latent(ref_atlas)
    q_latent = ref_latent if ref_atlas is target else _latent(target)
    ref_labels = _labels(ref_atlas, label_key)
    truth_all = ref_labels if ref_atlas is target else _labels(target, label_key, required=False)
    ref_batch = np.asarray(ref_atlas.batch.astype(str))
    ref = np.isfinite(ref_latent).all(axis=1) & np.isin(ref_batch, ref_b) & _has_label(ref_labels)
    query = np.isfinite(q_latent).all(axis=1) & np.isin(np.asarray(target.batch.astype(str)), query_b)
    if not ref.any():
        raise ScalexError(f"{ref_atlas.path}: no labelled, embedded reference cells in batches {ref_b}")
    if not query.any():
        raise ScalexError(f"{target.path}: no embedded query cells in batches {query_b}")
    ref_y = ref_labels[ref].astype(str).to_numpy()

    cfg = config or TransferConfig()
    if method == "scalex":
        result = transfer_labels(ref_latent[ref], ref_y, q_latent[query], cfg, ref_batches=ref_batch[ref], rng=seed)
        pred, predicted, confidence = result.labels, result.predicted, result.confidence
        unassigned = cfg.unassigned
        cfg_dict = cfg.to_dict()
        diagnostics = {"k": result.k, "cv_scores": result.cv_scores, "novelty_levels": result.levels}
    else:
        from sklearn.neighbors import KNeighborsClassifier

        # the fit of knn_classifier_transfer, kept to also read the vote shares
        clf = KNeighborsClassifier(n_neighbors=min(5, int(ref.sum()))).fit(ref_latent[ref], ref_y)
        pred = clf.predict(q_latent[query]).astype(object)
        predicted = pred
        confidence = clf.predict_proba(q_latent[query]).max(axis=1).astype(np.float32)
        unassigned = UNASSIGNED
        cfg_dict = {"k": 5, "weights": "uniform"}
        diagnostics = {}

    out = np.full(target.n_obs, None, dtype=object)
    out[query] = pred
    conf = np.full(target.n_obs, np.nan, dtype=np.float32)
    conf[query] = confidence
    target.write_obs_columns({f"{label_key}_transfer": pd.Categorical(out), f"{label_key}_transfer_confidence": conf})

    pred_s = pd.Series(pred, dtype=object).astype(str)
    counts = {str(k_): int(v) for k_, v in pred_s.value_counts().items()}
    won = pd.Series(predicted, dtype=object).astype(str)
    by_pred = {
        str(lab): {"rate": float((pred_s[won == lab] == unassigned).mean()), "n": int((won == lab).sum())}
        for lab in sorted(won.unique())
    }
    metrics: dict[str, float] = {}
    confusion = None
    if truth_all is not None:
        truth = truth_all[query]
        if _has_label(truth).all():
            t = truth.astype(str).to_numpy()
            p = pred_s.to_numpy()
            metrics = {"ARI": ari(t, p), "NMI": nmi(t, p), **f1_scores(t, p), "accuracy": float(np.mean(t == p)),
                       "unassigned": float(np.mean(p == unassigned))}  # fmt: skip
            table = pd.crosstab(pd.Series(t, name="true"), pd.Series(p, name="transferred"))
            confusion = {str(r): {str(c): int(v) for c, v in row.items() if v} for r, row in table.iterrows()}
    return TransferSummary(
        label_key=label_key, method=method, store=str(target.path), reference=str(ref_atlas.path),
        reference_batches=ref_b, query_batches=query_b, n_reference=int(ref.sum()), n_query=int(query.sum()),
        counts=counts, unassigned_by_predicted=by_pred, config=cfg_dict, metrics=metrics, confusion=confusion,
        diagnostics=diagnostics,
    )  # fmt: skip
