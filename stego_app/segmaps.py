"""Which per-pixel cluster map a reader gets: raw, CRF or refined, plus found regions on top.

Every view of a run's segmentation (overlays, cluster examples, exports) reads its maps
through ``read_map``, so they all agree:

- ``plain``    k-means clusters (the pipeline)
- ``crf``      the same after the CRF
- ``refined``  after propagation (stego_app.refinement); stored in cluster-index space: each
  class the propagator learnt is written as one representative cluster index, so the
  cluster -> label mapping applies unchanged. Its ``meta.json`` (written last) records the
  naming version and classes.
(Folders and files: core.rundir.RunDir.)

Click-to-find clusters (stego_app.found) are drawn on top of any of these: cluster index
``found["index"]`` wherever the stored similarity of that query, bilinearly upsampled from
the token grid, reaches its threshold (later found clusters win).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from core.rundir import SEGMENT_KINDS, RunDir, SegmentsMissing
from stego_app.errors import UserError

KINDS = tuple(SEGMENT_KINDS)          # "plain" | "crf" | "refined" (core.rundir owns the folders)

_INDEXES: dict[tuple, object] = {}
_LOCK = threading.Lock()


def refined_meta(run_dir: Path) -> dict | None:
    """meta.json of the complete refined maps, or None when there are none."""
    try:
        return json.loads(RunDir(run_dir).refined_meta_json.read_text())
    except (OSError, ValueError):
        return None


def has_maps(run_dir: Path, kind: str, positions: Sequence[int] | None = None) -> bool:
    """Whether maps of ``kind`` exist (for every position given; else the folder is there)."""
    if kind == "refined" and refined_meta(run_dir) is None:
        return False
    rd = RunDir(run_dir)
    if positions is None:
        return rd.has_segments(kind)
    return all(rd.segment_path(p, kind).is_file() for p in positions)


def found_clusters(run_dir: Path) -> list[dict]:
    """The run's click-to-find clusters: [{"index", "position", "cell", "threshold", ...}]."""
    path = RunDir(run_dir).found_json
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise UserError(f"the found-regions file of this run is unreadable ({path}): {exc}") from None
    return list(data) if isinstance(data, list) else []


def version_key(run_dir: Path) -> tuple:
    """Changes whenever found regions or refined maps change (for caches of composed maps)."""
    rd = RunDir(run_dir)
    out = []
    for p in (rd.found_json, rd.refined_meta_json):
        try:
            st = p.stat()
            out += [st.st_mtime_ns, st.st_size]
        except OSError:
            out += [0, 0]
    return tuple(out)


def correspondence_index(run_dir: Path):
    """The run's open core.correspondence.CorrespondenceIndex (cached), or None if not built."""
    from core.correspondence import CorrespondenceIndex

    root = RunDir(run_dir).correspondence_dir
    try:
        st = (root / "meta.json").stat()
    except OSError:
        return None
    key = (str(root), st.st_mtime_ns)
    with _LOCK:
        index = _INDEXES.get(key)
    if index is None:
        index = CorrespondenceIndex.open(root)
        with _LOCK:
            for old in [k for k in _INDEXES if k[0] == key[0]]:
                del _INDEXES[old]
            _INDEXES[key] = index
    return index


def found_similarities(run_dir: Path, found: dict) -> np.ndarray:
    """(total_tokens,) float16 stored similarities of one found cluster's query."""
    index = correspondence_index(run_dir)
    if index is None:
        raise UserError("this run's correspondence index is missing; open Explore and click a point to build it")
    path = RunDir(run_dir).found_sims(int(found["index"]))
    return np.memmap(path, dtype=np.float16, mode="r", shape=(index.total_tokens,))


def apply_found(run_dir: Path, position: int, seg: np.ndarray, found: Sequence[dict] | None = None) -> np.ndarray:
    """``seg`` (H, W) with the found clusters painted where their similarity reaches the threshold."""
    found = found_clusters(run_dir) if found is None else found
    if not found:
        return seg
    index = correspondence_index(run_dir)
    if index is None:
        return seg
    out = seg.copy()
    for f in found:
        heat = index.upsampled_map(found_similarities(run_dir, f), int(position), out.shape[:2])
        out[heat >= float(f["threshold"])] = int(f["index"])
    return out


def read_map(run_dir: Path, position: int, kind: str, size: tuple[int, int] | None = None,
             found: bool = True) -> np.ndarray:
    """(H, W) int32 cluster ids of run item ``position`` (nearest-resized to size=(w, h))."""
    try:
        seg = RunDir(run_dir).read_segments(position, kind, size=size)
    except SegmentsMissing as exc:
        raise UserError(str(exc)) from None
    return apply_found(run_dir, position, seg) if found else seg
