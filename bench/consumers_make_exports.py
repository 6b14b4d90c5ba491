"""Make the exports that bench_consumers.py feeds to the real tools (runs in the app's venv).

A finished run with real image files: duplicate names (a/street.png, b/street.png,
street.jpg), thing labels (car, person) and stuff labels (sky, road), CRF maps. Writes one
export per style to OUT/<name>/ (unzipped) and OUT/exports.json with what each holds.
"""
from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stego_app import label_kinds  # noqa: E402
from stego_app.config import AppConfig  # noqa: E402
from stego_app.context import create_context  # noqa: E402
from stego_app.export import ExportOptions, export_run  # noqa: E402
from stego_app.labels import mapping  # noqa: E402
from stego_app.models import RUN_DONE, Cluster, Image, Project, Run, RunImage  # noqa: E402

NAMES = ["a/street.png", "b/street.png", "street.jpg", "Street.PNG", "park.jpg"]


def _scene(seed: int, w: int, h: int) -> np.ndarray:
    """Sky above, road below, cars and people as blobs, with holes and corner touches."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((h, w), np.uint8)
    seg[h // 2:] = 1                                           # road
    for k in range(6):                                         # cars (cluster 2), some with windows
        y, x = int(rng.integers(h // 2, h - 12)), int(rng.integers(0, w - 30))
        seg[y:y + 10, x:x + 26] = 2
        if k % 2 == 0:
            seg[y + 3:y + 6, x + 5:x + 9] = 1
    for k in range(5):                                         # people (cluster 3), diagonal touches
        y, x = int(rng.integers(h // 3, h - 20)), int(rng.integers(0, w - 10))
        seg[y:y + 16, x:x + 5] = 3
        seg[y + 16, x + 5] = 3
    noise = ndimage.gaussian_filter(rng.random((h, w)), 3) > 0.62  # trees (cluster 4, ignored)
    seg[: h // 2][noise[: h // 2]] = 4
    return seg


def main(out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ctx = create_context(AppConfig(data_dir=out / "data", demo=False, worker=False))
    run_dir = out / "run"
    with ctx.db.write() as s:
        project = Project(name="consumers")
        s.add(project)
        s.flush()
        run = Run(project_id=project.id, status=RUN_DONE, run_dir=str(run_dir), params={"crf": True},
                  n_images=len(NAMES))
        s.add(run)
        s.flush()
        for pos, name in enumerate(NAMES):
            w, h = 160 + 8 * pos, 120
            path = out / "files" / f"{pos}{Path(name).suffix.lower()}"
            path.parent.mkdir(parents=True, exist_ok=True)
            rgb = np.random.default_rng(pos).integers(0, 255, (h, w, 3), dtype=np.uint8)
            PILImage.fromarray(rgb).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
            img = Image(project_id=project.id, name=name, sha256=f"{pos:064d}", path=str(path), width=w,
                        height=h, mode="RGB", format="JPEG" if path.suffix == ".jpg" else "PNG", file_size=1)
            s.add(img)
            s.flush()
            s.add(RunImage(run_id=run.id, position=pos, image_id=img.id))
            seg = _scene(pos, w, h)
            for folder in ("segments", "segments_crf"):
                (run_dir / folder).mkdir(parents=True, exist_ok=True)
                PILImage.fromarray(seg).save(run_dir / folder / f"{pos:06d}.png")
        for k in range(5):
            s.add(Cluster(run_id=run.id, index=k, colour=f"#10{k:02x}{k:02x}"))
        run_id = run.id
    for k, name in enumerate(["sky", "road", "car", "person"]):
        mapping.name_cluster(ctx, run_id, [0, 1, 2, 3][k], name)
    mapping.ignore_cluster(ctx, run_id, 4)
    kinds = {k.name: k.kind for k in label_kinds.label_kinds(ctx, run_id)}
    variants = {
        "masks": ExportOptions(style="masks", include_images=True, panoptic=True, label_pngs=True,
                               label_studio=True, ls_regions="brush"),
        "masks_iscrowd0": ExportOptions(style="masks", stuff_iscrowd=0, include_images=True),
        "polygons": ExportOptions(style="polygons", include_images=True, panoptic=True,
                                  label_studio=True, ls_regions="polygons"),
        "polygons_exact": ExportOptions(style="polygons", tolerance=0, include_images=True),
        "masks_no_images": ExportOptions(style="masks"),
    }
    made = {}
    for name, opts in variants.items():
        info = export_run(ctx, run_id, opts)
        target = out / name
        with zipfile.ZipFile(info.zip_path) as z:
            z.extractall(target)
        made[name] = {"dir": str(target), "zip": str(info.zip_path), "options": opts.to_dict(),
                      "n_images": info.n_images, "n_annotations": info.n_annotations,
                      "warnings": list(info.warnings)}
    ctx.close()
    summary = {"kinds": kinds, "exports": made}
    (out / "exports.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
