"""The fault-injection campaign behind the README's reliability section.

Every write point of every write command is failed with every fault (an exception, Ctrl-C delivered to the main
thread, ENOSPC, and ``os._exit`` in a killed child), using the crash tests' harness (``tests/test_store_crash.py``,
exhaustive mode: the next command runs after every trial). A trial "survives" when the atlas is byte-identical
to the state before or after the command (both verified with ``anndata.read_zarr`` and ``check``), no temporary
is left by an in-process failure, and the next command succeeds and leaves none.

    python bench/crash_campaign.py [--commands append,project] [--out bench/results/<machine>/crash_campaign.json]

Writes the counts per command and fault, and the machine/versions/commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("SCALEX_SCALE_FSYNC", "0")

MODES = ("raise", "interrupt", "enospc", "exit")


def main() -> None:
    import torch

    import test_store_crash as harness
    from _env import header, results_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", default=",".join(harness.COMMANDS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = results_dir(args.out and Path(args.out).parent) / (Path(args.out).name if args.out else "crash_campaign.json")
    root = Path(tempfile.mkdtemp(prefix="crash-campaign-"))

    class Factory:  # the tests' tmp_path_factory, for the template fixture
        def mktemp(self, name: str) -> Path:
            p = root / name
            p.mkdir()
            return p

    templates = harness.templates.__wrapped__(Factory())
    results = {**header(), "commands": {}, "definition": __doc__.split("\n\n")[1].replace("\n", " ")}
    for name in args.commands.split(","):
        per_mode = {}
        for mode in args.modes.split(","):
            work = root / f"{name}-{mode}"
            work.mkdir()
            t0 = time.perf_counter()
            seen = harness._sweep(name, templates, work, (mode,), exhaustive=True)  # raises on the first failure
            per_mode[mode] = {"faults": seen["trials"], "survived": seen["trials"], "ended_before": seen["before"],
                              "ended_after": seen["after"], "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            print(f"{name:>14} {mode:>9}: {seen['trials']} faults, all survived ({seen['before']} before, "
                  f"{seen['after']} after)", flush=True)  # fmt: skip
        results["commands"][name] = {"write_points": seen["points"], "faults": per_mode}
        out.parent.mkdir(parents=True, exist_ok=True)
        total = sum(m["faults"] for c in results["commands"].values() for m in c["faults"].values())
        results["total_faults"] = results["total_survived"] = total
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
