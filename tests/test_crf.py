import numpy as np
import pytest

from core.crf import CRFParams, crf_batch, dense_crf


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
