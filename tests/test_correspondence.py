"""core.correspondence: one location's feature correspondence against the whole corpus, from disk."""
import numpy as np
import pytest

from core.correspondence import CorrespondenceIndex
from core.errors import Cancelled
from tests.conftest import make_planted_corpus


def test_query_finds_the_same_planted_class_in_every_item(tmp_path):
    feats, labels, _ = make_planted_corpus(n_items=12, grid=(6, 8), dim=32, n_classes=3, noise=0.05)
    index = CorrespondenceIndex.build(feats, tmp_path / "idx", dim=8, source="planted")
    assert len(index) == 12 and index.dim == 8 and index.total_tokens == 12 * 48
    again = CorrespondenceIndex.open(tmp_path / "idx")          # on disk, reopened
    assert again.meta["source"] == "planted"
    q = again.vector(0, 2, 1)                                   # item 0, left half = class labels[0][2,1]
    cls = labels[0][2, 1]
    sims = again.similarities(q)
    assert sims.shape == (12 * 48,) and np.all(sims <= 1.0 + 1e-3)
    truth = np.concatenate([lab.ravel() for lab in labels]) == cls
    assert sims[truth].min() > sims[~truth].max()             # a threshold separates the class
    heat = again.item_map(sims, 0)
    assert heat.shape == (6, 8) and heat[2, 1] == pytest.approx(sims[2 * 8 + 1])
    up = again.upsampled_map(sims, 0, (48, 64))
    assert up.shape == (48, 64)
    assert (up[:, :24] > up[:, 40:]).all() if labels[0][0, 0] == cls else True
    cov = again.coverage(sims, float(sims[truth].min()))
    has = np.array([(lab == cls).any() for lab in labels])
    assert np.all(cov[has] > 0) and np.all(cov[~has] == 0)
    best = again.best_items(sims, k=3, exclude=0)
    assert len(best) == 3 and all(i != 0 and labels[i][y, x] == cls for i, _, (y, x) in best)
    assert [s for _, s, _ in best] == sorted((s for _, s, _ in best), reverse=True)
    # a projected raw feature lands in the same space
    raw = np.asarray(feats.tokens(0), dtype=np.float32)[2 * 8 + 1][None]
    assert float(again.project(raw)[0] @ q) > 0.99


def test_errors_and_cancel(tmp_path):
    feats, _, _ = make_planted_corpus(n_items=4, grid=(4, 4), dim=16)
    with pytest.raises(FileNotFoundError, match="build it first"):
        CorrespondenceIndex.open(tmp_path / "none")
    with pytest.raises(Cancelled):
        CorrespondenceIndex.build(feats, tmp_path / "c", dim=4, cancel=lambda: True)
    with pytest.raises(FileNotFoundError):
        CorrespondenceIndex.open(tmp_path / "c")               # a cancelled build leaves no index
    index = CorrespondenceIndex.build(feats, tmp_path / "i", dim=64)
    assert index.dim <= 16
    with pytest.raises(ValueError, match="outside"):
        index.vector(0, 9, 0)
    with pytest.raises(ValueError, match="values"):
        index.similarities(np.ones(3))
    with pytest.raises(IndexError):
        index.item_map(np.zeros(index.total_tokens), 7)
