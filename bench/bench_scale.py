"""Benchmark: the pipeline at 100k items: KNN (exact vs approximate), peak RSS of a whole run,
the Ray path at 1 and 2 workers, and a paper estimate for 1M images.

1. KNN on synthetic pooled features (N x 384, clustered like real pooled features: mixtures in a
   low-dimensional subspace plus isotropic noise), each method in a fresh process: FAISS exact
   (flat inner product), IVF-Flat (nprobe 16) and HNSW; recall@30 against the exact table. The
   former chunked torch search is re-timed at a smaller N for a same-load comparison (its 100k
   time, 192 s, is in bench/results/features.json).
2. Peak RSS of the driver's whole run after features (knn -> training -> clustering -> segments,
   no CRF) on a synthetic feature store of N items (4x4 tokens of 384 dims, float16, as the
   real store lays them out), N = 20k and 100k, each in a fresh process: flat means the peak
   does not grow with N beyond the O(N) tables (pooled features and the KNN index).
3. The Ray path (core.distributed) on a local cluster (``--ray auto``, 2 CPUs) at 1 and 2
   workers against the single-process pipeline, on CamVid frames with DINOv2 ViT-S/14: stage
   times, per-image costs.
4. An estimate for 1M images on N GPU nodes from the measured per-image costs (written to the
   .md; the GPU forward speed is an assumption, no GPU was used).

    .venv/bin/python bench/bench_scale.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_scale")
RESULTS = ROOT / "bench" / "results"
PARTIAL = Path(os.environ.get("BENCH_SCALE_PARTIAL", "/tmp/bench_scale_partial.jsonl"))
CAMVID = ROOT.parent / "shared" / "data" / "camvid" / "train" / "images"


from bench_features import _status_mb  # noqa: E402  (VmRSS / VmHWM of this process)


def synthetic_pooled(n: int, d: int = 384, seed: int = 0, centres: int = 500, latent: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(latent, d)).astype(np.float32)
    c = rng.normal(size=(centres, latent)).astype(np.float32)
    z = c[rng.integers(centres, size=n)] + 0.6 * rng.normal(size=(n, latent)).astype(np.float32)
    x = z @ basis + 0.5 * rng.normal(size=(n, d)).astype(np.float32) + 3.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ------------------------------------------------------------------------------------ KNN

def knn_child(n: int, method: str, exact_path: str | None) -> dict:
    from core.knn import compute_knn, recall_at_k

    x = synthetic_pooled(n)
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if method == "torch_chunked":
        from tests.test_knn import _torch_chunked

        table = _torch_chunked(x, 30, rows=max(1, (256 << 20) // (4 * n)))
        info = None
    else:
        table, info = compute_knn(x, k=30, method=method, return_info=True)
    seconds = time.perf_counter() - t0
    out = {"n": n, "method": method, "seconds": seconds, "rss_with_input_mb": base, "peak_rss_mb": _status_mb("VmHWM"),
           "info": info.to_dict() if info else None}
    if exact_path and Path(exact_path).is_file():
        out["recall_at_30"] = recall_at_k(table, np.load(exact_path))
    elif exact_path:
        np.save(exact_path, table)
        out["recall_at_30"] = 1.0
    return out


# ------------------------------------------------------------------------ whole run RSS

def build_store(root: Path, n: int, grid: int = 4, dim: int = 384, seed: int = 0) -> None:
    """A complete synthetic FeatureStore of n one-image items (planted classes, float16)."""
    from core.features import (BOXES, DONE, FORMAT_VERSION, INDEX, META, POOLED, SIZES, TOKENS, FeatureConfig)

    root.mkdir(parents=True, exist_ok=True)
    patch = 14
    t = grid * grid
    index = np.zeros((n, 5), np.int64)
    index[:, 0] = np.arange(n) * t
    index[:, 1:3] = grid
    index[:, 3] = np.arange(n)
    np.save(root / INDEX, index)
    np.save(root / BOXES, np.tile(np.array([0, 0, grid * patch, grid * patch], np.int64), (n, 1)))
    np.save(root / SIZES, np.full((n, 2), grid * patch, np.int64))
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(12, dim)).astype(np.float32)
    tokens = np.memmap(root / TOKENS, dtype=np.float16, mode="w+", shape=(n * t, dim))
    pooled = np.memmap(root / POOLED, dtype=np.float32, mode="w+", shape=(n, dim))
    step = 4096
    for s in range(0, n, step):
        e = min(n, s + step)
        a = rng.integers(12, size=(e - s, 1))
        b = rng.integers(12, size=(e - s, 1))
        lab = np.where(np.arange(t)[None, :] % grid < grid // 2, a, b)       # left/right halves
        tok = protos[lab] + 0.5 * rng.normal(size=(e - s, t, dim)).astype(np.float32) + 0.5
        tokens[s * t:e * t] = tok.reshape(-1, dim).astype(np.float16)
        p = tok.mean(axis=1)
        pooled[s:e] = p / np.linalg.norm(p, axis=1, keepdims=True)
    tokens.flush()
    pooled.flush()
    del tokens, pooled
    np.ones(n, np.uint8).tofile(root / DONE)
    cfg = FeatureConfig(backbone="dinov2_vits14", resolution=grid * patch, max_long_side=1024, precision="float32")
    meta = {"format": FORMAT_VERSION, "config": asdict(cfg), "backbone": "dinov2_vits14", "weights_id": "synthetic",
            "weights_source": "synthetic", "precision": "float32", "embed_dim": dim, "patch_size": patch,
            "n_images": n, "n_items": n, "total_tokens": n * t, "image_hashes": [], "image_paths": []}
    (root / META).write_text(json.dumps(meta))


def run_child(n: int, tmp: Path, steps: int, segments: bool) -> dict:
    """In a fresh process: the pipeline's stages after features on a synthetic n-item store
    (without ``segments``: stopped, through the pipeline's own cancel check, before that stage)."""
    from core.errors import Cancelled
    from core.features import FeatureConfig
    from core.pipeline import PipelineConfig, StegoPipeline
    from core.training import TrainConfig

    store = tmp / f"store{n}"
    t0 = time.perf_counter()
    build_store(store, n)
    build_s = time.perf_counter() - t0
    rss_start = _status_mb("VmRSS")
    run = tmp / f"run{n}"
    run.mkdir(parents=True, exist_ok=True)
    cfg = PipelineConfig(features=FeatureConfig(backbone="dinov2_vits14", resolution=56, precision="float32"),
                         train=TrainConfig(steps=steps, batch_size=16, feature_samples=4, checkpoint_every=10_000),
                         n_clusters=12, crf=False, device="cpu", cluster_n_init=2, n_jobs=1)
    paths = [f"/synthetic/{i:07d}.jpg" for i in range(n)]
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "images.json").write_text(json.dumps(paths))
    (run / "state.json").write_text(json.dumps({"done": ["features"], "timings": {}, "cache_root": str(tmp),
                                                "stores": {"train": str(store), "infer": str(store)},
                                                "weights_source": "synthetic"}))
    samples: dict[str, float] = {}
    anon: dict[str, float] = {}          # RssAnon: what the process allocated, without mapped file pages
    finished: list[str] = []

    def progress(stage: str, frac: float, info: dict) -> None:
        samples[stage] = max(samples.get(stage, 0.0), _status_mb("VmRSS"))
        anon[stage] = max(anon.get(stage, 0.0), _status_mb("RssAnon"))
        if "seconds" in info:
            finished.append(stage)

    def stop() -> bool:
        return not segments and "clustering" in finished

    try:
        StegoPipeline(cfg, run, tmp).fit([Path(p) for p in paths], progress=progress, cancel=stop)
    except Cancelled:
        pass
    timings = json.loads((run / "state.json").read_text())["timings"]
    return {"n": n, "store_build_s": build_s, "rss_start_mb": rss_start, "peak_rss_mb": _status_mb("VmHWM"),
            "rss_by_stage_mb": samples, "anon_by_stage_mb": anon, "timings": timings, "steps": steps, "segments": segments,
            "tokens_gb": (store / "tokens.f16").stat().st_size / 1e9}


