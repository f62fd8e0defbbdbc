"""Crash injection at every write point, SQLite-style: the atlas is always as before or as after a command.

For each write command: count its write points (every Zarr set/delete, link, publish, cleanup, checkpoint file),
then for every k make the k-th point fail, in-process (an exception: the command's clean-up runs, as for Ctrl-C
or a full disk) and in a forked child that ``os._exit``s there (no clean-up, as for ``kill -9``). After each:
the atlas opens with ``anndata.read_zarr``, ``check`` finds no error, its content equals the state before or the
state after the command (never a mix), and the next command succeeds and leaves no temporaries.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import pytest
import torch
import zarr

from scalex_scale import api
from scalex_scale._faults import InjectedFault, inject
from scalex_scale._fs import link_tree
from scalex_scale.store import Atlas, check
from scalex_scale.store.txn import temporaries
from scalex_scale.train import TrainConfig

from conftest import make_adata

#: Timings, and the commit counter (a follow-up command that commits again bumps it).
VOLATILE = {"time", "seconds", "started", "generation", "history"}


def _normal(obj):
    if isinstance(obj, dict):
        return {k: _normal(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_normal(v) for v in obj]
    return obj


def atlas_digest(path: Path):
    """Every file's hash (the state's chunk aside) plus the state with its timings removed; None when absent."""
    if not path.exists():
        return None
    files = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            rel = p.relative_to(path).as_posix()
            if not rel.startswith("uns/scalex_scale/state/"):
                files.append((rel, hashlib.sha1(p.read_bytes()).hexdigest()))
    return tuple(files), json.dumps(_normal(Atlas.open(path).state), sort_keys=True)


def model_digest(path: Path):
    if not (path / "model.safetensors").exists():
        return None
    meta = json.loads((path / "trainer_state.json").read_text()) if (path / "trainer_state.json").exists() else {}
    return hashlib.sha1((path / "model.safetensors").read_bytes()).hexdigest(), meta.get("iteration")


def _cfg() -> TrainConfig:
    return TrainConfig(max_iterations=12, batch_size=16, device="cpu", progress=False, seed=0)


def _barcoded(a: ad.AnnData, tag: str) -> ad.AnnData:
    """``a`` with a barcode column: every value distinct, so the atlas stores it as strings (with STRINGS_AFTER small)."""
    a = a.copy()
    a.obs["barcode"] = [f"{tag}{i}" for i in range(a.n_obs)]
    return a


@contextmanager
def _few_strings():
    """A text column past 8 distinct values is stored as strings (the default threshold, ROW_CHUNK rows, is far above
    these tiny atlases): the only way their appends reach the strings-on-append path of ObsWriter."""
    from scalex_scale.store import obs_stream

    previous = obs_stream.STRINGS_AFTER
    obs_stream.STRINGS_AFTER = 8
    try:
        yield
    finally:
        obs_stream.STRINGS_AFTER = previous


def _append_strings(a: Path, m: Path) -> object:
    with _few_strings():
        return api.ingest(a, [_barcoded(A3, "c")], batch_names=["b3"])


A1 = make_adata(50, 30, seed=1, prefix="a", batch="b1")
A2 = make_adata(40, 30, seed=2, prefix="b", batch="b2")
A3 = make_adata(30, 30, seed=3, prefix="c", batch="b3")
Q = make_adata(30, 30, seed=4, prefix="q")
PREP = dict(min_features=5, min_cells=1, n_top_features=20, n_workers=1)


@dataclass(frozen=True)
class Command:
    """A write command: from which template it starts and what it does to ``(atlas, model_dir)``."""

    start: str
    run: Callable[[Path, Path], object]
    #: what to run after a crash that left the state "after" (the command itself may be refused then)
    follow: Callable[[Path, Path], object] | None = None
    #: False where the command runs numba's OpenMP pool, which refuses fork(): kill a spawned child instead
    forkable: bool = True


COMMANDS = {
    "ingest": Command("empty", lambda a, m: api.ingest(a, [A1, A2])),
    "append": Command("ingested", lambda a, m: api.ingest(a, [A3], batch_names=["b3"])),
    # an atlas holding a strings column (barcodes): the append streams it back as strings from its first row
    "append-strings": Command("ingested-strings", _append_strings),
    "preprocess": Command("ingested", lambda a, m: api.preprocess(a, **PREP)),
    "re-preprocess": Command("preprocessed", lambda a, m: api.preprocess(a, **{**PREP, "n_top_features": 12, "seed": 3})),
    "fit": Command("preprocessed", lambda a, m: api.fit(a, m, _cfg()), lambda a, m: api.fit(a, m, _cfg(), resume=True)),
    "embed": Command("fitted", lambda a, m: api.embed(a, m, device="cpu")),
    "project": Command("embedded", lambda a, m: api.project(a, m, [Q], batch_names=["q"], device="cpu")),
    "transfer": Command("projected", lambda a, m: api.transfer(a, "celltype", query_batches=["q"]), forkable=False),
}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Atlases (and the model) at each stage, built once; trials copy them to fixed paths."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("templates")
    a, m = root / "atlas.zarr", root / "model"
    out = {"empty": (None, None)}

    def save(name: str) -> None:
        dst = root / name
        shutil.copytree(a, dst / "atlas.zarr")
        if m.exists():
            shutil.copytree(m, dst / "model")
        out[name] = (dst / "atlas.zarr", dst / "model" if m.exists() else None)

    with _few_strings():
        api.ingest(a, [_barcoded(A1, "a"), _barcoded(A2, "b")])
    assert dict(zarr.open_group(a / "obs", mode="r")["barcode"].attrs)["encoding-type"] == "string-array"
    save("ingested-strings")
    shutil.rmtree(a)
    api.ingest(a, [A1, A2])
    save("ingested")
    api.preprocess(a, **PREP)
    save("preprocessed")
    api.fit(a, m, _cfg())
    save("fitted")
    api.embed(a, m, device="cpu")
    save("embedded")
    api.project(a, m, [Q], batch_names=["q"], device="cpu")
    save("projected")
    return out


class Trial:
    """Fixed paths (the state records absolute paths, so every trial must use the same ones)."""

    def __init__(self, root: Path, templates, command: Command) -> None:
        self.atlas, self.model = root / "atlas.zarr", root / "model"
        self.templates, self.command = templates, command

    def reset(self) -> None:
        for p in (self.atlas, self.model):
            shutil.rmtree(p, ignore_errors=True)
        for _, p in temporaries(self.atlas) + temporaries(self.model):
            shutil.rmtree(p, ignore_errors=True)
        src_atlas, src_model = self.templates[self.command.start]
        # hard links: as safe as a copy, since nothing writes into an existing file (the point of the protocol)
        if src_atlas is not None:
            link_tree(src_atlas, self.atlas)
        if src_model is not None:
            link_tree(src_model, self.model)

    def run(self) -> None:
        self.command.run(self.atlas, self.model)

    def digests(self):
        return atlas_digest(self.atlas), model_digest(self.model)


def _spawned(name: str, trial: Trial, k: int) -> int:
    """Run command ``name`` in a new Python process that ``os._exit``s at write point k; its exit status."""
    import subprocess
    import sys

    tests, atlas, model = str(Path(__file__).parent), str(trial.atlas), str(trial.model)
    code = (
        f"import sys, torch; torch.set_num_threads(1); sys.path.insert(0, {tests!r}); import test_store_crash as t; "
        f"t.COMMANDS[{name!r}].run(t.Path({atlas!r}), t.Path({model!r}))"
    )
    env = {**os.environ, "SCALEX_SCALE_FAULT": f"exit:{k}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode


def _forked(fn: Callable[[], object], mode: str, k: int) -> int:
    """Run ``fn`` in a forked child with the fault plan; the child's exit status (137: crashed at point k)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            import dask.threaded

            dask.threaded.pools.clear()  # the parent's worker threads do not exist in the child
            dask.threaded.default_pool = None
            with inject(mode, k):  # type: ignore[arg-type]
                fn()
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _verified(trial: Trial) -> None:
    """The atlas opens with anndata and passes every check (done once per distinct state: equal bytes, equal result)."""
    if trial.atlas.exists():
        ad.read_zarr(trial.atlas)
        report = check(trial.atlas)
        assert report.ok, report.errors


