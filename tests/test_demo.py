"""The demo runs end to end on built-in data (small settings) and writes its report."""

from __future__ import annotations

import pytest
import torch

from scalex_scale.cli import main


def test_demo_small(tmp_path, capsys):
    pytest.importorskip("umap")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--outdir", str(tmp_path / "demo"), "--n-cells", "1500", "--max-iterations", "40", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(old)
    out = capsys.readouterr().out
    assert "[7/7" in out and "transfer_ARI" in out
    for name in ("metrics.json", "umap.png", "confusion.png"):
        assert (tmp_path / "demo" / "report" / name).exists()
    # an existing directory that is not a demo is not overwritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["demo", "--outdir", str(tmp_path / "mine"), "--n-cells", "500", "--max-iterations", "5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an earlier demo" in err and "choose another --outdir" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
