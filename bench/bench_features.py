"""Benchmark: feature extraction speed versus the bare model, peak memory, KNN at scale.

1. Throughput (images/s) of ``core.features.extract_features`` for DINOv2 ViT-S/14 at short
   side 224 and 322, against a bare ``model.forward_features`` loop over the same images,
   already decoded, resized and batched (same batch size), measured in the same process,
   interleaved, several repeats. Overhead = pipeline time / bare time - 1 (target < 10 %).
2. Peak RSS of a fresh process extracting 2,000 images (target < 2 GB), with RSS sampled
   along the way to show it stays flat as N grows.
3. ``compute_knn`` on 100,000 x 384 pooled features: time and peak RSS of a fresh process.

Images: CamVid frames from ../shared/data/camvid when present (480x360), else synthetic
480x360 JPEGs. Results: bench/results/features.json and features.md.

    .venv/bin/python bench/bench_features.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

import torch

from core.backbones import create_backbone
from core.features import FeatureConfig, extract_features
from core.precision import autocast, resolve_precision
from core.images import load_image, resize_rgb, target_size

log = logging.getLogger("bench_features")
CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "train" / "images"
RESULTS = ROOT / "bench" / "results"


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_now_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: the latter survives exec and
    would report the parent's peak for a child started by subprocess."""
    peak = _status_mb("VmHWM")
    return peak if not math.isnan(peak) else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_images(folder: Path, n: int, size=(360, 480), seed: int = 0) -> list[Path]:
    """Smooth random colour JPEGs (photo-like file size and decode cost)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"syn{i:05d}.jpg"
        if not path.exists():
            small = rng.integers(0, 256, size=(size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            noise = rng.integers(-12, 13, size=(size[0], size[1], 3))
            arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def corpus(n: int, tmp: Path) -> tuple[list[Path], str]:
    if CAMVID.is_dir():
        files = sorted(p for p in CAMVID.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if len(files) >= n:
            return files[:n], f"CamVid train frames ({CAMVID})"
    return synthetic_images(tmp / "synthetic", n), "synthetic 480x360 JPEGs"


def bare_loop(model: torch.nn.Module, batches: list[torch.Tensor], precision: str = "float32"
              ) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of the bare forward loop, in the pipeline's precision."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), autocast("cpu", precision):
        for x in batches:
            model.forward_features(x)
    return time.perf_counter() - t0, time.process_time() - c0


def throughput(backbone, paths: list[Path], resolutions: list[int], batch_size: int, repeats: int,
               tmp: Path) -> list[dict]:
    rows = []
    for res in resolutions:
        # Bare model input: the same images, decoded/resized/normalised beforehand (not timed).
        tensors = []
        for p in paths:
            rgb = load_image(p)
            size = target_size(rgb.shape[0], rgb.shape[1], res, backbone.patch_size, 1024)
            tensors.append(backbone.preprocess(resize_rgb(rgb, size)))
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise RuntimeError(f"benchmark corpus must have one image size, got {shapes}")
        batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]
        cfg = FeatureConfig(backbone=backbone.spec.name, resolution=res, batch_size=batch_size)
        precision = resolve_precision(cfg.precision, backbone.device)   # both sides compute alike
        bare_loop(backbone.model, batches[:1], precision)  # warm-up
        bare_t, pipe_t, bare_cpu, pipe_cpu, loads = [], [], [], [], []
        for r in range(repeats):
            order = ("bare", "pipe") if r % 2 == 0 else ("pipe", "bare")
            for kind in order:
                if kind == "bare":
                    wall, cpu = bare_loop(backbone.model, batches, precision)
                    bare_t.append(wall)
                    bare_cpu.append(cpu)
                else:
                    cache = Path(tempfile.mkdtemp(dir=tmp, prefix=f"feat{res}_"))
                    t0, c0 = time.perf_counter(), time.process_time()
                    extract_features(paths, backbone, cfg, cache)
                    pipe_t.append(time.perf_counter() - t0)
                    pipe_cpu.append(time.process_time() - c0)
            loads.append(round(os.getloadavg()[0], 2))
            log.info("res %d repeat %d: bare %.2fs (cpu %.2fs) pipeline %.2fs (cpu %.2fs), load %.1f", res, r,
                     bare_t[-1], bare_cpu[-1], pipe_t[-1], pipe_cpu[-1], loads[-1])
        n = len(paths)
        row = {
            "resolution": res, "precision": precision, "input_hw": list(shapes.pop()[1:]), "n_images": n, "batch_size": batch_size,
            "bare_s": bare_t, "pipeline_s": pipe_t, "bare_cpu_s": bare_cpu, "pipeline_cpu_s": pipe_cpu,
            "loadavg_1min": loads,
            "overhead_cpu_best": min(pipe_cpu) / min(bare_cpu) - 1.0,
            "overhead_cpu_median": statistics.median(pipe_cpu) / statistics.median(bare_cpu) - 1.0,
            "bare_img_per_s_best": n / min(bare_t), "pipeline_img_per_s_best": n / min(pipe_t),
            "bare_img_per_s_median": n / statistics.median(bare_t),
            "pipeline_img_per_s_median": n / statistics.median(pipe_t),
            "overhead_best": min(pipe_t) / min(bare_t) - 1.0,
            "overhead_median": statistics.median(pipe_t) / statistics.median(bare_t) - 1.0,
        }
        rows.append(row)
    return rows


def rss_child(folder: Path, n: int, resolution: int, batch_size: int, cache: Path) -> dict:
    """Run in a fresh process: extract ``n`` images, report peak and sampled RSS."""
    paths = synthetic_images(folder, n)
    start_rss = _rss_now_mb()
    backbone = create_backbone("dinov2_vits14", device="cpu")
    after_model = _rss_now_mb()
    samples: list[tuple[int, float]] = []

    def progress(done: int, total: int) -> None:
        if not samples or done - samples[-1][0] >= max(1, total // 20) or done == total:
            samples.append((done, _rss_now_mb()))

    t0 = time.perf_counter()
    store = extract_features(paths, backbone, FeatureConfig(backbone="dinov2_vits14", resolution=resolution,
                                                            batch_size=batch_size), cache, progress=progress)
    seconds = time.perf_counter() - t0
    return {"n_images": n, "resolution": resolution, "batch_size": batch_size, "seconds": seconds,
            "img_per_s": n / seconds, "rss_start_mb": start_rss, "rss_after_model_mb": after_model,
            "peak_rss_mb": _peak_rss_mb(), "rss_samples_mb": samples,
            "store_gb": (store.root / "tokens.f16").stat().st_size / 1e9}


def knn_child(n: int, dim: int) -> dict:
    from core.knn import compute_knn

    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    base = _rss_now_mb()
    t0 = time.perf_counter()
    table = compute_knn(x, k=30)
    return {"n": n, "dim": dim, "k": int(table.shape[1]), "seconds": time.perf_counter() - t0,
            "rss_with_input_mb": base, "peak_rss_mb": _peak_rss_mb()}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "features.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Feature extraction benchmark", "",
        (f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
         f"{result['machine']['torch']} ({result['machine']['torch_threads']} threads); load average at start "
         f"{result['machine']['loadavg_start']}, at end {result['machine']['loadavg_end']} (shared machine: "
         "other jobs ran alongside, so absolute numbers are noisy; bare and pipeline runs are interleaved)."),
        f"Backbone: {result['backbone']} - weights: {result['weights_source']}.",
        f"Corpus: {result['corpus']}.", "",
        "## Throughput: pipeline vs bare `forward_features` loop (target overhead < 10 %)", "",
        ("| short side | input | precision | images | bare img/s (best / median) | pipeline img/s (best / median) | "
         "wall overhead (best / median) | CPU-time overhead (best / median) |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["throughput"]:
        lines.append(
            f"| {r['resolution']} | {r['input_hw'][0]}x{r['input_hw'][1]} | {r.get('precision', 'float32')} | "
            f"{r['n_images']} | "
            f"{r['bare_img_per_s_best']:.2f} / {r['bare_img_per_s_median']:.2f} | "
            f"{r['pipeline_img_per_s_best']:.2f} / {r['pipeline_img_per_s_median']:.2f} | "
            f"{100 * r['overhead_best']:+.1f} % / {100 * r['overhead_median']:+.1f} % | "
            f"{100 * r['overhead_cpu_best']:+.1f} % / {100 * r['overhead_cpu_median']:+.1f} % |")
    lines += ["", ("The pipeline time includes hashing the files, reading headers, decoding, resizing, the "
                   "forward passes, float16 conversion, pooling and writing the store; the bare loop only runs "
                   "the model on tensors prepared beforehand. CPU time is the process's user+system time "
                   "(all threads): it is far less sensitive than wall time to other jobs on a shared machine. "
                   f"1-minute load average after each repeat: "
                   f"{ {r['resolution']: r['loadavg_1min'] for r in result['throughput']} }. "
                   "A negative overhead means the difference is below this machine's noise: the "
                   "pipeline adds no measurable cost to the forward passes (decoding overlaps them)."), ""]
    if "rss" in result:
        lines += ["## Memory while extracting (target peak RSS < 2 GB)", ""]
        for r in result["rss"]:
            samples = ", ".join(f"{d}: {m:.0f}" for d, m in r["rss_samples_mb"])
            lines += [(f"{r['n_images']} synthetic 480x360 JPEGs at short side {r['resolution']} in a fresh "
                       f"process: peak RSS **{r['peak_rss_mb']:.0f} MB** (after loading the model: "
                       f"{r['rss_after_model_mb']:.0f} MB); {r['img_per_s']:.2f} img/s; store "
                       f"{r['store_gb']:.2f} GB on disk."), "",
                      f"RSS (MB) by images done: {samples}.", ""]
    if "knn" in result:
        k = result["knn"]
        lines += ["## KNN table", "",
                  (f"compute_knn on {k['n']:,} x {k['dim']} float32, k={k['k']}: {k['seconds']:.1f} s, peak RSS "
                   f"{k['peak_rss_mb']:.0f} MB (input alone {k['rss_with_input_mb']:.0f} MB)."), ""]
    (RESULTS / "features.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=48)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[224, 322])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-images", type=int, default=2000)
    ap.add_argument("--rss-resolution", type=int, default=224)
    ap.add_argument("--rss-extra", type=int, nargs=2, default=[200, 322], metavar=("IMAGES", "RES"),
                    help="a second, shorter RSS run (0 images to skip)")
    ap.add_argument("--knn-n", type=int, default=100_000)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-knn", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--keep", action="store_true",
                    help="keep the rss/knn sections of the previous results file when they are skipped")
    ap.add_argument("--rss-child", nargs=2, metavar=("FOLDER", "CACHE"), help=argparse.SUPPRESS)
    ap.add_argument("--knn-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.rss_child:
        print(json.dumps(rss_child(Path(args.rss_child[0]), args.rss_images, args.rss_resolution,
                                   args.batch_size, Path(args.rss_child[1]))))
        return
    if args.knn_child:
        print(json.dumps(knn_child(args.knn_n, 384)))
        return
    if args.quick:
        args.n_images, args.repeats, args.rss_images, args.knn_n, args.rss_extra = 8, 1, 40, 5000, [0, 0]

    with tempfile.TemporaryDirectory(prefix="bench_features_") as tmp_s:
        tmp = Path(tmp_s)
        load_start = os.getloadavg()
        backbone = create_backbone("dinov2_vits14", device="cpu")
        paths, what = corpus(args.n_images, tmp)
        result: dict = {
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "loadavg_start": [round(v, 2) for v in load_start]},
            "backbone": backbone.spec.name, "weights_source": backbone.weights_source, "corpus": what,
            "throughput": throughput(backbone, paths, args.resolutions, args.batch_size, args.repeats, tmp),
        }
        del backbone
        if not args.skip_rss:
            log.info("RSS run: %d images at %d in a fresh process ...", args.rss_images, args.rss_resolution)
            runs = [(args.rss_images, args.rss_resolution)]
            if args.rss_extra[0] > 0:
                runs.append(tuple(args.rss_extra))
            result["rss"] = []
            for n, res in runs:
                result["rss"].append(_child(["--rss-child", str(tmp / "rss_images"), str(tmp / f"rss_cache{res}"),
                                             "--rss-images", str(n), "--rss-resolution", str(res),
                                             "--batch-size", str(args.batch_size)]))
        if not args.skip_knn:
            log.info("KNN run: %d x 384 ...", args.knn_n)
            result["knn"] = _child(["--knn-child", "--knn-n", str(args.knn_n)])
        result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        previous = RESULTS / "features.json"
        if args.keep and previous.is_file():
            old = json.loads(previous.read_text())
            for section in ("rss", "knn"):
                if section not in result and section in old:
                    result[section] = old[section]
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
            if model:
                result["machine"]["cpu"] = model
        except OSError:
            pass
    write_results(result)
    log.info("Wrote %s and %s", RESULTS / "features.json", RESULTS / "features.md")


if __name__ == "__main__":
    main()
