"""Shared benchmark plumbing: machine description, versions, git commit, result files, stage subprocesses."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (
    "scalex-scale", "torch", "triton", "numpy", "scipy", "numba", "zarr", "anndata", "dask", "scanpy", "pynndescent",
    "scikit-learn",
)  # fmt: skip


def cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_gb() -> float | None:
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return round(kb / 2**20, 1)
    except (OSError, AttributeError):
        return None


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. a container's cpuset), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def torch_threads() -> int | None:
    """torch's intra-op thread count in this process (None without torch)."""
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return None


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "ram_gb": total_ram_gb(),
        "gpu_name": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def machine_label(info: dict[str, Any] | None = None, *, device: str | None = None) -> str:
    """Results-folder name: the GPU's name, else ``<cpu model>-<cores>c``; ``device="cpu"`` names the CPU even on a
    GPU host, so a CPU run does not land on (and overwrite) the GPU run's files."""
    info = info or machine_info()
    gpu = info["gpu_name"] if device != "cpu" else None
    name = gpu or f"{info['cpu_model']}-{info['cpu_cores']}c"
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(name)).strip("-").lower()


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def results_dir(out: str | Path | None = None, *, device: str | None = None) -> Path:
    """``out``, else ``bench/results/<machine_label(device=device)>``; created if missing."""
    path = Path(out) if out else REPO / "bench" / "results" / machine_label(device=device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def header() -> dict[str, Any]:
    return {"machine": machine_info(), "versions": versions(), "git_commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps({**header(), **payload}, indent=2, default=str) + "\n")
    return path


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time (user + system, every thread) this process has used: unlike wall time, not inflated by other
    tenants of a shared host."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def host_cpu_ticks(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(steal, total) CPU ticks of the machine so far (Linux ``/proc/stat``; None elsewhere). Steal is time the
    hypervisor gave this VM's CPUs to other guests: its share over a stage says how far wall time overstates it."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest is inside user)
    return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


RESULT_TAG = "__STAGE_RESULT__"


def run_stage(stage: str, args: dict[str, Any], *, python: str = sys.executable, timeout: float | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``bench/_stages.py STAGE`` in a fresh process; return its result with wall time, CPU time, peak RSS and
    the share of the machine's CPU time stolen by the hypervisor meanwhile (``host_steal_share``).

    Output of the child streams to our stderr (progress stays visible). A failure, a timeout or a kill (e.g. out of
    memory) is returned as ``{"status": "failed" | "timeout", ...}``, not raised.
    """
    cmd = [python, str(REPO / "bench" / "_stages.py"), stage, json.dumps(args)]
    t0, ticks = time.perf_counter(), host_cpu_ticks()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"stage": stage, "status": "timeout", "wall_s": time.perf_counter() - t0, "timeout_s": timeout}
    wall = time.perf_counter() - t0
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
        else:
            print(line, file=sys.stderr)
    if proc.returncode != 0 or result is None:
        return {"stage": stage, "status": "failed", "returncode": proc.returncode, "wall_s": wall}
    return {"stage": stage, "status": "ok", "process_wall_s": wall, "host_steal_share": steal_share(ticks, host_cpu_ticks()), **result}
