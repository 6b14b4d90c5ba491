"""Dense backbone features of an image corpus, stored on disk as memory-mappable float16.

Each image (or each of its five crops) is one *item*, resized so its short side equals
``resolution`` with both sides floored to a multiple of the patch size. All tokens live in
one flat float16 file ``tokens.f16`` of shape (total_tokens, C); ``index.npy`` holds per item
(offset, h, w, image_idx, crop_idx). A store directory is keyed by (backbone, weights,
resolution, crop mode, flip, max long side, image contents): a second run reuses it, an
interrupted run resumes with the items that were not finished.

Extraction overlaps decoding/resizing (a background thread) with the forward passes, batches
items of equal size together, and writes each batch with ``os.pwrite`` (no growing mapping, so
memory stays flat however large the corpus). Completion is recorded per item only after the
token data is synced, so an interrupted or cancelled run never leaves half-written items
marked done.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.atomic import atomic_save_npy, atomic_write_json
from core.constants import CROP_MODES, PRECISIONS
from core.errors import Cancelled, ImageLoadError
from core.images import crop, five_crop_boxes, image_size, load_image, resize_rgb, target_size
from core.precision import autocast, resolve_precision
from core.settings import DEFAULTS

if TYPE_CHECKING:
    from core.backbones import Backbone

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FIVE_CROP_RATIO = 0.5
SYNC_INTERVAL_S = 2.0   # how often finished items are synced to disk and marked done
PREFETCH_BATCHES = 2

META = "meta.json"
INDEX = "index.npy"
BOXES = "boxes.npy"
SIZES = "image_sizes.npy"
TOKENS = "tokens.f16"
TOKENS_FLIP = "tokens_flip.f16"
POOLED = "pooled.f32"
DONE = "done.u8"
KNN = "knn.npy"
LOCK = ".lock"


@dataclass(frozen=True)
class FeatureConfig:
    """How features are extracted; every field except ``batch_size`` is part of the cache key."""

    backbone: str = "dinov2_vits14"
    resolution: int = DEFAULTS.resolution
    crop_mode: str = DEFAULTS.crop_mode   # "none" | "five" (5 crops of ratio 0.5: 4 corners + centre)
    flip: bool = DEFAULTS.flip            # also store features of the h-flipped image, flipped back
    max_long_side: int = 1024
    batch_size: int = 8
    precision: str = "auto"      # forward-pass precision, see core.precision.resolve_precision

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"resolution must be a positive integer (pixels of the short side), "
                             f"got {self.resolution!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.max_long_side, int) or self.max_long_side < self.resolution:
            raise ValueError(f"max_long_side ({self.max_long_side!r}) must be an integer >= resolution "
                             f"({self.resolution})")


def file_digest(path: Path) -> str:
    """sha1 of a file's content (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def cache_key(backbone_name: str, weights_id: str, config: FeatureConfig, image_hashes: Sequence[str],
              precision: str = "float32") -> str:
    """The store directory name: sha1 of everything that changes the stored numbers.

    ``precision`` is the resolved compute precision (float32 stores keep their earlier keys).
    """
    fields: list = [FORMAT_VERSION, backbone_name, weights_id, config.resolution, config.crop_mode,
                    bool(config.flip), config.max_long_side, list(image_hashes)]
    if precision != "float32":
        fields.append(precision)
    payload = json.dumps(fields)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def plan_items(sizes: np.ndarray, config: FeatureConfig, patch_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Items of a corpus of images with (H, W) ``sizes``.

    Returns ``index`` (n_items, 5) int64 = (offset, h, w, image_idx, crop_idx) and ``boxes``
    (n_items, 4) int64 = (top, left, height, width) of each item in its image.
    """
    rows, boxes = [], []
    offset = 0
    for img, (H, W) in enumerate(np.asarray(sizes).tolist()):
        crops = [(0, 0, H, W)] if config.crop_mode == "none" else five_crop_boxes(H, W, FIVE_CROP_RATIO)
        for c, box in enumerate(crops):
            oh, ow = target_size(box[2], box[3], config.resolution, patch_size, config.max_long_side)
            h, w = oh // patch_size, ow // patch_size
            rows.append((offset, h, w, img, c))
            boxes.append(box)
            offset += h * w
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5), np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on a store directory (another process extracting it waits)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock
        yield
        return
    with open(root / LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class FeatureStore:
    """Memory-mapped float16 token features of a corpus (implements ``core.tokens.TokenFeatures``)."""

    def __init__(self, root: Path, meta: dict, index: np.ndarray, done: np.ndarray):
        self.root = Path(root)
        self.meta = meta
        self.config = FeatureConfig(**meta["config"])
        self.weights_id: str = meta["weights_id"]
        self.embed_dim: int = int(meta["embed_dim"])
        self.patch_size: int = int(meta["patch_size"])
        self._index = index
        self._done = done
        self.complete: bool = bool(done.all())
        self._tokens: np.memmap | None = None
        self._tokens_flip: np.memmap | None = None

    # -- opening
    @classmethod
    def open(cls, root: Path) -> FeatureStore:
        """Open an existing store directory (complete or not)."""
        root = Path(root)
        meta_path = root / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root} is not a feature store (no {META}); run extract_features")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{root} has feature format {meta.get('format')}, expected {FORMAT_VERSION}; "
                             "delete it and extract again")
        index = np.load(root / INDEX)
        done = np.fromfile(root / DONE, dtype=np.uint8).astype(bool)
        if done.shape[0] != index.shape[0]:
            raise ValueError(f"{root}: {DONE} does not match {INDEX}; delete the directory and extract again")
        return cls(root, meta, index, done)

    # -- TokenFeatures
    def __len__(self) -> int:
        return int(self._index.shape[0])

    def grid(self, i: int) -> tuple[int, int]:
        _, h, w, _, _ = self._index[i]
        return int(h), int(w)

    def image_index(self, i: int) -> int:
        return int(self._index[i, 3])

    def crop_index(self, i: int) -> int:
        return int(self._index[i, 4])

    def box(self, i: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of item ``i`` in its image (original pixels)."""
        return tuple(int(v) for v in np.load(self.root / BOXES, mmap_mode="r")[i])  # type: ignore[return-value]

    def image_sizes(self) -> np.ndarray:
        """(n_images, 2) int64 (height, width) of the images, EXIF orientation applied."""
        return np.load(self.root / SIZES)

    @property
    def n_images(self) -> int:
        return int(self.meta["n_images"])

    @property
    def has_flip(self) -> bool:
        return bool(self.config.flip)

    def _map(self, flipped: bool) -> np.memmap:
        if flipped:
            if not self.config.flip:
                raise ValueError("these features were extracted without flip=True; no flipped copies")
            if self._tokens_flip is None:
                self._tokens_flip = np.memmap(self.root / TOKENS_FLIP, dtype=np.float16, mode="r",
                                              shape=(int(self.meta["total_tokens"]), self.embed_dim))
            return self._tokens_flip
        if self._tokens is None:
            self._tokens = np.memmap(self.root / TOKENS, dtype=np.float16, mode="r",
                                     shape=(int(self.meta["total_tokens"]), self.embed_dim))
        return self._tokens

    def tokens(self, i: int, flipped: bool = False) -> np.ndarray:
        """(h*w, C) float16 read-only view of item ``i``'s tokens (row-major over the grid)."""
        if not self.complete and not self._done[i]:
            raise RuntimeError(f"item {i} of {self.root} has not been extracted yet; "
                               "run extract_features again to resume")
        off, h, w = (int(v) for v in self._index[i, :3])
        return self._map(flipped)[off:off + h * w]

    def pooled(self) -> np.ndarray:
        """(N, C) float32: per item, the L2-normalised mean of its (float16) tokens."""
        self._require_complete("pooled features")
        return np.fromfile(self.root / POOLED, dtype=np.float32).reshape(len(self), self.embed_dim)

    def knn(self, k: int = 30) -> np.ndarray:
        """(N, min(k, N-1)) int64 cosine nearest items of each item; computed once, kept in knn.npy."""
        from core.knn import compute_knn

        self._require_complete("the KNN table")
        want = min(k, len(self) - 1)
        path = self.root / KNN
        if path.is_file():
            table = np.load(path)
            if table.shape[0] == len(self) and table.shape[1] >= want:
                return table[:, :want]
        table = compute_knn(self.pooled(), k=k)
        atomic_save_npy(path, table)
        return table

    def _require_complete(self, what: str) -> None:
        if not self.complete:
            raise RuntimeError(f"{self.root} is incomplete ({int(self._done.sum())}/{len(self)} items); "
                               f"{what} needs every item: run extract_features again to finish")

    def __repr__(self) -> str:
        return (f"FeatureStore({self.root}, items={len(self)}, C={self.embed_dim}, "
                f"complete={self.complete})")


# ---------------------------------------------------------------- extraction

def _scan(paths: Sequence[Path]) -> tuple[list[str], np.ndarray]:
    """Content hashes and (H, W) sizes of all images (header only); bad files fail here, early."""
    def one(p: Path) -> tuple[str, tuple[int, int]]:
        try:
            digest = file_digest(p)
        except OSError as exc:
            raise ImageLoadError(p, f"cannot read file: {exc}") from None
        return digest, image_size(p)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, paths))
    hashes = [r[0] for r in results]
    sizes = np.asarray([r[1] for r in results], dtype=np.int64).reshape(-1, 2)
    return hashes, sizes


