"""PNG plots of an evaluation (the ``plot`` extra: umap-learn + matplotlib)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

#: UMAP is run on at most this many cells (uniform subsample).
UMAP_MAX_CELLS = 50_000


def umap_coordinates(latent: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """UMAP of the latent as in the paper: 30 neighbours, Euclidean, min_dist 0.1."""
    import umap

    return umap.UMAP(n_neighbors=30, min_dist=0.1, metric="euclidean", random_state=seed, n_jobs=1).fit_transform(latent)


def _scatter(ax, xy: np.ndarray, labels: np.ndarray, title: str) -> None:
    cats = pd.Categorical(labels)
    cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
    for i, cat in enumerate(cats.categories):
        m = cats.codes == i
        ax.scatter(xy[m, 0], xy[m, 1], s=2, color=cmap(i % cmap.N), label=str(cat), rasterized=True)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=5, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)


def heatmap(df: pd.DataFrame, path: Path, title: str, fmt: str = "{:.0f}") -> Path:
    fig, ax = plt.subplots(figsize=(1 + 0.5 * df.shape[1], 1 + 0.45 * df.shape[0]))
    im = ax.imshow(df.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(df.shape[1]), [str(c) for c in df.columns], rotation=90)
    ax.set_yticks(range(df.shape[0]), [str(i) for i in df.index])
    for i in range(df.shape[0]):
        for j in range(df.shape[1]):
            v = df.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color="w")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(
    out: Path, latent: np.ndarray, batches: np.ndarray, labels: np.ndarray | None, confusion: pd.DataFrame | None, *, umap: bool = True, seed: int = 0
) -> list[str]:
    """UMAP coloured by batch (and cell type), the confusion matrix, and the cell-type similarity matrix."""
    from ..metrics import similarity_matrix

    files = []
    if umap:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(latent.shape[0], UMAP_MAX_CELLS, replace=False)) if latent.shape[0] > UMAP_MAX_CELLS else np.arange(latent.shape[0])
        xy = umap_coordinates(latent[idx], seed=seed)
        panels = [(batches[idx], "batch")] + ([(labels[idx], "cell type")] if labels is not None else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5))
        for ax, (lab, title) in zip(np.atleast_1d(axes), panels, strict=True):
            _scatter(ax, xy, lab, f"UMAP of the latent: {title}")
        fig.tight_layout()
        fig.savefig(out / "umap.png", dpi=120)
        plt.close(fig)
        files.append(str(out / "umap.png"))
    if confusion is not None:
        files.append(str(heatmap(confusion, out / "confusion.png", "label transfer: % of true type (rows) predicted as (cols)")))
    if labels is not None:
        names, counts = np.unique(batches, return_counts=True)
        a, b = names[np.argsort(-counts)[:2]] if len(names) > 1 else (None, None)
        if a is not None:
            sim = similarity_matrix(latent, labels, batches, a, b)
            if sim.size:
                files.append(str(heatmap(sim, out / "similarity.png", f"cell-type similarity: {a} vs {b}", fmt="{:.2f}")))
    return files
