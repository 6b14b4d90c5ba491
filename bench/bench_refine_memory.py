"""Benchmark: peak memory of propagation ("refine with names") against the number of images.

Each size runs in a fresh process: a synthetic feature store of N one-image items (24 x 24
tokens, float16, as the real store lays them out; planted classes), codes from a fixed
projection of the tokens (standing in for the trained head), 24 clusters of which 12 are named
(6 labels), then ``core.refinement.refine`` end to end: pseudo-labels, training (the app's
defaults), prediction of every image and its map written as a PNG (no CRF, one process: the
CRF's memory is per image and does not depend on N). Peak RSS (VmHWM) and, per stage, the
largest RSS and RssAnon (memory the process allocated, without the pages of the memory-mapped
token store) are recorded. Flat means the peak does not grow with N beyond per-image metadata.

    .venv/bin/python bench/bench_refine_memory.py [--sizes 2000 8000 32000] [--label after]
        [--json-out FILE] [--before FILE]

``--before FILE`` adds the rows of an earlier run of this script (for example made in a
worktree of an older commit, ``--label before``) to the report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_features import _status_mb  # noqa: E402  (VmRSS / VmHWM of this process)
from bench_scale import build_store  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GRID = 24
DIM = 96
CODE_DIM = 32
N_CLUSTERS = 24


def child(n: int, tmp: Path) -> dict:
    from core.features import FeatureStore
    from core.refinement import ClassSpace, RefineConfig, refine

    store_dir = tmp / f"store{n}"
    t0 = time.perf_counter()
    build_store(store_dir, n, grid=GRID, dim=DIM)
    build_s = time.perf_counter() - t0
    with open("/proc/self/clear_refs", "w") as f:   # the peak so far was building the store: reset it
        f.write("5")
    store = FeatureStore.open(store_dir)
    rng = np.random.default_rng(1)
    proj = rng.normal(size=(DIM, CODE_DIM)).astype(np.float32)

    def codes_of(i: int) -> np.ndarray:
        return np.asarray(store.tokens(i), dtype=np.float32) @ proj

    sample = np.concatenate([codes_of(i) for i in range(min(n, 200))])
    centroids = sample[rng.choice(sample.shape[0], N_CLUSTERS, replace=False)]
    clusters = [(k, f"label {k % 6}" if k < 12 else None, k >= 20) for k in range(N_CLUSTERS)]
    space = ClassSpace.of_clusters(clusters, str)
    side = GRID * 4
    paths = [tmp / "none.png"] * n
    sizes = [(side, side)] * n
    rss_start = _status_mb("VmRSS")
    rss: dict[str, float] = {}
    anon: dict[str, float] = {}

    def progress(stage: str, frac: float, info: dict) -> None:
        rss[stage] = max(rss.get(stage, 0.0), _status_mb("VmRSS"))
        anon[stage] = max(anon.get(stage, 0.0), _status_mb("RssAnon"))

    t0 = time.perf_counter()
    metrics = refine(store, codes_of, centroids, space, paths, sizes, tmp / f"out{n}",
                     RefineConfig(crf=False, n_jobs=1), progress=progress)
    tokens_gb = (store_dir / "tokens.f16").stat().st_size / 1e9
    return {"n": n, "tokens": int(store.meta["total_tokens"]), "tokens_gb": tokens_gb,
            "store_build_s": round(build_s, 1), "refine_s": round(time.perf_counter() - t0, 1),
            "rss_start_mb": round(rss_start, 1), "peak_rss_mb": round(_status_mb("VmHWM"), 1),
            "rss_by_stage_mb": {k: round(v, 1) for k, v in rss.items()},
            "anon_by_stage_mb": {k: round(v, 1) for k, v in anon.items()},
            "train_tokens": metrics["train_tokens"], "labelled_tokens": metrics["pseudo_tokens"],
            "timings": metrics["timings"]}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _table(rows: list[dict]) -> list[str]:
    out = ["| code | items | tokens (GB on disk) | labelled tokens | training tokens | peak RSS MB | RSS at start MB "
           "| RssAnon by stage MB | refine s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        anon = ", ".join(f"{k} {v:.0f}" for k, v in r["anon_by_stage_mb"].items())
        out.append(f"| {r['label']} ({r['commit']}) | {r['n']:,} | {r['tokens']:,} ({r['tokens_gb']:.2f}) "
                   f"| {r['labelled_tokens']:,} | {r['train_tokens']:,} | **{r['peak_rss_mb']:.0f}** "
                   f"| {r['rss_start_mb']:.0f} | {anon} | {r['refine_s']:.0f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--label", default="after")
    ap.add_argument("--json-out", type=Path, default=RESULTS / "refine_memory.json")
    ap.add_argument("--before", type=Path, help="rows of an earlier run of this script to report beside these")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tmp)))
        return
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench_refine_") as tmp:
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            res = subprocess.run([sys.executable, __file__, "--child", str(n), "--tmp", tmp], env=env,
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"size {n} failed:\n{res.stderr[-4000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row.update(label=args.label, commit=_commit())
            rows.append(row)
            print(json.dumps(row), flush=True)
    earlier = json.loads(args.before.read_text())["rows"] if args.before else []
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "grid": GRID, "dim": DIM,
              "clusters": N_CLUSTERS, "rows": rows, "before": earlier,
              "load_average_end": list(os.getloadavg())}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=1))
    md = ["# Propagation memory against the number of images", "",
          f"Machine: {report['machine']}, no GPU. `bench/bench_refine_memory.py`: synthetic store of N items of "
          f"{GRID}x{GRID} tokens ({DIM} dims, float16), {N_CLUSTERS} clusters (12 named, 6 labels), "
          "`core.refinement.refine` with the app's training defaults, no CRF, one process, each size in a fresh "
          "process.", "", *_table(earlier + rows), "",
          "RSS counts the pages of the memory-mapped token store that were read (the kernel can drop them); "
          "RssAnon is what the process allocated itself. Per image the stage keeps only counts (3 integers) and "
          "the store's own index; the training set is capped at the Propagator's `max_tokens` (300,000)."]
    args.json_out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
