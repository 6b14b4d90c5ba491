"""Compute precision of the backbone's forward pass (autocast), resolved per device."""
from __future__ import annotations

import contextlib
import functools

import torch

from core.constants import PRECISIONS

__all__ = ["PRECISIONS", "cpu_has_native_bf16", "resolve_precision", "autocast"]

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
