"""Import guard for torchvision on a CPU-only torch.

The torchvision 0.28 wheel carries a compiled extension that cannot load against a
CPU-only torch build. torchvision then still registers a fake (meta) kernel for
``torchvision::nms`` and the import dies with ``operator torchvision::nms does not
exist``. timm imports torchvision, so ``import timm`` dies too.

Importing this module first tries a normal ``import torchvision``. Only when that fails
with exactly this error does it define the missing operator *schemas* (nms, qnms) (no kernel: NMS
itself stays unavailable, which this project never calls) and import again. Where
torchvision imports normally, this module does nothing else.
"""
from __future__ import annotations

import logging
import sys

import torch

log = logging.getLogger(__name__)

# The ops torchvision registers fake kernels for without checking that its extension loaded.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: dropping it removes the schema
patched = False


def _purge_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` work; return True if the schema had to be defined."""
    global _library, patched
    try:
        import torchvision  # noqa: F401
        return patched
    except ImportError:
        return False  # torchvision not installed: timm works without it
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    _purge_partial_import()
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    patched = True
    import torchvision  # noqa: F401,F811

    log.info("torchvision's compiled ops are unavailable on this torch build; "
             "defined the torchvision::nms/qnms schemas so torchvision and timm import")
    return True


ensure_torchvision()