# ------------------------------------------------------------------------------- Ray path

def ray_child(n_images: int, resolution: int, tmp: Path) -> dict:
    from core.distributed import RayConfig, RayEngine
    from core.features import FeatureConfig
    from core.pipeline import PipelineConfig, StegoPipeline
    from core.training import TrainConfig

    files = sorted(p for p in CAMVID.iterdir() if p.suffix.lower() in (".png", ".jpg"))[:n_images]
    weights_cache = Path(os.environ.get("STEGO_CACHE_DIR", Path.home() / ".cache" / "stego-labeler"))

    def config() -> PipelineConfig:
        return PipelineConfig(features=FeatureConfig(backbone="dinov2_vits14", resolution=resolution, flip=True),
                              train=TrainConfig(steps=20, batch_size=8), n_clusters=8, crf=True, device="cpu",
                              cluster_n_init=2, n_jobs=2)

    import shutil

    from PIL import Image

    def fresh_cache(name: str) -> Path:
        """An empty feature cache (so every engine really extracts) holding the converted weights."""
        root = tmp / name
        (root / "weights").mkdir(parents=True, exist_ok=True)
        for f in (weights_cache / "weights").glob("dinov2_vits14*"):
            shutil.copy(f, root / "weights" / f.name)
        return root

    rows = []
    local = StegoPipeline(config(), tmp / "run_local", fresh_cache("cache_local")).fit(files)
    rows.append({"engine": "one process (segments/CRF: 2 worker processes)", "workers": 1,
                 "timings": local.timings})
    for workers in (1, 2):
        eng = RayEngine(RayConfig(address="auto", num_workers=workers, cpus_per_worker=2 // workers, num_cpus=2,
                                  object_store_mb=300, shard_items=8))
        t0 = time.perf_counter()
        with eng:
            start_s = time.perf_counter() - t0
            res = StegoPipeline(config(), tmp / f"run_ray{workers}", fresh_cache(f"cache_ray{workers}"),
                                engine=eng).fit(files)
            rows.append({"engine": f"Ray, {workers} worker(s) x {2 // workers} CPU", "workers": workers,
                         "cluster_start_s": start_s, "timings": res.timings,
                         "features_stats": eng.last_stats.get("features", {})})
        rows[-1]["segments_identical_to_one_process"] = all(
            np.array_equal(np.asarray(Image.open(tmp / "run_local" / "segments_crf" / f"{i:06d}.png")),
                           np.asarray(Image.open(tmp / f"run_ray{workers}" / "segments_crf" / f"{i:06d}.png")))
            for i in range(len(files)))
    return {"n_images": len(files), "resolution": resolution, "flip": True, "rows": rows}


