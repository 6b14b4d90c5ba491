"""Evaluation of a fitted ``StegoPipeline`` on labelled images: the method and the product.

``evaluate(pipeline, images, masks, settings=EvalSettings(n_classes=C)) -> Report`` scores, on
the given images (features extracted with the pipeline's backbone, or reused when they are the
pipeline's own corpus):

- **K = C, Hungarian** (the paper's protocol): cosine k-means on the raw backbone features, the
  pipeline's STEGO clusters without and with the dense CRF (other fitted pipelines, e.g. with
  the paper's shifts, can be compared side by side), and the supervised linear probes on raw
  features and codes (labels of the pipeline's corpus, only when ``fit_masks`` are given);
- **over-clustering + naming** (the product): for each K of the sweep (``k_multiples`` x C),
  k-means on raw features and on STEGO codes, each cluster named by the majority class of its
  pixels on the scored images (the stand-in for a careful person; clusters mostly on void are
  left unnamed), the mIoU / pixel accuracy of the named map and the number of naming actions
  (the codes of each K come from ``sweep_pipelines[K]`` when given: the head a run of K clusters
  trains, see ``core.shifts.auto_neg_factor``; else from the pipeline);
  the named STEGO map refined by the CRF; and **propagation**: a ``core.propagation.Propagator``
  trained on the named clusters' confident tokens (backbone features), predicting every
  scored image, without and with the CRF; with ``find_missing``, also the same after the
  stand-in person's **click-to-find**: for each class present in the scored images that no
  cluster was named after, one click (``find_clicks``: that many, in different images) on the
  scored token that class fills most, whose correspondence region (``core.correspondence``,
  similarity >= ``find_threshold``) is named that class and labels the propagator's tokens, as
  a found cluster does in the app; with ``checked`` (numbers N), also the same after the stand-in
  person **checked N images**: N scored images picked without looking at labels
  (``checked_pick``, ``core.selection``: as the app suggests them, or spread evenly) take their true labels as seeds at the app's weight of corrected images, as
  masks corrected in an annotation tool and imported do; those rows are scored on the other images only.

Every score comes from confusion matrices accumulated image by image, so memory does not grow
with the number of images. Named scores never drop pixels of extra or unnamed clusters (unnamed
clusters' pixels count as errors), unlike STEGO's own metric code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections import deque
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from core.atomic import atomic_write_json, atomic_write_text
from core.clustering import CosineKMeans, log_softmax_, sample_tokens, upsample_bilinear
from core.correspondence import DEFAULT_THRESHOLD, CorrespondenceIndex
from core.dense import dense_item
from core.crf import ClusterMapJob, CRFParams, cluster_map, ordered_map
from core.features import FeatureStore, extract_features
from core.hierarchy import ClusterHierarchy
from core.images import load_image
from core.metrics import (ConfusionMatrix, LinearProbe, downsample_labels, majority_names, named_scores,
                          with_void)
from core.pipeline import StegoPipeline, item_codes, peak_rss_mb
from core.pixel_head import PixelHead
from core.propagation import (DEFAULT_MIN_CONFIDENCE, DEFAULT_PSEUDO_ALPHA, ClassMapJob, Propagator, class_map,
                              cluster_probabilities, pseudo_labels, views_log_proba, with_found)
from core.refinement import RefineConfig
from core.selection import DEFAULT_PICK, PICKS, even_items, image_pooled, pick_images
from core.settings import SettingsError, check
from core.tokens import mean_of_views, token_views
from core.training import encode_tokens

log = logging.getLogger(__name__)

__all__ = ["EvalSettings", "MethodResult", "Report", "evaluate", "pair_images_and_masks", "load_mask",
           "pipeline_features"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
FEATURE_KINDS = ("raw", "stego")

Progress = Callable[[str, float], None]
CORRECTION_WEIGHT = RefineConfig.correction_weight  # the app's weight of a corrected image's tokens


@dataclass
class EvalSettings:
    """What ``evaluate`` measures (the pipeline's own settings come from its config)."""

    n_classes: int
    ignore_index: int | None = 255           # plus every value >= n_classes
    class_names: tuple[str, ...] | None = None
    k_multiples: tuple[int, ...] = (1, 2, 4, 8)  # over-clustering sweep: K = m * n_classes
    sweep_n_init: int = 5                    # k-means restarts for sweep K other than the pipeline's
    kmeans_samples: int | None = None        # tokens evaluate's own k-means fit on (None = the pipeline's)
    kmeans_n_init: int | None = None         # restarts of every k-means here (None: pipeline's at K = C, else sweep_n_init)
    probes: bool = True                      # supervised linear probes (when fit masks are given)
    max_void_share: float = 0.5              # clusters with more void pixels than this stay unnamed
    crf: bool = True
    propagate: bool = True
    propagate_k: tuple[int, ...] | None = None   # K values to propagate (None = every K of the sweep)
    propagate_from: str = "stego"            # which over-clustering gives the pseudo-labels: stego | raw
    propagation: dict = field(default_factory=dict)   # core.propagation.Propagator keyword arguments
    pseudo_alpha: float = DEFAULT_PSEUDO_ALPHA
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    find_missing: bool = False               # click-to-find stand-in rows (finds for each class left unnamed)
    find_clicks: int = 1                     # clicks per class left unnamed, each in another scored image
    find_threshold: float = DEFAULT_THRESHOLD
    checked: tuple[int, ...] = ()            # checked-image rows: N scored images with true labels as seeds
    checked_pick: str = DEFAULT_PICK         # how the N images are picked (CHECKED_PICKS)
    checked_batches: bool = False            # counts are successive batches (each adds the next batch)
    pixel_head_weights: tuple[float, ...] = ()   # checked rows also with a core.pixel_head, added at each weight
    seed_weight: float = CORRECTION_WEIGHT         # loss weight of their tokens (the app's for corrected images)
    predict_resolution: int | None = None    # short side of the features the propagated rows predict on
    predict_dense: bool = False              # propagated rows predict on a grid twice as dense (core.dense)
    propagation_crf: dict = field(default_factory=dict)   # core.crf.CRFParams keyword arguments, propagated rows
    n_jobs: int = 2
    seed: int = 0

    def validate(self) -> None:
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.class_names is not None and len(self.class_names) != self.n_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.n_classes} classes")
        if not self.k_multiples or min(self.k_multiples) < 1:
            raise ValueError(f"k_multiples must be positive integers, got {self.k_multiples}")
        if self.propagate_from not in FEATURE_KINDS:
            raise ValueError(f"propagate_from must be one of {FEATURE_KINDS}, got {self.propagate_from!r}")
        if not 0.0 <= self.max_void_share <= 1.0:
            raise ValueError(f"max_void_share must be in [0, 1], got {self.max_void_share}")
        if not -1.0 <= self.find_threshold <= 1.0:
            raise ValueError(f"find_threshold must be in [-1, 1], got {self.find_threshold}")
        if self.find_missing and not self.propagate:
            raise ValueError("find_missing adds propagation rows: it needs propagate=True")
        if self.find_clicks < 1:
            raise ValueError(f"find_clicks must be >= 1 (clicks per class left unnamed), got {self.find_clicks}")
        if self.checked and not self.propagate:
            raise ValueError("checked adds propagation rows: it needs propagate=True")
        if self.seed_weight <= 1.0:
            raise ValueError(f"seed_weight must be > 1 (it marks seeds), got {self.seed_weight}")
        if any(n < 1 for n in self.checked):
            raise ValueError(f"checked must be positive numbers of images, got {self.checked}")
        if self.pixel_head_weights and (not self.checked or min(self.pixel_head_weights) <= 0):
            raise ValueError("pixel_head_weights add to the checked rows: they need checked counts and "
                             f"weights > 0, got {self.pixel_head_weights}")
        if self.checked_pick not in CHECKED_PICKS:
            raise ValueError(f"checked_pick must be one of {CHECKED_PICKS}, got {self.checked_pick!r}")
        if self.predict_resolution is not None and not self.propagate:
            raise ValueError("predict_resolution changes the propagated rows: it needs propagate=True")
        if self.predict_dense and not self.propagate:
            raise ValueError("predict_dense changes the propagated rows: it needs propagate=True")
        if self.predict_dense and self.predict_resolution is not None:
            raise ValueError("predict_dense and predict_resolution are two ways to predict on finer tokens: "
                             "give one of them")
        if self.predict_resolution is not None:
            try:
                check("resolution", self.predict_resolution)      # the run setting's limits
            except SettingsError as exc:
                raise ValueError(f"predict_resolution: {exc}") from None
        if self.propagate_k is not None and not set(self.propagate_k) <= set(self.sweep):
            raise ValueError(f"propagate_k {self.propagate_k} must be among the sweep's K {self.sweep}")
        Propagator(self.n_classes, **self.propagation)._validate()
        try:
            CRFParams(**self.propagation_crf)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"propagation_crf: {exc}") from None

    @property
    def sweep(self) -> tuple[int, ...]:
        return tuple(sorted({m * self.n_classes for m in self.k_multiples}))

    @property
    def names(self) -> list[str]:
        return list(self.class_names) if self.class_names else [str(c) for c in range(self.n_classes)]


