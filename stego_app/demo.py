"""The bundled demo corpus: photographs shipped inside the scikit-image wheel.

Only files present in the installed package are used (no network download); the
CamVid data used for evaluation is never part of the demo.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DESCRIPTION = ("Sample photographs bundled with scikit-image (astronaut, cat, coffee, rocket, "
               "motorcycle, camera man, textures): try a run with a few clusters.")

# (shown name, file in skimage/data); photographs and textures, colour and grayscale.
DEMO_FILES: tuple[tuple[str, str], ...] = (
    ("astronaut.png", "astronaut.png"),
    ("chelsea_cat.png", "chelsea.png"),
    ("coffee.png", "coffee.png"),
    ("rocket.jpg", "rocket.jpg"),
    ("motorcycle.png", "motorcycle_left.png"),
    ("camera_man.png", "camera.png"),
    ("hubble_deep_field.jpg", "hubble_deep_field.jpg"),
    ("brick.png", "brick.png"),
    ("grass.png", "grass.png"),
    ("gravel.png", "gravel.png"),
)


def skimage_data_dir() -> Path | None:
    try:
        import skimage.data
    except ImportError:
        return None
    return Path(skimage.data.__file__).resolve().parent


def demo_image_files() -> list[tuple[str, Path]]:
    """(name, path) of the demo images that exist in the installed scikit-image."""
    base = skimage_data_dir()
    if base is None:
        log.warning("scikit-image is not installed; no demo images")
        return []
    found = [(name, base / fname) for name, fname in DEMO_FILES if (base / fname).is_file()]
    missing = len(DEMO_FILES) - len(found)
    if missing:
        log.info("%d demo images are not bundled with this scikit-image", missing)
    return found
