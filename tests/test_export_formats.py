"""Exports the annotation tools import as they are: unique names, images, manifest, iscrowd,
thing/stuff per label, Label Studio tasks; one mask path shared with seed annotations."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from PIL import Image as PILImage
from pycocotools.coco import COCO

from stego_app import coco, label_kinds, label_studio
from stego_app.errors import NotFound, UserError
from stego_app.export import ExportOptions, export_run
from stego_app.export_files import export_file_names
from stego_app.labels import annotations, mapping
from stego_app.models import Image
from tests.test_export import _expected, _label_ids, app  # noqa: F401  (the fixture)


def _rename(ctx, names: dict[int, str]) -> None:
    with ctx.db.write() as s:
        for image_id, name in names.items():
            s.get(Image, image_id).name = name


def test_same_file_names_are_made_unique_stable_and_reported(app):
    ctx, run_id, raw, _ = app
    a, b, c = sorted(raw)
    _rename(ctx, {a: "a/chelsea.png", b: "chelsea.jpg", c: "Chelsea.png"})
    info = export_run(ctx, run_id)
    names = {i["id"]: i["file_name"] for i in json.loads(info.json_path.read_text())["images"]}
    assert names == {a: "a/chelsea.png", b: "chelsea.jpg", c: f"Chelsea_{c}.png"}
    stems = [n.rsplit(".", 1)[0].lower() for n in names.values()]
    assert len(set(stems)) == 3                        # Datumaro's item ids (name without extension)
    assert any(f"Chelsea.png -> Chelsea_{c}.png" in w for w in info.warnings)
    # the same names whichever images are exported
    annotations.confirm_image(ctx, run_id, c)
    only = export_run(ctx, run_id, ExportOptions(confirmed_only=True))
    assert [i["file_name"] for i in json.loads(only.json_path.read_text())["images"]] == [f"Chelsea_{c}.png"]
    _rename(ctx, {a: "x/chelsea.png", b: "y/chelsea.png", c: "../evil/../chelsea.png"})
    names = {i["id"]: i["file_name"] for i in json.loads(export_run(ctx, run_id).json_path.read_text())["images"]}
    assert names == {a: "x/chelsea.png", b: "y/chelsea.png", c: "evil/chelsea.png"}
    assert export_file_names([(2, "a.png"), (1, "a.PNG"), (3, "a_2.png")]) == {
        1: "a.PNG", 2: "a_2.png", 3: "a_2_3.png"}


def test_include_images_writes_images_beside_annotations_upright(app, tmp_path):
    ctx, run_id, raw, _ = app
    with ctx.db.read() as s:
        rows = {i: (s.get(Image, i).path, s.get(Image, i).width, s.get(Image, i).height) for i in raw}
    for k, (image_id, (path, w, h)) in enumerate(rows.items()):
        im = PILImage.new("RGB", (h, w) if k == 0 else (w, h), (k * 40, 10, 10))
        if k == 0:                            # stored sideways with an EXIF rotation, as phones do
            exif = PILImage.Exif()
            exif[0x0112] = 6
            im.save(path, format="JPEG", exif=exif)
        else:
            im.save(path, format="JPEG")
    with pytest.raises(UserError, match="missing"):
        missing = next(iter(rows.values()))[0]
        data = open(missing, "rb").read()
        import os
        os.unlink(missing)
        try:
            export_run(ctx, run_id, ExportOptions(include_images=True))
        finally:
            open(missing, "wb").write(data)
    info = export_run(ctx, run_id, ExportOptions(include_images=True))
    images = json.loads(info.json_path.read_text())["images"]
    with zipfile.ZipFile(info.zip_path) as z:
        for img in images:
            assert f"images/{img['file_name']}" in z.namelist()
    for img in images:
        with PILImage.open(info.images_dir / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])
    manifest = json.loads(info.manifest_path.read_text())["images"]
    assert [m["image"] for m in manifest] == [f"images/{i['file_name']}" for i in images]


def test_manifest_maps_each_file_name_to_its_label_and_panoptic_png(app):
    ctx, run_id, _, crf = app
    a, b, c = sorted(crf)
    _rename(ctx, {a: "x/street.jpg", b: "y/street.jpg", c: "street.png"})
    info = export_run(ctx, run_id, ExportOptions(label_pngs=True, panoptic=True))
    ids = _label_ids(ctx, run_id)
    manifest = {m["file_name"]: m for m in json.loads(info.manifest_path.read_text())["images"]}
    assert set(manifest) == {"x/street.jpg", "y/street.jpg", "street.png"}
    for entry in manifest.values():
        png = np.asarray(PILImage.open(info.directory / entry["label_png"]))
        assert np.array_equal(png, _expected(crf[entry["image_id"]], ids))
        assert (info.directory / entry["panoptic_png"]).is_file()
    assert len({m["label_png"] for m in manifest.values()}) == 3


def test_stuff_masks_can_be_iscrowd_0_for_cocoeval(app):
    ctx, run_id, _, _ = app
    crowd = json.loads(export_run(ctx, run_id).json_path.read_text())["annotations"]
    assert {a["iscrowd"] for a in crowd} == {1}
    info = export_run(ctx, run_id, ExportOptions(stuff_iscrowd=0))
    api = COCO(str(info.json_path))
    anns = api.loadAnns(api.getAnnIds())
    assert {a["iscrowd"] for a in anns} == {0}
    assert [a["segmentation"] for a in anns] == [a["segmentation"] for a in crowd]
    from pycocotools.cocoeval import COCOeval
    dets = api.loadRes([{**{k: a[k] for k in ("image_id", "category_id", "segmentation")}, "score": 1.0}
                        for a in anns])
    ev = COCOeval(api, dets, "segm")
    ev.evaluate(); ev.accumulate(); ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)            # the export evaluated against itself
    with pytest.raises(UserError, match="iscrowd"):
        export_run(ctx, run_id, ExportOptions(stuff_iscrowd=2))


def test_label_kinds_are_guessed_stored_and_used_by_both_styles(app):
    ctx, run_id, _, crf = app
    mapping.name_cluster(ctx, run_id, 4, "Cars")
    kinds = {k.name: (k.kind, k.guessed) for k in label_kinds.label_kinds(ctx, run_id)}
    assert kinds == {"Cars": ("thing", True), "road": ("stuff", True), "sky": ("stuff", True),
                     "tree": ("stuff", True)}
    label_kinds.set_label_kind(ctx, run_id, "TREE", "thing")
    label_kinds.set_label_kind(ctx, run_id, "cars", "stuff")
    kinds = {k.name: (k.kind, k.guessed) for k in label_kinds.label_kinds(ctx, run_id)}
    assert kinds["tree"] == ("thing", False) and kinds["Cars"] == ("stuff", False)
    mapping.rename_label(ctx, run_id, "tree", "bushes")          # the choice stays with the label
    assert {k.name: k.kind for k in label_kinds.label_kinds(ctx, run_id)}["bushes"] == "thing"
    ids = _label_ids(ctx, run_id)
    for style in ("masks", "polygons"):
        data = json.loads(export_run(ctx, run_id, ExportOptions(style=style, min_area=0, tolerance=0))
                          .json_path.read_text())
        per = {}
        for a in data["annotations"]:
            per.setdefault((a["image_id"], a["category_id"]), []).append(a)
        for (image_id, cid), anns in per.items():
            if cid == ids["bushes"]:
                from scipy import ndimage
                n = ndimage.label(_expected_with(crf[image_id], ids) == cid, structure=np.ones((3, 3)))[1]
                assert len(anns) == n and all(a["iscrowd"] == 0 for a in anns)
            else:
                assert len(anns) == 1
    label_kinds.set_label_kind(ctx, run_id, "bushes", "auto")
    assert {k.name: k.guessed for k in label_kinds.label_kinds(ctx, run_id)}["bushes"]
    with pytest.raises(UserError, match="thing, stuff, auto"):
        label_kinds.set_label_kind(ctx, run_id, "sky", "object")
    with pytest.raises(NotFound):
        label_kinds.set_label_kind(ctx, run_id, "nope", "thing")


def _expected_with(seg, ids):
    lut = np.zeros(8, np.int64)
    lut[0], lut[1], lut[2], lut[4], lut[5] = ids["sky"], ids["bushes"], ids["bushes"], ids["Cars"], ids["road"]
    return lut[seg]


def test_seed_annotations_and_export_masks_are_the_same(app):
    ctx, run_id, _, _ = app
    seeds = {(a.image_id, a.label_id): a for a in annotations.seed_annotations(ctx, run_id, crf=True)}
    data = json.loads(export_run(ctx, run_id).json_path.read_text())
    got = {(a["image_id"], a["category_id"]): a for a in data["annotations"]}
    assert set(seeds) == set(got)
    for key, a in got.items():
        assert a["segmentation"] == seeds[key].rle and a["area"] == seeds[key].area
        assert a["bbox"] == list(seeds[key].bbox)


@pytest.mark.parametrize("regions", ["brush", "polygons"])
def test_label_studio_tasks_carry_the_coco_masks(app, regions):
    ctx, run_id, _, crf = app
    a = sorted(crf)[0]
    _rename(ctx, {a: "sub dir/street #1.jpg"})
    info = export_run(ctx, run_id, ExportOptions(label_studio=True, ls_regions=regions, tolerance=0,
                                                 ls_image_prefix="https://example.test/img/"))
    ids = _label_ids(ctx, run_id)
    config = ET.fromstring(info.label_studio_config.read_text())
    tag = config.find("BrushLabels" if regions == "brush" else "PolygonLabels")
    assert {lab.get("value"): lab.get("background") for lab in tag} == {
        "sky": mapping_colour(ctx, run_id, "sky"), "tree": mapping_colour(ctx, run_id, "tree"),
        "road": mapping_colour(ctx, run_id, "road")}
    tasks = json.loads(info.label_studio_tasks.read_text())
    api = COCO(str(info.json_path))
    assert len(tasks) == 3
    for task in tasks:
        image_id = task["data"]["image_id"]
        img = api.loadImgs([image_id])[0]
        assert task["data"]["image"].startswith("https://example.test/img/")
        if image_id == a:
            assert task["data"]["image"] == "https://example.test/img/sub%20dir/street%20%231.jpg"
        h, w = img["height"], img["width"]
        by_label: dict[str, np.ndarray] = {}
        for r in task["predictions"][0]["result"]:
            assert r["to_name"] == "image" and r["from_name"] == tag.get("name")
            assert (r["original_width"], r["original_height"]) == (w, h)
            if regions == "brush":
                name = r["value"]["brushlabels"][0]
                m = label_studio.decode_brush_rle(r["value"]["rle"], h, w)
            else:
                name = r["value"]["polygonlabels"][0]
                flat = [v for x, y in r["value"]["points"] for v in (x * w / 100, y * h / 100)]
                m = coco.polygons_to_mask([flat], h, w).astype(bool)
            by_label[name] = by_label.get(name, np.zeros((h, w), bool)) | m
        expected = _expected(crf[image_id], ids)
        for name, cid in ids.items():
            assert np.array_equal(by_label.get(name, np.zeros((h, w), bool)), expected == cid)


def mapping_colour(ctx, run_id, name):
    return next(e.colour for e in mapping.legend(ctx, run_id) if e.name == name)


def test_brush_rle_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.random()
        assert np.array_equal(label_studio.decode_brush_rle(label_studio.brush_rle(m), h, w), m)
    big = np.zeros((300, 400), bool)
    big[3:290, 1:399] = True                  # runs longer than 2^16 values are split
    assert np.array_equal(label_studio.decode_brush_rle(label_studio.brush_rle(big), 300, 400), big)
