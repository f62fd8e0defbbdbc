"""What ``run_scaling.py`` derives from its result rows: the per-tool curves, the summary with ratios to ours, the
checks past 1M cells, a markdown table, the CSV and the log-log plots.

A result row is one stage of one tool at one size (``tool``, ``n_cells``, ``stage``, ``status``, ``wall_s``,
``peak_rss_mb``, ...). Ours (tools named ``scalex-scale*``) run as separate stages; every other tool (the reference,
the peers) as one process whose ``total`` row is its pipeline. Rows of stage ``quality`` (the embedding's scores)
and ``write_h5ad`` (the shared input, not timed as anyone's pipeline) belong to no tool's pipeline.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

PIPELINE = ("ingest", "preprocess", "fit", "embed")  # ours; ingest = ingest (synthetic) or ingest_h5ad (from the file)
INGEST_STAGE = {"synthetic": "ingest", "h5ad": "ingest_h5ad"}
OTHERS = ("reference", "scvi", "harmony")
NOT_STAGES = ("quality", "write_h5ad")


def is_ours(tool: str) -> bool:
    return tool.startswith("scalex-scale")


def tool_order(tool: str) -> tuple[int, str]:
    """Ours first, then the reference and the peers in OTHERS' order."""
    return (0, tool) if is_ours(tool) else (1 + OTHERS.index(tool) if tool in OTHERS else 9, tool)


def _index(rows: list[dict]) -> dict[tuple[str, int], dict[str, dict]]:
    out: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        out.setdefault((r["tool"], r["n_cells"]), {})[r["stage"]] = r
    return out


def _ours_pipeline(st: dict[str, dict]) -> dict[str, Any] | None:
    """Ours at one size: the pipeline's stages summed (the ingest of the same source as the preprocessing)."""
    source = st.get("preprocess", {}).get("ingest_source", "synthetic")
    names = [INGEST_STAGE[source], *PIPELINE[1:]]
    if not any(s in st for s in names):
        t = st.get("total")  # a size ours did not run (insufficient_disk, no input file)
        return {"status": t["status"], "error": t.get("error")} if t else None
    bad = next((s for s in names if st.get(s, {}).get("status") != "ok"), None)
    if bad is not None:
        r = st.get(bad, {})
        return {"status": r.get("status", "not_run"), "failed_in_stage": bad, "error": r.get("error")}
    return {"status": "ok", "wall_s": sum(st[s]["wall_s"] for s in names),
            "peak_rss_mb": max(st[s]["peak_rss_mb"] for s in names), "ingest_source": source,
            "all_stages_peak_rss_mb": max(r.get("peak_rss_mb") or 0 for k, r in st.items() if k not in NOT_STAGES)}  # fmt: skip


def pipeline(rows: list[dict], tool: str, n: int) -> dict[str, Any] | None:
    """The integration pipeline of ``tool`` at ``n`` cells: status, wall time, peak RSS (None when not run).

    Ours: ingest + preprocess + fit + embed (data generation and store writing included when ingesting the
    synthetic generator); the others: their one process (reading the .h5ad, preprocessing, training or
    correcting, writing the embedding; writing the .h5ad not included).
    """
    st = _index(rows).get((tool, n), {})
    if is_ours(tool):
        return _ours_pipeline(st)
    t = st.get("total")
    if t is None:
        return None
    out = {k: t.get(k) for k in ("status", "wall_s", "peak_rss_mb", "peak_rss_mb_observed", "failed_in_stage", "error")}
    out.update(_capped_schedule(st))
    return {k: v for k, v in out.items() if v is not None}


def _capped_schedule(st: dict[str, dict]) -> dict[str, Any]:
    """A peer trained for fewer epochs than its default (``--scvi-max-epochs``, to fit a session): the epochs run,
    the default, and the pipeline's time with the default schedule, projected from the measured time per epoch
    (``default_schedule_wall_s``: total + train * (default / run - 1); labelled as a projection wherever shown)."""
    train, total = st.get("train", {}), st.get("total", {})
    run, default = train.get("epochs"), train.get("default_epochs")
    if total.get("status") != "ok" or not run or not default or run >= default or not train.get("wall_s"):
        return {}
    extra = train["wall_s"] * (default / run - 1)
    return {"epochs": run, "default_epochs": default, "train_s_per_epoch": train["wall_s"] / run,
            "default_schedule_wall_s": total["wall_s"] + extra}


