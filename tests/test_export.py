"""export_run: COCO files a labelling team can load, reproducible, recorded in the database."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from pycocotools.coco import COCO
from scipy import ndimage

import shapely

from stego_app import coco, label_kinds
from stego_app.labels import annotations, mapping
from stego_app.config import AppConfig
from stego_app.context import create_context
from stego_app.errors import UserError
from stego_app.export import (
    UNNAMED_CATEGORY_BASE,
    ExportOptions,
    export_run,
    get_export,
    list_exports,
)
from stego_app.models import RUN_DONE, Cluster, Export, Image, Project, Run, RunImage

SIZES = [(40, 30), (36, 28), (24, 20)]          # (width, height) of the run's three images
N_CLUSTERS = 6


def _segments(seed: int, w: int, h: int) -> np.ndarray:
    """Blocky cluster map with every cluster present plus a few specks."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, N_CLUSTERS, size=(h // 4 + 1, w // 4 + 1))
    seg = np.kron(coarse, np.ones((4, 4), np.int64))[:h, :w]
    seg[0, : N_CLUSTERS] = np.arange(N_CLUSTERS)
    specks = rng.random((h, w)) < 0.02
    seg[specks] = rng.integers(0, N_CLUSTERS, specks.sum())
    return seg.astype(np.uint8)


@pytest.fixture
def app(tmp_path):
    """A context with one finished run: 3 images, 6 clusters, raw and CRF segment maps.

    Mapping: 0 -> sky, 1 + 2 -> tree (merged), 3 ignored, 4 unnamed, 5 -> road.
    """
    ctx = create_context(AppConfig(data_dir=tmp_path / "data", demo=False, worker=False))
    run_dir = tmp_path / "run"
    raw, crf = {}, {}
    with ctx.db.write() as s:
        project = Project(name="streets")
        s.add(project)
        s.flush()
        run = Run(project_id=project.id, status=RUN_DONE, run_dir=str(run_dir),
                  params={"crf": True}, n_images=len(SIZES))
        s.add(run)
        s.flush()
        for pos, (w, h) in enumerate(SIZES):
            img = Image(project_id=project.id, name=f"street_{pos}.jpg", sha256=f"{pos:064d}",
                        path=str(tmp_path / f"street_{pos}.jpg"), width=w, height=h, mode="RGB",
                        format="JPEG", file_size=1)
            s.add(img)
            s.flush()
            s.add(RunImage(run_id=run.id, position=pos, image_id=img.id))
            raw[img.id] = _segments(pos, w, h)
            crf[img.id] = ndimage.median_filter(raw[img.id], size=3)
            for folder, seg in (("segments", raw[img.id]), ("segments_crf", crf[img.id])):
                (run_dir / folder).mkdir(parents=True, exist_ok=True)
                PILImage.fromarray(seg).save(run_dir / folder / f"{pos:06d}.png")
        for k in range(N_CLUSTERS):
            s.add(Cluster(run_id=run.id, index=k, colour=f"#0000{k:02x}"))
        run_id = run.id
    mapping.name_cluster(ctx, run_id, 0, "sky")
    mapping.merge_clusters(ctx, run_id, [1, 2], "tree")
    mapping.ignore_cluster(ctx, run_id, 3)
    mapping.name_cluster(ctx, run_id, 5, "road")
    yield ctx, run_id, raw, crf
    ctx.close()


def _label_ids(ctx, run_id) -> dict[str, int]:
    return {c.label_name: c.label_id for c in mapping.list_clusters(ctx, run_id) if c.label_id}


def _expected(seg: np.ndarray, ids: dict[str, int]) -> np.ndarray:
    """Category id per pixel from the mapping the fixture set up."""
    lut = np.zeros(N_CLUSTERS, np.int64)
    lut[0], lut[1], lut[2], lut[5] = ids["sky"], ids["tree"], ids["tree"], ids["road"]
    return lut[seg]


