"""Does the propagator gain from its tokens' neighbourhood? A token-level check on the fitting split.

Each token's backbone feature is concatenated with the mean of its (2r+1) x (2r+1) neighbours
(``c1``: r = 1; ``c12``: r = 1 and 3; ``none``: the app's propagator as it is), or with an
intermediate block's output (``--block N``, mode ``bN``: the backbone is run again on each image,
that block's tokens passed through the final LayerNorm, as in ``bench_layers.py``). The Propagator
(app defaults) is trained on the pseudo-labels of the K named STEGO clusters (majority naming)
and scored per token, as in ``bench_naming.py``. Writes ``--out``.md / .json.

    python bench/bench_context.py --run <cache>/eval_runs/<key> --masks .../train/masks \
        --out bench/results/context_train_s0_k88
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_naming import class_scores, counts_of, token_targets  # noqa: E402
from core.clustering import CosineKMeans, sample_tokens  # noqa: E402
from core.evaluate import pipeline_features  # noqa: E402
from core.metrics import majority_names, named_scores  # noqa: E402
from core.pipeline import StegoPipeline  # noqa: E402
from core.propagation import (DEFAULT_MIN_CONFIDENCE, DEFAULT_PSEUDO_ALPHA, Propagator,  # noqa: E402
                              cluster_probabilities, pseudo_labels)
from core.training import encode_tokens  # noqa: E402

RADII = {"none": [], "c1": [1], "c2": [2], "c12": [1, 3]}


def box_mean(f: np.ndarray, r: int) -> np.ndarray:
    """(h, w, d) -> the mean over each location's (2r+1)^2 neighbours (edges repeated)."""
    k = 2 * r + 1
    c = np.cumsum(np.cumsum(np.pad(f, ((r, r), (r, r), (0, 0)), mode="edge"), 0), 1)
    c = np.pad(c, ((1, 0), (1, 0), (0, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


class WithBlock:
    """A TokenFeatures whose tokens carry an intermediate block's token after the stored feature."""

    def __init__(self, base, extra: list[np.ndarray]):
        self.base, self.extra = base, extra
        self.embed_dim = base.embed_dim + extra[0].shape[-1]

    def __len__(self) -> int:
        return len(self.base)

    def grid(self, i: int) -> tuple[int, int]:
        return self.base.grid(i)

    def image_index(self, i: int) -> int:
        return self.base.image_index(i)

    def tokens(self, i: int, flipped: bool = False) -> np.ndarray:
        x = np.asarray(self.base.tokens(i), np.float32)
        return np.concatenate([x, self.extra[i].reshape(len(x), -1)], 1)


def block_tokens(pipe, store, paths, block: int, cache_dir: Path | None) -> list[np.ndarray]:
    """Block ``block``'s normed tokens of every image, on the stored tokens' grid."""
    from bench_layers import layer_features
    from core.backbones import create_backbone
    from core.images import load_image

    fc = pipe.config.features
    backbone = create_backbone(fc.backbone, device="cpu", cache_dir=cache_dir)
    out = []
    for i, p in enumerate(paths):
        f = layer_features(backbone, load_image(p), fc.resolution, [block], fc.max_long_side)[block]
        if f.shape[:2] != tuple(store.grid(i)):
            raise SystemExit(f"{p}: block grid {f.shape[:2]} is not the stored grid {store.grid(i)}")
        out.append(f.astype(np.float16))
    return out


class WithContext:
    """A TokenFeatures whose tokens carry their neighbourhood means after the feature itself."""

    def __init__(self, base, radii: list[int]):
        self.base, self.radii = base, radii
        self.embed_dim = base.embed_dim * (1 + len(radii))

    def __len__(self) -> int:
        return len(self.base)

    def grid(self, i: int) -> tuple[int, int]:
        return self.base.grid(i)

    def image_index(self, i: int) -> int:
        return self.base.image_index(i)

    def tokens(self, i: int, flipped: bool = False) -> np.ndarray:
        x = np.asarray(self.base.tokens(i), np.float32)
        h, w = self.base.grid(i)
        f = x.reshape(h, w, -1)
        return np.concatenate([x] + [box_mean(f, r).reshape(h * w, -1) for r in self.radii], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="fitted pipeline directory (eval_runs/<key>)")
    ap.add_argument("--masks", type=Path, required=True, help="masks of the fitting images")
    ap.add_argument("--modes", default="none,c1,c12", help=f"comma-separated, of {sorted(RADII)}")
    ap.add_argument("--k", type=int, default=88)
    ap.add_argument("--classes", type=int, default=11)
    ap.add_argument("--ignore", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, help="also try the stored features + this block's (mode bN)")
    ap.add_argument("--cache-dir", type=Path, help="weights cache for --block")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    C, K = a.classes, a.k
    pipe = StegoPipeline.load(a.run)
    store, paths = pipeline_features(pipe)
    targets = token_targets(store, [a.masks / (p.stem + ".png") for p in paths], C, a.ignore)
    codes = [encode_tokens(pipe.head, np.asarray(store.tokens(i), np.float32)) for i in range(len(store))]
    sample = sample_tokens(store, 100_000, seed=a.seed,
                           transform=lambda x: encode_tokens(pipe.head, np.asarray(x, np.float32)))
    cen = CosineKMeans(K, n_init=5, seed=a.seed).fit(sample).centroids_
    cn = cen / np.linalg.norm(cen, axis=1, keepdims=True)
    clusters = [(v / np.linalg.norm(v, axis=1, keepdims=True) @ cn.T).argmax(1) for v in codes]
    counts = counts_of(clusters, targets, K, C)
    names = majority_names(counts)
    named = named_scores(counts, names)["miou"]

    def labels_of(i: int):
        return pseudo_labels(cluster_probabilities(codes[i], cen, DEFAULT_PSEUDO_ALPHA), names,
                             min_confidence=DEFAULT_MIN_CONFIDENCE)

    modes = a.modes.split(",") + ([f"b{a.block}"] if a.block else [])
    extra = block_tokens(pipe, store, paths, a.block, a.cache_dir) if a.block else None
    rows = []
    for mode in modes:
        t = time.perf_counter()
        feats = WithBlock(store, extra) if mode.startswith("b") else WithContext(store, RADII[mode])
        prop = Propagator(C, seed=a.seed).fit(feats, labels_of)
        s = class_scores([prop.predict(feats.tokens(i)) for i in range(len(feats))], targets, C)
        rows.append({"mode": mode, "mIoU": s["miou"], "accuracy": s["accuracy"],
                     "per_class": [float(v) for v in s["per_class_iou"]], "seconds": time.perf_counter() - t})
        print(f"{mode}: propagated {100 * s['miou']:.1f}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"run": a.run.name, "K": K, "seed": a.seed, "named": named,
                                                      "rows": rows}, indent=1))
    lines = [f"Propagator inputs with neighbourhood means or an intermediate block (`bench/bench_context.py`), run {a.run.name}, K = {K} "
             f"STEGO codes named by majority (token level, named {100 * named:.1f} mIoU), scored on the fitting "
             f"images, seed {a.seed}.", "",
             "| input | propagated mIoU | accuracy | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {100 * r['mIoU']:.1f} | {100 * r['accuracy']:.1f} | {r['seconds']:.0f} |" for r in rows]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
