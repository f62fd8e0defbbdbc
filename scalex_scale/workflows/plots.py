"""PNG plots of an evaluation (the ``plot`` extra: umap-learn + matplotlib)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
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

    return umap.UMAP(n_neighbors=30, min_dist=0.1, metric="euclidean", random_state=seed).fit_transform(latent)


def _scatter(ax, xy: np.ndarray, labels: np.ndarray, title: str, legend_title: str) -> None:
    cats = pd.Categorical(labels)
    cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
    for i, cat in enumerate(cats.categories):
        m = cats.codes == i
        ax.scatter(xy[m, 0], xy[m, 1], s=2, color=cmap(i % cmap.N), label=str(cat), rasterized=True)
    ax.set_title(title)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=5, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False, title=legend_title,
              title_fontsize=8)  # fmt: skip


def heatmap(
    df: pd.DataFrame, path: Path, title: str, fmt: str = "{:.0f}", *, xlabel: str = "", ylabel: str = "",
    colorbar: str = "", vmin: float | None = None, vmax: float | None = None,
) -> Path:  # fmt: skip
    """A labelled heatmap: the title wrapped to the figure's width, axis titles, and a labelled colour bar."""
    width = max(6.0, 2.5 + 0.5 * df.shape[1])
    fig, ax = plt.subplots(figsize=(width, max(3.5, 2.0 + 0.45 * df.shape[0])))
    im = ax.imshow(df.to_numpy(dtype=float), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(df.shape[1]), [str(c) for c in df.columns], rotation=90)
    ax.set_yticks(range(df.shape[0]), [str(i) for i in df.index])
    for i in range(df.shape[0]):
        for j in range(df.shape[1]):
            v = df.iat[i, j]
            if np.isfinite(v):  # dark text on the bright end of viridis, white on the dark end
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="k" if im.norm(v) > 0.6 else "w")
    ax.set_title(textwrap.fill(title, width=int(width * 9)), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(colorbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(
    out: Path,
    latent: np.ndarray,
    batches: np.ndarray,
    labels: np.ndarray | None,
    confusion: pd.DataFrame | None,
    *,
    projected: Sequence[str] = (),
    umap: bool = True,
    seed: int = 0,
) -> list[str]:
    """UMAP coloured by batch (projected batches marked) and cell type, the label-transfer confusion matrix, and
    the cell-type similarity of reference vs projected cells (or of the two largest batches without a projection)."""
    from ..metrics import similarity_matrix

    files = []
    projected = set(map(str, projected))
    if umap:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(latent.shape[0], UMAP_MAX_CELLS, replace=False)) if latent.shape[0] > UMAP_MAX_CELLS else np.arange(latent.shape[0])
        xy = umap_coordinates(latent[idx], seed=seed)
        shown = np.array([f"{b} (projected)" if b in projected else str(b) for b in batches[idx]], dtype=object)
        panels = [(shown, "batch", "batch")] + ([(labels[idx], "cell type", "cell type")] if labels is not None else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5))
        for ax, (lab, what, legend) in zip(np.atleast_1d(axes), panels, strict=True):
            _scatter(ax, xy, lab, f"UMAP of the SCALEX latent, coloured by {what}", legend)
        sub = f"{len(idx):,} of {latent.shape[0]:,} cells" if len(idx) < latent.shape[0] else f"{latent.shape[0]:,} cells"
        fig.suptitle(sub, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "umap.png", dpi=120)
        plt.close(fig)
        files.append(str(out / "umap.png"))
    if confusion is not None:
        files.append(str(heatmap(
            confusion, out / "confusion.png", "Label transfer on the query cells: % of each true type predicted as each label",
            xlabel="predicted label", ylabel="true type (query cells)", colorbar="% of the true type's cells", vmin=0, vmax=100,
        )))  # fmt: skip
    if labels is not None:
        is_query = np.isin(batches.astype(str), list(projected))
        if is_query.any() and not is_query.all():
            groups, a, b = np.where(is_query, "query", "reference"), "reference", "query"
            what = "reference cells vs projected (query) cells"
        else:
            names, counts = np.unique(batches, return_counts=True)
            if len(names) < 2:
                return files
            groups, (a, b) = batches, names[np.argsort(-counts)[:2]]
            what = f"batch {a} vs batch {b} (the two largest; no projected batch)"
        sim = similarity_matrix(latent, labels, groups, a, b)
        if sim.size:
            files.append(str(heatmap(
                sim, out / "similarity.png",
                f"Cell-type similarity in the latent: Pearson correlation of mean latent vectors, {what}",
                fmt="{:.2f}", xlabel=f"cell type ({b})", ylabel=f"cell type ({a})", colorbar="Pearson r", vmin=-1, vmax=1,
            )))  # fmt: skip
    return files
