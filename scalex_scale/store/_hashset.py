"""A set of 64-bit hashes in sorted numpy runs: 8 bytes a member, vectorised membership.

Used where an ingest must know every cell name seen so far (duplicates, renames) without holding the names:
a Python ``dict`` of millions of names costs ~150 bytes each. Runs are merged when the newest is at least half the
size of the one before (amortised O(n log n)), so there are O(log n) runs to search.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def name_hashes(names: np.ndarray) -> np.ndarray:
    """64-bit hashes of strings (pandas' SipHash, fixed key: the same on every run)."""
    return pd.util.hash_array(np.asarray(names, dtype=object), categorize=False)


def pair_hashes(names: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """64-bit hashes of ``(name, batch)`` pairs."""
    frame = pd.DataFrame({"n": np.asarray(names, dtype=object), "b": np.asarray(batches, dtype=object)})
    return pd.util.hash_pandas_object(frame, index=False, categorize=False).to_numpy()


class HashSet:
    """Members are uint64 hashes; two different strings share one with probability 2**-64 (at 10**8 cells, about
    one chance in 3,000 that any pair does: a needless rename, or a false duplicate)."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(r.size for r in self.runs)

    def add(self, hashes: np.ndarray) -> None:
        if hashes.size == 0:
            return
        self.runs.append(np.unique(np.asarray(hashes, np.uint64)))
        while len(self.runs) > 1 and self.runs[-2].size <= 2 * self.runs[-1].size:
            newer = self.runs.pop()
            self.runs[-1] = np.union1d(self.runs[-1], newer)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        hashes = np.asarray(hashes, np.uint64)
        out = np.zeros(hashes.shape, bool)
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, hashes), run.size - 1)
            out |= run[pos] == hashes
        return out
