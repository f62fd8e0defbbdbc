#!/usr/bin/env python
"""Which runs of an annotation_real.json a change of the DSBN singleton rule touches: an exact replay.

For every per-run row (except ``--skip`` split prefixes and the nostop groups) the run's atlas is rebuilt as the
harness's ``_train`` builds it (ingest + preprocess of the split's reference file), its training loader
(``TrainConfig(seed=run seed)``) is replayed for the iterations the run trained, and the rows whose domain has exactly
one row in their mini-batch are counted. A run with none trains bit for bit alike under ``dsbn_singleton`` =
``"passthrough"`` and ``"running"`` (the rules differ only on such rows), so its committed row stands.

Usage (our venv; the harness's split files under ``--workdir``, made on first use)::

    python bench/annotation_singletons.py --results bench/results/amd-epyc-2c/annotation_real.json \
        --skip onek1k,baron_human_to_mouse

Writes ``bench/results/<machine>/annotation_singletons.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import annotation_real as harness  # noqa: E402

from _env import results_dir, write_json  # noqa: E402


def singleton_rows(atlas: Path, seed: int, n_iterations: int) -> int:
    """Rows of the first ``n_iterations`` training batches whose domain has one row in their batch."""
    from scalex_scale.data.loader import TrainingLoader
    from scalex_scale.store import Atlas
    from scalex_scale.train import TrainConfig

    single = seen = epoch = 0
    with Atlas.open(atlas).pinned_training_matrix() as (source, _), \
            TrainingLoader.from_train_config(source, TrainConfig(seed=seed)) as loader:  # fmt: skip
        while seen < n_iterations:
            for batch in loader.epoch(epoch):
                dom = np.asarray(batch.domain)
                single += int((np.bincount(dom)[dom] == 1).sum())
                seen += 1
                if seen == n_iterations:
                    break
            epoch += 1
    return single


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--results", required=True, help="an annotation_real.json")
    p.add_argument("--skip", default="", help="comma-separated split-id prefixes not to replay (trained again anyway)")
    p.add_argument("--workdir", default=str(HERE / "_work" / "annot"))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    old = json.loads(Path(a.results).read_text())
    work = Path(a.workdir)
    skip = tuple(x for x in a.skip.split(",") if x)
    base = harness.base_splits()
    splits = {s.id: s for s in [*base, *harness.loto_splits(work, base)]}
    runs, built = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        atlas = Path(tmp) / "atlas.zarr"
        for r in old["per_run"]:
            if (skip and r["split"].startswith(skip)) or r["group"].startswith("nostop"):
                continue
            s = splits[r["split"]]
            if built != s.id:  # the atlas depends on the split only
                shutil.rmtree(atlas, ignore_errors=True)
                ref, _ = harness.split_files(work, s)
                d = harness.DATASETS[s.dataset]
                harness.reference_atlas(atlas, ref, d.min_features, d.n_top_features)
                built = s.id
            n = singleton_rows(atlas, r["seed"], r["train"]["n_iterations"])
            runs[f"{r['split']}|seed {r['seed']}|{r['iterations']} it|{r['group']}"] = n
            print(f"{r['split']} seed {r['seed']} ({r['train']['n_iterations']} it): {n} singleton rows", flush=True)
    touched = sorted(k for k, v in runs.items() if v)
    out = Path(a.out) if a.out else results_dir() / "annotation_singletons.json"
    write_json(out, {"description": __doc__.split("\n\n")[1].strip(), "results": str(a.results),
                     "results_git_commit": old.get("git_commit"), "skipped_prefixes": list(skip),
                     "n_runs": len(runs), "touched": touched, "singleton_rows": runs})  # fmt: skip
    print(f"{len(touched)} of {len(runs)} runs had a singleton: {touched}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
