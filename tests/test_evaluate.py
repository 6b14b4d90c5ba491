import argparse
import json

import numpy as np
import pytest
from PIL import Image

from core.evaluate import EvalSettings, evaluate, pair_images_and_masks
from core.features import FeatureStore
from stego_app import evaluate_cli

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 220]], dtype=np.uint8)


def _dataset(root, n, seed):
    """Images of coloured regions and their label masks (class = colour), with an ignored border."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        h, w = 48, 64
        lab = np.full((h, w), i % 3)
        lab[:, w // 2:] = (i + 1) % 3
        lab[h // 2:, : w // 2] = (i + 2) % 3
        img = COLOURS[lab].astype(np.int16) + rng.integers(-15, 15, size=(h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"s{i:02d}.png")
        mask = lab.astype(np.uint8)
        mask[:2] = 9  # ignored
        Image.fromarray(mask).save(root / "masks" / f"s{i:02d}.png")
    return root


def _args(tmp_path, **over):
    parser = argparse.ArgumentParser()
    evaluate_cli.add_arguments(parser)
    train, val = _dataset(tmp_path / "train", 8, 0), _dataset(tmp_path / "val", 4, 1)
    argv = ["--train-images", str(train / "images"), "--train-masks", str(train / "masks"),
            "--images", str(val / "images"), "--masks", str(val / "masks"), "--classes", "3",
            "--ignore", "9", "--backbone", "test_tiny", "--device", "cpu", "--resolution", "32",
            "--steps", "8", "--batch-size", "4", "--code-dim", "8", "--jobs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out" / "eval"),
            "--class-names", "red,green,blue"]
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return parser.parse_args(argv)


def test_checked_rows_come_with_the_apps_pixel_head_unless_told_otherwise():
    from core.pixel_head import DEFAULT_PIXEL_HEAD_WEIGHT

    assert evaluate_cli.pixel_head_weights(None, checked=True) == (DEFAULT_PIXEL_HEAD_WEIGHT,)
    assert evaluate_cli.pixel_head_weights(None, checked=False) == ()
    assert evaluate_cli.pixel_head_weights("none", checked=True) == ()
    assert evaluate_cli.pixel_head_weights("0.5,2", checked=True) == (0.5, 2.0)
    with pytest.raises(ValueError, match="numbers separated by commas, or none"):
        evaluate_cli.pixel_head_weights("half", checked=True)


def test_evaluate_reports_every_method_in_json_and_markdown(tmp_path):
    report = evaluate_cli.run(_args(tmp_path, compare_paper_shifts=True, k_multiples="1,2", find_missing=True,
                                    checked="1,2", checked_batches=True,   # the pixel head's row: the app's default
                                    propagation='{"steps": 30, "batch_size": 64, "hidden": 16}'))
    res = report.results
    hungarian = {"kmeans_raw", "stego", "stego_crf", "stego_paper_shifts", "stego_crf_paper_shifts",
                 "linear_probe_raw", "linear_probe_codes"}
    named = {f"{m}_k{k}" for m in ("named_raw", "named_stego", "named_stego_crf", "propagated", "propagated_crf",
                                   "propagated_found", "propagated_found_crf") for k in (3, 6)}
    named |= {f"propagated_checked{n}_found{px}{crf}_k{k}" for n in (1, 2) for px in ("", "_px0.5")
              for crf in ("", "_crf") for k in (3, 6)}
    assert set(res) == hungarian | named
    for name, r in res.items():
        assert 0.0 <= r.miou <= 1.0 and 0.0 <= r.accuracy <= 1.0, name
        assert set(r.per_class_iou) == {"red", "green", "blue"}
    # colour classes are linearly separable even in random-ViT features
    assert res["linear_probe_raw"].miou > 0.6
    # majority naming of 6 raw-feature clusters finds the colours (a naming action per named cluster)
    assert res["named_raw_k6"].miou > 0.6 and res["named_raw_k6"].naming_actions <= 6
    assert res["named_raw_k6"].n_clusters == 6 and len(res["named_raw_k6"].names) == 6
    assert res["propagated_k6"].naming_actions == res["named_stego_k6"].naming_actions
    # click-to-find: one find (one action more) per class present that no cluster was named after
    for k in (3, 6):
        finds = report.meta["click_to_find"]["finds"][str(k)]
        named_classes = {n for n in res[f"named_stego_k{k}"].names if n >= 0}
        assert {f["class"] for f in finds} == {0, 1, 2} - named_classes
        assert res[f"propagated_found_k{k}"].naming_actions == res[f"propagated_k{k}"].naming_actions + len(finds)
    # one checked image (of the 4 scored), on top of the finds; not scored itself
    # (picked as the app suggests images to correct: the most typical of the 4 scored images)
    assert report.meta["checked"]["pick"] == "representative" and report.meta["checked"]["seed_weight"] > 1
    assert report.meta["checked"]["images"]["1"][0] in {f"s{i:02d}.png" for i in range(4)}
    assert res["propagated_checked1_found_crf_k6"].checked_images == 1
    assert res["propagated_checked1_found_k6"].naming_actions == res["propagated_found_k6"].naming_actions
    # in batches, as the app gives them after an import: the second count keeps the first's image
    chk = report.meta["checked"]
    assert chk["batches"] and set(chk["images"]["1"]) < set(chk["images"]["2"]) and len(chk["images"]["2"]) == 2
    assert chk["pixel_head_weights"] == [0.5] and res["propagated_checked2_found_px0.5_crf_k6"].checked_images == 2
    # with the Clusters tab's groups the same names never take more actions
    assert 1 <= res["named_raw_k6"].group_actions <= res["named_raw_k6"].naming_actions
    assert report.meta["shifts"]["paper_shifts"] == {"self": 0.18, "knn": 0.12, "neg": 0.46}
    assert report.meta["n_fit_images"] == 8 and report.meta["n_images"] == 4
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["results"]["stego_crf"]["miou"] == res["stego_crf"].miou
    assert set(saved["results"]) == set(res)
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| STEGO + CRF |" in md and "k-means on raw backbone features" in md and "test_tiny" in md
    assert "| propagated + CRF | 6 |" in md
    assert "| propagated with click-to-find and 1 checked images + CRF | 6 |" in md and "Checked images: 1, 2" in md
    assert "| propagated with click-to-find and 2 checked images and their pixel head (weight 0.5) + CRF | 6 |" in md
    assert "successive batches" in md


def _fitted(tmp_path):
    """A pipeline fitted (test_tiny, 32 px) on 6 images of the colour dataset, and its images and masks."""
    from core.features import FeatureConfig
    from core.pipeline import PipelineConfig
    from core.training import TrainConfig

    data = _dataset(tmp_path / "d", 6, 3)
    images, masks = pair_images_and_masks(data / "images", data / "masks")
    cfg = PipelineConfig(features=FeatureConfig(backbone="test_tiny", resolution=32),
                         train=TrainConfig(steps=4, batch_size=4, code_dim=8), n_clusters=3, crf=False,
                         device="cpu", n_jobs=1)
    return evaluate_cli.fit_pipeline(cfg, images, tmp_path / "cache"), images, masks


def test_evaluate_on_the_pipelines_own_corpus_reuses_its_features(tmp_path):
    pipe, images, masks = _fitted(tmp_path)
    feats = sorted((tmp_path / "cache" / "features").iterdir())
    report = evaluate(pipe, images, masks, EvalSettings(n_classes=3, ignore_index=9, k_multiples=(2,), crf=False,
                                                        propagate=False, n_jobs=1))
    assert sorted((tmp_path / "cache" / "features").iterdir()) == feats  # nothing extracted again
    assert "linear_probe_raw" not in report.results  # no fit masks: no supervised rows
    assert {"kmeans_raw", "stego", "named_raw_k6", "named_stego_k6"} == set(report.results)
    assert report.to_dict()["meta"]["n_images"] == 6
    with pytest.raises(ValueError, match="class names"):
        evaluate(pipe, images, masks, EvalSettings(n_classes=3, class_names=("a",)))


def test_over_clustered_rows_use_the_head_a_run_of_that_many_clusters_trains(tmp_path, monkeypatch):
    """With automatic shifts a run of few clusters trains another head than a run of many (core.shifts):
    the evaluation scores each K on the head the app would train for it."""
    import dataclasses

    import core.shifts

    pipe, images, masks = _fitted(tmp_path)
    assert pipe.config.train.auto_shift_neg_factor == core.shifts.NEG_ATTRACT_FACTOR
    many = evaluate_cli.fit_pipeline(dataclasses.replace(pipe.config, train=dataclasses.replace(
        pipe.config.train, auto_shift_neg_factor=1.0)), images, tmp_path / "cache")
    settings = EvalSettings(n_classes=3, ignore_index=9, k_multiples=(1, 2), crf=False, propagate=False, n_jobs=1)
    mixed = evaluate(pipe, images, masks, settings, sweep_pipelines={6: many}).results
    alone = {name: evaluate(p, images, masks, settings).results for name, p in (("few", pipe), ("many", many))}
    assert mixed["stego"].miou == alone["few"]["stego"].miou                      # K = C: the pipeline's head
    assert mixed["named_stego_k3"] == alone["few"]["named_stego_k3"]
    assert mixed["named_stego_k6"] == alone["many"]["named_stego_k6"]   # K = 6: the other
    assert alone["many"]["named_stego_k6"] != alone["few"]["named_stego_k6"]   # (the two heads do differ)

    # the command fits that head by itself when a K of the sweep is "many" (here above 4 clusters)
    monkeypatch.setattr(core.shifts, "FEW_CLUSTERS", 4)
    report = evaluate_cli.run(_args(tmp_path / "cli", k_multiples="1,2", no_propagation=True, no_probes=True))
    heads = report.meta["sweep_heads"]
    assert list(heads) == ["6"] and heads["6"]["auto_shift_neg_factor"] == core.shifts.NEG_ATTRACT_FACTOR_MANY
    assert heads["6"]["shifts"]["neg"] > report.meta["shifts"]["auto"]["neg"]     # random pairs attract fewer
    assert heads["6"]["shifts"]["self"] == report.meta["shifts"]["auto"]["self"]
    assert "Over-clustered rows on their own head" in (tmp_path / "cli" / "out" / "eval.md").read_text()


def test_propagated_rows_can_predict_on_features_at_another_resolution(tmp_path):
    pipe, images, masks = _fitted(tmp_path)
    before = set((tmp_path / "cache" / "features").iterdir())
    settings = EvalSettings(n_classes=3, ignore_index=9, k_multiples=(2,), crf=False, n_jobs=1,
                            propagation={"steps": 20, "batch_size": 64, "hidden": 16}, predict_resolution=64)
    report = evaluate(pipe, images, masks, settings)
    new = set((tmp_path / "cache" / "features").iterdir()) - before
    assert len(new) == 1                       # the scored images' features at short side 64
    store = FeatureStore.open(new.pop())
    assert store.grid(0)[0] > pipe_grid(pipe)  # a finer token grid than the run's
    assert report.meta["predict_resolution"] == 64 and "predict_features" in report.timings_s
    assert 0.0 <= report.results["propagated_k6"].miou <= 1.0
    assert "predict on features at short side 64" in report.to_markdown()
    with pytest.raises(ValueError, match="needs propagate=True"):
        EvalSettings(n_classes=3, propagate=False, predict_resolution=64).validate()
    with pytest.raises(ValueError, match="propagation_crf: .*bilateral_srgb must be > 0"):
        EvalSettings(n_classes=3, propagation_crf={"bilateral_srgb": 0}).validate()
    with pytest.raises(ValueError, match="propagation_crf: .*unexpected keyword argument 'srgb'"):
        EvalSettings(n_classes=3, propagation_crf={"srgb": 5}).validate()


def test_propagated_rows_can_predict_on_a_grid_twice_as_dense(tmp_path):
    pipe, images, masks = _fitted(tmp_path)
    before = set((tmp_path / "cache" / "features").iterdir())
    settings = EvalSettings(n_classes=3, ignore_index=9, k_multiples=(2,), crf=False, n_jobs=1,
                            propagation={"steps": 20, "batch_size": 64, "hidden": 16}, predict_dense=True)
    report = evaluate(pipe, images, masks, settings)
    assert set((tmp_path / "cache" / "features").iterdir()) == before   # nothing stored: views are on the fly
    assert report.meta["predict_dense"] is True
    assert 0.0 <= report.results["propagated_k6"].miou <= 1.0
    assert "twice as dense" in report.to_markdown()
    with pytest.raises(ValueError, match="give one of them"):
        EvalSettings(n_classes=3, predict_dense=True, predict_resolution=64).validate()
    with pytest.raises(ValueError, match="needs propagate=True"):
        EvalSettings(n_classes=3, propagate=False, predict_dense=True).validate()


def pipe_grid(pipe) -> int:
    from core.evaluate import pipeline_features

    return pipeline_features(pipe)[0].grid(0)[0]


def test_evaluate_explains_missing_masks(tmp_path):
    args = _args(tmp_path)
    (tmp_path / "val" / "masks" / "s01.png").unlink()
    with pytest.raises(ValueError, match="no mask"):
        evaluate_cli.run(args)


def test_the_click_to_find_stand_in_clicks_where_a_class_fills_its_cell_and_finds_what_looks_alike(tmp_path):
    from core.correspondence import CorrespondenceIndex
    from core.evaluate import _best_clicks, _found_regions
    from core.tokens import ArrayFeatures

    # 2 x 2 token grid over an 8 x 8 mask: class 1 fills cell (1, 0), half of cell (0, 1); 3 = void
    target = np.zeros((8, 8), np.int64)
    target[4:, :4] = 1
    target[:4, 4:6] = 1
    target[:4, 6:] = 3
    clicks = {}
    _best_clicks(clicks, 0, target, (2, 2), 3)
    assert clicks[1] == [(1.0, 0, 1, 0)]
    assert clicks[0][0][0] == 1.0 and 2 not in clicks              # class 2 is nowhere: no click
    _best_clicks(clicks, 1, np.full((8, 8), 1), (2, 2), 3)        # as full elsewhere: the first click stays
    assert clicks[1] == [(1.0, 0, 1, 0)]

    # features: class 2 tokens share a direction, the rest are noise; class 2 is never a cluster's name
    rng = np.random.default_rng(0)
    cls = [rng.integers(0, 2, size=(4, 5)) for _ in range(3)]
    cls[1][2, 3] = 2
    cls[2][0, 0] = cls[2][3, 4] = 2
    direction = rng.normal(size=16)
    maps = [rng.normal(size=(4, 5, 16)) * 0.3 + (c == 2)[..., None] * 3 * direction for c in cls]
    index = CorrespondenceIndex.build(ArrayFeatures(maps), tmp_path / "index")
    counts = np.array([[50, 0, 0, 1], [0, 40, 3, 0], [5, 0, 2, 0]])     # clusters x (classes + void)
    names = np.array([0, 1, 0])
    found_of, finds = _found_regions(index, counts, names, {0: [(1.0, 0, 0, 0)], 2: [(0.9, 1, 2, 3)]},
                                     lambda i: i, threshold=0.9)
    assert [f["class"] for f in finds] == [2]                   # classes 0 and 1 are named: no find for them
    for i, c in enumerate(cls):
        assert np.array_equal(found_of(i) == 2, (c == 2).ravel()), i
        assert set(found_of(i).tolist()) <= {-1, 2}
    assert _found_regions(index, counts, np.array([0, 1, 2]), {2: [(0.9, 1, 2, 3)]}, lambda i: i, 0.6) == (None, [])
    # two clicks on the class, in two images: one entry (one naming action) each, their regions' union
    both, finds = _found_regions(index, counts, names, {2: [(0.9, 1, 2, 3), (0.8, 2, 3, 4)]}, lambda i: i, 0.9)
    assert [(f["class"], f["image"]) for f in finds] == [(2, 1), (2, 2)]
    for i, c in enumerate(cls):
        assert np.array_equal(both(i) == 2, (c == 2).ravel()), i


def test_click_to_find_stand_in_keeps_the_fullest_token_of_several_images_per_class():
    from core.evaluate import _best_clicks

    clicks: dict = {}
    for i, pole_width in enumerate((2, 6, 4)):       # image 1 shows the widest pole, then image 2
        target = np.zeros((8, 8), dtype=np.int64)    # 2 x 2 tokens of 4 x 4 pixels; class 0 everywhere
        target[:, 4:4 + pole_width // 2] = 1         # a pole of class 1 in the right-hand tokens
        _best_clicks(clicks, i, target, (2, 2), 2, n_clicks=2)
    assert [(c[1], c[0]) for c in clicks[1]] == [(1, 0.75), (2, 0.5)]   # (image, share), fullest first
    assert clicks[1][0][2:] == (0, 1)                                    # the top-right token
    assert len(clicks[0]) == 2 and {c[1] for c in clicks[0]} <= {0, 1, 2}
    with pytest.raises(ValueError, match="find_clicks must be >= 1"):
        EvalSettings(n_classes=3, find_clicks=0).validate()


def test_checked_images_teach_the_propagator_a_class_no_cluster_is_named_after():
    from core.evaluate import _fit_propagator, checked_items, checked_sets
    from core.tokens import ArrayFeatures

    # three directions = three classes; the clusters are named 0 and 1 only (class 2 merged away)
    rng = np.random.default_rng(0)
    dirs = np.eye(3, 16) * 3
    cls = [rng.integers(0, 3, size=(4, 5)) for _ in range(6)]
    maps = [rng.normal(size=(4, 5, 16)) * 0.2 + dirs[c] for c in cls]
    corpus = ArrayFeatures(maps)
    centroids = np.stack([dirs[0], dirs[1], dirs[2] + dirs[1] * 0.2])
    names = np.array([0, 1, -1])
    settings = EvalSettings(n_classes=3, propagate_from="raw", propagation={"steps": 500, "hidden": 0}, seed_weight=3.0)
    plain = _fit_propagator(corpus, None, centroids, names, settings)
    seeded = _fit_propagator(corpus, None, centroids, names, settings, seeds={2: cls[2].ravel()})
    others = [i for i in range(6) if i != 2]
    x = np.concatenate([maps[i].reshape(-1, 16) for i in others])
    truth = np.concatenate([cls[i].ravel() for i in others])
    before = plain.predict_log_proba(x).argmax(1)
    hit = seeded.predict_log_proba(x).argmax(1)
    assert (before[truth == 2] == 2).mean() < 0.5                          # naming alone never taught class 2
    assert (hit[truth == 2] == 2).mean() > 0.9 and (hit == truth).mean() >= 0.85   # 0.56 without the seeds
    # which images a person checks: as the app suggests them, spread evenly, or at random; never all
    assert checked_items(101, 5, "even") == [10, 30, 50, 70, 90] and checked_items(4, 1, "even") == [2]
    kind = np.repeat([0, 1, 2], (6, 3, 1))
    pooled = np.eye(3, 8)[kind] + rng.normal(0, 0.05, (10, 8))
    assert kind[checked_items(10, 3, "representative", pooled)].tolist() == [0, 1, 2]   # one of each, largest first
    with pytest.raises(ValueError, match="pooled features"):
        checked_items(10, 3, "representative")     # needs the images' features
    drawn = checked_items(101, 5, "random", seed=1)
    assert drawn == checked_items(101, 5, "random", seed=1) != checked_items(101, 5, "random", seed=2)
    assert len(set(drawn)) == 5 and all(0 <= i < 101 for i in drawn)
    with pytest.raises(ValueError, match="some must stay to be scored"):
        checked_items(4, 4)
    # in batches, as the app gives them after each import: the larger count keeps the smaller's images
    fresh = checked_sets(10, (1, 3), "representative", pooled)
    batches = checked_sets(10, (3, 1), "representative", pooled, batches=True)
    assert set(batches[1]) <= set(batches[3]) and kind[batches[3]].tolist() == [0, 1, 2]
    assert fresh[1] == batches[1]
    assert set(checked_sets(101, (2, 5), "random", None, seed=3, batches=True)[2]) <= \
        set(checked_sets(101, (2, 5), "random", None, seed=3, batches=True)[5])
    with pytest.raises(ValueError, match="checked_pick"):
        EvalSettings(n_classes=3, checked=(1,), checked_pick="best").validate()
    with pytest.raises(ValueError, match="positive"):
        EvalSettings(n_classes=3, checked=(0,)).validate()


def test_a_flip_averaging_evaluation_predicts_each_image_with_its_mirror_as_refine_does(tmp_path, monkeypatch):
    """With --flip the propagated rows score what Refine with names makes of such a run: each scored
    image's prediction averaged with its mirror's (and the fitting corpus, scored images included,
    labelled from the flip-averaged codes the clusters were named on)."""
    import core.evaluate as ev

    calls = []
    real = ev.views_log_proba

    def spy(prop, views):
        calls.append(len(views) == 2)           # the image and its mirror
        return real(prop, views)

    monkeypatch.setattr(ev, "views_log_proba", spy)
    report = evaluate_cli.run(_args(tmp_path, flip=True, k_multiples="2", no_probes=True, no_crf=True,
                                    propagation='{"steps": 20, "batch_size": 64, "hidden": 16}'))
    assert report.meta["flip"] is True
    assert calls == [True] * 4                     # the 4 scored images, each with its mirror
    assert 0.0 <= report.results["propagated_k6"].miou <= 1.0
