"""bench/device_check.sh --dry-run: every phase of the GPU device check on the CPU at tiny size (not timed here),
and the carried-wheels checker. Keeps the one-command first contact with a GPU from rotting while no GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_dry_run_runs_every_phase(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--dry-run", "--out", str(out),
                           "--work", str(work)], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "device_check.json").read_text())
    assert payload["dry_run"] is True
    assert list(payload["phases"]) == ["env", "fit", "dsbn", "tests", "scaling", "ddp"]
    assert all(p["status"] == "ok" for p in payload["phases"].values()), payload["phases"]
    res = payload["results"]
    assert res["env"]["versions"]["torch"] and res["env"]["launch_host_us_per_op"] > 0
    fit = {(r["batch_size"], r["precision"], r["mode"]): r for r in res["fit"]["results"]}
    eager = fit[(64, "fp32", "eager")]
    assert eager["status"] == "ok" and eager["it_per_s"] > 0 and eager["ops"] > 0 and eager["host_syncs"] == 0
    assert fit[(64, "fp32", "graphs")]["status"] == "skipped"
    assert {r["method"] for r in res["dsbn"]["results"]} >= {"loop", "torch"}
    assert res["tests"]["returncode"] == 0 and res["tests"]["tests"] > 0
    assert res["scaling"]["end_to_end_s"] > 0 and set(res["scaling"]["stages"]) == {"ingest", "preprocess", "fit", "embed"}
    assert res["ddp"]["returncode"] == 0 and res["ddp"]["model"]["world_size"] == 1
    targets = payload["targets"]
    assert set(targets) == {"train_b64_graphs_it_s", "train_b64_eager_it_s", "train_b4096_bf16_cells_s", "e2e_1m_s",
                            "dsbn_triton_beats_torch_everywhere", "dsbn_triton_vs_loop_d16"}
    best = max(r["it_per_s"] for (b, _, m), r in fit.items() if b == 64 and m == "eager" and r["status"] == "ok")
    assert targets["train_b64_eager_it_s"]["value"] == best
    assert all(t["pass"] is None for t in targets.values())  # CPU numbers are not judged against GPU targets
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8  # what the device tool brings back
    assert {"device_check.json", "device_check.log", "fit_matrix.csv", "dsbn.csv", "scaling.json"} <= set(files)


def _wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> None:
    dist = f"{name}-{version}"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(folder / f"{dist}-{tag}.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)


def test_wheel_check_finds_missing_and_duplicate_requirements(tmp_path: Path, capsys) -> None:
    import device_wheels

    _wheel(tmp_path, "alpha", "1.0", ["numpy>=2", "beta>=2", 'gamma; python_version < "3.10"', "torch"])
    _wheel(tmp_path, "beta", "2.1", ["numpy<2"])
    assert device_wheels.check(tmp_path) == 1
    err = capsys.readouterr().err
    assert "beta-2.1" in err and "the image has numpy==2.5.2" in err  # a version seen on the image violates it
    assert "gamma" not in err  # its marker excludes Python 3.12
    _wheel(tmp_path, "beta", "2.2", [])
    _wheel(tmp_path, "delta", "1.0", [], tag="cp311-cp311-manylinux_2_17_x86_64")
    assert device_wheels.check(tmp_path) == 1
    err = capsys.readouterr().err
    assert "two versions of beta" in err and "delta-1.0-cp311" in err


def test_wheel_check_accepts_a_complete_folder(tmp_path: Path) -> None:
    import device_wheels

    _wheel(tmp_path, "alpha", "1.0", ["numpy>=2", "beta>=2", "pandas"])
    _wheel(tmp_path, "beta", "2.1", [], tag="cp312-cp312-manylinux_2_17_x86_64")
    assert device_wheels.check(tmp_path) == 0
