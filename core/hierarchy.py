"""Clusters arranged as a tree by similarity: groups to name at once and merge suggestions.

Over-clustering (K well above the number of classes a person expects) splits one class into
several clusters. An average-linkage agglomerative tree over the cluster centroids (cosine
distance) puts those pieces next to each other: cutting it gives *groups* a person can name
in one action, and the closest pairs are the "these look alike" suggestions.

    tree = ClusterHierarchy().fit(centroids)
    groups = tree.groups(n_groups=10)            # list of lists of cluster indices, tree order
    pairs = tree.similar_pairs(5)                # [(i, j, cosine similarity), ...] most similar first

Torch-free (numpy + scipy); K is small (<= a few hundred), so everything is exact.
"""
from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["ClusterHierarchy", "default_n_groups", "LINKAGES"]

LINKAGES = ("average", "complete", "single", "weighted")
GROUP_SIZE = 4          # default clusters per group: K = 4 C over-clustering gives ~C groups


def default_n_groups(n_clusters: int, group_size: int = GROUP_SIZE) -> int:
    """Groups to show by default for K clusters: about K / group_size, at least 1."""
    return max(1, min(int(n_clusters), math.ceil(int(n_clusters) / max(1, int(group_size)))))


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ClusterHierarchy:
    """Agglomerative tree over cluster centroids with cosine distance (scikit-learn style).

    ``linkage`` is scipy's method ("average" = UPGMA, the default). After ``fit``:
    ``linkage_`` (K-1, 4) scipy linkage matrix, ``order_`` (K,) leaf order of the dendrogram
    (similar clusters adjacent), ``similarity_`` (K, K) cosine similarity of the centroids.
    """

    def __init__(self, linkage: str = "average"):
        self.linkage = linkage

    def fit(self, centroids: np.ndarray) -> "ClusterHierarchy":
        """Build the tree on (K, D) centroids (rows need not be normalised)."""
        from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
        from scipy.spatial.distance import squareform

        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}")
        X = np.asarray(centroids)
        if X.ndim != 2 or X.shape[0] < 1:
            raise ValueError(f"centroids must be (K, D) with K >= 1, got shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("centroids contain NaN or infinite values")
        k = X.shape[0]
        Xn = _normalize(X)
        sim = np.clip(Xn @ Xn.T, -1.0, 1.0)
        np.fill_diagonal(sim, 1.0)
        self.similarity_ = sim
        self.n_clusters_ = k
        if k == 1:
            self.linkage_ = np.zeros((0, 4))
            self.order_ = np.zeros(1, dtype=np.int64)
            return self
        dist = squareform(np.clip(1.0 - sim, 0.0, 2.0), checks=False)
        Z = linkage(dist, method=self.linkage)
        if k > 2:
            Z = optimal_leaf_ordering(Z, dist)
        self.linkage_ = Z
        self.order_ = leaves_list(Z).astype(np.int64)
        return self

    def _check(self) -> None:
        if not hasattr(self, "linkage_"):
            raise RuntimeError("ClusterHierarchy is not fitted: call fit() first")

    def labels(self, n_groups: int) -> np.ndarray:
        """(K,) group id of each cluster for a cut into ``n_groups`` groups.

        Group ids follow the tree order (group 0 holds the first leaves of ``order_``).
        """
        from scipy.cluster.hierarchy import fcluster

        self._check()
        k = self.n_clusters_
        n = int(n_groups)
        if not 1 <= n <= k:
            raise ValueError(f"n_groups must be between 1 and the number of clusters ({k}), got {n_groups}")
        if k == 1:
            return np.zeros(1, dtype=np.int64)
        raw = fcluster(self.linkage_, t=n, criterion="maxclust")
        out = np.empty(k, dtype=np.int64)
        seen: dict[int, int] = {}
        for leaf in self.order_:
            out[leaf] = seen.setdefault(int(raw[leaf]), len(seen))
        return out

    def groups(self, n_groups: int) -> list[list[int]]:
        """Cluster indices per group, groups in tree order, clusters in tree order within a group."""
        lab = self.labels(n_groups)
        out: list[list[int]] = [[] for _ in range(int(lab.max()) + 1)]
        for leaf in self.order_:
            out[lab[leaf]].append(int(leaf))
        return out

    def cohesion(self, members: list[int]) -> float:
        """Mean pairwise cosine similarity inside a group (1.0 for a single cluster)."""
        self._check()
        idx = np.asarray(members, dtype=np.int64)
        if idx.size < 2:
            return 1.0
        block = self.similarity_[np.ix_(idx, idx)]
        return float((block.sum() - idx.size) / (idx.size * (idx.size - 1)))

    def similar_pairs(self, n: int | None = None, min_similarity: float = -1.0,
                      among: list[int] | None = None) -> list[tuple[int, int, float]]:
        """The most similar cluster pairs (i < j), most similar first.

        ``among`` limits the pairs to those with at least one member in it (e.g. the clusters
        still unnamed). Ties are broken by index, so the list is deterministic.
        """
        self._check()
        k = self.n_clusters_
        iu, ju = np.triu_indices(k, 1)
        s = self.similarity_[iu, ju]
        keep = s >= min_similarity
        if among is not None:
            mask = np.zeros(k, bool)
            mask[np.asarray(list(among), dtype=np.int64)] = True
            keep &= mask[iu] | mask[ju]
        iu, ju, s = iu[keep], ju[keep], s[keep]
        order = np.lexsort((ju, iu, -s))
        if n is not None:
            order = order[: max(0, int(n))]
        return [(int(iu[o]), int(ju[o]), float(s[o])) for o in order]

    def nearest(self, index: int, candidates: list[int]) -> tuple[int, float] | None:
        """The candidate most similar to cluster ``index`` (itself excluded) and its similarity."""
        self._check()
        cand = [int(c) for c in candidates if int(c) != int(index)]
        if not cand:
            return None
        sims = self.similarity_[int(index), cand]
        best = int(np.argmax(sims))
        return cand[best], float(sims[best])

    def naming_actions(self, names: np.ndarray, n_groups: int | None = None) -> int:
        """Actions a person needs to give every cluster its name ``names[k]`` (-1 = left unnamed)
        with the groups of a cut into ``n_groups`` (default ``default_n_groups``).

        Per group the cheaper of: name the whole group with its most common name, then rename each
        member whose name differs; or name each member on its own. The Clusters tab offers both.
        """
        self._check()
        names = np.asarray(names).astype(np.int64).ravel()
        if names.shape[0] != self.n_clusters_:
            raise ValueError(f"{names.shape[0]} names for {self.n_clusters_} clusters")
        n = default_n_groups(self.n_clusters_) if n_groups is None else int(n_groups)
        total = 0
        for members in self.groups(n):
            named = names[members][names[members] >= 0]
            if named.size:
                total += min(int(named.size), 1 + int(named.size) - int(np.bincount(named).max()))
        return total
