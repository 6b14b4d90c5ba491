"""The whole STEGO pipeline for a folder of images, as the app runs it.

Stages: features -> knn -> training -> clustering -> segments -> crf. Every stage writes
its artifacts into the run directory atomically and records itself as finished in
``state.json``; a second ``fit`` in the same directory skips finished stages, resumes
training from its checkpoint and the per-image stages at the first missing image.

Run directory (read by the app without the backbone):
``config.json``, ``images.json``, ``head.pt``, ``centroids.npy``, ``train_history.json``,
the files of a run directory (layout: core.rundir.RunDir).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from core.atomic import atomic_path, atomic_write_json
from core.clustering import CosineKMeans, sample_tokens
from core.constants import STAGES
from core.crf import (ClusterMap, ClusterMapJob, CRFParams, cluster_map, crf_short_side, ordered_map,
                      refine_labels)
from core.errors import Cancelled
from core.features import FeatureConfig, FeatureStore, backbone_forward, extract_features
from core.head import SegmentationHead
from core.precision import resolve_precision
from core.rundir import RunDir
from core.settings import DEFAULTS, RunSettings, SettingsError, auto_steps, check
from core.shifts import auto_neg_factor
from core.tokens import mean_of_views, token_views
from core.training import LEGACY_DEFAULTS, StegoTrainer, TrainConfig, encode_tokens

log = logging.getLogger(__name__)

__all__ = ["PipelineConfig", "StegoPipeline", "RunResult", "STAGES", "item_codes", "peak_rss_mb"]

N_EXAMPLES = 8

Progress = Callable[[str, float, dict], None]


@dataclass
class PipelineConfig:
    """Everything that defines a run. ``device`` is the backbone's; training uses ``train.device``."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    n_clusters: int = DEFAULTS.n_clusters
    crf: bool = DEFAULTS.crf
    crf_resolution: int | None = DEFAULTS.crf_resolution   # CRF short side: None = features' (paper), 0 = full
    checkpoint: str | None = None          # explicit backbone weights file
    device: str = "auto"
    knn_k: int = 30                         # KNN table size (training draws from the top num_neighbors)
    cluster_samples: int = 100_000          # code vectors the k-means is fitted on
    cluster_n_init: int = 20               # k-means restarts (best objective kept; 5 was not enough to be stable)
    alpha: float = DEFAULTS.alpha           # cluster-probe softmax temperature on cosine similarity
    n_jobs: int = 2                         # worker processes for segments and CRF

    def validate(self) -> None:
        for name in ("n_clusters", "crf_resolution", "alpha"):     # the run settings' limits (core.settings)
            try:
                check(name, getattr(self, name))
            except SettingsError as exc:
                raise ValueError(f"PipelineConfig.{name}: {exc}") from None
        try:
            check("resolution", self.features.resolution)
        except SettingsError as exc:
            raise ValueError(f"FeatureConfig.resolution: {exc}") from None
        if self.knn_k < 1 or self.cluster_samples < self.n_clusters or self.cluster_n_init < 1:
            raise ValueError("knn_k and cluster_n_init must be >= 1 and cluster_samples >= n_clusters")
        self.train.validate()

    @property
    def crf_short_side(self) -> int | None:
        """Short side the CRF runs at (None = each image's full size)."""
        return crf_short_side(self.crf_resolution, self.features.resolution)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_settings(cls, settings: RunSettings, *, backbone: str, n_train_items: int | None = None,
                      device: str = "auto", precision: str = "auto", checkpoint: str | None = None,
                      n_jobs: int = 2) -> "PipelineConfig":
        """The pipeline of a run's settings (core.settings) plus where and how it runs.

        ``settings.steps`` None (automatic) needs ``n_train_items``: the images fitted on (five
        per image with five crops), see core.settings.auto_steps.
        """
        settings.validate()
        steps = settings.steps
        if steps is None:
            if n_train_items is None:
                raise ValueError("automatic steps need n_train_items (the number of training items)")
            steps = auto_steps(n_train_items)
        features = FeatureConfig(backbone=backbone, resolution=settings.resolution, crop_mode=settings.crop_mode,
                                 flip=settings.flip, precision=precision)
        train = TrainConfig(code_dim=settings.code_dim, steps=steps, batch_size=settings.batch_size,
                            lr=settings.lr, weight_self=settings.weight_self, weight_knn=settings.weight_knn,
                            weight_neg=settings.weight_neg, shift_self=settings.shift_self,
                            shift_knn=settings.shift_knn, shift_neg=settings.shift_neg, seed=settings.seed,
                            auto_shift_neg_factor=auto_neg_factor(settings.n_clusters), device=device)
        return cls(features=features, train=train, n_clusters=settings.n_clusters, crf=settings.crf,
                   crf_resolution=settings.crf_resolution, alpha=settings.alpha, checkpoint=checkpoint,
                   device=device, n_jobs=max(1, int(n_jobs)))

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        d = dict(d)
        feats = FeatureConfig(**d.pop("features", {}))
        train = TrainConfig(**{**LEGACY_DEFAULTS, **d.pop("train", {})})   # a stored run keeps what it did
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(features=feats, train=train, **{k: v for k, v in d.items() if k in known})


