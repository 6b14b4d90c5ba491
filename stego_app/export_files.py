"""File names and image files inside an export.

Annotation tools match annotations to images by `file_name` (Datumaro and so CVAT by the
name without its extension, case-sensitively; Label Studio by URL), so the names in an
export must be unique. `export_file_names` keeps each image's name as ingested (with its
folder inside a zip or server folder), cleaned to a safe relative path; when two images
would have the same name without extension (`a.png` + `a.jpg`, or one name uploaded
twice) or differ only in case, every image after the first (by image id) gets
`<name>_<image id>.<ext>`. Names depend only on the run's images, not on the options, so
every export of a run uses the same ones.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from PIL import Image as PILImage
from PIL import ImageOps

EXIF_ORIENTATION = 0x0112


def clean_relative_name(name: str, image_id: int) -> str:
    """A safe relative posix path for an ingested name ('' and '..' parts removed)."""
    parts = [p for p in PurePosixPath(str(name).replace("\\", "/")).parts
             if p not in ("", ".", "..", "/") and not p.endswith(":")]
    return "/".join(parts) or f"image_{image_id}"


def _key(name: str) -> str:
    p = PurePosixPath(name)
    return str(p.with_suffix("")).casefold()


def export_file_names(images: Iterable[tuple[int, str]]) -> dict[int, str]:
    """image id -> unique file name, for (image id, ingested name) pairs."""
    used: set[str] = set()
    out: dict[int, str] = {}
    for image_id, name in sorted(images):
        clean = clean_relative_name(name, image_id)
        candidate = clean
        while _key(candidate) in used:
            p = PurePosixPath(candidate)
            candidate = str(p.with_name(f"{p.stem}_{image_id}{p.suffix}"))
        used.add(_key(candidate))
        out[image_id] = candidate
    return out


def png_name(file_name: str) -> str:
    """The label / panoptic PNG of an image: its export name with the extension .png."""
    return str(PurePosixPath(file_name).with_suffix(".png"))


def copy_image(source: Path, target: Path) -> None:
    """Copy an image file; one with an EXIF rotation is written upright (as the masks are)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with PILImage.open(source) as im:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        if orientation in (None, 1):
            shutil.copyfile(source, target)
            return
        fmt = im.format or "PNG"
        upright = ImageOps.exif_transpose(im)
        kwargs = {"quality": 95} if fmt in ("JPEG", "MPO") else {}
        upright.save(target, format="JPEG" if fmt == "MPO" else fmt, **kwargs)
