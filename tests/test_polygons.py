"""Polygons that annotation tools accept: simple valid rings, no holes, light, area kept."""
from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy import ndimage

from stego_app import coco, polygons


def _random_masks(n: int, seed: int = 0):
    """Blobs, noise, rings and diagonal pinches of random sizes."""
    rng = np.random.default_rng(seed)
    for t in range(n):
        h, w = (int(v) for v in rng.integers(1, 28, 2))
        m = rng.random((h, w)) < rng.random()
        if t % 3 == 1:
            m = ndimage.binary_opening(m) if m.any() else m
        elif t % 3 == 2 and m.any():
            m = ndimage.binary_dilation(m) ^ m        # thin outlines: holes and pinches
        yield m


def _rings(polys):
    return [shapely.Polygon(np.asarray(p, float).reshape(-1, 2)) for p in polys]


def test_exact_polygons_rasterise_back_and_every_ring_is_valid_without_holes():
    for m in _random_masks(1200):
        polys = polygons.mask_polygons(m, tolerance=0)
        assert np.array_equal(coco.polygons_to_mask(polys, *m.shape).astype(bool), m)
        for ring, p in zip(_rings(polys), polys):
            assert ring.is_valid, shapely.validation.explain_validity(ring)
            assert len(ring.interiors) == 0 and len(p) >= 6 and all(isinstance(v, int) for v in p)
        # pieces do not overlap: their areas add up to the mask's pixels
        assert sum(r.area for r in _rings(polys)) == m.sum()


def test_ring_with_a_hole_becomes_hole_free_pieces_that_leave_the_hole_empty():
    m = np.zeros((9, 9), bool)
    m[1:8, 1:8] = True
    m[3:6, 3:6] = False
    polys = polygons.mask_polygons(m, tolerance=0)
    assert len(polys) >= 2                        # a ring cannot be one simple polygon
    back = coco.polygons_to_mask(polys, 9, 9)
    assert back[4, 4] == 0 and back.sum() == 40
    assert all(r.is_valid and not r.interiors for r in _rings(polys))


def test_corner_touching_parts_are_split_into_separate_polygons():
    m = np.eye(4, dtype=bool) | np.eye(4, dtype=bool)[::-1]     # an X: pinches everywhere
    polys = polygons.mask_polygons(m, tolerance=0)
    assert len(polys) == 5                                     # 4 corner pixels + the centre block
    assert np.array_equal(coco.polygons_to_mask(polys, 4, 4).astype(bool), m)
    # a ring whose hole touches the outside at one corner: the outline would touch itself
    r = np.ones((5, 5), bool)
    r[1:4, 1:4] = False
    r[4, 4] = False
    r[3, 3] = False
    polys = polygons.mask_polygons(r, tolerance=0)
    assert all(x.is_valid for x in _rings(polys))
    assert np.array_equal(coco.polygons_to_mask(polys, 5, 5).astype(bool), r)


def test_simplified_polygons_are_much_lighter_valid_and_keep_the_area_within_one_percent():
    rng = np.random.default_rng(3)
    m = ndimage.gaussian_filter(rng.random((240, 320)), 6) > 0.5
    exact = polygons.mask_polygons(m, tolerance=0)
    simple = polygons.mask_polygons(m, tolerance=1.0)
    assert len(simple) == len(exact)
    n_exact, n_simple = sum(len(p) for p in exact), sum(len(p) for p in simple)
    assert n_simple * 3 < n_exact
    for a, b in zip(_rings(exact), _rings(simple)):
        assert b.is_valid and abs(b.area - a.area) <= 0.01 * a.area
    back = coco.polygons_to_mask(simple, *m.shape).astype(bool)
    assert abs(int(back.sum()) - int(m.sum())) <= 0.01 * m.sum()
    assert (back & m).sum() / (back | m).sum() > 0.97
    # a bigger tolerance is lighter still; the area bound holds for each piece
    coarse = polygons.mask_polygons(m, tolerance=3.0)
    assert sum(len(p) for p in coarse) < n_simple
    for a, b in zip(_rings(exact), _rings(coarse)):
        assert abs(b.area - a.area) <= 0.01 * a.area


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1)])
def test_tiny_masks(shape):
    m = np.ones(shape, bool)
    [p] = polygons.mask_polygons(m)
    assert np.array_equal(coco.polygons_to_mask([p], *shape).astype(bool), m)
    assert polygons.mask_polygons(np.zeros(shape, bool)) == []


def test_offset_moves_the_polygons():
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    [p] = polygons.mask_polygons(m, offset=(10, 20))
    assert min(p[0::2]) == 21 and min(p[1::2]) == 11
