"""The ``scalex-scale`` command line: a thin argparse layer over the steps of :mod:`scalex_scale.workflows`.

Options that set a config field are generated from the config dataclasses (``TrainConfig``, ``PreprocessConfig``):
their types, choices and defaults are the dataclasses'.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
import typing
from collections.abc import Sequence

from ._openmp import bound_openmp_spin

bound_openmp_spin()  # before torch is imported
from .errors import ScalexError, TrainingInterrupted  # noqa: E402


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


_ATLAS_HELP = "the atlas: a scalex-scale Zarr store (a directory, e.g. atlas.zarr)"
_NEW_ATLAS_HELP = "the atlas to create, or to append the inputs to as new batches (a Zarr directory, e.g. atlas.zarr)"
_MODEL_HELP = "model directory (a scalex-scale checkpoint, written by fit)"
_INPUTS_HELP = ".h5ad, .h5 (10x), AnnData .zarr, 10x MTX directories, or TileDB-SOMA experiments (raw counts)"
_DEVICE_HELP = "where the encoder runs (default: auto, CUDA when available)"


def _atlas(p: argparse.ArgumentParser, help_text: str = _ATLAS_HELP) -> None:
    p.add_argument("store", metavar="ATLAS", help=help_text)


def _add_batch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--batch-key", help="obs column holding each cell's batch")
    g.add_argument("--batch-names", type=_csv, help="one batch name per input, comma-separated")


def _field_args(p: argparse.ArgumentParser, cls: type, fields: dict[str, str], **overrides: dict) -> None:
    """One ``--field-name`` option per dataclass field: type, choices and default come from ``cls`` itself."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, help_text in fields.items():
        hint, default = hints[name], overrides.get(name, {}).get("default", defaults[name])
        flag = "--" + name.replace("_", "-")
        kwargs: dict = {"dest": name, "help": help_text}
        if hint is bool:
            kwargs.update(action="store_true", default=False)
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint) is typing.Literal:
                kwargs["choices"] = list(args)
            kwargs.update(type=args[0] if args and not isinstance(args[0], str) else (hint if isinstance(hint, type) else str))
            kwargs["default"] = default
            if default is not None:
                kwargs["help"] = f"{help_text} (default: {default})"
        kwargs.update(overrides.get(name, {}))
        p.add_argument(flag, **kwargs)


def _fields(args: argparse.Namespace, fields: dict[str, str]) -> dict:
    return {name: getattr(args, name) for name in fields}


def _preprocess_fields() -> dict[str, str]:
    """PreprocessConfig fields on the command line (defaults: the dataclass')."""
    from .preprocessing.state import DEFAULT_MIN_FEATURES, DEFAULT_N_TOP

    return {
    "profile": "RNA or ATAC (default: the profile given at ingest)",
    "n_top_features": f"features to select (default: RNA {DEFAULT_N_TOP['RNA']:,} HVGs, ATAC {DEFAULT_N_TOP['ATAC']:,} peaks)",
    "min_features": (
        f"min features per cell (default: RNA {DEFAULT_MIN_FEATURES['RNA']} genes, ATAC {DEFAULT_MIN_FEATURES['ATAC']} peaks)"
    ),
    "min_cells": "min cells per feature",
    "scale": "MaxAbs scaling per batch (the paper) or global (reference package 1.0.4)",
    "keep_mt": "keep MT-/mt-/ERCC genes",
    }

#: TrainConfig fields on the command line (defaults: the dataclass', i.e. the method's)
_TRAIN_FIELDS = {
    "max_iterations": "optimizer steps at most",
    "batch_size": "cells per mini-batch (per rank with --distributed)",
    "lr": "Adam learning rate",
    "patience": "epochs without a better loss before early stopping",
    "dsbn_singleton": "a batch's lone cell of a domain passes DSBN unchanged (the reference) or uses running statistics",
    "device": "where to train",
    "precision": "fp32, or bf16 autocast (CUDA, or a CPU with bf16)",
    "seed": "seed of the weights and the batch order",
    "compile": "torch.compile the training step",
    "cuda_graphs": "capture the training step in a CUDA graph",
}
_DEVICE = {"device": {"choices": ["auto", "cpu", "cuda"]}}


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    from .preprocessing.state import PreprocessConfig

    _field_args(p, PreprocessConfig, _preprocess_fields(), profile={"default": None})
    p.add_argument("--scheduler", default=None, help="dask.distributed scheduler address (default: local threads)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig

    _field_args(p, TrainConfig, _TRAIN_FIELDS, **_DEVICE)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-every", type=int, default=5000, metavar="N", dest="checkpoint_iterations",
                   help="save a resumable checkpoint at the end of the epoch after about every N iterations (default: 5000)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, metavar="M",
                   help="also save one after every M minutes of training; 0: never (default: 5). Ctrl-C or "
                        "SIGTERM saves one too, then says how to --resume")  # fmt: skip


