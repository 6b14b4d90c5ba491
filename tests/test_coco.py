"""COCO building blocks: masks <-> RLE, streaming writers, panoptic/label PNGs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from stego_app import coco, masks
from tests.test_polygons import _random_masks


def test_rle_area_and_bbox_agree_with_pycocotools():
    for m in _random_masks(300, seed=1):
        rle = coco.encode_rle(m)
        assert isinstance(rle["counts"], str) and rle["size"] == list(m.shape)
        assert np.array_equal(coco.decode_rle(rle).astype(bool), m)
        obj = {"size": rle["size"], "counts": rle["counts"].encode()}
        assert int(mask_utils.area(obj)) == int(m.sum())
        if m.any():
            assert coco.mask_bbox(m) == [int(v) for v in mask_utils.toBbox(obj)]
    assert coco.mask_bbox(np.zeros((3, 4), bool)) == [0, 0, 0, 0]


def _write_sample(path, n_images=3, seed=0):
    rng = np.random.default_rng(seed)
    cats = [coco.category_entry(4, "sky"), coco.category_entry(11, "tree")]
    sources = {}
    with coco.CocoWriter(path, {"description": "test"}, cats) as w:
        for i in range(n_images):
            h, w_ = 17 + i, 23
            cat = np.where(rng.random((h, w_)) < 0.5, 4, 11)
            cat[: h // 3] = 0
            w.add_image(coco.image_entry(100 + i, f"img{i}.jpg", w_, h))
            for cid, mask in masks.label_masks(cat):
                rle, area, bbox = masks.rle_area_bbox(mask)
                sources[w.add_segment(100 + i, coco.Segment(cid, rle, area, bbox, 1))] = mask
    return sources


def test_streamed_json_loads_in_pycocotools_and_is_byte_identical(tmp_path):
    a, b = tmp_path / "a" / "x.json", tmp_path / "b" / "x.json"
    sources = _write_sample(a)
    _write_sample(b)
    assert a.read_bytes() == b.read_bytes()
    assert not list(a.parent.glob("*.partial"))
    data = json.loads(a.read_text())
    assert list(data) == ["info", "licenses", "categories", "images", "annotations"]
    api = COCO(str(a))
    assert sorted(api.getCatIds()) == [4, 11] and sorted(api.getImgIds()) == [100, 101, 102]
    assert len(api.getAnnIds()) == len(sources) == 6
    for ann_id, mask in sources.items():
        ann = api.loadAnns([ann_id])[0]
        assert ann["iscrowd"] == 1
        assert np.array_equal(api.annToMask(ann).astype(bool), mask)
        assert ann["area"] == int(mask.sum())
        assert ann["bbox"] == coco.mask_bbox(mask)


def test_writer_with_no_annotations_is_valid_and_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "empty.json"
    with coco.CocoWriter(path, {}, [coco.category_entry(1, "a")]) as w:
        w.add_image(coco.image_entry(1, "a.png", 4, 4))
    assert json.loads(path.read_text())["annotations"] == []
    bad = tmp_path / "bad.json"
    with pytest.raises(RuntimeError), coco.CocoWriter(bad, {}, []) as w:
        w.add_image(coco.image_entry(1, "a.png", 4, 4))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [path]


def test_panoptic_ids_round_trip_through_png(tmp_path):
    ids = np.array([[0, 1, 255], [256, 65535, 70000], [256 ** 3 - 1, 5, 5]], np.uint32)
    rgb = coco.encode_panoptic(ids)
    assert rgb[1, 0].tolist() == [0, 1, 0] and rgb[1, 2].tolist() == [70000 % 256, 70000 // 256 % 256, 1]
    coco.write_png(tmp_path / "p.png", rgb)
    back = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    assert np.array_equal(coco.decode_panoptic(back), ids)
    with pytest.raises(ValueError):
        coco.encode_panoptic(np.array([[256 ** 3]]))


def test_panoptic_writer_json_and_pngs_match(tmp_path):
    cats = [coco.category_entry(2, "road", isthing=1, color=[1, 2, 3])]
    cat = np.zeros((12, 12), np.int64)
    cat[1:4, 1:4] = 2
    cat[6:11, 5:11] = 2
    with coco.PanopticWriter(tmp_path / "pan.json", tmp_path / "pan", {}, cats) as w:
        ids = np.zeros(cat.shape, np.uint32)
        infos = []
        for r in masks.regions(cat, {2}, min_area=1):
            infos.append({"id": len(infos) + 1, "category_id": r.category_id, "area": r.area,
                          "bbox": r.bbox, "iscrowd": 0})
            ids[r.rows, r.cols][r.mask] = len(infos)
        w.add_image(coco.image_entry(7, "a.jpg", 12, 12), "a.png", ids, infos)
    data = json.loads((tmp_path / "pan.json").read_text())
    assert data["categories"] == [{"id": 2, "name": "road", "supercategory": "", "isthing": 1,
                                   "color": [1, 2, 3]}]
    ann = data["annotations"][0]
    assert ann["image_id"] == 7 and ann["file_name"] == "a.png"
    png = coco.decode_panoptic(np.asarray(Image.open(tmp_path / "pan" / "a.png")))
    for s in ann["segments_info"]:
        m = png == s["id"]
        assert s["area"] == int(m.sum()) and s["bbox"] == coco.mask_bbox(m)
    assert [s["area"] for s in ann["segments_info"]] == [9, 30]


def test_label_png_uses_16_bit_only_when_needed(tmp_path):
    assert coco.label_png_dtype(255) is np.uint8
    assert coco.label_png_dtype(256) is np.uint16
    a = np.array([[0, 300], [60000, 7]], np.uint16)
    coco.write_png(tmp_path / "l.png", a)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "l.png")), a)