# ------------------------------------------------------------------------------- driver

def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False,
                         cwd=str(ROOT))
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate(result: dict) -> dict:
    """1M images on N GPU nodes, from the measured per-image costs (see the .md for the assumptions)."""
    ray_rows = result.get("ray", {}).get("rows", [])
    n_img = result.get("ray", {}).get("n_images", 1)
    local = ray_rows[0]["timings"] if ray_rows else {}
    cpu_feat = local.get("features", float("nan")) / n_img          # s/img on this 2-core machine
    cpu_seg = (local.get("segments", 0) + local.get("crf", 0)) / n_img * 2   # CPU-seconds/img (2 workers)
    knn = {r["method"]: r for r in result["knn"] if r["n"] == max(x["n"] for x in result["knn"])}
    ivf_100k = knn.get("ivf", {}).get("seconds", float("nan"))
    knn_1m = ivf_100k * 10 ** 1.5                                   # IVF cost ~ N^1.5 (nlist ~ sqrt N)
    try:  # the same stages measured on a quieter machine (bench_crf / bench_features)
        crf = json.loads((RESULTS / "crf.json").read_text())
        crf_cpu_s = 1.0 / max(r["images_per_s"] for r in crf["rows"] if r["crf_at"] != "full" and r["n_jobs"] == 1)
        feats = json.loads((RESULTS / "features.json").read_text())
        feat_224 = 1.0 / max(r["pipeline_img_per_s_best"] for r in feats["throughput"] if r["resolution"] == 224)
    except (OSError, KeyError, ValueError):
        crf_cpu_s, feat_224 = cpu_seg, cpu_feat
    cpu_seg_quiet = crf_cpu_s
    gpu_img_s = 400.0     # ASSUMPTION: ViT-S/14 + flip at short side 224, bf16, one data-centre GPU
    cores = 16            # ASSUMPTION: CPU cores per GPU node for decode, segments and CRF
    rows = []
    for nodes in (1, 4, 16):
        feat = 1e6 / (gpu_img_s * nodes)
        seg = 1e6 * cpu_seg_quiet / (cores * nodes)
        rows.append({"nodes": nodes, "features_h": feat / 3600, "segments_crf_h": seg / 3600,
                     "knn_h": knn_1m / 3600, "driver_fixed_h": 0.5,
                     "total_h": (feat + seg + knn_1m) / 3600 + 0.5})
    return {"cpu_features_s_per_image": cpu_feat, "cpu_segments_crf_cpu_s_per_image": cpu_seg,
            "quiet_crf_cpu_s_per_image": crf_cpu_s, "quiet_features_s_per_image_224_noflip": feat_224,
            "ivf_100k_s": ivf_100k, "knn_1m_s_extrapolated": knn_1m, "assumed_gpu_img_per_s": gpu_img_s,
            "assumed_cores_per_node": cores, "rows": rows}


STAGING_NOTE = ("Shards staged here in the feature store's own folder. Staging in an object store "
                "(`--ray-staging s3://bucket/prefix`) is covered by tests/test_distributed.py against moto's S3 "
                "server on 127.0.0.1 (cancel, resume from the bucket, same tokens as one process), not timed; "
                "no real S3 was reachable.")