def _checkpoint_kwargs(args: argparse.Namespace) -> dict:
    return {"checkpoint_iterations": args.checkpoint_iterations, "checkpoint_minutes": args.checkpoint_minutes}


def _train_config(args: argparse.Namespace):
    from .train.config import TrainConfig

    return TrainConfig(**_fields(args, _TRAIN_FIELDS), progress=not args.no_progress)


def _preprocess_kwargs(args: argparse.Namespace) -> dict:
    return {**_fields(args, _preprocess_fields()), "scheduler": args.scheduler}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalex-scale",
        description="Out-of-core single-cell data integration with SCALEX on Zarr atlases.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"scalex-scale {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument(
        "--no-wait", action="store_true",
        help="fail at once when another process is writing the atlas (default: wait for it)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="create an atlas from inputs, or append them as new batches")
    _atlas(p, _NEW_ATLAS_HELP)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUTS_HELP)
    _add_batch_args(p)
    p.add_argument("--join", choices=["inner", "outer"], default="inner",
                   help="genes of a new atlas from several inputs: those in all (inner) or in any (outer) (default: inner)")
    p.add_argument("--profile", choices=["RNA", "ATAC"], default="RNA", help="RNA genes or ATAC peaks (default: RNA)")
    p.add_argument("--allow-duplicates", action="store_true",
                   help="add cells already in the atlas (same names in the same batch, or the same file)")
    soma = p.add_argument_group("TileDB-SOMA inputs (CELLxGENE Census; needs pip install \"scalex-scale[soma]\")")
    soma.add_argument("--measurement", default=None, help="measurement to read (default: RNA)")
    soma.add_argument("--layer", default=None, help="X layer with the raw counts (default: raw)")
    soma.add_argument("--obs-filter", default=None, help="tiledbsoma value_filter on obs, e.g. \"tissue_general == 'blood'\"")

    p = sub.add_parser("check", help="verify every invariant of an atlas (and --repair what is safe to repair)")
    _atlas(p)
    p.add_argument("--repair", action="store_true",
                   help="finish an interrupted commit, remove orphaned temporaries, rewrite stale metadata")
    p.add_argument("--json", action="store_true", help="the report as JSON")

    p = sub.add_parser("info", help="summarise an atlas")
    _atlas(p)
    p.add_argument("--json", action="store_true", help="the summary as JSON")

    p = sub.add_parser("preprocess", help="filter, normalize, select features, scale; write the training matrix")
    _atlas(p)
    _add_preprocess_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the stored row permutation")

    p = sub.add_parser("fit", help="train the SCALEX model on a preprocessed atlas")
    _atlas(p, "a preprocessed atlas (scalex-scale preprocess)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="where to save the model (refused if it holds one: see --overwrite, --resume)")
    _add_train_args(p)
    p.add_argument("--resume", action="store_true", help="resume from MODEL_DIR's trainer state (exact to the batch)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in MODEL_DIR")
    _add_checkpoint_args(p)
    p.add_argument("--distributed", action="store_true", help="data-parallel over torchrun's processes")
    p.add_argument("--sync-dsbn", action="store_true", help="all-reduce per-domain DSBN statistics across ranks")

    p = sub.add_parser("embed", help="write obsm['latent'] for every cell of the atlas")
    _atlas(p, "the atlas the model was trained on")
    p.add_argument("model_dir", metavar="MODEL_DIR", help=_MODEL_HELP)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=_DEVICE_HELP)

    p = sub.add_parser("integrate", help="ingest + preprocess + fit + embed in one go")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUTS_HELP)
    p.add_argument("--outdir", required=True, help="new directory for OUTDIR/atlas.zarr and OUTDIR/model")
    _add_batch_args(p)
    p.add_argument("--join", choices=["inner", "outer"], default="inner",
                   help="genes of the atlas from several inputs: those in all (inner) or in any (outer) (default: inner)")
    _add_preprocess_args(p)
    _add_train_args(p)
    _add_checkpoint_args(p)

    p = sub.add_parser("project", help="embed new data with a trained model and append it to the atlas")
    _atlas(p, "the atlas the model was trained on (the query is appended to it as new batches)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help=_MODEL_HELP)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUTS_HELP + "; genes are aligned to the model's")
    _add_batch_args(p)
    p.add_argument("--query-store", default=None, metavar="ATLAS",
                   help="write the query to this separate (new or existing) atlas instead")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=_DEVICE_HELP)
    p.add_argument("--allow-duplicates", action="store_true", help="project cells already in the atlas again")

    p = sub.add_parser("transfer", help="transfer labels from reference to query cells in the latent space")
    p.add_argument("store", help="an embedded atlas (obsm['latent'], from embed or project), or a query store "
                   "written by project --query-store")
    p.add_argument("--label-key", required=True, help="obs column of the reference's labels (scalex-scale info lists the columns)")
    p.add_argument("--reference", default=None,
                   help="a separate reference atlas (same model; default for a --query-store: the atlas it was projected on)")
    p.add_argument("--reference-batches", type=_csv, default=None, metavar="B1,B2",
                   help="batches whose labels are transferred (default: the batches the model was trained on)")
    p.add_argument("--query-batches", type=_csv, default=None, metavar="B1,B2",
                   help="batches that receive labels (default: all other batches)")
    p.add_argument("--method", choices=["scalex", "knn5"], default="scalex",
                   help="scalex: weighted vote + 'unassigned' for novel cells; knn5: the reference package's rule")
    p.add_argument("--k", type=int, default=None,
                   help="neighbours of the vote (scalex; default: 5 or 30, chosen by cross-validation on the reference)")
    p.add_argument("--min-vote-fraction", type=float, default=0.0,
                   help="also 'unassigned' when the winning label holds less of the vote (scalex; 0: off)")
    p.add_argument("--no-novelty", action="store_true", help="no novelty call (scalex)")
    p.add_argument("--out", default=None, help="write the summary (counts, confusion, unassigned rates) as JSON here")

    p = sub.add_parser("evaluate", help="integration metrics (and plots with --out)")
    _atlas(p, "an embedded atlas (obsm['latent'], from embed or project)")
    p.add_argument("--label-key", default=None,
                   help="obs column of cell types, for the biology-conservation metrics (without it: batch mixing only)")
    p.add_argument("--out", default=None, help="directory for metrics.json, confusion.csv and PNG plots")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP (and its plot)")
    p.add_argument("--seed", type=int, default=0, help="seed of the metrics' random draws and of the UMAP (default: 0)")

    p = sub.add_parser("demo", help="the whole story on built-in synthetic data")
    p.add_argument("--outdir", default="scalex_demo", help="directory for the outputs: new, or an earlier demo's (replaced) (default: scalex_demo)")
    p.add_argument("--n-cells", type=int, default=6000, help="synthetic cells (default: 6000)")
    p.add_argument("--max-iterations", type=int, default=1500, help="training iterations (default: 1500)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the model (default: 0)")
    return parser


