"""A pixel classifier learnt from corrected images: each pixel's colour plus its upsampled feature.

The propagator (core.propagation) labels 14-px tokens; a thin thing (a pole, a sign's edge) is
part of a token, so the propagated maps cannot draw it however good the names. Corrected images
carry true labels for every *pixel*. ``PixelHead`` is a small MLP trained on those pixels only;
its input at a pixel is the bilinearly upsampled backbone feature and the pixel's colour, so it
can learn where within a token a class lies. Its log-probabilities are added to the propagated
ones (``weight``) before the CRF (``combine``). It only decides between the classes it was
taught: at each pixel it redistributes the propagated probability of the taught classes among
them, and a class no corrected pixel shows keeps its propagated probability, so a head taught
on a few images never argues for or against a class they do not show.

The first layer is linear, so prediction projects the features at token resolution and
upsamples the projection (exact: bilinear upsampling is linear with weights summing to 1), then
adds the colour term per pixel; no (H, W, C) feature array is built. ``PixelHeadArrays`` holds the
fitted weights as NumPy arrays, so worker processes predict without torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from core.atomic import atomic_path
from core.clustering import _resize_cols, _resize_rows, _taps, log_softmax_
from core.propagation import class_weights

log = logging.getLogger(__name__)

__all__ = ["PixelHead", "PixelHeadArrays", "pixel_log_proba", "combine", "DEFAULT_PIXEL_HEAD_WEIGHT"]

DEFAULT_PIXEL_HEAD_WEIGHT = 0.5   # chosen on CamVid train (0.5 / 1 / 2), confirmed on val: docs/evaluation.md


def _rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> float32 in [-1, 1]."""
    return np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0


