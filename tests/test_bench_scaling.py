"""bench/run_scaling.py runs at a tiny size and writes well-formed output (not timed here)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_run_scaling_tiny(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "run_scaling.py"), "--sizes", "1500", "--max-iterations", "20",
           "--n-genes", "1200", "--genes-per-cell", "700", "--n-batches", "3", "--min-features", "200",
           "--device", "cpu", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert payload["machine"]["cpu_cores"] and payload["versions"]["torch"]
    stages = {r["stage"]: r for r in payload["results"]}
    assert list(stages) == ["ingest", "preprocess", "fit", "embed", "transfer", "evaluate"]
    for r in stages.values():
        assert r["status"] == "ok" and r["wall_s"] > 0 and r["peak_rss_mb"] > 0 and r["n_cells"] == 1500
    assert stages["fit"]["iterations"] == 20
    rows = list(csv.DictReader((tmp_path / "out" / "scaling.csv").open()))
    assert len(rows) == 6 and {r["stage"] for r in rows} == set(stages)
    assert "[" in proc.stderr and "fit" in proc.stderr  # progress output
