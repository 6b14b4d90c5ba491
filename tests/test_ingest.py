"""Corpus ingestion: every kind of bad input is rejected per file, good files still get in."""
from __future__ import annotations

import io
import os
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from stego_app import ingest, projects
from stego_app.context import create_context
from stego_app.errors import NotFound, UserError
from tests.conftest import write_scene_images


def _png_bytes(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr, mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _exif_rotated_jpeg(path: Path) -> None:
    """A 40 wide x 20 high JPEG stored with EXIF orientation 6 (displayed 20 wide x 40 high)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    img = PILImage.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, format="JPEG", exif=exif.tobytes(), quality=95)


@pytest.fixture
def project(app_ctx):
    return projects.create_project(app_ctx, "corpus")


def _names(problems):
    return sorted(p.name for p in problems)


def test_modes_exif_and_storage(app_ctx, project, tmp_path):
    src = tmp_path / "upload"
    src.mkdir()
    rgb = src / "rgb.png"
    PILImage.fromarray(np.full((30, 40, 3), 120, np.uint8)).save(rgb)
    gray = src / "gray.png"
    PILImage.fromarray(np.arange(1200, dtype=np.uint8).reshape(30, 40)).save(gray)
    pal = src / "palette.gif"
    PILImage.fromarray(np.arange(1200, dtype=np.uint8).reshape(30, 40) % 7).convert("P").save(
        pal, transparency=0)
    deep = src / "deep16.png"
    PILImage.fromarray((np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "I;16").save(deep)
    alpha = src / "alpha.png"
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 3] = 0                        # fully transparent: white after compositing
    PILImage.fromarray(rgba, "RGBA").save(alpha)
    rotated = src / "rotated.jpg"
    _exif_rotated_jpeg(rotated)

    files = [rgb, gray, pal, deep, alpha, rotated]
    report = ingest.ingest_files(app_ctx, project.id, files, [f.name for f in files])
    assert report.rejected == [] and report.duplicates == []
    assert report.summary() == "6 added, 0 duplicates, 0 rejected"
    by_name = {i.name: i for i in report.added}
    assert by_name["deep16.png"].mode.startswith("I")
    assert by_name["palette.gif"].mode == "P"
    assert (by_name["rotated.jpg"].width, by_name["rotated.jpg"].height) == (20, 40)
    for info in report.added:
        assert info.stored and info.path.is_file()
        assert info.path.parent == app_ctx.config.images_dir / str(project.id)
        assert info.path.name.startswith(info.sha256)
        arr = ingest.load_rgb(app_ctx, info.id)
        assert arr.dtype == np.uint8 and arr.shape == (info.height, info.width, 3)
    assert ingest.load_rgb(app_ctx, by_name["alpha.png"].id).min() == 255
    deep_rgb = ingest.load_rgb(app_ctx, by_name["deep16.png"].id)
    assert deep_rgb.max() > 200 and deep_rgb.min() == 0      # 16-bit range mapped onto 8 bits
    top = ingest.load_rgb(app_ctx, by_name["rotated.jpg"].id)
    assert top[:18, :, 0].mean() > 200 and top[22:, :, 0].mean() < 60  # red half now on top
    assert [i.id for i in ingest.list_images(app_ctx, project.id)] == sorted(i.id for i in report.added)


def test_bad_files_are_rejected_one_by_one(app_ctx, project, tmp_path):
    good = write_scene_images(tmp_path / "good", n=2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image at all")
    (bad / "random.png").write_bytes(os.urandom(2000))
    jpeg = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(
        jpeg, format="JPEG")
    (bad / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    png = _png_bytes(np.zeros((64, 64, 3), np.uint8))
    (bad / "truncated.png").write_bytes(png[: len(png) - 30])
    (bad / "empty.png").write_bytes(b"")
    (bad / "bomb.png").write_bytes(_bomb_png())
    files = [good[0], *sorted(bad.iterdir()), good[1], tmp_path / "missing.png"]
    report = ingest.ingest_files(app_ctx, project.id, files)
    assert sorted(i.name for i in report.added) == sorted(p.name for p in good)
    reasons = {p.name: p.reason for p in report.rejected}
    assert set(reasons) == {"notes.txt", "random.png", "truncated.jpg", "truncated.png", "empty.png",
                            "bomb.png", "missing.png"}
    assert "not an image" in reasons["notes.txt"]
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "empty" in reasons["empty.png"] and "not found" in reasons["missing.png"]
    assert len(ingest.list_images(app_ctx, project.id)) == 2
    # nothing half-written: exactly the two accepted files are stored
    stored = list((app_ctx.config.images_dir / str(project.id)).iterdir())
    assert len(stored) == 2


def test_pixel_limit_is_configurable(app_ctx, project, tmp_path):
    app_ctx.config.max_image_pixels = 1000
    big = write_scene_images(tmp_path / "big", n=1, size=(64, 48))
    report = ingest.ingest_files(app_ctx, project.id, big)
    assert report.added == []
    assert "exceeds the limit" in report.rejected[0].reason


def test_duplicates_within_batch_and_against_project(app_ctx, project, tmp_path):
    paths = write_scene_images(tmp_path / "a", n=3)
    copy = tmp_path / "copy_of_first.png"
    copy.write_bytes(paths[0].read_bytes())
    first = ingest.ingest_files(app_ctx, project.id, [*paths, copy])
    assert len(first.added) == 3
    assert _names(first.duplicates) == ["copy_of_first.png"]
    assert "in this batch" in first.duplicates[0].reason
    again = ingest.ingest_files(app_ctx, project.id, paths[:2])
    assert again.added == [] and len(again.duplicates) == 2
    assert "already in the project" in again.duplicates[0].reason
    # the same image may live in another project
    other = projects.create_project(app_ctx, "other")
    assert len(ingest.ingest_files(app_ctx, other.id, paths[:1]).added) == 1


def _zip_with(path: Path, entries: list[tuple[str, bytes]], symlinks: dict[str, str] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)


def test_zip_nested_slip_symlink_and_junk(app_ctx, project, tmp_path):
    imgs = write_scene_images(tmp_path / "z", n=3)
    data = [p.read_bytes() for p in imgs]
    archive = tmp_path / "upload.zip"
    _zip_with(archive, [
        ("photos/a.png", data[0]),
        ("photos/deeper/b.png", data[1]),
        ("c.png", data[2]),
        ("photos/again_a.png", data[0]),                 # duplicate inside the zip
        ("../evil.png", data[1]),                        # zip-slip
        ("/abs/evil2.png", data[1]),                     # absolute path
        ("readme.txt", b"hello"),
        ("broken.png", os.urandom(500)),
        ("bomb.png", _bomb_png()),
    ], symlinks={"photos/link.png": "/etc/passwd"})
    report = ingest.ingest_zip(app_ctx, project.id, archive)
    assert sorted(i.name for i in report.added) == ["c.png", "photos/a.png", "photos/deeper/b.png"]
    assert _names(report.duplicates) == ["photos/again_a.png"]
    reasons = {p.name: p.reason for p in report.rejected}
    assert set(reasons) == {"../evil.png", "/abs/evil2.png", "readme.txt", "broken.png", "bomb.png",
                            "photos/link.png"}
    assert "unsafe path" in reasons["../evil.png"] and "unsafe path" in reasons["/abs/evil2.png"]
    assert "symbolic link" in reasons["photos/link.png"]
    assert not (tmp_path / "evil.png").exists() and not Path("/abs/evil2.png").exists()
    assert not any(app_ctx.config.tmp_dir.iterdir())        # temporary extractions cleaned up
    # the Project tab and the CLI list refused entries inside their archive
    shown = report.within("batch.zip")
    assert _names(shown.duplicates) == ["batch.zip: photos/again_a.png"]
    assert "batch.zip: readme.txt" in {p.name for p in shown.rejected}
    assert [i.name for i in shown.added] == [i.name for i in report.added]


def test_zip_size_limit_and_wrong_archive(app_ctx, project, tmp_path):
    archive = tmp_path / "zeros.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.png", b"\0" * 5_000_000)       # compresses to a few KB
        zf.writestr("ok.png", write_scene_images(tmp_path / "s", n=1)[0].read_bytes())
    app_ctx.config.max_upload_bytes = 1_000_000
    report = ingest.ingest_zip(app_ctx, project.id, archive)
    assert [i.name for i in report.added] == ["ok.png"]
    assert "too large" in report.rejected[0].reason

    fake = tmp_path / "not_a.zip"
    fake.write_text("this is text")
    with pytest.raises(UserError, match="not a readable zip"):
        ingest.ingest_zip(app_ctx, project.id, fake)
    assert len(ingest.list_images(app_ctx, project.id)) == 1
    # the same file among images (a broken download added with the files) is named for what it is
    report = ingest.ingest_files(app_ctx, project.id, [fake], ["not_a.zip"])
    assert report.rejected[0].reason.startswith("not a readable zip archive")


def test_folder_ingest_is_restricted_and_references_files(app_ctx, project, tmp_path):
    server = tmp_path / "server"
    paths = write_scene_images(server / "site1" / "day1", n=2)
    (server / "site1" / "list.csv").write_text("a,b")
    outside = write_scene_images(tmp_path / "private", n=1, seed=5)[0]
    (server / "site1" / "sneaky.png").symlink_to(outside)

    report = ingest.ingest_folder(app_ctx, project.id, str(server / "site1"))
    assert sorted(i.name for i in report.added) == sorted(f"day1/{p.name}" for p in paths)
    assert all(not i.stored and i.path.parent == server / "site1" / "day1" for i in report.added)
    reasons = {p.name: p.reason for p in report.rejected}
    assert "outside the allowed folders" in reasons["sneaky.png"]
    assert "not an image" in reasons["list.csv"]

    with pytest.raises(UserError, match="outside the folders"):
        ingest.ingest_folder(app_ctx, project.id, str(tmp_path / "private"))
    with pytest.raises(UserError, match="outside the folders"):
        ingest.ingest_folder(app_ctx, project.id, str(server / ".." / "private"))
    with pytest.raises(UserError, match="not an existing folder"):
        ingest.ingest_folder(app_ctx, project.id, str(server / "nope"))
    app_ctx.config.allowed_roots = []
    with pytest.raises(UserError, match="disabled"):
        ingest.ingest_folder(app_ctx, project.id, str(server))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_unknown_project_and_concurrent_ingest_of_same_file(request, backend, app_config, tmp_path):
    if backend == "postgresql":
        app_config.database_url = request.getfixturevalue("postgres_url")
    app_ctx = create_context(app_config)
    request.addfinalizer(app_ctx.close)
    project = projects.create_project(app_ctx, "corpus")
    paths = write_scene_images(tmp_path / "c", n=2)
    with pytest.raises(NotFound):
        ingest.ingest_files(app_ctx, 12345, paths)
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(ingest.ingest_files(app_ctx, project.id, paths)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(r.added) for r in reports) == 2
    assert sum(len(r.duplicates) for r in reports) == 4
    assert len(ingest.list_images(app_ctx, project.id)) == 2


def test_one_pixel_limit_message_naming_the_setting(app_ctx, project, tmp_path):
    """PIL's own bomb check and the configured limit read the same and name STEGO_MAX_IMAGE_PIXELS."""
    (tmp_path / "bomb.png").write_bytes(_bomb_png())                       # refused by PIL itself
    app_ctx.config.max_image_pixels = 1000
    big = write_scene_images(tmp_path / "big", n=1, size=(64, 48))[0]      # over the configured limit
    report = ingest.ingest_files(app_ctx, project.id, [tmp_path / "bomb.png", big])
    reasons = {p.name: p.reason for p in report.rejected}
    assert set(reasons) == {"bomb.png", big.name}
    for reason in reasons.values():
        assert reason.startswith("too many pixels: "), reason
        assert "exceeds the limit of 1,000 (possible decompression bomb)" in reason, reason
        assert reason.endswith("set by STEGO_MAX_IMAGE_PIXELS"), reason
        assert "max_pixels" not in reason and "DOS" not in reason, reason
    assert "10,000,000,000 pixels" in reasons["bomb.png"]
    assert "64x48 = 3,072 pixels" in reasons[big.name]


def test_nested_archives_are_named_as_such(app_ctx, project, tmp_path):
    img = write_scene_images(tmp_path / "z", n=1)[0].read_bytes()
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("deep.png", img)
    archive = tmp_path / "outer.zip"
    _zip_with(archive, [("ok.png", img), ("more/inner.zip", inner.getvalue()),
                        ("disguised.png", inner.getvalue()), ("old.tar.gz", b"\x1f\x8b" + b"0" * 50)])
    report = ingest.ingest_zip(app_ctx, project.id, archive)
    assert [i.name for i in report.added] == ["ok.png"]
    reasons = {p.name: p.reason for p in report.rejected}
    assert set(reasons) == {"more/inner.zip", "disguised.png", "old.tar.gz"}
    for reason in reasons.values():
        assert reason.startswith("nested archives are not opened"), reason
    assert not any(app_ctx.config.tmp_dir.iterdir())
