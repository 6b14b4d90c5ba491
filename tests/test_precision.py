"""core.precision: the backbone's compute precision, and features extracted in bfloat16."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core import precision as precision_mod
from core.features import FeatureConfig, cache_key, extract_features
from core.precision import autocast, resolve_precision


def test_explicit_precisions_and_what_the_cpu_cannot_do():
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        FeatureConfig(precision="fp8")


def test_auto_uses_bfloat16_only_on_cpus_with_native_bfloat16(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "float32"


def test_autocast_runs_matmuls_in_the_resolved_precision():
    a = torch.randn(4, 8)
    with autocast("cpu", "bfloat16"):
        assert (a @ a.T).dtype == torch.bfloat16
    with autocast("cpu", "float32"):
        assert (a @ a.T).dtype == torch.float32


def test_bfloat16_features_are_close_to_float32_and_cached_apart(tiny_backbone, image_files, tmp_path):
    root = tmp_path / "cache"
    f32 = extract_features(image_files, tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=32,
                                                                      precision="float32"), root)
    bf16 = extract_features(image_files, tiny_backbone, FeatureConfig(backbone="test_tiny", resolution=32,
                                                                       precision="bfloat16"), root)
    assert f32.root != bf16.root
    assert json.loads((bf16.root / "meta.json").read_text())["precision"] == "bfloat16"
    assert json.loads((f32.root / "meta.json").read_text())["precision"] == "float32"
    for i in range(len(f32)):
        a = f32.tokens(i).astype(np.float32)
        b = bf16.tokens(i).astype(np.float32)
        assert not np.array_equal(a, b)            # really computed in another precision
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.99
    # float32 stores keep the key they had before precision became a setting
    cfg = FeatureConfig(backbone="test_tiny")
    assert cache_key("test_tiny", "w", cfg, ["a"]) == cache_key("test_tiny", "w", cfg, ["a"], "float32")
    assert cache_key("test_tiny", "w", cfg, ["a"]) != cache_key("test_tiny", "w", cfg, ["a"], "bfloat16")
