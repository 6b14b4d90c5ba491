"""Benchmark: one STEGO training step on cached features vs one that recomputes the backbone.

Both run the same trainer code (``core.training.StegoTrainer``) on the same corpus, batch
size and seed, in the same process: the cached step reads tokens from the memory-mapped
feature store; the recomputing step gets its tokens from a ``TokenFeatures`` that decodes,
resizes and runs the backbone on each image the step asks for (the item and its KNN
partner, exactly the batch a step draws). Target: cached at least 20x faster.

Corpus: CamVid train frames (../shared/data/camvid), DINOv2 ViT-S/14 at short side 322,
batch 16. Results: bench/results/training.json and training.md.

    .venv/bin/python bench/bench_training.py [--images DIR] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from core.backbones import create_backbone  # noqa: E402
from core.features import FeatureConfig, FeatureStore, extract_features  # noqa: E402
from core.images import load_image, resize_rgb, target_size  # noqa: E402
from core.training import StegoTrainer, TrainConfig  # noqa: E402

log = logging.getLogger("bench_training")
CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "train" / "images"
RESULTS = ROOT / "bench" / "results"
SHIFTS = dict(shift_self=0.8, shift_knn=0.77, shift_neg=0.7)  # fixed: no statistics pass in the timing


class BackboneFeatures:
    """TokenFeatures that runs the backbone every time an item's tokens are asked for."""

    def __init__(self, store: FeatureStore, paths: list[Path], backbone, resolution: int):
        self.store, self.paths, self.backbone, self.resolution = store, paths, backbone, resolution
        self.embed_dim = store.embed_dim
        self.forwards = 0

    def __len__(self) -> int:
        return len(self.store)

    def grid(self, i: int) -> tuple[int, int]:
        return self.store.grid(i)

    def image_index(self, i: int) -> int:
        return self.store.image_index(i)

    def tokens(self, i: int, flipped: bool = False) -> np.ndarray:
        rgb = load_image(self.paths[i])
        size = target_size(*rgb.shape[:2], self.resolution, self.backbone.patch_size,
                           self.store.config.max_long_side)
        x = self.backbone.preprocess(resize_rgb(rgb, size))[None].to(self.backbone.device)
        with torch.inference_mode():
            f = self.backbone(x)[0].permute(1, 2, 0)
        self.forwards += 1
        return f.reshape(-1, f.shape[-1]).to(torch.float16).numpy()


def time_steps(features, knn: np.ndarray, steps: int, warmup: int, batch: int) -> list[float]:
    """Seconds of each step after ``warmup`` steps (progress callback timestamps)."""
    stamps: list[float] = []
    cfg = TrainConfig(steps=warmup + steps, batch_size=batch, seed=0, **SHIFTS)
    t0 = time.perf_counter()
    StegoTrainer(cfg).fit(features, knn, progress=lambda s, t: stamps.append(time.perf_counter()))
    edges = [t0] + stamps
    return [b - a for a, b in zip(edges[:-1], edges[1:])][warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, default=CAMVID)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--resolution", type=int, default=322)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cached-steps", type=int, default=50)
    ap.add_argument("--recompute-steps", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    load_start = os.getloadavg()

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    backbone = create_backbone("dinov2_vits14", device="cpu", cache_dir=args.cache_dir)
    from core.weights import default_cache_dir

    store = extract_features(paths, backbone, FeatureConfig(resolution=args.resolution),
                             Path(args.cache_dir or default_cache_dir()) / "features")
    knn = store.knn(30)

    rounds = []
    for r in range(2):  # interleaved: cached, recompute, cached, recompute
        cached = time_steps(store, knn, args.cached_steps, warmup=5, batch=args.batch_size)
        live = BackboneFeatures(store, paths, backbone, args.resolution)
        recompute = time_steps(live, knn, args.recompute_steps, warmup=0, batch=args.batch_size)
        rounds.append({"cached_s": statistics.median(cached), "recompute_s": statistics.median(recompute),
                       "forwards_per_recompute_step": live.forwards / args.recompute_steps})
        log.info("round %d: cached %.4f s/step, recompute %.2f s/step", r, rounds[-1]["cached_s"],
                 rounds[-1]["recompute_s"])
    cached_s = min(r["cached_s"] for r in rounds)
    recompute_s = min(r["recompute_s"] for r in rounds)
    speedup = recompute_s / cached_s
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads)",
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "backbone": "dinov2_vits14", "weights_source": backbone.weights_source,
        "resolution": args.resolution, "grid": list(store.grid(0)), "batch_size": args.batch_size,
        "feature_samples": 11, "images": len(paths), "rounds": rounds,
        "cached_step_s": round(cached_s, 4), "recompute_step_s": round(recompute_s, 3),
        "speedup": round(speedup, 1), "target_speedup": 20, "passed": speedup >= 20,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(result, indent=1))
    md = [
        "# Training step: cached features vs recomputing the backbone",
        "",
        f"Machine: {result['machine']}; load average at start {result['load_average_start']}, at end "
        f"{result['load_average_end']} (shared machine: other jobs ran alongside, so absolute times are noisy; "
        "the two kinds of step are interleaved and the best round of each is kept).",
        f"Backbone: dinov2_vits14 at short side {args.resolution} (token grid {store.grid(0)[0]}x{store.grid(0)[1]}) - "
        f"weights: {backbone.weights_source}.",
        f"Batch {args.batch_size} items, each with its KNN partner, {11 * 11} sampled locations per item, "
        "5 negative permutations; same trainer, corpus and seed for both.",
        "",
        "| step | seconds / step (median; best round) |",
        "| --- | --- |",
        f"| on cached features (memory-mapped store) | {cached_s:.4f} |",
        f"| recomputing the backbone on the same batch ({rounds[0]['forwards_per_recompute_step']:.0f} image "
        f"forwards) | {recompute_s:.2f} |",
        "",
        f"Speed-up: **{speedup:.0f}x** (target >= 20x: {'met' if speedup >= 20 else 'NOT met'}).",
        "",
        "Reproduce: `.venv/bin/python bench/bench_training.py`",
        "",
    ]
    (RESULTS / "training.md").write_text("\n".join(md))
    log.info("speed-up %.1fx; wrote %s", speedup, RESULTS / "training.md")


if __name__ == "__main__":
    main()
