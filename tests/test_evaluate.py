import argparse
import json

import numpy as np
import pytest
from PIL import Image

from core import evaluate

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
    evaluate.add_arguments(parser)
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


def test_evaluate_reports_every_method_in_json_and_markdown(tmp_path):
    report = evaluate.run(_args(tmp_path, compare_paper_shifts=True))
    expected = {"kmeans_raw", "stego", "stego_crf", "stego_paper_shifts", "stego_crf_paper_shifts",
                "linear_probe_raw", "linear_probe_codes"}
    assert set(report["results"]) == expected
    for name, r in report["results"].items():
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0, name
        assert set(r["per_class_iou"]) == {"red", "green", "blue"}
    # colour classes are linearly separable even in random-ViT features
    assert report["results"]["linear_probe_raw"]["miou"] > 0.6
    assert report["shifts"]["paper"] == {"self": 0.18, "knn": 0.12, "neg": 0.46}
    assert report["n_train_images"] == 8 and report["n_val_images"] == 4
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["results"] == report["results"]
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| STEGO + CRF |" in md and "k-means on raw backbone features" in md and "test_tiny" in md


def test_evaluate_explains_missing_masks(tmp_path):
    args = _args(tmp_path)
    (tmp_path / "val" / "masks" / "s01.png").unlink()
    with pytest.raises(ValueError, match="no mask"):
        evaluate.run(args)