@dataclass
class MethodResult:
    """The scores of one row of the report."""

    label: str
    kind: str                                  # "hungarian" | "named" | "probe"
    n_clusters: int | None
    miou: float
    accuracy: float
    per_class_iou: dict[str, float | None]
    matching: dict[int, int] | None = None     # Hungarian cluster -> class
    names: list[int] | None = None             # named rows: class of each cluster (-1 unnamed)
    naming_actions: int | None = None          # one action per named cluster
    group_actions: int | None = None           # the same names given with the hierarchy's groups
    unnamed_clusters: int | None = None
    checked_images: int | None = None          # checked-image rows: images with true labels (not scored)


@dataclass
class Report:
    """Everything one evaluation measured; ``to_dict`` for JSON, ``to_markdown`` for people."""

    meta: dict
    results: dict[str, MethodResult]
    timings_s: dict[str, float]

    def ratio(self, a: str = "stego_crf", b: str = "kmeans_raw") -> float | None:
        if a in self.results and b in self.results and self.results[b].miou > 0:
            return self.results[a].miou / self.results[b].miou
        return None

    def to_dict(self) -> dict:
        d = {"meta": self.meta, "results": {k: dataclasses.asdict(v) for k, v in self.results.items()},
             "stego_crf_over_kmeans_raw": self.ratio(), "timings_s": self.timings_s}
        return json.loads(json.dumps(d))

    def write(self, out: Path) -> None:
        """Write ``out.json`` and ``out.md``."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out.with_name(out.name + ".json"), self.to_dict())
        atomic_write_text(out.with_name(out.name + ".md"), self.to_markdown())

    def to_markdown(self) -> str:
        m = self.meta
        names = m["class_names"]
        lines = [f"# Evaluation: {m['backbone']} at short side {m['resolution']}", "",
                 f"Weights: {m['weights_source']}", "",
                 f"Pipeline fitted on {m['n_fit_images']} images ({m['train_steps']} training steps, code dim "
                 f"{m['code_dim']}, seed {m['seed']}); scored on {m['n_images']} images at full resolution; "
                 f"{m['n_classes']} classes; flip averaging {'on' if m['flip'] else 'off'}; "
                 f"backbone precision {m['precision']}; "
                 + (f"CRF at short side {m['crf_short_side']}." if m['crf_short_side'] else "no CRF rows."), "",
                 "## K = C, Hungarian matching", "",
                 "| method | mIoU | pixel accuracy |", "| --- | --- | --- |"]
        for r in self.results.values():
            if r.kind != "named":
                lines.append(f"| {r.label} | {100 * r.miou:.1f} | {100 * r.accuracy:.1f} |")
        if self.ratio():
            lines += ["", f"STEGO + CRF / raw k-means mIoU: **{self.ratio():.2f}x**"]
        named = [r for r in self.results.values() if r.kind == "named"]
        if named:
            lines += ["", "## Over-clustering, each cluster named by its majority class", "",
                      f"Clusters with more than {100 * m['max_void_share']:.0f} % void pixels stay unnamed; "
                      "their pixels count as errors. Propagation: "
                      f"{m.get('propagation', {})}"
                      + (f"; the propagated rows predict on features at short side {m['predict_resolution']}"
                         if m.get("predict_resolution") else "")
                      + ("; the propagated rows predict on a token grid twice as dense (four views shifted by a "
                         "quarter patch, core.dense)" if m.get("predict_dense") else "") + ".", "",
                      *([f"Checked images: {', '.join(map(str, chk['counts']))} scored images "
                         f"{PICK_WORDS[chk.get('pick', 'even')]} take their true labels as seeds (weight "
                         f"{chk['seed_weight']}); those rows are scored on the other images."
                         + (" The counts are successive batches, as the app gives them after each import: "
                            "each larger count keeps the smaller count's images and adds the next batch."
                            if chk.get("batches") else ""), ""]
                        if (chk := m.get("checked")) else []),
                      *([f"Click-to-find stand-in: {find['clicks_per_class']} click(s) per class left unnamed, "
                         f"similarity >= {find['threshold']}; each click is one more naming action.", ""]
                        if (find := m.get("click_to_find")) and "clicks_per_class" in find else []),
                      "Naming actions: one per named cluster; with groups: the same names given with the "
                      "Clusters tab's groups (K / 4 groups; name a group, then rename the members that "
                      "differ, or name members one by one, whichever is fewer).", "",
                      "| method | K | naming actions | with groups | mIoU | pixel accuracy |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for r in named:
                lines.append(f"| {r.label} | {r.n_clusters} | {r.naming_actions} | {r.group_actions} | "
                             f"{100 * r.miou:.1f} | {100 * r.accuracy:.1f} |")
        lines += ["", "## Per-class IoU (%)", "", "| method | K | " + " | ".join(names) + " |",
                  "| --- | --- |" + " --- |" * len(names)]
        for r in self.results.values():
            cells = ["-" if x is None else f"{100 * x:.1f}" for x in r.per_class_iou.values()]
            lines.append(f"| {r.label} | {r.n_clusters or '-'} | " + " | ".join(cells) + " |")
        if m.get("shifts"):
            lines += ["", "Shifts (self / knn / neg): " + "; ".join(
                f"{k}: {v['self']:.3f} / {v['knn']:.3f} / {v['neg']:.3f}" for k, v in m["shifts"].items())]
        if m.get("sweep_heads"):        # K whose codes come from the head a run of K clusters trains
            lines += ["", "Over-clustered rows on their own head (random pairs attracting F x m; shifts self / knn / "
                      "neg): " + "; ".join(f"K = {k}: F = {v['auto_shift_neg_factor']:g}, " + (
                          f"{v['shifts']['self']:.3f} / {v['shifts']['knn']:.3f} / {v['shifts']['neg']:.3f}"
                          if v["shifts"] else "shifts not recorded") for k, v in m["sweep_heads"].items())]
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in self.timings_s.items())
                  + f"; peak RSS {m['peak_rss_mb']} MB.", ""]
        return "\n".join(lines)


# ------------------------------------------------------------------ data helpers

def pair_images_and_masks(images: Path, masks: Path, max_images: int | None = None) -> tuple[list[Path], list[Path]]:
    """Images of a folder (sorted) and the mask PNG of the same stem for each."""
    images, masks = Path(images), Path(masks)
    if not images.is_dir():
        raise ValueError(f"image folder {images} does not exist")
    if not masks.is_dir():
        raise ValueError(f"mask folder {masks} does not exist")
    imgs = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if max_images is not None:
        imgs = imgs[:max_images]
    if not imgs:
        raise ValueError(f"no images in {images}")
    missing = [p for p in imgs if not (masks / (p.stem + ".png")).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} images have no mask {masks}/<stem>.png, e.g. {missing[0].name}")
    return imgs, [masks / (p.stem + ".png") for p in imgs]


def load_mask(path: Path) -> np.ndarray:
    """(H, W) int64 labels of a one-channel mask PNG."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"{path}: masks must be one-channel label images, got shape {arr.shape}")
    return arr.astype(np.int64)


