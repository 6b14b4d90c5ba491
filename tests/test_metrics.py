import numpy as np
import pytest

from core.metrics import ConfusionMatrix, LinearProbe, downsample_labels, hungarian_match


def test_permuted_perfect_clustering_scores_one():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(30, 40))
    pred = np.array([2, 0, 3, 1])[target]
    s = ConfusionMatrix(4, 4).update(pred, target).scores()
    assert s["miou"] == pytest.approx(1.0) and s["accuracy"] == pytest.approx(1.0)
    assert s["matching"] == {2: 0, 0: 1, 3: 2, 1: 3}
    # without matching the same prediction is poor
    assert ConfusionMatrix(4, 4).update(pred, target).scores(hungarian=False)["miou"] < 0.3


def test_hand_computed_scores_and_ignore_label():
    target = np.array([[0, 0, 1, 1, 255, 255]])
    pred = np.array([[1, 1, 0, 1, 0, 0]])
    cm = ConfusionMatrix(2, 2, ignore_index=255).update(pred, target)
    assert cm.matrix.tolist() == [[0, 1], [2, 1]]
    s = cm.scores()
    # cluster 1 -> class 0 (2 px), cluster 0 -> class 1 (1 px)
    assert s["matching"] == {0: 1, 1: 0}
    assert s["accuracy"] == pytest.approx(3 / 4)
    # class 0: tp 2, pred 3, gt 2 -> 2/3 ; class 1: tp 1, pred 1, gt 2 -> 1/2
    assert s["per_class_iou"] == pytest.approx([2 / 3, 1 / 2])
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["n_pixels"] == 4


def test_accumulating_images_equals_one_big_update_and_memory_is_fixed():
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 5, size=(20, 30)) for _ in range(6)]
    targets = [rng.integers(0, 4, size=(20, 30)) for _ in range(6)]
    acc = ConfusionMatrix(5, 4)
    for p, t in zip(preds, targets):
        acc.update(p, t)
        assert acc.matrix.shape == (5, 4) and acc.matrix.dtype == np.int64
    big = ConfusionMatrix(5, 4).update(np.concatenate(preds), np.concatenate(targets))
    np.testing.assert_array_equal(acc.matrix, big.matrix)
    halves = ConfusionMatrix(5, 4).update(preds[0], targets[0]).merge(
        ConfusionMatrix(5, 4).update(np.concatenate(preds[1:]), np.concatenate(targets[1:])))
    np.testing.assert_array_equal(halves.matrix, acc.matrix)


def test_over_clustering_unmatched_clusters_count_as_errors_unless_many_to_one():
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 2, 2, 1, 1, 1, 1])  # class 0 split over clusters 0 and 2
    cm = ConfusionMatrix(3, 2).update(pred, target)
    one_to_one = cm.scores()
    assert one_to_one["accuracy"] == pytest.approx(6 / 8)
    assert len(one_to_one["matching"]) == 2
    many = cm.scores(many_to_one=True)
    assert many["accuracy"] == pytest.approx(1.0) and many["miou"] == pytest.approx(1.0)


def test_miou_only_over_classes_present_and_invalid_ids_rejected():
    cm = ConfusionMatrix(3, 3).update(np.array([0, 1, 1]), np.array([0, 1, 1]))
    s = cm.scores()
    assert s["per_class_iou"][2] is None and s["miou"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="predicted ids"):
        cm.update(np.array([5]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((3, 3)))
    assert hungarian_match(np.array([[0, 9], [9, 0]])) == {0: 1, 1: 0}


def test_downsample_labels_takes_the_majority_and_skips_ignored_pixels():
    mask = np.full((6, 6), 11)
    mask[:3, :3] = 2
    mask[:3, 3:] = 4
    mask[3:, :3] = 11       # all ignored -> -1
    mask[3:, 3:] = 1
    mask[5, 5] = 7          # minority pixel
    out = downsample_labels(mask, (2, 2), n_classes=11, ignore_index=11)
    assert out.tolist() == [[2, 4], [-1, 1]]


def test_linear_probe_learns_a_linear_rule_and_ignores_unlabelled_rows():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6000, 6)).astype(np.float32) * [1, 10, 0.1, 1, 1, 1]
    X = X[(np.abs(X[:, 1]) > 5.0) & (np.abs(X[:, 2]) > 0.05)][:1500]  # keep a margin around the rule
    y = (X[:, 1] > 0).astype(np.int64) + 2 * (X[:, 2] > 0)
    y_noisy = y.copy()
    y_noisy[:500] = -1
    probe = LinearProbe(4, epochs=20, lr=1e-2, batch_size=256).fit(X, y_noisy)
    assert (probe.predict(X) == y).mean() > 0.98
    assert probe.decision_function(X[:2]).shape == (2, 4)
    with pytest.raises(ValueError, match="expected 6 features"):
        probe.predict(X[:, :3])


def test_majority_naming_ignores_void_clusters_and_counts_unnamed_pixels_as_errors():
    from core.metrics import majority_names, named_scores, with_void

    mask = np.array([[0, 0, 1, 1, 255, 255]])
    assert with_void(mask, 2, 255).tolist() == [[0, 0, 1, 1, 2, 2]]
    # 4 clusters x (2 classes + void): cluster 3 is mostly void, cluster 2 splits class 1
    counts = np.array([[10, 0, 0], [0, 6, 1], [1, 4, 0], [0, 2, 9]])
    names = majority_names(counts, max_void_share=0.5)
    assert names.tolist() == [0, 1, 1, -1]
    s = named_scores(counts, names)
    # class 1: 12 pixels, 10 found, 1 false positive from cluster 2; the 2 under the void cluster are errors
    assert s["per_class_iou"][1] == pytest.approx(10 / 13)
    assert s["per_class_iou"][0] == pytest.approx(10 / 11)
    assert s["accuracy"] == pytest.approx(20 / 23)
    assert s["naming_actions"] == 3 and s["unnamed_clusters"] == 1 and s["classes_found"] == 2
