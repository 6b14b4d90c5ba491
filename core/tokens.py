"""The token-feature protocol that training and clustering consume, and an in-memory version."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class TokenFeatures(Protocol):
    """Dense patch features of a corpus: item i has an (h, w) grid of C-dim tokens."""

    embed_dim: int

    def __len__(self) -> int: ...

    def grid(self, i: int) -> tuple[int, int]: ...

    def tokens(self, i: int, flipped: bool = False) -> np.ndarray: ...

    def image_index(self, i: int) -> int: ...


def token_views(features: TokenFeatures, i: int, pos=slice(None), flips: bool = True) -> list[np.ndarray]:
    """Item i's (T, C) float32 tokens at ``pos``, then its mirror's where ``flips`` and the features hold
    flipped copies (``has_flip``): the views a flip-averaging run averages."""
    views = (False, True) if flips and getattr(features, "has_flip", False) else (False,)
    return [np.asarray(features.tokens(i, flipped=f)[pos], dtype=np.float32) for f in views]


def mean_of_views(views: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of an item's views (one view is returned as it is)."""
    return views[0] if len(views) == 1 else 0.5 * (views[0] + views[1])


class ArrayFeatures:
    """TokenFeatures held in memory: one (h, w, C) array per item (tests, small corpora)."""

    def __init__(self, maps: Sequence[np.ndarray], flipped: Sequence[np.ndarray] | None = None,
                 image_indices: Sequence[int] | None = None):
        if not maps:
            raise ValueError("ArrayFeatures needs at least one feature map")
        dims = {m.shape[-1] for m in maps}
        if len(dims) != 1 or any(m.ndim != 3 for m in maps):
            raise ValueError("every feature map must be (h, w, C) with the same C")
        self._maps = [np.asarray(m) for m in maps]
        self._flipped = None if flipped is None else [np.asarray(m) for m in flipped]
        self.has_flip = flipped is not None
        self._images = list(range(len(maps))) if image_indices is None else list(image_indices)
        self.embed_dim = dims.pop()

    def __len__(self) -> int:
        return len(self._maps)

    def grid(self, i: int) -> tuple[int, int]:
        h, w, _ = self._maps[i].shape
        return h, w

    def tokens(self, i: int, flipped: bool = False) -> np.ndarray:
        maps = self._maps
        if flipped:
            if self._flipped is None:
                raise ValueError("these features were built without flipped copies")
            maps = self._flipped
        return maps[i].reshape(-1, self.embed_dim)

    def image_index(self, i: int) -> int:
        return self._images[i]


def pooled_features(features: TokenFeatures) -> np.ndarray:
    """(N, C) float32: per item, the L2-normalised mean of its tokens."""
    out = np.empty((len(features), features.embed_dim), dtype=np.float32)
    for i in range(len(features)):
        out[i] = features.tokens(i).astype(np.float32).mean(axis=0)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out
