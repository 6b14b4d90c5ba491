"""core.images: decoding any file to RGB uint8, geometry helpers."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from core.errors import ImageLoadError
from core.images import (crop, five_crop_boxes, image_size, load_image, resize_rgb, target_size)


def _halves(h: int = 20, w: int = 40) -> np.ndarray:
    """Red left half, blue right half."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (255, 0, 0)
    rgb[:, w // 2:] = (0, 0, 255)
    return rgb


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    img = Image.fromarray(_halves())
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    img.save(path, exif=exif.tobytes(), quality=95)

    rgb = load_image(path)
    assert rgb.shape == (40, 20, 3)
    assert image_size(path) == (40, 20)
    # The red left half is on top once rotated clockwise.
    assert rgb[5, 10, 0] > 200 and rgb[5, 10, 2] < 60
    assert rgb[35, 10, 2] > 200 and rgb[35, 10, 0] < 60


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "RGB"])
def test_modes_become_rgb_uint8(tmp_path, mode):
    base = Image.fromarray(_halves())
    img = base.convert(mode)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    rgb = load_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 40, 3)
    assert rgb.flags.writeable
    expected = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert np.abs(rgb.astype(np.int16) - expected).max() <= 3


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255           # red ...
    rgba[:, :5, 3] = 255         # ... opaque on the left, fully transparent on the right
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = load_image(path)
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert tuple(rgb[0, 9]) == (255, 255, 255)
    dropped = load_image(path, background=None)
    assert tuple(dropped[0, 9]) == (255, 0, 0)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.info["transparency"] = 0
    img.putpixel((0, 0), 0)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    rgb = load_image(path)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[4, 4]) == (0, 255, 0)


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    arr = np.zeros((4, 4), np.uint16)
    arr[0, 0], arr[1, 1] = 65535, 32896
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    rgb = load_image(path)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[1, 1]) == (128, 128, 128)
    assert tuple(rgb[2, 2]) == (0, 0, 0)


def test_float_image_is_scaled(tmp_path):
    arr = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    path = tmp_path / "f.tif"
    Image.fromarray(arr, "F").save(path)
    rgb = load_image(path)
    assert rgb[0, 0, 0] == 0 and rgb[3, 3, 0] == 255


def test_truncated_file_raises(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(path)


def test_not_an_image_and_missing_file_raise(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png" * 10)
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(junk)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.jpg")


def test_pixel_limit_guards_against_bombs(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        load_image(path, max_pixels=10_000)
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        image_size(path, max_pixels=10_000)
    assert load_image(path, max_pixels=20_000).shape == (100, 200, 3)


def test_reduced_scale_jpeg_decode_keeps_min_size(tmp_path):
    yy, xx = np.mgrid[0:600, 0:800]
    arr = np.stack([xx * 255 // 800, yy * 255 // 600, np.full_like(xx, 90)], -1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=95)
    small = load_image(path, min_size=(140, 180))
    assert 140 <= small.shape[0] < 600 and 180 <= small.shape[1] < 800
    # Same picture: after resizing both to the target the images agree closely.
    a = resize_rgb(small, (140, 182)).astype(np.int16)
    b = resize_rgb(load_image(path), (140, 182)).astype(np.int16)
    assert np.abs(a - b).mean() < 2.0


def test_target_size_short_side_and_patch_multiples():
    assert target_size(360, 480, 322, 14) == (322, 420)     # CamVid at 322
    assert target_size(480, 360, 224, 14) == (294, 224)     # portrait
    h, w = target_size(100, 1000, 224, 8, max_long_side=800)  # long side capped
    assert w <= 800 and w % 8 == 0 and h % 8 == 0
    assert target_size(10, 10, 16, 16) == (16, 16)
    with pytest.raises(ValueError, match="smaller than the patch"):
        target_size(100, 100, 8, 14)


def test_five_crops_cover_corners_and_centre():
    boxes = five_crop_boxes(100, 60)
    assert boxes[0] == (0, 0, 50, 30) and boxes[3] == (50, 30, 50, 30)
    assert boxes[4] == (25, 15, 50, 30)
    rgb = np.arange(100 * 60 * 3, dtype=np.uint32).reshape(100, 60, 3)
    assert crop(rgb, boxes[1]).shape == (50, 30, 3)
    assert crop(rgb, boxes[1])[0, -1, 0] == rgb[0, 59, 0]
