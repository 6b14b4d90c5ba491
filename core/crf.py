"""Dense CRF refinement (pydensecrf) with the STEGO paper's parameters, run in parallel.

Also the per-image job the pipeline and the evaluation hand to worker processes
(``ClusterMapJob`` -> ``cluster_map``: codes at inference resolution to full-resolution
cluster labels, optionally CRF-refined). This module imports neither torch nor anything
heavy, so spawned workers start fast (they do re-import the program's main module, so
scripts should keep heavy imports inside their main function).
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["CRFParams", "dense_crf", "crf_model", "crf_marginals", "crf_short_side", "crf_size", "crf_batch", "iter_crf", "ordered_map",
           "ClusterMapJob", "ClusterMap", "cluster_map", "refine_labels"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class CRFParams:
    """Paper defaults: 10 mean-field iterations, Gaussian (sxy 1, compat 3), bilateral (sxy 67, srgb 3, compat 4)."""

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"CRF iterations must be >= 1, got {self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CRFParams.{name} must be > 0")


def _checked(image: np.ndarray, log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    log_probs = np.asarray(log_probs, dtype=np.float32)
    if log_probs.ndim != 3 or log_probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"log_probs must be (K, H, W) with H, W = {image.shape[:2]}, got {log_probs.shape}")
    return image, log_probs


def _build(image: np.ndarray, log_probs: np.ndarray, params: CRFParams):
    import pydensecrf.densecrf as dcrf

    k, h, w = log_probs.shape
    unary = np.ascontiguousarray(np.minimum(-log_probs, 1e4).reshape(k, -1))
    unary[~np.isfinite(unary)] = 1e4
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    return crf


def crf_model(image: np.ndarray, log_probs: np.ndarray, params: CRFParams = CRFParams()):
    """The pydensecrf ``DenseCRF2D`` of an (H, W, 3) uint8 image and (K, H, W) log-probabilities,
    with the unary and both pairwise terms set, ready for ``inference`` or ``stepInference``."""
    return _build(*_checked(image, log_probs), params)


def crf_marginals(image: np.ndarray, log_probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field marginals (K, H, W) float32 of the dense CRF on an (H, W, 3) uint8 image.

    ``log_probs`` (K, H, W) are per-pixel class log-probabilities; the unary is ``-log p``.
    The spatial parameters (sxy) are in pixels of ``image``.
    """
    image, log_probs = _checked(image, log_probs)
    k, h, w = log_probs.shape
    if k == 1:
        return np.ones((1, h, w), dtype=np.float32)
    return np.asarray(_build(image, log_probs, params).inference(params.iterations),
                      dtype=np.float32).reshape(k, h, w)


