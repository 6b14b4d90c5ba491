"""Cosine k-means (the cluster probe) and per-image inference at full resolution.

The STEGO cluster probe (K centroids, hard cosine assignment, loss -mean(max similarity))
is mini-batch spherical k-means. Here it is fitted once, after head training, with full
Lloyd iterations, k-means++ seeding on cosine distance and several restarts; the best
objective wins, so the result no longer swings between runs.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterator

import numpy as np

from core.tokens import TokenFeatures, mean_of_views, token_views

log = logging.getLogger(__name__)

__all__ = ["CosineKMeans", "bilinear_matrix", "upsample_bilinear", "log_softmax_", "cluster_log_probs",
           "sample_tokens", "DEFAULT_ALPHA"]

# Temperature on cosine similarities before the softmax (the paper's cluster probe uses 2).
DEFAULT_ALPHA = 2.0


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CosineKMeans:
    """Spherical k-means: unit-norm centroids, assignment by largest cosine similarity.

    objective_ is the mean cosine distance (1 - max similarity) of the fitted points,
    lower is better; the best of ``n_init`` k-means++ restarts is kept. Deterministic
    for a given ``seed``.
    """

    def __init__(self, n_clusters: int, n_init: int = 20, max_iter: int = 100, tol: float = 1e-5,
                 seed: int = 0):
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed

    def _validate(self, X: np.ndarray) -> np.ndarray:
        if int(self.n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if int(self.n_init) < 1 or int(self.max_iter) < 1:
            raise ValueError("n_init and max_iter must be >= 1")
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
        if X.shape[0] < self.n_clusters:
            raise ValueError(f"{X.shape[0]} samples cannot make {self.n_clusters} clusters: "
                             "lower n_clusters or add images")
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinite values")
        return _normalize(X)

    def _init_pp(self, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k = self.n_clusters
        n = X.shape[0]
        centres = np.empty((k, X.shape[1]), dtype=np.float32)
        centres[0] = X[rng.integers(n)]
        dist = np.clip(1.0 - X @ centres[0], 0.0, None)
        n_trials = 2 + int(math.log(k))
        for j in range(1, k):
            total = float(dist.sum())
            if total <= 0:  # all points coincide with chosen centres: pick any
                cand = rng.integers(n, size=n_trials)
            else:
                cand = np.searchsorted(np.cumsum(dist, dtype=np.float64), rng.random(n_trials) * total)
                cand = np.minimum(cand, n - 1)
            # greedy k-means++: keep the candidate that lowers the total distance most
            cand_d = np.minimum(dist[None, :], np.clip(1.0 - X[cand] @ X.T, 0.0, None))
            best = int(np.argmin(cand_d.sum(axis=1)))
            centres[j] = X[cand[best]]
            dist = cand_d[best]
        return centres

    def _lloyd(self, X: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, float, int]:
        n, k = X.shape[0], self.n_clusters
        prev = np.inf
        it = 0
        for it in range(1, self.max_iter + 1):
            sims = X @ centres.T
            labels = sims.argmax(axis=1)
            best = sims[np.arange(n), labels]
            obj = float(np.mean(1.0 - best))
            onehot = (labels[None, :] == np.arange(k)[:, None]).astype(np.float32)
            sums = onehot @ X
            counts = np.bincount(labels, minlength=k)
            empty = np.flatnonzero(counts == 0)
            if empty.size:  # re-seed empty clusters with the worst-fitted points
                worst = np.argsort(best)[:empty.size]
                sums[empty] = X[worst]
            centres = _normalize(sums)
            if prev - obj < self.tol and not empty.size:
                break
            prev = obj
        sims = X @ centres.T
        return centres, float(np.mean(1.0 - sims.max(axis=1))), it

    def fit(self, X: np.ndarray) -> "CosineKMeans":
        """Fit centroids on X (n_samples, n_features); rows need not be normalised."""
        Xn = self._validate(X)
        rng = np.random.default_rng(self.seed)
        best: tuple[np.ndarray, float, int] | None = None
        objectives = []
        for _ in range(int(self.n_init)):
            result = self._lloyd(Xn, self._init_pp(Xn, rng))
            objectives.append(result[1])
            if best is None or result[1] < best[1] - 1e-9:
                best = result
        self.centroids_, self.objective_, self.n_iter_ = best
        self.objectives_ = objectives
        self.n_features_in_ = Xn.shape[1]
        log.info("cosine k-means K=%d: objectives of %d restarts %s, kept %.5f", self.n_clusters,
                 self.n_init, np.round(objectives, 5).tolist(), self.objective_)
        return self

    def _check_fitted(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "centroids_"):
            raise RuntimeError("CosineKMeans is not fitted: call fit() first")
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must be (n, {self.n_features_in_}), got {X.shape}")
        return _normalize(X)

    def similarities(self, X: np.ndarray) -> np.ndarray:
        """(N, K) cosine similarity of each row of X to each centroid."""
        return self._check_fitted(X) @ self.centroids_.T

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(N,) index of the most similar centroid."""
        return self.similarities(X).argmax(axis=1)

    def fit_predict(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).predict(X)