def test_stuff_export_loads_in_pycocotools_with_exact_masks(app):
    ctx, run_id, raw, crf = app
    info = export_run(ctx, run_id, ExportOptions())
    ids = _label_ids(ctx, run_id)
    api = COCO(str(info.json_path))
    cats = api.loadCats(api.getCatIds())
    # one category per named label, merged clusters are one, ignored and unnamed are not there
    assert sorted((c["id"], c["name"]) for c in cats) == sorted((v, k) for k, v in ids.items())
    assert len(cats) == 3 and info.n_categories == 3
    assert sorted(api.getImgIds()) == sorted(raw)
    assert info.crf_used and info.n_images == 3 and info.warnings == ()
    n = 0
    for image_id, seg in crf.items():
        img = api.loadImgs([image_id])[0]
        assert (img["width"], img["height"]) == (seg.shape[1], seg.shape[0])
        expected = _expected(seg, ids)
        anns = api.loadAnns(api.getAnnIds(imgIds=[image_id]))
        assert sorted(a["category_id"] for a in anns) == sorted(set(np.unique(expected)) - {0})
        for a in anns:
            mask = expected == a["category_id"]
            assert a["iscrowd"] == 1
            assert np.array_equal(api.annToMask(a).astype(bool), mask)
            assert a["area"] == int(mask.sum()) and a["bbox"] == coco.mask_bbox(mask)
            n += 1
    assert info.n_annotations == n


def test_export_is_byte_identical_and_recorded(app):
    ctx, run_id, _, _ = app
    opts = ExportOptions(panoptic=True, label_pngs=True)
    a = export_run(ctx, run_id, opts)
    b = export_run(ctx, run_id, opts)
    assert a.id != b.id and a.directory != b.directory
    assert a.json_path.read_bytes() == b.json_path.read_bytes()
    assert a.panoptic_json_path.read_bytes() == b.panoptic_json_path.read_bytes()
    with zipfile.ZipFile(a.zip_path) as za, zipfile.ZipFile(b.zip_path) as zb:
        assert za.namelist() == zb.namelist()
        assert "annotations/instances_default.json" in za.namelist()
        assert za.read("annotations/instances_default.json") == a.json_path.read_bytes()
        assert all(za.read(n) == zb.read(n) for n in za.namelist())
    recorded = list_exports(ctx, run_id)
    assert [e.id for e in recorded] == [b.id, a.id]
    assert recorded[0].status == "done" and recorded[0].options == opts
    assert recorded[0].n_annotations == a.n_annotations > 0
    with ctx.db.read() as s:
        assert recorded[0].mapping_version == s.get(Run, run_id).mapping_version > 0
        row = s.get(Export, a.id)
        assert row.path == str(a.zip_path) and row.n_images == 3 and row.options["crf_used"] is True


def test_category_ids_stay_stable_when_labels_are_renamed_or_added(app):
    ctx, run_id, _, _ = app
    first = json.loads(export_run(ctx, run_id).json_path.read_text())["categories"]
    mapping.rename_label(ctx, run_id, "tree", "vegetation")
    mapping.name_cluster(ctx, run_id, 4, "car")
    second = json.loads(export_run(ctx, run_id).json_path.read_text())["categories"]
    before = {c["name"]: c["id"] for c in first}
    after = {c["name"]: c["id"] for c in second}
    assert after["vegetation"] == before["tree"]
    assert after["sky"] == before["sky"] and after["road"] == before["road"]
    assert after["car"] not in before.values() and len(after) == 4


def test_confirmed_only_exports_just_the_confirmed_images(app):
    ctx, run_id, raw, _ = app
    with pytest.raises(UserError, match="confirmed"):
        export_run(ctx, run_id, ExportOptions(confirmed_only=True))
    chosen = sorted(raw)[1]
    annotations.confirm_image(ctx, run_id, chosen)
    info = export_run(ctx, run_id, ExportOptions(confirmed_only=True))
    data = json.loads(info.json_path.read_text())
    assert [i["id"] for i in data["images"]] == [chosen] and info.n_images == 1
    assert {a["image_id"] for a in data["annotations"]} == {chosen}