@dataclass
class RunResult:
    """What a finished run reports (also written to ``result.json``)."""

    run_dir: str
    backbone: str
    weights_source: str
    n_images: int
    n_items: int
    n_clusters: int
    resolution: int
    shifts: dict[str, float]
    timings: dict[str, float]
    final_loss: float | None
    crf: bool
    peak_rss_mb: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024, 1)








def item_codes(head: SegmentationHead, store: FeatureStore, i: int) -> np.ndarray:
    """(h, w, D) codes of item i; averaged with the codes of the flipped image when stored."""
    h, w = store.grid(i)
    return mean_of_views([encode_tokens(head, v) for v in token_views(store, i)]).reshape(h, w, -1)


@dataclass
class _Fit:
    """One ``fit`` call: its images, the persisted stage state and what the stages hand on."""

    paths: list[Path]
    state: dict
    report: Progress
    check: Callable[[], bool]
    stores: dict[str, FeatureStore] = field(default_factory=dict)
    knn: np.ndarray | None = None


@dataclass
class _SegmentPass:
    """One pass of the segments or crf stage: the images still to do and the cluster statistics."""

    dir: RunDir
    n: int
    stage: str
    want_argmax: bool
    want_crf: bool
    todo: list[int]
    stats: dict | None
    finished: int = 0
    job_s: float = 0.0
    crf_s: float = 0.0
    last_save: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, rd: RunDir, n: int, k: int, stage: str, crf_on: bool) -> "_SegmentPass":
        want_argmax, want_crf = stage == "segments", stage == "crf" or crf_on
        rd.segments_dir("plain").mkdir(exist_ok=True)
        if want_crf:
            rd.segments_dir("crf").mkdir(exist_ok=True)
        stats = None
        if want_argmax:
            if rd.segment_stats_npz.is_file():
                saved = np.load(rd.segment_stats_npz)
                stats = {"pixels": saved["pixels"], "confidence": saved["confidence"], "done": saved["done"]}
            else:
                stats = {"pixels": np.zeros((n, k), np.int64), "confidence": np.zeros((n, k)),
                         "done": np.zeros(n, bool)}

        def done(i: int) -> bool:
            if want_crf and not rd.segment_path(i, "crf").is_file():
                return False
            return not want_argmax or (rd.segment_path(i, "plain").is_file() and bool(stats["done"][i]))

        todo = [i for i in range(n) if not done(i)]
        return cls(rd, n, stage, want_argmax, want_crf, todo, stats, finished=n - len(todo))

    def add(self, i: int, res: ClusterMap) -> float | None:
        """Write image ``i``'s maps; returns the CRF's share of the job time when both ran."""
        self.job_s, self.crf_s = self.job_s + res.seconds, self.crf_s + res.crf_seconds
        if self.want_crf:
            self.dir.write_segments(i, res.labels_crf, "crf")
        if self.want_argmax:
            self.dir.write_segments(i, res.labels, "plain")
            self.stats["pixels"][i], self.stats["confidence"][i], self.stats["done"][i] = \
                res.pixels, res.confidence, True
            if time.monotonic() - self.last_save > 5.0:
                self.save_stats()
        self.finished += 1
        return self.crf_s / self.job_s if self.want_argmax and self.want_crf and self.job_s > 0 else None

    def save_stats(self) -> None:
        if self.stats is None:
            return
        with atomic_path(self.dir.segment_stats_npz, ".npz") as tmp:
            np.savez(tmp, **self.stats)
        self.last_save = time.monotonic()


