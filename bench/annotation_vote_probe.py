#!/usr/bin/env python
"""Why ``transfer`` trails plain kNN k = 30 on a split: the vote's k, label-free ways to choose it, and the latent.

An investigation of the cached runs of ``bench/annotation_real.py`` (its ``--workdir``), written for the one split
where the default transfer misses the better plain kNN by more than 0.01 (Baron human -> mouse), and run on its
mirror (mouse -> human) as the control. Per run (split, seed), on the run's own latent:

* ``per_type_f1``: the F1 of every query type under the transfer vote without the novelty call (k = 5, distance
  weights; the k the cross-validation picks on this split), plain kNN k = 5 and k = 30 (uniform), and the number of
  query cells each gets right;
* ``within_set_knn5``: 5-fold cross-validated 5-NN accuracy inside the reference cells alone and inside the query
  cells alone (how well the latent separates the types at all, without any transfer between species);
* ``k_choice``: which of k = 5 / 30 each label-free rule would choose, beside the query's macro-F1 at each k
  (the truth the rules cannot see):
  ``cv`` the method's cross-validation on held-out reference batches (mean of ARI and macro-F1);
  ``cv_density`` the same with k scaled by the share of the reference a fold keeps (a k-NN vote on fewer cells);
  ``cv_weighted`` importance-weighted cross-validation for a shifted query (held-out reference cells weighted by
  the share of query cells among their 30 nearest pooled cells, i.e. how query-like they are: macro-F1 and
  accuracy);
  ``reverse`` reverse validation (label the query with k, then the reference from the labelled query with 5
  neighbours; the score of the reference's true labels); ``query_f1`` is the method's distance-weighted vote at
  each k, ``query_f1_uniform`` the uniform one (plain kNN's).

With ``--reference-package SPLIT:FIT_DIR:PROJECT_DIR[,...]`` (outputs of ``bench/reference_runner.py fit`` on a split's
``ref.h5ad`` and ``project`` of its ``query.h5ad``, in the reference venv) the same within-set accuracy and the plain
kNN scores are computed on the ORIGINAL package's latents (its own train-mode embedding and the eval-mode one), to
tell a weakness of the method from one of this implementation.

Usage (our venv, after the harness has trained the runs)::

    python bench/annotation_vote_probe.py --workdir bench/_work/annot \
        --runs baron_human_to_mouse,baron_mouse_to_human --seeds 0,1,2,3,4
    # the original package on the same split (seeds 0-2), then scored here
    S=bench/_work/annot/splits/baron_human_to_mouse
    for s in 0 1 2; do bench/.ref-venv/bin/python bench/reference_runner.py fit --input $S/ref.h5ad \
        --outdir /tmp/ref_s$s --max-iteration 3000 --seed $s --threads 1 --num-workers 0 &&
      bench/.ref-venv/bin/python bench/reference_runner.py project --input $S/query.h5ad --model /tmp/ref_s$s \
        --outdir /tmp/ref_s${s}_q --threads 1 --num-workers 0; done
    python bench/annotation_vote_probe.py --workdir bench/_work/annot \
        --reference-package baron_human_to_mouse:/tmp/ref_s0:/tmp/ref_s0_q,baron_human_to_mouse:/tmp/ref_s1:/tmp/ref_s1_q,...

Writes ``bench/results/<machine>/annotation_vote_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import annotation_real as harness  # noqa: E402

from _env import results_dir, write_json  # noqa: E402

KS = (5, 30)


def vote(ref_X: np.ndarray, ref_labels: np.ndarray, q_X: np.ndarray, k: int, weighting: str) -> np.ndarray:
    """The query's vote winners under transfer's vote (``k`` neighbours, ``weighting``) without the novelty call."""
    from scalex_scale.metrics.label_transfer import TransferConfig, transfer_labels

    return transfer_labels(ref_X, ref_labels, q_X, TransferConfig(k=k, weighting=weighting, novelty=False)).predicted


def per_type(run: dict, seed: int) -> dict:
    from sklearn.metrics import f1_score

    from scalex_scale.metrics.label_transfer import TransferConfig, knn_classifier_transfer, transfer_labels

    r, q, lab = run["ref"], run["query"], run["labels"]
    truth = lab[q]
    types = sorted(set(truth))
    preds = {"transfer_k5_distance_no_novelty": transfer_labels(
        run["X"][r], lab[r], run["X"][q], TransferConfig(k=5, novelty=False), ref_batches=run["batch"][r], rng=seed).labels}
    for k in KS:
        preds[f"knn{k}"] = knn_classifier_transfer(run["X"][r], lab[r], run["X"][q], k=k)
    return {"types": types, **{name: {"f1": [round(float(v), 4) for v in f1_score(truth, p.astype(str), labels=types, average=None)],
                                      "n_right": int((p.astype(str) == truth).sum())} for name, p in preds.items()}}


def within_set(run: dict) -> dict:
    from sklearn.model_selection import cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    out = {}
    for part in ("ref", "query"):
        m = run[part]
        p = cross_val_predict(KNeighborsClassifier(5), run["X"][m], run["labels"][m], cv=5)
        out[part] = round(float(np.mean(p == run["labels"][m])), 4)
    return out


def k_choice(run: dict, seed: int) -> dict:
    from sklearn.metrics import f1_score

    from scalex_scale.metrics._utils import as_generator, encode_labels
    from scalex_scale.metrics.knn import knn_query
    from scalex_scale.metrics.label_transfer import TransferConfig, _cv_predictions, _folds
    from scalex_scale.metrics.paper import ari, f1_scores

    R, Q = run["X"][run["ref"]], run["X"][run["query"]]
    codes, cats = encode_labels(run["labels"][run["ref"]])
    q_truth = run["labels"][run["query"]]

    def score(t: np.ndarray, p: np.ndarray) -> float:
        return 0.5 * (ari(t, p) + f1_scores(t, p)["f1_macro"])

    cfg = TransferConfig()
    gen = as_generator(seed)
    folds, held = _folds(run["batch"][run["ref"]], len(codes), cfg.max_folds, cfg.max_null_cells, gen)
    keep = float(np.mean([np.mean(folds != f) for f in np.unique(folds)]))
    scaled = {k: max(1, round(k * keep)) for k in KS}
    preds = _cv_predictions(R, codes, folds, held, sorted(set(KS) | set(scaled.values())), cfg, gen, None)
    # query-likeness of each reference cell: share of query cells among its 30 nearest pooled cells, over the mixed share
    m = 30
    _, d_rr = knn_query(R, R, m + 1)
    _, d_rq = knn_query(Q, R, m)
    merged = np.concatenate([d_rr[:, 1:], d_rq], axis=1)
    from_q = (np.argsort(merged, axis=1, kind="stable")[:, :m] >= m).mean(axis=1)
    weight = from_q / (Q.shape[0] / (R.shape[0] + Q.shape[0] - 1))
    out: dict = {"fold_keeps_share": round(keep, 3), "scaled_k": scaled, "rules": {}, "query_f1": {}}
    rules = {"cv": {}, "cv_density": {}, "cv_weighted": {}, "reverse": {}}
    for k in KS:
        p = preds[k]
        ok = p >= 0
        rules["cv"][k] = score(codes[ok], p[ok])
        ps = preds[scaled[k]]
        oks = ps >= 0
        rules["cv_density"][k] = score(codes[oks], ps[oks])
        rules["cv_weighted"][k] = 0.5 * (f1_score(codes[ok], p[ok], average="macro", sample_weight=weight[ok])
                                         + float(np.average(codes[ok] == p[ok], weights=weight[ok])))
        pq = vote(R, cats[codes], Q, k, cfg.weighting)
        rules["reverse"][k] = score(cats[codes], vote(Q, pq, R, 5, cfg.weighting))
        out["query_f1"][k] = round(float(f1_scores(q_truth, pq.astype(str))["f1_macro"]), 4)
        pu = vote(R, cats[codes], Q, k, "uniform")
        out["query_f1_uniform"] = {**out.get("query_f1_uniform", {}), k: round(float(f1_scores(q_truth, pu.astype(str))["f1_macro"]), 4)}
    for name, sc in rules.items():
        out["rules"][name] = {"scores": {k: round(float(v), 4) for k, v in sc.items()}, "chooses": max(sc, key=lambda k: (sc[k], k))}
    # the k that is best for the method's (distance-weighted) vote; the uniform votes are plain kNN's
    out["best_k_on_the_query"] = max(out["query_f1"], key=lambda k: (out["query_f1"][k], k))
    return out


def reference_package(fit_dir: Path, project_dir: Path) -> dict:
    """Within-set 5-NN accuracy and plain kNN transfer scores on the original package's latents of one run."""
    from sklearn.model_selection import cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    from scalex_scale.metrics.label_transfer import knn_classifier_transfer

    ro = pd.read_csv(fit_dir / "obs.csv", dtype=str)
    qo = pd.read_csv(project_dir / "obs.csv", dtype=str)
    run = json.loads((fit_dir / "run.json").read_text())
    out: dict = {"fit_dir": str(fit_dir), "scalex_kwargs": run.get("scalex_kwargs"), "versions": run.get("versions"),
                 "training": {k: v for k, v in (run.get("training") or run).items()
                              if k in ("iterations_done", "epochs_run", "best_epoch", "max_iteration")}}
    for name in ("latent", "latent_eval"):
        R, Q = np.load(fit_dir / f"{name}.npy"), np.load(project_dir / f"{name}.npy")
        r_lab, q_lab = ro["celltype"].to_numpy(), qo["celltype"].to_numpy()
        e = {f"within_{part}": round(float(np.mean(cross_val_predict(KNeighborsClassifier(5), X, y, cv=5) == y)), 4)
             for part, X, y in (("ref", R, r_lab), ("query", Q, q_lab))}
        for k in KS:
            e[f"knn{k}"] = harness.label_metrics(q_lab, knn_classifier_transfer(R, r_lab, Q, k=k).astype(str))
        out[name] = e
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(HERE / "_work" / "annot"))
    p.add_argument("--runs", default="baron_human_to_mouse,baron_mouse_to_human", help="split ids (main group)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--reference-package", default="", metavar="SPLIT:FIT:PROJECT[,...]",
                   help="bench/reference_runner.py fit / project output directories of the original package")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    splits = {s.id: s for s in harness.base_splits()}
    rows = []
    for sid in a.runs.split(","):
        for seed in (int(x) for x in a.seeds.split(",")):
            d = harness.run_dir(Path(a.workdir), splits[sid], seed, a.iterations)
            if not (d / "done").exists():
                print(f"skip {d}: not trained", flush=True)
                continue
            run = harness.run_cells(d)
            run["X"] = run["X"].astype(np.float32)
            row = {"split": sid, "seed": seed, "per_type_f1": per_type(run, seed), "within_set_knn5": within_set(run),
                   "k_choice": k_choice(run, seed)}
            rows.append(row)
            kc = row["k_choice"]
            print(f"{sid} seed {seed}: query F1 k5/k30 {kc['query_f1']}, chosen "
                  + ", ".join(f"{n} {v['chooses']}" for n, v in kc["rules"].items()) + f"; within-set 5-NN {row['within_set_knn5']}",
                  flush=True)
    summary = {}
    for sid in {r["split"] for r in rows}:
        rr = [r for r in rows if r["split"] == sid]
        summary[sid] = {"n_seeds": len(rr),
                        "best_k_on_the_query": [r["k_choice"]["best_k_on_the_query"] for r in rr],
                        "query_f1_mean": {f"{w}{k}": float(np.mean([r["k_choice"][key][k] for r in rr]))
                                          for w, key in (("distance", "query_f1"), ("uniform", "query_f1_uniform")) for k in KS},
                        "chosen": {n: [r["k_choice"]["rules"][n]["chooses"] for r in rr] for n in rr[0]["k_choice"]["rules"]},
                        "within_set_knn5_mean": {part: float(np.mean([r["within_set_knn5"][part] for r in rr])) for part in ("ref", "query")}}
    ref_pkg = [{"split": sid, **reference_package(Path(f), Path(q))}
               for sid, f, q in (entry.split(":") for entry in filter(None, a.reference_package.split(",")))]
    for sid in sorted({r["split"] for r in ref_pkg}):
        runs = [r for r in ref_pkg if r["split"] == sid]

        def mean(name: str, *path: str, runs: list[dict] = runs) -> float:
            vals = []
            for r in runs:
                v = r[name]
                for key in path:
                    v = v[key]
                vals.append(v)
            return float(np.mean(vals))

        summary.setdefault(sid, {})["reference_package"] = {"n_runs": len(runs), **{
            name: {"within_ref": mean(name, "within_ref"), "within_query": mean(name, "within_query"),
                   **{f"knn{k}": {m: mean(name, f"knn{k}", m) for m in ("ARI", "f1_macro")} for k in KS}}
            for name in ("latent", "latent_eval")}}
    out = Path(a.out) if a.out else results_dir() / "annotation_vote_probe.json"
    write_json(out, {"description": __doc__.split("\n\n")[1].strip(), "workdir_runs": a.runs, "seeds": a.seeds,
                     "iterations": a.iterations, "summary": summary, "per_run": rows, "reference_package_runs": ref_pkg})
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
