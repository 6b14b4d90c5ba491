"""Cosine k-nearest-neighbour table of pooled item features, computed in chunks.

Memory is O(rows_per_chunk * N): the similarity block of a chunk of queries against the
whole corpus, never the N x N matrix, and ``torch.topk`` keeps only k columns of it.
100k items x 384 dims fit comfortably (the block is capped at ``max_block_mb``).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def compute_knn(pooled: np.ndarray, k: int = 30, chunk: int = 4096, *, max_block_mb: int = 256) -> np.ndarray:
    """(N, min(k, N-1)) int64: for each row, the indices of its most cosine-similar other rows.

    Most similar first; an item is never its own neighbour. Rows are L2-normalised here, so
    unnormalised input is fine. ``chunk`` is the largest number of query rows per block; the
    block is further limited to ``max_block_mb`` of float32 similarities.
    """
    x = np.asarray(pooled)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"pooled must be a non-empty (N, C) array, got shape {x.shape}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not np.isfinite(x).all():
        raise ValueError("pooled features contain NaN or inf; re-extract the features")
    n = x.shape[0]
    kk = min(int(k), n - 1)
    if kk == 0:
        return np.empty((n, 0), dtype=np.int64)
    feats = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = max(1, min(chunk, (max_block_mb << 20) // (4 * n)))
    out = np.empty((n, kk), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            sims = feats[start:stop] @ feats.T                     # (rows, N)
            idx = torch.arange(start, stop)
            sims[idx - start, idx] = -float("inf")                 # never itself
            out[start:stop] = torch.topk(sims, kk, dim=1, largest=True, sorted=True).indices.numpy()
    return out
