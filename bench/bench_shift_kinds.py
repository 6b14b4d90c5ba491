"""How many partners the random pairs attract under the automatic shifts, measured on CamVid (issue 12).

    python bench/bench_shift_kinds.py --seeds 0,1,2 --neg-factors 1,6,12

For each factor F and seed, a head is trained (self and KNN pairs attract m = ln T partners per
location, random pairs F x m; ``TrainConfig.auto_shift_neg_factor``) on the cached
CamVid train features (the app's defaults: DINOv2 ViT-S/14, short side 322, 2000 steps) and
scored at token level (each token takes the majority label of its pixels; void-majority tokens
are skipped): K = C Hungarian mIoU of cosine k-means (20 restarts) on the codes against the same
k-means on the raw features, and the over-clustered rows a person names (each of K clusters named
by its majority class). The head and the clusters are fitted on train; train is scored as the
choosing split, val (no part in the choice) as the confirming split.
Results: ``bench/results/shift_kinds.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
         "Bicyclist")
C = len(NAMES)


def token_labels(mask: np.ndarray, grid: tuple[int, int], n_classes: int) -> np.ndarray:
    """(h*w,) majority class of each token cell of ``mask``; -1 where the cell is mostly void."""
    from core.metrics import downsample_labels, with_void

    best = downsample_labels(with_void(mask, n_classes), grid, n_classes + 1).ravel()   # void counts as a label
    return np.where(best == n_classes, -1, best)


def stacked(store, masks: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    from core.evaluate import load_mask

    feats, labels = [], []
    for i, m in enumerate(masks):
        feats.append(np.asarray(store.tokens(i), dtype=np.float32))
        labels.append(token_labels(load_mask(m), store.grid(i), C))
    return np.concatenate(feats), np.concatenate(labels)


def scores(pred: np.ndarray, labels: np.ndarray, k: int, many_to_one: bool) -> dict:
    from core.metrics import ConfusionMatrix

    ok = labels >= 0
    cm = ConfusionMatrix(k, C).update(pred[ok], labels[ok])
    s = cm.scores(hungarian=not many_to_one, many_to_one=many_to_one)
    return {"miou": round(100 * s["miou"], 1), "acc": round(100 * s["accuracy"], 1),
            "per_class": [None if v is None else round(100 * v, 1) for v in s["per_class_iou"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--neg-factors", default="1,6,12",
                    help="comma-separated factors: random pairs attract factor x m partners per location")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--no-raw", action="store_true", help="skip the raw k-means rows")
    ap.add_argument("--k-multiples", default="1,4,8")
    ap.add_argument("--code-dims", default=None,
                    help="comma-separated code dimensions of the heads, each trained per factor and seed "
                         "(default: the app's)")
    ap.add_argument("--data", type=Path, default=CAMVID)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shift_kinds")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from core.backbones import create_backbone
    from core.clustering import CosineKMeans
    from core.evaluate import pair_images_and_masks
    from core.features import FeatureConfig, extract_features
    from core.settings import DEFAULTS
    from core.training import StegoTrainer, TrainConfig
    from core.weights import default_cache_dir

    cache = Path(args.cache_dir or default_cache_dir())
    factors = [float(v) for v in args.neg_factors.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    dims = [int(v) for v in args.code_dims.split(",")] if args.code_dims else [DEFAULTS.code_dim]
    backbone = create_backbone("dinov2_vits14", cache_dir=cache)
    fcfg = FeatureConfig(backbone="dinov2_vits14", resolution=DEFAULTS.resolution)
    data = {}
    for split in SPLITS:
        imgs, masks = pair_images_and_masks(args.data / split / "images", args.data / split / "masks")
        store = extract_features(imgs, backbone, fcfg, cache / "features")
        data[split] = (store, *stacked(store, masks))
    train_store = data["train"][0]
    knn = train_store.knn()
    ks = [m * C for m in (int(v) for v in args.k_multiples.split(","))]

    rows: list[dict] = []

    def score_all(method: str, encode, seed: int, **extra) -> None:
        encoded = {split: encode(x) for split, (_, x, _) in data.items()}
        fit = encoded["train"]
        for k in ks:
            rng = np.random.default_rng(seed)
            sample = fit[rng.choice(len(fit), size=min(100_000, len(fit)), replace=False)]
            km = CosineKMeans(k, n_init=20 if k == C else 5, seed=seed).fit(sample)
            for split, (_, _, labels) in data.items():
                pred = km.predict(encoded[split])
                rows.append({"method": method, "split": split, "seed": seed, "k": k, **extra,
                             **scores(pred, labels, k, many_to_one=k != C)})
                logging.info("%s", {kk: v for kk, v in rows[-1].items() if kk != "per_class"})

    for seed in seeds:
        if not args.no_raw:
            score_all("kmeans_raw", lambda x: x, seed)
        for factor in factors:
            for dim in dims:
                cfg = TrainConfig(code_dim=dim, steps=args.steps, seed=seed, auto_shift_neg_factor=factor)
                t0 = time.perf_counter()
                trainer = StegoTrainer(cfg).fit(train_store, knn)
                secs = round(time.perf_counter() - t0, 1)
                label = f"neg x{factor:g}" + ("" if dims == [DEFAULTS.code_dim] else f", code dim {dim}")
                score_all(f"stego[{label}]", trainer.encode, seed, shifts=trainer.shifts, train_s=secs)

    meta = {"fit": "CamVid train (367 frames)", "backbone": f"dinov2_vits14 ({backbone.weights_source})",
            "resolution": DEFAULTS.resolution, "steps": args.steps, "level": "token (majority label per token)",
            "seeds": seeds, "code_dims": dims}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = "\n".join(markdown(meta, [r for r in rows if r["split"] == split], ks, split) for split in SPLITS)
    args.out.with_suffix(".md").write_text(text)
    print(text)


SPLITS = ("train", "val")
ROLE = {"train": "choosing split (fitted and scored on train, labels used only to score)",
        "val": "confirming split (fitted on train, scored on val; played no part in choosing)"}


def markdown(meta: dict, rows: list[dict], ks: list[int], split: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    lines = [f"# STEGO heads at token level (random pairs attracting F x m partners), CamVid {split}: "
             f"{ROLE[split]}", "",
             "; ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "mIoU per seed (mean); K = C Hungarian, K > C each cluster named by its majority class.", "",
             "| method | " + " | ".join(f"K={k}" for k in ks) + " |",
             "| --- |" + " --- |" * len(ks)]
    for m in methods:
        cells = []
        for k in ks:
            v = [r["miou"] for s in seeds for r in rows if r["method"] == m and r["k"] == k and r["seed"] == s]
            cells.append(" / ".join(f"{a:.1f}" for a in v) + (f" ({np.mean(v):.1f})" if len(v) > 1 else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    raw = {r["seed"]: r["miou"] for r in rows if r["method"] == "kmeans_raw" and r["k"] == ks[0]}
    if raw:
        lines += ["", f"Ratio to raw k-means at K = {ks[0]} (per seed):", ""]
    for m in methods:
        rs = [r["miou"] / raw[r["seed"]] for r in rows
              if r["method"] == m != "kmeans_raw" and r["k"] == ks[0] and r["seed"] in raw]
        if rs:
            lines.append(f"- {m}: " + ", ".join(f"{v:.2f}x" for v in rs))
    if all("per_class" in r for r in rows):
        lines += ["", f"Per-class IoU at K = {ks[0]} (first seed):", "",
                  "| method | " + " | ".join(NAMES) + " |", "| --- |" + " --- |" * C]
        for m in methods:
            r = next(r for r in rows if r["method"] == m and r["k"] == ks[0])
            lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.0f}" for v in r["per_class"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
