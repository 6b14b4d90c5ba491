"""Valid, light COCO / Label Studio polygons from binary masks.

Annotation tools draw a polygon as one simple ring: no holes, no self-touching corners
(CVAT and Label Studio have no polygon holes; shapely calls such rings invalid). A
region is therefore split into pieces that each have one simple outline:

1. 4-connected parts (pixels that touch only at a corner become separate pieces);
2. a part with holes, or whose outline touches itself at a corner, is cut along pixel
   rows (the fewest rows that open every hole and separate every such corner), and
   the bands are split again.

Each piece's outline runs along pixel edges, so unsimplified pieces rasterise
(pycocotools) back to exactly the region. Outlines are then simplified (Douglas-Peucker,
shapely, topology kept) with a tolerance in pixels; a piece whose area would change by
more than `max_area_change` is simplified with a smaller tolerance, down to none.

Coordinates: pixel (row r, column c) covers [c, c+1] x [r, r+1]; vertices are integers.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import shapely
from scipy import ndimage

FOUR = ndimage.generate_binary_structure(2, 1)
EIGHT = np.ones((3, 3), dtype=bool)
DEFAULT_TOLERANCE = 1.0          # pixels
MAX_AREA_CHANGE = 0.01           # relative change of a piece's area allowed by simplification


def _runs(cond: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of True along axis 1: (row, start, stop) arrays."""
    n = cond.shape[0]
    padded = np.zeros((n, cond.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = cond
    d = np.diff(padded, axis=1)
    r0, s = np.nonzero(d == 1)
    r1, e = np.nonzero(d == -1)
    # nonzero scans row-major, so starts and stops pair up in order.
    assert np.array_equal(r0, r1)
    return r0, s, e


def trace_loops(mask: np.ndarray, connectivity: int = 4) -> list[np.ndarray]:
    """Boundary loops of a binary mask along pixel edges.

    Returns a list of (K, 2) int64 arrays of corner vertices (x, y), closed implicitly,
    only at direction changes. The foreground lies on the right of the walking direction
    (image coordinates), so outer boundaries have positive shoelace area and hole
    boundaries negative. connectivity=4: pixels touching only at a corner get separate
    loops (background 8-connected); connectivity=8: one outer loop per 8-connected
    component, passing twice through such corners (holes are 4-connected background).
    """
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    if h == 0 or w == 0 or not m.any():
        return []
    p = np.zeros((h + 2, w + 2), dtype=bool)
    p[1:-1, 1:-1] = m
    up = m & ~p[:-2, 1:-1]
    down = m & ~p[2:, 1:-1]
    left = m & ~p[1:-1, :-2]
    right = m & ~p[1:-1, 2:]

    sx, sy, ex, ey, dirs = [], [], [], [], []

    def add(x0, y0, x1, y1, d):
        sx.append(x0); sy.append(y0); ex.append(x1); ey.append(y1)
        dirs.append(np.full(x0.shape, d, dtype=np.int64))

    r, c0, c1 = _runs(up)            # top edges, walking +x
    add(c0, r, c1, r, 0)
    r, c0, c1 = _runs(down)          # bottom edges, walking -x
    add(c1, r + 1, c0, r + 1, 2)
    c, r0, r1 = _runs(right.T)       # right edges, walking +y
    add(c + 1, r0, c + 1, r1, 1)
    c, r0, r1 = _runs(left.T)        # left edges, walking -y
    add(c, r1, c, r0, 3)

    sx = np.concatenate(sx).astype(np.int64); sy = np.concatenate(sy).astype(np.int64)
    ex = np.concatenate(ex).astype(np.int64); ey = np.concatenate(ey).astype(np.int64)
    d = np.concatenate(dirs)
    stride = np.int64(w + 1)
    keys = (sy * stride + sx) * 4 + d
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    end_vertex = ey * stride + ex

    def lookup(k: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(sorted_keys, k)
        pos_c = np.minimum(pos, len(sorted_keys) - 1)
        found = sorted_keys[pos_c] == k
        return np.where(found, order[pos_c], -1)

    # Maximal straight runs alternate horizontal/vertical, so the next segment turns.
    # At a pinch vertex (two outgoing segments) turning right keeps to the same pixel
    # (4-connected), turning left crosses to the diagonal pixel (8-connected).
    first, second = ((d + 1) % 4, (d + 3) % 4) if connectivity == 4 else ((d + 3) % 4, (d + 1) % 4)
    nxt = lookup(end_vertex * 4 + first)
    missing = nxt < 0
    nxt[missing] = lookup(end_vertex[missing] * 4 + second[missing])
    if (nxt < 0).any():  # pragma: no cover - would be a bug in the edge construction
        raise RuntimeError("open boundary while tracing a mask")

    nxt_list = nxt.tolist()
    visited = bytearray(len(nxt_list))
    loops: list[np.ndarray] = []
    for start in range(len(nxt_list)):
        if visited[start]:
            continue
        idx = []
        i = start
        while not visited[i]:
            visited[i] = 1
            idx.append(i)
            i = nxt_list[i]
        ia = np.asarray(idx, dtype=np.int64)
        loops.append(np.stack([sx[ia], sy[ia]], axis=1))
    # Deterministic order: by first vertex (rotate each loop to its smallest (y, x)).
    out = []
    for loop in loops:
        k = int(np.lexsort((loop[:, 0], loop[:, 1]))[0])
        out.append(np.roll(loop, -k, axis=0))
    out.sort(key=lambda a: (int(a[0, 1]), int(a[0, 0])))
    return out


def _segments(loop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) vertices of each segment of a closed loop."""
    return loop, np.concatenate((loop[1:], loop[:1]))


def loop_area(loop: np.ndarray) -> int:
    """Signed area of a traced loop (positive: outer boundary, negative: hole)."""
    a, b = _segments(loop)
    return int((a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1]).sum()) // 2




def _cut_rows(part: np.ndarray) -> list[int]:
    """Fewest row boundaries that open every hole of a 4-connected part and split its pinches.

    A cut at boundary k separates rows < k from rows >= k. A hole spanning rows t..b is
    opened by any k in [t, b + 1]; a corner pinch between rows r and r + 1 needs k = r + 1.
    """
    intervals: list[tuple[int, int]] = []
    padded = np.pad(~part, 1, constant_values=True)
    bg, n = ndimage.label(padded, structure=EIGHT)       # holes: background, 8-connected
    outside = bg[0, 0]
    for k, sl in enumerate(ndimage.find_objects(bg), start=1):
        if sl is not None and k != outside:
            intervals.append((sl[0].start - 1, sl[0].stop - 1))   # rows t..b -> [t, b + 1]
    a, b, c, d = part[:-1, :-1], part[:-1, 1:], part[1:, :-1], part[1:, 1:]
    pinch = (a & d & ~b & ~c) | (b & c & ~a & ~d)
    intervals.extend((int(r) + 1, int(r) + 1) for r in np.unique(np.nonzero(pinch)[0]))
    cuts: list[int] = []
    for lo, hi in sorted(intervals, key=lambda t: (t[1], t[0])):
        if cuts and cuts[-1] >= lo:
            continue
        cuts.append(hi)
    return cuts


def simple_pieces(mask: np.ndarray, _depth: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
    """(row offset, column offset, piece mask) with one simple outline each; their union is mask."""
    m = np.asarray(mask, dtype=bool)
    lab, _ = ndimage.label(m, structure=FOUR)
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        part = lab[sl] == k
        y0, x0 = sl[0].start, sl[1].start
        cuts = _cut_rows(part)
        if not cuts:
            yield y0, x0, part
            continue
        if _depth > 64:  # pragma: no cover - every cut removes a hole or a pinch
            raise RuntimeError("polygon splitting did not converge")
        edges = [0, *cuts, part.shape[0]]
        for top, bottom in zip(edges, edges[1:]):
            if bottom > top:
                for dy, dx, piece in simple_pieces(part[top:bottom], _depth + 1):
                    yield y0 + top + dy, x0 + dx, piece


def _simplify(ring: np.ndarray, tolerance: float, max_area_change: float) -> np.ndarray:
    """Douglas-Peucker on one ring, keeping it valid and its area within max_area_change."""
    if tolerance <= 0 or len(ring) <= 4:
        return ring
    exact = shapely.Polygon(ring)
    area = exact.area
    tol = float(tolerance)
    while tol >= 0.125:
        simple = exact.simplify(tol, preserve_topology=True)
        if (isinstance(simple, shapely.Polygon) and not simple.is_empty and simple.is_valid
                and abs(simple.area - area) <= max_area_change * area):
            coords = np.asarray(simple.exterior.coords)[:-1]
            if len(coords) >= 3:
                return np.rint(coords).astype(np.int64)
        tol /= 2
    return ring


def mask_polygons(mask: np.ndarray, tolerance: float = DEFAULT_TOLERANCE,
                  max_area_change: float = MAX_AREA_CHANGE,
                  offset: tuple[int, int] = (0, 0)) -> list[list[int]]:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] of a mask: simple, valid rings, integer vertices.

    tolerance = 0 gives the exact pixel outlines. `offset` = (row, column) of mask[0, 0].
    """
    out: list[list[int]] = []
    oy, ox = offset
    for y0, x0, piece in simple_pieces(mask):
        [ring] = trace_loops(piece, connectivity=4)
        ring = _simplify(ring, tolerance, max_area_change)
        ring = ring + np.array([x0 + ox, y0 + oy], dtype=np.int64)
        out.append([int(v) for v in ring.reshape(-1)])
    return out
