"""Token-level naming and propagation sweep on a fitted pipeline (issue 12, choosing vs confirming).

Works on cached features only (no backbone run, no CRF, no upsampling), so a whole grid fits in
minutes on a CPU: every token is labelled by the majority class of its mask pixels and scored
per token. For each K and feature kind (raw backbone features, STEGO codes):

- **named**: each cluster named by the majority class of its tokens on the scored split (the
  careful person), actions = clusters named;
- **group naming**: the clusters cut into K / 4 groups by `ClusterHierarchy` (what the Clusters
  tab shows); per group the person either names the whole group with its majority class and then
  renames the members whose majority differs, or names each member alone, whichever takes fewer
  actions. Same named map, fewer actions;
- **propagated**: `pseudo_labels` from the named clusters on every token of the fitting and
  the scored images, a `Propagator` per setting of the grid on the raw features (evaluate's own
  `_fit_propagator`), scored on the scored split.

    python bench/bench_naming.py --run <cache>/eval_runs/<key> --fit-masks .../train/masks \
        --store <features of the scored split> --masks .../val/masks --out bench/results/naming_val

With ``--store`` omitted the fitting images are the scored ones (the choosing split).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.clustering import CosineKMeans, sample_tokens  # noqa: E402
from core.evaluate import EvalSettings, _Concat, _fit_propagator, load_mask, pipeline_features  # noqa: E402
from core.features import FeatureStore  # noqa: E402
from core.hierarchy import ClusterHierarchy  # noqa: E402
from core.metrics import ConfusionMatrix, downsample_labels, majority_names, named_scores, with_void  # noqa: E402
from core.pipeline import StegoPipeline  # noqa: E402
from core.propagation import DEFAULT_MIN_CONFIDENCE, DEFAULT_PSEUDO_ALPHA  # noqa: E402
from core.training import encode_tokens  # noqa: E402

log = logging.getLogger("bench_naming")


def token_targets(store, masks: list[Path], C: int, ignore: int) -> list[np.ndarray]:
    return [downsample_labels(load_mask(m), store.grid(i), C, ignore).ravel() for i, m in enumerate(masks)]


def counts_of(pred: list[np.ndarray], targets: list[np.ndarray], K: int, C: int) -> np.ndarray:
    """(K, C + 1) tokens per cluster and true class, unlabelled tokens in the last column."""
    cm = ConfusionMatrix(K, C + 1)
    for p, t in zip(pred, targets):
        cm.update(p, with_void(t, C))
    return cm.matrix


def class_scores(pred: list[np.ndarray], targets: list[np.ndarray], C: int) -> dict:
    return named_scores(counts_of(pred, targets, C, C), np.arange(C))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="fitted pipeline directory (eval_runs/<key>)")
    ap.add_argument("--fit-masks", type=Path, required=True, help="masks of the fitting images")
    ap.add_argument("--store", type=Path, help="feature store of the scored images (default: the fitting ones)")
    ap.add_argument("--masks", type=Path, help="masks of the scored images")
    ap.add_argument("--classes", type=int, default=11)
    ap.add_argument("--ignore", type=int, default=11)
    ap.add_argument("--k", default="44,88,176")
    ap.add_argument("--kinds", default="raw,stego")
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--n-init", type=int, default=5)
    ap.add_argument("--propagate", default="", help="K:kind pairs to propagate from, e.g. 88:raw,88:stego")
    ap.add_argument("--grid", default="{}", help="JSON dict of Propagator / pseudo-label settings to list over")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--role", default="", help="a line saying what this split was used for (choosing, confirming)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    C, ignore = a.classes, a.ignore

    pipe = StegoPipeline.load(a.run)
    fit_store, fit_paths = pipeline_features(pipe)
    fit_masks = [a.fit_masks / (p.stem + ".png") for p in fit_paths]
    if a.store is None:
        store, masks = fit_store, fit_masks
    else:
        store = FeatureStore.open(a.store)
        paths = json.loads((a.store / "meta.json").read_text())["image_paths"]
        masks = [a.masks / (Path(p).stem + ".png") for p in paths]
    if len(masks) != len(store):
        raise SystemExit(f"{len(masks)} masks for {len(store)} scored items")
    targets = token_targets(store, masks, C, ignore)
    head = pipe.head

    def vec(st, i, kind):
        x = np.asarray(st.tokens(i), dtype=np.float32)
        return encode_tokens(head, x) if kind == "stego" else x

    enc = lambda x: encode_tokens(head, np.asarray(x, dtype=np.float32))  # noqa: E731
    samples = {"raw": sample_tokens(fit_store, a.samples, seed=a.seed),
               "stego": sample_tokens(fit_store, a.samples, seed=a.seed, transform=enc)}
    rows, centroids = [], {}
    for kind in a.kinds.split(","):
        scored_vecs = [vec(store, i, kind) for i in range(len(store))]
        for K in [int(k) for k in a.k.split(",")]:
            t = time.perf_counter()
            cen = CosineKMeans(K, n_init=a.n_init, seed=a.seed).fit(samples[kind]).centroids_
            centroids[(K, kind)] = cen
            cn = cen / np.linalg.norm(cen, axis=1, keepdims=True)
            pred = [(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) @ cn.T).argmax(1)
                    for v in scored_vecs]
            counts = counts_of(pred, targets, K, C)
            names = majority_names(counts)
            s = named_scores(counts, names)
            rows.append({"row": "named", "kind": kind, "K": K, "mIoU": s["miou"], "accuracy": s["accuracy"],
                         "actions": s["naming_actions"], "group_actions": ClusterHierarchy().fit(cen).naming_actions(names),
                         "classes_found": s["classes_found"], "per_class": s["per_class_iou"],
                         "seconds": time.perf_counter() - t})
            centroids[(K, kind, "names")] = names
            log.info("%s K=%d named %.1f (actions %d, with groups %d)", kind, K, 100 * s["miou"],
                     s["naming_actions"], rows[-1]["group_actions"])

    grid = json.loads(a.grid)
    keys = sorted(grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*[grid[k] for k in keys])] or [{}]
    corpus_stores = [fit_store] if a.store is None else [fit_store, store]
    for pair in filter(None, a.propagate.split(",")):
        K, kind = pair.split(":")
        K = int(K)
        cen, names = centroids[(K, kind)], centroids[(K, kind, "names")]
        for combo in combos:
            t = time.perf_counter()
            pseudo = {"pseudo_alpha": combo.get("alpha", DEFAULT_PSEUDO_ALPHA),
                      "min_confidence": combo.get("min_confidence", DEFAULT_MIN_CONFIDENCE)}
            prop_kw = {k: v for k, v in combo.items() if k not in ("alpha", "min_confidence")}
            settings = EvalSettings(C, propagate_from=kind, propagation=prop_kw, seed=a.seed, **pseudo)
            prop = _fit_propagator(_Concat(corpus_stores), head, cen, names, settings)
            pred = [prop.predict(np.asarray(store.tokens(i), dtype=np.float32)) for i in range(len(store))]
            s = class_scores(pred, targets, C)
            rows.append({"row": "propagated", "kind": kind, "K": K, "settings": combo, "mIoU": s["miou"],
                         "accuracy": s["accuracy"], "per_class": s["per_class_iou"],
                         "seconds": time.perf_counter() - t})
            log.info("propagated %s K=%d %s: %.1f", kind, K, combo, 100 * s["miou"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                      "rows": rows}, indent=1))
    lines = ["| row | kind | K | settings | mIoU | acc. | actions | with groups |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['kind']} | {r['K']} | {json.dumps(r.get('settings', ''))} | "
                     f"{100 * r['mIoU']:.1f} | {100 * r['accuracy']:.1f} | {r.get('actions', '')} | "
                     f"{r.get('group_actions', '')} |")
    head = [f"Token-level naming / propagation (`bench/bench_naming.py`), run {a.run.name}, scored on "
            f"{'the fitting images' if a.store is None else a.store.name}, seed {a.seed}.", ""]
    tail = ["", a.role] if a.role else []
    a.out.with_suffix(".md").write_text("\n".join(head + lines + tail) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