def log_softmax_(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x`` turned into log-probabilities along ``axis``, in place (returned for chaining)."""
    x -= x.max(axis=axis, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=axis, keepdims=True))
    return x


def _taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for 1-D bilinear resizing, half-pixel centres."""
    scale = n_in / n_out
    src = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0, None)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resizing with half-pixel centres.

    Same as torch's ``F.interpolate(mode="bilinear", align_corners=False)`` per axis.
    """
    i0, i1, frac = _taps(n_out, n_in)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def _resize_cols(x: np.ndarray, w_out: int) -> np.ndarray:
    i0, i1, f = _taps(w_out, x.shape[1])
    f = f[None, :, None]
    return x[:, i0] * (1.0 - f) + x[:, i1] * f


def _resize_rows(x: np.ndarray, rows: slice, h_out: int) -> np.ndarray:
    i0, i1, f = (a[rows] for a in _taps(h_out, x.shape[0]))
    f = f[:, None, None]
    return x[i0] * (1.0 - f) + x[i1] * f


def upsample_bilinear(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize an (h, w, D) map to (H, W, D) float32 (torch semantics, align_corners=False)."""
    cols = _resize_cols(np.asarray(x, dtype=np.float32), int(out_hw[1]))
    return _resize_rows(cols, slice(None), int(out_hw[0]))


BAND_VALUES = 1 << 24   # float32 values of one row band (64 MB): full-size per-class maps are made band by band