def _qc_lines(state) -> list[str]:
    """One line per batch: how many cells passed QC and how many it removed."""
    return [
        f"  batch {b}: {k:,} of {n:,} cells pass QC ({n - k:,} removed)" for b, (n, k) in state.qc_cells.items()
    ]


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run(args: argparse.Namespace) -> int:
    from . import api

    cmd = args.command
    wait = 0 if args.no_wait else None
    if cmd == "ingest":
        report = api.ingest(
            args.store, args.inputs, batch_key=args.batch_key, batch_names=args.batch_names, join=args.join,
            profile=args.profile, allow_duplicates=args.allow_duplicates, lock_timeout=wait,
            measurement=args.measurement, layer=args.layer, obs_filter=args.obs_filter,
        )  # fmt: skip
        print(f"ingested {report.n_cells_added:,} cells into {report.path} ({report.n_genes:,} genes)")
        for b, n in report.batches_added.items():
            print(f"  batch {b}: {n:,} cells")
        for name, n in report.genes_missing.items():
            if n:
                print(f"  {name}: {n:,} atlas genes missing (zero-filled); {report.genes_dropped[name]:,} extra genes dropped")
        if report.cells_renamed:
            print(f"  {report.cells_renamed:,} clashing cell names made unique")
    elif cmd == "check":
        report = api.check(args.store, repair=args.repair)
        if args.json:
            _print_json(report.to_dict())
        else:
            print(report.summary())
        return 0 if report.ok else 1
    elif cmd == "info":
        from .store import Atlas

        atlas = Atlas.open(args.store)
        if args.json:
            _print_json(atlas.info())
        else:
            print(atlas.summary())
    elif cmd == "preprocess":
        state = api.preprocess(args.store, seed=args.seed, lock_timeout=wait, **_preprocess_kwargs(args))
        print(f"preprocessed {args.store}: {state.n_cells_kept:,} training cells x {state.n_features:,} features")
        for line in _qc_lines(state):
            print(line)
    elif cmd == "fit":
        result = api.fit(
            args.store, args.model_dir, _train_config(args), resume=args.resume, distributed=args.distributed,
            sync_dsbn=args.sync_dsbn, overwrite=args.overwrite, **_checkpoint_kwargs(args),
        )  # fmt: skip
        if result is not None:
            print(f"trained {result.n_iterations:,} iterations in {result.seconds:.1f} s; model in {args.model_dir}")
    elif cmd == "embed":
        api.embed(args.store, args.model_dir, device=args.device, lock_timeout=wait)
        print(f"wrote obsm['latent'] to {args.store}")
    elif cmd == "integrate":
        out = api.integrate(
            args.inputs, args.outdir, batch_key=args.batch_key, batch_names=args.batch_names, join=args.join,
            train=_train_config(args), **_checkpoint_kwargs(args), **_preprocess_kwargs(args),
        )
        print(out.summary())
    elif cmd == "project":
        report = api.project(
            args.store, args.model_dir, args.inputs, batch_key=args.batch_key, batch_names=args.batch_names,
            query_store=args.query_store, device=args.device, allow_duplicates=args.allow_duplicates,
            lock_timeout=wait,
        )  # fmt: skip
        print(report.summary())
    elif cmd == "transfer":
        from .metrics.label_transfer import TransferConfig

        config = TransferConfig(k=args.k, min_vote_fraction=args.min_vote_fraction, novelty=not args.no_novelty)
        summary = api.transfer(
            args.store, args.label_key, reference=args.reference, reference_batches=args.reference_batches,
            query_batches=args.query_batches, method=args.method, config=config, lock_timeout=wait,
        )  # fmt: skip
        print(summary.summary())
        if args.out:
            print(f"  summary written to {summary.write_json(args.out)}")
    elif cmd == "evaluate":
        result = api.evaluate(args.store, label_key=args.label_key, out=args.out, umap=not args.no_umap, seed=args.seed)
        print(result.table())
    elif cmd == "demo":
        from .demo import run_demo

        run_demo(args.outdir, n_cells=args.n_cells, max_iterations=args.max_iterations, device=args.device, seed=args.seed)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return run(args)
    except TrainingInterrupted as err:
        if args.debug:
            raise
        print(f"scalex-scale {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum if err.signum else 130
    except ScalexError as err:
        if args.debug:
            raise
        print(f"scalex-scale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"scalex-scale {args.command}: interrupted; nothing was committed by the interrupted step", file=sys.stderr)
        return 130
    except OSError as err:
        if args.debug:
            raise
        where = f" ({err.filename})" if err.filename else ""
        hint = "free some space and run it again" if err.errno == errno.ENOSPC else "check the path and its permissions"
        print(f"scalex-scale {args.command}: error: {err.strerror or err}{where}; atlases are unchanged: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
