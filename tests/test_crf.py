import numpy as np
import pytest
from PIL import Image

from core.clustering import cluster_log_probs
from core.crf import CRFParams, ClusterMapJob, cluster_map, crf_batch, crf_size, dense_crf, refine_labels


def _scene(seed: int, h: int = 48, w: int = 64, noise: float = 0.35):
    """A two-colour image and noisy 2-class log-probabilities whose argmax is speckled."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, w // 2 + seed:] = 1
    image = np.where(truth[..., None] == 1, [200, 40, 40], [30, 60, 190]).astype(np.uint8)
    p1 = np.clip(np.where(truth == 1, 0.65, 0.35) + noise * rng.normal(size=(h, w)), 0.02, 0.98)
    log_probs = np.log(np.stack([1 - p1, p1])).astype(np.float32)
    return image, log_probs, truth


def test_crf_cleans_speckle_along_image_edges():
    image, log_probs, truth = _scene(0)
    before = (log_probs.argmax(axis=0) == truth).mean()
    refined = dense_crf(image, log_probs)
    assert refined.shape == truth.shape and refined.dtype == np.int32
    after = (refined == truth).mean()
    assert before < 0.85
    assert after > 0.98


def test_crf_batch_in_parallel_matches_sequential_and_keeps_order():
    scenes = [_scene(s) for s in range(4)]
    images = [s[0] for s in scenes]
    lps = [s[1] for s in scenes]
    parallel = crf_batch(images, lps, n_jobs=2)
    sequential = [dense_crf(i, lp) for i, lp in zip(images, lps)]
    assert len(parallel) == 4
    for a, b in zip(parallel, sequential):
        np.testing.assert_array_equal(a, b)
    # order: each scene's edge sits at a different column
    assert [int(np.argmax(r[0] == 1)) for r in parallel] == [32, 33, 34, 35]


def test_crf_validates_inputs():
    image, log_probs, _ = _scene(0)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), log_probs)
    with pytest.raises(ValueError, match="log_probs"):
        dense_crf(image, log_probs[:, :10])
    with pytest.raises(ValueError, match="2 images but 1"):
        crf_batch([image, image], [log_probs])
    with pytest.raises(ValueError, match="iterations"):
        CRFParams(iterations=0)
    single = dense_crf(image, log_probs[:1])
    assert (single == 0).all()


def test_crf_size_scales_the_short_side_and_never_enlarges():
    assert crf_size(360, 480, 322) == (322, 429)
    assert crf_size(480, 360, 322) == (429, 322)
    assert crf_size(360, 480, None) == (360, 480)
    assert crf_size(200, 300, 322) == (200, 300)     # smaller images stay as they are
    assert crf_size(3000, 4000, 320) == (320, 427)


def _coded_scene(H=96, W=128, seed=0):
    """An image with a diagonal colour edge and noisy 2-cluster codes on a coarse 12x16 grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    truth = (xx > 0.6 * yy + 40).astype(np.int64)
    image = np.where(truth[..., None] == 1, [200, 40, 40], [30, 60, 190]).astype(np.uint8)
    gy, gx = np.mgrid[:12, :16]
    cell = ((gx + 0.5) * W / 16 > 0.6 * (gy + 0.5) * H / 12 + 40).astype(np.float32)
    codes = np.stack([1 - cell, cell, np.zeros_like(cell)], axis=-1) + 0.3 * rng.normal(size=(12, 16, 3))
    centroids = np.eye(2, 3, dtype=np.float32)
    return image, codes.astype(np.float32), centroids, truth


def test_crf_at_reduced_resolution_follows_the_full_resolution_edges(tmp_path):
    image, codes, centroids, truth = _coded_scene()
    plain = (cluster_log_probs(codes, centroids, truth.shape, alpha=2.0).argmax(0) == truth).mean()
    full = refine_labels(image, codes, centroids, 2.0, None)
    half = refine_labels(image, codes, centroids, 2.0, 48)
    assert full.shape == half.shape == truth.shape
    assert (full == truth).mean() > 0.97 and (half == truth).mean() > 0.97
    assert (half == truth).mean() > plain          # the CRF still snaps the blocky codes to the edge
    assert (half == full).mean() > 0.97
    # the worker job gives the same result from the image file
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    res = cluster_map(ClusterMapJob(codes, centroids, truth.shape, 2.0, image_path=str(path), crf=True,
                                    crf_resolution=48))
    np.testing.assert_array_equal(res.labels_crf, half)
    assert res.labels.shape == truth.shape and res.pixels.sum() == truth.size