def pipeline_features(pipeline: StegoPipeline) -> tuple[FeatureStore, list[Path]]:
    """The whole-image feature store of a fitted pipeline's corpus, and the corpus's image paths."""
    rd = pipeline.dir
    if not rd.state_json.is_file() or not rd.images_json.is_file():
        raise FileNotFoundError(f"{rd.root} holds no fitted run: call StegoPipeline.fit first")
    return rd.infer_store(), [Path(p) for p in rd.read_json(rd.images_json)]


class _Concat:
    """TokenFeatures over several stores, one after the other."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.embed_dim = self.parts[0].embed_dim
        self.has_flip = all(getattr(p, "has_flip", False) for p in self.parts)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _at(self, i: int):
        j = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.parts[j], i - int(self._starts[j])

    def grid(self, i: int) -> tuple[int, int]:
        p, k = self._at(i)
        return p.grid(k)

    def tokens(self, i: int, flipped: bool = False) -> np.ndarray:
        p, k = self._at(i)
        return p.tokens(k, flipped)

    def image_index(self, i: int) -> int:
        return i


class _Subset:
    """Some items of a whole-image feature store, in a given order (TokenFeatures + image_sizes)."""

    def __init__(self, store: FeatureStore, items: Sequence[int]):
        self.store, self.items = store, list(items)
        self.embed_dim, self.has_flip = store.embed_dim, store.has_flip

    def __len__(self) -> int:
        return len(self.items)

    def grid(self, i: int) -> tuple[int, int]:
        return self.store.grid(self.items[i])

    def tokens(self, i: int, flipped: bool = False) -> np.ndarray:
        return self.store.tokens(self.items[i], flipped)

    def image_index(self, i: int) -> int:
        return i

    def image_sizes(self) -> np.ndarray:
        return self.store.image_sizes()[[self.store.image_index(j) for j in self.items]]

    def pooled(self) -> np.ndarray:
        return self.store.pooled()[self.items]


def _raw(store, i: int) -> np.ndarray:
    """(h, w, C) float32 raw features of item i (flip-averaged when stored)."""
    h, w = store.grid(i)
    return mean_of_views(token_views(store, i)).reshape(h, w, -1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _class_log_probs(vectors: np.ndarray, centroids: np.ndarray, names: np.ndarray, n_classes: int,
                     alpha: float) -> np.ndarray:
    """(..., n_classes + 1) log-probabilities of each class from named clusters: class logit = alpha x
    the best cosine similarity among its clusters; the last channel stands for the unnamed clusters."""
    sims = _unit(vectors) @ _unit(centroids).T
    out = np.full(sims.shape[:-1] + (n_classes + 1,), -1e4, dtype=np.float32)
    for c in range(n_classes + 1):
        sel = np.flatnonzero(names == c) if c < n_classes else np.flatnonzero(names < 0)
        if sel.size:
            out[..., c] = alpha * sims[..., sel].max(axis=-1)
    return log_softmax_(out)


LABELS = {
    "kmeans_raw": "k-means on raw backbone features",
    "stego": "STEGO, no CRF",
    "stego_crf": "STEGO + CRF",
    "linear_probe_raw": "linear probe on raw features (supervised)",
    "linear_probe_codes": "linear probe on STEGO codes (supervised)",
    "named_raw": "k-means on raw features, named",
    "named_stego": "STEGO codes, named",
    "named_stego_crf": "STEGO codes, named, + CRF",
    "propagated": "propagated (no CRF)",
    "propagated_crf": "propagated + CRF",
    "propagated_found": "propagated with click-to-find (no CRF)",
    "propagated_found_crf": "propagated with click-to-find + CRF",
}


def _label(base: str) -> str:
    """The report label of a row name without its ``_k{K}``."""
    if not base.startswith("propagated_checked"):
        return LABELS[base]
    n, found, px, crf = re.fullmatch(r"(\d+)(_found)?(?:_px([\d.]+))?(_crf)?", base[len("propagated_checked"):]
                                     ).groups()
    return (f"propagated with {'click-to-find and ' if found else ''}{n} checked images"
            + (f" and their pixel head (weight {px})" if px else "") + (" + CRF" if crf else " (no CRF)"))


CHECKED_PICKS = (*PICKS, "random")           # random: a baseline, images picked at random (settings.seed)
PICK_WORDS = {"even": "spread evenly over the list", "random": "picked at random",
              "representative": "picked as the app suggests them (the most typical image of each of N groups "
                                "of similar images, core.selection)"}


def _check_count(n_items: int, n_checked: int) -> None:
    if not 1 <= n_checked < n_items:
        raise ValueError(f"can check 1 to {n_items - 1} of the {n_items} scored images "
                         f"(some must stay to be scored), got {n_checked}")


def checked_items(n_items: int, n_checked: int, how: str = "even", pooled: np.ndarray | None = None,
                  seed: int = 0, done: Sequence[int] = ()) -> list[int]:
    """The ``n_checked`` scored items a person checks, picked without their labels as the app
    suggests them (``core.selection``: ``even`` over the list, or ``representative`` of the
    ``pooled`` (n_items, C) image features), or at ``random``; ``done`` items (checked in an
    earlier batch) are not picked again."""
    _check_count(n_items, n_checked + len(set(done)))
    if how == "even":
        return even_items(n_items, n_checked, done)
    if how == "random":
        left = np.setdiff1d(np.arange(n_items), np.asarray(list(done), np.int64))
        return sorted(np.random.default_rng(seed).choice(left, size=n_checked, replace=False).tolist())
    if pooled is None:
        raise ValueError(f"picking checked images {how!r} needs the images' pooled features")
    return pick_images(pooled, n_checked, how, seed=seed, done=done)


def checked_sets(n_items: int, counts: Sequence[int], how: str, pooled: np.ndarray | None, seed: int = 0,
                 batches: bool = False) -> dict[int, list[int]]:
    """Per count N, the N items checked. Without ``batches`` each N is picked afresh; with it the
    counts are successive batches as the app gives them (each larger N keeps the previous N's
    items, which count as corrected, and adds the next batch)."""
    out: dict[int, list[int]] = {}
    prev: list[int] = []
    for n in sorted(set(counts)):
        if batches and prev:
            out[n] = sorted(prev + checked_items(n_items, n - len(prev), how, pooled, seed=seed, done=prev))
        else:
            out[n] = checked_items(n_items, n, how, pooled, seed=seed)
        prev = out[n]
    return out


def _train_probe(store, masks: Sequence[Path], settings: EvalSettings, encode=None, dim: int | None = None
                 ) -> LinearProbe:
    """Linear probe on every token of the pipeline's corpus, labels = majority of the mask under each token."""
    C = settings.n_classes
    sizes = [h * w for h, w in (store.grid(i) for i in range(len(store)))]
    X = np.empty((sum(sizes), dim or store.embed_dim), dtype=np.float32)  # one buffer, no concatenation
    y = np.empty(sum(sizes), dtype=np.int64)
    offset = 0
    for i, n in enumerate(sizes):
        x = np.asarray(store.tokens(i), dtype=np.float32)
        X[offset:offset + n] = encode(x) if encode is not None else x
        y[offset:offset + n] = downsample_labels(load_mask(masks[store.image_index(i)]), store.grid(i), C,
                                                 settings.ignore_index).ravel()
        offset += n
    return LinearProbe(C, epochs=10, lr=1e-3, seed=settings.seed).fit(X, y)


