"""Cosine k-nearest-neighbour table of pooled item features, with FAISS.

Small corpora get an exact inner-product search (``faiss.IndexFlatIP`` on L2-normalised
rows); past ``EXACT_MAX_ITEMS`` items an inverted-file index (``IndexIVFFlat``, ``nlist``
about 4 sqrt(N) cells, ``nprobe`` of them searched per query) is used, and its recall@k is
estimated against exact search on a random sample of queries (logged, and returned with
``return_info=True``). The threshold and the defaults come from ``bench/bench_scale.py``
(bench/results/scale.md): on 100k x 384 items the IVF table takes seconds where exact search
takes over a minute, at recall@30 about 0.99 on clustered features.

Memory: the index holds one float32 copy of the pooled rows (N x C x 4 bytes, 154 MB per
100k items of 384 dims); queries are searched in blocks so the result arrays stay small.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["compute_knn", "KNNInfo", "recall_at_k", "exact_knn_rows", "METHODS", "EXACT_MAX_ITEMS",
           "DEFAULT_NPROBE"]

METHODS = ("auto", "exact", "ivf", "hnsw")
EXACT_MAX_ITEMS = 20_000      # auto: exact search up to this many items (bench_scale: IVF wins past ~20k)
DEFAULT_NPROBE = 16           # IVF cells searched per query
HNSW_M = 32                   # HNSW graph degree
HNSW_EF = 64                  # HNSW efConstruction / efSearch
QUERY_BLOCK = 16_384          # query rows per search call (bounds the (rows, k) result arrays)
TRAIN_SAMPLE_PER_CELL = 40    # IVF k-means trained on at most nlist * this many rows
IVF_TRAIN_ITERATIONS = 10     # its k-means iterations (training dominated the IVF time at 25)


@dataclass(frozen=True)
class KNNInfo:
    """How a table was computed. ``recall_estimate``: mean recall@k of the approximate table
    against exact search on ``recall_queries`` random rows (None for exact search)."""

    method: str
    n: int
    k: int
    seconds: float
    recall_estimate: float | None = None
    recall_queries: int = 0
    nlist: int | None = None
    nprobe: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is in requirements.txt
        raise ImportError("faiss is needed for the KNN table: pip install faiss-cpu "
                          "(the pinned version is in requirements.txt)") from exc
    return faiss


def _validated(pooled: np.ndarray, k) -> np.ndarray:
    x = np.asarray(pooled)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"pooled must be a non-empty (N, C) array, got shape {x.shape}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not np.isfinite(x).all():
        raise ValueError("pooled features contain NaN or inf; re-extract the features")
    return x


def _normalised(x: np.ndarray) -> np.ndarray:
    feats = np.array(x, dtype=np.float32, order="C", copy=True)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return feats


def _drop_self(ids: np.ndarray, rows: np.ndarray, kk: int) -> np.ndarray:
    """(len(rows), kk) from (len(rows), kk+1) search results: the query itself removed (or,
    when it is not among them, e.g. among many exact duplicates, the last result)."""
    is_self = ids == rows[:, None]
    keep = ~is_self
    no_self = ~is_self.any(axis=1)
    keep[no_self, -1] = False
    # a row may list itself twice only if faiss returned duplicates; keep exactly kk per row
    extra = keep.sum(axis=1) - kk
    for r in np.flatnonzero(extra > 0):
        keep[r, np.flatnonzero(keep[r])[kk:]] = False
    return ids[keep].reshape(len(rows), kk)


def _search(index, feats: np.ndarray, kk: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    stop = feats.shape[0] if stop is None else stop
    out = np.empty((stop - start, kk), dtype=np.int64)
    for s in range(start, stop, QUERY_BLOCK):
        e = min(stop, s + QUERY_BLOCK)
        _, ids = index.search(feats[s:e], kk + 1)
        out[s - start:e - start] = _drop_self(ids.astype(np.int64), np.arange(s, e), kk)
    return out


def exact_knn_rows(feats: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k (self excluded) of the given query ``rows`` of unit-norm ``feats``."""
    rows = np.asarray(rows, dtype=np.int64)
    kk = min(int(k), feats.shape[0] - 1)
    sims = feats[rows] @ feats.T
    sims[np.arange(len(rows)), rows] = -np.inf
    part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx_i & exact_i| / k (both (n, k) neighbour tables)."""
    approx, exact = np.asarray(approx), np.asarray(exact)
    if approx.shape != exact.shape:
        raise ValueError(f"tables differ in shape: {approx.shape} vs {exact.shape}")
    if approx.shape[1] == 0:
        return 1.0
    hits = [np.intersect1d(a, e, assume_unique=False).size for a, e in zip(approx, exact)]
    return float(np.mean(hits) / approx.shape[1])


def _build(faiss, feats: np.ndarray, method: str, nprobe: int, seed: int):
    n, d = feats.shape
    if method == "exact":
        index = faiss.IndexFlatIP(d)
        index.add(feats)
        return index, None, None
    if method == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF
        index.add(feats)
        index.hnsw.efSearch = max(HNSW_EF, nprobe)
        return index, None, None
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39 or 1))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.cp.niter = IVF_TRAIN_ITERATIONS
    rng = np.random.default_rng(seed)
    n_train = min(n, nlist * TRAIN_SAMPLE_PER_CELL)
    train = feats if n_train == n else feats[np.sort(rng.choice(n, n_train, replace=False))]
    index.train(train)
    index.add(feats)
    index.nprobe = min(nlist, int(nprobe))
    return index, nlist, index.nprobe


def compute_knn(pooled: np.ndarray, k: int = 30, *, method: str = "auto",
                exact_max_items: int = EXACT_MAX_ITEMS, nprobe: int = DEFAULT_NPROBE, seed: int = 0,
                recall_queries: int = 512, return_info: bool = False):
    """(N, min(k, N-1)) int64: for each row, the indices of its most cosine-similar other rows.

    Most similar first; an item is never its own neighbour. Rows are L2-normalised here, so
    unnormalised input is fine. ``method``: "exact" (FAISS flat inner product), "ivf"
    (IVF-Flat, ``nprobe`` cells per query), "hnsw", or "auto" (exact up to
    ``exact_max_items`` items, IVF beyond). Approximate tables have their recall@k
    estimated on ``recall_queries`` random rows against exact search. With
    ``return_info`` the result is ``(table, KNNInfo)``.
    """
    x = _validated(pooled, k)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if nprobe < 1 or exact_max_items < 0:
        raise ValueError("nprobe must be >= 1 and exact_max_items >= 0")
    n = x.shape[0]
    kk = min(int(k), n - 1)
    t0 = time.perf_counter()
    if kk == 0:
        table = np.empty((n, 0), dtype=np.int64)
        info = KNNInfo("exact", n, 0, 0.0)
        return (table, info) if return_info else table
    chosen = method if method != "auto" else ("exact" if n <= exact_max_items else "ivf")
    faiss = _faiss()
    feats = _normalised(x)
    index, nlist, probes = _build(faiss, feats, chosen, nprobe, seed)
    table = _search(index, feats, kk)
    del index
    missing = np.flatnonzero((table < 0).any(axis=1))
    if missing.size:  # approximate search found fewer than k in the probed cells: exact for those
        log.info("knn: %d rows had fewer than %d candidates; searched exactly", missing.size, kk)
        table[missing] = exact_knn_rows(feats, missing, kk)
    recall, n_q = None, 0
    if chosen != "exact" and recall_queries > 0:
        rng = np.random.default_rng(seed + 1)
        rows = np.sort(rng.choice(n, size=min(n, int(recall_queries)), replace=False))
        recall, n_q = recall_at_k(table[rows], exact_knn_rows(feats, rows, kk)), len(rows)
    info = KNNInfo(chosen, n, kk, round(time.perf_counter() - t0, 3), recall, n_q, nlist, probes)
    log.info("knn: %s over %d items, k=%d in %.1fs%s", chosen, n, kk, info.seconds,
             "" if recall is None else f", estimated recall@{kk} {recall:.4f} ({n_q} queries)")
    return (table, info) if return_info else table
