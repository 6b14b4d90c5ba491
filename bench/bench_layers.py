"""Do the backbone's intermediate layers hold thin things the last layer does not? A supervised ceiling.

A linear probe (softmax regression on every labelled token, majority label per token) is
trained on the features of one set of frames and scored at full mask resolution (token
log-probabilities upsampled bilinearly) on a disjoint set, for the last block's output and
for intermediate blocks (each passed through the final LayerNorm), alone and concatenated
with the last. If no layer lets a probe trained on every pixel see poles, no unsupervised
method built on it will. Writes ``--out``.md / .json.

    python bench/bench_layers.py --images .../train/images --masks .../train/masks \
        --out bench/results/layers_train      # fit on frames 0, 3, 6, ...; score on 1, 4, 7, ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.backbones import create_backbone  # noqa: E402
from core.evaluate import load_mask  # noqa: E402
from core.images import load_image, resize_rgb, target_size  # noqa: E402
from core.metrics import ConfusionMatrix, downsample_labels  # noqa: E402


def layer_features(backbone, rgb: np.ndarray, resolution: int, blocks: list[int],
                   max_long_side: int | None = None) -> dict[int, np.ndarray]:
    """{block (1-based): (h, w, C) normed token features} of one image at short side ``resolution``."""
    H, W = target_size(*rgb.shape[:2], resolution, backbone.patch_size, max_long_side)
    x = backbone.preprocess(resize_rgb(rgb, (H, W)))[None].to(backbone.device)
    vit = backbone.model
    out: dict[int, torch.Tensor] = {}
    hooks = [vit.blocks[b - 1].register_forward_hook(lambda m, i, o, b=b: out.__setitem__(b, o)) for b in blocks]
    try:
        with torch.inference_mode():
            vit.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    p, n = backbone.patch_size, backbone.num_prefix_tokens
    return {b: vit.norm(t)[0, n:].reshape(H // p, W // p, -1).float().numpy() for b, t in out.items()}


def fit_probe(X: np.ndarray, y: np.ndarray, n_classes: int, steps: int = 300, seed: int = 0):
    torch.manual_seed(seed)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    mu, sd = Xt.mean(0), Xt.std(0) + 1e-6
    lin = torch.nn.Linear(X.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-5)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin((Xt - mu) / sd), yt).backward()
        opt.step()
    return lambda Z: lin((torch.from_numpy(Z) - mu) / sd).detach()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--masks", type=Path, required=True)
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--resolution", type=int, default=322)
    ap.add_argument("--blocks", default="6,8,10,12")
    ap.add_argument("--every", type=int, default=3, help="fit on frames 0, n, 2n, ...; score on 1, n+1, ...")
    ap.add_argument("--classes", type=int, default=11)
    ap.add_argument("--ignore", type=int, default=11)
    ap.add_argument("--class-names", default="Sky,Building,Pole,Road,Pavement,Tree,SignSymbol,Fence,Car,Pedestrian,Bicyclist")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    C, names = a.classes, a.class_names.split(",")
    blocks = [int(b) for b in a.blocks.split(",")]
    last = max(blocks)
    backbone = create_backbone(a.backbone, device="cpu", cache_dir=a.cache_dir)
    paths = sorted(p for p in a.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    fit_paths, score_paths = paths[0::a.every], paths[1::a.every]
    t0 = time.perf_counter()

    def features(ps):
        return [(layer_features(backbone, load_image(p), a.resolution, blocks), load_mask(a.masks / (p.stem + ".png"))) for p in ps]

    fit, score = features(fit_paths), features(score_paths)
    extract_s = time.perf_counter() - t0
    inputs = {f"block {b}": [b] for b in blocks} | {f"block {b} + {last}": [b, last] for b in blocks if b != last}
    rows = []
    for label, bs in inputs.items():
        X, y = [], []
        for feats, mask in fit:
            grid = feats[last].shape[:2]
            lab = downsample_labels(mask, grid, C, a.ignore).ravel()
            keep = lab >= 0
            X.append(np.concatenate([feats[b].reshape(-1, feats[b].shape[-1]) for b in bs], 1)[keep])
            y.append(lab[keep])
        predict = fit_probe(np.concatenate(X), np.concatenate(y), C)
        cm = ConfusionMatrix(C, C, ignore_index=a.ignore)
        for feats, mask in score:
            h, w = feats[last].shape[:2]
            Z = np.concatenate([feats[b].reshape(h * w, -1) for b in bs], 1)
            logits = predict(Z).reshape(1, h, w, C).permute(0, 3, 1, 2)
            up = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
            cm.update(up[0].argmax(0).numpy(), mask)
        s = cm.scores(hungarian=False)
        rows.append({"input": label, "mIoU": s["miou"], "accuracy": s["accuracy"],
                     "per_class": s["per_class_iou"]})
        print(label, f"{100 * s['miou']:.1f}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                      "fit_frames": len(fit), "scored_frames": len(score),
                                                      "extract_seconds": extract_s, "rows": rows}, indent=1))
    lines = [f"Supervised linear probe per backbone layer (`bench/bench_layers.py`), {a.backbone} "
             f"({backbone.weights_source}), short side {a.resolution}; fitted on {len(fit)} frames of "
             f"{a.images.parent.name}, scored on {len(score)} others at full resolution.", "",
             "| input | mIoU | accuracy | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    lines += [f"| {r['input']} | {100 * r['mIoU']:.1f} | {100 * r['accuracy']:.1f} | "
              + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in r["per_class"]) + " |" for r in rows]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
