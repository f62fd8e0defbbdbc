"""A PROJECTION (not a measurement) of scalex-scale's pipeline at 100M cells (CELLxGENE Census scale).

    python bench/project_100m.py [--results bench/results/amd-epyc-2c] [--cells 100000000] [--nodes 1,8]
                                 [--gpu-results DIR] [--gpu-iterations-per-s X] [--out DIR]

Built from measured inputs, each printed beside the projection with the file it comes from:

* per-cell wall time of every stage of ours at the largest size measured in ``scaling.json`` (or the files given
  with ``--scaling``, e.g. the 4M-cell run beside the 1M one; ingest from a file
  when ``run_scaling.py --ingest-from h5ad`` has recorded it, else the synthetic ingest, which includes generating
  the data: an upper bound), on that machine's cores;
* preprocessing's per-cell cost from ``preprocess.json`` (shown beside the first, as a cross-check);
* training throughput (iterations/s at batch 64) from ``scaling.json``'s ``fit`` rows;
* the data-parallel training efficiency measured in ``distributed.json`` (CPU, Gloo, one host: shown, not used
  for GPUs, see below);
* the store's disk use per million cells, when ``scaling.json`` records it.

What the measurements cannot give is marked ASSUMPTION in the output and set by flags: how the streaming stages
speed up from the measured machine's cores to a node's (``--core-efficiency``) and across nodes
(``--node-efficiency``), the GPU's training throughput (``--gpu-iterations-per-s``, or a measured value from a
``train_speed.json`` / ``scaling.json`` in ``--gpu-results``), and the multi-GPU data-parallel efficiency
(``--gpu-ddp-efficiency``). Ingest is one writer process into one store (the store takes one writer at a time), so
it neither uses more cores nor more nodes unless ``--parallel-ingest`` says it does.

Two training schedules: the method's (30,000 iterations at batch 64, whatever the number of cells: 1.9M cells seen)
and one pass over every cell (N / batch iterations). For each configuration (one node: 16 cores + 1 GPU; 8 such
nodes) the table gives every stage's time and names the stage that limits the pipeline.

Writes ``projection_100m.json`` and ``projection_100m.md`` to ``--out`` (default: the results directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import REPO, write_json  # noqa: E402

STREAMING = ("ingest", "preprocess", "embed", "transfer", "evaluate")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def measured_stages(scaling: dict[str, Any], tool: str) -> dict[str, dict[str, Any]]:
    """Per stage of ``tool``: the row at the largest size where it completed (ingest: from a file if recorded)."""
    best: dict[str, dict[str, Any]] = {}
    for r in scaling["results"]:
        if r.get("tool") != tool or r.get("status") != "ok" or not r.get("wall_s"):
            continue
        if r["stage"] in ("quality", "write_h5ad", "total"):
            continue
        key = "ingest" if r["stage"] in ("ingest", "ingest_h5ad") else r["stage"]
        old = best.get(key)
        rank = (r["stage"] == "ingest_h5ad", r["n_cells"])  # a file ingest beats a synthetic one, then the larger size
        if old is None or rank > (old["stage"] == "ingest_h5ad", old["n_cells"]):
            best[key] = r
    return best


def gpu_measurement(gpu_dir: Path | None) -> tuple[float | None, str | None]:
    """Training iterations/s at batch 64 measured on a GPU, if a results file holds one."""
    if gpu_dir is None:
        return None, None
    speed = _load(gpu_dir / "train_speed.json")
    if speed:
        runs = [r for r in speed.get("speed", {}).get("runs", []) if str(r.get("tool", "")).startswith("ours") and r.get("iterations_per_s")]
        if runs:
            return max(r["iterations_per_s"] for r in runs), str(gpu_dir / "train_speed.json")
    scaling = _load(gpu_dir / "scaling.json")
    if scaling and scaling.get("machine", {}).get("gpu_name"):
        fits = [r for r in scaling["results"] if r.get("stage") == "fit" and r.get("status") == "ok" and r.get("iterations_per_s")]
        if fits:
            return max(r["iterations_per_s"] for r in fits), str(gpu_dir / "scaling.json")
    return None, None


def project(a: argparse.Namespace) -> dict[str, Any]:
    res = Path(a.results)
    files = [Path(f) for f in a.scaling.split(",")] if a.scaling else [res / "scaling.json"]
    scaling = {"results": []}
    for f in files:
        part = _load(f)
        if part is None:
            raise SystemExit(f"{f} not found: run bench/run_scaling.py first (or pass --results / --scaling)")
        scaling["machine"] = scaling.get("machine") or part["machine"]
        scaling["results"] += [{**r, "file": str(f)} for r in part["results"]]
    cores = scaling["machine"].get("usable_cores") or scaling["machine"]["cpu_cores"]
    stages = measured_stages(scaling, a.tool)
    missing = [s for s in ("ingest", "preprocess", "fit", "embed") if s not in stages]
    if missing:
        raise SystemExit(f"{', '.join(map(str, files))}: no completed {', '.join(missing)} row(s) for {a.tool}")
    inputs: list[dict[str, Any]] = []
    per_cell: dict[str, float] = {}
    for s in (*STREAMING, "fit"):
        r = stages.get(s)
        if r is None:
            continue
        if s != "fit":
            per_cell[s] = r["wall_s"] / r["n_cells"]
        note = {"ingest": "from an .h5ad file" if r["stage"] == "ingest_h5ad" else
                "synthetic: includes generating the data (an upper bound for ingest)"}.get(s, "")  # fmt: skip
        inputs.append({"what": f"{s} at {r['n_cells']:,} cells", "wall_s": r["wall_s"], "peak_rss_mb": r.get("peak_rss_mb"),
                       "cells_per_s": r["n_cells"] / r["wall_s"] if s != "fit" else r.get("cells_per_s"),
                       "iterations": r.get("iterations"), "file": r["file"], "note": note,
                       "cores": cores})  # fmt: skip
    fit = stages["fit"]
    cpu_it_s = fit.get("iterations_per_s") or fit["iterations"] / fit["wall_s"]
    pre = _load(res / "preprocess.json")
    if pre:
        big = max(pre["results"], key=lambda r: r["n_cells"])
        inputs.append({"what": f"preprocess at {big['n_cells']:,} cells (cross-check)", "wall_s": big["preprocess"]["wall_s"],
                       "peak_rss_mb": big["preprocess"]["peak_rss_mb"], "cells_per_s": big["preprocess"]["cells_per_s"],
                       "file": str(res / "preprocess.json"), "cores": cores})  # fmt: skip
    dist = _load(res / "distributed.json")
    if dist:
        two = [r for r in dist["results"] if r["processes"] == 2 and not r["sync_dsbn"] and r["batch_mode"] == "fixed_global_batch"]
        if two:
            inputs.append({"what": "data-parallel training, 2 processes, fixed global batch 256 (CPU, Gloo, one host)",
                           "efficiency": two[0]["efficiency"], "file": str(res / "distributed.json"),
                           "note": "CPU loopback on 2 shared cores: not used for GPUs (NCCL), shown as the only "
                                   "measured multi-process figure"})  # fmt: skip
    disk = [r["store_disk_bytes"] / r["n_cells"] for r in scaling["results"]
            if r.get("tool") == a.tool and r.get("store_disk_bytes") and r.get("status") == "ok"]  # fmt: skip
    gpu_it_s, gpu_src = gpu_measurement(Path(a.gpu_results) if a.gpu_results else None)
    assumptions = {
        "core_efficiency": {"value": a.core_efficiency, "label": "ASSUMPTION", "what":
                            f"streaming stages on {a.cores_per_node} cores run at this fraction of linear speed-up from "
                            f"the {cores} measured (this machine has {cores} cores: not measurable here)"},
        "node_efficiency": {"value": a.node_efficiency, "label": "ASSUMPTION", "what":
                            "streaming stages across nodes (dask workers, shards of one store on a shared filesystem) "
                            "run at this fraction of linear speed-up"},
        "gpu_iterations_per_s": {"value": gpu_it_s or a.gpu_iterations_per_s, "label": "MEASURED" if gpu_it_s else "ASSUMPTION",
                                 "what": f"training iterations/s at batch {a.batch_size} on one GPU"
                                         + (f" ({gpu_src})" if gpu_src else " (no GPU measurement yet)")},
        "gpu_ddp_efficiency": {"value": a.gpu_ddp_efficiency, "label": "ASSUMPTION", "what":
                               "data-parallel efficiency over the nodes' GPUs (NCCL; not measured)"},
        "embed_on_cpu": {"value": True, "label": "DESIGN", "what":
                         "embed is projected as the measured streaming pass (reading the store, the encoder, writing "
                         "the latent) scaled like the other streaming stages; a GPU is not assumed to speed it up"},
        "parallel_ingest": {"value": a.parallel_ingest, "label": "ASSUMPTION" if a.parallel_ingest else "DESIGN",
                            "what": "ingest scales with cores and nodes" if a.parallel_ingest else
                                    "ingest is one writer process: the measured throughput, whatever the hardware"},
    }  # fmt: skip
    it_s = assumptions["gpu_iterations_per_s"]["value"]
    configs = []
    for nodes in a.nodes:
        speedup = a.cores_per_node / cores * a.core_efficiency * (1 if nodes == 1 else nodes * a.node_efficiency)
        times: dict[str, float] = {}
        for s, c in per_cell.items():
            times[s] = a.cells * c / (speedup if (s != "ingest" or a.parallel_ingest) else 1.0)
        gpus = nodes * a.gpus_per_node
        ddp = 1.0 if gpus == 1 else a.gpu_ddp_efficiency
        times["fit_method_schedule"] = a.max_iterations / it_s  # iterations are not shared out: the same schedule
        times["fit_one_pass"] = a.cells / (it_s * a.batch_size * gpus * ddp)
        core = [s for s in ("ingest", "preprocess", "embed") if s in times]
        for sched in ("fit_method_schedule", "fit_one_pass"):
            total = sum(times[s] for s in core) + times[sched]
            limit = max([*core, sched], key=times.get)
            configs.append({"nodes": nodes, "gpus": gpus, "cores": nodes * a.cores_per_node, "schedule": sched,
                            "stage_seconds": {s: times[s] for s in [*core, sched]}, "pipeline_seconds": total,
                            "limiting_stage": limit,
                            "extra_seconds": {s: times[s] for s in ("transfer", "evaluate") if s in times}})  # fmt: skip
    out = {"benchmark": "projection_100m", "kind": "PROJECTION (not a measurement)", "cells": a.cells, "tool": a.tool,
           "measured_inputs": inputs, "assumptions": assumptions, "cpu_iterations_per_s_measured": cpu_it_s,
           "configs": configs}  # fmt: skip
    if disk:
        out["store_bytes_per_cell_measured"] = max(disk)
        out["store_tb_projected"] = max(disk) * a.cells / 1e12
    return out


def _hms(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def markdown(p: dict[str, Any]) -> str:
    lines = [f"**PROJECTION** of {p['tool']} at {p['cells']:,} cells (not a measurement).", "", "Measured inputs:", ""]
    for i in p["measured_inputs"]:
        what = [f"{i['what']}:"]
        if "wall_s" in i:
            what.append(f"{i['wall_s']:,.1f} s")
        if i.get("iterations"):
            what.append(f"for {i['iterations']:,} iterations ({i['iterations'] / i['wall_s']:,.0f} it/s incl. start-up)")
        elif i.get("cells_per_s"):
            what.append(f"({i['cells_per_s']:,.0f} cells/s on {i.get('cores')} cores)")
        if i.get("peak_rss_mb"):
            what.append(f"peak RSS {i['peak_rss_mb']:,.0f} MB")
        if "efficiency" in i:
            what.append(f"efficiency {i['efficiency']:.2f}")
        what.append(f"[{Path(i['file']).name}]" + (f" {i['note']}" if i.get("note") else ""))
        lines.append("- " + " ".join(what))
    if "store_bytes_per_cell_measured" in p:
        lines.append(f"- store on disk: {p['store_bytes_per_cell_measured'] * 1e6 / 1e9:.2f} GB per million cells -> "
                     f"{p['store_tb_projected']:.2f} TB at {p['cells']:,} cells")  # fmt: skip
    lines += ["", "Assumptions:", ""]
    lines += [f"- {k} = {v['value']} ({v['label']}): {v['what']}" for k, v in p["assumptions"].items()]
    lines += ["", "| nodes (cores, GPUs) | training schedule | ingest | preprocess | fit | embed | pipeline | limit |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in p["configs"]:
        st = c["stage_seconds"]
        fit = st.get("fit_method_schedule", st.get("fit_one_pass"))
        sched = "30,000 iterations" if c["schedule"] == "fit_method_schedule" else "one pass over all cells"
        lines.append(f"| {c['nodes']} ({c['cores']}, {c['gpus']}) | {sched} | {_hms(st['ingest'])} | {_hms(st['preprocess'])} | "
                     f"{_hms(fit)} | {_hms(st['embed'])} | {_hms(c['pipeline_seconds'])} | {c['limiting_stage']} |")  # fmt: skip
    extra = {s: t for c in p["configs"][:1] for s, t in c["extra_seconds"].items()}
    if extra:
        lines += ["", "Not in the pipeline above, on one node: " + ", ".join(f"{s} {_hms(t)}" for s, t in extra.items())
                  + " (projected linearly, as the streaming stages)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(REPO / "bench" / "results" / "amd-epyc-2c"))
    p.add_argument("--scaling", default=None,
                   help="comma-separated scaling.json files (default RESULTS/scaling.json); each stage's largest "
                        "completed size is used, e.g. RESULTS/scaling.json,RESULTS/beyond_1m/scaling.json")
    p.add_argument("--tool", default="scalex-scale")
    p.add_argument("--cells", type=int, default=100_000_000)
    p.add_argument("--nodes", default="1,8", help="node counts to project")
    p.add_argument("--cores-per-node", type=int, default=16)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--core-efficiency", type=float, default=0.7, help="ASSUMPTION: see the docstring")
    p.add_argument("--node-efficiency", type=float, default=0.8, help="ASSUMPTION: see the docstring")
    p.add_argument("--gpu-iterations-per-s", type=float, default=1000.0,
                   help="ASSUMPTION unless --gpu-results holds a measurement: training it/s at batch 64 on one GPU")
    p.add_argument("--gpu-ddp-efficiency", type=float, default=0.9, help="ASSUMPTION: see the docstring")
    p.add_argument("--gpu-results", default=None, help="a results directory measured on a GPU (train_speed.json, scaling.json)")
    p.add_argument("--parallel-ingest", action="store_true", help="ASSUMPTION: ingest scales with cores and nodes")
    p.add_argument("--max-iterations", type=int, default=30_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="where to write projection_100m.json/.md (default: --results)")
    a = p.parse_args(argv)
    a.nodes = [int(x) for x in a.nodes.split(",")]
    proj = project(a)
    text = markdown(proj)
    print(text)
    out = Path(a.out or a.results)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "projection_100m.json", proj)
    (out / "projection_100m.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