def _where(trial: Trial, before, after, k: int) -> str:
    from scalex_scale._fs import intent_path

    if not trial.atlas.exists() and intent_path(trial.atlas).exists():
        Atlas.open(trial.atlas)  # the two-rename fallback, killed between its renames: the next reader finishes it
    now = trial.digests()
    assert now[0] in (before[0], after[0]), f"point {k}: the atlas is neither as before nor as after (a mix)"
    assert now[1] in (before[1], after[1]), f"point {k}: the model directory is neither as before nor as after"
    return "before" if now == before else "after"


def _next_command(trial: Trial, where: str, after) -> None:
    """Re-run the command if nothing landed; else its follow-up (fit: --resume) or a check --repair."""
    if where == "before":
        trial.run()
    elif trial.command.follow is not None:
        trial.command.follow(trial.atlas, trial.model)
    else:
        assert check(trial.atlas, repair=True).ok
    assert trial.digests() == after
    assert not temporaries(trial.atlas), "the next command left temporaries"


def _sweep(name: str, templates, tmp_path: Path, modes: tuple[str, ...], *, exhaustive: bool) -> dict[str, int]:
    """Fail each write point in turn; returns how many trials ended as before / as after.

    Every trial checks that the atlas is byte-identical to the state before or after the command (both verified
    once with ``anndata.read_zarr`` and ``check``) and that no temporary is left (except by a killed process).
    The next command runs after every trial that left the state "after" or an orphan, and after every 8th other
    one. Killed children (``exit``), Ctrl-C and ENOSPC fail every point of the commit protocol itself (links,
    publish, clean-up, checkpoint and spill files), the 12 Zarr writes before the publish, and every 4th other
    Zarr write: the other points are writes into the private copy, where a kill leaves the same "before + orphan"
    state (and an exception the same "before"; ``raise`` covers every point).
    ``exhaustive`` (the slow test) does every point with every fault and the next command after every trial.
    """
    trial = Trial(tmp_path, templates, COMMANDS[name])
    trial.reset()
    before = trial.digests()
    _verified(trial)
    with inject("count") as plan:
        trial.run()
    after = trial.digests()
    _verified(trial)
    assert after != before
    n_points = plan.count
    publish = max(i for i, (op, _) in enumerate(plan.log, 1) if op.startswith("publish"))
    sampled = {i for i, (op, _) in enumerate(plan.log, 1) if not op.startswith("zarr.") or i >= publish - 12 or i % 4 == 0}
    spawn_sampled = {i for i, (op, _) in enumerate(plan.log, 1) if not op.startswith("zarr.") or i >= publish - 3 or i % 10 == 0}
    seen = {"points": n_points, "trials": 0, "before": 0, "after": 0, "after_publish": n_points - publish}
    for mode in modes:
        for k in range(1, n_points + 1):
            if mode != "raise" and not exhaustive and k not in sampled:
                continue
            trial.reset()
            completed = False
            if mode == "exit":
                if trial.command.forkable:
                    code = _forked(trial.run, "exit", k)
                elif exhaustive or k in spawn_sampled:
                    code = _spawned(name, trial, k)
                else:
                    continue
                assert code in (137, 0), f"point {k}: the child failed otherwise (exit {code})"
            else:
                exc = {"raise": InjectedFault, "interrupt": KeyboardInterrupt, "enospc": OSError}[mode]
                try:
                    with inject(mode, k):  # type: ignore[arg-type]
                        trial.run()
                    completed = True  # the fault hit a clean-up after the commit: the commit stands
                except exc:
                    pass
            where = _where(trial, before, after, k)
            assert not completed or where == "after", f"point {k}: completed but the atlas is not as after"
            left = [p for t, p in temporaries(trial.atlas) if t != "pin"]
            if mode != "exit" and where == "before":
                assert not left, f"point {k}: temporaries left after an in-process failure: {left}"
            seen["trials"] += 1
            seen[where] += 1
            if exhaustive or where == "after" or left or k % 8 == 0:
                _next_command(trial, where, after)
    return seen