def row_bands(height: int, values_per_row: int) -> list[slice]:
    """Row slices of ``height`` rows, each holding at most ``BAND_VALUES`` values (at least one row)."""
    step = max(1, BAND_VALUES // max(1, int(values_per_row)))
    return [slice(r, min(r + step, height)) for r in range(0, height, step)]


def upsampled_bands(x: np.ndarray, out_hw: tuple[int, int]) -> Iterator[tuple[slice, np.ndarray]]:
    """``upsample_bilinear(x, out_hw)`` of an (h, w, K) ``x`` in row bands: (rows, (len(rows), W, K)
    float32) pairs, each band of at most ``BAND_VALUES`` values made from the source rows it reads
    only, so a 24-megapixel image with 88 classes never holds its (H, W, K) map (8 GB)."""
    H, W = int(out_hw[0]), int(out_hw[1])
    x = np.asarray(x, dtype=np.float32)
    i0, i1, f = _taps(H, x.shape[0])
    for rows in row_bands(H, W * x.shape[-1]):
        lo, hi = int(i0[rows].min()), int(i1[rows].max()) + 1     # the source rows this band reads
        cols = _resize_cols(x[lo:hi], W)                          # (hi - lo, W, K)
        fr = f[rows][:, None, None]
        yield rows, cols[i0[rows] - lo] * (1.0 - fr) + cols[i1[rows] - lo] * fr


def upsampled_argmax(x: np.ndarray, out_hw: tuple[int, int],
                     fix: Callable[[np.ndarray, slice], None] | None = None) -> np.ndarray:
    """(H, W) argmax over the last axis of ``upsample_bilinear(x, out_hw)`` for an (h, w, K) ``x``,
    made band by band (``upsampled_bands``). ``fix(band, rows)`` may change each (rows, W, K) band in
    place before its argmax."""
    out = np.empty((int(out_hw[0]), int(out_hw[1])), dtype=np.int64)
    for rows, band in upsampled_bands(x, out_hw):
        if fix is not None:
            fix(band, rows)
        out[rows] = band.argmax(axis=-1)
    return out


def cluster_labels(codes: np.ndarray, centroids: np.ndarray, out_hw: tuple[int, int],
                   alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W) int64, confidence (H, W) float32): the argmax and the largest probability of
    ``cluster_log_probs``, made band by band (its (K, H, W) map is never built)."""
    h, w, d = codes.shape
    cent = _normalize(centroids)
    if cent.shape[1] != d:
        raise ValueError(f"codes have {d} channels but centroids {cent.shape[1]}")
    H, W = int(out_hw[0]), int(out_hw[1])
    labels = np.empty((H, W), dtype=np.int64)
    conf = np.empty((H, W), dtype=np.float32)
    for rows, logits in upsampled_bands(np.asarray(codes, dtype=np.float32) @ cent.T, (H, W)):   # (b, W, K)
        logits *= (alpha / np.sqrt(_upsampled_sq_norms(codes, H, W, rows))).astype(np.float32)[..., None]
        labels[rows] = logits.argmax(axis=-1)
        logits -= logits.max(axis=-1, keepdims=True)
        conf[rows] = 1.0 / np.exp(logits).sum(axis=-1)
    return labels, conf


def _upsampled_sq_norms(codes: np.ndarray, H: int, W: int, rows: slice = slice(None)) -> np.ndarray:
    """(H, W) squared L2 norm of the bilinearly upsampled code at every pixel (of ``rows``), exactly.

    A pixel's code is w00*P00 + w01*P01 + w10*P10 + w11*P11 over its 2x2 source cells, so
    its squared norm needs only the inner products of neighbouring cells, computed once at
    the low resolution: no (H, W, D) array is ever built.
    """
    c = np.asarray(codes, dtype=np.float64)
    h, w = c.shape[:2]
    right = np.minimum(np.arange(w) + 1, w - 1)
    down = np.minimum(np.arange(h) + 1, h - 1)
    S = np.einsum("ijd,ijd->ij", c, c)                          # |c[i,j]|^2
    R = np.einsum("ijd,ijd->ij", c, c[:, right])                # c[i,j] . c[i,j+1]
    Dn = np.einsum("ijd,ijd->ij", c, c[down])                   # c[i,j] . c[i+1,j]
    E = np.einsum("ijd,ijd->ij", c, c[down][:, right])          # c[i,j] . c[i+1,j+1]
    Fd = np.einsum("ijd,ijd->ij", c[:, right], c[down])         # c[i,j+1] . c[i+1,j]
    i0, i1, fy = (a[rows] for a in _taps(H, h))
    j0, j1, fx = _taps(W, w)
    a0, a1 = i0[:, None], i1[:, None]
    b0, b1 = j0[None, :], j1[None, :]
    fy, fx = fy[:, None].astype(np.float64), fx[None, :].astype(np.float64)
    w00, w01, w10, w11 = (1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx
    sq = (w00 ** 2 * S[a0, b0] + w01 ** 2 * S[a0, b1] + w10 ** 2 * S[a1, b0] + w11 ** 2 * S[a1, b1]
          + 2 * (w00 * w01 * R[a0, b0] + w10 * w11 * R[a1, b0] + w00 * w10 * Dn[a0, b0]
                 + w01 * w11 * Dn[a0, b1] + w00 * w11 * E[a0, b0] + w01 * w10 * Fd[a0, b0]))
    return np.maximum(sq, 1e-24)


def cluster_log_probs(codes: np.ndarray, centroids: np.ndarray, out_hw: tuple[int, int],
                      alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """(K, H, W) float32 log-probabilities of each cluster at every pixel.

    Equivalent to: upsample the codes (h, w, D) bilinearly to ``out_hw``, L2-normalise each
    pixel's code, take its cosine similarity to each unit centroid, and apply
    ``log_softmax(alpha * similarity)`` over clusters. Computed without building the
    (H, W, D) map: the dot products with the centroids are linear, so they are taken at
    the low resolution and upsampled (K channels instead of D), and the per-pixel norms of
    the upsampled codes come exactly from neighbouring cells' inner products.
    """
    h, w, d = codes.shape
    cent = _normalize(centroids)
    if cent.shape[1] != d:
        raise ValueError(f"codes have {d} channels but centroids {cent.shape[1]}")
    H, W = int(out_hw[0]), int(out_hw[1])
    dots = np.asarray(codes, dtype=np.float32) @ cent.T                  # (h, w, K)
    up = upsample_bilinear(dots, (H, W))                                 # (H, W, K)
    logits = np.moveaxis(up, -1, 0)                                      # (K, H, W) view
    logits = logits * (alpha / np.sqrt(_upsampled_sq_norms(codes, H, W))).astype(np.float32)
    return np.ascontiguousarray(log_softmax_(logits, axis=0), dtype=np.float32)


def _cluster_log_probs_direct(codes: np.ndarray, centroids: np.ndarray, out_hw: tuple[int, int],
                              alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Reference implementation of cluster_log_probs (builds the full (H, W, D) map)."""
    up = upsample_bilinear(codes, out_hw)
    up /= np.maximum(np.linalg.norm(up, axis=-1, keepdims=True), 1e-12)
    logits = log_softmax_(alpha * (up @ _normalize(centroids).T))
    return np.moveaxis(logits, -1, 0).astype(np.float32)


