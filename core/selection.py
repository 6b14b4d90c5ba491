"""Which images a person should correct first.

A team that corrects a few images in an annotation tool and imports them (``Refine with
names`` then trains on them as true seeds) gets most from images that stand for many others.
Two ways to pick ``n`` of a corpus's images, both without labels:

- ``even``: spread evenly over the corpus's order (the centres of ``n`` equal bins). For a
  video's frames in order this is spread in time.
- ``representative``: the corpus's pooled image features are split into ``n`` groups by cosine
  k-means and the most typical image of each group is picked, the largest group first
  (typicality as in TypiClust, Hacohen et al., ICML 2022: the inverse mean cosine distance to
  the image's nearest neighbours within its group). A collection of several kinds of scene
  gets one image of each kind, not images in proportion to how the files happen to be ordered.

Both take ``done``: images a person has already corrected. They are never picked again, and the
next batch covers what they do not: ``even`` spreads over the images left, ``representative``
follows TypiClust's later rounds (``len(done) + n`` groups; groups that hold a done image are
covered; the most typical image of each of the ``n`` largest uncovered groups). So correcting a
batch, importing it and asking for the next batch never repeats an image.

``pick_images`` is the one entry point; ``PICKS`` lists the ways.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from core.clustering import CosineKMeans

__all__ = ["PICKS", "DEFAULT_PICK", "even_items", "representative_items", "pick_images", "image_pooled"]

PICKS = ("representative", "even")
DEFAULT_PICK = "representative"
TYPICALITY_NEIGHBORS = 20        # TypiClust's k
KMEANS_RESTARTS = 10


def _checked_done(n_items: int, n: int, done) -> np.ndarray:
    """``done`` as sorted unique indices, after checking that ``n`` images are left to pick."""
    done_arr = np.unique(np.asarray(list(done), dtype=np.int64))
    if done_arr.size and (done_arr[0] < 0 or done_arr[-1] >= n_items):
        raise ValueError(f"done holds image indices outside 0..{n_items - 1}: {done_arr.tolist()}")
    left = n_items - done_arr.size
    if not 1 <= n <= left:
        raise ValueError(f"can pick 1 to {left} of the {n_items} images"
                         + (f" ({done_arr.size} are done)" if done_arr.size else "") + f", got {n}")
    return done_arr


def even_items(n_items: int, n: int, done: Sequence[int] = ()) -> list[int]:
    """``n`` of ``n_items`` spread evenly over their order (the centres of ``n`` equal bins),
    leaving out the ``done`` ones."""
    done_arr = _checked_done(n_items, n, done)
    left = np.setdiff1d(np.arange(n_items), done_arr)
    return [int(left[(2 * j + 1) * left.size // (2 * n)]) for j in range(n)]


def representative_items(pooled: np.ndarray, n: int, seed: int = 0, done: Sequence[int] = ()) -> list[int]:
    """The most typical image of each of the ``n`` largest k-means groups of ``pooled`` (N, C)
    image features that hold no ``done`` image (``len(done) + n`` groups), the largest group
    first (ties: the lower image index)."""
    x = np.asarray(pooled, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"pooled must be (n_images, channels), got shape {x.shape}")
    done_arr = _checked_done(len(x), n, done)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n_groups = min(len(x), done_arr.size + n)
    groups = CosineKMeans(n_groups, n_init=KMEANS_RESTARTS, seed=seed).fit_predict(x)
    covered = set(groups[done_arr].tolist())
    picks: list[tuple[int, int]] = []                       # (-group size, image)
    for g in range(n_groups):
        members = np.flatnonzero(groups == g)
        if len(members) == 0 or g in covered:               # empty cannot happen after Lloyd, but be safe
            continue
        if len(members) <= 2:
            best = int(members[0])
        else:
            dist = 1.0 - x[members] @ x[members].T
            np.fill_diagonal(dist, np.inf)
            k = min(TYPICALITY_NEIGHBORS, len(members) - 1)
            mean_knn = np.sort(dist, axis=1)[:, :k].mean(axis=1)
            best = int(members[int(np.argmin(mean_knn))])   # typicality = 1 / mean_knn
        picks.append((-len(members), best))
    chosen = [i for _, i in sorted(picks)][:n]
    if len(chosen) < n:                                     # empty groups: fill with the images left, in order
        rest = np.setdiff1d(np.arange(len(x)), np.concatenate([done_arr, np.asarray(chosen, np.int64)]))
        chosen += rest[:n - len(chosen)].tolist()
    return [int(i) for i in chosen]


def pick_images(pooled: np.ndarray, n: int, how: str = DEFAULT_PICK, seed: int = 0,
                done: Sequence[int] = ()) -> list[int]:
    """``n`` image indices a person should correct next, picked ``how`` (one of ``PICKS``);
    ``done`` (indices already corrected) are left out and count as covered."""
    if how not in PICKS:
        raise ValueError(f"unknown pick {how!r}: use one of {', '.join(PICKS)}")
    if how == "even":
        return even_items(len(pooled), n, done)
    return representative_items(pooled, n, seed=seed, done=done)


def image_pooled(store) -> np.ndarray:
    """(n_images, C) pooled feature of each image of a feature store: the mean of its items'
    (several with five-crop features, one otherwise)."""
    pooled = np.asarray(store.pooled(), dtype=np.float32)
    owner = np.array([store.image_index(i) for i in range(len(store))])
    out = np.zeros((int(owner.max()) + 1, pooled.shape[1]), dtype=np.float32)
    np.add.at(out, owner, pooled)
    return out / np.bincount(owner)[:, None]
