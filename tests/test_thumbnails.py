"""Gallery thumbnails: small cached files, EXIF-correct, remade when deleted; gallery pages."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image as PILImage

from stego_app import ingest, projects, thumbnails
from stego_app.errors import NotFound, UserError
from stego_app.models import RUN_DONE, Run, RunImage
from tests.conftest import write_scene_images


@pytest.fixture
def project(app_ctx):
    return projects.create_project(app_ctx, "thumbs")


def _rotated_jpeg(path, width: int = 400, height: int = 200) -> None:
    """Stored `width` x `height`, left half red, with EXIF orientation 6: displayed rotated, red on top."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    img = PILImage.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, format="JPEG", exif=exif.tobytes(), quality=95)


def test_thumbnail_is_small_exif_rotated_cached_and_remade(app_ctx, project, tmp_path):
    src = tmp_path / "rotated.jpg"
    _rotated_jpeg(src)
    [info] = ingest.ingest_files(app_ctx, project.id, [src]).added
    path = thumbnails.thumbnail_path(app_ctx, info.id, size=100)
    assert path.is_file() and path.suffix == ".jpg"
    assert path.is_relative_to(app_ctx.config.data_dir / "thumbs")
    with PILImage.open(path) as im:
        assert im.format == "JPEG" and im.size == (50, 100)        # displayed 200 x 400, long side 100
        arr = np.asarray(im.convert("RGB"))
    assert arr[:45, :, 0].mean() > 200 and arr[:45, :, 1].mean() < 60   # red half on top, as displayed
    assert arr[55:, :, 0].mean() < 60

    first_mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(first_mtime - 10**9, first_mtime - 10**9))
    assert thumbnails.thumbnail_path(app_ctx, info.id, size=100) == path
    assert path.stat().st_mtime_ns == first_mtime - 10**9               # served from the cache
    path.unlink()
    assert thumbnails.thumbnail_path(app_ctx, info.id, size=100).is_file()   # remade when missing
    other = thumbnails.thumbnail_path(app_ctx, info.id, size=64)
    assert other != path
    with PILImage.open(other) as im:
        assert im.size == (32, 64)


def test_small_images_are_not_enlarged_and_errors_are_clear(app_ctx, project, tmp_path):
    [info] = ingest.ingest_files(app_ctx, project.id, write_scene_images(tmp_path / "s", n=1)).added
    with PILImage.open(thumbnails.thumbnail_path(app_ctx, info.id)) as im:
        assert im.size == (64, 48)
    with pytest.raises(NotFound):
        thumbnails.thumbnail_path(app_ctx, 10_000)
    for bad in (0, 8, 5000, 2.5, True):
        with pytest.raises(UserError, match="thumbnail size"):
            thumbnails.thumbnail_path(app_ctx, info.id, size=bad)
    info.path.unlink()
    for size in (32, 48):
        with pytest.raises(UserError, match="missing"):
            thumbnails.thumbnail_path(app_ctx, info.id, size=size)


def test_load_rgb_fit_matches_a_full_size_area_downscale(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    big = np.asarray(PILImage.fromarray(small).resize((1200, 900), PILImage.Resampling.BILINEAR))
    path = tmp_path / "big.png"
    PILImage.fromarray(big).save(path)
    fit = thumbnails.load_rgb_fit(path, 200)
    assert fit.shape == (150, 200, 3) and fit.dtype == np.uint8
    reference = big.reshape(150, 6, 200, 6, 3).mean(axis=(1, 3))
    assert np.abs(fit.astype(float) - reference).max() <= 1            # an area average
    assert thumbnails.load_rgb_fit(path, None).shape == (900, 1200, 3)
    assert thumbnails.load_rgb_fit(path, 5000).shape == (900, 1200, 3)
    with pytest.raises(UserError, match="cannot read image nothing.png"):
        thumbnails.load_rgb_fit(tmp_path / "nothing.png", 100)


@pytest.mark.parametrize("total,page,per_page,expected", [
    (250, 1, 100, (0, 100, 1, 3)),
    (250, 3, 100, (200, 250, 3, 3)),
    (250, 99, 100, (200, 250, 3, 3)),       # clamped to the last page
    (250, 0, 100, (0, 100, 1, 3)),
    (250, "2", 100, (100, 200, 2, 3)),      # slider values come as strings or floats
    (250, 2.0, 100, (100, 200, 2, 3)),
    (250, "junk", 100, (0, 100, 1, 3)),
    (250, None, 100, (0, 100, 1, 3)),
    (0, 1, 100, (0, 0, 1, 1)),
    (100, 2, 100, (0, 100, 1, 1)),
])
def test_page_bounds(total, page, per_page, expected):
    assert thumbnails.page_bounds(total, page, per_page) == expected


def test_project_gallery_pages_only_make_the_thumbnails_shown(app_ctx, project, tmp_path):
    added = ingest.ingest_files(app_ctx, project.id, write_scene_images(tmp_path / "g", n=5)).added
    first = thumbnails.project_gallery(app_ctx, project.id, page=1, per_page=2, size=32)
    assert (first.page, first.n_pages, first.start, first.stop, first.total) == (1, 3, 0, 2, 5)
    assert [i.id for i, _ in first.items] == [a.id for a in added[:2]]
    made = sorted(p.name for p in (app_ctx.config.thumbs_dir / "32").rglob("*.jpg"))
    assert made == sorted(f"{a.sha256}.jpg" for a in added[:2])       # page 2 and 3 not made yet
    last = thumbnails.project_gallery(app_ctx, project.id, page=7, per_page=2, size=32)
    assert last.page == 3 and [i.id for i, _ in last.items] == [added[4].id]

    added[0].path.unlink()                  # a file that went missing is left out, the rest shown
    again = thumbnails.project_gallery(app_ctx, project.id, page=1, per_page=10, size=48)
    assert [i.id for i, _ in again.items] == [a.id for a in added[1:]] and again.total == 5
    with pytest.raises(NotFound):
        thumbnails.project_gallery(app_ctx, 999)


def test_run_gallery_follows_the_run_order(app_ctx, project, tmp_path):
    added = ingest.ingest_files(app_ctx, project.id, write_scene_images(tmp_path / "r", n=3)).added
    order = [added[2], added[0], added[1]]
    with app_ctx.db.write() as s:
        run = Run(project_id=project.id, status=RUN_DONE, run_dir=str(tmp_path / "run"), n_images=3)
        s.add(run)
        s.flush()
        for pos, info in enumerate(order):
            s.add(RunImage(run_id=run.id, position=pos, image_id=info.id))
        run_id = run.id
    page = thumbnails.run_gallery(app_ctx, run_id, per_page=2)
    assert [i.id for i, _ in page.items] == [order[0].id, order[1].id] and page.n_pages == 2
    assert all(p.is_file() for _, p in page.items)
    with pytest.raises(NotFound):
        thumbnails.run_gallery(app_ctx, 999)
