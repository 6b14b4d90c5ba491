"""core.knn: chunked cosine top-k."""
from __future__ import annotations

import numpy as np
import pytest

from core.knn import compute_knn


def _brute(x: np.ndarray, k: int) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_matches_brute_force_whatever_the_chunk(chunk):
    x = np.random.default_rng(0).normal(size=(150, 16)).astype(np.float32)
    got = compute_knn(x, k=10, chunk=chunk)
    assert got.dtype == np.int64 and got.shape == (150, 10)
    np.testing.assert_array_equal(got, _brute(x, 10))


def test_memory_cap_splits_rows_without_changing_the_answer():
    x = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    np.testing.assert_array_equal(compute_knn(x, k=5, max_block_mb=0), _brute(x, 5))


def test_never_its_own_neighbour_even_with_duplicates():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 6))
    x[5] = x[11]
    nn = compute_knn(x, k=3)
    assert not (nn == np.arange(20)[:, None]).any()
    assert nn[5, 0] == 11 and nn[11, 0] == 5


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
