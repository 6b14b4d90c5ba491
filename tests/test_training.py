import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from core.clustering import CosineKMeans
from core.errors import Cancelled
from core.training import StegoTrainer, TrainConfig
from tests.conftest import make_planted_corpus

FAST = dict(steps=40, batch_size=8, code_dim=8, lr=5e-3, checkpoint_every=10)


def _flat(features, labels):
    X = np.concatenate([features.tokens(i).astype(np.float32) for i in range(len(features))])
    return X, np.concatenate([lab.ravel() for lab in labels])


def _params(trainer):
    return [p.detach().clone() for p in trainer.head.parameters()]


def test_training_learns_the_planted_classes(planted_corpus):
    features, labels, knn = planted_corpus
    X, y = _flat(features, labels)
    untrained = StegoTrainer(TrainConfig(**{**FAST, "steps": 0})).fit(features, knn)
    trained = StegoTrainer(TrainConfig(**{**FAST, "steps": 80})).fit(features, knn)
    ari_before = adjusted_rand_score(y, CosineKMeans(3).fit_predict(untrained.encode(X)))
    ari_after = adjusted_rand_score(y, CosineKMeans(3).fit_predict(trained.encode(X)))
    assert ari_after > 0.85
    assert ari_after > ari_before + 0.15
    assert len(trained.history) == 80
    assert trained.history[-1]["loss"] < trained.history[0]["loss"]


def test_same_seed_gives_identical_head_and_other_seed_differs(planted_corpus):
    features, _, knn = planted_corpus
    a = StegoTrainer(TrainConfig(**FAST, seed=3)).fit(features, knn)
    b = StegoTrainer(TrainConfig(**FAST, seed=3)).fit(features, knn)
    c = StegoTrainer(TrainConfig(**FAST, seed=4)).fit(features, knn)
    for pa, pb in zip(_params(a), _params(b)):
        assert torch.equal(pa, pb)
    assert a.history == b.history
    assert not all(torch.equal(pa, pc) for pa, pc in zip(_params(a), _params(c)))


def test_progress_reports_every_step_with_loss_terms(planted_corpus):
    features, _, knn = planted_corpus
    seen = []
    StegoTrainer(TrainConfig(**{**FAST, "steps": 5})).fit(features, knn,
                                                          progress=lambda s, t: seen.append((s, t)))
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]
    assert set(seen[0][1]) == {"loss", "self", "knn", "neg"}


def test_cancelled_run_resumes_to_the_same_result(planted_corpus, tmp_path):
    features, _, knn = planted_corpus
    straight = StegoTrainer(TrainConfig(**FAST)).fit(features, knn)

    ckpt = tmp_path / "train.ckpt"
    calls = {"n": 0}

    def cancel_after_17():
        calls["n"] += 1
        return calls["n"] > 17

    with pytest.raises(Cancelled):
        StegoTrainer(TrainConfig(**FAST)).fit(features, knn, checkpoint_path=ckpt, cancel=cancel_after_17)
    assert ckpt.exists() and not ckpt.with_name(ckpt.name + ".tmp").exists()
    assert torch.load(ckpt, weights_only=False)["step"] == 17

    resumed_steps = []
    resumed = StegoTrainer(TrainConfig(**FAST)).fit(features, knn, checkpoint_path=ckpt,
                                                     progress=lambda s, t: resumed_steps.append(s))
    assert resumed_steps[0] == 18 and resumed_steps[-1] == FAST["steps"]
    for pa, pb in zip(_params(straight), _params(resumed)):
        assert torch.equal(pa, pb)
    assert resumed.history == straight.history
    assert resumed.shifts == straight.shifts


def test_finished_checkpoint_is_reused_and_more_steps_extend_it(planted_corpus, tmp_path):
    features, _, knn = planted_corpus
    ckpt = tmp_path / "c.pt"
    first = StegoTrainer(TrainConfig(**FAST)).fit(features, knn, checkpoint_path=ckpt)
    steps = []
    again = StegoTrainer(TrainConfig(**FAST)).fit(features, knn, checkpoint_path=ckpt,
                                                   progress=lambda s, t: steps.append(s))
    assert steps == []
    for pa, pb in zip(_params(first), _params(again)):
        assert torch.equal(pa, pb)
    longer = StegoTrainer(TrainConfig(**{**FAST, "steps": 45})).fit(features, knn, checkpoint_path=ckpt,
                                                                      progress=lambda s, t: steps.append(s))
    assert steps == [41, 42, 43, 44, 45] and longer.step_ == 45


