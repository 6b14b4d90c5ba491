"""The ``evaluate`` command: STEGO against its baselines on a labelled split, in one run.

Fit on a training folder (features, KNN, head, k-means; labels only for the linear
probes), score on a validation folder with the same backbone, resolution and images:

- k-means on the raw backbone features (the baseline STEGO must beat),
- STEGO cluster probe without CRF, and with the dense CRF,
- optionally STEGO trained with the paper's shifts instead of the automatic ones,
- linear probes on the raw features and on the STEGO codes (supervised upper bounds).

Cluster metrics use Hungarian matching over all scored pixels; everything is accumulated
in confusion matrices, so memory does not grow with the number of images. Results go to
``<out>.json`` and ``<out>.md``.

    python -m core.evaluate --train-images T/images --train-masks T/masks \\
        --val-images V/images --val-masks V/masks --classes 11 --ignore 11 --out bench/results/camvid_eval
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from core.clustering import DEFAULT_ALPHA, CosineKMeans, sample_tokens, upsample_bilinear
from core.crf import ClusterMapJob, cluster_map, crf_short_side, ordered_map
from core.features import FeatureConfig, FeatureStore, extract_features
from core.metrics import ConfusionMatrix, LinearProbe, downsample_labels
from core.pipeline import item_codes, peak_rss_mb
from core.precision import PRECISIONS
from core.shifts import ShiftEstimator
from core.training import PAPER_SHIFTS, StegoTrainer, TrainConfig

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "pair_images_and_masks"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the evaluate command's options on ``parser``."""
    g = parser.add_argument_group("data")
    g.add_argument("--images", "--val-images", dest="images", required=True, type=Path,
                   help="folder of images to score")
    g.add_argument("--masks", "--val-masks", dest="masks", required=True, type=Path,
                   help="folder of label PNGs (same stem as the images) for the scored images")
    g.add_argument("--train-images", type=Path, default=None,
                   help="folder of images to fit on (default: the scored images)")
    g.add_argument("--train-masks", type=Path, default=None,
                   help="label PNGs of the training images, for the linear probes (default: --masks "
                        "when fitting on the scored images)")
    g.add_argument("--classes", type=int, required=True, help="number of classes (labels 0..N-1)")
    g.add_argument("--ignore", type=int, default=255,
                   help="label value to ignore (values >= --classes are ignored too)")
    g.add_argument("--class-names", default=None, help="comma-separated class names for the report")
    g.add_argument("--max-images", type=int, default=None, help="use only the first N images of each folder")
    m = parser.add_argument_group("model")
    m.add_argument("--backbone", default="dinov2_vits14")
    m.add_argument("--weights", default=None, help="explicit backbone checkpoint file")
    m.add_argument("--device", default="auto")
    m.add_argument("--resolution", type=int, default=322, help="short side of the images for the backbone")
    m.add_argument("--flip", action="store_true", help="average codes with the flipped image at inference")
    m.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="backbone compute precision (auto: bfloat16 on CPUs with native bfloat16, else float32)")
    m.add_argument("--n-clusters", type=int, default=None, help="clusters (default: --classes)")
    m.add_argument("--steps", type=int, default=2000)
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--code-dim", type=int, default=70)
    m.add_argument("--lr", type=float, default=5e-4)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shift-self", type=float, default=None, help="manual shift (default: automatic)")
    m.add_argument("--shift-knn", type=float, default=None)
    m.add_argument("--shift-neg", type=float, default=None)
    m.add_argument("--compare-paper-shifts", action="store_true",
                   help="also train with the paper's ViT-S shifts (0.18/0.12/0.46) and report it")
    m.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="cluster softmax temperature")
    m.add_argument("--cluster-samples", type=int, default=100_000)
    m.add_argument("--no-crf", action="store_true", help="skip the CRF rows")
    m.add_argument("--crf-resolution", type=int, default=None,
                   help="short side (px) the CRF runs at (default: --resolution, as in the paper; 0: full size)")
    m.add_argument("--jobs", type=int, default=2, help="worker processes for scoring and CRF")
    o = parser.add_argument_group("output")
    o.add_argument("--cache-dir", type=Path, default=None,
                   help="where weights and features are cached (default: $STEGO_CACHE_DIR or ~/.cache/stego-labeler)")
    o.add_argument("--out", type=Path, default=Path("evaluation"),
                   help="output path without extension: writes OUT.json and OUT.md")