def _allocate(path: Path, nbytes: int) -> None:
    """Create a file of ``nbytes``, reserving the disk space when the filesystem allows it."""
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except AttributeError:
            f.truncate(nbytes)
        except OSError as exc:
            import errno

            if exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"not enough disk space for {nbytes / 1e9:.2f} GB of features "
                                            f"in {path.parent}; free space or use a smaller resolution") from None
            f.truncate(nbytes)


def _create_store(root: Path, paths: Sequence[Path], hashes: list[str], sizes: np.ndarray,
                  backbone: Backbone, config: FeatureConfig, precision: str) -> None:
    index, boxes = plan_items(sizes, config, backbone.patch_size)
    total = int(index[-1, 0] + index[-1, 1] * index[-1, 2])
    C = backbone.embed_dim
    for name in (TOKENS, TOKENS_FLIP, POOLED, DONE, KNN):
        (root / name).unlink(missing_ok=True)
    _allocate(root / TOKENS, total * C * 2)
    if config.flip:
        _allocate(root / TOKENS_FLIP, total * C * 2)
    _allocate(root / POOLED, len(index) * C * 4)
    atomic_save_npy(root / INDEX, index)
    atomic_save_npy(root / BOXES, boxes)
    atomic_save_npy(root / SIZES, sizes)
    meta = {
        "format": FORMAT_VERSION, "config": asdict(config), "backbone": backbone.spec.name,
        "weights_id": backbone.weights_id, "weights_source": backbone.weights_source,
        "precision": precision, "embed_dim": C,
        "patch_size": backbone.patch_size, "n_images": len(paths),
        "n_items": len(index), "total_tokens": total, "image_hashes": hashes,
        "image_paths": [str(p) for p in paths], "created": time.time(),
    }
    atomic_write_json(root / META, meta)
    _allocate(root / DONE, len(index))  # written last: its presence means the layout is ready


