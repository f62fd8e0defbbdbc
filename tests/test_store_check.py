"""``check``: every invariant of an atlas is verified, damage is named, and only safe repairs are made."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from scalex_scale import api
from scalex_scale.cli import main
from scalex_scale.store import Atlas, check, ingest
from scalex_scale.store.txn import temporaries

from conftest import make_adata


@pytest.fixture
def atlas(tmp_path):
    store = tmp_path / "atlas.zarr"
    ingest(store, [make_adata(60, 30, seed=1, prefix="a", batch="b1"), make_adata(50, 30, seed=2, prefix="b", batch="b2")])
    api.preprocess(store, min_features=5, min_cells=1, n_top_features=20, n_workers=1)
    return store


def _damaged(store, tmp_path, fn):
    copy = tmp_path / "copy.zarr"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store, copy)
    fn(copy)
    return check(copy)


def test_a_healthy_atlas_passes(atlas, capsys):
    report = check(atlas)
    assert report.ok and not report.warnings, report.summary()
    assert len(report.checked) >= 6
    assert main(["check", str(atlas)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: zarr.open_array(p / "X" / "indptr", mode="r+").__setitem__(5, 10**9), "indptr decreases"),
        (lambda p: zarr.open_array(p / "X" / "indices", mode="r+").__setitem__(0, 999), "indices out of range"),
        (lambda p: zarr.open_array(p / "X" / "data", mode="r+").__setitem__(3, -1.0), "negative values"),
        (lambda p: zarr.open_array(p / "X" / "indptr", mode="r+").resize((50,)), "indptr has 50 entries"),
        (lambda p: zarr.open_array(p / "uns/scalex_scale/train/cells", mode="r+").__setitem__(0, 10**6), "outside"),
        (lambda p: zarr.open_array(p / "uns/scalex_scale/train/data", mode="r+").__setitem__(0, 7.0), "outside [0, 1]"),
        (lambda p: zarr.open_group(p / "uns/scalex_scale/train", mode="r+").attrs.update(id="other"), "id other differs"),
        (lambda p: zarr.open_group(p / "X", mode="r+").attrs.update(shape=[100, 30]), "indptr has 111 entries for 100"),
    ],
)
def test_damage_is_named(atlas, tmp_path, damage, message):
    report = _damaged(atlas, tmp_path, damage)
    assert not report.ok
    assert any(message in e for e in report.errors), report.errors


def test_obs_rows_and_state_mismatch(atlas, tmp_path):
    def drop_obs_rows(p):
        from scalex_scale.store.atlas import read_elem, write_elem

        g = zarr.open_group(p, mode="r+", use_consolidated=False)
        obs = read_elem(g["obs"]).iloc[:-5]
        write_elem(g, "obs", obs)

    report = _damaged(atlas, tmp_path, drop_obs_rows)
    assert any("obs has 105 rows but X has 110" in e for e in report.errors), report.errors


def test_orphans_are_warnings_and_repair_removes_them(atlas, capsys):
    (atlas.with_name(f".{atlas.name}.txn-deadbeef0000") / "X").mkdir(parents=True)
    (atlas.with_name(f".{atlas.name}.spill-deadbeef0000")).mkdir()
    report = check(atlas)
    assert report.ok and len(report.warnings) == 2
    assert main(["check", str(atlas), "--repair"]) == 0
    assert "repaired" in capsys.readouterr().out
    assert not temporaries(atlas) and not check(atlas).warnings


def test_an_interrupted_two_rename_publish_is_rolled_forward(atlas, tmp_path):
    from scalex_scale._fs import intent_path, link_tree

    # the state after a crash between the two renames: the atlas moved aside, the new copy not yet in place
    new, old = atlas.with_name(f".{atlas.name}.txn-aaaaaaaaaaaa"), atlas.with_name(f".{atlas.name}.old-bbbbbbbbbbbb")
    link_tree(atlas, new)
    intent_path(atlas).write_text(json.dumps({"new": new.name, "old": old.name}))
    atlas.rename(old)
    assert not atlas.exists()
    assert Atlas.open(atlas).n_obs == 110  # a reader finishes the publish (its writer is dead)
    assert not intent_path(atlas).exists() and not old.exists() and check(atlas).ok


def test_stale_consolidated_metadata_is_rewritten(atlas):
    meta = json.loads((atlas / "zarr.json").read_text())
    meta["consolidated_metadata"]["metadata"]["X/data"]["shape"] = [1]
    (atlas / "zarr.json").write_text(json.dumps(meta))
    report = check(atlas)
    assert report.ok and any("consolidated metadata is stale" in w for w in report.warnings)
    assert "rewrote the consolidated metadata" in check(atlas, repair=True).repaired
    assert not check(atlas).warnings
    assert np.isfinite(Atlas.open(atlas).indptr).all()