def _row(label: str, kind: str, k: int | None, s: dict, class_names: list[str], **extra) -> MethodResult:
    return MethodResult(label=label, kind=kind, n_clusters=k, miou=s["miou"], accuracy=s["accuracy"],
                        per_class_iou=dict(zip(class_names, s["per_class_iou"])), **extra)


def evaluate(pipeline: StegoPipeline, images: Sequence[Path], masks: Sequence[Path], settings: EvalSettings, *,
             fit_masks: Sequence[Path] | None = None, compare: Mapping[str, StegoPipeline] | None = None,
             sweep_pipelines: Mapping[int, StegoPipeline] | None = None, progress: Progress | None = None) -> Report:
    """Score a fitted ``pipeline`` on ``images`` with label ``masks`` (see the module docstring).

    ``fit_masks``: masks of the pipeline's corpus images (same order), for the supervised linear
    probes (skipped without them). ``compare``: other fitted pipelines on the same corpus whose
    K = C STEGO rows are reported as ``stego_<name>`` / ``stego_crf_<name>``. ``sweep_pipelines``:
    K -> a pipeline fitted on the same corpus whose head gives the codes of the over-clustered
    rows at that K (named, named + CRF, propagated); K not in it use ``pipeline``'s head.
    """
    settings.validate()
    if pipeline.head is None or pipeline.centroids is None:
        raise RuntimeError("the pipeline is not fitted: call fit() or StegoPipeline.load() first")
    images, masks = [Path(p) for p in images], [Path(p) for p in masks]
    if len(images) != len(masks) or not images:
        raise ValueError(f"need one mask per image, got {len(images)} images and {len(masks)} masks")
    for n in settings.checked:
        _check_count(len(images), n)             # fails now, not after the features and clusters
    def report(stage: str, frac: float) -> None:
        log.info("%s %.0f %%", stage, 100 * frac)
        if progress is not None:
            progress(stage, frac)

    cfg = pipeline.config
    C, names_cls, ignore = settings.n_classes, settings.names, settings.ignore_index
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()

    fit_store, fit_images = pipeline_features(pipeline)
    if fit_masks is not None and len(fit_masks) != len(fit_images):
        raise ValueError(f"{len(fit_masks)} fit masks for the pipeline's {len(fit_images)} images")
    position = {str(p): j for j, p in enumerate(fit_images)}
    if [str(p) for p in images] == [str(p) for p in fit_images]:
        store = fit_store
    elif all(str(p) in position for p in images):  # a subset of the corpus: its features are there
        store = _Subset(fit_store, [position[str(p)] for p in images])
    else:
        store = extract_features(images, pipeline.backbone(), dataclasses.replace(cfg.features, crop_mode="none"),
                                 pipeline.cache_root / "features")
    pipeline._backbone = None  # not needed again: free it
    timings["features"] = time.perf_counter() - t
    report("features", 1.0)

    # ---- clusters: raw features and codes, K = C (Hungarian) and the over-clustering sweep
    t = time.perf_counter()
    seed = cfg.train.seed
    heads = {"": pipeline.head, **{f"_{n}": p.head for n, p in (compare or {}).items()}}
    enc = {key: (lambda x, h=h: encode_tokens(h, np.asarray(x))) for key, h in heads.items()}
    sweep_heads = {K: (sweep_pipelines or {}).get(K, pipeline).head for K in sorted(set(settings.sweep) | {C})}
    head_of = sweep_heads.__getitem__          # the head whose codes the rows at K cluster
    n_samples = settings.kmeans_samples or cfg.cluster_samples
    raw_x = sample_tokens(fit_store, n_samples, seed=seed, average_flips=True)
    code_x: dict[int, np.ndarray] = {}         # id(head) -> sampled codes
    centroids: dict[tuple[str, int], np.ndarray] = {}
    for K in sorted(set(settings.sweep) | {C}):
        n_init = settings.kmeans_n_init or (cfg.cluster_n_init if K == C else settings.sweep_n_init)
        centroids[("raw", K)] = CosineKMeans(K, n_init=n_init, seed=seed).fit(raw_x).centroids_
        h = head_of(K)
        if K == cfg.n_clusters and h is pipeline.head:
            centroids[("stego", K)] = pipeline.centroids
        else:
            if id(h) not in code_x:
                code_x[id(h)] = sample_tokens(fit_store, n_samples, seed=seed,
                                              transform=lambda t, h=h: encode_tokens(h, t), average_flips=True)
            centroids[("stego", K)] = CosineKMeans(K, n_init=n_init, seed=seed).fit(code_x[id(h)]).centroids_
        report("clustering", 0.5)
    del raw_x, code_x
    compare_centroids = {}
    for key, p in heads.items():
        if key:
            pipe = compare[key[1:]]
            compare_centroids[key] = pipe.centroids if pipe.config.n_clusters == C else CosineKMeans(
                C, n_init=settings.kmeans_n_init or cfg.cluster_n_init, seed=seed).fit(
                sample_tokens(fit_store, n_samples, seed=seed, transform=enc[key], average_flips=True)).centroids_
    timings["clustering"] = time.perf_counter() - t

    probes = {}
    if fit_masks is not None and settings.probes:
        t = time.perf_counter()
        probes = {"raw": _train_probe(fit_store, fit_masks, settings),
                  "codes": _train_probe(fit_store, fit_masks, settings, encode=enc[""], dim=pipeline.head.code_dim)}
        timings["linear_probes"] = time.perf_counter() - t

    # ---- pass 1: Hungarian rows, cluster x class(+void) counts of every (kind, K), probes
    t = time.perf_counter()
    hung = {"kmeans_raw": ConfusionMatrix(C, C, ignore), "stego": ConfusionMatrix(cfg.n_clusters, C, ignore)}
    if settings.crf:
        hung["stego_crf"] = ConfusionMatrix(cfg.n_clusters, C, ignore)
    for key in compare_centroids:
        hung["stego" + key] = ConfusionMatrix(C, C, ignore)
        if settings.crf:
            hung["stego_crf" + key] = ConfusionMatrix(C, C, ignore)
    hung.update({f"linear_probe_{n}": ConfusionMatrix(C, C, ignore) for n in probes})
    counts = {(kind, K): ConfusionMatrix(K, C + 1) for kind in FEATURE_KINDS for K in settings.sweep}
    sizes = store.image_sizes()
    crf_side = cfg.crf_short_side
    tags: deque[tuple[int, str]] = deque()  # (image, row) of each job, in submission order

    def jobs1() -> Iterator[ClusterMapJob]:
        for i in range(len(store)):
            size = (int(sizes[i][0]), int(sizes[i][1]))
            raw = _raw(store, i)
            tags.append((i, "kmeans_raw"))
            yield ClusterMapJob(raw, centroids[("raw", C)], size, cfg.alpha)
            for key, h in heads.items():
                cen = pipeline.centroids if not key else compare_centroids[key]
                tags.append((i, "stego" + key))
                yield ClusterMapJob(item_codes(h, store, i), cen, size, cfg.alpha, image_path=str(images[i]),
                                    crf=settings.crf, crf_resolution=crf_side)

    mask_cache: dict[int, np.ndarray] = {}
    clicks: dict[int, list[tuple[float, int, int, int]]] = {}   # class -> (share, image, y, x), fullest first
    for res in ordered_map(cluster_map, jobs1(), settings.n_jobs):
        i, name = tags.popleft()  # a job is always submitted before its result arrives
        if i not in mask_cache:
            mask_cache.clear()
            mask_cache[i] = load_mask(masks[i])
        mask = mask_cache[i]
        hung[name].update(res.labels, mask)
        if res.labels_crf is not None:
            hung[name.replace("stego", "stego_crf", 1)].update(res.labels_crf, mask)
        if name == "kmeans_raw":  # once per image: the sweep counts and the probes
            _count_sweep(store, i, mask, head_of, centroids, counts, settings)
            if settings.find_missing:
                _best_clicks(clicks, i, with_void(mask, C, ignore), store.grid(i), C, settings.find_clicks)
            for pname, probe in probes.items():
                tok = np.asarray(store.tokens(i), dtype=np.float32)
                x = enc[""](tok) if pname == "codes" else tok
                h, w = store.grid(i)
                logits = probe.decision_function(x).reshape(h, w, -1)
                hung[f"linear_probe_{pname}"].update(upsample_bilinear(logits, mask.shape).argmax(-1), mask)
            report("scoring", (i + 1) / len(store))
    timings["scoring"] = time.perf_counter() - t

    results: dict[str, MethodResult] = {}
    for name, cm in hung.items():
        probe = name.startswith("linear_probe")
        s = cm.scores(hungarian=not probe)
        label = LABELS.get(name) or next(f"{LABELS[b]} ({name[len(b) + 1:]})" for b in ("stego_crf", "stego")
                                         if name.startswith(b + "_"))
        results[name] = _row(label, "probe" if probe else "hungarian", None if probe else cm.n_pred, s, names_cls,
                             matching=None if probe else s["matching"])
    names: dict[tuple[str, int], np.ndarray] = {}
    group_actions: dict[tuple[str, int], int] = {}
    for (kind, K), cm in counts.items():
        names[(kind, K)] = majority_names(cm.matrix, settings.max_void_share)
        group_actions[(kind, K)] = ClusterHierarchy().fit(centroids[(kind, K)]).naming_actions(names[(kind, K)])
        s = named_scores(cm.matrix, names[(kind, K)])
        results[f"named_{kind}_k{K}"] = _row(LABELS[f"named_{kind}"], "named", K, s, names_cls,
                                             names=names[(kind, K)].tolist(), naming_actions=s["naming_actions"],
                                             group_actions=group_actions[(kind, K)],
                                             unnamed_clusters=s["unnamed_clusters"])

    # ---- pass 2: named STEGO + CRF, and propagation (a classifier per K), without and with the CRF
    prop_k = settings.sweep if settings.propagate_k is None else tuple(sorted(settings.propagate_k))
    props: dict[int, Propagator] = {}
    if settings.propagate:
        t = time.perf_counter()
        corpus = fit_store if store is fit_store or isinstance(store, _Subset) else _Concat([store, fit_store])
        for K in prop_k:
            props[K] = _fit_propagator(corpus, head_of(K), centroids[(settings.propagate_from, K)],
                                       names[(settings.propagate_from, K)], settings)
            report("propagation", len(props) / len(prop_k))
        timings["propagation_training"] = time.perf_counter() - t
    finds: dict[int, list[dict]] = {}
    found_fns: dict[int, Callable | None] = {}
    at = (lambda i: store.items[i]) if isinstance(store, _Subset) else (lambda i: i)   # scored -> corpus item
    if settings.find_missing:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="stego_eval_find_") as tmp:
            index = CorrespondenceIndex.build(corpus, Path(tmp) / "index", seed=seed)
            for K in prop_k:
                kind = settings.propagate_from
                found_of, finds[K] = _found_regions(index, counts[(kind, K)].matrix, names[(kind, K)], clicks,
                                                    at, settings.find_threshold)
                props[("found", K)] = _fit_propagator(corpus, head_of(K), centroids[(kind, K)], names[(kind, K)],
                                                      settings, found_of=found_of)
                if settings.checked:                 # the index's maps are needed after it is removed
                    found_fns[K] = None if found_of is None else _materialised(found_of, len(corpus))
        timings["click_to_find"] = time.perf_counter() - t
    pooled = image_pooled(store) if settings.checked and settings.checked_pick == "representative" else None
    pixel_heads: dict[int, PixelHead] = {}
    checked = checked_sets(len(store), settings.checked, settings.checked_pick, pooled, seed=seed,
                           batches=settings.checked_batches)
    if checked:
        t = time.perf_counter()
        for n, chosen in checked.items():
            seeds = {at(i): downsample_labels(load_mask(masks[i]), store.grid(i), C, ignore).ravel() for i in chosen}
            for K in prop_k:
                kind = settings.propagate_from
                props[("checked", n, K)] = _fit_propagator(corpus, head_of(K), centroids[(kind, K)],
                                                           names[(kind, K)], settings, found_of=found_fns.get(K),
                                                           seeds=seeds)
        if settings.pixel_head_weights:
            for n, chosen in checked.items():
                pixel_heads[n] = PixelHead(C, seed=seed).fit(
                    (np.asarray(store.tokens(i), np.float32).reshape(*store.grid(i), -1),
                     load_image(images[i]), _pixel_targets(load_mask(masks[i]), C)) for i in chosen)
        timings["checked_images"] = time.perf_counter() - t
    not_scored = {n: set(v) for n, v in checked.items()}
    found_tag = "_found" if settings.find_missing else ""
    predict_store = store        # the features the propagators predict on
    if props and settings.predict_resolution not in (None, cfg.features.resolution):
        t = time.perf_counter()
        predict_store = extract_features(images, pipeline.backbone(),
                                         dataclasses.replace(cfg.features, crop_mode="none",
                                                             resolution=int(settings.predict_resolution)),
                                         pipeline.cache_root / "features")
        pipeline._backbone = None
        timings["predict_features"] = time.perf_counter() - t
    if settings.crf or props:
        t = time.perf_counter()
        cms2: dict[str, ConfusionMatrix] = {}
        tags2: deque[tuple[int, str]] = deque()
        prop_crf = CRFParams(**settings.propagation_crf)
        dense_precision = fit_store.meta.get("precision", "float32")

        def jobs2() -> Iterator[ClassMapJob]:
            for i in range(len(store)):
                size = (int(sizes[i][0]), int(sizes[i][1]))
                codes = _codes_by_head(store, i, [head_of(K) for K in settings.sweep]) if settings.crf else None
                if settings.predict_dense and props:
                    raw, (h, w) = dense_item(pipeline.backbone(), images[i], store.grid(i), dense_precision)
                    views = [raw]
                else:
                    views = token_views(predict_store, i) if props else []   # the image and, where stored, its mirror
                    h, w = predict_store.grid(i)
                for K in settings.sweep:
                    if settings.crf:
                        lp = _class_log_probs(codes[id(head_of(K))], centroids[("stego", K)], names[("stego", K)], C, cfg.alpha)
                        tags2.append((i, f"named_stego_crf_k{K}"))
                        yield ClassMapJob(lp, size, str(images[i]), crf=True, crf_resolution=crf_side, plain=False)
                    rows = [(K, f"propagated_k{K}"), (("found", K), f"propagated_found_k{K}")] + [
                        (("checked", n, K), f"propagated_checked{n}{found_tag}_k{K}") for n in checked]
                    for key, row in rows:
                        if key in props:
                            lp = views_log_proba(props[key], views).reshape(h, w, -1)
                            tags2.append((i, row))
                            yield ClassMapJob(lp, size, str(images[i]), crf=settings.crf, crf_resolution=crf_side,
                                              params=prop_crf)
                            if isinstance(key, tuple) and key[0] == "checked" and key[1] in pixel_heads:
                                ph = pixel_heads[key[1]].arrays_
                                projected = ph.project(np.asarray(views[0], np.float32).reshape(h, w, -1))
                                for pw in settings.pixel_head_weights:
                                    tags2.append((i, row.replace(f"{found_tag}_k", f"{found_tag}_px{pw:g}_k")))
                                    yield ClassMapJob(lp, size, str(images[i]), crf=settings.crf,
                                                      crf_resolution=crf_side, params=prop_crf, pixel=projected,
                                                      pixel_arrays=ph, pixel_weight=float(pw))

        for res in ordered_map(class_map, jobs2(), settings.n_jobs):
            i, name = tags2.popleft()
            if name.startswith("propagated_checked") and i in not_scored[int(
                    name[len("propagated_checked"):].split("_")[0])]:
                continue                                # a checked image is not scored
            if i not in mask_cache:
                mask_cache.clear()
                mask_cache[i] = load_mask(masks[i])
            target = with_void(mask_cache[i], C, ignore)
            if name.startswith("named"):
                cms2.setdefault(name, ConfusionMatrix(C + 1, C + 1)).update(res.labels_crf, target)
            else:
                cms2.setdefault(name, ConfusionMatrix(C + 1, C + 1)).update(res.labels, target)
                if res.labels_crf is not None:
                    base, k = name.rsplit("_k", 1)
                    cms2.setdefault(f"{base}_crf_k{k}", ConfusionMatrix(C + 1, C + 1)).update(res.labels_crf, target)
            report("refining", (i + 1) / len(store))
        ident = np.array(list(range(C)) + [-1])
        for name, cm in cms2.items():
            K = int(name.rsplit("_k", 1)[1])
            base = name.rsplit("_k", 1)[0]
            s = named_scores(cm.matrix, ident)
            kind = settings.propagate_from if base.startswith("propagated") else "stego"
            n_chk = int(base[len("propagated_checked"):].split("_")[0]) if base.startswith("propagated_checked") \
                else None
            with_finds = base.startswith("propagated_found") or (n_chk is not None and "_found" in base)
            extra = len(finds.get(K, ())) if with_finds else 0   # one action per find
            results[name] = _row(_label(base), "named", K, s, names_cls, names=names[(kind, K)].tolist(),
                                 naming_actions=int((names[(kind, K)] >= 0).sum()) + extra,
                                 group_actions=group_actions[(kind, K)] + extra,
                                 unnamed_clusters=int((names[(kind, K)] < 0).sum()), checked_images=n_chk)
        timings["refining"] = time.perf_counter() - t

    order = {n: j for j, n in enumerate(["kmeans_raw", "stego", "stego_crf"])}
    results = dict(sorted(results.items(), key=lambda kv: (kv[1].kind != "hungarian", kv[1].kind == "named",
                                                         kv[1].n_clusters or 0, order.get(kv[0], 9),
                                                         kv[0])))
    timings["total"] = time.perf_counter() - t_all
    meta = {
        "backbone": cfg.features.backbone, "weights_source": fit_store.meta.get("weights_source", ""),
        "resolution": cfg.features.resolution, "flip": bool(cfg.features.flip),
        "precision": fit_store.meta.get("precision", "float32"), "crf_short_side": crf_side if settings.crf else None,
        "n_fit_images": len(fit_images), "n_images": len(images), "n_classes": C, "class_names": names_cls,
        "ignore_index": ignore, "n_clusters": cfg.n_clusters, "train_steps": cfg.train.steps,
        "code_dim": cfg.train.code_dim, "seed": seed, "alpha": cfg.alpha, "sweep": list(settings.sweep),
        "max_void_share": settings.max_void_share, "kmeans_samples": n_samples,
        "kmeans_n_init": settings.kmeans_n_init,
        "propagation": ({"from": settings.propagate_from, "k": list(prop_k), "pseudo_alpha": settings.pseudo_alpha,
                         "min_confidence": settings.min_confidence,
                         **Propagator(C, **settings.propagation).get_params()} if settings.propagate else {}),
        "predict_resolution": settings.predict_resolution,
        "predict_dense": settings.predict_dense,
        "propagation_crf": dict(settings.propagation_crf),
        "click_to_find": ({"threshold": settings.find_threshold, "clicks_per_class": settings.find_clicks,
                           "finds": {str(k): v for k, v in finds.items()}}
                          if settings.find_missing else None),
        "checked": ({"counts": sorted(checked), "seed_weight": settings.seed_weight, "pick": settings.checked_pick,
                     "batches": settings.checked_batches, "pixel_head_weights": list(settings.pixel_head_weights),
                     "images": {str(n): [str(images[i].name) for i in v] for n, v in checked.items()}}
                    if checked else None),
        "shifts": {"auto" if not key else key[1:]: _shifts(p) for key, p in
                   [("", pipeline)] + [(f"_{n}", q) for n, q in (compare or {}).items()]},
        "sweep_heads": {str(K): {"auto_shift_neg_factor": q.config.train.auto_shift_neg_factor, "shifts": _shifts(q)}
                        for K, q in sorted((sweep_pipelines or {}).items())},
        "pipeline_config": cfg.to_dict(), "peak_rss_mb": peak_rss_mb(),
    }
    return Report(meta=meta, results=results, timings_s={k: round(v, 1) for k, v in timings.items()})


