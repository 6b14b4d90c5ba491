"""Where and how torch computes: the device ("auto" -> CUDA if available) and the precision of
the backbone's forward pass (autocast), resolved per device."""
from __future__ import annotations

import contextlib
import functools

import torch

from core.constants import PRECISIONS

__all__ = ["PRECISIONS", "cpu_has_native_bf16", "resolve_precision", "autocast", "resolve_device"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX); Linux only."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The compute precision of the backbone's forward pass on ``device``.

    ``"auto"``: bfloat16 autocast on CPUs with native bfloat16 matrix units (about 1.5x faster
    on ViT-S/14; features keep a cosine similarity of >= 0.999 to float32), bfloat16 or float16
    on CUDA, float32 otherwise. Explicit ``"float32"``, ``"bfloat16"``, ``"float16"`` (CUDA only).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = torch.device(device)
    if precision == "auto":
        if dev.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if dev.type == "cpu" and cpu_has_native_bf16():
            return "bfloat16"
        return "float32"
    if precision == "float16" and dev.type != "cuda":
        raise ValueError("float16 autocast needs a CUDA device; use 'bfloat16' or 'float32' on the CPU")
    return precision


def autocast(device: str | torch.device, precision: str):
    """Context manager running the forward pass in the resolved ``precision`` on ``device``."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; a CUDA request without CUDA is an error."""
    if isinstance(device, torch.device):
        dev = device
    elif device in ("auto", "", None):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"invalid device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev
