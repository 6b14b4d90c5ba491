"""The pixel head (core.pixel_head): corrected images' pixels teach what is thinner than a token."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from PIL import Image

from core.clustering import upsample_bilinear
from core.crf import CRFParams
from core.pixel_head import DEFAULT_PIXEL_HEAD_WEIGHT, PixelHead, combine, pixel_log_proba
from core.propagation import ClassMapJob, class_map


def _scene(seed: int, H: int = 48, W: int = 64, patch: int = 16):
    """Token features that know only 'left grass / right sky', and a one-pixel-wide grey pole in
    the middle of one token column that no token can draw; labels per pixel (0 grass, 1 sky,
    2 pole) and the pole's token column."""
    rng = np.random.default_rng(seed)
    h, w = H // patch, W // patch
    tokens = rng.normal(0, 0.05, (h, w, 8)).astype(np.float32)
    tokens[:, : w // 2, 0] += 1.0
    tokens[:, w // 2:, 1] += 1.0
    labels = np.zeros((H, W), np.int64)
    labels[:, W // 2:] = 1
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[labels == 0] = (40, 160, 40)
    rgb[labels == 1] = (120, 170, 250)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    col = int(rng.integers(0, w))
    x = col * patch + patch // 2
    labels[:, x] = 2
    rgb[:, x] = (128, 128, 128)
    return tokens, rgb, labels, col


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred & truth).sum() / (pred | truth).sum())


def test_a_pole_thinner_than_a_token_is_drawn_from_the_corrected_images_pixels():
    head = PixelHead(3, steps=300, pixels_per_image=3000).fit(_scene(s)[:3] for s in range(8))
    tokens, rgb, labels, col = _scene(10)
    pole = labels == 2
    alone = head.predict_log_proba(tokens, rgb).argmax(axis=0)
    assert (alone[pole] == 2).mean() > 0.8 and (alone[~pole] == labels[~pole]).mean() > 0.95

    # the propagator's token log-probabilities (smoothed, as its are) put the pole on its whole
    # token column; with the pixel head added at the app's weight, the map draws it one pixel wide
    h, w = tokens.shape[:2]
    token_p = np.full((h, w, 3), 0.05, np.float32)
    token_p[:, : w // 2, 0] = token_p[:, w // 2:, 1] = 0.9
    token_p[:, col] = (0.3, 0.05, 0.65) if col < w // 2 else (0.05, 0.3, 0.65)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "img.png")
        Image.fromarray(rgb).save(path)
        plain = class_map(ClassMapJob(np.log(token_p), rgb.shape[:2], path))
        a = head.arrays_
        both = class_map(ClassMapJob(np.log(token_p), rgb.shape[:2], path, pixel=a.project(tokens), pixel_arrays=a,
                                     pixel_weight=DEFAULT_PIXEL_HEAD_WEIGHT))
    assert _iou(plain.labels == 2, pole) < 0.2
    assert _iou(both.labels == 2, pole) > 0.5 and (both.labels[~pole] == labels[~pole]).mean() > 0.95


def test_the_prediction_projects_at_token_resolution_exactly():
    head = PixelHead(3, steps=20, pixels_per_image=500).fit(_scene(s)[:3] for s in range(2))
    tokens, rgb, _, _ = _scene(3)
    a = head.arrays_
    # the same as upsampling the features first and applying the whole MLP per pixel
    up = upsample_bilinear(tokens, rgb.shape[:2])
    hid = np.maximum(((up - a.mean) / a.scale) @ a.w_feat + (rgb / 127.5 - 1) @ a.w_rgb + a.b1, 0)
    z = hid @ a.w2 + a.b2
    ref = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    np.testing.assert_allclose(pixel_log_proba(a.project(tokens), rgb, a), np.moveaxis(ref, -1, 0), atol=1e-4)


def test_the_head_only_moves_probability_among_the_classes_it_was_taught():
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(4), size=(5, 6)).transpose(2, 0, 1)).astype(np.float32)   # (4, 5, 6)
    pixel = np.log(rng.dirichlet(np.ones(3), size=(5, 6)).transpose(2, 0, 1)).astype(np.float32)
    pixel = np.concatenate([pixel[:2], np.full((1, 5, 6), -np.inf, np.float32), pixel[2:]])    # class 2 not taught
    taught = np.array([True, True, False, True])
    out = combine(lp, pixel, taught, 0.5)
    np.testing.assert_allclose(np.exp(out).sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[2], lp[2], atol=1e-6)                          # the untaught class keeps its
    np.testing.assert_allclose(np.exp(out[taught]).sum(0), np.exp(lp[taught]).sum(0), atol=1e-5)
    moved = np.exp(out[taught]) / np.exp(out[taught]).sum(0)
    want = np.exp(lp[taught] + 0.5 * pixel[taught])
    np.testing.assert_allclose(moved, want / want.sum(0), atol=1e-5)              # a product of experts among them
    np.testing.assert_array_equal(combine(lp, pixel, taught, 0.0), lp)


def test_it_says_what_is_missing():
    with pytest.raises(ValueError, match="no labelled pixels"):
        PixelHead(3).fit([(np.zeros((2, 2, 4), np.float32), np.zeros((8, 8, 3), np.uint8), -np.ones((8, 8)))])
    with pytest.raises(ValueError, match="differ in size"):
        PixelHead(3).fit([(np.zeros((2, 2, 4), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4)))])
    with pytest.raises(RuntimeError, match="not fitted"):
        PixelHead(3).predict_log_proba(np.zeros((2, 2, 4)), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="n_classes"):
        PixelHead(1).fit([])


def test_the_pixel_head_is_applied_band_by_band_with_the_same_result(monkeypatch):
    import core.clustering as C

    head = PixelHead(3, steps=20, pixels_per_image=500).fit(_scene(s)[:3] for s in range(2))
    tokens, rgb, _, _ = _scene(3)
    a = head.arrays_
    full = pixel_log_proba(a.project(tokens), rgb, a)
    np.testing.assert_allclose(pixel_log_proba(a.project(tokens), rgb, a, rows=slice(5, 17)), full[:, 5:17])
    h, w = tokens.shape[:2]
    token_lp = np.log(np.random.default_rng(0).dirichlet(np.ones(3), size=(h, w))).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "img.png")
        Image.fromarray(rgb).save(path)
        job = ClassMapJob(token_lp, rgb.shape[:2], path, pixel=a.project(tokens), pixel_arrays=a, pixel_weight=0.5)
        whole = class_map(job)
        monkeypatch.setattr(C, "BAND_VALUES", 3 * rgb.shape[1])          # one row per band
        np.testing.assert_array_equal(class_map(job).labels, whole.labels)