def _shifts(p: StegoPipeline) -> dict:
    return p.dir.read_json(p.dir.state_json).get("shifts", {}) if p.dir.state_json.is_file() else {}


def _codes_by_head(store, i: int, heads: Sequence) -> dict[int, np.ndarray]:
    """Item i's codes under each distinct head, keyed by id(head)."""
    out: dict[int, np.ndarray] = {}
    for h in heads:
        if id(h) not in out:
            out[id(h)] = item_codes(h, store, i)
    return out


def _count_sweep(store, i: int, mask: np.ndarray, head_of: Callable[[int], Any], centroids: dict, counts: dict,
                 settings: EvalSettings) -> None:
    """Add image i's full-resolution argmax clusters of every (kind, K) to the cluster x class(+void) counts
    (the codes at K from ``head_of(K)``)."""
    target = with_void(mask, settings.n_classes, settings.ignore_index)
    raw = _unit(_raw(store, i))
    codes = {key: _unit(c) for key, c in _codes_by_head(store, i, [head_of(K) for K in settings.sweep]).items()}
    for kind in FEATURE_KINDS:
        for K in settings.sweep:
            v = raw if kind == "raw" else codes[id(head_of(K))]
            # argmax of the cosine is that of the upsampled dot products (the norm is per pixel)
            dots = v @ _unit(centroids[(kind, K)]).T
            counts[(kind, K)].update(upsample_bilinear(dots, mask.shape).argmax(-1), target)