def test_polygons_style_things_per_object_stuff_per_image_exact_and_valid(app):
    ctx, run_id, raw, _ = app
    label_kinds.set_label_kind(ctx, run_id, "tree", "thing")
    info = export_run(ctx, run_id, ExportOptions(style="polygons", crf=False, min_area=10, tolerance=0))
    assert not info.crf_used
    ids = _label_ids(ctx, run_id)
    api = COCO(str(info.json_path))
    n = 0
    for image_id, seg in raw.items():
        expected = _expected(seg, ids)
        anns = api.loadAnns(api.getAnnIds(imgIds=[image_id]))
        comps, _ = ndimage.label(expected == ids["tree"], structure=np.ones((3, 3)))
        kept = int((np.bincount(comps.ravel())[1:] >= 10).sum())
        stuff = [c for c in (ids["sky"], ids["road"]) if (expected == c).any()]
        assert len(anns) == kept + len(stuff)
        for a in anns:
            m = api.annToMask(a).astype(bool)
            assert a["iscrowd"] == 0 and a["area"] == int(m.sum()) and a["bbox"] == coco.mask_bbox(m)
            for p in a["segmentation"]:
                ring = shapely.Polygon(np.asarray(p, float).reshape(-1, 2))
                assert ring.is_valid and not ring.interiors
            if a["category_id"] == ids["tree"]:               # one whole object
                assert len(set(np.unique(comps[m]))) == 1 and (comps == comps[m][0]).sum() == m.sum() >= 10
            else:                                             # the whole stuff label, exactly
                assert np.array_equal(m, expected == a["category_id"])
            n += 1
    assert n == info.n_annotations > 0


def test_panoptic_and_label_pngs_agree_with_the_masks(app):
    ctx, run_id, _, crf = app
    label_kinds.set_label_kind(ctx, run_id, "tree", "thing")
    info = export_run(ctx, run_id, ExportOptions(panoptic=True, label_pngs=True, min_area=0))
    ids = _label_ids(ctx, run_id)
    pan = json.loads(info.panoptic_json_path.read_text())
    assert {c["id"]: c["isthing"] for c in pan["categories"]} == {
        ids["sky"]: 0, ids["road"]: 0, ids["tree"]: 1}
    by_image = {a["image_id"]: a for a in pan["annotations"]}
    legend = json.loads((info.labels_dir / "categories.json").read_text())
    assert {c["name"]: c["id"] for c in legend["categories"]} == ids
    for image_id, seg in crf.items():
        expected = _expected(seg, ids)
        ann = by_image[image_id]
        png = coco.decode_panoptic(np.asarray(PILImage.open(info.directory / "annotations" /
                                                            "panoptic_default" / ann["file_name"])))
        comps, n_trees = ndimage.label(expected == ids["tree"], structure=np.ones((3, 3)))
        assert sum(s["category_id"] == ids["tree"] for s in ann["segments_info"]) == n_trees
        for s in ann["segments_info"]:
            m = png == s["id"]
            if s["category_id"] == ids["tree"]:                # a thing: one object per segment
                assert (comps == comps[m][0]).sum() == m.sum()
            else:
                assert np.array_equal(m, expected == s["category_id"])
            assert s["area"] == int(m.sum()) and s["bbox"] == coco.mask_bbox(m)
        assert np.array_equal(png == 0, expected == 0)
        label_png = np.asarray(PILImage.open(info.labels_dir / ann["file_name"]))
        assert label_png.dtype == np.uint8 and np.array_equal(label_png, expected)


def test_include_unnamed_adds_cluster_categories_but_never_ignored(app):
    ctx, run_id, _, crf = app
    info = export_run(ctx, run_id, ExportOptions(include_unnamed=True, crf=True))
    data = json.loads(info.json_path.read_text())
    names = {c["name"]: c["id"] for c in data["categories"]}
    assert names["cluster 4"] == UNNAMED_CATEGORY_BASE + 4 and "cluster 3" not in names
    some = next(iter(crf))
    mask = crf[some] == 4
    ann = next(a for a in data["annotations"]
               if a["image_id"] == some and a["category_id"] == UNNAMED_CATEGORY_BASE + 4)
    assert ann["area"] == int(mask.sum())


