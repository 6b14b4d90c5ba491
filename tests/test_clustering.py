import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from core.clustering import (CosineKMeans, _cluster_log_probs_direct, bilinear_matrix, cluster_log_probs,
                             sample_tokens, upsample_bilinear)
from core.tokens import ArrayFeatures


def _directions(n_per=200, k=6, dim=10, spread=0.15, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(k), n_per)
    scale = rng.uniform(0.5, 5.0, size=(len(y), 1))  # magnitude must not matter, only direction
    X = (centres[y] + spread * rng.normal(size=(len(y), dim))) * scale
    return X.astype(np.float32), y


def test_recovers_directional_clusters_regardless_of_norm():
    X, y = _directions()
    labels = CosineKMeans(6, seed=0).fit_predict(X)
    assert adjusted_rand_score(y, labels) == pytest.approx(1.0)


def test_stable_across_seeds_and_deterministic_for_a_seed():
    X, y = _directions(k=8, spread=0.25, seed=1)
    single = [CosineKMeans(8, n_init=1, seed=s).fit(X) for s in range(4)]
    runs = [CosineKMeans(8, n_init=5, seed=s).fit(X) for s in range(4)]
    # one restart can land in a worse local optimum; keeping the best of five does not
    assert min(adjusted_rand_score(single[0].predict(X), r.predict(X)) for r in single[1:]) < 0.9
    for r in runs[1:]:
        assert adjusted_rand_score(runs[0].predict(X), r.predict(X)) > 0.98
    again = CosineKMeans(8, n_init=5, seed=2).fit(X)
    np.testing.assert_array_equal(again.centroids_, runs[2].centroids_)


def test_keeps_the_best_of_its_restarts():
    X, _ = _directions(k=8, spread=0.5, seed=2)
    km = CosineKMeans(8, n_init=6, seed=0).fit(X)
    assert km.objective_ == pytest.approx(min(km.objectives_))
    assert np.allclose(np.linalg.norm(km.centroids_, axis=1), 1.0, atol=1e-5)
    sims = km.similarities(X)
    assert sims.shape == (len(X), 8)
    assert km.objective_ == pytest.approx(float(np.mean(1 - sims.max(axis=1))), abs=1e-5)