def _materialised(found_of: Callable[[int], np.ndarray], n_items: int) -> Callable[[int], np.ndarray]:
    """``found_of`` read once per item and kept (token classes: small), so it outlives its index."""
    maps = [np.asarray(found_of(i)).copy() for i in range(n_items)]
    return lambda i: maps[i]


def _pixel_targets(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """A label mask as pixel-head targets: classes 0..n_classes-1, everything else -1."""
    m = np.asarray(mask).astype(np.int64)
    return np.where(m < n_classes, m, -1)


def _fit_propagator(corpus, head, centroids: np.ndarray, names: np.ndarray, settings: EvalSettings,
                    found_of: Callable[[int], np.ndarray | None] | None = None,
                    seeds: Mapping[int, np.ndarray] | None = None) -> Propagator:
    """Pseudo-labels of every token of ``corpus`` from the named clusters, then a Propagator on its raw features.

    ``found_of(i)``: (T,) class of each token of item i inside a found region (-1 = none); those
    tokens take that class at full weight, as the app's refinement does with found clusters.
    ``seeds``: item -> (T,) true class per token (-1 = none) of a checked image; those tokens take
    it at ``settings.seed_weight``, as the refinement does with corrected images.
    """
    kind = settings.propagate_from

    def labels_of(i: int) -> tuple[np.ndarray, np.ndarray]:       # read twice per item, as the app does
        # the vectors the clusters were named on (flip-averaged where stored), as the app's codes_of
        v = item_codes(head, corpus, i) if kind == "stego" else _raw(corpus, i)
        v = v.reshape(-1, v.shape[-1])
        lab, wt = pseudo_labels(cluster_probabilities(v, centroids, settings.pseudo_alpha), names,
                                min_confidence=settings.min_confidence)
        found = found_of(i) if found_of is not None else None
        if found is not None:
            lab, wt, _ = with_found(lab, wt, found)
        if seeds is not None and i in seeds:
            has = seeds[i] >= 0
            lab = np.where(has, seeds[i], lab).astype(np.int64)
            wt = np.where(has, settings.seed_weight, wt).astype(np.float32)
        return lab, wt

    return Propagator(settings.n_classes, seed=settings.seed, **settings.propagation).fit(corpus, labels_of)


def _best_clicks(clicks: dict, i: int, target: np.ndarray, grid: tuple[int, int], n_classes: int,
                 n_clicks: int = 1) -> None:
    """Keep, per class, the ``n_clicks`` fullest tokens of different scored images, fullest first: the
    token of image ``i`` that the class fills most (its pixel share of the token's cell, void included
    in the cell) competes with those kept so far. Where a person would click to find that thing."""
    h, w = grid
    H, W = target.shape
    cell = (np.arange(H)[:, None] * h // H) * w + (np.arange(W)[None, :] * w // W)
    hist = np.bincount((cell * (n_classes + 1) + target).ravel(), minlength=h * w * (n_classes + 1))
    hist = hist.reshape(h * w, n_classes + 1)
    share = hist[:, :n_classes] / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    for c in np.flatnonzero(share.max(axis=0) > 0):
        t = int(share[:, c].argmax())
        kept = clicks.setdefault(int(c), [])
        kept.append((float(share[t, c]), i, t // w, t % w))
        kept.sort(key=lambda k: -k[0])           # stable: the earlier image wins a tie
        del kept[n_clicks:]


def _found_regions(index: CorrespondenceIndex, counts: np.ndarray, names: np.ndarray, clicks: dict,
                   corpus_item: Callable[[int], int], threshold: float):
    """The kept clicks of each class with pixels in the scored images that no cluster is named after;
    a class's region is the union of its clicks' (a location's similarity: its best click's).

    Returns ``found_of(i)`` -> (T,) class per token of corpus item i (-1 = none; where two found
    regions overlap, the more similar one wins) and one entry per click, for the report.
    """
    present = np.flatnonzero(np.asarray(counts)[:, :-1].sum(axis=0) > 0)
    named = set(int(n) for n in names if n >= 0)
    missing = [int(c) for c in present if int(c) not in named and int(c) in clicks]
    sims = []
    finds = []
    for c in missing:
        best = None
        for share, i, y, x in clicks[c]:
            sim = index.similarities(index.vector(corpus_item(i), y, x))
            best = sim if best is None else np.maximum(best, sim)
            finds.append({"class": c, "image": int(i), "cell": [int(y), int(x)], "cell_share": round(share, 3),
                          "token_share_found": round(float((sim >= threshold).mean()), 5)})
        sims.append(best)
    if not finds:
        return None, finds
    stack = np.stack(sims)                       # (finds, total tokens)
    best = stack.argmax(axis=0)
    cls = np.where(stack.max(axis=0) >= threshold, np.asarray(missing)[best], -1)

    def found_of(i: int) -> np.ndarray:
        return index.item_map(cls, i).ravel()

    return found_of, finds
