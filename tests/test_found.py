"""Click to find: correspondence queries on a real run's cached features; found clusters in maps and exports."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.rundir import RunDir
from stego_app import export, found, groups, runs, segmaps
from stego_app.errors import UserError
from stego_app.labels import mapping, views
from tests.conftest import make_finished_run


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    ctx, run = make_finished_run(tmp_path_factory.mktemp("done"))
    yield ctx, run
    ctx.close()


def test_query_builds_the_index_once_and_shows_heat_and_matches(done):
    ctx, run = done
    items = runs.run_images(ctx, run.id)
    first = items[0]
    res = found.query(ctx, run.id, first.image_id, x=10, y=40, threshold=0.5)
    index_meta = RunDir(run.run_dir).correspondence_dir / "meta.json"
    assert index_meta.is_file()
    stamp = index_meta.stat().st_mtime_ns
    h, w = res.grid
    assert res.heat.shape == (h, w) and res.cell == (int(40 * h / 48), int(10 * w / 64))
    assert res.heat[res.cell] == pytest.approx(1.0, abs=1e-2)     # the clicked token matches itself
    assert res.overlay.shape == (48, 64, 3) and res.overlay.dtype == np.uint8
    # the clicked token is framed: black outside, white inside
    r, c = res.cell
    y0, x0 = r * 48 // h, c * 64 // w
    assert (res.overlay[y0, x0] == 0).all() and (res.overlay[y0 + 1, x0 + 1] == 255).all()
    assert 1 <= len(res.matches) <= len(items) - 1
    assert first.image_id not in [m.image_id for m in res.matches]
    assert [m.similarity for m in res.matches] == sorted((m.similarity for m in res.matches), reverse=True)
    assert 0 < res.corpus_share <= 1
    found.query(ctx, run.id, items[1].image_id, x=5, y=5)
    assert index_meta.stat().st_mtime_ns == stamp                 # reused, not rebuilt
    with pytest.raises(UserError, match="outside the image"):
        found.query(ctx, run.id, first.image_id, x=500, y=5)
    with pytest.raises(UserError, match="between -1 and 1"):
        found.query(ctx, run.id, first.image_id, x=5, y=5, threshold=3)


def test_found_cluster_is_painted_in_maps_overlays_and_exports_and_can_be_removed(done):
    ctx, run = done
    items = runs.run_images(ctx, run.id)
    first = items[0]
    k = run.params.n_clusters
    raw_before = views.read_segments(run.run_dir, 0, crf=False)
    mapping.name_cluster(ctx, run.id, 0, "ground")
    res = found.query(ctx, run.id, first.image_id, x=10, y=40, threshold=0.8)
    info = found.create_cluster(ctx, run.id, first.image_id, res.cell, threshold=0.8, name="ball")
    assert info.index == k and info.label_name == "ball" and info.pixels > 0 and info.example_image_ids
    assert found.is_found(ctx, run.id, k) and not found.is_found(ctx, run.id, 0)
    # every reader of the maps sees it: raw, CRF, overlays
    for crf in (False, True):
        seg = views.read_segments(run.run_dir, 0, crf=crf)
        assert (seg == k).any()
    assert not (segmaps.read_map(run.run_dir, 0, "plain", found=False) == k).any()
    view = views.render_segmentation(ctx, run.id, first.image_id)
    assert "ball" in [e.name for e in view.legend]
    assert views.cluster_examples(ctx, run.id, k, n=2)
    # groups: the found cluster is a group of its own, at the end
    gs = groups.list_groups(ctx, run.id)
    assert gs[-1].found and gs[-1].cluster_indices == (k,)
    # adding it to an existing label, then exporting: its pixels carry that label
    mapping.name_cluster(ctx, run.id, k, "ground")
    exp = export.export_run(ctx, run.id, export.ExportOptions(label_pngs=True, crf=False))
    cats = json.loads((exp.labels_dir / "categories.json").read_text())["categories"]
    ground_id = next(c["id"] for c in cats if c["name"] == "ground")
    from PIL import Image
    png = sorted(p for p in exp.labels_dir.glob("*.png"))[0]
    cat_map = np.asarray(Image.open(png))
    seg = views.read_segments(run.run_dir, 0, crf=False)
    assert np.all(cat_map[seg == k] == ground_id)
    # a page that still shows an older version of the names cannot remove it
    from stego_app import edit_versions
    shown = runs.get_run(ctx, run.id).mapping_version
    mapping.name_cluster(ctx, run.id, 1, "elsewhere")          # another tab renames meanwhile
    with pytest.raises(edit_versions.StaleMapping), edit_versions.expect_version(shown):
        found.remove_cluster(ctx, run.id, k)
    assert found.is_found(ctx, run.id, k)
    # removing it restores the maps underneath
    with edit_versions.expect_version(runs.get_run(ctx, run.id).mapping_version):
        found.remove_cluster(ctx, run.id, k)
    assert np.array_equal(views.read_segments(run.run_dir, 0, crf=False), raw_before)
    assert k not in [c.index for c in mapping.list_clusters(ctx, run.id)]
    with pytest.raises(UserError, match="click-to-find"):
        found.remove_cluster(ctx, run.id, 0)
    with pytest.raises(UserError, match="outside"):
        found.create_cluster(ctx, run.id, first.image_id, (99, 0))