def test_over_clustering_and_input_validation():
    X, _ = _directions(k=3)
    km = CosineKMeans(12).fit(X)
    assert len(np.unique(km.predict(X))) == 12  # no empty clusters left behind
    with pytest.raises(ValueError, match="lower n_clusters"):
        CosineKMeans(10).fit(X[:5])
    with pytest.raises(ValueError, match="NaN"):
        CosineKMeans(2).fit(np.array([[np.nan, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(RuntimeError, match="fit"):
        CosineKMeans(2).predict(X)


@pytest.mark.parametrize("n_out,n_in", [(37, 5), (480, 34), (7, 7), (3, 9)])
def test_bilinear_matrix_matches_torch_interpolate(n_out, n_in):
    x = np.random.default_rng(0).normal(size=(n_in, 4)).astype(np.float32)
    ours = upsample_bilinear(x[:, None, :].repeat(2, axis=1), (n_out, 2))[:, 0, :]
    ref = F.interpolate(torch.from_numpy(x.T[None, :, :, None]), size=(n_out, 1), mode="bilinear",
                        align_corners=False)[0, :, :, 0].numpy().T
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(bilinear_matrix(n_out, n_in).sum(axis=1), 1.0, atol=1e-6)


def test_cluster_log_probs_full_resolution_and_equal_to_upsampling_the_codes():
    rng = np.random.default_rng(0)
    cent = np.eye(3, 5, dtype=np.float32)
    codes = np.zeros((4, 6, 5), dtype=np.float32)
    codes[:, :3, 0] = 1.0           # left half -> cluster 0
    codes[:, 3:, 2] = 1.0           # right half -> cluster 2
    codes += 0.01 * rng.normal(size=codes.shape).astype(np.float32)
    lp = cluster_log_probs(codes, cent, (40, 60), alpha=10.0)
    assert lp.shape == (3, 40, 60)
    np.testing.assert_allclose(np.exp(lp).sum(axis=0), 1.0, atol=1e-5)
    labels = lp.argmax(axis=0)
    assert (labels[:, :25] == 0).all() and (labels[:, 35:] == 2).all()
    # same as building the full-resolution code map, normalising it and comparing (the slow way)
    np.testing.assert_allclose(_cluster_log_probs_direct(codes, cent, (40, 60), alpha=10.0), lp, atol=1e-5)
    for shape, size in [((23, 30, 70), (360, 480)), ((3, 2, 6), (3, 2)), ((1, 1, 4), (5, 3)), ((4, 9, 8), (2, 5))]:
        c = rng.normal(size=shape).astype(np.float32)
        cen = rng.normal(size=(7, shape[2])).astype(np.float32)
        np.testing.assert_allclose(cluster_log_probs(c, cen, size), _cluster_log_probs_direct(c, cen, size),
                                   atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        cluster_log_probs(codes, np.eye(3, 4, dtype=np.float32), (8, 8))


def test_sample_tokens_is_proportional_and_capped():
    maps = [np.full((4, 5, 3), i, dtype=np.float16) for i in range(3)] + [np.full((10, 10, 3), 9, np.float16)]
    feats = ArrayFeatures(maps)
    all_tokens = sample_tokens(feats, max_tokens=10_000)
    assert all_tokens.shape == (160, 3)
    half = sample_tokens(feats, max_tokens=80, seed=1)
    assert 76 <= len(half) <= 84
    assert (half[:, 0] == 9).sum() == 50  # the big item contributes in proportion to its size
    coded = sample_tokens(feats, max_tokens=80, seed=1, transform=lambda x: x[:, :1] * 2)
    np.testing.assert_array_equal(coded[:, 0], half[:, 0] * 2)


@pytest.mark.parametrize("n_items, budget", [(4, 10_000), (4, 30), (300, 100)])
def test_a_flip_averaging_corpus_is_clustered_on_the_vectors_it_assigns(n_items, budget):
    """A run that averages each image with its mirror assigns the mean of the two views' codes;
    its clusters must be fitted on those means, not on one view (the sampled rows k-means fits)."""
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(3, 4, 2)).astype(np.float32) for _ in range(n_items)]
    feats = ArrayFeatures(maps, flipped=[3 * m for m in maps])      # the mirror's tokens: 3x the image's
    square = lambda x: x ** 2                                       # noqa: E731  (a non-linear "head")
    one_view = sample_tokens(feats, budget, seed=2, transform=square)
    averaged = sample_tokens(feats, budget, seed=2, transform=square, average_flips=True)
    assert len(averaged) == len(one_view)
    np.testing.assert_allclose(averaged, 0.5 * (one_view + 9 * one_view), rtol=1e-6)   # mean of x^2 and (3x)^2
    plain = ArrayFeatures(maps)                                     # no mirror stored: nothing to average
    np.testing.assert_array_equal(sample_tokens(plain, budget, seed=2, transform=square, average_flips=True),
                                  one_view)


def test_full_size_labels_are_made_band_by_band_with_the_same_result(monkeypatch):
    """A large image's per-cluster maps are never held whole: bands give the same labels."""
    import core.clustering as C

    rng = np.random.default_rng(0)
    codes = rng.normal(size=(7, 9, 5)).astype(np.float32)
    cent = rng.normal(size=(6, 5))
    lp = C.cluster_log_probs(codes, cent, (50, 70), alpha=3.0)
    x = rng.normal(size=(7, 9, 4)).astype(np.float32)
    whole = C.upsample_bilinear(x, (50, 70)).argmax(-1)
    monkeypatch.setattr(C, "BAND_VALUES", 500)             # about one row of 70 x 6 per band
    assert len(C.row_bands(50, 70 * 6)) == 50
    labels, conf = C.cluster_labels(codes, cent, (50, 70), alpha=3.0)
    np.testing.assert_array_equal(labels, lp.argmax(0))
    np.testing.assert_allclose(conf, np.exp(lp.max(0)), atol=1e-5)
    np.testing.assert_array_equal(C.upsampled_argmax(x, (50, 70)), whole)
