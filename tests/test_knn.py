"""core.knn: FAISS cosine top-k (exact, IVF, HNSW) against brute force and the former torch search."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.knn import compute_knn, exact_knn_rows, recall_at_k


def _brute(x: np.ndarray, k: int) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def _torch_chunked(pooled: np.ndarray, k: int, rows: int = 512) -> np.ndarray:
    """The hand-written chunked search that core.knn used before FAISS (reference)."""
    feats = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32))
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = feats.shape[0]
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = feats[start:stop] @ feats.T
        idx = torch.arange(start, stop)
        sims[idx - start, idx] = -float("inf")
        out[start:stop] = torch.topk(sims, k, dim=1, largest=True, sorted=True).indices.numpy()
    return out


def _clustered(n: int, d: int = 48, centres: int = 40, seed: int = 0) -> np.ndarray:
    """Pooled-feature-like rows: clusters in a low-dimensional subspace plus noise."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(8, d))
    z = rng.normal(size=(centres, 8))[rng.integers(centres, size=n)] + 0.5 * rng.normal(size=(n, 8))
    return (z @ basis + 0.3 * rng.normal(size=(n, d)) + 2.0).astype(np.float32)


def test_exact_matches_brute_force():
    x = np.random.default_rng(0).normal(size=(150, 16)).astype(np.float32)
    got = compute_knn(x, k=10, method="exact")
    assert got.dtype == np.int64 and got.shape == (150, 10)
    np.testing.assert_array_equal(got, _brute(x, 10))


def test_exact_equals_the_former_torch_search():
    x = _clustered(3000)
    got, info = compute_knn(x, k=30, return_info=True)        # auto: exact at this size
    ref = _torch_chunked(x, 30)
    assert info.method == "exact" and info.recall_estimate is None
    diff = got != ref
    if diff.any():  # only swaps between neighbours whose similarities tie to float32 rounding
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        r, c = np.nonzero(diff)
        s_got = np.einsum("ij,ij->i", xn[r], xn[got[r, c]])
        s_ref = np.einsum("ij,ij->i", xn[r], xn[ref[r, c]])
        np.testing.assert_allclose(s_got, s_ref, atol=2e-6)
    assert diff.mean() < 1e-3


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_approximate_tables_have_high_recall_and_report_it(method):
    x = _clustered(4000, seed=1)
    exact = compute_knn(x, k=10, method="exact")
    approx, info = compute_knn(x, k=10, method=method, nprobe=8, return_info=True, recall_queries=400)
    assert approx.shape == exact.shape and approx.dtype == np.int64
    assert not (approx == np.arange(len(x))[:, None]).any()
    assert (approx >= 0).all()
    true_recall = recall_at_k(approx, exact)
    assert true_recall > 0.9
    assert info.method == method and info.recall_queries == 400
    assert abs(info.recall_estimate - true_recall) < 0.05      # the sampled estimate is honest


def test_auto_switches_to_ivf_past_the_threshold():
    x = _clustered(1200, seed=2)
    _, small = compute_knn(x, k=5, exact_max_items=5000, return_info=True)
    _, large = compute_knn(x, k=5, exact_max_items=1000, return_info=True)
    assert small.method == "exact" and large.method == "ivf" and large.nlist >= 1


def test_exact_knn_rows_agrees_with_the_table():
    x = _clustered(500, seed=3)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    rows = np.array([0, 17, 499])
    np.testing.assert_array_equal(exact_knn_rows(xn, rows, 7), compute_knn(x, k=7, method="exact")[rows])


def test_never_its_own_neighbour_even_with_duplicates():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 6))
    x[5] = x[11]
    nn = compute_knn(x, k=3)
    assert not (nn == np.arange(20)[:, None]).any()
    assert nn[5, 0] == 11 and nn[11, 0] == 5
    many = np.ones((12, 4))                                       # all identical: self may fall out of top k+1
    nn = compute_knn(many, k=3)
    assert nn.shape == (12, 3) and not (nn == np.arange(12)[:, None]).any()


def test_scale_invariant_and_k_clamped():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4))
    scaled = x * rng.uniform(0.1, 10, size=(6, 1))
    np.testing.assert_array_equal(compute_knn(x, k=30), compute_knn(scaled, k=30))
    assert compute_knn(x, k=30).shape == (6, 5)
    assert compute_knn(x[:1], k=30).shape == (1, 0)


def test_invalid_input_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        compute_knn(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="k must be"):
        compute_knn(np.ones((3, 2)), k=0)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        compute_knn(np.ones(5))
    with pytest.raises(ValueError, match="method"):
        compute_knn(np.ones((3, 2)), method="annoy")
