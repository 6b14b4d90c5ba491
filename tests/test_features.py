"""core.features: corpus extraction, on-disk store, reuse, resume, cancellation."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import Cancelled, ImageLoadError
from core.features import FeatureConfig, FeatureStore, cache_key, extract_features
from core.images import crop, five_crop_boxes, load_image, resize_rgb, target_size
from core.tokens import TokenFeatures, pooled_features

from .conftest import write_test_images


def _direct(backbone, rgb: np.ndarray, resolution: int, flip: bool = False) -> np.ndarray:
    """(h*w, C) features of one image computed without the pipeline."""
    h, w = target_size(rgb.shape[0], rgb.shape[1], resolution, backbone.patch_size, 1024)
    x = backbone.preprocess(resize_rgb(rgb, (h, w)))[None]
    if flip:
        x = x.flip(-1)
    with torch.inference_mode():
        f = backbone(x)[0].permute(1, 2, 0)
    if flip:
        f = f.flip(1)
    return f.reshape(-1, f.shape[-1]).numpy()


def test_store_holds_the_backbone_features_of_every_image(tiny_backbone, image_files, tmp_path):
    cfg = FeatureConfig(backbone="test_tiny", resolution=32, batch_size=2)
    store = extract_features(image_files, tiny_backbone, cfg, tmp_path / "cache")
    assert isinstance(store, TokenFeatures) and store.complete
    assert len(store) == len(image_files) and store.embed_dim == 32
    for i, path in enumerate(image_files):
        rgb = load_image(path)
        h, w = target_size(*rgb.shape[:2], 32, 8, 1024)
        assert store.grid(i) == (h // 8, w // 8)
        assert store.image_index(i) == i
        tok = store.tokens(i)
        assert tok.dtype == np.float16 and tok.shape == (h * w // 64, 32)
        np.testing.assert_allclose(tok.astype(np.float32), _direct(tiny_backbone, rgb, 32), atol=2e-2, rtol=1e-2)


def test_five_crops_and_flip(tiny_backbone, image_files, tmp_path):
    cfg = FeatureConfig(backbone="test_tiny", resolution=16, crop_mode="five", flip=True, batch_size=3)
    store = extract_features(image_files[:2], tiny_backbone, cfg, tmp_path / "cache")
    assert len(store) == 10
    assert [store.image_index(i) for i in range(10)] == [0] * 5 + [1] * 5
    rgb = load_image(image_files[1])
    for c, box in enumerate(five_crop_boxes(*rgb.shape[:2])):
        i = 5 + c
        assert store.box(i) == box
        part = np.ascontiguousarray(crop(rgb, box))
        np.testing.assert_allclose(store.tokens(i).astype(np.float32), _direct(tiny_backbone, part, 16),
                                   atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(store.tokens(i, flipped=True).astype(np.float32),
                                   _direct(tiny_backbone, part, 16, flip=True), atol=2e-2, rtol=1e-2)


def test_flipped_features_need_flip(tiny_backbone, image_files, tmp_path):
    store = extract_features(image_files[:1], tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=16),
                             tmp_path / "c")
    with pytest.raises(ValueError, match="flip=True"):
        store.tokens(0, flipped=True)


def test_second_run_reuses_the_store(tiny_backbone, image_files, tmp_path):
    cfg = FeatureConfig(backbone="test_tiny", resolution=24)
    first = extract_features(image_files, tiny_backbone, cfg, tmp_path / "cache")
    mtime = (first.root / "tokens.f16").stat().st_mtime_ns
    calls = []
    again = extract_features(image_files, tiny_backbone, cfg, tmp_path / "cache",
                             progress=lambda d, n: calls.append((d, n)))
    assert again.root == first.root and calls == [(5, 5)]
    assert (again.root / "tokens.f16").stat().st_mtime_ns == mtime
    # Another resolution, or other image contents, is another store.
    other = extract_features(image_files, tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=32),
                             tmp_path / "cache")
    assert other.root != first.root
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(image_files[0])
    changed = extract_features(image_files, tiny_backbone, cfg, tmp_path / "cache")
    assert changed.root != first.root


def test_cache_key_depends_on_weights_and_options():
    cfg = FeatureConfig(backbone="test_tiny")
    base = cache_key("test_tiny", "w1", cfg, ["a", "b"])
    assert base != cache_key("test_tiny", "w2", cfg, ["a", "b"])
    assert base != cache_key("test_tiny", "w1", FeatureConfig(backbone="test_tiny", flip=True), ["a", "b"])
    assert base != cache_key("test_tiny", "w1", cfg, ["b", "a"])
    assert base == cache_key("test_tiny", "w1", FeatureConfig(backbone="test_tiny", batch_size=1), ["a", "b"])


def test_cancel_then_resume_gives_the_same_features(tiny_backbone, tmp_path):
    paths = write_test_images(tmp_path / "imgs", sizes=[(40, 48)] * 12)
    cfg = FeatureConfig(backbone="test_tiny", resolution=32, batch_size=2, flip=True)
    polls = []

    def cancel_after_three_batches() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(Cancelled):
        extract_features(paths, tiny_backbone, cfg, tmp_path / "cache", cancel=cancel_after_three_batches)
    (root,) = [p for p in (tmp_path / "cache").iterdir()]
    partial = FeatureStore.open(root)
    assert not partial.complete
    assert partial._done.sum() == 6
    np.testing.assert_array_equal(partial._done[:6], True)
    with pytest.raises(RuntimeError, match="resume"):
        partial.tokens(11)
    with pytest.raises(RuntimeError, match="incomplete"):
        partial.pooled()

    progress = []
    resumed = extract_features(paths, tiny_backbone, cfg, tmp_path / "cache",
                               progress=lambda d, n: progress.append(d))
    assert resumed.complete and progress[0] == 6 and progress[-1] == 12

    fresh = extract_features(paths, tiny_backbone, cfg, tmp_path / "fresh")
    for i in range(12):
        np.testing.assert_array_equal(resumed.tokens(i), fresh.tokens(i))
        np.testing.assert_array_equal(resumed.tokens(i, True), fresh.tokens(i, True))


def test_progress_reports_every_batch(tiny_backbone, image_files, tmp_path):
    calls = []
    extract_features(image_files, tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=16, batch_size=2),
                     tmp_path / "c", progress=lambda d, n: calls.append((d, n)))
    assert calls[0] == (0, 5) and calls[-1] == (5, 5)
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(calls))


def test_a_bad_image_fails_early_with_its_name(tiny_backbone, image_files, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        extract_features(image_files + [bad], tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=16),
                         tmp_path / "c")


def test_exif_rotated_images_use_their_display_orientation(tiny_backbone, tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((40, 80, 3), 120, np.uint8)).save(path, exif=exif.tobytes())
    store = extract_features([path], tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=16),
                             tmp_path / "c")
    assert store.image_sizes().tolist() == [[80, 40]]
    assert store.grid(0) == (4, 2)


def test_pooled_and_knn(tiny_backbone, image_files, tmp_path):
    store = extract_features(image_files, tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=16),
                             tmp_path / "c")
    pooled = store.pooled()
    assert pooled.shape == (5, 32) and pooled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(pooled, pooled_features(store), atol=1e-5)
    knn = store.knn(k=30)
    assert knn.shape == (5, 4) and (store.root / "knn.npy").is_file()
    assert not (knn == np.arange(5)[:, None]).any()
    np.testing.assert_array_equal(FeatureStore.open(store.root).knn(k=2), knn[:, :2])


def test_meta_records_provenance(tiny_backbone, image_files, tmp_path):
    store = extract_features(image_files, tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=16),
                             tmp_path / "c")
    meta = json.loads((store.root / "meta.json").read_text())
    assert meta["weights_id"] == "random-seed0" and meta["backbone"] == "test_tiny"
    assert meta["config"]["resolution"] == 16 and len(meta["image_hashes"]) == 5


def test_configuration_errors_say_what_to_do(tiny_backbone, image_files, tmp_path):
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        FeatureConfig(crop_mode="six")
    with pytest.raises(ValueError, match="batch_size"):
        FeatureConfig(batch_size=0)
    with pytest.raises(ValueError, match="create the backbone named in the config"):
        extract_features(image_files, tiny_backbone, FeatureConfig(backbone="dinov2_vits14"), tmp_path)
    with pytest.raises(ValueError, match="at least one image"):
        extract_features([], tiny_backbone, FeatureConfig(backbone="test_tiny"), tmp_path)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        extract_features(image_files, tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=4), tmp_path)
