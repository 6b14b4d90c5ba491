"""core.refinement.refine: names propagated to every item; resumable; cancellable."""
import numpy as np
import pytest
from PIL import Image

from core.clustering import CosineKMeans
from core.errors import Cancelled
from core.pixel_head import DEFAULT_PIXEL_HEAD_WEIGHT
from core.refinement import ClassSpace, RefineConfig, refine
from tests.conftest import make_planted_corpus

CFG = dict(steps=80, hidden=16, batch_size=128, crf=False, n_jobs=1)


def _setup(tmp_path):
    feats, truth, _ = make_planted_corpus(n_items=9, grid=(6, 6), dim=16, n_classes=3, noise=0.1)
    X = np.concatenate([np.asarray(feats.tokens(i), np.float32) for i in range(len(feats))])
    km = CosineKMeans(6, n_init=3, seed=0).fit(X)
    pred = km.predict(X)
    flat = np.concatenate([t.ravel() for t in truth])
    # name clusters after their majority class, two of them only (the rest stay their own classes)
    major = [int(np.bincount(flat[pred == c], minlength=3).argmax()) for c in range(6)]
    return feats, truth, km, major


def _images(tmp_path, truth, line: dict[int, int] | None = None):
    """One 24x24 image per item, a colour per class (4 px per token), and in each image of
    ``line`` (item -> column) a one-pixel-wide red line that no token shows."""
    colours = np.array([(60, 150, 60), (90, 90, 200), (200, 200, 200)], np.uint8)
    paths = []
    for i, t in enumerate(truth):
        rgb = colours[np.kron(t, np.ones((4, 4), np.int64))]
        if line and i in line:
            rgb[:, line[i]] = (230, 20, 20)
        paths.append(tmp_path / f"img_{i}.png")
        Image.fromarray(rgb).save(paths[-1])
    return paths


