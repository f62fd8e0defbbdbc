"""``scalex-scale check``: verify every invariant of an atlas, and repair what is provably safe to repair.

Errors mean the atlas is not what scalex-scale wrote (a damaged disk, a foreign tool, a bug); warnings are
garbage that does not affect the atlas (temporaries of a crashed writer) or derived data that is stale. Every
array is read in chunks, so checking a million-cell atlas needs no more memory than preprocessing it.

Repairs (``repair=True``, under the writer lock): finishing an interrupted two-rename publish, removing orphaned
temporaries, rewriting stale consolidated metadata. Nothing else is changed: a real inconsistency is reported,
never "fixed" by guessing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .._fs import intent_path
from .._lock import WriterLock
from ._zarr_io import ELEMENT_CHUNK
from .atlas import STATE_GROUP, Atlas
from .errors import AtlasBusyError, AtlasFormatError
from .txn import PIN_TAG, _pin_owner_dead, recover, temporaries, transaction

#: Values read at once while scanning a 1-D array.
SCAN = 4 * ELEMENT_CHUNK


@dataclass
class CheckReport:
    """The outcome of :func:`check`: ``ok`` when there are no errors."""

    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    stale_consolidated: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "repaired": self.repaired, "checked": self.checked}  # fmt: skip

    def summary(self) -> str:
        lines = [f"{self.path}: {'OK' if self.ok else 'DAMAGED'} ({len(self.checked)} checks)"]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  repaired: {r}" for r in self.repaired]
        if self.warnings and not self.repaired:
            lines.append(f"  (run `scalex-scale check {self.path} --repair` to remove what the warnings name)")
        return "\n".join(lines)


def _scan(arr: zarr.Array, stop: int, fn: Callable[[np.ndarray, int], str | None]) -> str | None:
    """Apply ``fn(block, offset)`` to ``arr[:stop]`` in blocks; the first message it returns."""
    for a in range(0, stop, SCAN):
        msg = fn(np.asarray(arr[a : min(a + SCAN, stop)]), a)
        if msg:
            return msg
    return None


def _check_csr(name: str, indptr: zarr.Array, indices: zarr.Array, data: zarr.Array, n_rows: int, n_cols: int,
               values: Callable[[np.ndarray], str | None]) -> list[str]:  # fmt: skip
    errors = []
    if indptr.shape[0] != n_rows + 1:
        return [f"{name}/indptr has {indptr.shape[0]:,} entries for {n_rows:,} rows (expected {n_rows + 1:,})"]
    last = {"v": 0}

    def monotone(block: np.ndarray, offset: int) -> str | None:
        if offset == 0 and block.size and block[0] != 0:
            return f"{name}/indptr starts at {block[0]}, not 0"
        prev = np.concatenate([[last["v"]], block[:-1]]) if block.size else block
        if block.size and (block < prev).any():
            return f"{name}/indptr decreases at row {offset + int(np.flatnonzero(block < prev)[0]) - 1:,}"
        if block.size:
            last["v"] = block[-1]
        return None

    msg = _scan(indptr, indptr.shape[0], monotone)
    if msg:
        return [msg]
    nnz = int(indptr[n_rows]) if n_rows >= 0 else 0
    for arr, what in ((indices, "indices"), (data, "data")):
        if arr.shape[0] != nnz:
            errors.append(f"{name}/{what} has {arr.shape[0]:,} values but indptr ends at {nnz:,}")
    if errors:
        return errors
    msg = _scan(indices, nnz, lambda b, o: f"{name}/indices out of range [0, {n_cols}) at value {o + int(np.flatnonzero((b < 0) | (b >= n_cols))[0]):,}" if b.size and ((b < 0) | (b >= n_cols)).any() else None)  # noqa: E501
    if msg:
        errors.append(msg)
    msg = _scan(data, nnz, lambda b, o: values(b))
    if msg:
        errors.append(f"{name}/data: {msg}")
    return errors


def _qc_mask(values) -> np.ndarray:
    """``obs['scalex_qc_pass']`` as bools (missing = False: cells appended after preprocessing, not yet judged)."""
    import pandas as pd

    series = pd.Series(values)
    if series.dtype == object or isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(str).map({"True": True, "False": False})
    return series.eq(True).fillna(False).to_numpy(dtype=bool)


def _counts(block: np.ndarray) -> str | None:
    if not np.isfinite(block).all():
        return "non-finite values"
    if block.size and block.min() < 0:
        return "negative values"
    return None


def _scaled(block: np.ndarray) -> str | None:
    b = block.astype(np.float32)
    if not np.isfinite(b).all() or (b.size and (b.min() < 0 or b.max() > 1)):
        return "values outside [0, 1]"
    return None


class _Checker:
    def __init__(self, atlas: Atlas, report: CheckReport) -> None:
        self.atlas = atlas
        self.report = report

    def check(self, what: str, fn: Callable[[], list[str] | None]) -> None:
        self.report.checked.append(what)
        try:
            problems = fn() or []
        except Exception as err:  # noqa: BLE001 - a damaged element: report it, go on with the others
            problems = [f"{what}: cannot be read ({type(err).__name__}: {err})"]
        self.report.errors.extend(problems)

    # ------------------------------------------------------------------ elements
    def x(self) -> list[str]:
        a = self.atlas
        x = a.root["X"]
        shape = x.attrs.get("shape")
        if x.attrs.get("encoding-type") != "csr_matrix" or not isinstance(shape, list) or len(shape) != 2:
            return ["X is not a CSR matrix element with a 2-d shape"]
        return _check_csr("X", x["indptr"], x["indices"], x["data"], int(shape[0]), int(shape[1]), _counts)

    def obs_var(self) -> list[str]:
        a, errors = self.atlas, []
        obs, var = a.obs, a.var
        if obs.shape[0] != a.n_obs:
            errors.append(f"obs has {obs.shape[0]:,} rows but X has {a.n_obs:,}")
        if not obs.index.is_unique:
            errors.append(f"obs names are not unique (e.g. {obs.index[obs.index.duplicated()][0]!r})")
        if a.n_obs and "batch" not in obs:
            errors.append("obs has no 'batch' column")
        elif "batch" in obs and obs["batch"].isna().any():
            errors.append("obs['batch'] has missing values")
        if var.shape[0] != a.n_vars:
            errors.append(f"var has {var.shape[0]:,} rows but X has {a.n_vars:,} columns")
        if not var.index.is_unique:
            errors.append("var names are not unique")
        for key in a.obsm_keys():
            n = a.root["obsm"][key].shape[0]
            if n != a.n_obs:
                errors.append(f"obsm['{key}'] has {n:,} rows but X has {a.n_obs:,}")
        return errors

    def state(self) -> list[str]:
        a, errors = self.atlas, []
        state = a.state
        if not isinstance(state.get("generation", 0), int):
            errors.append("state: generation is not an integer")
        recorded = [r.get("n_cells") for section in ("ingest", "projection") for r in (state.get(section) or {}).get("inputs", [])]
        if recorded and all(isinstance(n, int) for n in recorded) and sum(recorded) != a.n_obs:
            errors.append(f"state: the recorded inputs hold {sum(recorded):,} cells but X has {a.n_obs:,}")
        missing = [b for b in (state.get("projection") or {}).get("maxabs", {}) if b not in a.batch_categories and b != "__all__"]
        if missing:
            errors.append(f"state: projection scaling names batches that are not in the atlas: {missing}")
        return errors

    def preprocess(self) -> list[str]:
        a, errors = self.atlas, []
        prep = a.state.get("preprocess")
        if prep is None:
            if a.has_training_matrix:
                errors.append("a training matrix exists but the state has no preprocessing record")
            return errors
        features = prep.get("features", [])
        names = list(map(str, a.var_names))
        index = prep.get("feature_index")
        if index is not None and [names[i] if 0 <= i < len(names) else None for i in index] != list(features):
            errors.append("state: preprocess features do not match var at feature_index")
        unknown = [b for b in prep.get("batches", []) if b not in a.batch_categories]
        if unknown:
            errors.append(f"state: preprocess batches {unknown} are not in obs['batch']")
        if not a.has_training_matrix:
            return errors + ["state has a preprocessing record but there is no training matrix"]
        group = a.root[f"{STATE_GROUP}/train"]
        n_train, n_feat = prep.get("n_train"), int(group.attrs.get("n_features", -1))
        if n_feat != len(features):
            errors.append(f"training matrix has {n_feat} features but the state selects {len(features)}")
        if group.attrs.get("id") != prep.get("train_id"):
            errors.append(f"training matrix id {group.attrs.get('id')} differs from the state's {prep.get('train_id')}")
        n_rows = group["indptr"].shape[0] - 1
        if n_train is not None and n_rows != n_train:
            return errors + [f"training matrix has {n_rows:,} rows but the state says n_train = {n_train:,}"]
        errors += _check_csr(f"{STATE_GROUP}/train", group["indptr"], group["indices"], group["data"], n_rows, max(n_feat, 0), _scaled)
        n_obs0 = int(prep.get("n_obs", a.n_obs))
        cells = np.asarray(group["cells"][:])
        batch = np.asarray(group["batch"][:])
        if cells.shape[0] != n_rows or batch.shape[0] != n_rows:
            return errors + ["training matrix cells/batch do not have one entry per row"]
        if cells.size and (cells.min() < 0 or cells.max() >= n_obs0):
            return errors + [f"training matrix names atlas rows outside [0, {n_obs0:,})"]
        if np.unique(cells).size != cells.size:
            errors.append("training matrix names an atlas row twice")
        if cells.size and not np.array_equal(a.batch_codes[cells], batch):
            errors.append("training matrix batch codes differ from obs['batch'] of its cells")
        qc = a.obs_column("scalex_qc_pass")
        if qc is not None and len(qc) == a.n_obs:
            qc = _qc_mask(qc)
            if int(qc[:n_obs0].sum()) != n_rows or (cells.size and not qc[cells].all()):
                errors.append("obs['scalex_qc_pass'] does not match the training matrix' cells")
        return errors

    def latent(self) -> list[str]:
        a, errors = self.atlas, []
        for key, record in (a.state.get("obsm") or {}).items():
            if key not in a.obsm_keys():
                errors.append(f"state records obsm['{key}'] but the atlas has none")
                continue
            if record.get("directory") and not Path(record["directory"]).exists():
                self.report.warnings.append(f"obsm['{key}'] was written by model {record['directory']}, which no longer exists")
        if "latent" in a.obsm_keys():
            qc = a.obs_column("scalex_qc_pass")
            if qc is not None and len(qc) == a.n_obs:
                lat = a.root["obsm"]["latent"]
                bad = _scan_rows(lat, _qc_mask(qc))
                if bad:
                    errors.append(bad)
        model = a.state.get("model")
        if model and model.get("directory") and not Path(model["directory"]).exists():
            self.report.warnings.append(f"the recorded model {model['directory']} no longer exists")
        return errors

    def consolidated(self) -> list[str]:
        meta = json.loads((self.atlas.directory / "zarr.json").read_text())
        entries = (meta.get("consolidated_metadata") or {}).get("metadata") or {}
        stale = []
        for key, entry in entries.items():
            path = self.atlas.directory / key / "zarr.json"
            if not path.exists():
                stale.append(key)
                continue
            actual = json.loads(path.read_text())
            if entry.get("shape") != actual.get("shape"):
                stale.append(key)
        if stale:
            self.report.warnings.append(
                f"consolidated metadata is stale for {len(stale)} element(s) (e.g. {stale[0]}): lazy readers would see "
                "old shapes"
            )
            self.report.stale_consolidated = True
        return []


def _scan_rows(lat: zarr.Array, qc: np.ndarray) -> str | None:
    step = max(1, SCAN // max(1, lat.shape[1]))
    for a in range(0, lat.shape[0], step):
        block = np.asarray(lat[a : a + step])
        finite = np.isfinite(block).all(axis=1)
        partial = ~finite & np.isfinite(block).any(axis=1)
        if partial.any():
            return f"obsm['latent'] row {a + int(np.flatnonzero(partial)[0]):,} is partly NaN"
        wrong = finite & ~qc[a : a + step]
        if wrong.any():
            return f"obsm['latent'] has values for cell {a + int(np.flatnonzero(wrong)[0]):,}, which failed QC"
    return None


def check(path: str | Path, *, repair: bool = False) -> CheckReport:
    """Verify an atlas (see the module docstring); with ``repair``, also fix what is provably safe to fix."""
    path = Path(path)
    report = CheckReport(str(path))
    holder = WriterLock(path, "check").held_by_other()
    if repair:
        try:
            with WriterLock(path, "check --repair", timeout=0):
                report.repaired += recover(path)
        except AtlasBusyError as err:
            report.errors.append(str(err))
            return report
    elif intent_path(path).exists() and holder is None:
        report.warnings.append("an interrupted commit left an intent file (the next reader or writer finishes it)")
    if holder is None:
        for tag, p in temporaries(path):
            if tag == PIN_TAG and not _pin_owner_dead(p):
                continue
            report.warnings.append(f"orphaned temporary {p.name} (left by a crashed writer)")
    else:
        report.warnings.append(f"a writer is active (pid {holder.get('pid')}, `{holder.get('command')}`): checked its last commit")
    try:
        atlas = Atlas.open(path)
    except AtlasFormatError as err:
        report.errors.append(str(err))
        return report
    checker = _Checker(atlas, report)
    checker.check("X", checker.x)
    checker.check("obs/var/obsm", checker.obs_var)
    checker.check("state", checker.state)
    checker.check("training matrix", checker.preprocess)
    checker.check("latent", checker.latent)
    checker.check("consolidated metadata", checker.consolidated)
    if repair and report.stale_consolidated and report.ok:
        with transaction(path, "check --repair") as txn:
            txn.atlas.consolidate()
        report.repaired.append("rewrote the consolidated metadata")
    return report


__all__ = ["CheckReport", "check"]