def curves(rows: list[dict]) -> list[dict]:
    """One entry per tool and size: the pipeline and the quality of its embedding."""
    out = []
    for tool, n in sorted({(r["tool"], r["n_cells"]) for r in rows if r["tool"] != "input"}):
        p = pipeline(rows, tool, n)
        if p is None:
            continue
        st = _index(rows)[(tool, n)]
        q = st.get("quality", {})
        entry = {"tool": tool, "n_cells": n, **p}
        if q.get("status") == "ok":
            entry.update({k: q[k] for k in ("batch_mixing", "batch_mixing_normalized", "silhouette", "n_scored", "dim")})
        if "hvg_overlap_with_ours" in st.get("total", {}):
            entry["hvg_overlap_with_ours"] = st["total"]["hvg_overlap_with_ours"]
        disk = [r.get("store_disk_bytes") for r in st.values() if r.get("store_disk_bytes")]
        if disk:
            entry["store_disk_bytes"] = max(disk)
            entry["store_gb_per_million_cells"] = max(disk) / n * 1e6 / 1e9
        out.append(entry)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per tool of ours and size where its pipeline completed: wall time, peak RSS, and each other tool's figures
    at that size with the ratios other / ours (``speedup``, ``memory_ratio``: the reference's, as before;
    ``<tool>_time_ratio``, ``<tool>_memory_ratio``: the peers')."""
    out = []
    for tool in sorted({r["tool"] for r in rows if is_ours(r["tool"])}):
        for n in sorted({r["n_cells"] for r in rows if r["tool"] == tool}):
            mine = pipeline(rows, tool, n)
            if not mine or mine["status"] != "ok":
                continue
            row = {"tool": tool, "n_cells": n, "pipeline_wall_s": mine["wall_s"], "pipeline_peak_rss_mb": mine["peak_rss_mb"],
                   "all_stages_peak_rss_mb": mine["all_stages_peak_rss_mb"], "ingest_source": mine["ingest_source"]}  # fmt: skip
            for other in OTHERS:
                o = pipeline(rows, other, n)
                if o is None:
                    continue
                row[f"{other}_status"] = o["status"]
                if o["status"] == "ok":
                    row[f"{other}_wall_s"], row[f"{other}_peak_rss_mb"] = o["wall_s"], o.get("peak_rss_mb")
                    t_key, m_key = ("speedup", "memory_ratio") if other == "reference" else (f"{other}_time_ratio", f"{other}_memory_ratio")
                    row[t_key] = o["wall_s"] / mine["wall_s"]
                    if o.get("peak_rss_mb"):
                        row[m_key] = o["peak_rss_mb"] / mine["peak_rss_mb"]
                    if o.get("default_schedule_wall_s"):
                        row[f"{other}_epochs"], row[f"{other}_default_epochs"] = o["epochs"], o["default_epochs"]
                        row[f"{other}_default_schedule_wall_s_projected"] = o["default_schedule_wall_s"]
                        row[f"{other}_default_schedule_time_ratio_projected"] = o["default_schedule_wall_s"] / mine["wall_s"]
                elif o.get("peak_rss_mb_observed"):
                    row[f"{other}_peak_rss_mb_observed"] = o["peak_rss_mb_observed"]
            out.append(row)
    return out


#: Above this share of the machine's CPU time stolen by the hypervisor (other guests) during either run, wall time
#: measures the neighbours as much as the stage: the time check is then judged on the stage's CPU time.
STEAL_LIMIT = 0.05


def scale_checks(rows: list[dict], baseline: int = 1_000_000, rss_tolerance: float = 0.25, time_tolerance: float = 0.10) -> list[dict]:
    """Ours past ``baseline`` cells, stage by stage, against the same tool's stage at ``baseline``: peak RSS within
    ``rss_tolerance`` of it, wall time growing no faster than the number of cells (``time_tolerance`` allowed for
    timing noise), and the store's disk use per million cells. A stage timed more than once (``--repeats``) is
    judged on its median run's time and its largest peak RSS, with every run's time beside it. Time is judged on
    wall time, or on the stage process' CPU time where either run lost more than :data:`STEAL_LIMIT` of the
    machine to steal (``time_judged_on``; both ratios are always recorded)."""
    idx, out = _index(rows), []
    for (tool, n), st in sorted(idx.items()):
        base = idx.get((tool, baseline))
        if not is_ours(tool) or n <= baseline or base is None:
            continue
        for stage, r in st.items():
            b = base.get(stage)
            if stage in NOT_STAGES or b is None or r.get("status") != "ok" or b.get("status") != "ok":
                continue
            size_ratio, t_ratio = n / baseline, r["wall_s"] / b["wall_s"]
            rss_ratio = r["peak_rss_mb"] / b["peak_rss_mb"]
            c = {"tool": tool, "n_cells": n, "baseline_cells": baseline, "stage": stage, "size_ratio": size_ratio,
                 "wall_s": r["wall_s"], "baseline_wall_s": b["wall_s"], "time_ratio": t_ratio,
                 "time_per_cell_ratio": t_ratio / size_ratio, "time_no_faster_than_linear": t_ratio <= size_ratio * (1 + time_tolerance),
                 "peak_rss_mb": r["peak_rss_mb"], "baseline_peak_rss_mb": b["peak_rss_mb"], "rss_ratio": rss_ratio,
                 "rss_within_tolerance": rss_ratio <= 1 + rss_tolerance, "rss_tolerance": rss_tolerance,
                 "time_tolerance": time_tolerance}  # fmt: skip
            if r.get("cpu_s") and b.get("cpu_s"):
                cpu_ratio = r["cpu_s"] / b["cpu_s"]
                c.update(cpu_s=r["cpu_s"], baseline_cpu_s=b["cpu_s"], cpu_time_ratio=cpu_ratio,
                         cpu_time_no_faster_than_linear=cpu_ratio <= size_ratio * (1 + time_tolerance))  # fmt: skip
            steal = [x.get("host_steal_share") for x in (r, b)]
            c["host_steal_share"], c["baseline_host_steal_share"] = steal
            stolen = any(v is not None and v > STEAL_LIMIT for v in steal)
            c["time_judged_on"] = "cpu" if stolen and "cpu_time_ratio" in c else "wall"
            c["time_ok"] = c["cpu_time_no_faster_than_linear"] if c["time_judged_on"] == "cpu" else c["time_no_faster_than_linear"]
            if r.get("repeats") or b.get("repeats"):  # timed more than once: wall_s is the median run's
                c["wall_s_runs"], c["baseline_wall_s_runs"] = r.get("wall_s_runs", [r["wall_s"]]), b.get("wall_s_runs", [b["wall_s"]])
            if r.get("store_disk_bytes") and b.get("store_disk_bytes"):
                c["store_gb_per_million_cells"] = r["store_disk_bytes"] / n * 1e6 / 1e9
                c["baseline_store_gb_per_million_cells"] = b["store_disk_bytes"] / baseline * 1e6 / 1e9
            out.append(c)
    return out


def check_lines(checks: list[dict]) -> list[str]:
    lines = []
    for c in checks:
        time_ok = c.get("time_ok", c["time_no_faster_than_linear"])
        verdict = "ok" if c["rss_within_tolerance"] and time_ok else "FAIL"
        if c.get("wall_s_runs"):
            verdict += f" (median of {len(c['wall_s_runs'])} vs {len(c['baseline_wall_s_runs'])} runs)"
        cpu = f", CPU x{c['cpu_time_ratio']:.2f}" if "cpu_time_ratio" in c else ""
        steal = [v for v in (c.get("host_steal_share"), c.get("baseline_host_steal_share")) if v is not None]
        judged = f"; judged on {c['time_judged_on']} time" if "time_judged_on" in c else ""
        steal_text = f", steal {max(steal):.0%}" if steal else ""
        lines.append(f"{c['tool']} {c['n_cells']:,} vs {c['baseline_cells']:,} {c['stage']:<11} RSS x{c['rss_ratio']:.2f} "
                     f"(<= {1 + c['rss_tolerance']:.2f}: {c['rss_within_tolerance']}), time x{c['time_ratio']:.2f}{cpu} for "
                     f"x{c['size_ratio']:.0f} cells (linear: {c['time_no_faster_than_linear']}{steal_text}{judged}) -> {verdict}")  # fmt: skip
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Markdown, CSV, plots
# ---------------------------------------------------------------------------------------------------------------


def _cell(c: dict | None, base: dict | None) -> str:
    if c is None:
        return ""
    if c["status"] != "ok":
        seen = c.get("peak_rss_mb_observed")
        where = f" in {c['failed_in_stage']}" if c.get("failed_in_stage") else ""
        return f"{c['status']}{where}" + (f" ({seen / 1024:.1f} GB seen)" if seen else "")
    text = f"{c['wall_s']:,.0f} s, {c['peak_rss_mb'] / 1024:.2f} GB"
    if base is not None and base is not c and base.get("status") == "ok":
        text += f" ({c['wall_s'] / base['wall_s']:.1f}x, {c['peak_rss_mb'] / base['peak_rss_mb']:.1f}x)"
    if c.get("default_schedule_wall_s"):
        proj = c["default_schedule_wall_s"]
        ratio = f", {proj / base['wall_s']:.1f}x" if base is not None and base.get("status") == "ok" else ""
        text += f"; {c['epochs']} of {c['default_epochs']} epochs: default schedule ~{proj:,.0f} s{ratio} (projected)"
    return text


def markdown(rows: list[dict], checks: list[dict], notes: dict[str, str]) -> str:
    """Tables for the README: pipeline time and memory per tool (ratios to ours), embedding quality, checks."""
    cv = curves(rows)
    tools = sorted({c["tool"] for c in cv}, key=tool_order)
    sizes = sorted({c["n_cells"] for c in cv})
    by = {(c["tool"], c["n_cells"]): c for c in cv}
    ref_tool = next((t for t in tools if is_ours(t)), None)
    out = ["| cells | " + " | ".join(tools) + " |", "|---" * (len(tools) + 1) + "|"]
    for n in sizes:
        base = by.get((ref_tool, n))
        out.append(f"| {n:,} | " + " | ".join(_cell(by.get((t, n)), base) for t in tools) + " |")
    out += ["", "Wall time and peak RSS of each tool's pipeline; in brackets: time and memory as a multiple of "
            f"{ref_tool}'s at the same size.", "", "Embedding quality (fixed subsample; batch entropy mixing, "
            "reference-compatible, max 0.693 / cell-type silhouette):", "",
            "| cells | " + " | ".join(tools) + " |", "|---" * (len(tools) + 1) + "|"]  # fmt: skip
    for n in sizes:
        cells = []
        for t in tools:
            c = by.get((t, n), {})
            cells.append(f"{c['batch_mixing']:.3f} / {c['silhouette']:.3f}" if "silhouette" in c else "")
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    if checks:
        out += ["", "Past the baseline size (peak RSS within tolerance, time no faster than linear):", ""]
        out += [f"- {line}" for line in check_lines(checks)]
    if notes:
        out += ["", *[f"- {notes[t]}" for t in tools if t in notes]]
    return "\n".join(out) + "\n"


CSV_COLUMNS = ["tool", "n_cells", "stage", "status", "wall_s", "peak_rss_mb", "peak_gpu_mb", "cells_per_s", "iterations",
               "cpu_s", "peak_rss_mb_observed", "failed_in_stage", "store_disk_bytes", "batch_mixing", "silhouette",
               "hvg_overlap_with_ours", "ingest_source"]  # fmt: skip


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(out: Path, rows: list[dict], summary: list[dict]) -> list[str]:
    """``scaling_runtime.png`` / ``scaling_memory.png``: every stage of ours and the reference's call (log-log);
    ``scaling_tools_runtime.png`` / ``scaling_tools_memory.png``: one line per tool (its pipeline), failures as x."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    staged = [r for r in rows if (is_ours(r["tool"]) or r["tool"] == "reference") and r["stage"] not in NOT_STAGES]
    for metric, fname, label in (("wall_s", "scaling_runtime.png", "wall time (s)"), ("peak_rss_mb", "scaling_memory.png", "peak RSS (MB)")):
        fig, ax = plt.subplots(figsize=(7, 5))
        series = sorted({(r["tool"], r["stage"]) for r in staged if r.get("status") == "ok" and r.get(metric)})
        for tool, stage in series:
            pts = sorted((r["n_cells"], r[metric]) for r in staged if r["tool"] == tool and r["stage"] == stage and r.get("status") == "ok" and r.get(metric))
            ax.plot(*zip(*pts, strict=True), marker="o", linestyle="--" if tool == "reference" else "-", label=f"{tool}: {stage}",
                    linewidth=2.5 if stage == "total" else 1.0, alpha=1.0 if stage == "total" else 0.6)  # fmt: skip
        key = {"wall_s": "pipeline_wall_s", "peak_rss_mb": "pipeline_peak_rss_mb"}[metric]
        for tool in sorted({r["tool"] for r in summary}):
            pts = sorted((r["n_cells"], r[key]) for r in summary if r["tool"] == tool)
            ax.plot(*zip(*pts, strict=True), marker="s", linewidth=2.5, label=f"{tool}: ingest-preprocess-fit-embed")
        for r in staged:
            if r["tool"] == "reference" and r["stage"] == "total" and r.get("status") not in ("ok", "skipped_after_budget"):
                y = r.get("peak_rss_mb_observed") if metric == "peak_rss_mb" else r.get("wall_s")
                if y:
                    ax.plot([r["n_cells"]], [y], marker="x", markersize=10, color="black", linestyle="none",
                            label=f"reference {r['n_cells']:,}: {r['status']}")  # fmt: skip
        files.append(_finish(fig, ax, out / fname, label))
    cv = curves(rows)
    if any(not is_ours(c["tool"]) for c in cv):
        for metric, fname, label in (("wall_s", "scaling_tools_runtime.png", "pipeline wall time (s)"),
                                     ("peak_rss_mb", "scaling_tools_memory.png", "pipeline peak RSS (MB)")):  # fmt: skip
            fig, ax = plt.subplots(figsize=(7, 5))
            for i, tool in enumerate(sorted({c["tool"] for c in cv}, key=tool_order)):
                color = f"C{i}"
                pts = sorted((c["n_cells"], c[metric]) for c in cv if c["tool"] == tool and c["status"] == "ok")
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", color=color, linewidth=2, label=tool)
                proj = sorted((c["n_cells"], c["default_schedule_wall_s"]) for c in cv
                              if c["tool"] == tool and metric == "wall_s" and c.get("default_schedule_wall_s"))  # fmt: skip
                if proj:
                    ax.plot(*zip(*proj, strict=True), marker="o", color=color, linestyle=":", fillstyle="none",
                            label=f"{tool}: default epochs (projected from s/epoch)")  # fmt: skip
                for c in cv:
                    y = c.get("peak_rss_mb_observed") if metric == "peak_rss_mb" else c.get("wall_s")
                    if c["tool"] == tool and c["status"] not in ("ok", "skipped_after_budget", "tool_unavailable") and y:
                        ax.plot([c["n_cells"]], [y], marker="x", markersize=11, color=color, linestyle="none",
                                label=f"{tool} {c['n_cells']:,}: {c['status']}")  # fmt: skip
            files.append(_finish(fig, ax, out / fname, label))
    return files


def _finish(fig: Any, ax: Any, path: Path, ylabel: str) -> str:
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cells")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
