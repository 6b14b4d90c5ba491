import numpy as np
import pytest

from core.errors import Cancelled
from core.propagation import (ClassMapJob, Propagator, class_map, cluster_probabilities, pseudo_labels)
from core.tokens import ArrayFeatures


def _corpus(n_items=6, h=6, w=8, C=16, seed=0):
    """Three classes in feature space (class mean + noise); class 2 is small (a 'pole')."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(3, C)) * 2.0
    maps, truth = [], []
    for _ in range(n_items):
        lab = np.zeros((h, w), np.int64)
        lab[:, w // 2:] = 1
        lab[1:4, 1] = 2
        maps.append((means[lab] + rng.normal(size=(h, w, C))).astype(np.float16))
        truth.append(lab.ravel())
    return ArrayFeatures(maps), truth, means


def test_pseudo_labels_take_the_named_class_and_a_margin_confidence():
    probs = np.array([[0.5, 0.4, 0.1],    # clusters 0 and 1 both named class 3: confident
                      [0.45, 0.1, 0.45],  # tie between class 3 and class 0
                      [0.1, 0.1, 0.8],    # cluster 2 is unnamed (void)
                      [0.2, 0.7, 0.1]], dtype=np.float32)
    names = np.array([3, 3, -1])
    labels, weights = pseudo_labels(probs, names, min_confidence=0.0)
    assert labels.tolist() == [3, 3, -1, 3]
    assert weights[0] == pytest.approx(0.5 / 0.6)  # q2 = the unnamed cluster, not the sibling
    assert weights[1] == pytest.approx(0.5)
    assert weights[2] == 0.0
    names2 = np.array([3, 0, 1])
    labels2, _ = pseudo_labels(probs, names2, min_confidence=0.6)
    assert labels2.tolist() == [-1, -1, 1, 0]  # the two near-ties dropped
    with pytest.raises(ValueError, match="cluster_to_class"):
        pseudo_labels(probs, np.array([0, 1]))


def test_propagator_learns_from_partial_noisy_pseudo_labels_and_round_trips(tmp_path):
    feats, truth, means = _corpus()
    rng = np.random.default_rng(1)
    labels, weights = [], []
    for t in truth:
        lab = t.copy()
        lab[rng.random(lab.size) < 0.5] = -1          # half the tokens unlabelled
        flip = rng.random(lab.size) < 0.1             # 10 % wrong labels
        lab[flip & (lab >= 0)] = (lab[flip & (lab >= 0)] + 1) % 3
        labels.append(lab)
        weights.append(np.where(lab >= 0, 0.8, 0.0))
    seen = []
    prop = Propagator(3, hidden=32, steps=200, batch_size=128, keep_fraction=1.0, seed=0).fit(
        feats, labels, weights, progress=lambda s, n, l: seen.append((s, n)))
    assert seen[-1] == (200, 200)
    acc = np.mean([(prop.predict(feats.tokens(i)) == truth[i]).mean() for i in range(len(feats))])
    assert acc > 0.95
    # the small class is found on every item, including tokens that had no label
    assert all((prop.predict(feats.tokens(i)).reshape(6, 8)[1:4, 1] == 2).all() for i in range(len(feats)))
    lp = prop.predict_log_proba(feats.tokens(0))
    assert lp.shape == (48, 3) and np.allclose(np.exp(lp).sum(1), 1, atol=1e-5)
    prop.save(tmp_path / "p.pt")
    again = Propagator.load(tmp_path / "p.pt")
    assert np.allclose(again.predict_log_proba(feats.tokens(2)), prop.predict_log_proba(feats.tokens(2)), atol=1e-6)
    assert again.hidden == 32 and again.steps == 200


def test_seeds_override_wrong_pseudo_labels():
    feats, truth, _ = _corpus()
    # pseudo-labels call class 2 ("pole") class 0 everywhere; one person-checked item has it right
    labels = [np.where(t == 2, 0, t) for t in truth]
    weights = [np.full(t.shape, 0.9, np.float32) for t in truth]
    labels[0], weights[0] = truth[0].copy(), np.full(truth[0].shape, 5.0, np.float32)
    prop = Propagator(3, hidden=32, steps=300, batch_size=128, keep_fraction=1.0, class_balance=1.0).fit(
        feats, labels, weights)
    pole = np.concatenate([prop.predict(feats.tokens(i)).reshape(6, 8)[1:4, 1] for i in range(1, len(feats))])
    assert (pole == 2).mean() > 0.8


def test_propagator_validates_and_cancels():
    feats, truth, _ = _corpus(n_items=2)
    with pytest.raises(ValueError, match="no labelled tokens"):
        Propagator(3).fit(feats, [np.full(48, -1), np.full(48, -1)])
    with pytest.raises(ValueError, match="at least two"):
        Propagator(3).fit(feats, [np.zeros(48, int), np.zeros(48, int)])
    with pytest.raises(ValueError, match="entries"):
        Propagator(3).fit(feats, [np.zeros(5, int), np.zeros(48, int)])
    with pytest.raises(ValueError, match="keep_fraction"):
        Propagator(3, keep_fraction=0).fit(feats, truth)
    with pytest.raises(RuntimeError, match="not fitted"):
        Propagator(3).predict(np.zeros((2, 16), np.float32))
    with pytest.raises(Cancelled):
        Propagator(3, steps=500, batch_size=16).fit(feats, truth, cancel=lambda: True)


def test_keep_fraction_keeps_the_most_confident_tokens():
    feats, truth, _ = _corpus(n_items=2)
    w = [np.linspace(0.5, 1.0, 48).astype(np.float32) for _ in truth]
    prop = Propagator(3, keep_fraction=0.5, steps=1, batch_size=8).fit(feats, truth, w)
    full = np.bincount(np.concatenate(truth), minlength=3)
    assert np.abs(prop.class_counts_ - np.round(full * 0.5)).max() <= 1


def test_labels_stream_from_a_callable_read_twice_and_the_token_cap_holds():
    """A corpus too big for its labels to sit in memory: labels come from a callable (read once to
    plan, once to pick), the result is the lists' result, and max_tokens bounds the training set
    while keeping the class proportions and the most confident tokens."""
    feats, truth, _ = _corpus(n_items=20)
    w = [np.linspace(0.5, 1.0, 48).astype(np.float32)[np.random.default_rng(i).permutation(48)] for i in range(20)]
    reads = []

    def labels_of(i):
        reads.append(i)
        return truth[i], w[i]

    kw = dict(keep_fraction=0.5, steps=5, batch_size=8, seed=3)
    streamed = Propagator(3, **kw).fit(feats, labels_of)
    listed = Propagator(3, **kw).fit(feats, truth, w)
    assert sorted(reads) == sorted(list(range(20)) * 2)
    assert streamed.class_counts_.tolist() == listed.class_counts_.tolist()
    assert np.allclose(streamed.mean_, listed.mean_)
    full = np.bincount(np.concatenate(truth), minlength=3)
    capped = Propagator(3, max_tokens=150, steps=1, batch_size=8, keep_fraction=1.0).fit(feats, labels_of)
    assert 135 <= capped.n_train_tokens_ <= 150                   # about the cap, never above
    assert np.abs(capped.class_counts_ / 150 - full / full.sum()).max() < 0.08
    with pytest.raises(ValueError, match="do not pass weights"):
        Propagator(3).fit(feats, labels_of, w)


def test_self_training_rounds_relabel_from_predictions_but_keep_seeds():
    """rounds=2: the second classifier learns the first one's predictions (fixing labels the
    clusters got wrong), seeds (weight >= 1) keep their class, progress counts both rounds."""
    feats, truth, _ = _corpus(n_items=8)
    rng = np.random.default_rng(4)
    labels, weights = [], []
    for t in truth:
        lab = t.copy()
        wrong = rng.random(lab.size) < 0.25                      # a quarter mislabelled, confidently
        lab[wrong] = (lab[wrong] + 1) % 3
        labels.append(lab)
        weights.append(np.full(lab.size, 0.9, np.float32))
    weights[0] = np.full(48, 3.0, np.float32)                  # item 0 person-checked: a seed image
    labels[0] = truth[0].copy()
    seen = []
    kw = dict(hidden=32, steps=100, batch_size=64, keep_fraction=1.0, class_balance=0.0, seed=0)
    two = Propagator(3, rounds=2, **kw).fit(feats, labels, weights, progress=lambda s, n, l: seen.append((s, n)))
    assert seen[-1] == (200, 200) and len(two.history_) == 4
    # what round 2 trained on: round 1's predictions, which undo most of the wrong labels
    relabel = two._predicted(feats, lambda i: (labels[i], weights[i]))
    lab1, wt1 = relabel(1)
    assert (lab1 == truth[1]).mean() > (labels[1] == truth[1]).mean() + 0.1
    assert (wt1 < 1).all() and (wt1 > 0).all()
    lab0, wt0 = relabel(0)
    assert (lab0 == truth[0]).all() and (wt0 == 3.0).all()      # seeds are never relabelled
    acc = np.mean([(two.predict(feats.tokens(i)) == truth[i]).mean() for i in range(len(feats))])
    assert acc > 0.9
    with pytest.raises(ValueError, match="rounds"):
        Propagator(3, rounds=0).fit(feats, labels, weights)


def test_class_map_upsamples_and_refines_with_crf(tmp_path):
    from PIL import Image

    lp = np.log(np.full((4, 6, 2), 0.1, np.float32))
    lp[:, 3:, 1] = np.log(0.9)
    lp[:, :3, 0] = np.log(0.9)
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 255
    Image.fromarray(img).save(tmp_path / "im.png")
    res = class_map(ClassMapJob(lp, (40, 60), str(tmp_path / "im.png"), crf=True, crf_resolution=20))
    assert res.labels.shape == (40, 60) and res.labels_crf.shape == (40, 60)
    assert (res.labels[:, :25] == 0).all() and (res.labels[:, 35:] == 1).all()
    assert (res.labels_crf[:, :28] == 0).all() and (res.labels_crf[:, 32:] == 1).all()
    # only the CRF's labels asked for: the same labels, without the full-resolution plain map
    only = class_map(ClassMapJob(lp, (40, 60), str(tmp_path / "im.png"), crf=True, crf_resolution=20, plain=False))
    assert only.labels is None and only.confidence is None
    np.testing.assert_array_equal(only.labels_crf, res.labels_crf)


def test_cluster_probabilities_prefer_the_nearest_centroid():
    c = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = cluster_probabilities(np.array([[2.0, 0.1], [0.1, 3.0]]), c, alpha=10)
    assert p.argmax(1).tolist() == [0, 1] and np.allclose(p.sum(1), 1)


def test_class_map_keeps_ruled_out_classes_off_the_pixels_a_person_left_out_of_them(tmp_path):
    """A corrected image's pixels outside every drawn mask are none of the named labels (the first
    classes): the map takes the best other class there, with and without the CRF, at any CRF size."""
    from PIL import Image

    lp = np.log(np.full((4, 6, 3), 0.05, np.float32))
    lp[..., 0] = np.log(0.8)                                # a named label predicted everywhere
    lp[:, :, 2] = np.log(0.15)                              # an unnamed cluster, second everywhere
    img = np.full((40, 60, 3), 128, np.uint8)
    Image.fromarray(img).save(tmp_path / "im.png")
    left_out = np.zeros((40, 60), bool)
    left_out[:, :23] = True                                  # not on the token grid's or the CRF's cells
    for crf_resolution in (20, None):                        # reduced-size CRF, full-size CRF
        res = class_map(ClassMapJob(lp, (40, 60), str(tmp_path / "im.png"), crf=True, crf_resolution=crf_resolution,
                                    ruled_out=left_out, ruled_out_classes=2))
        assert (res.labels[left_out] == 2).all() and (res.labels[~left_out] == 0).all()
        assert (res.labels_crf[left_out] == 2).all() and (res.labels_crf[:, 30:] == 0).all()   # CRF: smooth edge
    # ruling out every class would leave none: the prediction stays
    every = class_map(ClassMapJob(lp, (40, 60), ruled_out=left_out, ruled_out_classes=3))
    assert (every.labels == 0).all()


def test_class_map_without_the_crf_is_made_band_by_band_with_the_same_result(tmp_path, monkeypatch):
    import core.clustering as C
    from PIL import Image

    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(4), size=(5, 7))).astype(np.float32)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    left_out = np.zeros((40, 60), bool)
    left_out[10:25, 5:33] = True
    jobs = [ClassMapJob(lp, (40, 60)), ClassMapJob(lp, (40, 60), ruled_out=left_out, ruled_out_classes=2),
            ClassMapJob(lp, (40, 60), str(tmp_path / "im.png"), crf=True, crf_resolution=20,
                        ruled_out=left_out, ruled_out_classes=2)]
    whole = [class_map(j) for j in jobs]
    monkeypatch.setattr(C, "BAND_VALUES", 100)             # bands of 1-2 rows
    for j, w in zip(jobs, whole):
        banded = class_map(j)
        np.testing.assert_array_equal(banded.labels, w.labels)
        np.testing.assert_allclose(banded.confidence.astype(np.float32), w.confidence.astype(np.float32), atol=1e-3)
        if j.crf:
            np.testing.assert_array_equal(banded.labels_crf, w.labels_crf)