def _open_or_create(root: Path, paths: Sequence[Path], hashes: list[str], sizes: np.ndarray,
                    backbone: Backbone, config: FeatureConfig, precision: str) -> FeatureStore:
    try:
        store = FeatureStore.open(root)
        ok = (store.meta.get("image_hashes") == hashes and store.embed_dim == backbone.embed_dim
              and (root / TOKENS).stat().st_size == int(store.meta["total_tokens"]) * store.embed_dim * 2)
        if ok:
            return store
        log.warning("Feature store %s does not match this corpus; rebuilding it", root)
    except (FileNotFoundError, ValueError, KeyError, OSError, TypeError) as exc:
        if (root / META).exists():
            log.warning("Feature store %s is unreadable (%s); rebuilding it", root, exc)
    _create_store(root, paths, hashes, sizes, backbone, config, precision)
    return FeatureStore.open(root)


def _batches(index: np.ndarray, pending: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Pending items grouped by grid size (one forward per batch), in image order within a size."""
    if pending.size == 0:
        return []
    h, w = index[pending, 1], index[pending, 2]
    order = pending[np.lexsort((pending, w, h))]
    out, start = [], 0
    keys = index[order, 1] * 1_000_003 + index[order, 2]
    for end in range(1, len(order) + 1):
        if end == len(order) or keys[end] != keys[start] or end - start == batch_size:
            out.append(order[start:end])
            start = end
    return out


class _Loader:
    """Background thread: decodes, crops, resizes and normalises the images of each batch."""

    def __init__(self, paths: Sequence[Path], index: np.ndarray, boxes: np.ndarray, sizes: np.ndarray,
                 batches: list[np.ndarray], backbone: Backbone, config: FeatureConfig):
        self.paths, self.index, self.boxes, self.sizes = paths, index, boxes, sizes
        self.batches, self.backbone, self.config = batches, backbone, config
        self.queue: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self.stop = threading.Event()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.first_item = np.searchsorted(index[:, 3], np.arange(len(sizes)))
        self.thread = threading.Thread(target=self._run, name="feature-loader", daemon=True)

    def _image(self, img: int) -> np.ndarray:
        if img in self._cache:
            self._cache.move_to_end(img)
            return self._cache[img]
        H, W = (int(v) for v in self.sizes[img])
        # Decode at the smallest scale that still covers the image's items at their output size
        # (all items of one image have the same box size).
        first = int(self.first_item[img])
        bh, bw = (int(v) for v in self.boxes[first, 2:])
        p = self.backbone.patch_size
        oh, ow = int(self.index[first, 1]) * p, int(self.index[first, 2]) * p
        need = (min(H, -(-oh * H // bh)), min(W, -(-ow * W // bw)))
        rgb = load_image(self.paths[img], min_size=need)
        self._cache[img] = rgb
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return rgb

    def _item(self, i: int) -> np.ndarray:
        img = int(self.index[i, 3])
        rgb = self._image(img)
        H, W = (int(v) for v in self.sizes[img])
        top, left, bh, bw = (int(v) for v in self.boxes[i])
        if rgb.shape[:2] != (H, W):  # decoded at a reduced scale: scale the box
            sy, sx = rgb.shape[0] / H, rgb.shape[1] / W
            top, left = round(top * sy), round(left * sx)
            bh, bw = max(1, round(bh * sy)), max(1, round(bw * sx))
        part = crop(rgb, (top, left, bh, bw))
        p = self.backbone.patch_size
        return resize_rgb(np.ascontiguousarray(part), (int(self.index[i, 1]) * p, int(self.index[i, 2]) * p))

    def _run(self) -> None:
        try:
            for batch in self.batches:
                if self.stop.is_set():
                    return
                x = torch.stack([self.backbone.preprocess(self._item(int(i))) for i in batch])
                while not self.stop.is_set():
                    try:
                        self.queue.put((batch, x), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            self._put_final(exc)
            return
        self._put_final(None)

    def _put_final(self, item: BaseException | None) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(("end", item), timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        self.thread.start()
        while True:
            batch, x = self.queue.get()
            if isinstance(batch, str):
                if x is not None:
                    raise x
                return
            yield batch, x

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    """Positional write (``os.pwrite`` where it exists, seek + write elsewhere, e.g. Windows)."""
    if hasattr(os, "pwrite"):
        written = os.pwrite(fd, data, offset)
    else:  # single writer thread, so seek + write is safe
        os.lseek(fd, offset, os.SEEK_SET)
        written = os.write(fd, data)
    if written != len(data):
        raise OSError(f"short write ({written} of {len(data)} bytes); is the disk full?")


class _Writer:
    """Writes batches with pwrite; marks items done only after their data is synced."""

    def __init__(self, root: Path, embed_dim: int, flip: bool):
        self.C = embed_dim
        flags = os.O_WRONLY | getattr(os, "O_BINARY", 0)
        self.fd_tokens = os.open(root / TOKENS, flags)
        self.fd_flip = os.open(root / TOKENS_FLIP, flags) if flip else None
        self.fd_pooled = os.open(root / POOLED, flags)
        self.fd_done = os.open(root / DONE, flags)
        self.unsynced: list[int] = []
        self.last_sync = time.monotonic()

    def write(self, items: np.ndarray, index: np.ndarray, feats: np.ndarray, flipped: np.ndarray | None,
              pooled: np.ndarray) -> None:
        for j, i in enumerate(items.tolist()):
            off = int(index[i, 0]) * self.C * 2
            _pwrite(self.fd_tokens, feats[j].tobytes(), off)
            if flipped is not None and self.fd_flip is not None:
                _pwrite(self.fd_flip, flipped[j].tobytes(), off)
            _pwrite(self.fd_pooled, pooled[j].tobytes(), i * self.C * 4)
            self.unsynced.append(i)
        if time.monotonic() - self.last_sync >= SYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        if not self.unsynced:
            return
        for fd in (self.fd_tokens, self.fd_flip, self.fd_pooled):
            if fd is not None:
                os.fsync(fd)
        for i in self.unsynced:
            _pwrite(self.fd_done, b"\x01", i)
        os.fsync(self.fd_done)
        self.unsynced.clear()
        self.last_sync = time.monotonic()

    def close(self) -> None:
        for fd in (self.fd_tokens, self.fd_flip, self.fd_pooled, self.fd_done):
            if fd is not None:
                os.close(fd)


def extract_features(image_paths: Sequence[Path], backbone: Backbone, config: FeatureConfig,
                     cache_root: Path, progress: Callable[[int, int], None] | None = None,
                     cancel: Callable[[], bool] | None = None) -> FeatureStore:
    """Extract (or reuse, or resume) the features of ``image_paths`` into ``cache_root/<key>``.

    ``progress(done_items, total_items)`` is called after every batch; ``cancel()`` is polled
    between batches and raises ``core.errors.Cancelled`` (finished items stay on disk).
    Raises ImageLoadError naming the file when an image cannot be read.
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("no images given: extract_features needs at least one image path")
    if config.backbone != backbone.spec.name:
        raise ValueError(f"config.backbone is {config.backbone!r} but the backbone given is "
                         f"{backbone.spec.name!r}; create the backbone named in the config")
    if config.resolution < backbone.patch_size:
        raise ValueError(f"resolution {config.resolution} is smaller than the patch size {backbone.patch_size}")
    precision = resolve_precision(config.precision, backbone.device)
    t0 = time.perf_counter()
    hashes, sizes = _scan(paths)
    root = Path(cache_root) / cache_key(backbone.spec.name, backbone.weights_id, config, hashes, precision)
    with _locked(root):
        store = _open_or_create(root, paths, hashes, sizes, backbone, config, precision)
        n = len(store)
        pending = np.flatnonzero(~store._done)
        if pending.size == 0:
            log.info("Reusing complete features in %s", root)
            if progress:
                progress(n, n)
            return store
        if pending.size < n:
            log.info("Resuming features in %s: %d of %d items left", root, pending.size, n)
        else:
            log.info("Extracting %s features (%s) of %d images (%d items) into %s",
                     backbone.spec.name, precision, len(paths), n, root)
        _run_extraction(store, paths, sizes, backbone, config, pending, progress, cancel, precision)
        meta = dict(store.meta, completed=time.time(), seconds=round(time.perf_counter() - t0, 3))
        atomic_write_json(root / META, meta)
    return FeatureStore.open(root)


def backbone_forward(backbone: "Backbone", x: torch.Tensor, flip: bool, precision: str
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense features (B, h, w, C) float32 of a preprocessed batch on the backbone's device, and
    those of its h-flipped copy flipped back (None without `flip`); no grad, autocast at `precision`."""
    B = x.shape[0]
    with torch.inference_mode(), autocast(backbone.device, precision):
        if flip:
            x = torch.cat([x, x.flip(-1)])
        f = backbone(x).float().permute(0, 2, 3, 1)
    return f[:B], (f[B:].flip(2) if flip else None)


def encode_batch(backbone: "Backbone", x: torch.Tensor, flip: bool, precision: str
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """What the store keeps of one batch: float16 tokens (B, h, w, C), the flipped image's tokens
    flipped back (or None), L2-normalised pooled (B, C)."""
    x = x.to(backbone.device, non_blocking=True)
    B = x.shape[0]
    f, f_flip = backbone_forward(backbone, x, flip, precision)   # (B, h, w, C)
    main = np.ascontiguousarray(f.to(torch.float16).cpu().numpy())
    flipped = np.ascontiguousarray(f_flip.to(torch.float16).cpu().numpy()) if f_flip is not None else None
    pooled = main.reshape(B, -1, main.shape[-1]).astype(np.float32).mean(axis=1)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return main, flipped, pooled


def _run_extraction(store: FeatureStore, paths: Sequence[Path], sizes: np.ndarray, backbone: Backbone,
                    config: FeatureConfig, pending: np.ndarray, progress: Callable[[int, int], None] | None,
                    cancel: Callable[[], bool] | None, precision: str) -> None:
    index = store._index
    boxes = np.load(store.root / BOXES)
    n = len(index)
    done_count = n - int(pending.size)
    if progress:
        progress(done_count, n)
    loader = _Loader(paths, index, boxes, sizes, _batches(index, pending, config.batch_size), backbone, config)
    writer = _Writer(store.root, backbone.embed_dim, config.flip)
    try:
        for items, x in loader:
            if cancel is not None and cancel():
                raise Cancelled(f"feature extraction cancelled after {done_count} of {n} items")
            main, flipped, pooled = encode_batch(backbone, x, config.flip, precision)
            writer.write(items, index, main, flipped, pooled)
            done_count += len(items)
            if progress:
                progress(done_count, n)
        writer.sync()
        store._done[:] = True
        store.complete = True
    finally:
        loader.close()
        try:
            writer.sync()
        finally:
            writer.close()


def clear_store(root: Path) -> None:
    """Delete a feature store directory."""
    shutil.rmtree(root, ignore_errors=True)
