"""Peak memory and time of one large image's maps: discovery's segments (with and without the CRF)
and *Refine with names* (propagated classes + CRF), at the app's 88 clusters.

Each case runs in a fresh process (``python bench_large_image.py --case NAME``) and reports its
peak resident memory, so the cases do not share a high-water mark. Synthetic inputs of the sizes a
run gives: token codes (23 x 34 x 70) and centroids for the segments, token log-probabilities of 88
classes for the propagated map, on a JPEG of the chosen size.

Usage: python bench/bench_large_image.py [--width 6000 --height 4000 --clusters 88]
       [--out bench/results/large_image]   -> OUT.md, OUT.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("segments", "segments_crf", "refined_crf")


def _image(path: Path, width: int, height: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (height // 50, width // 50, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)


def run_case(case: str, image: Path, width: int, height: int, k: int) -> dict:
    from core.crf import ClusterMapJob, cluster_map
    from core.propagation import ClassMapJob, class_map

    rng = np.random.default_rng(1)
    grid = (23, 34)
    t0 = time.perf_counter()
    if case.startswith("segments"):
        job = ClusterMapJob(codes=rng.normal(size=(*grid, 70)).astype(np.float32),
                            centroids=rng.normal(size=(k, 70)).astype(np.float32), size=(height, width),
                            alpha=10.0, crf=case.endswith("crf"), image_path=str(image), crf_resolution=322)
        out = cluster_map(job)
        shape = (out.labels if out.labels is not None else out.labels_crf).shape
    else:
        lp = np.log(rng.dirichlet(np.ones(k), size=grid)).astype(np.float32)
        out = class_map(ClassMapJob(lp, (height, width), str(image), crf=True, crf_resolution=322, plain=False))
        shape = out.labels_crf.shape
    return {"case": case, "seconds": round(time.perf_counter() - t0, 2), "shape": list(shape),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=6000)
    p.add_argument("--height", type=int, default=4000)
    p.add_argument("--clusters", type=int, default=88)
    p.add_argument("--case", choices=CASES)
    p.add_argument("--image", type=Path, default=Path("/tmp/bench_large_image.jpg"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "large_image")
    a = p.parse_args()
    if a.case:
        print("RESULT " + json.dumps(run_case(a.case, a.image, a.width, a.height, a.clusters)))
        return
    _image(a.image, a.width, a.height)
    rows = []
    for case in CASES:
        res = subprocess.run([sys.executable, __file__, "--case", case, "--image", str(a.image),
                              "--width", str(a.width), "--height", str(a.height), "--clusters", str(a.clusters)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))[7:]))
        print(rows[-1], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"width": a.width, "height": a.height, "clusters": a.clusters, "rows": rows}
    a.out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    lines = [f"# One {a.width}x{a.height} image, {a.clusters} clusters: peak memory per case", "",
             "`bench/bench_large_image.py`; each case in its own process (peak resident memory of that process).",
             "No backbone: synthetic token codes (23 x 34 x 70) and class log-probabilities, on a generated JPEG;"
             " the CRF at short side 322, as the app runs it.", "",
             "| case | seconds | peak RSS (MB) |", "| --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['seconds']} | {r['peak_rss_mb']} |" for r in rows]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
