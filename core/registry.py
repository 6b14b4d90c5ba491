"""The registry of named backbones: what each one is, torch-free.

core.backbones builds the models and core.weights resolves their weights; both read the
specs from here, so neither imports the other for them (and the app can list backbones
without importing torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BackboneSpec", "BACKBONES", "DEFAULT_PREFERENCE", "IMAGENET_MEAN", "IMAGENET_STD",
           "list_backbones", "get_spec"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone: its timm model and what the pipeline needs to know about it."""

    name: str
    timm_name: str
    patch_size: int
    embed_dim: int
    family: str  # "dino" | "dinov2" | "test"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: tuple[tuple[str, Any], ...] = field(default=())  # extra timm.create_model kwargs
    description: str = ""


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s for s in (
        BackboneSpec("dino_vits8", "vit_small_patch8_224.dino", 8, 384, "dino",
                     description="DINO ViT-S/8 (STEGO paper)"),
        BackboneSpec("dino_vits16", "vit_small_patch16_224.dino", 16, 384, "dino",
                     description="DINO ViT-S/16"),
        BackboneSpec("dino_vitb8", "vit_base_patch8_224.dino", 8, 768, "dino",
                     description="DINO ViT-B/8 (STEGO paper)"),
        BackboneSpec("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", 14, 384, "dinov2",
                     description="DINOv2 ViT-S/14"),
        BackboneSpec("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", 14, 768, "dinov2",
                     description="DINOv2 ViT-B/14"),
        BackboneSpec("test_tiny", "vit_small_patch8_224", 8, 32, "test",
                     model_kwargs=(("embed_dim", 32), ("depth", 2), ("num_heads", 2), ("img_size", 64)),
                     description="random-init tiny ViT for tests (never a default)"),
    )
}

# "Best available" order for the default: DINOv2-S/14 gives better dense features than DINO
# ViT-B/8 at a fraction of the cost (CPU-friendly); ViT-B/14 is better still but ~4x slower.
DEFAULT_PREFERENCE = ("dinov2_vits14", "dinov2_vitb14", "dino_vits8", "dino_vitb8", "dino_vits16")


def list_backbones() -> list[str]:
    """Registry names, real backbones first."""
    return [n for n in BACKBONES if BACKBONES[n].family != "test"] + \
           [n for n in BACKBONES if BACKBONES[n].family == "test"]


def get_spec(name: str) -> BackboneSpec:
    """The spec of ``name``; a ValueError lists the valid names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list_backbones()}") from None