def _at(grid: np.ndarray, ys: np.ndarray, xs: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear samples (n, C) of an (h, w, C) grid upsampled to ``hw`` (as upsample_bilinear), at pixels (ys, xs)."""
    i0, i1, fy = _taps(int(hw[0]), grid.shape[0])
    j0, j1, fx = _taps(int(hw[1]), grid.shape[1])
    a0, a1, wy = i0[ys], i1[ys], fy[ys][:, None]
    b0, b1, wx = j0[xs], j1[xs], fx[xs][:, None]
    g = np.asarray(grid, dtype=np.float32)
    return ((1 - wy) * ((1 - wx) * g[a0, b0] + wx * g[a0, b1]) + wy * ((1 - wx) * g[a1, b0] + wx * g[a1, b1]))


@dataclass(frozen=True)
class PixelHeadArrays:
    """A fitted PixelHead as NumPy arrays (picklable, torch-free)."""

    mean: np.ndarray        # (C,) feature mean
    scale: np.ndarray       # (C,) feature scale
    w_feat: np.ndarray      # (C, hidden)
    w_rgb: np.ndarray       # (3, hidden)
    b1: np.ndarray          # (hidden,)
    w2: np.ndarray          # (hidden, n_classes)
    b2: np.ndarray          # (n_classes,)
    taught: np.ndarray      # (n_classes,) bool: the classes its training pixels show

    def save(self, path) -> None:
        """Write the arrays to ``path`` (.npz) atomically."""
        with atomic_path(path, ".npz") as tmp:
            np.savez(tmp, **{f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def load(cls, path) -> "PixelHeadArrays":
        with np.load(path) as z:
            return cls(**{f: z[f] for f in cls.__dataclass_fields__})

    def project(self, tokens: np.ndarray) -> np.ndarray:
        """(h, w, C) token features -> (h, w, hidden) first-layer feature term."""
        t = (np.asarray(tokens, dtype=np.float32) - self.mean) / self.scale
        return t @ self.w_feat


def pixel_log_proba(projected: np.ndarray, rgb: np.ndarray, arrays: PixelHeadArrays,
                    rows: slice | None = None) -> np.ndarray:
    """(n_classes, H, W) log-probabilities at every pixel of ``rgb`` (H, W, 3) from the token-level
    projection ``projected`` (h, w, hidden) of its features, over the taught classes (the others
    are -inf); with ``rows``, only those rows of the image (n_classes, len(rows), W)."""
    H, W = rgb.shape[:2]
    first, last, _ = (rows or slice(None)).indices(H)
    out = np.empty((arrays.b2.shape[0], max(0, last - first), W), np.float32)
    step = max(1, (1 << 21) // max(1, W * projected.shape[2]))      # rows per chunk (~8 MB of hidden units)
    cols = _resize_cols(np.asarray(projected, dtype=np.float32), W)  # (h, W, hidden): token rows only
    for r in range(first, last, step):
        e = min(r + step, last)
        h = _resize_rows(cols, slice(r, e), H) + _rgb(rgb[r:e]) @ arrays.w_rgb + arrays.b1
        np.maximum(h, 0, out=h)
        z = h @ arrays.w2 + arrays.b2
        z[..., ~arrays.taught] = -np.inf         # a softmax over the taught classes only
        out[:, r - first:e - first] = np.moveaxis(log_softmax_(z), -1, 0)
    return out


def _logsumexp(x: np.ndarray, axis: int = 0) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def combine(log_probs: np.ndarray, pixel: np.ndarray, taught: np.ndarray, weight: float) -> np.ndarray:
    """(n, H, W) log-probabilities: the propagated ``log_probs`` with the pixel head's ``pixel``
    (n, H, W, from pixel_log_proba) added at ``weight`` among the ``taught`` classes; their total
    probability, and every other class's, stay as propagated."""
    out = np.array(log_probs, dtype=np.float32, copy=True)
    t = np.asarray(taught, dtype=bool)
    if weight <= 0 or not t.any():
        return out
    z = out[t] + float(weight) * pixel[t]
    out[t] = z - _logsumexp(z) + _logsumexp(out[t])
    return out


class PixelHead:
    """MLP on (upsampled feature, colour) per pixel, trained on the pixels of corrected images.

    Hyper-parameters: ``hidden`` units, ``pixels_per_image`` sampled from each image (uniformly
    over its labelled pixels), ``class_balance`` (loss weight of class c is (n_max / n_c) **
    class_balance), ``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``seed``.
    """

    def __init__(self, n_classes: int, *, hidden: int = 64, pixels_per_image: int = 20000,
                 class_balance: float = 0.5, steps: int = 600, batch_size: int = 4096, lr: float = 3e-3,
                 weight_decay: float = 1e-4, seed: int = 0):
        self.n_classes = n_classes
        self.hidden = hidden
        self.pixels_per_image = pixels_per_image
        self.class_balance = class_balance
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    def _validate(self) -> None:
        if int(self.n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        for name in ("hidden", "pixels_per_image", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.class_balance < 0 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("class_balance and weight_decay must be >= 0, lr > 0")

    def fit(self, items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> "PixelHead":
        """Train on ``items``: (tokens (h, w, C), rgb (H, W, 3) uint8, labels (H, W) int, -1 or
        >= n_classes = unlabelled) of each corrected image."""
        import torch

        self._validate()
        rng = np.random.default_rng(self.seed)
        feats, cols, ys = [], [], []
        for tokens, rgb, labels in items:
            labels = np.asarray(labels)
            if labels.shape != rgb.shape[:2]:
                raise ValueError(f"labels {labels.shape} and image {rgb.shape[:2]} differ in size")
            on = np.flatnonzero((labels.ravel() >= 0) & (labels.ravel() < self.n_classes))
            if on.size == 0:
                continue
            pick = rng.choice(on, size=min(on.size, int(self.pixels_per_image)), replace=False)
            py, px = np.divmod(pick, labels.shape[1])
            feats.append(_at(tokens, py, px, labels.shape))
            cols.append(_rgb(rgb[py, px]))
            ys.append(labels[py, px].astype(np.int64))
        if not ys:
            raise ValueError("no labelled pixels: a pixel head needs corrected images")
        X, RGB, y = np.concatenate(feats), np.concatenate(cols), np.concatenate(ys)
        mean, scale = X.mean(axis=0), X.std(axis=0) + 1e-6
        Xn = np.concatenate([(X - mean) / scale, RGB], axis=1).astype(np.float32)
        counts = np.bincount(y, minlength=self.n_classes)
        cw, seen = class_weights(counts, self.class_balance), counts > 0
        C = X.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = torch.nn.Sequential(torch.nn.Linear(C + 3, int(self.hidden)), torch.nn.ReLU(),
                                      torch.nn.Linear(int(self.hidden), int(self.n_classes)))
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        Xt, yt, cwt = torch.from_numpy(Xn), torch.from_numpy(y), torch.from_numpy(cw.astype(np.float32))
        bs = min(int(self.batch_size), len(y))
        for _ in range(int(self.steps)):
            idx = torch.randint(0, len(y), (bs,), generator=gen)
            loss = torch.nn.functional.cross_entropy(net(Xt[idx]), yt[idx], weight=cwt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        w1 = net[0].weight.detach().numpy().T.astype(np.float32)           # (C + 3, hidden)
        self.arrays_ = PixelHeadArrays(mean.astype(np.float32), scale.astype(np.float32), w1[:C].copy(),
                                       w1[C:].copy(), net[0].bias.detach().numpy().astype(np.float32),
                                       net[2].weight.detach().numpy().T.astype(np.float32).copy(),
                                       net[2].bias.detach().numpy().astype(np.float32), seen.copy())
        self.n_train_pixels_ = int(len(y))
        log.info("pixel head: %d pixels of %d classes, last loss %.3f", len(y), int(seen.sum()), float(loss.detach()))
        return self

    def predict_log_proba(self, tokens: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """(n_classes, H, W) log-probabilities of an image from its (h, w, C) token features."""
        if not hasattr(self, "arrays_"):
            raise RuntimeError("PixelHead is not fitted: call fit() first")
        return pixel_log_proba(self.arrays_.project(tokens), rgb, self.arrays_)