def test_a_run_stored_before_a_setting_existed_resumes_as_it_started(planted_corpus, tmp_path):
    """A run interrupted under an older version (its config and checkpoint lack auto_shift_neg_factor) resumes
    after the upgrade with the behaviour it was started with, not the new default."""
    from core.pipeline import PipelineConfig

    features, _, knn = planted_corpus
    ckpt = tmp_path / "old.pt"
    old = {**FAST, "steps": 12, "auto_shift_neg_factor": 1.0}
    with pytest.raises(Cancelled):
        StegoTrainer(TrainConfig(**old)).fit(features, knn, checkpoint_path=ckpt, cancel=iter([False] * 5 + [True]).__next__)
    state = torch.load(ckpt, weights_only=False)
    del state["config"]["auto_shift_neg_factor"]          # as the older version wrote it
    torch.save(state, ckpt)
    stored = PipelineConfig(train=TrainConfig(**old)).to_dict()
    del stored["train"]["auto_shift_neg_factor"]          # the run's config.json, likewise
    cfg = PipelineConfig.from_dict(stored).train
    assert cfg.auto_shift_neg_factor == 1.0 != TrainConfig().auto_shift_neg_factor
    steps = []
    resumed = StegoTrainer(cfg).fit(features, knn, checkpoint_path=ckpt, progress=lambda s, t: steps.append(s))
    assert steps[0] == 6 and resumed.step_ == 12
    assert resumed.shifts == StegoTrainer(TrainConfig(**old)).fit(features, knn).shifts


def test_checkpoint_of_another_configuration_is_refused(planted_corpus, tmp_path):
    features, _, knn = planted_corpus
    ckpt = tmp_path / "c.pt"
    StegoTrainer(TrainConfig(**{**FAST, "steps": 3})).fit(features, knn, checkpoint_path=ckpt)
    with pytest.raises(ValueError, match="another configuration"):
        StegoTrainer(TrainConfig(**{**FAST, "steps": 3, "code_dim": 9})).fit(features, knn, checkpoint_path=ckpt)


def test_manual_shifts_override_automatic_ones_per_term(planted_corpus):
    features, _, knn = planted_corpus
    auto = StegoTrainer(TrainConfig(**{**FAST, "steps": 1})).fit(features, knn).shifts
    partial = StegoTrainer(TrainConfig(**{**FAST, "steps": 1}, shift_neg=0.9)).fit(features, knn).shifts
    assert partial == {"self": auto["self"], "knn": auto["knn"], "neg": 0.9}
    full = StegoTrainer(TrainConfig(**{**FAST, "steps": 1}, shift_self=0.1, shift_knn=0.2,
                                    shift_neg=0.3)).fit(features, knn).shifts
    assert full == {"self": 0.1, "knn": 0.2, "neg": 0.3}


def test_training_reads_only_cached_tokens_never_a_backbone(planted_corpus):
    features, _, knn = planted_corpus

    class Counting:
        embed_dim = features.embed_dim

        def __init__(self):
            self.calls = 0

        def __len__(self):
            return len(features)

        def grid(self, i):
            return features.grid(i)

        def tokens(self, i, flipped=False):
            self.calls += 1
            return features.tokens(i, flipped)

        def image_index(self, i):
            return i

    counting = Counting()
    StegoTrainer(TrainConfig(**{**FAST, "steps": 3, "batch_size": 4}, shift_self=0.1, shift_knn=0.1,
                             shift_neg=0.1)).fit(counting, knn)
    assert counting.calls == 3 * 2 * 4  # item + KNN partner per batch entry; negatives reuse the batch


def test_invalid_inputs_are_explained():
    with pytest.raises(ValueError, match="batch_size"):
        StegoTrainer(TrainConfig(batch_size=0))
    with pytest.raises(ValueError, match="lr"):
        StegoTrainer(TrainConfig(lr=0))
    features, _, knn = make_planted_corpus(n_items=4)
    with pytest.raises(ValueError, match="knn must be"):
        StegoTrainer(TrainConfig(**FAST)).fit(features, knn[:2])
    with pytest.raises(ValueError, match="item indices"):
        StegoTrainer(TrainConfig(**FAST)).fit(features, knn + 10)
    one, _, _ = make_planted_corpus(n_items=1)
    with pytest.raises(ValueError, match="at least 2"):
        StegoTrainer(TrainConfig(**FAST)).fit(one, np.zeros((1, 1), dtype=np.int64))


def test_checkpoint_by_time_keeps_a_killed_run_close_to_where_it_died(planted_corpus, tmp_path):
    """A process killed between step checkpoints resumes near its last step, not from 0."""
    import time as _time

    features, _, knn = planted_corpus
    cfg = {**FAST, "steps": 60, "checkpoint_every": 1000, "checkpoint_seconds": 0.05}
    straight = StegoTrainer(TrainConfig(**cfg)).fit(features, knn)
    ckpt = tmp_path / "train.ckpt"

    def slow_then_die(step, terms):          # ~0.02 s a step; "kill -9" at step 41
        _time.sleep(0.02)
        if step == 41:
            raise SystemExit("killed")        # no cancel: nothing is saved on the way out

    with pytest.raises(SystemExit):
        StegoTrainer(TrainConfig(**cfg)).fit(features, knn, checkpoint_path=ckpt, progress=slow_then_die)
    saved = torch.load(ckpt, weights_only=False)["step"]
    assert 30 <= saved <= 41, saved            # by steps alone (every 1000) nothing would be saved
    resumed_steps = []
    resumed = StegoTrainer(TrainConfig(**cfg)).fit(features, knn, checkpoint_path=ckpt,
                                                     progress=lambda s, t: resumed_steps.append(s))
    assert resumed_steps[0] == saved + 1
    for pa, pb in zip(_params(straight), _params(resumed)):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        TrainConfig(checkpoint_seconds=-1).validate()