def _load_words(m: dict) -> str:
    """How busy the machine was, from the 1-minute load averages at start and end."""
    load = max(m["load_start"][0], m["load_end"][0])
    return ("quiet: only this benchmark ran" if load <= 1.5 * m["cores"] else
            "a shared machine: other jobs ran alongside")


def write_md(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    L = ["# Scale benchmark: 100k items, FAISS, flat memory, Ray", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; load average at start {m['load_start']}, at end "
         f"{m['load_end']} ({_load_words(m)}). `bench/bench_scale.py`.", "",
         "## KNN table (k = 30), synthetic clustered pooled features, 384 dims", "",
         "| N | method | seconds | recall@30 vs exact | estimated recall (512 queries) | peak RSS MB (input alone) |",
         "| --- | --- | --- | --- | --- | --- |"]
    def num(v, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for r in result["knn"]:
        est = (r.get("info") or {}).get("recall_estimate")
        rss = f"{num(r.get('peak_rss_mb'), '.0f')} ({num(r.get('rss_with_input_mb'), '.0f')})"
        note = f" ({r['note']})" if r.get("note") else ""
        L.append(f"| {r['n']:,} | {r['method']}{note} | {r['seconds']:.1f} | {num(r.get('recall_at_30'), '.4f')} | "
                 f"{num(est, '.4f')} | {rss} |")
    L += ["", ("The former hand-written chunked torch search took 192.3 s on 100,000 x 384 "
               "(bench/results/features.json); `torch_chunked` rows re-time it here under today's load. "
               "`auto` uses exact search up to `core.knn.EXACT_MAX_ITEMS` = 20,000 items and IVF beyond: "
               "from the rows above, exact grows as N^2 and IVF stays at seconds with recall@30 about 0.99."), ""]
    L += ["## Peak RSS of a whole run after features (fresh process each)", "",
          "| items | tokens on disk | peak RSS MB | RSS at start MB | RSS by stage MB | of it anonymous (RssAnon) MB "
          "| stage seconds |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        by = ", ".join(f"{k} {v:.0f}" for k, v in r["rss_by_stage_mb"].items())
        an = ", ".join(f"{k} {v:.0f}" for k, v in r.get("anon_by_stage_mb", {}).items()) or "-"
        t = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
        L.append(f"| {r['n']:,} | {r['tokens_gb']:.2f} GB | **{r['peak_rss_mb']:.0f}** | {r['rss_start_mb']:.0f} | {by} "
                 f"| {an} | {t} |")
    L += ["", ("Stages: knn (auto), training (%d steps), clustering (100k sampled codes, 2 restarts), segments "
               "(no CRF, in-process; only for the smallest store: it streams one image at a time and took about "
               "0.1 s per item here, so the larger runs stop before it through the pipeline's cancel "
               "check). What still grows with N: the pooled features and the KNN index (two float32 "
               "copies of N x 384, 154 MB each per 100k items), the KNN table (N x 30 int64, 24 MB per 100k) and the "
               "per-image segment statistics (N x K); token statistics (clustering sample, shifts) are sampled and "
               "stay fixed. RSS also counts the pages of the memory-mapped token store the stages have read (file "
               "pages the kernel can drop); RssAnon is the memory the process allocated itself." %
               result["runs"][0]["steps"]), ""]
    if "ray" in result:
        ray_r = result["ray"]
        L += [f"## Ray path: {ray_r['n_images']} CamVid frames, DINOv2 ViT-S/14, short side {ray_r['resolution']}, "
              "flip on, CRF on; local cluster (`--ray auto`, 2 CPUs)", "",
              "| engine | features s | segments+CRF s | training s | clustering s | segments identical |",
              "| --- | --- | --- | --- | --- | --- |"]
        for r in ray_r["rows"]:
            t = r["timings"]
            L.append(f"| {r['engine']} | {t.get('features', 0):.1f} | {t.get('segments', 0) + t.get('crf', 0):.1f} | "
                     f"{t.get('training', 0):.1f} | {t.get('clustering', 0):.1f} | "
                     f"{r.get('segments_identical_to_one_process', '-')} |")
        L += ["", ("On one 2-core machine Ray cannot add cores: 1 worker x 2 threads vs 2 workers x 1 thread shows the "
                   "engine's overhead and how the work splits, not a speed-up. Feature times include starting the "
                   "actors and loading the backbone in each."), "", STAGING_NOTE, ""]
    e = result["estimate"]
    L += ["## Estimate: 1M images on N GPU nodes (on paper)", "",
          (f"Measured in this run ({_load_words(m)}): features {e['cpu_features_s_per_image']:.3f} s/image "
           f"(flip on, 2 CPU cores); segments + CRF {e['cpu_segments_crf_cpu_s_per_image']:.3f} CPU-s/image. On a quieter "
           f"machine (bench/results/crf.json, features.json): CRF job {e['quiet_crf_cpu_s_per_image']:.3f} CPU-s/image "
           f"(used below), features {e['quiet_features_s_per_image_224_noflip']:.3f} s/image at 224 without flip. IVF KNN {e['ivf_100k_s']:.1f} s at 100k, "
           f"extrapolated as N^1.5 to {e['knn_1m_s_extrapolated'] / 60:.0f} min at 1M (driver). Assumed, not "
           f"measured (no GPU was lent to this work): {e['assumed_gpu_img_per_s']:.0f} images/s per GPU node for "
           f"the forward passes (decode on {e['assumed_cores_per_node']} cores) and "
           f"{e['assumed_cores_per_node']} cores per node for segments + CRF; training and clustering are fixed "
           "cost on the driver (about 0.5 h, independent of N)."), "",
          "| nodes | features h | segments + CRF h | KNN h (driver) | training+clustering h | total h |",
          "| --- | --- | --- | --- | --- | --- |"]
    for r in e["rows"]:
        L.append(f"| {r['nodes']} | {r['features_h']:.2f} | {r['segments_crf_h']:.2f} | {r['knn_h']:.2f} | "
                 f"{r['driver_fixed_h']:.2f} | {r['total_h']:.2f} |")
    L += ["", ("For comparison, this 2-core machine alone: 1M x features %.3f s = %.0f h (quiet-machine cost, no flip)." %
               (e["quiet_features_s_per_image_224_noflip"], 1e6 * e["quiet_features_s_per_image_224_noflip"] / 3600)), ""]
    (RESULTS / "scale.md").write_text("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--knn-sizes", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--run-sizes", type=int, nargs="+", default=[3000, 20_000, 100_000])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--segments-max", type=int, default=3000,
                    help="run the segments stage only for stores up to this many items (it streams per image)")
    ap.add_argument("--ray-images", type=int, default=16)
    ap.add_argument("--ray-resolution", type=int, default=224)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.child:
        kind, *rest = args.child
        if kind == "knn":
            out = knn_child(int(rest[0]), rest[1], rest[2] if len(rest) > 2 else None)
        elif kind == "run":
            out = run_child(int(rest[0]), Path(rest[1]), int(rest[2]), rest[3] == "1")
        else:
            out = ray_child(int(rest[0]), int(rest[1]), Path(rest[2]))
        with open(PARTIAL, "a") as f:      # kept even if the parent is stopped before it writes the results
            f.write(json.dumps({"kind": kind, **out}) + "\n")
        print(json.dumps(out))
        return
    if args.quick:
        args.knn_sizes, args.run_sizes, args.steps, args.ray_images = [5000], [3000], 5, 8
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result: dict = {"machine": {"cpu": cpu, "cores": os.cpu_count(),
                                "load_start": [round(v, 2) for v in os.getloadavg()]}}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp_s:
        tmp = Path(tmp_s)
        result["knn"] = []
        for n in args.knn_sizes:
            exact = str(tmp / f"exact{n}.npy")
            for method in ("exact", "ivf") + (("hnsw",) if n == min(args.knn_sizes) else ()):
                log.info("knn %s at %d", method, n)
                result["knn"].append(_child(["--child", "knn", str(n), method, exact]))
            if n == min(args.knn_sizes):
                log.info("knn torch_chunked at %d", n)
                result["knn"].append(_child(["--child", "knn", str(n), "torch_chunked", exact]))
        result["runs"] = []
        for n in args.run_sizes:
            log.info("whole run at %d items", n)
            seg = "1" if n <= args.segments_max else "0"
            result["runs"].append(_child(["--child", "run", str(n), str(tmp / f"r{n}"), str(args.steps), seg]))
            import shutil

            shutil.rmtree(tmp / f"r{n}", ignore_errors=True)
        if not args.skip_ray and CAMVID.is_dir():
            log.info("Ray path on %d images", args.ray_images)
            result["ray"] = _child(["--child", "ray", str(args.ray_images), str(args.ray_resolution), str(tmp / "ray")])
    result["machine"]["load_end"] = [round(v, 2) for v in os.getloadavg()]
    result["estimate"] = estimate(result)
    write_md(result)
    log.info("wrote %s", RESULTS / "scale.md")


if __name__ == "__main__":
    main()
