"""Which images to correct first (core.selection): one typical image of each kind, largest kind first."""
from __future__ import annotations

import numpy as np
import pytest

from core.selection import PICKS, even_items, image_pooled, pick_images, representative_items


def _kinds(sizes=(30, 12, 3), dim=16, seed=0):
    """Pooled features of len(sizes) kinds of image (kind k around axis k); (features, kind of each)."""
    rng = np.random.default_rng(seed)
    kind = np.repeat(np.arange(len(sizes)), sizes)
    x = np.eye(dim)[kind] + rng.normal(0, 0.08, (len(kind), dim))
    order = rng.permutation(len(kind))          # the files are not ordered by kind
    return x[order], kind[order]


def test_representative_picks_one_image_of_each_kind_largest_kind_first():
    x, kind = _kinds()
    picks = representative_items(x, 3)
    assert [kind[i] for i in picks] == [0, 1, 2]
    assert len(set(picks)) == 3


def test_the_pick_is_the_most_typical_member_not_an_outlier():
    x, kind = _kinds(sizes=(20, 20))
    first = np.flatnonzero(kind == 0)
    outlier = first[0]
    x[outlier] = np.eye(16)[0] * 0.6 + np.eye(16)[5] * 0.8       # still nearer kind 0 than kind 1
    picks = representative_items(x, 2)
    assert outlier not in picks and {kind[i] for i in picks} == {0, 1}


def test_even_spreads_over_the_order_and_misses_a_small_kind_that_representative_finds():
    kind = np.repeat([0, 1, 2], (60, 30, 10))   # ordered by kind: even picks land in the big kinds
    x = np.eye(8)[kind] + np.random.default_rng(1).normal(0, 0.05, (100, 8))
    assert even_items(100, 3) == [16, 50, 83]
    assert 2 not in {kind[i] for i in even_items(100, 3)}
    assert {kind[i] for i in pick_images(x, 3, "representative")} == {0, 1, 2}


def test_picks_are_deterministic_and_validated():
    x, _ = _kinds()
    assert pick_images(x, 5) == pick_images(x, 5)
    assert set(PICKS) == {"representative", "even"}
    with pytest.raises(ValueError, match="1 to 45"):
        pick_images(x, 0)
    with pytest.raises(ValueError, match="1 to 45"):
        pick_images(x, 46)
    with pytest.raises(ValueError, match="unknown pick"):
        pick_images(x, 2, "random")
    with pytest.raises(ValueError, match="n_images, channels"):
        representative_items(x[0], 1)


def test_the_next_batch_skips_corrected_images_and_covers_the_kinds_they_do_not():
    x, kind = _kinds(sizes=(30, 12, 3, 8))
    first = representative_items(x, 2)
    assert [kind[i] for i in first] == [0, 1]
    nxt = representative_items(x, 2, done=first)
    assert not set(nxt) & set(first)
    assert {kind[i] for i in nxt} == {2, 3}                  # the kinds the first batch left uncovered
    assert [kind[i] for i in nxt] == [3, 2]                  # larger kind first
    assert representative_items(x, 2, done=[]) == first      # no done images: the first batch as before
    ev = even_items(10, 3, done=[4, 5])
    assert not {4, 5} & set(ev) and len(set(ev)) == 3
    every = pick_images(x, len(x) - 2, done=first)           # all that are left, once each
    assert sorted(every) == sorted(set(range(len(x))) - set(first))
    with pytest.raises(ValueError, match=r"1 to 51 of the 53 images \(2 are done\)"):
        pick_images(x, 52, done=first)
    with pytest.raises(ValueError, match="outside"):
        pick_images(x, 1, done=[53])


class _FiveCropStore:
    """Two images with two items each (as five-crop features give several items per image)."""

    def __init__(self):
        self._pooled = np.array([[1, 0], [3, 0], [0, 2], [0, 4]], np.float32)
        self._owner = [0, 0, 1, 1]

    def __len__(self):
        return 4

    def pooled(self):
        return self._pooled

    def image_index(self, i):
        return self._owner[i]


def test_image_pooled_averages_the_items_of_each_image():
    np.testing.assert_allclose(image_pooled(_FiveCropStore()), [[2, 0], [0, 3]])
