"""The run directory: the one owner of its file layout (torch-free; used by core and stego_app).

    config.json          PipelineConfig of the run        images.json    the images, in item order
    state.json           finished stages (resume)         head.pt        trained segmentation head
    centroids.npy        k-means centroids                train_history.json  loss per logged step
    clusters.json        per-cluster pixels / examples    result.json    RunResult summary
    segment_stats.npz    per-image cluster pixels (resume of the segments stage)
    segments/{i:06d}.png       cluster id per pixel of item i (argmax)
    segments_crf/{i:06d}.png   the same, CRF-refined
    segments_refined/          refined with names (stego_app.refinement; meta.json written last)
    segments_refined.partial/<job>/   a refinement being written (replaces segments_refined/ when complete)
    correspondence/            click-to-find index (core.correspondence)
    found/found.json, found/<index>.f16   click-to-find clusters (stego_app.found)
    groups.json                how finely the clusters are grouped (stego_app.groups)

A new kind of segment map is one entry in SEGMENT_KINDS (kind -> folder name).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write_bytes

__all__ = ["RunDir", "SEGMENT_KINDS", "SegmentsMissing", "FeaturesMissing", "segment_kind", "write_label_png"]

SEGMENT_KINDS: dict[str, str] = {"plain": "segments", "crf": "segments_crf", "refined": "segments_refined"}


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """A label map as a uint8 PNG when all ids fit, else 16-bit; written atomically."""
    import io

    from PIL import Image

    arr = labels.astype(np.uint8) if int(labels.max(initial=0)) < 256 else labels.astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def segment_kind(crf: bool) -> str:
    """The segment-map kind of the plain (False) or CRF-refined (True) maps."""
    return "crf" if crf else "plain"


class SegmentsMissing(FileNotFoundError):
    """A segment map of a run is not on disk; `path` is the missing file."""

    def __init__(self, path: Path):
        super().__init__(f"the segment map {path.name} of this run is missing ({path.parent})")
        self.path = path


class FeaturesMissing(FileNotFoundError):
    """The cached whole-image features of a run are gone (cache cleared) or never finished."""


@dataclass(frozen=True)
class RunDir:
    """Paths and readers/writers of one run directory: `RunDir(path).clusters_json`, `.read_segments(i)`."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---------------------------------------------------------------- files
    @property
    def config_json(self) -> Path:
        return self.root / "config.json"

    @property
    def images_json(self) -> Path:
        return self.root / "images.json"

    @property
    def state_json(self) -> Path:
        return self.root / "state.json"

    @property
    def head_pt(self) -> Path:
        return self.root / "head.pt"

    @property
    def centroids_npy(self) -> Path:
        return self.root / "centroids.npy"

    @property
    def train_history_json(self) -> Path:
        return self.root / "train_history.json"

    @property
    def clusters_json(self) -> Path:
        return self.root / "clusters.json"

    @property
    def result_json(self) -> Path:
        return self.root / "result.json"

    @property
    def train_checkpoint_pt(self) -> Path:
        return self.root / "train_checkpoint.pt"

    @property
    def segment_stats_npz(self) -> Path:
        return self.root / "segment_stats.npz"

    # ---------------------------------------------------------------- issue 12 (naming, refine, find)
    @property
    def refined_meta_json(self) -> Path:
        return self.segments_dir("refined") / "meta.json"

    @property
    def refined_partial_root(self) -> Path:
        return self.root / (SEGMENT_KINDS["refined"] + ".partial")

    def refined_partial(self, job_id: int) -> Path:
        return self.refined_partial_root / str(int(job_id))

    def refined_job_json(self, job_id: int) -> Path:
        """The mapping version a refinement job started from (inside its partial folder)."""
        return self.refined_partial(job_id) / "job.json"

    def refined_old(self, job_id: int) -> Path:
        """Where the previous refined maps go for the instant the new ones replace them."""
        return self.root / f"refined.old.{int(job_id)}"

    @property
    def correspondence_dir(self) -> Path:
        return self.root / "correspondence"

    @property
    def found_dir(self) -> Path:
        return self.root / "found"

    @property
    def found_json(self) -> Path:
        return self.found_dir / "found.json"

    def found_sims(self, index: int) -> Path:
        return self.found_dir / f"{int(index)}.f16"

    @property
    def groups_json(self) -> Path:
        return self.root / "groups.json"

    def read_json(self, path: Path) -> Any:
        return json.loads(Path(path).read_text())

    # ---------------------------------------------------------------- segment maps
    def infer_store(self):
        """The run's whole-image feature store (``core.features.FeatureStore``, one item per image in
        the run's order); ``FeaturesMissing`` when its features stage has not finished or the cache
        was cleared."""
        from core.features import FeatureStore

        try:
            return FeatureStore.open(Path(self.read_json(self.state_json)["stores"]["infer"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FeaturesMissing(f"the cached features of {self.root} are gone or unfinished ({exc})") from None

    def segments_dir(self, kind: str = "plain") -> Path:
        try:
            return self.root / SEGMENT_KINDS[kind]
        except KeyError:
            raise ValueError(f"unknown segment kind {kind!r}; one of {', '.join(SEGMENT_KINDS)}") from None

    def segment_path(self, i: int, kind: str = "plain") -> Path:
        return self.segments_dir(kind) / f"{int(i):06d}.png"

    def has_segments(self, kind: str = "plain") -> bool:
        return self.segments_dir(kind).is_dir()

    def read_segments(self, i: int, kind: str = "plain", size: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) int32 cluster ids of item i (nearest-resized to size=(w, h) if given)."""
        from PIL import Image

        path = self.segment_path(i, kind)
        if not path.is_file():
            raise SegmentsMissing(path)
        with Image.open(path) as im:
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size), Image.NEAREST)
            return np.asarray(im).astype(np.int32)

    def write_segments(self, i: int, labels: np.ndarray, kind: str = "plain") -> Path:
        """uint8 PNG when all ids fit, else 16-bit; written atomically."""
        path = self.segment_path(i, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(path, labels)
        return path