def pair_images_and_masks(images: Path, masks: Path, max_images: int | None = None) -> tuple[list[Path], list[Path]]:
    """Images of a folder (sorted) and the mask PNG of the same stem for each."""
    if not images.is_dir():
        raise ValueError(f"image folder {images} does not exist")
    if not masks.is_dir():
        raise ValueError(f"mask folder {masks} does not exist")
    imgs = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if max_images is not None:
        imgs = imgs[:max_images]
    if not imgs:
        raise ValueError(f"no images in {images}")
    pairs = []
    missing = []
    for p in imgs:
        m = masks / (p.stem + ".png")
        (pairs if m.is_file() else missing).append((p, m))
    if missing:
        raise ValueError(f"{len(missing)} images have no mask {masks}/<stem>.png, e.g. {missing[0][0].name}")
    return [p for p, _ in pairs], [m for _, m in pairs]


def _load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"{path}: masks must be one-channel label images, got shape {arr.shape}")
    return arr.astype(np.int64)


def _train_probe(store: FeatureStore, masks: list[Path], n_classes: int, ignore: int, encode=None,
                 dim: int | None = None, seed: int = 0) -> LinearProbe:
    """Linear probe on every training token, labels = majority of the mask under each token."""
    sizes = [h * w for h, w in (store.grid(i) for i in range(len(store)))]
    X = np.empty((sum(sizes), dim or store.embed_dim), dtype=np.float32)  # one buffer, no concatenation
    y = np.empty(sum(sizes), dtype=np.int64)
    offset = 0
    for i, n in enumerate(sizes):
        x = np.asarray(store.tokens(i), dtype=np.float32)
        X[offset:offset + n] = encode(x) if encode is not None else x
        y[offset:offset + n] = downsample_labels(_load_mask(masks[store.image_index(i)]), store.grid(i),
                                                 n_classes, ignore).ravel()
        offset += n
    return LinearProbe(n_classes, epochs=10, lr=1e-3, seed=seed).fit(X, y)


def _checkpoint_path(cache: Path, train: FeatureStore, cfg: TrainConfig) -> Path:
    """A checkpoint per (features, training config): a re-run with the same settings reuses it."""
    key = hashlib.sha1(json.dumps([str(train.root), dataclasses.asdict(cfg)], sort_keys=True).encode())
    return cache / "eval_checkpoints" / f"{key.hexdigest()[:16]}.ckpt"


def _fit_stego(train: FeatureStore, knn: np.ndarray, cfg: TrainConfig, ckpt: Path) -> StegoTrainer:
    def progress(step: int, terms: dict[str, float]) -> None:
        if step % 100 == 0 or step == cfg.steps:
            log.info("step %d/%d loss %.4f (self %.4f knn %.4f neg %.4f)", step, cfg.steps,
                     terms["loss"], terms["self"], terms["knn"], terms["neg"])
    return StegoTrainer(cfg).fit(train, knn, checkpoint_path=ckpt, progress=progress)


