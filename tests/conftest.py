"""Shared fixtures: small synthetic AnnData objects and the real data sets when ``../shared`` is present."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """The single place where ``gpu`` tests are skipped when CUDA is absent."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_counts(n_cells: int, n_genes: int, *, seed: int = 0, density: float = 0.3) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    mask = rng.random((n_cells, n_genes)) < density
    values = rng.negative_binomial(2, 0.3, size=(n_cells, n_genes)) + 1
    return sp.csr_matrix((mask * values).astype(np.float32))


def make_adata(n_cells: int = 60, n_genes: int = 40, *, seed: int = 0, prefix: str = "c", batch: str | None = None) -> ad.AnnData:
    x = make_counts(n_cells, n_genes, seed=seed)
    obs = pd.DataFrame(index=[f"{prefix}{i}" for i in range(n_cells)])
    obs["celltype"] = pd.Categorical(np.where(np.arange(n_cells) % 2 == 0, "A", "B"))
    if batch is not None:
        obs["batch"] = batch
    var = pd.DataFrame(index=[f"G{j}" for j in range(n_genes)])
    return ad.AnnData(x, obs=obs, var=var)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The whole suite runs torch with one intra-op thread: tiny models are faster so, and a 2-core CI shares the
    CPU (no spinning OpenMP threads). A test that measures threading sets its own count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