def dense_crf(image: np.ndarray, log_probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine per-pixel class log-probabilities (K, H, W) on an (H, W, 3) uint8 image.

    Unary = -log p. Returns (H, W) int32 labels (the argmax of the CRF marginals).
    """
    return crf_marginals(image, log_probs, params).argmax(axis=0).astype(np.int32)


def crf_short_side(crf_resolution: int | None, features_resolution: int) -> int | None:
    """The CRF's short side from a ``crf_resolution`` setting: None = the features' resolution
    (the paper's choice), 0 = each image's full size (returned as None), else that many pixels."""
    if crf_resolution is None:
        return features_resolution
    return crf_resolution or None


def crf_size(height: int, width: int, resolution: int | None) -> tuple[int, int]:
    """(h, w) the CRF runs at: the image scaled so its short side is ``resolution``, never enlarged.

    ``None`` means full resolution. The paper runs its CRF on the inference-size image (short
    side 320), where its pixel parameters (bilateral sxy 67, Gaussian sxy 1) were chosen.
    """
    if resolution is None or min(height, width) <= resolution:
        return int(height), int(width)
    if resolution < 1:
        raise ValueError(f"CRF resolution must be >= 1 pixel, got {resolution}")
    scale = resolution / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _crf_job(args: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    return dense_crf(*args)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], n_jobs: int = 2) -> Iterator[R]:
    """``map(fn, items)`` over ``n_jobs`` worker processes, results in input order.

    ``items`` is consumed lazily with at most ``2 * n_jobs`` in flight, so producing the
    inputs overlaps with the work and memory stays flat in the number of items.
    ``fn`` must be a module-level function. ``n_jobs <= 1`` runs in this process.
    """
    if n_jobs <= 1:
        for item in items:
            yield fn(item)
        return
    # spawn: never fork a process that may hold torch/OpenMP threads or a web server
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx) as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                while len(pending) >= 2 * n_jobs:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def iter_crf(pairs: Iterable[tuple[np.ndarray, np.ndarray]], n_jobs: int = 2,
             params: CRFParams = CRFParams()) -> Iterator[np.ndarray]:
    """Yield dense_crf results for (image, log_probs) pairs in order, over ``n_jobs`` processes."""
    return ordered_map(_crf_job, ((image, lp, params) for image, lp in pairs), n_jobs)


@dataclass(frozen=True)
class ClusterMapJob:
    """Turn a low-resolution code map into full-resolution cluster labels (optionally CRF-refined).

    Everything a worker process needs: no model, only arrays and the image path.
    """

    codes: np.ndarray                 # (h, w, D) codes (or raw features) at inference resolution
    centroids: np.ndarray             # (K, D)
    size: tuple[int, int]             # (H, W) of the full image
    alpha: float = 2.0                # softmax temperature on cosine similarities
    image_path: str | None = None     # needed when crf is True
    crf: bool = False
    crf_resolution: int | None = None # short side the CRF runs at (see crf_size); None = full size
    argmax: bool = True               # also return the plain argmax labels
    params: CRFParams = CRFParams()


@dataclass(frozen=True)
class ClusterMap:
    labels: np.ndarray | None         # (H, W) uint16 argmax of the cluster probabilities
    labels_crf: np.ndarray | None     # (H, W) uint16 after the CRF, when asked
    pixels: np.ndarray                # (K,) int64 pixels per cluster (argmax labels)
    confidence: np.ndarray            # (K,) float64 sum of the max probability over those pixels
    seconds: float = 0.0              # time the job took (worker process)
    crf_seconds: float = 0.0          # of which the CRF (image decode included)


def cluster_map(job: ClusterMapJob) -> ClusterMap:
    """Run one ClusterMapJob (module-level so worker processes can run it)."""
    from core.clustering import cluster_labels, cluster_log_probs

    t0 = time.perf_counter()
    k = int(job.centroids.shape[0])
    lp = None
    if job.crf and crf_size(int(job.size[0]), int(job.size[1]), job.crf_resolution) == tuple(job.size):
        # a CRF at full size needs every pixel's (K, H, W) probabilities at once (crf_resolution 0)
        lp = cluster_log_probs(job.codes, job.centroids, job.size, alpha=job.alpha)
        labels, conf = lp.argmax(axis=0), np.exp(lp.max(axis=0))
    else:                                  # band by band: memory flat in the image's pixels x clusters
        labels, conf = cluster_labels(job.codes, job.centroids, job.size, alpha=job.alpha)
    pixels = np.bincount(labels.ravel(), minlength=k).astype(np.int64)
    confidence = np.bincount(labels.ravel(), weights=conf.ravel(), minlength=k)
    refined = None
    t_crf = time.perf_counter()
    if job.crf:
        if job.image_path is None:
            raise ValueError("a CRF job needs the image path")
        from core.images import load_image

        image = load_image(job.image_path)
        if image.shape[:2] != tuple(job.size):
            raise ValueError(f"{job.image_path} is {image.shape[:2]}, expected {tuple(job.size)}; "
                             "did the file change since its features were extracted?")
        refined = refine_labels(image, job.codes, job.centroids, job.alpha, job.crf_resolution, job.params, lp)
    t1 = time.perf_counter()
    return ClusterMap(labels.astype(np.uint16) if job.argmax else None, refined, pixels, confidence,
                      seconds=t1 - t0, crf_seconds=(t1 - t_crf) if job.crf else 0.0)


def refine_labels(image: np.ndarray, codes: np.ndarray, centroids: np.ndarray, alpha: float,
                  resolution: int | None, params: CRFParams = CRFParams(),
                  full_log_probs: np.ndarray | None = None) -> np.ndarray:
    """(H, W) uint16 CRF-refined cluster labels of ``image`` from its low-resolution ``codes``.

    The CRF runs at ``crf_size(H, W, resolution)``: on the downscaled image with the cluster
    probabilities computed at that size; its marginals are then upsampled bilinearly to (H, W).
    At full size it reuses ``full_log_probs`` when given.
    """
    from core.clustering import cluster_log_probs, upsampled_argmax

    H, W = image.shape[:2]
    h, w = crf_size(H, W, resolution)
    if (h, w) == (H, W):
        lp = full_log_probs if full_log_probs is not None else cluster_log_probs(codes, centroids, (H, W), alpha)
        return crf_marginals(image, lp, params).argmax(axis=0).astype(np.uint16)
    from PIL import Image

    small = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    q = crf_marginals(small, cluster_log_probs(codes, centroids, (h, w), alpha), params)
    return upsampled_argmax(np.moveaxis(q, 0, -1), (H, W)).astype(np.uint16)


def crf_batch(images: Sequence[np.ndarray], log_probs_list: Sequence[np.ndarray], n_jobs: int = 2,
              params: CRFParams = CRFParams()) -> list[np.ndarray]:
    """dense_crf over many images in parallel; results in input order."""
    if len(images) != len(log_probs_list):
        raise ValueError(f"{len(images)} images but {len(log_probs_list)} log-probability maps")
    return list(iter_crf(zip(images, log_probs_list), n_jobs=n_jobs, params=params))
