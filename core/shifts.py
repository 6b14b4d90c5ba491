"""Automatic choice of the contrastive loss shifts from the corpus's own feature statistics.

See docs/shifts.md for the reasoning. In short: for a pair kind k (self, KNN, negative),
the loss -mean((F - b_k) * max(S, 0)) pulls codes of two locations together when their
feature correlation F exceeds b_k and pushes them apart (to orthogonal) when it is below.
b_k is therefore a *same-segment threshold* on F. This module samples location pairs of
each kind exactly as training does (same sampling, same pointwise centering), and puts
the threshold where the sampled F values split into two groups (Otsu's criterion:
largest between-group variance), separately for each kind. No labels are used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from core.head import PAIR_KINDS, centred_feature_correlation
from core.tokens import TokenFeatures

log = logging.getLogger(__name__)

__all__ = ["ShiftEstimator", "PairStats", "otsu_threshold", "pair_correlations"]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Threshold maximising the between-group variance of a 1-D sample (Otsu, 1979)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("otsu_threshold needs at least one value")
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = values.size - w0
    s0 = np.cumsum(hist * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (float((hist * centres).sum()) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:-1][int(np.argmax(between))])


@dataclass(frozen=True)
class PairStats:
    """Summary of the sampled, centred feature correlations of one pair kind."""

    mean: float
    std: float
    quantiles: dict[str, float]   # "q05", "q25", "q50", "q75", "q95"
    otsu: float
    above_otsu: float             # fraction of sampled pairs the Otsu threshold would attract

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, **self.quantiles, "otsu": self.otsu,
                "above_otsu": self.above_otsu}


def pair_correlations(features: TokenFeatures, knn: np.ndarray, n_items: int = 256,
                      feature_samples: int = 11, num_neighbors: int = 7, batch_size: int = 16,
                      pointwise: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Centred feature correlations F of sampled location pairs, per pair kind.

    Items are processed in batches of ``batch_size`` like training, so the pointwise
    centering (which adds back the batch's global mean) matches what the loss sees.
    """
    n = len(features)
    if n < 2:
        raise ValueError("shift statistics need at least 2 items")
    knn = np.asarray(knn, dtype=np.int64)
    rng = np.random.default_rng(seed)
    items = rng.choice(n, size=min(n_items, n), replace=False)
    t = feature_samples ** 2
    n_nb = min(num_neighbors, knn.shape[1])
    sizes = {}

    def gather(i: int) -> np.ndarray:
        if i not in sizes:
            h, w = features.grid(i)
            sizes[i] = h * w
        pos = rng.integers(0, sizes[i], size=t)
        return np.asarray(features.tokens(i)[pos], dtype=np.float32)

    out: dict[str, list[np.ndarray]] = {k: [] for k in PAIR_KINDS}
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        if len(chunk) < 2:  # a lone leftover item has no negative partner in its batch
            chunk = items[-min(batch_size, len(items)):]
        f = torch.from_numpy(np.stack([gather(int(i)) for i in chunk]))
        partners = knn[chunk, rng.integers(0, n_nb, size=len(chunk))]
        g = torch.from_numpy(np.stack([gather(int(j)) for j in partners]))
        order = rng.permutation(len(chunk))
        perm = np.empty(len(chunk), dtype=np.int64)
        perm[order] = np.roll(order, -1)
        with torch.no_grad():
            out["self"].append(centred_feature_correlation(f, f, pointwise).numpy().ravel())
            out["knn"].append(centred_feature_correlation(f, g, pointwise).numpy().ravel())
            out["neg"].append(centred_feature_correlation(f, f[torch.from_numpy(perm)], pointwise)
                              .numpy().ravel())
    return {k: np.concatenate(v) for k, v in out.items()}


def _summarise(values: np.ndarray) -> PairStats:
    qs = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    thr = otsu_threshold(values)
    return PairStats(mean=float(values.mean()), std=float(values.std()),
                     quantiles={f"q{int(round(p * 100)):02d}": float(q)
                                for p, q in zip([0.05, 0.25, 0.5, 0.75, 0.95], qs)},
                     otsu=thr, above_otsu=float((values > thr).mean()))


class ShiftEstimator:
    """Chooses shift_self / shift_knn / shift_neg from unlabelled feature statistics.

    fit() samples location pairs like training does and sets each kind's shift to the
    Otsu threshold of its centred feature correlations. ``shifts_`` holds the result,
    ``stats_`` the per-kind summaries (for display next to the paper's values).
    """

    def __init__(self, n_items: int = 256, feature_samples: int = 11, num_neighbors: int = 7,
                 batch_size: int = 16, pointwise: bool = True, seed: int = 0):
        self.n_items = n_items
        self.feature_samples = feature_samples
        self.num_neighbors = num_neighbors
        self.batch_size = batch_size
        self.pointwise = pointwise
        self.seed = seed

    def fit(self, features: TokenFeatures, knn: np.ndarray) -> "ShiftEstimator":
        if self.n_items < 2 or self.feature_samples < 1 or self.num_neighbors < 1 or self.batch_size < 2:
            raise ValueError("ShiftEstimator needs n_items >= 2, feature_samples >= 1, "
                             "num_neighbors >= 1 and batch_size >= 2")
        values = pair_correlations(features, knn, self.n_items, self.feature_samples,
                                   self.num_neighbors, self.batch_size, self.pointwise, self.seed)
        self.stats_ = {k: _summarise(v) for k, v in values.items()}
        self.shifts_ = {k: round(s.otsu, 4) for k, s in self.stats_.items()}
        log.info("automatic shifts %s", self.shifts_)
        return self
