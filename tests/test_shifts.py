import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from core.clustering import CosineKMeans
from core.shifts import (FEW_CLUSTERS, NEG_ATTRACT_FACTOR, NEG_ATTRACT_FACTOR_MANY, ShiftEstimator, auto_neg_factor,
                         pair_correlations)
from core.tokens import ArrayFeatures
from core.training import PAPER_SHIFTS, StegoTrainer, TrainConfig
from tests.conftest import make_planted_corpus


def _offset(features, offset):
    return ArrayFeatures([features.tokens(i).reshape(*features.grid(i), -1).astype(np.float32) + offset
                          for i in range(len(features))])


def test_shift_attracts_the_requested_share_of_pairs(planted_corpus):
    features, _, knn = planted_corpus
    for m, neg_factor in ((1.0, 1.0), (12.1, 1.0), (4.0, 6.0)):
        est = ShiftEstimator(attract_per_location=m, neg_factor=neg_factor, batch_size=8).fit(features, knn)
        want = {"self": m / 121, "knn": m / 121, "neg": neg_factor * m / 121}
        for kind, frac in est.attracted_.items():
            assert frac == pytest.approx(want[kind], rel=0.15), kind
    default = ShiftEstimator(batch_size=8).fit(features, knn)
    assert default.attract == pytest.approx(np.log(121))  # ln T: sparse but connected correspondence graph
    # random pairs, what aligns a class across images that are not neighbours, attract NEG_ATTRACT_FACTOR x more
    assert default.attracted_["self"] == pytest.approx(np.log(121) / 121, rel=0.15)
    assert default.attracted_["knn"] == pytest.approx(np.log(121) / 121, rel=0.15)
    assert default.attracted_["neg"] == pytest.approx(NEG_ATTRACT_FACTOR * np.log(121) / 121, rel=0.15)
    strict = ShiftEstimator(attract_per_location=1.0, batch_size=8).fit(features, knn).shifts_
    loose = ShiftEstimator(attract_per_location=8.0, batch_size=8).fit(features, knn).shifts_
    assert all(strict[k] > loose[k] for k in strict)
    capped = ShiftEstimator(neg_factor=20, batch_size=8).fit(features, knn)   # never more than half: no collapse
    assert capped.attracted_["neg"] == pytest.approx(0.5, rel=0.1)
    trained = StegoTrainer(TrainConfig(steps=1, batch_size=8, auto_shift_neg_factor=2.0)).fit(features, knn)
    assert trained.shifts == ShiftEstimator(neg_factor=2.0, batch_size=8).fit(features, knn).shifts_


def test_a_run_of_many_clusters_lets_random_pairs_attract_fewer_than_the_others():
    """Few clusters (about the classes): random pairs attract more, aligning a class across images; a run
    over-clustered for a person to name keeps the finer distinctions (docs/shifts.md, "Few clusters or many")."""
    from core.pipeline import PipelineConfig
    from core.settings import RunSettings

    assert auto_neg_factor(11) == auto_neg_factor(FEW_CLUSTERS) == NEG_ATTRACT_FACTOR > 1.0
    assert auto_neg_factor(FEW_CLUSTERS + 1) == auto_neg_factor(88) == NEG_ATTRACT_FACTOR_MANY < 1.0
    for k, factor in ((11, NEG_ATTRACT_FACTOR), (88, NEG_ATTRACT_FACTOR_MANY)):
        cfg = PipelineConfig.from_settings(RunSettings(n_clusters=k, steps=10), backbone="test_tiny")
        assert cfg.train.auto_shift_neg_factor == factor, k


def test_shifts_follow_the_corpus_statistics_not_fixed_numbers(planted_corpus):
    features, _, knn = planted_corpus
    base = ShiftEstimator(batch_size=8).fit(features, knn)
    # a backbone whose tokens share a larger common component correlates more everywhere
    shifted = ShiftEstimator(batch_size=8).fit(_offset(features, 1.0), knn)
    assert all(shifted.stats_[k].mean > base.stats_[k].mean for k in base.stats_)
    assert shifted.shifts_["knn"] > base.shifts_["knn"] and shifted.shifts_["neg"] > base.shifts_["neg"]
    # pairs within an image correlate more than pairs of random other images
    assert base.stats_["self"].mean > base.stats_["neg"].mean
    assert base.shifts_["self"] >= base.shifts_["neg"]
    again = ShiftEstimator(batch_size=8).fit(features, knn)
    assert again.shifts_ == base.shifts_


def test_statistics_use_the_training_centering(planted_corpus):
    features, _, knn = planted_corpus
    values = pair_correlations(features, knn, n_items=16, feature_samples=5, batch_size=8)
    assert set(values) == {"self", "knn", "neg"}
    assert all(v.shape == (16 * 25 * 25,) for v in values.values())
    raw = pair_correlations(features, knn, n_items=16, feature_samples=5, batch_size=8, pointwise=False)
    assert raw["self"].max() <= 1.0 + 1e-5  # plain cosine; the centred version may exceed 1
    assert values["self"].std() < raw["self"].std()


def test_automatic_shifts_beat_the_papers_on_a_differently_scaled_corpus(planted_corpus):
    """The paper's numbers were tuned for DINO ViT-S/8: on features that correlate more, they attract
    nearly every pair and the codes collapse; the automatic shifts adapt."""
    features, labels, knn = planted_corpus
    X = np.concatenate([features.tokens(i).astype(np.float32) for i in range(len(features))])
    y = np.concatenate([lab.ravel() for lab in labels])
    common = dict(steps=60, batch_size=8, code_dim=8, lr=5e-3)
    auto = StegoTrainer(TrainConfig(**common)).fit(features, knn)
    paper = StegoTrainer(TrainConfig(**common, shift_self=PAPER_SHIFTS["self"], shift_knn=PAPER_SHIFTS["knn"],
                                     shift_neg=PAPER_SHIFTS["neg"])).fit(features, knn)
    ari_auto = adjusted_rand_score(y, CosineKMeans(3).fit_predict(auto.encode(X)))
    ari_paper = adjusted_rand_score(y, CosineKMeans(3).fit_predict(paper.encode(X)))
    assert ari_auto > 0.85
    assert ari_paper < 0.5


def test_invalid_settings_are_explained(planted_corpus):
    features, _, knn = planted_corpus
    with pytest.raises(ValueError, match="attract_per_location"):
        ShiftEstimator(attract_per_location=200).fit(features, knn)
    with pytest.raises(ValueError, match="auto_shift_attract"):
        StegoTrainer(TrainConfig(auto_shift_attract=0))
    with pytest.raises(ValueError, match="neg_factor"):
        ShiftEstimator(neg_factor=0).fit(features, knn)
    with pytest.raises(ValueError, match="auto_shift_neg_factor"):
        StegoTrainer(TrainConfig(auto_shift_neg_factor=0))
