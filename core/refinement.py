"""The "refine with names" stage: propagate a person's cluster names to every pixel.

Given a finished run (features, head, centroids) and the current cluster -> class mapping,
``refine`` trains core.propagation.Propagator on the backbone features of every item
(pseudo-labels: the confidently assigned tokens of each cluster; seeds: tokens of images a
person checked, weighted higher; found regions: their tokens), predicts every item, refines
with the dense CRF and writes one PNG per image into ``out_dir``, in *cluster-index space*
(class c is written as ``space.class_to_cluster[c]``), so a cluster -> label mapping applies
to the refined maps as it does to the raw ones. A person's corrected images also train a pixel
head (core.pixel_head: colour + upsampled feature per pixel), whose log-probabilities are added
to the propagated ones, so what the corrections drew finer than a token is learnt too.

Resumable: the trained classifiers (``propagator.pt``, ``pixel_head.npz``) and the class space (``space.json``)
are kept in ``out_dir``; a second call with the same ``out_dir`` skips training and the
images whose PNG exists. Cancellation raises core.errors.Cancelled.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Iterator, Sequence

import numpy as np

from core.atomic import atomic_write_json
from core.constants import NOT_NAMED
from core.crf import ordered_map
from core.dense import dense_item
from core.errors import Cancelled
from core.images import load_image
from core.metrics import downsample_labels
from core.pixel_head import DEFAULT_PIXEL_HEAD_WEIGHT, PixelHead, PixelHeadArrays
from core.propagation import (
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_PSEUDO_ALPHA,
    LABEL_PASSES,
    PROPAGATOR_DEFAULTS,
    ClassMapJob,
    Propagator,
    class_map,
    cluster_probabilities,
    pseudo_labels,
    views_log_proba,
    with_found,
)
from core.rundir import write_label_png
from core.tokens import TokenFeatures, token_views

if TYPE_CHECKING:
    from core.backbones import Backbone

log = logging.getLogger(__name__)

__all__ = ["RefineConfig", "ClassSpace", "refine", "STAGES"]

STAGES = ("pseudo-labels", "training", "maps")
STAGE_SPAN = {"pseudo-labels": (0.0, 0.05), "training": (0.05, 0.6), "maps": (0.6, 1.0)}
MODEL = "propagator.pt"
PIXEL_HEAD = "pixel_head.npz"
SPACE = "space.json"

Progress = Callable[[str, float, dict], None]


@dataclass
class RefineConfig:
    """Every setting of the stage (the Propagator's hyper-parameters included)."""

    hidden: int = PROPAGATOR_DEFAULTS["hidden"]
    steps: int = PROPAGATOR_DEFAULTS["steps"]
    keep_fraction: float = PROPAGATOR_DEFAULTS["keep_fraction"]
    class_balance: float = PROPAGATOR_DEFAULTS["class_balance"]
    batch_size: int = PROPAGATOR_DEFAULTS["batch_size"]
    lr: float = PROPAGATOR_DEFAULTS["lr"]
    min_confidence: float = DEFAULT_MIN_CONFIDENCE   # pseudo-labels below this confidence are left out
    seed_weight: float = 3.0          # weight of person-checked tokens (> 1 marks a seed)
    correction_weight: float = 100.0  # weight of the tokens of corrected images (imported masks; chosen on train)
    pseudo_alpha: float = DEFAULT_PSEUDO_ALPHA
    crf: bool = True
    crf_resolution: int | None = None  # short side the CRF runs at (None = full image size)
    dense: bool = False               # predict on a token grid twice as dense (core.dense; 4 backbone passes per image)
    pixel_head_weight: float = DEFAULT_PIXEL_HEAD_WEIGHT  # corrected images' pixel head (core.pixel_head); 0 = off
    seed: int = 0
    n_jobs: int = 2
    device: str = "cpu"

    def validate(self) -> None:
        if self.seed_weight <= 1.0:
            raise ValueError(f"seed_weight must be > 1 (it marks seeds), got {self.seed_weight}")
        if self.correction_weight <= 1.0:
            raise ValueError(f"correction_weight must be > 1 (it marks seeds), got {self.correction_weight}")
        if self.pixel_head_weight < 0:
            raise ValueError(f"pixel_head_weight must be >= 0 (0 = no pixel head), got {self.pixel_head_weight}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        self.propagator(2)._validate()

    def propagator(self, n_classes: int) -> Propagator:
        return Propagator(n_classes, hidden=self.hidden, keep_fraction=self.keep_fraction,
                          class_balance=self.class_balance, steps=self.steps, batch_size=self.batch_size,
                          lr=self.lr, seed=self.seed, device=self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RefineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


def _count(value) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class ClassSpace:
    """What the propagator learns: ``cluster_to_class`` (n_clusters,) int (-1 = not learnt) and,
    per class, the cluster index its pixels are written as."""

    cluster_to_class: tuple[int, ...]
    class_to_cluster: tuple[int, ...]
    names: tuple[str, ...] = ()       # per class, for people (label name, "cluster 7", "ignored")
    # how of_clusters laid the classes out, for people (not compared: a refinement saved before these
    # counts existed resumes): the first n_labels are named labels, the next n_unnamed unnamed clusters;
    # None where the space was saved without them (unknown, not zero)
    n_labels: int | None = field(default=None, compare=False)
    n_unnamed: int | None = field(default=None, compare=False)

    @property
    def n_classes(self) -> int:
        return len(self.class_to_cluster)

    def classes_of(self, clusters: np.ndarray) -> np.ndarray:
        """The class of each cluster index in ``clusters`` (any shape, int64); -1 where the index
        is none (< 0), beyond the clusters, or of a cluster that is not learnt."""
        c2c = np.asarray(self.cluster_to_class, dtype=np.int64)
        x = np.asarray(clusters, dtype=np.int64)
        return np.where((x >= 0) & (x < len(c2c)), c2c[np.clip(x, 0, len(c2c) - 1)], -1)

    def to_dict(self) -> dict:
        return {"cluster_to_class": list(self.cluster_to_class), "class_to_cluster": list(self.class_to_cluster),
                "names": list(self.names), "n_labels": self.n_labels, "n_unnamed": self.n_unnamed}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassSpace":
        return cls(tuple(int(v) for v in d["cluster_to_class"]), tuple(int(v) for v in d["class_to_cluster"]),
                   tuple(d.get("names", ())), _count(d.get("n_labels")), _count(d.get("n_unnamed")))

    @classmethod
    def of_clusters(cls, clusters: Sequence[tuple[int, Hashable | None, bool]],
                    label_name: Callable[[Hashable], str]) -> "ClassSpace":
        """Classes from (cluster index, label key or None, ignored) per cluster: each label (in
        key order, written as its lowest cluster, named ``label_name(key)``), each unnamed
        cluster, and all ignored clusters as one class."""
        size = max((i for i, _, _ in clusters), default=-1) + 1
        c2c = [-1] * size
        reps: list[int] = []
        names: list[str] = []
        by_label: dict[Hashable, list[int]] = {}
        for i, key, ignored in clusters:
            if key is not None and not ignored:
                by_label.setdefault(key, []).append(i)
        for key in sorted(by_label):
            for i in by_label[key]:
                c2c[i] = len(reps)
            reps.append(min(by_label[key]))
            names.append(label_name(key))
        n_labels = len(reps)
        for i, key, ignored in clusters:
            if key is None and not ignored:
                c2c[i] = len(reps)
                reps.append(i)
                names.append(f"cluster {i}")
        n_unnamed = len(reps) - n_labels
        ignored = [i for i, _, ign in clusters if ign]
        if ignored:
            for i in ignored:
                c2c[i] = len(reps)
            reps.append(min(ignored))
            names.append("ignored")
        return cls(tuple(c2c), tuple(reps), tuple(names), n_labels, n_unnamed)


def correction_seeds(override: np.ndarray, grid: tuple[int, int], n_clusters: int) -> np.ndarray:
    """(h * w,) token seeds of a corrected image from its (H, W) override map: the majority
    cluster of each token's pixels, where the pixels a person left out of every named label
    (``NOT_NAMED``) vote too and make the token ``NOT_NAMED`` when they win; -1 where no pixel
    was corrected."""
    fixed = np.asarray(override, dtype=np.int64)
    votes = np.where(fixed == NOT_NAMED, n_clusters, fixed)
    tokens = downsample_labels(votes, grid, n_clusters + 1).ravel()
    return np.where(tokens == n_clusters, NOT_NAMED, tokens)


class _LabelSource:
    """Item i -> (labels, weights) of its tokens: pseudo-labels of the named clusters, found regions
    and seeds on top. Propagator.fit reads every item LABEL_PASSES times (so nothing corpus-sized is
    kept); progress runs over all passes and the counts are those of the latest read of each item."""

    def __init__(self, n: int, codes_of: Callable[[int], np.ndarray], centroids: np.ndarray, space: ClassSpace,
                 config: RefineConfig, found_of: Callable[[int], np.ndarray | None], seeds: dict[int, np.ndarray],
                 report: Progress, check: Callable[[], bool], corrected: frozenset[int] = frozenset()):
        self.n, self.codes_of, self.centroids, self.config = n, codes_of, centroids, config
        self.corrected = corrected                 # items whose seeds are a person's corrected masks
        self.found_of, self.seeds, self.report, self.check = found_of, seeds, report, check
        self.space = space
        self.c2c = np.asarray(space.cluster_to_class, dtype=np.int64)
        self.counts = np.zeros((n, 3), np.int64)     # per item: labelled, seed and found tokens
        self.reads = 0
        self.finished_at: float | None = None      # when the last read of the second pass ended

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.check():
            raise Cancelled(f"refinement cancelled while labelling item {i}")
        c2c, k = self.c2c, self.centroids.shape[0]
        probs = cluster_probabilities(self.codes_of(i), self.centroids, self.config.pseudo_alpha)
        lab, wt = pseudo_labels(probs, c2c[:k], min_confidence=self.config.min_confidence)
        found = seeded = 0
        fnd = self.found_of(i)
        if fnd is not None:
            hit = fnd >= 0
            lab, wt, found = with_found(lab, wt, self.space.classes_of(fnd), hit)
        if i in self.seeds:
            seed = np.asarray(self.seeds[i]).ravel()
            cls = self.space.classes_of(seed)
            has = cls >= 0
            lab = np.where(has, cls, lab)
            weight = self.config.correction_weight if i in self.corrected else self.config.seed_weight
            wt = np.where(has, weight, wt).astype(np.float32)
            seeded = int(has.sum())
            if self.space.n_labels:          # a person left these tokens out of every named label
                off = (seed == NOT_NAMED) & (lab >= 0) & (lab < self.space.n_labels)
                lab, wt = np.where(off, -1, lab), np.where(off, 0.0, wt).astype(np.float32)
        self.counts[i] = (int((lab >= 0).sum()), seeded, found)
        self.reads += 1
        total = LABEL_PASSES * self.n
        self.report("pseudo-labels", self.reads / total, {"items": min(self.reads, total), "total": total})
        if self.reads >= total:
            self.finished_at = time.perf_counter()
        return lab, wt

    @property
    def stats(self) -> dict:
        total = self.counts.sum(axis=0)
        return {"pseudo_tokens": int(total[0]), "seed_tokens": int(total[1]), "found_tokens": int(total[2])}


def _pixel_head(features: TokenFeatures, space: ClassSpace, image_paths: Sequence[Path],
                overrides: dict[int, np.ndarray], path: Path, config: RefineConfig, check: Callable[[], bool]
                ) -> tuple[PixelHeadArrays, int] | None:
    """The pixel head of the corrected images (core.pixel_head) and how many images taught it:
    loaded from ``path`` when a resumed refinement saved one, else trained on the corrected
    pixels and saved; None when switched off or no corrected image has a learnt class."""
    if config.pixel_head_weight <= 0 or not overrides:
        return None
    targets = {}
    for i in sorted(overrides):
        target = space.classes_of(overrides[i])
        if (target >= 0).any():                  # corrected pixels of a class the names still carry
            targets[i] = target
    if not targets:
        return None
    if path.is_file():
        return PixelHeadArrays.load(path), len(targets)

    def examples():
        for i, target in targets.items():
            if check():
                raise Cancelled(f"refinement cancelled while reading the corrected image {i}")
            yield (np.asarray(features.tokens(i), np.float32).reshape(*features.grid(i), -1),
                   load_image(image_paths[i]), target)
    head = PixelHead(space.n_classes, seed=config.seed).fit(examples())
    head.arrays_.save(path)
    return head.arrays_, len(targets)


def refine(features: TokenFeatures, codes_of: Callable[[int], np.ndarray], centroids: np.ndarray,
           space: ClassSpace, image_paths: Sequence[Path], sizes: Sequence[tuple[int, int]], out_dir: Path,
           config: RefineConfig | None = None, found_of: Callable[[int], np.ndarray | None] | None = None,
           seeds: dict[int, np.ndarray] | None = None, progress: Progress | None = None,
           cancel: Callable[[], bool] | None = None, backbone: Backbone | None = None,
           overrides: dict[int, np.ndarray] | None = None) -> dict:
    """Train, predict and write ``out_dir/{i:06d}.png`` for every item; returns the metrics.

    ``features`` are the backbone tokens (one whole-image item per image, item i = image i),
    ``codes_of(i)`` the (T, D) codes the clusters were made from, ``found_of(i)`` (T,) found
    cluster index per token (-1 = none), ``seeds`` item -> (T,) cluster index per token of a
    person-checked image (-1 = none; ``NOT_NAMED``: no named label's pseudo-label is learnt there),
    ``overrides`` item -> (H, W) cluster index per pixel of a
    person's corrected masks, written over the predicted map (those items' seeds weigh
    ``config.correction_weight``, the others' ``config.seed_weight``); ``core.constants.KEEP_PREDICTION``
    (-1) where the prediction stays, ``NOT_NAMED`` (-2) where it stays among the classes that are
    not named labels (all but the first ``space.n_labels``: unnamed clusters, the ignored ones).
    Progress: (stage, fraction of the whole job, info).
    With ``config.dense`` the maps are predicted on tokens twice as dense, which ``backbone`` (the
    one ``features`` were made with) computes from each image (flip averaging is then left out).
    """
    config = config or RefineConfig()
    config.validate()
    if config.dense and backbone is None:
        raise ValueError("dense refinement computes new tokens from the images: pass the run's backbone")
    if space.n_classes < 2:
        raise ValueError("refinement needs at least two classes (name clusters of two kinds, or leave some unnamed)")
    n = len(features)
    if len(image_paths) != n or len(sizes) != n:
        raise ValueError(f"{n} items but {len(image_paths)} image paths and {len(sizes)} sizes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = cancel or (lambda: False)
    timings: dict[str, float] = {}

    def report(stage: str, frac: float, info: dict) -> None:
        lo, hi = STAGE_SPAN[stage]
        if progress is not None:
            progress(stage, lo + (hi - lo) * min(1.0, max(0.0, frac)), info)

    space_path = out_dir / SPACE
    saved = json.loads(space_path.read_text()) if space_path.is_file() else None
    if saved is not None and ClassSpace.from_dict(saved) != space:
        raise ValueError(f"{out_dir} holds a refinement of other names; use an empty folder")
    if saved is None:
        atomic_write_json(space_path, space.to_dict(), indent=None)
    model_path = out_dir / MODEL
    stats: dict = {}
    if model_path.is_file():
        prop = Propagator.load(model_path)
        report("training", 1.0, {"skipped": True})
    else:
        t0 = time.perf_counter()
        source = _LabelSource(n, codes_of, np.asarray(centroids), space, config, found_of or (lambda i: None),
                              seeds or {}, report, check, frozenset(overrides or ()))

        def on_step(step: int, steps: int, loss: float) -> None:
            report("training", step / max(steps, 1), {"step": step, "steps": steps, "loss": loss})

        prop = config.propagator(space.n_classes).fit(features, source, progress=on_step, cancel=check)
        t1 = source.finished_at or t0
        timings["pseudo-labels"] = round(t1 - t0, 3)
        timings["training"] = round(time.perf_counter() - t1, 3)
        stats = source.stats
        prop.save(model_path)
    pixel = _pixel_head(features, space, image_paths, overrides or {}, out_dir / PIXEL_HEAD, config, check)
    if pixel is not None:
        stats["pixel_head_images"] = pixel[1]
    lut = np.asarray(space.class_to_cluster, dtype=np.int64)
    todo = [i for i in range(n) if not (out_dir / f"{i:06d}.png").is_file()]
    precision = str((getattr(features, "meta", None) or {}).get("precision", "float32"))
    t0 = time.perf_counter()

    def jobs() -> Iterator[ClassMapJob]:
        for i in todo:
            if check():
                return
            h, w = features.grid(i)
            if config.dense:
                tokens, (h, w) = dense_item(backbone, image_paths[i], (h, w), precision)
                views = [tokens]
            else:
                views = token_views(features, i)
            lp = views_log_proba(prop, views)
            extra = {} if pixel is None else dict(
                pixel=pixel[0].project(np.asarray(views[0], np.float32).reshape(h, w, -1)), pixel_arrays=pixel[0],
                pixel_weight=config.pixel_head_weight)
            fixed = (overrides or {}).get(i)
            if fixed is not None and space.n_labels and fixed.shape == (int(sizes[i][0]), int(sizes[i][1])):
                extra.update(ruled_out=fixed == NOT_NAMED, ruled_out_classes=space.n_labels)
            yield ClassMapJob(lp.reshape(h, w, -1), (int(sizes[i][0]), int(sizes[i][1])), image_path=str(image_paths[i]),
                              crf=config.crf, crf_resolution=config.crf_resolution, plain=not config.crf, **extra)

    done = n - len(todo)
    for i, res in zip(todo, ordered_map(class_map, jobs(), config.n_jobs)):
        cls = res.labels_crf if config.crf else res.labels
        out = lut[cls.astype(np.int64)]
        fixed = (overrides or {}).get(i)
        if fixed is not None:
            if fixed.shape != out.shape:
                raise ValueError(f"corrected masks of item {i} are {fixed.shape[::-1]} pixels, its map "
                                 f"{out.shape[::-1]}")
            out = np.where(fixed >= 0, fixed, out)
        write_label_png(out_dir / f"{i:06d}.png", out)
        done += 1
        report("maps", done / n, {"images": done, "total": n})
    if check() and done < n:
        raise Cancelled(f"refinement cancelled after {done} of {n} images")
    timings["maps"] = round(time.perf_counter() - t0, 3)
    return {"n_images": n, "n_classes": space.n_classes, "crf": bool(config.crf), "dense": bool(config.dense),
            "train_tokens": int(getattr(prop, "n_train_tokens_", 0) or 0),
            "final_loss": float(prop.history_[-1]) if getattr(prop, "history_", None) else None,
            "timings": timings, **stats}
