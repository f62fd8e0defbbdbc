"""Streamed obs: read an anndata obs group in row blocks, and write a new obs group block by block.

An ingest used to gather every new cell's obs frame in memory and write obs once at the end: memory grew with the
number of cells (about 200 bytes a cell at 4M). Here obs moves in row blocks, as X does:

* :class:`ObsReader` reads rows ``[start, stop)`` of an anndata ``dataframe`` element (Zarr or HDF5): categories
  once per column, codes / values / masks by slice (a column stored as one large chunk, as anndata writes them, is
  read once whole and kept while it is being read).
* :class:`ObsWriter` appends frames to a staging group and, at :meth:`~ObsWriter.finish`, writes the final anndata
  ``dataframe`` element in chunks of :data:`~._zarr_io.ROW_CHUNK` rows. Memory: one block, plus each text column's
  categories.

How columns join (the rules of ``pandas.concat(join="outer")`` that an atlas used before, kept where they are
cheap to keep streaming):

* a column missing from some rows is missing there: NaN for numbers (integers become float64), ``<NA>`` for
  booleans (a nullable-boolean column), a missing category for text;
* text, categorical and any other non-numeric column is stored categorical; a column that is numeric or boolean in
  some rows and text in others becomes text (numbers written as ``str`` of their value);
* categories: those already in the atlas in their order, then the new ones sorted (``batch``: in the order they
  appear, as the batch codes are);
* a text column with more than :data:`STRINGS_AFTER` distinct values, most of the rows distinct (a barcode or cell
  id column), is stored as strings (anndata's ``string-array``, ``nullable-string-array`` with gaps) instead: its
  categories would take memory that grows with the cells. Columns named in ``ObsWriter(categorical=...)`` stay
  categorical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import zarr

from ._zarr_io import ROW_CHUNK, Appender, create_1d

STAGE = "_obs_stage"
_STR = np.dtypes.StringDType()
#: A text column with more distinct values than this (and more than half its rows distinct) is stored as strings.
STRINGS_AFTER = ROW_CHUNK


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class _Blocked:
    """Reads slices of one 1-D array, a whole chunk-aligned block at a time (one large chunk: read once)."""

    def __init__(self, array: Any) -> None:
        self.array = array
        chunks = getattr(array, "chunks", None)
        self.block = max(ROW_CHUNK, int(chunks[0]) if chunks else ROW_CHUNK)
        self._cache: tuple[int, np.ndarray] | None = None

    def __call__(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.asarray(self.array[0:0])
        b0 = (start // self.block) * self.block
        if self._cache is None or self._cache[0] != b0 or stop > b0 + self._cache[1].shape[0]:
            end = max(stop, b0 + self.block)
            self._cache = (b0, np.asarray(self.array[b0:end]))
        base, block = self._cache
        return block[start - base : stop - base]


def _decode(values: np.ndarray) -> np.ndarray:
    """Strings as an object array of ``str`` (from Zarr's StringDType, h5py's bytes or fixed-width arrays)."""
    if values.dtype.kind == "S" or (values.dtype.kind == "O" and values.size and isinstance(values.flat[0], bytes)):
        return np.asarray([v.decode() for v in values], dtype=object)
    return values.astype(object) if values.dtype.kind in "TU" else values


class ObsReader:
    """Row blocks of an anndata ``dataframe`` element (a Zarr or h5py group) as pandas frames."""

    def __init__(self, group: Any) -> None:
        attrs = dict(group.attrs)
        self.columns = [str(c) for c in attrs.get("column-order", [])]
        self._index = _Blocked(group[attrs.get("_index", "_index")])
        self.n_obs = int(group[attrs.get("_index", "_index")].shape[0])
        encoding = {c: dict(group[c].attrs).get("encoding-type") for c in self.columns}
        raw = {c: _decode(np.asarray(group[c]["categories"][:])) for c in self.columns if encoding[c] == "categorical"}
        self._readers: dict[str, Callable[[int, int], Any]] = {c: _column_reader(group[c], raw.get(c)) for c in self.columns}
        #: Categories of the categorical columns, in their stored order.
        self.categories = {c: [str(v) for v in cats] for c, cats in raw.items()}
        #: Columns stored as strings (string-array, nullable-string-array).
        self.strings = [c for c in self.columns if encoding[c] in ("string-array", "nullable-string-array")]

    def read(self, start: int, stop: int) -> pd.DataFrame:
        index = pd.Index(_decode(self._index(start, stop)), dtype=object)
        return pd.DataFrame({c: r(start, stop) for c, r in self._readers.items()}, index=index)

    def blocks(self, rows: int = ROW_CHUNK):
        for start in range(0, self.n_obs, rows):
            yield self.read(start, min(start + rows, self.n_obs))


def _column_reader(elem: Any, categories: np.ndarray | None) -> Callable[[int, int], Any]:
    enc = dict(elem.attrs).get("encoding-type", "array")
    if enc == "categorical":
        cats = pd.Index(categories)
        codes = _Blocked(elem["codes"])
        ordered = bool(elem.attrs.get("ordered", False))
        return lambda a, b: pd.Categorical.from_codes(codes(a, b).astype(np.int64), cats, ordered=ordered)
    if enc in ("nullable-boolean", "nullable-integer"):
        values, mask = _Blocked(elem["values"]), _Blocked(elem["mask"])
        dtype = "boolean" if enc == "nullable-boolean" else "Int64"

        def nullable(a: int, b: int) -> Any:
            out = pd.array(values(a, b), dtype=dtype)
            out[mask(a, b).astype(bool)] = pd.NA
            return out

        return nullable
    if enc in ("string-array", "nullable-string-array") and "values" not in elem:
        strings = _Blocked(elem)
        return lambda a, b: _decode(strings(a, b))
    if enc == "nullable-string-array":
        values, mask = _Blocked(elem["values"]), _Blocked(elem["mask"])
        return lambda a, b: np.where(mask(a, b).astype(bool), None, _decode(values(a, b)))
    if enc == "array" and hasattr(elem, "shape") and len(elem.shape) == 1:
        return _Blocked(elem)
    from anndata.io import read_elem  # anything else (rare encodings): read the column once, whole

    whole = read_elem(elem)
    return lambda a, b: whole[a:b]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


class _Column:
    """One obs column being staged: its kind (``num``, ``bool``, ``text``: category codes, ``str``: strings), the
    staged values, a missing-mask (not for ``text``: code -1 is missing) and (``text``) its categories."""

    def __init__(self, stage: zarr.Group, key: str, name: str, kind: str, dtype: np.dtype, categorical: bool) -> None:
        self.stage, self.key, self.name, self.kind = stage, key, name, kind
        self.categorical = categorical  # stays categorical however many distinct values it has
        self.version = 0
        if kind == "str":
            self.values = Appender(_string_stage(stage, self._vkey()))
        else:
            self.values = Appender(create_1d(stage, self._vkey(), dtype, chunk=ROW_CHUNK, encoding=False))
        self.mask = None if kind == "text" else self._new_mask()
        self.any_missing = False
        self.cats: dict[str, int] = {}
        self.n_before = 0  # text: categories adopted from the atlas (kept in their order)

    def _new_mask(self) -> Appender:
        return Appender(create_1d(self.stage, f"{self.key}.mask", bool, chunk=ROW_CHUNK, encoding=False))

    def _vkey(self) -> str:
        return f"{self.key}.v{self.version}"

    @property
    def length(self) -> int:
        return self.values.length

    def append_missing(self, n: int) -> None:
        if n == 0:
            return
        self.any_missing = True
        if self.kind == "text":
            self.values.append(np.full(n, -1, np.int32))
            return
        if self.kind == "num":
            if self.values.array.dtype.kind in "iub":
                self._convert("num", np.dtype(np.float64))
            self.values.append(np.full(n, np.nan))
        elif self.kind == "str":
            self.values.append(np.full(n, "", dtype=_STR))
        else:
            self.values.append(np.zeros(n, bool))
        self.mask.append(np.ones(n, bool))

    def append(self, values: Any) -> None:
        kind, array, missing = _classify(values)
        if kind != self.kind and self.kind not in ("text", "str"):
            self._convert("text", np.dtype(np.int32))
        if self.kind in ("text", "str"):
            text = values if kind == "text" else _as_text(array, missing, kind)
        if self.kind == "text":
            codes = self._codes(text)
            self.values.append(codes)
            self.any_missing |= bool((codes < 0).any())
            if not self.categorical and len(self.cats) > max(STRINGS_AFTER, self.length // 2):
                self._to_strings()
            return
        if self.kind == "str":
            strings, miss = _strings(text)
            self.values.append(strings)
            self.mask.append(miss)
            self.any_missing |= bool(miss.any())
            return
        self.any_missing |= bool(missing.any())
        if self.kind == "num":
            if missing.any() and array.dtype.kind in "iub":
                array = array.astype(np.float64)
            target = np.result_type(self.values.array.dtype, array.dtype)
            if missing.any() and target.kind in "iub":
                target = np.dtype(np.float64)
            if target != self.values.array.dtype:
                self._convert("num", target)
            array = np.where(missing, np.nan, array) if missing.any() else array
        self.values.append(array)
        self.mask.append(missing)

    def _codes(self, values: Any) -> np.ndarray:
        if isinstance(values, pd.Series):
            values = values.array
        if isinstance(values, pd.Categorical):
            local, uniques = values.codes.astype(np.int64), values.categories
        else:
            local, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
        lut = np.empty(len(uniques) + 1, np.int32)
        lut[-1] = -1
        for i, u in enumerate(uniques):
            text = str(u)
            lut[i] = self.cats.setdefault(text, len(self.cats))
        return lut[np.where(local < 0, len(uniques), local)]

    def _convert(self, kind: str, dtype: np.dtype) -> None:
        """Rewrite the staged ``num``/``bool`` values as ``kind``/``dtype`` (a type change mid-stream; chunk by
        chunk). To ``text``, the mask goes (code -1 says missing)."""
        self.values.flush()
        self.mask.flush()
        old, mask, old_kind = self.values.array, self.mask.array, self.kind
        self.version += 1
        self.kind = kind
        new = Appender(create_1d(self.stage, self._vkey(), dtype, chunk=ROW_CHUNK, encoding=False))
        for start in range(0, old.shape[0], ROW_CHUNK):
            block, miss = np.asarray(old[start : start + ROW_CHUNK]), np.asarray(mask[start : start + ROW_CHUNK])
            if kind == "text":
                new.append(self._codes(_as_text(block, miss, old_kind)))
            else:
                block = block.astype(dtype)
                new.append(np.where(miss, np.nan, block) if dtype.kind == "f" else block)
        self.values = new
        del self.stage[f"{self.key}.v{self.version - 1}"]
        if kind == "text":
            del self.stage[f"{self.key}.mask"]
            self.mask = None

    def _to_strings(self) -> None:
        """Rewrite the staged codes as strings and drop the categories (too many distinct values: see the module
        docstring); chunk by chunk."""
        self.values.flush()
        old, names = self.values.array, np.asarray(list(self.cats), dtype=object)
        self.version += 1
        self.kind = "str"
        self.values = Appender(_string_stage(self.stage, self._vkey()))
        self.mask = self._new_mask()
        for start in range(0, old.shape[0], ROW_CHUNK):
            codes = np.asarray(old[start : start + ROW_CHUNK])
            miss = codes < 0
            strings = np.asarray(names[np.where(miss, 0, codes)], dtype=_STR)
            strings[miss] = ""
            self.values.append(strings)
            self.mask.append(miss)
        self.cats = {}
        del self.stage[f"{self.key}.v{self.version - 1}"]

    def finish(self, obs: zarr.Group, ordered_cats: list[str] | None) -> None:
        self.values.flush()
        if self.mask is not None:
            self.mask.flush()
        values = self.values.array
        if self.kind == "text":
            names = list(self.cats)
            order = (
                ordered_cats if ordered_cats is not None else names[: self.n_before] + sorted(names[self.n_before :])
            )
            lut = np.full(len(names) + 1, -1, np.int32)
            pos = {c: i for i, c in enumerate(order)}
            lut[: len(names)] = [pos[c] for c in names]
            group = obs.create_group(self.name)
            group.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False})
            _write_strings(group, "categories", np.asarray(order, dtype=_STR))
            _copy(values, create_1d(group, "codes", np.int32, chunk=ROW_CHUNK), lambda b: lut[b])
        elif self.kind == "str" and not self.any_missing:
            _copy(values, _string_array(obs, self.name), lambda b: b)
        elif self.kind in ("bool", "str") and self.any_missing:
            group = obs.create_group(self.name)
            enc = "nullable-boolean" if self.kind == "bool" else "nullable-string-array"
            group.attrs.update({"encoding-type": enc, "encoding-version": "0.1.0"})
            out = create_1d(group, "values", bool, chunk=ROW_CHUNK) if self.kind == "bool" else _string_array(group, "values")
            _copy(values, out, lambda b: b)
            _copy(self.mask.array, create_1d(group, "mask", bool, chunk=ROW_CHUNK), lambda b: b)
        else:
            _copy(values, create_1d(obs, self.name, values.dtype, chunk=ROW_CHUNK), lambda b: b)


def _classify(values: Any) -> tuple[str, np.ndarray | None, np.ndarray]:
    """(kind, numpy values or None for text, missing mask) of one frame column."""
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    missing = series.isna().to_numpy()
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "bool", series.fillna(False).to_numpy(dtype=bool), missing
    if pd.api.types.is_numeric_dtype(dtype) and not isinstance(dtype, pd.CategoricalDtype):
        if isinstance(dtype, pd.api.extensions.ExtensionDtype):
            return "num", series.to_numpy(dtype=np.float64, na_value=np.nan), missing
        return "num", series.to_numpy(), missing
    if pd.api.types.is_object_dtype(dtype):
        present = series[~missing]
        if len(present) and present.map(lambda v: isinstance(v, bool | np.bool_)).all():
            return "bool", series.where(~missing, False).to_numpy(dtype=bool), missing
    return "text", None, missing


def _as_text(array: np.ndarray, missing: np.ndarray, kind: str) -> np.ndarray:
    if kind == "num" and array.dtype.kind == "f" and np.all(np.mod(array[~missing], 1) == 0):
        text = [str(int(v)) for v in array]
    else:
        text = [str(bool(v)) if kind == "bool" else str(v) for v in array]
    return np.asarray([None if m else t for t, m in zip(text, missing, strict=True)], dtype=object)


def _strings(text: Any) -> tuple[np.ndarray, np.ndarray]:
    """Text values (a Series, Categorical or object array, ``None``/NaN missing) as strings ("" where missing) and
    the missing mask."""
    series = text if isinstance(text, pd.Series) else pd.Series(text, dtype=None if isinstance(text, pd.Categorical) else object)
    miss = series.isna().to_numpy()
    strings = np.asarray(series.astype(object).where(~miss, "").astype(str), dtype=_STR)
    return strings, miss


def _copy(src: zarr.Array, dst: zarr.Array, transform: Callable[[np.ndarray], np.ndarray]) -> None:
    out = Appender(dst)
    for start in range(0, src.shape[0], ROW_CHUNK):
        out.append(transform(np.asarray(src[start : start + ROW_CHUNK])))
    out.flush()


def _write_strings(group: zarr.Group, name: str, values: np.ndarray) -> zarr.Array:
    arr = _string_array(group, name)
    out = Appender(arr)
    out.append(values)
    out.flush()
    return arr


class ObsWriter:
    """Appends obs frames (index: final cell names) to a staging group of ``root``; :meth:`finish` replaces
    ``root["obs"]`` with them, written in row chunks.

    Parameters
    ----------
    root
        The writable atlas group (a transaction's private copy: the staging group is removed by :meth:`finish`,
        and an aborted transaction discards it with the copy).
    categorical
        Text columns stored categorical however many distinct values they have (e.g. the batch).
    """

    def __init__(self, root: zarr.Group, categorical: tuple[str, ...] = ()) -> None:
        self.root = root
        self.categorical = set(categorical)
        if STAGE in root:
            del root[STAGE]
        self.stage = root.create_group(STAGE)
        self.index = Appender(_string_stage(self.stage, "index"))
        self.columns: dict[str, _Column] = {}
        self.n = 0
        self._adopted: dict[str, list[str]] = {}
        self._strings: set[str] = set()

    def adopt_categories(self, categories: dict[str, list[str]]) -> None:
        """Text columns that start with these categories (the atlas' own: kept first, in their order)."""
        self._adopted.update(categories)

    def adopt_strings(self, names: Any) -> None:
        """Text columns that start as strings (the atlas stores them so: no detour through categories)."""
        self._strings.update(str(n) for n in names)

    def _column(self, name: str, kind: str, dtype: np.dtype) -> _Column:
        if name not in self.columns:
            if kind == "text" and name in self._strings and name not in self.categorical:
                kind = "str"
            col = _Column(self.stage, f"c{len(self.columns)}", name, kind, dtype, name in self.categorical)
            for c in self._adopted.get(name, []):
                col.cats.setdefault(str(c), len(col.cats))
            col.n_before = len(col.cats)
            col.append_missing(self.n)
            self.columns[name] = col
        return self.columns[name]

    def append(self, frame: pd.DataFrame) -> None:
        m = frame.shape[0]
        if m == 0:
            return
        self.index.append(np.asarray(frame.index.astype(str), dtype=_STR))
        for name in frame.columns:
            kind, array, _ = _classify(frame[name])
            dtype = np.dtype(np.int32) if kind == "text" else (np.dtype(bool) if kind == "bool" else array.dtype)
            if dtype.kind not in "biuf":
                dtype = np.dtype(np.float64)
            self._column(str(name), kind, dtype).append(frame[name])
        for col in self.columns.values():
            if col.length < self.n + m:
                col.append_missing(self.n + m - col.length)
        self.n += m

    def finish(self, category_order: dict[str, list[str]] | None = None) -> None:
        """Write ``root["obs"]`` (replacing it) from the staged rows and remove the staging group.

        ``category_order``: columns whose categories keep a given order (``{"batch": [...]}``), instead of
        "adopted, then new sorted"."""
        category_order = category_order or {}
        self.index.flush()
        if "obs" in self.root:
            del self.root["obs"]
        obs = self.root.create_group("obs")
        _copy(self.index.array, _string_array(obs, "_index"), lambda b: b)
        for name, col in self.columns.items():
            col.finish(obs, category_order.get(name))
        obs.attrs.update(
            {
                "encoding-type": "dataframe",
                "encoding-version": "0.2.0",
                "_index": "_index",
                "column-order": list(self.columns),
            }  # fmt: skip
        )
        del self.root[STAGE]


def _string_stage(group: zarr.Group, name: str) -> zarr.Array:
    return group.create_array(name, shape=(0,), chunks=(ROW_CHUNK,), dtype=str)


def _string_array(group: zarr.Group, name: str) -> zarr.Array:
    arr = _string_stage(group, name)
    arr.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    return arr


__all__ = ["ObsReader", "ObsWriter"]
