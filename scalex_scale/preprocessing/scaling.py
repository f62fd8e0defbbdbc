"""Which MaxAbs scales which cells: the one scaling rule, for training, ``embed`` and ``project``.

The rule (DESIGN.md, "Scaling rule"):

- A batch that preprocessing saw (``state.batches``) is scaled with the MaxAbs preprocessing computed: its own
  with ``scale="batch"`` (the paper), the atlas' global one with ``scale="global"``.
- A batch added by ``project`` is scaled with the MaxAbs of the cells that ``project`` call brought, as the method
  projects new data ("scaled with their own MaxAbs scaler"): per new batch with ``scale="batch"``, over all the
  call's cells with ``scale="global"``. Either way the values are recorded under each new batch's name in the
  atlas state (``projection.maxabs``), so ``embed`` run later scales those cells exactly as ``project`` did.
- Any other batch (ingested after preprocessing and never projected) has no scale: embedding it raises.

:func:`maxabs_rows` turns the rule into one MaxAbs row per atlas batch code; :func:`projection_maxabs` computes
the record of a ``project`` call. No torch here: the model side only receives the scaled rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from ..errors import PreprocessError
from ..store.atlas import Atlas
from .runner import DaskRunner, atlas_ranges
from .state import PreprocessState
from .stats import MaxAbsStats
from .transform import maxabs_chunk

__all__ = ["maxabs_rows", "projection_maxabs"]


def maxabs_rows(atlas: Atlas, state: PreprocessState, projection: Mapping[str, Sequence[float]] | None = None) -> NDArray[np.float32]:
    """``(n_atlas_batches, n_features)``: the MaxAbs that scales each atlas batch (indexed by batch code).

    ``projection`` is the atlas state's ``projection.maxabs`` record (batch name -> MaxAbs). A batch neither
    preprocessed nor projected raises :class:`~scalex_scale.errors.PreprocessError`.
    """
    preprocessed = set(state.batches)
    own = state.maxabs_matrix()
    rows, missing = [], []
    for name in atlas.batch_categories:
        if name in preprocessed:
            rows.append(own[0] if state.scale == "global" else own[state.batches.index(name)])
        elif projection is not None and name in projection:
            rows.append(np.asarray(projection[name], dtype=np.float32))
        else:
            missing.append(name)
    if missing:
        raise PreprocessError(
            f"{atlas.path}: batches {missing} were added after preprocessing and never projected; "
            "embed them with `scalex-scale project` (which computes their own MaxAbs)"
        )
    if not rows:
        return np.zeros((0, state.n_features), dtype=np.float32)
    return np.stack(rows).astype(np.float32, copy=False)


def projection_maxabs(
    atlas: Atlas, state: PreprocessState, rows: tuple[int, int], batches: Sequence[str], n_workers: int
) -> dict[str, list[float]]:
    """The ``projection.maxabs`` record of new batches: their own MaxAbs from atlas rows ``[start, stop)``.

    Per batch with ``scale="batch"``; with ``scale="global"`` one MaxAbs over all those rows, recorded under every
    new batch's name.
    """
    names = atlas.batch_categories
    group = {names.index(b): i for i, b in enumerate(batches)}
    lut = np.zeros(len(names), dtype=np.int64)
    for code, g in group.items():
        lut[code] = g
    n_groups = 1 if state.scale == "global" else len(batches)
    runner = DaskRunner(str(atlas.directory), atlas_ranges(atlas.row_ranges(), *rows), lut[atlas.batch_codes], n_workers=n_workers)
    acc, _ = runner.fold(
        lambda x, c, into: maxabs_chunk(x, c, state, n_groups, into=into),
        lambda: MaxAbsStats.empty(n_groups, state.n_features),
    )
    if state.scale == "global":
        return {b: acc.max_abs[0].tolist() for b in batches}
    return {b: acc.max_abs[i].tolist() for i, b in enumerate(batches)}
