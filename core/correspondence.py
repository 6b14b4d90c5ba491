"""Click to find more of a thing: feature correspondence of one location against a whole corpus.

The STEGO paper's correspondence view: the cosine similarity of one token's backbone feature
to every token of every image. ``CorrespondenceIndex`` keeps the corpus' tokens ready for
that query on disk: centred on the corpus mean (DINO features share a large common component
that makes every raw cosine high), projected on the top ``dim`` principal components and
L2-normalised, as one float16 memmap. A query is one matrix-vector product over it, chunked
(no backbone run, memory flat in the corpus size).

    index = CorrespondenceIndex.build(store, root)        # once per run (seconds)
    sims = index.similarities(index.vector(item, y, x))    # (total_tokens,) float32 in [-1, 1]
    heat = index.item_map(sims, item)                      # (h, w) of one item
    best = index.best_items(sims, k=8)                     # [(item, score, (y, x)), ...]
    mask = index.upsampled_map(sims, item, (H, W)) >= 0.9  # full-size region above a threshold

Files under ``root``: ``meta.json``, ``index.npy`` (offset, h, w per item), ``mean.npy``,
``components.npy`` (dim, C), ``tokens.f16`` (total_tokens, dim). Torch-free.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from core.atomic import atomic_save_npy, atomic_write_json
from core.constants import FIND_THRESHOLD
from core.errors import Cancelled
from core.tokens import TokenFeatures, mean_of_views, token_views

log = logging.getLogger(__name__)

__all__ = ["CorrespondenceIndex", "FORMAT_VERSION", "DEFAULT_DIM", "DEFAULT_THRESHOLD"]

FORMAT_VERSION = 1
DEFAULT_DIM = 128          # principal components kept (all when the features have fewer)
DEFAULT_THRESHOLD = FIND_THRESHOLD   # core.constants: numpy-free, so the CLI's help can show it
FIT_SAMPLES = 50_000       # tokens the mean and components are estimated on
CHUNK = 262_144            # tokens per block of a query


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CorrespondenceIndex:
    """Centred, PCA-reduced, unit-norm float16 tokens of a corpus (see the module docstring)."""

    def __init__(self, root: Path, meta: dict, index: np.ndarray, mean: np.ndarray, components: np.ndarray):
        self.root = Path(root)
        self.meta = meta
        self._index = index
        self.mean = mean
        self.components = components
        self.dim = int(components.shape[0])
        self.total_tokens = int(meta["total_tokens"])
        self._tokens = np.memmap(self.root / "tokens.f16", dtype=np.float16, mode="r",
                                 shape=(self.total_tokens, self.dim))

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, features: TokenFeatures, root: Path, dim: int = DEFAULT_DIM, seed: int = 0,
              source: str = "", progress: Callable[[int, int], None] | None = None,
              cancel: Callable[[], bool] | None = None) -> "CorrespondenceIndex":
        """Write the index of ``features`` into ``root`` (replacing an older one) and open it.

        ``source`` is recorded in meta.json so a caller can tell whether an index matches
        its features (e.g. the feature store's path). Flipped copies, when the features have
        them, are averaged in (the same view the cluster maps use).
        """
        from core.clustering import sample_tokens

        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        n = len(features)
        if n < 1:
            raise ValueError("an index needs at least one item")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for name in ("meta.json",):
            (root / name).unlink(missing_ok=True)      # incomplete until meta.json is written last
        sample = sample_tokens(features, FIT_SAMPLES, seed=seed, average_flips=True).astype(np.float64)
        mean = sample.mean(axis=0)
        centred = sample - mean
        k = int(min(dim, centred.shape[1], max(1, centred.shape[0] - 1)))
        # principal axes from the covariance (C x C, C <= a few thousand)
        cov = centred.T @ centred / max(1, centred.shape[0] - 1)
        vals, vecs = np.linalg.eigh(cov)
        components = vecs[:, np.argsort(vals)[::-1][:k]].T.astype(np.float32)   # (k, C)
        mean32 = mean.astype(np.float32)
        grids = [features.grid(i) for i in range(n)]
        sizes = np.array([h * w for h, w in grids], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        index = np.stack([offsets, [g[0] for g in grids], [g[1] for g in grids]], axis=1).astype(np.int64)
        total = int(sizes.sum())
        flip = bool(getattr(features, "has_flip", False))
        tmp = root / "tokens.f16.tmp"
        out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(total, k))
        for i in range(n):
            if cancel is not None and cancel():
                del out
                tmp.unlink(missing_ok=True)
                raise Cancelled(f"building the correspondence index cancelled at item {i}")
            t = mean_of_views(token_views(features, i))
            out[offsets[i]:offsets[i] + sizes[i]] = _unit((t - mean32) @ components.T).astype(np.float16)
            if progress is not None:
                progress(i + 1, n)
        out.flush()
        del out
        os.replace(tmp, root / "tokens.f16")
        atomic_save_npy(root / "index.npy", index)
        atomic_save_npy(root / "mean.npy", mean32)
        atomic_save_npy(root / "components.npy", components)
        meta = {"format": FORMAT_VERSION, "n_items": n, "total_tokens": total, "dim": k,
                "embed_dim": int(components.shape[1]), "flip": flip, "source": source, "seed": seed}
        atomic_write_json(root / "meta.json", meta)     # written last: the index is complete
        log.info("correspondence index: %d items, %d tokens, %d dims -> %s", n, total, k, root)
        return cls.open(root)

    @classmethod
    def open(cls, root: Path) -> "CorrespondenceIndex":
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root} holds no complete correspondence index; build it first")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{root} has index format {meta.get('format')}, expected {FORMAT_VERSION}; build it again")
        return cls(root, meta, np.load(root / "index.npy"), np.load(root / "mean.npy"),
                   np.load(root / "components.npy"))

    # ------------------------------------------------------------------- queries
    def __len__(self) -> int:
        return int(self._index.shape[0])

    def grid(self, i: int) -> tuple[int, int]:
        return int(self._index[i, 1]), int(self._index[i, 2])

    def _span(self, i: int) -> slice:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"item {i} is outside the index (0..{len(self) - 1})")
        off, h, w = (int(v) for v in self._index[i])
        return slice(off, off + h * w)

    def vector(self, item: int, y: int, x: int, radius: int = 0) -> np.ndarray:
        """(dim,) unit query: the token at grid cell (y, x) of ``item`` (mean of the
        (2 radius + 1)^2 neighbourhood when radius > 0)."""
        h, w = self.grid(item)
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"cell ({y}, {x}) is outside item {item}'s {h}x{w} grid")
        cells = self._tokens[self._span(item)].reshape(h, w, self.dim)
        r = max(0, int(radius))
        block = np.asarray(cells[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1], dtype=np.float32)
        return _unit(block.reshape(-1, self.dim).mean(axis=0))

    def project(self, tokens: np.ndarray) -> np.ndarray:
        """Raw (T, C) features -> (T, dim) unit vectors in the index space."""
        return _unit((np.asarray(tokens, dtype=np.float32) - self.mean) @ self.components.T)

    def similarities(self, query: np.ndarray) -> np.ndarray:
        """(total_tokens,) float32 cosine similarity of every token to the unit ``query``."""
        q = np.asarray(query, dtype=np.float32).ravel()
        if q.shape[0] != self.dim:
            raise ValueError(f"query must have {self.dim} values, got {q.shape[0]}")
        q = _unit(q).astype(np.float16)
        out = np.empty(self.total_tokens, dtype=np.float32)
        for s in range(0, self.total_tokens, CHUNK):
            out[s:s + CHUNK] = self._tokens[s:s + CHUNK] @ q
        return out

    def item_map(self, sims: np.ndarray, item: int) -> np.ndarray:
        """(h, w) similarities of one item's tokens."""
        h, w = self.grid(item)
        return np.asarray(sims[self._span(item)]).reshape(h, w)

    def upsampled_map(self, sims: np.ndarray, item: int, size: tuple[int, int]) -> np.ndarray:
        """(H, W) float32 similarities of one item, bilinearly upsampled (torch semantics)."""
        from core.clustering import upsample_bilinear

        return upsample_bilinear(self.item_map(sims, item)[..., None], size)[..., 0]

    def coverage(self, sims: np.ndarray, threshold: float) -> np.ndarray:
        """(n_items,) share of each item's tokens at or above ``threshold``."""
        above = np.asarray(sims) >= threshold
        sizes = self._index[:, 1] * self._index[:, 2]
        return np.add.reduceat(above.astype(np.int64), self._index[:, 0]) / np.maximum(sizes, 1)

    def best_items(self, sims: np.ndarray, k: int = 8, exclude: int | None = None
                   ) -> list[tuple[int, float, tuple[int, int]]]:
        """The ``k`` items whose best token matches most: (item, similarity, (y, x) of that token)."""
        sims = np.asarray(sims)
        best = np.maximum.reduceat(sims, self._index[:, 0])
        order = [int(i) for i in np.argsort(-best, kind="stable") if int(i) != exclude][: max(0, int(k))]
        out = []
        for i in order:
            local = self.item_map(sims, i)
            y, x = np.unravel_index(int(np.argmax(local)), local.shape)
            out.append((i, float(best[i]), (int(y), int(x))))
        return out