#: In CI: every command but the first preprocess (the re-preprocess runs the same code and replaces a matrix too).
CI_COMMANDS = [c for c in COMMANDS if c != "preprocess"]


@pytest.mark.parametrize("name", CI_COMMANDS)
def test_every_write_point_raise_and_kill(name, templates, tmp_path):
    seen = _sweep(name, templates, tmp_path, ("raise", "exit"), exhaustive=False)
    assert seen["before"] > 0, seen
    assert seen["after"] > 0 or seen["after_publish"] == 0, seen  # faults landed on both sides of the commit point


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_write_point_every_fault_exhaustive(name, templates, tmp_path):
    _sweep(name, templates, tmp_path, ("raise", "interrupt", "enospc", "exit"), exhaustive=True)


def test_ctrl_c_and_full_disk(templates, tmp_path):
    """Ctrl-C (delivered to the main thread) and ENOSPC at the commit protocol's points and every 4th write."""
    _sweep("append", templates, tmp_path, ("interrupt", "enospc"), exhaustive=False)


def test_exchange_fallback_two_renames(templates, tmp_path, monkeypatch):
    """Where renameat2 is unavailable, the two-rename publish with its intent file is just as safe."""
    import scalex_scale._fs as fs

    monkeypatch.setattr(fs, "_FORCE_FALLBACK", True)
    seen = _sweep("append", templates, tmp_path, ("raise", "exit"), exhaustive=False)
    assert seen["after"] > 0


def test_no_stale_record_survives_a_crash_between_matrix_and_state(templates, tmp_path):
    """Issue #12.5: the training matrix and its state commit together, so fit never sees a mismatch."""
    trial = Trial(tmp_path, templates, COMMANDS["re-preprocess"])
    for k in (5, 60, 120):
        trial.reset()
        with inject("raise", k), pytest.raises(InjectedFault):
            trial.run()
        atlas = Atlas.open(trial.atlas)
        assert atlas.training_matrix().n_features == len(atlas.state["preprocess"]["features"])
