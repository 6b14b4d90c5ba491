"""Benchmark: the pixel head's cost (core.pixel_head): training on N corrected images, prediction per image.

Realistic inputs: CamVid train frames (480x360), their DINOv2 ViT-S/14 features at short side 322
(the app's cached features), their true masks as the corrected images. Times ``PixelHead.fit`` on
N images (the app's defaults) and ``pixel_log_proba`` per image (projection at token resolution,
upsampling and the per-pixel MLP), best of two rounds.
Results: bench/results/pixel_head.json and pixel_head.md.

    .venv/bin/python bench/bench_pixel_head.py [--images N]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CAMVID_TRAIN = ROOT.parent / "shared" / "data" / "camvid" / "train"
RESULTS = ROOT / "bench" / "results"

log = logging.getLogger("bench_pixel_head")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from PIL import Image

    from core.backbones import create_backbone
    from core.evaluate import load_mask
    from core.features import FeatureConfig, extract_features
    from core.images import load_image
    from core.pixel_head import PixelHead, pixel_log_proba
    from core.weights import default_cache_dir

    paths = sorted((CAMVID_TRAIN / "images").glob("*.jpg"))
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    backbone = create_backbone("dinov2_vits14", device="cpu", cache_dir=args.cache_dir)
    store = extract_features(paths, backbone, FeatureConfig(resolution=322),
                             Path(args.cache_dir or default_cache_dir()) / "features")
    items = []
    for i, p in enumerate(paths):
        mask = load_mask(CAMVID_TRAIN / "masks" / (p.stem + ".png")).astype(np.int64)
        items.append((np.asarray(store.tokens(i), np.float32).reshape(*store.grid(i), -1), load_image(p),
                      np.where(mask < 11, mask, -1)))
    fits, preds = [], []
    for _ in range(2):
        t = time.perf_counter()
        head = PixelHead(11).fit(items)
        fits.append(time.perf_counter() - t)
        a = head.arrays_
        t = time.perf_counter()
        for tokens, rgb, _ in items:
            pixel_log_proba(a.project(tokens), rgb, a)
        preds.append((time.perf_counter() - t) / len(items))
    size = Image.open(paths[0]).size
    res = {"images": len(items), "image_size": list(size), "train_pixels": head.n_train_pixels_,
           "fit_s": round(min(fits), 2), "predict_ms_per_image": round(1000 * min(preds), 1),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pixel_head.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "pixel_head.md").write_text(
        "# Pixel head cost (core.pixel_head)\n\n"
        f"{res['images']} CamVid train frames ({size[0]}x{size[1]}) as corrected images, DINOv2 ViT-S/14 "
        f"features at short side 322, the app's PixelHead defaults; best of 2 rounds on {res['cpus']} CPUs "
        "(the development machine, other jobs may have run beside it).\n\n"
        "| step | time |\n| --- | --- |\n"
        f"| fit on {res['images']} images ({res['train_pixels']:,} pixels) | {res['fit_s']} s |\n"
        f"| predict one image (projection, upsampling, per-pixel MLP) | {res['predict_ms_per_image']} ms |\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
