"""Automatic choice of the contrastive loss shifts from the corpus's own feature statistics.

See docs/shifts.md for the reasoning and the CamVid comparison. In short: for a pair kind k
(self, KNN, negative), the loss -mean((F - b_k) * max(S, 0)) pulls the codes of two sampled
locations together when their feature correlation F exceeds b_k and pushes them apart
(down to orthogonal) in proportion to b_k - F when it is below. b_k is therefore a
*correspondence threshold* on F, and raw F values depend on the backbone and the corpus
(DINOv2 tokens correlate around 0.5 on average, DINO ViT-S/8 much lower), so the paper's
numbers do not transfer. This module expresses the threshold in a scale-free way instead:
it samples location pairs of each kind exactly as training does (same sampling, same
pointwise centering) and sets b_k to the quantile of F_k above which each location keeps
on average m partners among the T = ``feature_samples**2`` sampled locations of the other
map (quantile level 1 - m / T). Each location is then attracted to its m best
correspondences, the high-confidence feature matches STEGO builds on, and repelled from the
rest in proportion to how much less they correlate: the loss distils a sparse m-nearest-
neighbour graph of feature correspondences into the codes. The default m = ln(T) is the
usual choice for such graphs: the sparsest k-nearest-neighbour graph that still keeps a
group of points connected (k of order log n; von Luxburg, "A tutorial on spectral
clustering", 2007). No labels are used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from core.constants import FEW_CLUSTERS
from core.head import PAIR_KINDS, centred_feature_correlation
from core.tokens import TokenFeatures

log = logging.getLogger(__name__)

__all__ = ["ShiftEstimator", "PairStats", "pair_correlations", "NEG_ATTRACT_FACTOR", "FEW_CLUSTERS",
           "NEG_ATTRACT_FACTOR_MANY", "auto_neg_factor"]

# Random pairs (an image with a random other image) attract this many times m partners per location: they are
# what aligns the codes of a class across images that are not neighbours (other sequences, other lighting).
# Chosen on CamVid train, confirmed on val (docs/shifts.md, "Random pairs attract more").
NEG_ATTRACT_FACTOR = 6.0
# In over-clustered runs (more than FEW_CLUSTERS) the random pairs attract fewer: 0.3 m partners, about the KNN
# pairs' threshold applied to them. Chosen on CamVid train, confirmed on val (docs/shifts.md, "Few clusters or many").
NEG_ATTRACT_FACTOR_MANY = 0.3


def auto_neg_factor(n_clusters: int) -> float:
    """How many times m partners the random pairs attract in a run of ``n_clusters`` clusters: NEG_ATTRACT_FACTOR
    up to FEW_CLUSTERS, NEG_ATTRACT_FACTOR_MANY above. An over-clustered run, named by a person, keeps finer
    distinctions when random pairs attract little; the extra attraction that aligns a handful of clusters across
    images cost its named clusters and propagated maps on both CamVid splits (docs/shifts.md)."""
    return NEG_ATTRACT_FACTOR if n_clusters <= FEW_CLUSTERS else NEG_ATTRACT_FACTOR_MANY


@dataclass(frozen=True)
class PairStats:
    """Summary of the sampled, centred feature correlations of one pair kind."""

    mean: float
    std: float
    quantiles: dict[str, float]   # "q05", "q25", "q50", "q75", "q95", "q99"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, **self.quantiles}


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


_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _summarise(values: np.ndarray) -> PairStats:
    qs = np.quantile(values, _LEVELS)
    return PairStats(mean=float(values.mean()), std=float(values.std()),
                     quantiles={f"q{int(round(p * 100)):02d}": float(q) for p, q in zip(_LEVELS, qs)})


class ShiftEstimator:
    """Chooses shift_self / shift_knn / shift_neg from unlabelled feature statistics.

    fit() samples location pairs like training does and sets each kind's shift to the
    quantile of its centred feature correlations at level 1 - m_k / feature_samples**2, with
    m = ``attract_per_location`` (None: ln(feature_samples**2)) for the self and KNN pairs and
    m x ``neg_factor`` for the random pairs. ``shifts_`` holds the result, ``stats_`` the per-kind
    summaries, ``attracted_`` the fraction of sampled pairs each shift attracts.
    """

    def __init__(self, attract_per_location: float | None = None, n_items: int = 256, feature_samples: int = 11,
                 num_neighbors: int = 7, batch_size: int = 16, pointwise: bool = True, seed: int = 0,
                 neg_factor: float = NEG_ATTRACT_FACTOR):
        self.attract_per_location = attract_per_location
        self.neg_factor = neg_factor
        self.n_items = n_items
        self.feature_samples = feature_samples
        self.num_neighbors = num_neighbors
        self.batch_size = batch_size
        self.pointwise = pointwise
        self.seed = seed

    @property
    def attract(self) -> float:
        """m: partners attracted per sampled location (default ln T)."""
        if self.attract_per_location is None:
            return float(np.log(self.feature_samples ** 2))
        return float(self.attract_per_location)

    @property
    def level(self) -> float:
        """The quantile level of F used as the shift of the self and KNN pairs."""
        return 1.0 - self.attract / self.feature_samples ** 2

    def levels(self) -> dict[str, float]:
        """The quantile level of F used as each pair kind's shift. Random pairs attract at most half of
        the locations (more would swamp the repulsion and collapse the codes; small T reaches that cap)."""
        t = self.feature_samples ** 2
        return {"self": self.level, "knn": self.level, "neg": max(0.5, 1.0 - self.attract * self.neg_factor / t)}

    def fit(self, features: TokenFeatures, knn: np.ndarray) -> "ShiftEstimator":
        if self.n_items < 2 or self.feature_samples < 1 or self.num_neighbors < 1 or self.batch_size < 2:
            raise ValueError("ShiftEstimator needs n_items >= 2, feature_samples >= 1, "
                             "num_neighbors >= 1 and batch_size >= 2")
        if self.feature_samples < 2 or not 0 < self.attract < self.feature_samples ** 2:
            raise ValueError(f"attract_per_location must be in (0, feature_samples**2 = "
                             f"{self.feature_samples ** 2}) and feature_samples >= 2, "
                             f"got {self.attract_per_location}, {self.feature_samples}")
        if not self.neg_factor > 0:
            raise ValueError(f"neg_factor must be > 0 (random pairs attract neg_factor x m partners), "
                             f"got {self.neg_factor}")
        values = pair_correlations(features, knn, self.n_items, self.feature_samples,
                                   self.num_neighbors, self.batch_size, self.pointwise, self.seed)
        self.stats_ = {k: _summarise(v) for k, v in values.items()}
        levels = self.levels()
        self.shifts_ = {k: round(float(np.quantile(v, levels[k])), 4) for k, v in values.items()}
        self.attracted_ = {k: float((values[k] > self.shifts_[k]).mean()) for k in values}
        log.info("automatic shifts %s (quantile levels %s of the centred feature correlations)",
                 self.shifts_, {k: round(v, 4) for k, v in levels.items()})
        return self