def test_a_corrected_images_thin_line_is_drawn_in_the_other_images(tmp_path):
    feats, truth, km, major = _setup(tmp_path)
    space = ClassSpace(cluster_to_class=tuple(major), class_to_cluster=tuple(major.index(c) for c in range(3)))
    codes = lambda i: np.asarray(feats.tokens(i), np.float32)          # noqa: E731
    lines = {i: 5 + 2 * i for i in range(len(feats))}                   # a red line in every image
    paths = _images(tmp_path, truth, lines)
    # the person corrected images 0 (classes 0 and 1) and 1 (1 and 2) whole, and drew their lines as class 2
    fixed = {}
    for i in (0, 1):
        fixed[i] = np.asarray(space.class_to_cluster)[np.kron(truth[i], np.ones((4, 4), np.int64))]
        fixed[i][:, lines[i]] = space.class_to_cluster[2]
    under = {i: truth[i][0, lines[i] // 4] for i in range(len(feats)) if i not in fixed}   # the class each line crosses
    crossing = [i for i, c in under.items() if c != 2]   # lines over another class

    def maps(out, weight):
        refine(feats, codes, km.centroids_, space, paths, [(24, 24)] * len(feats), out,
               RefineConfig(**CFG, pixel_head_weight=weight), overrides=fixed)
        return {i: np.asarray(Image.open(out / f"{i:06d}.png")) for i in under}

    def line_share(m, items):
        return np.mean([(m[i][:, lines[i]] == space.class_to_cluster[2]).mean() for i in items])

    with_head, plain = maps(tmp_path / "with", DEFAULT_PIXEL_HEAD_WEIGHT), maps(tmp_path / "without", 0.0)
    assert (tmp_path / "with" / "pixel_head.npz").is_file() and not (tmp_path / "without" / "pixel_head.npz").exists()
    assert line_share(with_head, crossing) > 0.9 and line_share(plain, crossing) < 0.2   # drawn one pixel wide
    assert np.mean([(np.delete(with_head[i], lines[i], 1) == np.delete(plain[i], lines[i], 1)).mean()
                    for i in under]) > 0.95                                 # and the rest is as it was
    with pytest.raises(ValueError, match="pixel_head_weight must be >= 0"):
        RefineConfig(pixel_head_weight=-1).validate()


def test_refine_propagates_names_and_resumes(tmp_path):
    feats, truth, km, major = _setup(tmp_path)
    space = ClassSpace(cluster_to_class=tuple(major), class_to_cluster=tuple(major.index(c) for c in range(3)))
    paths = [tmp_path / f"{i}.png" for i in range(len(feats))]
    sizes = [(24, 24)] * len(feats)
    out = tmp_path / "out"
    calls = []
    metrics = refine(feats, lambda i: np.asarray(feats.tokens(i), np.float32), km.centroids_, space, paths, sizes,
                     out, RefineConfig(**CFG), progress=lambda st, f, info: calls.append((st, f)))
    assert metrics["n_images"] == 9 and metrics["n_classes"] == 3
    assert [c[0] for c in calls][0] == "pseudo-labels" and calls[-1] == ("maps", 1.0)
    assert all(b[1] >= a[1] for a, b in zip(calls, calls[1:]))          # progress only goes forward
    acc = []
    for i in range(9):
        seg = np.asarray(Image.open(out / f"{i:06d}.png"))
        assert seg.shape == (24, 24) and set(np.unique(seg)) <= set(space.class_to_cluster)
        cls = np.asarray(major)[seg[::4, ::4]]
        acc.append((cls == truth[i]).mean())
    assert np.mean(acc) > 0.9
    # resume: the model and the finished maps are reused, a missing map is written again
    model_mtime = (out / "propagator.pt").stat().st_mtime_ns
    (out / "000004.png").unlink()
    keep = (out / "000003.png").stat().st_mtime_ns
    refine(feats, lambda i: np.asarray(feats.tokens(i), np.float32), km.centroids_, space, paths, sizes, out,
           RefineConfig(**CFG))
    assert (out / "000004.png").is_file() and (out / "000003.png").stat().st_mtime_ns == keep
    assert (out / "propagator.pt").stat().st_mtime_ns == model_mtime
    other = ClassSpace(cluster_to_class=(0,) * 6, class_to_cluster=(0, 1))
    with pytest.raises(ValueError, match="other names"):
        refine(feats, lambda i: np.asarray(feats.tokens(i), np.float32), km.centroids_, other, paths, sizes, out,
               RefineConfig(**CFG))


def test_seeds_and_found_tokens_override_pseudo_labels_and_cancel(tmp_path):
    feats, truth, km, major = _setup(tmp_path)
    # every cluster one class except a seed-only class 3 that exists only through a checked image
    space = ClassSpace(cluster_to_class=tuple(major) + (3,), class_to_cluster=tuple(major.index(c) for c in range(3)) + (6,))
    seeds = {0: np.full(36, 6)}                       # image 0 checked: all of it is cluster 6 (class 3)
    paths = [tmp_path / f"{i}.png" for i in range(len(feats))]
    sizes = [(12, 12)] * len(feats)
    refine(feats, lambda i: np.asarray(feats.tokens(i), np.float32), km.centroids_, space, paths, sizes,
           tmp_path / "s", RefineConfig(**CFG), seeds=seeds)
    assert (np.asarray(Image.open(tmp_path / "s" / "000000.png")) == 6).mean() > 0.5
    with pytest.raises(Cancelled):
        refine(feats, lambda i: np.asarray(feats.tokens(i), np.float32), km.centroids_, space, paths, sizes,
               tmp_path / "c", RefineConfig(**CFG), cancel=lambda: True)
    with pytest.raises(ValueError, match="seed_weight"):
        RefineConfig(seed_weight=1.0).validate()
    with pytest.raises(ValueError, match="pass the run's backbone"):
        refine(feats, lambda i: np.asarray(feats.tokens(i), np.float32), km.centroids_, space, paths, sizes,
               tmp_path / "d", RefineConfig(**CFG, dense=True))


def test_a_corrected_images_seeds_weigh_more_than_a_checked_ones_and_its_pixels_are_kept(tmp_path):
    from core.refinement import _LabelSource

    feats, truth, km, major = _setup(tmp_path)
    space = ClassSpace(cluster_to_class=tuple(major), class_to_cluster=tuple(major.index(c) for c in range(3)))
    cfg = RefineConfig(**CFG)
    codes = lambda i: np.asarray(feats.tokens(i), np.float32)          # noqa: E731
    seeds = {0: np.full(36, major.index(1)), 1: np.full(36, major.index(2))}
    source = _LabelSource(len(feats), codes, km.centroids_, space, cfg, lambda i: None, seeds,
                          lambda *a: None, lambda: False, corrected=frozenset({1}))
    assert np.all(source(0)[1] == cfg.seed_weight) and np.all(source(1)[1] == cfg.correction_weight)
    assert cfg.correction_weight > cfg.seed_weight
    assert np.all(source(1)[0] == 2)                                     # the corrected class everywhere
    # refine writes a corrected item's pixels as drawn (-1: the prediction stays)
    fixed = np.full((24, 24), -1)
    fixed[:8, :8] = major.index(2)
    out = tmp_path / "maps"
    paths = _images(tmp_path, truth)
    refine(feats, codes, km.centroids_, space, paths, [(24, 24)] * len(feats), out, cfg, seeds=seeds,
           overrides={1: fixed})
    drawn = np.asarray(Image.open(out / "000001.png"))
    assert np.all(drawn[:8, :8] == major.index(2))
    with pytest.raises(ValueError, match="correction_weight must be > 1"):
        RefineConfig(correction_weight=1.0).validate()


def test_tokens_a_person_left_out_of_every_named_label_learn_no_named_label(tmp_path):
    from core.constants import KEEP_PREDICTION, NOT_NAMED
    from core.refinement import _LabelSource, correction_seeds

    # a token takes the majority of its corrected pixels; left-out pixels vote, uncorrected ones do not
    fixed = np.full((12, 12), NOT_NAMED)
    fixed[:6] = 4
    fixed[6:8] = KEEP_PREDICTION
    fixed[6:, 6:] = 5
    assert correction_seeds(fixed, (2, 2), n_clusters=6).tolist() == [4, 4, NOT_NAMED, 5]
    assert correction_seeds(np.full((4, 4), KEEP_PREDICTION), (2, 2), 6).tolist() == [-1] * 4

    feats, truth, km, major = _setup(tmp_path)
    # classes 0 and 1 are named labels, class 2 stays an unnamed cluster
    space = ClassSpace(cluster_to_class=tuple(major), class_to_cluster=tuple(major.index(c) for c in range(3)),
                       n_labels=2, n_unnamed=1)
    codes = lambda i: np.asarray(feats.tokens(i), np.float32)          # noqa: E731
    i = next(i for i in range(len(feats)) if (truth[i] == 2).any() and (truth[i] != 2).any())
    source = _LabelSource(len(feats), codes, km.centroids_, space, RefineConfig(**CFG), lambda i: None,
                          {i: np.full(36, NOT_NAMED)}, lambda *a: None, lambda: False, corrected=frozenset({i}))
    lab, wt = source(i)
    assert not np.isin(lab, [0, 1]).any() and np.all(wt[lab < 0] == 0)
    assert (lab == 2).sum() == (truth[i].ravel() == 2).sum() > 0        # the unnamed cluster's tokens stay
    other, _ = source(i + 1 if i + 1 < len(feats) else 0)               # an image nobody corrected
    assert np.isin(other, [0, 1]).any()
