"""core.backbones: registry, dense features, freezing, default choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import core.tv_guard  # noqa: F401  (before timm)
import timm

from core import weights
from core.backbones import Backbone, create_backbone, default_backbone_name
from core.precision import resolve_device
from core.registry import BACKBONES, list_backbones


def test_registry_lists_paper_and_dinov2_backbones():
    names = list_backbones()
    for n in ("dino_vits8", "dino_vits16", "dino_vitb8", "dinov2_vits14", "dinov2_vitb14", "test_tiny"):
        assert n in names
    assert names[-1] == "test_tiny"  # test model listed last, never first


@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "test_tiny"])
def test_spec_matches_the_timm_architecture(name):
    spec = BACKBONES[name]
    with torch.device("meta"):
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    assert model.patch_embed.proj.weight.shape[-1] == spec.patch_size
    assert model.embed_dim == spec.embed_dim
    assert tuple(model.pretrained_cfg["mean"]) == spec.mean and tuple(model.pretrained_cfg["std"]) == spec.std
    assert spec.family == ("dinov2" if "dinov2" in name else "dino")


def test_dense_features_shape_at_any_patch_multiple(tiny_backbone):
    assert isinstance(tiny_backbone, Backbone)
    for h, w in [(64, 64), (40, 72), (8, 8), (120, 48)]:
        out = tiny_backbone(torch.randn(2, 3, h, w))
        assert out.shape == (2, 32, h // 8, w // 8)


def test_features_are_last_block_tokens_after_norm_without_cls(tiny_backbone):
    x = torch.randn(1, 3, 24, 40)
    with torch.inference_mode():
        dense = tiny_backbone(x)
        tokens = tiny_backbone.model.forward_features(x)  # (1, 1 + 3*5, C), final norm applied
    assert tokens.shape[1] == 1 + 15
    for i, j in [(0, 0), (1, 3), (2, 4)]:
        torch.testing.assert_close(dense[0, :, i, j], tokens[0, 1 + i * 5 + j])


def test_rejects_sizes_that_are_not_patch_multiples(tiny_backbone):
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        tiny_backbone(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_backbone(torch.randn(3, 32, 32))


def test_backbone_is_frozen_and_stays_in_eval_mode(tiny_backbone):
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    tiny_backbone.train()
    assert not tiny_backbone.training and not tiny_backbone.model.training
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(tiny_backbone(x), tiny_backbone(x))  # no dropout / randomness


def test_test_tiny_is_reproducible():
    a = create_backbone("test_tiny", device="cpu")
    b = create_backbone("test_tiny", device="cpu")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.weights_id == "random-seed0" and "random init" in a.weights_source


def test_preprocess_normalises_with_backbone_statistics(tiny_backbone):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255
    x = tiny_backbone.preprocess(rgb)
    assert x.shape == (3, 4, 6) and x.dtype == torch.float32
    mean, std = tiny_backbone.spec.mean, tiny_backbone.spec.std
    assert x[0, 0, 0].item() == pytest.approx((1 - mean[0]) / std[0], rel=1e-5)
    assert x[1, 0, 0].item() == pytest.approx(-mean[1] / std[1], rel=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        tiny_backbone.preprocess(rgb.astype(np.float32))


def test_unknown_name_and_unavailable_device_are_clear_errors():
    with pytest.raises(ValueError, match="choose one of"):
        create_backbone("resnet50")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")


def test_default_is_dinov2_small_when_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(weights, "_hf_cached_file", lambda spec: None)
    assert default_backbone_name(tmp_path) == "dinov2_vits14"


def test_default_prefers_a_backbone_that_resolves_offline(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(weights, "_hf_cached_file", lambda spec: None)
    # Only DINO ViT-S/8 is in the local cache: it wins over backbones that need a download.
    path = weights.cached_weights_path("dino_vits8", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    path.with_suffix(".json").write_text("{}")
    assert default_backbone_name(tmp_path) == "dino_vits8"


@pytest.mark.parametrize("patch,dim,layerscale,expected", [
    (8, 384, False, "dino_vits8"), (16, 384, False, "dino_vits16"), (8, 768, False, "dino_vitb8"),
    (14, 384, True, "dinov2_vits14"), (14, 768, True, "dinov2_vitb14"),
])
def test_default_follows_the_architecture_of_STEGO_WEIGHTS(tmp_path, monkeypatch, patch, dim, layerscale,
                                                         expected):
    sd = {"patch_embed.proj.weight": torch.zeros(dim, 3, patch, patch), "pos_embed": torch.zeros(1, 2, dim)}
    if layerscale:
        sd["blocks.0.ls1.gamma"] = torch.ones(dim)
    ckpt = tmp_path / "ckpt.pth"
    torch.save(sd, ckpt)
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(ckpt))
    assert default_backbone_name(tmp_path) == expected


def test_default_follows_a_checkpoint_given_as_a_flag(tmp_path, monkeypatch):
    """`--weights FILE` (AppConfig.weights) picks the backbone the file is for, like $STEGO_WEIGHTS."""
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    ckpt = tmp_path / "dino_b8.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(768, 3, 8, 8), "pos_embed": torch.zeros(1, 2, 768)}, ckpt)
    assert default_backbone_name(tmp_path, checkpoint=ckpt) == "dino_vitb8"
    from stego_app.config import AppConfig
    from core.settings import RunSettings
    from stego_app.worker import resolve_backbone
    assert resolve_backbone(RunSettings(), AppConfig(cache_dir=tmp_path, weights=str(ckpt))) == "dino_vitb8"