def run(args: argparse.Namespace) -> dict:
    """Run the evaluation described by parsed ``args``; write OUT.json/OUT.md; return the report."""
    from core.backbones import create_backbone

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    C = int(args.classes)
    if C < 2:
        raise ValueError("--classes must be >= 2")
    K = int(args.n_clusters or C)
    val_imgs, val_masks = pair_images_and_masks(args.images, args.masks, args.max_images)
    if args.train_images is not None:
        train_masks_dir = args.train_masks
        if train_masks_dir is None:
            raise ValueError("--train-images needs --train-masks (for the linear probes)")
        train_imgs, train_masks = pair_images_and_masks(args.train_images, train_masks_dir, args.max_images)
    else:
        train_imgs, train_masks = val_imgs, val_masks
    class_names = args.class_names.split(",") if args.class_names else [str(c) for c in range(C)]
    if len(class_names) != C:
        raise ValueError(f"--class-names lists {len(class_names)} names for {C} classes")

    t = time.perf_counter()
    backbone = create_backbone(args.backbone, checkpoint=args.weights, device=args.device, cache_dir=args.cache_dir)
    fcfg = FeatureConfig(backbone=args.backbone, resolution=args.resolution, flip=bool(args.flip),
                         precision=args.precision)
    from core.weights import default_cache_dir

    feat_root = Path(args.cache_dir or default_cache_dir()) / "features"
    train = extract_features(train_imgs, backbone, fcfg, feat_root)
    val = train if val_imgs == train_imgs else extract_features(val_imgs, backbone, fcfg, feat_root)
    timings["features"] = time.perf_counter() - t
    weights_source = backbone.weights_source
    del backbone

    t = time.perf_counter()
    knn = train.knn(30)
    timings["knn"] = time.perf_counter() - t

    tcfg = TrainConfig(code_dim=args.code_dim, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       shift_self=args.shift_self, shift_knn=args.shift_knn, shift_neg=args.shift_neg,
                       seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    est = ShiftEstimator(feature_samples=tcfg.feature_samples, batch_size=tcfg.batch_size,
                         seed=args.seed).fit(train, knn)
    cache = Path(args.cache_dir or default_cache_dir())
    stego = {"auto": _fit_stego(train, knn, tcfg, _checkpoint_path(cache, train, tcfg))}
    timings["training"] = time.perf_counter() - t
    if args.compare_paper_shifts:
        t = time.perf_counter()
        pcfg = dataclasses.replace(tcfg, shift_self=PAPER_SHIFTS["self"], shift_knn=PAPER_SHIFTS["knn"],
                                   shift_neg=PAPER_SHIFTS["neg"])
        stego["paper"] = _fit_stego(train, knn, pcfg, _checkpoint_path(cache, train, pcfg))
        timings["training_paper_shifts"] = time.perf_counter() - t

    t = time.perf_counter()
    raw_km = CosineKMeans(K, seed=args.seed).fit(sample_tokens(train, args.cluster_samples, seed=args.seed))
    code_km = {name: CosineKMeans(K, seed=args.seed).fit(
        sample_tokens(train, args.cluster_samples, seed=args.seed, transform=tr.encode))
        for name, tr in stego.items()}
    timings["clustering"] = time.perf_counter() - t

    t = time.perf_counter()
    probes = {"raw": _train_probe(train, train_masks, C, args.ignore, seed=args.seed),
              "codes": _train_probe(train, train_masks, C, args.ignore, encode=stego["auto"].encode,
                                    dim=args.code_dim, seed=args.seed)}
    timings["linear_probes"] = time.perf_counter() - t

    methods = ["kmeans_raw"]
    for name in stego:
        suffix = "" if name == "auto" else "_paper_shifts"
        methods.append("stego" + suffix)
        if not args.no_crf:
            methods.append("stego_crf" + suffix)
    cms = {m: ConfusionMatrix(K, C, args.ignore) for m in methods}
    cms.update({f"linear_probe_{n}": ConfusionMatrix(C, C, args.ignore) for n in probes})

    sizes = val.image_sizes()
    crf_side = crf_short_side(args.crf_resolution, args.resolution)

    def jobs() -> Iterator[tuple[str, ClusterMapJob]]:
        for i in range(len(val)):
            h, w = val.grid(i)
            size = (int(sizes[i][0]), int(sizes[i][1]))
            raw = np.asarray(val.tokens(i), dtype=np.float32).reshape(h, w, -1)
            if val.has_flip:
                raw = 0.5 * (raw + np.asarray(val.tokens(i, flipped=True), dtype=np.float32).reshape(h, w, -1))
            yield ("kmeans_raw", ClusterMapJob(raw, raw_km.centroids_, size, args.alpha))
            for name, tr in stego.items():
                suffix = "" if name == "auto" else "_paper_shifts"
                yield ("stego" + suffix, ClusterMapJob(item_codes(tr.head, val, i), code_km[name].centroids_, size,
                                                       args.alpha, image_path=str(val_imgs[i]),
                                                       crf=not args.no_crf, crf_resolution=crf_side))

    t = time.perf_counter()
    job_list = jobs()
    names: list[str] = []

    def tagged() -> Iterator[ClusterMapJob]:
        for name, job in job_list:
            names.append(name)
            yield job

    per_image = 1 + len(stego)
    current_mask: dict[int, np.ndarray] = {}
    for n_done, res in enumerate(ordered_map(cluster_map, tagged(), args.jobs)):
        i, name = n_done // per_image, names[n_done]
        if i not in current_mask:
            current_mask.clear()
            current_mask[i] = _load_mask(val_masks[i])
        mask = current_mask[i]
        cms[name].update(res.labels, mask)
        if res.labels_crf is not None:
            cms[name.replace("stego", "stego_crf")].update(res.labels_crf, mask)
        if n_done % per_image == per_image - 1:
            for pname, probe in probes.items():
                tok = np.asarray(val.tokens(i), dtype=np.float32)
                x = stego["auto"].encode(tok) if pname == "codes" else tok
                h, w = val.grid(i)
                logits = probe.decision_function(x).reshape(h, w, -1)
                cms[f"linear_probe_{pname}"].update(upsample_bilinear(logits, mask.shape).argmax(-1), mask)
    timings["scoring"] = time.perf_counter() - t

    results = {}
    for m, cm in cms.items():
        s = cm.scores(hungarian=not m.startswith("linear_probe"))
        results[m] = {"miou": s["miou"], "accuracy": s["accuracy"],
                      "per_class_iou": dict(zip(class_names, s["per_class_iou"])),
                      "matching": s["matching"] if not m.startswith("linear_probe") else None}
    ratio = None
    if "stego_crf" in results and results["kmeans_raw"]["miou"] > 0:
        ratio = results["stego_crf"]["miou"] / results["kmeans_raw"]["miou"]
    report = {
        "backbone": args.backbone, "weights_source": weights_source, "resolution": args.resolution,
        "flip": bool(args.flip), "precision": val.meta.get("precision", "float32"),
        "crf_short_side": None if args.no_crf else crf_side,
        "n_train_images": len(train_imgs), "n_val_images": len(val_imgs),
        "classes": C, "class_names": class_names, "n_clusters": K, "ignore": args.ignore,
        "train_config": dataclasses.asdict(tcfg), "alpha": args.alpha,
        "shifts": {name: tr.shifts for name, tr in stego.items()},
        "shift_stats": {k: v.as_dict() for k, v in est.stats_.items()},
        "results": results, "stego_crf_over_kmeans_raw": ratio,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - t_all, 1), "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }
    report = json.loads(json.dumps(report))  # what the file holds (e.g. matching keys as strings)
    out.with_name(out.name + ".json").write_text(json.dumps(report, indent=1))
    out.with_name(out.name + ".md").write_text(markdown_report(report))
    log.info("wrote %s.json and %s.md", out, out)
    return report


LABELS = {
    "kmeans_raw": "k-means on raw backbone features",
    "stego": "STEGO, no CRF",
    "stego_crf": "STEGO + CRF",
    "stego_paper_shifts": "STEGO (paper shifts), no CRF",
    "stego_crf_paper_shifts": "STEGO (paper shifts) + CRF",
    "linear_probe_raw": "linear probe on raw features (supervised)",
    "linear_probe_codes": "linear probe on STEGO codes (supervised)",
}


def markdown_report(r: dict) -> str:
    """The evaluation report as a Markdown table."""
    lines = [f"# Evaluation: {r['backbone']} at short side {r['resolution']}",
             "",
             f"Weights: {r['weights_source']}",
             "",
             f"Fit on {r['n_train_images']} images, scored on {r['n_val_images']} images; {r['classes']} classes, "
             f"{r['n_clusters']} clusters, {r['train_config']['steps']} training steps; "
             f"flip averaging {'on' if r['flip'] else 'off'}; backbone precision {r.get('precision', 'float32')}"
             + (f"; CRF at short side {r.get('crf_short_side') or 'full size'}." if "stego_crf" in r["results"]
                else "."),
             "",
             "| method | mIoU | pixel accuracy |",
             "| --- | --- | --- |"]
    for m, v in r["results"].items():
        lines.append(f"| {LABELS.get(m, m)} | {100 * v['miou']:.1f} | {100 * v['accuracy']:.1f} |")
    if r.get("stego_crf_over_kmeans_raw"):
        lines += ["", f"STEGO + CRF / raw k-means mIoU: **{r['stego_crf_over_kmeans_raw']:.2f}x**"]
    lines += ["", "Shifts (self / knn / neg):"]
    for name, s in r["shifts"].items():
        lines.append(f"- {name}: {s['self']:.3f} / {s['knn']:.3f} / {s['neg']:.3f}")
    lines += ["", "Per-class IoU (%):", "",
              "| method | " + " | ".join(r["class_names"]) + " |",
              "| --- |" + " --- |" * len(r["class_names"])]
    for m, v in r["results"].items():
        cells = ["-" if x is None else f"{100 * x:.1f}" for x in v["per_class_iou"].values()]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items())
              + f"; total {r['total_s']}; peak RSS {r['peak_rss_mb']} MB.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(args)


if __name__ == "__main__":
    main()