def sample_tokens(features: TokenFeatures, max_tokens: int = 100_000, seed: int = 0,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  average_flips: bool = False) -> np.ndarray:
    """Up to ``max_tokens`` token rows drawn evenly over items (float32).

    Each item contributes in proportion to its token count. ``transform`` (e.g. the
    head's encoder) maps sampled (t, C) token rows to (t, D) before stacking; it must act
    row by row (corpora with more items than ``max_tokens`` transform rows of several
    items at once). Memory is O(max_tokens) whatever the corpus size: with more items
    than ``max_tokens``, positions are drawn uniformly over all tokens instead of at least
    one per item (which would return one row per item).

    ``average_flips``: where the features hold flipped copies (``has_flip``), each row is the mean
    of the transformed token and its flipped copy, the vectors a flip-averaging run assigns to
    clusters (``core.pipeline.item_codes``), so its clusters are fitted on what they are assigned.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    rng = np.random.default_rng(seed)
    n = len(features)
    sizes = np.fromiter((h * w for h, w in (features.grid(i) for i in range(n))), dtype=np.int64, count=n)

    def rows(i: int, pos) -> list[np.ndarray]:
        return token_views(features, i, pos, flips=average_flips)

    def mapped(xs: list[np.ndarray]) -> np.ndarray:
        return mean_of_views([transform(x) if transform is not None else x for x in xs])

    if n > max_tokens:
        return _sample_uniform(sizes, max_tokens, rng, rows, mapped)
    frac = min(1.0, max_tokens / max(int(sizes.sum()), 1))
    parts = []
    for i in range(n):
        t = int(min(sizes[i], max(1, round(sizes[i] * frac))))
        pos = np.sort(rng.choice(sizes[i], size=t, replace=False)) if t < sizes[i] else slice(None)
        parts.append(mapped(rows(i, pos)))
    return np.concatenate(parts)


def _sample_uniform(sizes: np.ndarray, max_tokens: int, rng: np.random.Generator,
                    rows: Callable[[int, np.ndarray], list[np.ndarray]],
                    mapped: Callable[[list[np.ndarray]], np.ndarray], block: int = 16_384) -> np.ndarray:
    """``max_tokens`` distinct token positions uniform over the whole corpus, read item by item
    (``rows(i, pos)``: the item's views at those positions; ``mapped``: the views to one row each)."""
    ends = np.cumsum(sizes)
    picks = np.sort(rng.choice(int(ends[-1]), size=max_tokens, replace=False))
    items = np.searchsorted(ends, picks, side="right")
    local = picks - (ends[items] - sizes[items])
    bounds = np.flatnonzero(np.diff(items)) + 1
    out: np.ndarray | None = None
    pending: list[list[np.ndarray]] = []    # per item read: its views
    filled = 0

    def flush() -> None:
        nonlocal out, filled
        y = mapped([np.concatenate(v) for v in zip(*pending)])
        pending.clear()
        if out is None:
            out = np.empty((max_tokens, y.shape[1]), dtype=np.float32)
        out[filled:filled + len(y)] = y
        filled += len(y)

    count = 0
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(picks)]):
        pending.append(rows(int(items[lo]), local[lo:hi]))
        count += hi - lo
        if count >= block:
            flush()
            count = 0
    if pending:
        flush()
    return out
