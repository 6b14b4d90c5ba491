"""Benchmark: dense CRF throughput (images/second), one process vs both cores.

Realistic inputs: CamVid val frames (480x360) with K=11 cluster log-probabilities from
cosine k-means on their DINOv2 ViT-S/14 features (short side 322), upsampled bilinearly,
paper CRF parameters (10 iterations). Times ``core.crf.crf_batch`` with n_jobs=1 and
n_jobs=2 (the latter including the worker start-up), interleaved, two rounds each.
Results: bench/results/crf.json and crf.md.

    .venv/bin/python bench/bench_crf.py [--images N]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.crf import CRFParams, crf_batch  # noqa: E402  (torch-free: the spawned workers re-import this module)

log = logging.getLogger("bench_crf")
CAMVID_VAL = ROOT.parent / "shared" / "data" / "camvid" / "val" / "images"
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--clusters", type=int, default=11)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from core.backbones import create_backbone
    from core.clustering import CosineKMeans, cluster_log_probs, sample_tokens
    from core.features import FeatureConfig, extract_features
    from core.images import load_image

    load_start = os.getloadavg()

    paths = sorted(CAMVID_VAL.glob("*.jpg"))[: args.images]
    backbone = create_backbone("dinov2_vits14", device="cpu", cache_dir=args.cache_dir)
    from core.weights import default_cache_dir

    store = extract_features(paths, backbone, FeatureConfig(resolution=322),
                             Path(args.cache_dir or default_cache_dir()) / "features")
    km = CosineKMeans(args.clusters, seed=0).fit(sample_tokens(store, 30_000))
    sizes = store.image_sizes()
    images, lps = [], []
    for i, p in enumerate(paths):
        h, w = store.grid(i)
        images.append(load_image(p))
        lps.append(cluster_log_probs(np.asarray(store.tokens(i), np.float32).reshape(h, w, -1), km.centroids_,
                                     (int(sizes[i][0]), int(sizes[i][1]))))
    n = len(images)
    rows = []
    for rnd in range(2):
        for jobs in (1, 2):
            t = time.perf_counter()
            out = crf_batch(images, lps, n_jobs=jobs, params=CRFParams())
            dt = time.perf_counter() - t
            rows.append({"round": rnd, "n_jobs": jobs, "seconds": round(dt, 2), "images_per_s": round(n / dt, 3)})
            log.info("n_jobs=%d: %.2f s for %d images (%.2f img/s)", jobs, dt, n, n / dt)
            assert len(out) == n
    best = {j: max(r["images_per_s"] for r in rows if r["n_jobs"] == j) for j in (1, 2)}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "images": n, "image_size": list(images[0].shape[:2]), "clusters": args.clusters,
        "params": CRFParams().__dict__, "rows": rows,
        "images_per_s_1_process": best[1], "images_per_s_2_processes": best[2],
        "parallel_speedup": round(best[2] / best[1], 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "crf.json").write_text(json.dumps(result, indent=1))
    md = [
        "# Dense CRF throughput",
        "",
        f"Machine: {result['machine']}; load average at start {result['load_average_start']}, at end "
        f"{result['load_average_end']} (shared machine: other jobs ran alongside, so absolute numbers are noisy).",
        f"{n} CamVid val frames ({images[0].shape[1]}x{images[0].shape[0]}), K={args.clusters} cluster "
        "log-probabilities (k-means on DINOv2 ViT-S/14 features, bilinear upsampling), paper parameters: "
        "10 iterations, Gaussian sxy 1 compat 3, bilateral sxy 67 srgb 3 compat 4 (pydensecrf).",
        "",
        "| processes | images/s (best of 2 rounds) |",
        "| --- | --- |",
        f"| 1 | {best[1]:.2f} |",
        f"| 2 (both cores, spawn pool incl. start-up) | {best[2]:.2f} |",
        "",
        f"Parallel speed-up: {result['parallel_speedup']:.2f}x.",
        "",
        "Reproduce: `.venv/bin/python bench/bench_crf.py`",
        "",
    ]
    (RESULTS / "crf.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
