import json
import shutil

import numpy as np
import pytest
from PIL import Image

from core.errors import Cancelled
from core.features import FeatureConfig
from core.pipeline import STAGES, PipelineConfig, StegoPipeline
from core.rundir import RunDir
from core.training import TrainConfig

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 220]], dtype=np.uint8)


def _write_images(folder, n=6, seed=0):
    """PNG scenes of two colour regions (different sizes), so clusters follow the colours."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (40, 56) if i % 2 else (48, 40)
        lab = np.full((h, w), i % 3)
        lab[h // 2:] = (i + 1) % 3
        img = COLOURS[lab].astype(np.int16) + rng.integers(-12, 12, size=(h, w, 3))
        p = folder / f"img{i}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def _config(steps=6, crf=True, n_jobs=1):
    return PipelineConfig(features=FeatureConfig(backbone="test_tiny", resolution=32, batch_size=4),
                          train=TrainConfig(steps=steps, batch_size=4, code_dim=8, checkpoint_every=2,
                                            feature_samples=4),
                          n_clusters=3, crf=crf, device="cpu", cluster_samples=2000, n_jobs=n_jobs)


def test_fit_writes_every_artifact_the_app_reads(tmp_path):
    paths = _write_images(tmp_path / "imgs")
    events = []
    pipe = StegoPipeline(_config(n_jobs=2), tmp_path / "run", tmp_path / "cache")
    result = pipe.fit(paths, progress=lambda s, f, i: events.append((s, f, dict(i))))
    run = tmp_path / "run"
    for name in ("config.json", "head.pt", "centroids.npy", "train_history.json", "clusters.json",
                 "result.json"):
        assert (run / name).is_file(), name
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            w, h = im.size
        for sub in ("segments", "segments_crf"):
            seg = RunDir(run).read_segments(i, "crf" if sub == "segments_crf" else "plain")
            assert seg.shape == (h, w) and seg.min() >= 0 and seg.max() < 3
    clusters = json.loads((run / "clusters.json").read_text())
    assert [c["id"] for c in clusters] == [0, 1, 2]
    assert sum(c["share"] for c in clusters) == pytest.approx(1.0, abs=1e-4)
    total = sum(c["pixels"] for c in clusters)
    assert total == sum(RunDir(run).read_segments(i).size for i in range(len(paths)))
    for c in clusters:  # every example image really shows its cluster
        for img in c["examples"]:
            assert (RunDir(run).read_segments(img) == c["id"]).any()
    assert np.load(run / "centroids.npy").shape == (3, 8)
    # progress: stages in order, fractions in [0, 1], loss terms during training
    stages_seen = list(dict.fromkeys(s for s, _, _ in events))
    assert stages_seen == list(STAGES)
    assert all(0.0 <= f <= 1.0 for _, f, _ in events)
    train_info = [i for s, _, i in events if s == "training" and "step" in i]
    assert train_info[-1]["step"] == 6 and "loss" in train_info[-1] and "neg" in train_info[-1]
    saved = json.loads((run / "result.json").read_text())
    assert saved["n_images"] == 6 and set(saved["timings"]) == set(STAGES)
    # the CRF runs inside the segments pass; it still gets its own time, not 0.0 s
    assert saved["timings"]["crf"] > 0.001 and saved["timings"]["segments"] > 0
    assert saved["weights_source"].startswith("random init") and result.n_clusters == 3


def test_clusters_follow_the_image_content(tmp_path):
    paths = _write_images(tmp_path / "imgs")
    pipe = StegoPipeline(_config(crf=False), tmp_path / "run", tmp_path / "cache")
    pipe.fit(paths)
    # the two halves of each image have different colours: they should get different clusters
    differs = 0
    for i, p in enumerate(paths):
        seg = RunDir(tmp_path / "run").read_segments(i)
        h = seg.shape[0]
        top = np.bincount(seg[: h // 3].ravel()).argmax()
        bottom = np.bincount(seg[-h // 3:].ravel()).argmax()
        differs += int(top != bottom)
    assert differs >= 5


def test_cancel_then_resume_skips_finished_stages_and_continues_training(tmp_path):
    paths = _write_images(tmp_path / "imgs")
    run = tmp_path / "run"
    steps_seen = []

    def cancel():
        return len(steps_seen) >= 3

    def progress(stage, frac, info):
        if stage == "training" and "step" in info:
            steps_seen.append(info["step"])

    with pytest.raises(Cancelled):
        StegoPipeline(_config(), run, tmp_path / "cache").fit(paths, progress=progress, cancel=cancel)
    assert (run / "train_checkpoint.pt").is_file() and not (run / "head.pt").exists()

    shutil.rmtree(tmp_path / "cache" / "features")  # the feature cache was cleared meanwhile
    events = []
    StegoPipeline(_config(), run, tmp_path / "cache").fit(paths, progress=lambda s, f, i: events.append((s, i)))
    assert ("features", {"skipped": True}) not in events  # extracted again
    resumed_steps = [i["step"] for s, i in events if s == "training" and "step" in i]
    assert resumed_steps[0] > 1 and resumed_steps[-1] == 6
    assert len(list((run / "segments_crf").glob("*.png"))) == len(paths)

    events = []  # a finished run: every stage is skipped
    StegoPipeline(_config(), run, tmp_path / "cache").fit(paths, progress=lambda s, f, i: events.append((s, i)))
    assert events == [(stage, {"skipped": True}) for stage in STAGES]

    # a run directory is tied to its settings
    with pytest.raises(ValueError, match="new run directory"):
        StegoPipeline(_config(steps=7), run, tmp_path / "cache").fit(paths)

    # a run written before a setting existed (here crf_resolution and the features' precision)
    # still resumes: the missing settings take their defaults
    cfg = json.loads((run / "config.json").read_text())
    del cfg["crf_resolution"], cfg["features"]["precision"]
    (run / "config.json").write_text(json.dumps(cfg))
    events = []
    StegoPipeline(_config(), run, tmp_path / "cache").fit(paths, progress=lambda s, f, i: events.append((s, i)))
    assert events == [(stage, {"skipped": True}) for stage in STAGES]


def test_loaded_pipeline_segments_a_new_image_like_the_run_did(tmp_path):
    paths = _write_images(tmp_path / "imgs")
    StegoPipeline(_config(crf=False), tmp_path / "run", tmp_path / "cache").fit(paths)
    pipe = StegoPipeline.load(tmp_path / "run")
    seg = pipe.segment(paths[1])
    stored = RunDir(tmp_path / "run").read_segments(1)
    assert seg.shape == stored.shape
    assert (seg == stored).mean() > 0.98
    new = _write_images(tmp_path / "new", n=1, seed=5)[0]
    refined = pipe.segment(new, crf=True)
    assert refined.shape == (48, 40) and refined.max() < 3


def test_invalid_configuration_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="n_clusters"):
        StegoPipeline(PipelineConfig(n_clusters=1), tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ValueError, match="crf_resolution"):
        StegoPipeline(PipelineConfig(crf_resolution=-1), tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ValueError, match="at least 2 images"):
        StegoPipeline(_config(), tmp_path / "run", tmp_path / "cache").fit([tmp_path / "a.png"])
    with pytest.raises(FileNotFoundError, match="has not finished"):
        StegoPipeline.load(tmp_path / "nothing")


def test_crf_runs_at_the_features_resolution_unless_told_otherwise():
    cfg = PipelineConfig(features=FeatureConfig(resolution=224))
    assert cfg.crf_short_side == 224                   # the paper's choice: the inference-size image
    assert PipelineConfig(crf_resolution=0).crf_short_side is None       # each image's full size
    assert PipelineConfig(crf_resolution=500).crf_short_side == 500