def test_crf_falls_back_to_raw_segments_when_the_run_has_none(app):
    ctx, run_id, raw, _ = app
    with ctx.db.read() as s:
        run_dir = Path(s.get(Run, run_id).run_dir)
    for p in (run_dir / "segments_crf").iterdir():
        p.unlink()
    (run_dir / "segments_crf").rmdir()
    info = export_run(ctx, run_id, ExportOptions(crf=True))
    assert not info.crf_used and any("CRF" in w for w in info.warnings)
    with ctx.db.write() as s:
        s.get(Run, run_id).params = {"crf": False}         # a run made without CRF: nothing missing
    assert export_run(ctx, run_id, ExportOptions(crf=True)).warnings == ()
    ids = _label_ids(ctx, run_id)
    api = COCO(str(info.json_path))
    image_id = next(iter(raw))
    for a in api.loadAnns(api.getAnnIds(imgIds=[image_id])):
        assert np.array_equal(api.annToMask(a).astype(bool), _expected(raw[image_id], ids) == a["category_id"])


def test_images_without_annotations_are_reported(app):
    ctx, run_id, _, _ = app
    label_kinds.set_label_kind(ctx, run_id, "sky", "thing")
    label_kinds.set_label_kind(ctx, run_id, "tree", "thing")
    label_kinds.set_label_kind(ctx, run_id, "road", "thing")
    info = export_run(ctx, run_id, ExportOptions(style="instance", min_area=10_000))
    assert info.n_annotations == 0 and info.n_images == 3
    assert any("3 images got no annotation" in w for w in info.warnings)
    assert list_exports(ctx, run_id)[0].warnings == info.warnings


def test_nothing_named_or_unfinished_run_is_a_user_error(app):
    ctx, run_id, _, _ = app
    for k in (0, 1, 2, 5):
        mapping.unmerge_cluster(ctx, run_id, k)
    with pytest.raises(UserError, match="name at least one cluster"):
        export_run(ctx, run_id)
    with pytest.raises(UserError, match="style"):
        export_run(ctx, run_id, ExportOptions(style="boxes"))
    with ctx.db.write() as s:
        s.get(Run, run_id).status = "running"
    with pytest.raises(UserError, match="running"):
        export_run(ctx, run_id, ExportOptions(include_unnamed=True))


def test_failed_export_is_recorded_and_leaves_no_files(app):
    ctx, run_id, _, _ = app
    with ctx.db.read() as s:
        run_dir = Path(s.get(Run, run_id).run_dir)
    (run_dir / "segments_crf" / "000002.png").write_bytes(b"not a png")
    with pytest.raises(OSError):      # PIL cannot read the broken segment map
        export_run(ctx, run_id)
    [failed] = list_exports(ctx, run_id)
    assert failed.status == "failed" and failed.error and failed.zip_path is None
    assert not (ctx.config.exports_dir / str(failed.id)).exists()
    assert get_export(ctx, failed.id).status == "failed"


def test_exports_left_running_by_a_stopped_process_fail_at_the_next_start(app):
    ctx, run_id, _, _ = app
    finished = export_run(ctx, run_id)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()[:100]
    owners = {"gone": f"{host}:{gone.pid}", "this process": f"{host}:{os.getpid()}", "unrecorded": None,
              "other host": "another-machine:4242", "day-old": f"{host}:{os.getpid()}"}
    ids = {}
    with ctx.db.write() as s:
        for name, owner in owners.items():
            row = Export(run_id=run_id, status="running", options={}, owner=owner)
            if name == "day-old":
                row.created_at = datetime.now(UTC) - timedelta(days=2)
            s.add(row)
            s.flush()
            ids[name] = row.id
    partial = ctx.config.exports_dir / str(ids["gone"])
    partial.mkdir(parents=True)
    (partial / "half.json").write_text("{")

    restarted = create_context(ctx.config)
    try:
        status = {name: get_export(restarted, i) for name, i in ids.items()}
    finally:
        restarted.close()
    for name in ("gone", "unrecorded", "day-old"):
        assert status[name].status == "failed", name
        assert "stopped while this export was being written" in status[name].error
        assert status[name].finished_at is not None and status[name].zip_path is None
    assert status["this process"].status == "running" and status["other host"].status == "running"
    assert not partial.exists()
    assert get_export(ctx, finished.id).status == "done" and finished.zip_path.is_file()
