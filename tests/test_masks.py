"""One path from the label mapping to masks: categories, category maps, regions; thing/stuff kinds."""
from __future__ import annotations

import numpy as np

from stego_app import masks
from stego_app.label_kinds import guess_isthing
from stego_app.masks import ClusterEntry


def test_plan_merges_ignores_and_guesses_kinds():
    plan = masks.plan_categories([
        ClusterEntry(0, 7, "sky", "#112233", None, False, "#000001"),
        ClusterEntry(1, 9, "car", "#445566", None, False, "#000002"),
        ClusterEntry(2, 9, "car", "#445566", None, False, "#000003"),
        ClusterEntry(3, None, None, None, None, True, "#000004"),
        ClusterEntry(4, None, None, None, None, False, "#000005"),
        ClusterEntry(5, 12, "blob", "#778899", True, False, "#000006"),   # a person's choice wins
    ])
    assert [(c.id, c.name, c.isthing) for c in plan.categories] == [
        (7, "sky", False), (9, "car", True), (12, "blob", True)]
    assert plan.lut.tolist() == [7, 9, 9, 0, 0, 12] and plan.things == {9, 12}
    with_unnamed = masks.plan_categories([ClusterEntry(4, None, None, None, None, False, "#000005")],
                                         include_unnamed=True)
    assert [(c.id, c.isthing) for c in with_unnamed.categories] == [(masks.UNNAMED_CATEGORY_BASE + 4, False)]


def test_category_map_maps_void_and_unknown_clusters_to_zero():
    lut = np.array([0, 3, 3, 9])
    seg = np.array([[0, 1, 2], [3, 4, 1]])
    assert masks.category_map(seg, lut).tolist() == [[0, 3, 3], [9, 0, 3]]


def test_regions_split_things_into_components_and_keep_stuff_whole():
    cat = np.zeros((20, 30), np.int64)
    cat[2:8, 2:10] = 5           # thing, 48 px
    cat[12:14, 20:22] = 5        # thing, 4 px: below min_area
    cat[10:18, 0:4] = 5          # thing, 32 px
    cat[9, 4] = 5                # touches that block only diagonally: same object (8-connected)
    cat[0, 20:30] = 7            # stuff, two separate strips: one region
    cat[19, 20:30] = 7
    got = [(r.category_id, r.isthing, r.area, r.bbox) for r in masks.regions(cat, {5}, min_area=10)]
    assert got == [(5, True, 48, [2, 2, 8, 6]), (5, True, 33, [0, 9, 5, 9]), (7, False, 20, [20, 0, 10, 20])]
    for r in masks.regions(cat, {5}, min_area=1):
        full = r.full_mask(cat.shape)
        assert full.sum() == r.area and np.all(cat[full] == r.category_id)
    assert len(list(masks.regions(cat, set(), min_area=10_000))) == 2   # stuff ignores min_area


def test_kind_guess_from_the_name():
    for name in ("car", "Cars", "person", "pedestrians", "Bicyclist", "traffic light", "red car",
                 "SignSymbol", "teddy bear", "dogs"):
        assert guess_isthing(name), name
    for name in ("sky", "road", "building", "vegetation", "tree", "car park", "grass", "cluster 3",
                 "", "sidewalk", "wall"):
        assert not guess_isthing(name), name