class StegoPipeline:
    """Fits STEGO on a list of images and segments them (and new images)."""

    def __init__(self, config: PipelineConfig, run_dir: Path, cache_root: Path, engine=None):
        """``engine``: a ``core.distributed.RayEngine`` for the features and segments/CRF stages
        (None = this process and its local worker pool)."""
        config.validate()
        self.config = config
        self.engine = engine
        self.run_dir = Path(run_dir)
        self.dir = RunDir(self.run_dir)
        self.cache_root = Path(cache_root)
        self.head: SegmentationHead | None = None
        self.centroids: np.ndarray | None = None
        self._backbone = None
        self._crf_share = 0.0        # of the segments pass's time, the CRF's (it runs in that pass)

    # ------------------------------------------------------------------ helpers
    @property
    def _state_path(self) -> Path:
        return self.dir.state_json

    def _load_state(self) -> dict:
        if self._state_path.is_file():
            return json.loads(self._state_path.read_text())
        return {"done": [], "timings": {}, "cache_root": str(self.cache_root)}

    def _save_state(self, state: dict) -> None:
        atomic_write_json(self._state_path, state)

    def backbone(self):
        """The backbone of this run's config (created on first use)."""
        if self._backbone is None:
            from core.backbones import create_backbone

            self._backbone = create_backbone(self.config.features.backbone, checkpoint=self.config.checkpoint,
                                             device=self.config.device, cache_dir=self.cache_root)
        return self._backbone

    def _prepare_run_dir(self, paths: list[Path]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        images = [str(p) for p in paths]
        cfg_path, img_path = self.dir.config_json, self.dir.images_json
        if cfg_path.is_file() or img_path.is_file():
            old_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
            if old_cfg is not None:  # settings added since that run was written take their defaults
                old_cfg = json.loads(json.dumps(PipelineConfig.from_dict(old_cfg).to_dict()))
            old_img = json.loads(img_path.read_text()) if img_path.is_file() else None
            if old_cfg != json.loads(json.dumps(cfg)) or old_img != images:
                raise ValueError(f"{self.run_dir} holds a run with other settings or images; "
                                 "use a new run directory (or delete this one) to start over")
        else:
            atomic_write_json(cfg_path, cfg)
            atomic_write_json(img_path, images)

    # -------------------------------------------------------------------- stages
    def fit(self, image_paths: Sequence[Path], progress: Progress | None = None,
            cancel: Callable[[], bool] | None = None) -> RunResult:
        """Run (or resume) every stage on ``image_paths``; see the module docstring."""
        paths = [Path(p) for p in image_paths]
        if len(paths) < 2:
            raise ValueError(f"a run needs at least 2 images, got {len(paths)}")
        self._prepare_run_dir(paths)
        run = _Fit(paths, self._load_state(), progress or (lambda stage, frac, info: None),
                   cancel or (lambda: False))
        self._reopen_features(run)
        self._stage(run, "features", self._features)
        self._backbone = None  # not needed again in fit; segment() recreates it on demand
        self._stage(run, "knn", self._knn)
        self._stage(run, "training", self._training)
        self.head = self._load_head()
        self._stage(run, "clustering", self._clustering)
        self.centroids = np.load(self.dir.centroids_npy)
        self._stage(run, "segments", lambda r: self._segments(r, "segments"))
        if self.config.crf:
            self._move_crf_share(run.state)
            self._stage(run, "crf", lambda r: self._segments(r, "crf"))
        return self._result(run)

    def _stage(self, run: "_Fit", stage: str, body: Callable[["_Fit"], None]) -> None:
        """Run one stage unless it is done; its time and completion go to state.json."""
        state = run.state
        if stage in state["done"]:
            run.report(stage, 1.0, {"skipped": True})
            return
        if run.check():
            raise Cancelled(f"cancelled before stage {stage}")
        t0 = time.perf_counter()
        run.report(stage, 0.0, {})
        try:
            body(run)
        finally:
            state["timings"][stage] = round(state["timings"].get(stage, 0.0) + time.perf_counter() - t0, 3)
            self._save_state(state)
        state["done"].append(stage)
        self._save_state(state)
        run.report(stage, 1.0, {"seconds": state["timings"][stage]})

    def _reopen_features(self, run: "_Fit") -> None:
        """A resumed run reopens its feature stores; if the cache was cleared, features run again."""
        if "features" not in run.state["done"]:
            return
        try:
            run.stores = {k: FeatureStore.open(Path(v)) for k, v in run.state["stores"].items()}
            if not all(st.complete for st in run.stores.values()):
                raise ValueError("incomplete feature store")
        except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
            log.warning("cached features of %s are gone (%s); extracting them again", self.run_dir, exc)
            run.stores = {}
            run.state["done"] = [d for d in run.state["done"] if d not in ("features", "knn")]

    def _features(self, run: "_Fit") -> None:
        run.stores.update(self._extract(run.paths, run.report, run.check))
        run.state["stores"] = {k: str(v.root) for k, v in run.stores.items()}
        run.state["weights_source"] = run.stores["infer"].meta.get("weights_source", "")

    def _knn(self, run: "_Fit") -> None:
        run.knn = run.stores["train"].knn(self.config.knn_k)
        run.report("knn", 1.0, {"k": int(run.knn.shape[1])})

    def _training(self, run: "_Fit") -> None:
        train_store = run.stores["train"]
        table = run.knn if run.knn is not None else train_store.knn(self.config.knn_k)
        steps = self.config.train.steps

        def on_step(step: int, terms: dict[str, float]) -> None:
            run.report("training", step / max(steps, 1), {"step": step, "steps": steps, **terms})

        trainer = StegoTrainer(self.config.train).fit(
            train_store, table, checkpoint_path=self.dir.train_checkpoint_pt, progress=on_step,
            cancel=run.check)
        self._save_head(trainer)
        run.state["shifts"] = trainer.shifts

    def _clustering(self, run: "_Fit") -> None:
        self.centroids = self._fit_clusters(run.stores["infer"], run.report)
        with atomic_path(self.dir.centroids_npy, ".npy") as tmp:
            np.save(tmp, self.centroids)

    def _move_crf_share(self, state: dict) -> None:
        """The segments pass also ran the CRF: its share of that time becomes the crf stage's own."""
        if self._crf_share and "crf" not in state["done"]:
            moved = round(state["timings"]["segments"] * self._crf_share, 3)
            state["timings"]["segments"] = round(state["timings"]["segments"] - moved, 3)
            state["timings"]["crf"] = round(state["timings"].get("crf", 0.0) + moved, 3)

    def _result(self, run: "_Fit") -> RunResult:
        history = self.dir.read_json(self.dir.train_history_json)
        state = run.state
        result = RunResult(
            run_dir=str(self.run_dir), backbone=self.config.features.backbone,
            weights_source=state.get("weights_source", ""), n_images=len(run.paths),
            n_items=len(run.stores["train"]), n_clusters=self.config.n_clusters,
            resolution=self.config.features.resolution, shifts=state.get("shifts", {}),
            timings=dict(state["timings"]), final_loss=history[-1]["loss"] if history else None,
            crf=self.config.crf, peak_rss_mb=peak_rss_mb())
        atomic_write_json(self.dir.result_json, result.to_dict())
        return result

    def _extract(self, paths: list[Path], report: Progress, check: Callable[[], bool]) -> dict[str, FeatureStore]:
        cfg = self.config.features
        backbone = self.backbone() if self.engine is None else None
        root = self.cache_root / "features"
        # Inference needs whole images; five-crop items are for training only.
        jobs = [("infer", dataclasses.replace(cfg, crop_mode="none"))]
        if cfg.crop_mode != "none":
            jobs.append(("train", dataclasses.replace(cfg, flip=False)))
        out: dict[str, FeatureStore] = {}
        for j, (name, fcfg) in enumerate(jobs):
            def on_batch(done: int, total: int, j: int = j) -> None:
                report("features", (j + done / max(total, 1)) / len(jobs),
                       {"items": done, "total": total, "part": j + 1, "parts": len(jobs)})
            if self.engine is not None:
                out[name] = self.engine.extract_features(paths, fcfg, root, checkpoint=self.config.checkpoint,
                                                         device=self.config.device, weights_cache=self.cache_root,
                                                         progress=on_batch, cancel=check)
                continue
            out[name] = extract_features(paths, backbone, fcfg, root, progress=on_batch, cancel=check)
        out.setdefault("train", out["infer"])
        return out

    def _save_head(self, trainer: StegoTrainer) -> None:
        head = trainer.head
        with atomic_path(self.dir.head_pt) as tmp:
            torch.save({"state_dict": head.state_dict(), "in_dim": head.in_dim, "code_dim": head.code_dim,
                        "shifts": trainer.shifts}, tmp)
        atomic_write_json(self.dir.train_history_json, trainer.history)

    def _load_head(self) -> SegmentationHead:
        saved = torch.load(self.dir.head_pt, map_location="cpu", weights_only=False)
        head = SegmentationHead(saved["in_dim"], saved["code_dim"], dropout=0.0)
        head.load_state_dict(saved["state_dict"])
        return head.eval()

    def _fit_clusters(self, store: FeatureStore, report: Progress) -> np.ndarray:
        cfg = self.config
        head = self.head
        X = sample_tokens(store, cfg.cluster_samples, seed=cfg.train.seed,
                          transform=lambda t: encode_tokens(head, t), average_flips=True)
        report("clustering", 0.3, {"samples": int(X.shape[0])})
        km = CosineKMeans(cfg.n_clusters, n_init=cfg.cluster_n_init, seed=cfg.train.seed).fit(X)
        return km.centroids_

    def _segments(self, run: "_Fit", stage: str) -> None:
        """Per-image cluster maps. With CRF on, the segments stage refines each image in the same
        pass (one image decode and one probability map per image); the crf stage then only
        completes images that lack a refined map (e.g. CRF switched on for an old run)."""
        job = _SegmentPass.start(self.dir, len(run.paths), self.config.n_clusters, stage, self.config.crf)
        store, sizes = run.stores["infer"], run.stores["infer"].image_sizes()

        def jobs() -> Iterator[ClusterMapJob]:
            for i in job.todo:
                if run.check():
                    return
                if store.image_index(i) != i:
                    raise RuntimeError("inference features must hold one whole-image item per image")
                yield ClusterMapJob(codes=item_codes(self.head, store, i), centroids=self.centroids,
                                    size=(int(sizes[i][0]), int(sizes[i][1])), alpha=self.config.alpha,
                                    image_path=str(run.paths[i]), crf=job.want_crf, argmax=job.want_argmax,
                                    crf_resolution=self.config.crf_short_side)

        threads = torch.get_num_threads()
        if self.config.n_jobs > 1:  # the workers have the cores; idle OpenMP threads here would spin
            torch.set_num_threads(1)
        try:
            self._drain(job, jobs(), run.report)
        finally:
            torch.set_num_threads(threads)
        job.save_stats()
        if run.check():
            raise Cancelled(f"{stage} cancelled after {job.finished} of {job.n} images")
        if job.want_argmax:
            self._write_clusters(job.stats)

    def _drain(self, job: "_SegmentPass", jobs: Iterator[ClusterMapJob], report: Progress) -> None:
        """Run the jobs over the worker pool (or the Ray engine) and write each result as it arrives."""
        mapper = self.engine.ordered_map(cluster_map, jobs) if self.engine is not None \
            else ordered_map(cluster_map, jobs, self.config.n_jobs)
        for i, res in zip(job.todo, mapper):
            share = job.add(i, res)
            if share is not None:
                self._crf_share = share
            report(job.stage, job.finished / job.n, {"images": job.finished, "total": job.n, "crf": job.want_crf})

    def _write_clusters(self, stats: dict) -> None:
        pixels = stats["pixels"]                    # (n_images, K)
        per_image = np.maximum(pixels.sum(axis=1, keepdims=True), 1)
        # example score: coverage of the cluster in the image x its mean confidence there
        score = stats["confidence"] / per_image
        total = max(int(pixels.sum()), 1)
        clusters = []
        for c in range(pixels.shape[1]):
            order = [int(i) for i in np.argsort(-score[:, c], kind="stable") if pixels[i, c] > 0]
            clusters.append({"id": c, "pixels": int(pixels[:, c].sum()),
                             "share": round(float(pixels[:, c].sum()) / total, 6),
                             "examples": order[:N_EXAMPLES]})
        atomic_write_json(self.dir.clusters_json, clusters)

    # ------------------------------------------------------------ after fitting
    @classmethod
    def load(cls, run_dir: Path, cache_root: Path | None = None) -> "StegoPipeline":
        """A fitted pipeline from its run directory (head and centroids; backbone on demand)."""
        run_dir = Path(run_dir)
        rd = RunDir(run_dir)
        for path in (rd.config_json, rd.head_pt, rd.centroids_npy):
            if not path.is_file():
                raise FileNotFoundError(f"{run_dir} has no {path.name}: the run has not finished clustering")
        config = PipelineConfig.from_dict(rd.read_json(rd.config_json))
        if cache_root is None:
            state = rd.read_json(rd.state_json) if rd.state_json.is_file() else {}
            cache_root = Path(state.get("cache_root", run_dir / "cache"))
        pipe = cls(config, run_dir, cache_root)
        pipe.head = pipe._load_head()
        pipe.centroids = np.load(rd.centroids_npy)
        return pipe

    def segment(self, image_path: Path, crf: bool = False) -> np.ndarray:
        """(H, W) int32 cluster ids of a new image at its full resolution."""
        from core.images import load_image, resize_rgb, target_size

        if self.head is None or self.centroids is None:
            raise RuntimeError("the pipeline is not fitted: call fit() or StegoPipeline.load()")
        backbone = self.backbone()
        cfg = self.config.features
        rgb = load_image(image_path)
        H, W = rgb.shape[:2]
        oh, ow = target_size(H, W, cfg.resolution, backbone.patch_size, cfg.max_long_side)
        x = backbone.preprocess(resize_rgb(rgb, (oh, ow)))[None].to(backbone.device)
        f, f_flip = backbone_forward(backbone, x, cfg.flip, resolve_precision(cfg.precision, backbone.device))
        h, w = f.shape[1:3]
        codes = encode_tokens(self.head, f[0].cpu().reshape(h * w, -1).numpy())
        if f_flip is not None:
            codes = 0.5 * (codes + encode_tokens(self.head, f_flip[0].cpu().reshape(h * w, -1).numpy()))
        codes = codes.reshape(h, w, -1)
        if crf:
            return refine_labels(rgb, codes, self.centroids, self.config.alpha, self.config.crf_short_side,
                                 CRFParams()).astype(np.int32)
        res: ClusterMap = cluster_map(ClusterMapJob(codes=codes, centroids=self.centroids, size=(H, W),
                                                    alpha=self.config.alpha))
        return res.labels.astype(np.int32)
