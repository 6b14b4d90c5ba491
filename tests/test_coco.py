"""COCO building blocks: masks <-> RLE/polygons, streaming writers, panoptic/label PNGs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from stego_app import coco


def _random_masks(n: int, seed: int = 0):
    """Blobs, noise, rings and diagonal pinches of random sizes."""
    rng = np.random.default_rng(seed)
    for t in range(n):
        h, w = (int(v) for v in rng.integers(1, 24, 2))
        m = rng.random((h, w)) < rng.random()
        if t % 3 == 1:
            m = ndimage.binary_opening(m) if m.any() else m
        elif t % 3 == 2 and m.any():
            m = ndimage.binary_dilation(m) ^ m        # thin outlines: holes and pinches
        yield m


def test_polygons_rasterise_back_exactly_one_per_component():
    for m in _random_masks(1500):
        polys = coco.mask_to_polygons(m)
        back = coco.polygons_to_mask(polys, *m.shape).astype(bool)
        assert np.array_equal(back, m)
        assert len(polys) == ndimage.label(m, structure=np.ones((3, 3)))[1]
        assert all(len(p) >= 8 and len(p) % 2 == 0 for p in polys)


def test_ring_is_one_polygon_that_leaves_the_hole_empty():
    m = np.zeros((9, 9), bool)
    m[1:8, 1:8] = True
    m[3:6, 3:6] = False
    assert sorted(coco.loop_area(lp) for lp in coco.trace_loops(m)) == [-9, 49]
    [poly] = coco.mask_to_polygons(m)            # tools that read only the first polygon get it all
    back = coco.polygons_to_mask([poly], 9, 9)
    assert back[4, 4] == 0 and back.sum() == 40
    assert np.array_equal(back.astype(bool), m)


def test_corner_touching_pixels_are_one_polygon_or_separate_loops():
    m = np.eye(4, dtype=bool) | np.eye(4, dtype=bool)[::-1]     # an X: pinches everywhere
    assert len(coco.trace_loops(m, connectivity=4)) == 5      # 4 corner pixels + the centre block
    assert len(coco.trace_loops(m, connectivity=8)) == 1
    [poly] = coco.mask_to_polygons(m)
    assert np.array_equal(coco.polygons_to_mask([poly], 4, 4).astype(bool), m)


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


def test_instance_segments_split_components_and_drop_small_ones():
    cat = np.zeros((20, 30), np.int64)
    cat[2:8, 2:10] = 5           # 48 px
    cat[12:14, 20:22] = 5        # 4 px: below min_area
    cat[10:18, 0:4] = 7          # 32 px
    cat[9, 4] = 7                # touches the block only diagonally: same component (8-connected)
    segs = list(coco.instance_segments(cat, min_area=10))
    assert [(s.category_id, s.area, s.bbox) for s, _, _ in segs] == [
        (5, 48, [2, 2, 8, 6]), (7, 33, [0, 9, 5, 9])]
    for s, sl, comp in segs:
        full = np.zeros(cat.shape, bool)
        full[sl] = comp
        assert np.array_equal(coco.polygons_to_mask(s.segmentation, 20, 30).astype(bool), full)
        assert s.iscrowd == 0
    assert len(list(coco.instance_segments(cat, min_area=1))) == 3


def test_category_map_maps_void_and_unknown_clusters_to_zero():
    lut = np.array([0, 3, 3, 9])
    seg = np.array([[0, 1, 2], [3, 4, 1]])
    assert coco.category_map(seg, lut).tolist() == [[0, 3, 3], [9, 0, 3]]


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
            for seg, mask in coco.stuff_segments(cat):
                sources[w.add_segment(100 + i, seg)] = mask
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
        for seg, sl, comp in coco.instance_segments(cat, min_area=1):
            infos.append(coco.panoptic_segment_info(len(infos) + 1, seg))
            ids[sl][comp] = len(infos)
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


def test_unique_png_names_do_not_collide():
    used: set[str] = set()
    assert coco.unique_png_name("dir/a.jpg", 1, used) == "a.png"
    assert coco.unique_png_name("a.png", 2, used) == "a_2.png"
    assert coco.unique_png_name("b.tif", 3, used) == "b.png"
