"""Benchmark: where and how long the CRF runs, against quality, on CamVid val.

Trains (or reuses from the cache) the STEGO head of the CamVid evaluation (train split, seed 0,
2000 steps, automatic shifts, DINOv2 ViT-S/14 at 322, the app's default precision), clusters
its codes (K=11), then scores the 101 val frames at 480x360 with CRF variants: none; full size
with 10 / 5 / 3 iterations; the inference size (short side 322, the default) with 10 / 5;
half size with the pixel parameters halved. Reports mIoU, accuracy, seconds per image in one
process, agreement with the full-size 10-iteration labels, and how many labels still change
per mean-field iteration. Results: bench/results/crf_variants.json and crf_variants.md.

    .venv/bin/python bench/bench_crf_variants.py [--cache-dir DIR] [--images N]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_crf_variants")
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
RESULTS = ROOT / "bench" / "results"
# name -> (where, iterations): where is "full", "inference" (short side 322) or "half"
VARIANTS = {"none": None, "full_10": ("full", 10), "full_5": ("full", 5), "full_3": ("full", 3),
            "inference_10": ("inference", 10), "inference_5": ("inference", 5), "half_10": ("half", 10)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--images", type=int, default=None, help="score only the first N val frames")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from PIL import Image

    from core.backbones import create_backbone
    from core.clustering import DEFAULT_ALPHA, CosineKMeans, cluster_log_probs, sample_tokens
    from core.crf import CRFParams, crf_model, refine_labels
    from core.evaluate import load_mask as _load_mask
    from core.evaluate import pair_images_and_masks, pipeline_features
    from core.features import FeatureConfig, extract_features
    from core.metrics import ConfusionMatrix
    from core.pipeline import PipelineConfig, item_codes
    from core.training import encode_tokens
    from core.training import TrainConfig
    from core.weights import default_cache_dir
    from stego_app.evaluate_cli import fit_pipeline

    cache = Path(args.cache_dir or default_cache_dir())
    tr_imgs, _ = pair_images_and_masks(CAMVID / "train" / "images", CAMVID / "train" / "masks")
    va_imgs, va_masks = pair_images_and_masks(CAMVID / "val" / "images", CAMVID / "val" / "masks", args.images)
    backbone = create_backbone("dinov2_vits14", device="cpu", cache_dir=cache)
    fcfg = FeatureConfig(backbone="dinov2_vits14", resolution=322)
    val = extract_features(va_imgs, backbone, fcfg, cache / "features")
    pipe = fit_pipeline(PipelineConfig(features=fcfg, train=TrainConfig(steps=2000, seed=0), n_clusters=11, crf=False),
                        tr_imgs, cache)
    train, _ = pipeline_features(pipe)

    km = CosineKMeans(11, seed=0).fit(sample_tokens(train, 100_000, seed=0, transform=lambda t: encode_tokens(pipe.head, t)))
    params = CRFParams()

    def changes_per_iteration(image: np.ndarray, lp: np.ndarray) -> list[float]:
        crf = crf_model(image, lp, params)
        q, t1, t2 = crf.startInference()
        prev, out = np.asarray(q).argmax(0), []
        for _ in range(params.iterations):
            crf.stepInference(q, t1, t2)
            cur = np.asarray(q).argmax(0)
            out.append(float((cur != prev).mean()))
            prev = cur
        return out

    cms = {v: ConfusionMatrix(11, 11, 11) for v in VARIANTS}
    seconds = {v: 0.0 for v in VARIANTS}
    agree: dict[str, list[float]] = {v: [] for v in VARIANTS}
    changes = []
    for i in range(len(val)):
        mask = _load_mask(va_masks[i])
        H, W = mask.shape
        codes = item_codes(pipe.head, val, i)
        image = np.array(Image.open(va_imgs[i]).convert("RGB"))
        labels = {}
        for name, spec in VARIANTS.items():
            t = time.perf_counter()
            if spec is None:
                lab = cluster_log_probs(codes, km.centroids_, (H, W), DEFAULT_ALPHA).argmax(0)
            else:
                where, iters = spec
                p = CRFParams(iterations=iters)
                side = {"full": None, "inference": 322, "half": min(H, W) // 2}[where]
                if where == "half":
                    p = CRFParams(iterations=iters, gaussian_sxy=params.gaussian_sxy / 2,
                                  bilateral_sxy=params.bilateral_sxy / 2)
                lab = refine_labels(image, codes, km.centroids_, DEFAULT_ALPHA, side, p)
            seconds[name] += time.perf_counter() - t
            labels[name] = lab
            cms[name].update(lab, mask)
        for name in VARIANTS:
            agree[name].append(float((labels[name] == labels["full_10"]).mean()))
        changes.append(changes_per_iteration(image, cluster_log_probs(codes, km.centroids_, (H, W), DEFAULT_ALPHA)))
        if i % 20 == 0:
            log.info("%d / %d images", i + 1, len(val))
    n = len(val)
    rows = {}
    for name in VARIANTS:
        sc = cms[name].scores()
        rows[name] = {"miou": round(100 * sc["miou"], 2), "accuracy": round(100 * sc["accuracy"], 2),
                      "s_per_image": round(seconds[name] / n, 3),
                      "agreement_with_full_10": round(100 * float(np.mean(agree[name])), 2)}
    report = {"images": n, "head": "CamVid train, seed 0, 2000 steps, automatic shifts",
              "precision": json.loads((val.root / "meta.json").read_text()).get("precision", "float32"),
              "variants": rows,
              "labels_changed_per_iteration_full_size_pct": [round(100 * v, 3) for v in np.mean(changes, 0)]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "crf_variants.json").write_text(json.dumps(report, indent=1))
    desc = {"none": "none", "full_10": "full size 480x360, 10 iterations (paper's count)",
            "full_5": "full size, 5 iterations", "full_3": "full size, 3 iterations",
            "inference_10": "**inference size 322x429, 10 iterations (default)**",
            "inference_5": "inference size, 5 iterations", "half_10": "half size 180x240, sxy halved, 10 iterations"}
    md = ["# CRF variants on CamVid val", "",
          f"{n} val frames scored at 480x360; STEGO head: {report['head']}; backbone precision "
          f"{report['precision']}; 11 clusters; paper CRF parameters unless stated. Seconds per image in one "
          "process (cluster probabilities + CRF + labels at 480x360).", "",
          "| CRF | mIoU | accuracy | s / image | labels equal to full size, 10 iterations |",
          "| --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        md.append(f"| {desc[name]} | {r['miou']:.1f} | {r['accuracy']:.1f} | {r['s_per_image']:.2f} | "
                  f"{r['agreement_with_full_10']:.1f} % |")
    md += ["", "Labels changed by each mean-field iteration at full size (% of pixels, mean over images): "
           + ", ".join(f"{v:.2f}" for v in report["labels_changed_per_iteration_full_size_pct"]) + ".", "",
           "Reproduce: `.venv/bin/python bench/bench_crf_variants.py`", ""]
    (RESULTS / "crf_variants.md").write_text("\n".join(md))
    log.info("wrote %s", RESULTS / "crf_variants.md")


if __name__ == "__main__":
    main()
