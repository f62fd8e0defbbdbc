"""Run a benchmark command under a time and a memory budget (RSS of its whole process tree, polled from /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def tree_rss_mb(root: int) -> float:
    """Resident memory (MB) of process ``root`` and all its descendants, from /proc."""
    parent, rss = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(d.name)] = int(fields[1])
            rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(rss.get(p, 0) for p in tree) / 2**20


def run_with_budget(cmd: list[str], log_path: Path, timeout_s: float, max_rss_mb: float) -> tuple[str, str | None, float]:
    """Run ``cmd`` (output to ``log_path``); kill it past ``timeout_s`` or when its process tree's RSS passes
    ``max_rss_mb`` (polled every 0.5 s). Returns (status, error text, peak tree RSS observed in MB); status is
    ``ok``, ``failed`` (non-zero exit; the error is the log's tail), ``memory_budget_exceeded`` or
    ``time_budget_exceeded``."""
    peak, status, err = 0.0, None, None
    with log_path.open("w") as fh:
        # own session: a kill over budget takes the command's children (e.g. data-loader workers) with it
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        start = time.perf_counter()
        try:
            while proc.poll() is None:
                peak = max(peak, tree_rss_mb(proc.pid))
                if peak > max_rss_mb:
                    status, err = "memory_budget_exceeded", f"process tree RSS {peak:,.0f} MB > budget {max_rss_mb:,.0f} MB"
                elif time.perf_counter() - start > timeout_s:
                    status, err = "time_budget_exceeded", f"over the {timeout_s:.0f} s time budget"
                if status:
                    break
                time.sleep(0.5)
        finally:  # over budget, or the harness itself interrupted: the command's whole session goes
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    if status is None:
        status = "ok" if proc.returncode == 0 else "failed"
        if proc.returncode:
            err = log_path.read_text()[-2000:]
        if proc.returncode < 0:  # a signal not sent by us: most often the kernel's out-of-memory killer
            err = f"killed by signal {-proc.returncode} (out of memory?); peak tree RSS seen {peak:,.0f} MB\n" + err
    return status, err, peak
