"""Benchmark: a first look at the Demo project with the app's default settings (issue 13, item 11).

A fresh data folder with the Demo project the server creates on start (scikit-image's photographs), a run
started with ``RunSettings()`` (every default of core/settings.py: best available backbone,
322 px, 88 clusters, automatic steps, CRF on), through the app's own services and worker, as
the Discover tab's *Start discovery* does. Only the converted backbone weights are reused
(``--weights-cache``: converting them is a one-time install step); features are extracted anew.
Results: bench/results/demo.json and demo.md (target: about a minute on a 2-core CPU).

    python bench/bench_demo.py [--weights-cache DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET_S = 60.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights-cache", type=Path, default=Path(os.environ["STEGO_CACHE_DIR"]) if os.environ.get("STEGO_CACHE_DIR") else None,
                    help="a cache folder whose weights/ holds converted backbone weights (default $STEGO_CACHE_DIR)")
    ap.add_argument("--out", default="demo")
    args = ap.parse_args()

    from core.settings import RunSettings
    from stego_app import projects, runs
    from stego_app.config import AppConfig
    from stego_app.context import create_context

    tmp = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    cache = tmp / "cache"
    cache.mkdir()
    if args.weights_cache and (args.weights_cache / "weights").is_dir():
        os.symlink((args.weights_cache / "weights").resolve(), cache / "weights")
    try:
        ctx = create_context(AppConfig(data_dir=tmp / "data", cache_dir=cache, demo=True))
        try:
            demo = projects.ensure_demo_project(ctx)          # what `app.py serve` does on start
            t0 = time.perf_counter()
            info = runs.start_run(ctx, demo.id, RunSettings())
            done = runs.wait_for_run(ctx, info.id, timeout=3600)
            wall = time.perf_counter() - t0
        finally:
            ctx.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert done.status == "done", done.error
    result = {
        "images": done.n_images, "status": done.status, "wall_s": round(wall, 1),
        "timings_s": {k: round(float(v), 1) for k, v in done.timings.items()},
        "settings": done.params.to_dict(), "backbone": done.backbone, "weights": done.weights_source,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "target_s": TARGET_S,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result["timings_s"].items())
    met = "met" if wall <= TARGET_S * 1.5 else "not met"
    (RESULTS / f"{args.out}.md").write_text(
        "# Demo project, default settings (bench_demo.py)\n\n"
        f"{done.n_images} images, backbone {done.backbone}, {done.params.resolution} px, "
        f"{done.params.n_clusters} clusters, {done.params.steps} steps (automatic), CRF "
        f"{'on' if done.params.crf else 'off'}; {os.cpu_count()} cores, load average at the end "
        f"{result['load_average_at_end'][0]:.1f}.\n\n"
        f"**{wall:.0f} s** from Start to a finished run (about a minute wanted: {met}).\n\n"
        f"Stages: {stages}.\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
