"""Benchmark: the whole pipeline on the 468 CamVid train+val frames, raw files to CRF segments,
then propagation ("refine with names").

``core.pipeline.StegoPipeline.fit`` with DINOv2 ViT-S/14 at short side 322 in a fresh feature
cache (only the converted weights are reused: converting them is a one-time install step),
the app's default run settings (``core.settings.DEFAULTS``: automatic steps, its default K,
CRF on), both cores. With ``--propagate`` (the default) each cluster is then named by the
majority class of its pixels in the CamVid masks (the stand-in for a careful person; not
timed) and ``core.refinement.refine`` runs with its defaults, as the app's Refine stage does.
Reports each stage's time and share, the totals, the ratio to the discovery-only reference
(``--reference``, the earlier end_to_end.json: 500 steps, 11 clusters; target at most 2x), and
the peak RSS of the main process and of the worker processes.
Results: bench/results/<out>.json and <out>.md.

    .venv/bin/python bench/bench_end_to_end.py [--steps N] [--clusters K] [--no-propagate]
        [--precision auto|float32|bfloat16] [--crf-resolution N] [--out NAME] [--keep DIR]
    (the earlier discovery-only row: --steps 500 --clusters 11 --no-propagate --out end_to_end)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Heavy imports live in main(): the CRF worker processes (spawn) re-import this module.
log = logging.getLogger("bench_end_to_end")
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
RESULTS = ROOT / "bench" / "results"
TARGET_S = 300.0
N_CLASSES, VOID = 11, 11          # CamVid's 11 classes; mask value 11 is unlabelled


class RssSampler(threading.Thread):
    """Samples every 0.5 s this process's RSS, its children's (worker) RSS, and their sum."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak_total_mb = 0.0
        self.peak_worker_mb = 0.0

    @staticmethod
    def _rss_mb(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _children(self) -> list[int]:
        try:
            with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def run(self) -> None:
        while not self.stop.wait(0.5):
            workers = [self._rss_mb(c) for c in self._children()]
            self.peak_worker_mb = max([self.peak_worker_mb, *workers])
            self.peak_total_mb = max(self.peak_total_mb, self._rss_mb(os.getpid()) + sum(workers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the app's automatic choice)")
    ap.add_argument("--clusters", type=int, default=None, help="clusters (default: the app's)")
    ap.add_argument("--propagate", action=argparse.BooleanOptionalAction, default=True,
                    help="name clusters by majority and run the propagation stage after discovery")
    ap.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                    help="the discovery run's CRF over the clusters (default: the app's); propagation always has one")
    ap.add_argument("--reference", type=Path, default=RESULTS / "end_to_end.json",
                    help="an earlier result to compare the total with (target: at most 2x its total)")
    ap.add_argument("--resolution", type=int, default=322)
    ap.add_argument("--precision", default="auto", help="backbone precision (auto, float32, bfloat16)")
    ap.add_argument("--crf-resolution", type=int, default=None,
                    help="CRF short side (default: the features' resolution; 0: full 480x360)")
    ap.add_argument("--out", default="end_to_end", help="result file name (without extension) in bench/results")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run and cache here instead of a temp dir")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from core.pipeline import STAGES, PipelineConfig, StegoPipeline
    from core.precision import resolve_precision
    from core.settings import DEFAULTS
    from core.weights import default_cache_dir, weights_dir

    paths = sorted((CAMVID / "train" / "images").glob("*.jpg")) + sorted((CAMVID / "val" / "images").glob("*.jpg"))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="stego_e2e_"))
    if args.keep and work.exists():
        shutil.rmtree(work)
    cache = work / "cache"
    src = weights_dir(default_cache_dir())
    if not any(src.glob("dinov2_vits14.*")):
        raise SystemExit(f"no converted dinov2_vits14 weights in {src}: run the app once (or "
                         "`python -c \"from core.backbones import create_backbone; create_backbone('dinov2_vits14')\"`)")
    shutil.copytree(src, cache / "weights")
    settings = DEFAULTS.replace(resolution=args.resolution, crf=DEFAULTS.crf if args.crf is None else args.crf,
                                crf_resolution=args.crf_resolution,
                                **({"steps": args.steps} if args.steps else {}),
                                **({"n_clusters": args.clusters} if args.clusters else {}))
    config = PipelineConfig.from_settings(settings, backbone="dinov2_vits14", n_train_items=len(paths),
                                          device="cpu", precision=args.precision, n_jobs=2)
    args.steps, args.clusters = config.train.steps, config.n_clusters
    load_start = os.getloadavg()
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    result = StegoPipeline(config, work / "run", cache).fit(paths)
    discovery = time.perf_counter() - t0
    propagation = None
    if args.propagate:
        space, names = _majority_space(work / "run", paths, config.n_clusters, "crf" if config.crf else "plain")
        t1 = time.perf_counter()
        prop_metrics = _propagate(work / "run", paths, space, config)
        propagation = time.perf_counter() - t1
        t_score = time.perf_counter()
        quality = _scores(work / "run", paths, names)
        log.info("scoring (not counted) %.1f s", time.perf_counter() - t_score)
    total = discovery + (propagation or 0.0)
    sampler.stop.set()
    sampler.join()
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stage_total = sum(result.timings.values())
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads)",
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "images": len(paths), "backbone": "dinov2_vits14", "weights_source": result.weights_source,
        "resolution": args.resolution, "steps": args.steps, "clusters": args.clusters, "discovery_crf": config.crf,
        "precision": resolve_precision(config.features.precision, "cpu"), "crf_short_side": config.crf_short_side,
        "stages_s": {s: round(result.timings.get(s, 0.0), 1) for s in STAGES},
        "stages_share": {s: round(result.timings.get(s, 0.0) / stage_total, 3) for s in STAGES},
        "discovery_s": round(discovery, 1), "propagation_s": None if propagation is None else round(propagation, 1),
        "total_s": round(total, 1), "target_s": TARGET_S, "passed": total < TARGET_S,
        "peak_rss_main_mb": round(main_peak, 1), "peak_rss_largest_worker_mb": round(sampler.peak_worker_mb, 1),
        "peak_rss_sum_sampled_mb": round(sampler.peak_total_mb, 1),
        "shifts": result.shifts,
    }
    reference = json.loads(args.reference.read_text()) if args.reference.is_file() and args.propagate else None
    if reference is not None:
        report["reference"] = {"file": args.reference.name, "total_s": reference["total_s"],
                               "steps": reference["steps"], "clusters": reference["clusters"]}
        report["ratio_to_reference"] = round(total / reference["total_s"], 2)
    if args.propagate:
        report["propagation"] = {"classes": space.n_classes, "metrics": prop_metrics, **quality}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1))
    rows = [f"| {s} | {report['stages_s'][s]:.1f} | {100 * report['stages_share'][s]:.1f} % |" for s in STAGES]
    md = [
        "# End to end: 468 CamVid frames, raw files to CRF-refined segments",
        "",
        f"Machine: {report['machine']}; load average at start {report['load_average_start']}, at end "
        f"{report['load_average_end']} (shared machine: other jobs ran alongside, so times are noisy).",
        f"DINOv2 ViT-S/14 at short side {args.resolution} - weights: {result.weights_source}.",
        f"{len(paths)} images (CamVid train + val, 480x360 JPEG), fresh feature cache, {args.steps} training steps, "
        f"{args.clusters} clusters, 2 worker processes. Backbone forward in {report['precision']} "
        + ("(`precision='auto'`: bfloat16 autocast on CPUs with native bfloat16 matrix units, float32 elsewhere); "
           if args.precision == "auto" else f"(`--precision {args.precision}`); ")
        + ("CRF over the clusters in discovery (`--crf`): " if config.crf else
           "No CRF over the clusters in discovery (the app's default); the propagation stage's CRF: ")
        + (f"CRF with the paper's parameters on the image at the inference size (short side "
           f"{report['crf_short_side']}, as the paper does), its marginals upsampled bilinearly to 480x360."
           if report["crf_short_side"] else "CRF with the paper's parameters at the full 480x360 resolution."),
        "",
        "| stage | seconds | share |",
        "| --- | --- | --- |",
        *rows,
        "",
        *_propagation_lines(report, discovery, propagation),
        f"Total wall time: **{total:.0f} s** (target < {TARGET_S:.0f} s: {'met' if total < TARGET_S else 'NOT met'}).",
        f"Peak RSS: main process {main_peak:.0f} MB; largest worker process {sampler.peak_worker_mb:.0f} MB and "
        f"main + workers {sampler.peak_total_mb:.0f} MB (sampled every 0.5 s).",
        *(["With CRF on, one pass computes each image's cluster map and its CRF refinement (one decode, one "
           "probability map per image); the pipeline splits that pass's time by the CRF's measured share "
           "into the segments and crf rows."] if config.crf else []),
        "",
        "Reproduce: `.venv/bin/python bench/bench_end_to_end.py " + " ".join(sys.argv[1:]) + "`"
        + ("" if args.propagate else " (discovery only)") + "; the earlier discovery-only reference: "
        "`--steps 500 --clusters 11 --no-propagate --out end_to_end`; float32 and the CRF at full resolution: "
        "`--precision float32 --crf-resolution 0 --out end_to_end_fp32_fullres_crf`.",
        "",
    ]
    (RESULTS / f"{args.out}.md").write_text("\n".join(md))
    log.info("total %.1f s; wrote %s", total, RESULTS / f"{args.out}.md")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _mask_paths(paths: list[Path]) -> list[Path]:
    return [p.parent.parent / "masks" / (p.stem + ".png") for p in paths]


def _counts(maps, masks, n_rows: int):
    """(n_rows, C + 1) pixels of each map value per true class, void last (CamVid: 11 classes, 11 = void)."""
    from core.evaluate import load_mask
    from core.metrics import ConfusionMatrix, with_void

    cm = ConfusionMatrix(n_rows, N_CLASSES + 1)
    for seg, mask_path in zip(maps, masks):
        cm.update(seg, with_void(load_mask(mask_path), N_CLASSES, VOID))
    return cm.matrix


def _majority_space(run_dir: Path, paths: list[Path], n_clusters: int, kind: str):
    """Each cluster named by the majority class of its pixels (``kind`` maps); mostly-void clusters ignored."""
    from core.metrics import majority_names
    from core.refinement import ClassSpace
    from core.rundir import RunDir

    rd = RunDir(run_dir)
    counts = _counts((rd.read_segments(i, kind) for i in range(len(paths))), _mask_paths(paths), n_clusters)
    names = majority_names(counts)
    clusters = [(k, int(n) if n >= 0 else None, bool(n < 0)) for k, n in enumerate(names)]
    return ClassSpace.of_clusters(clusters, lambda cls: f"class {cls}"), names


def _propagate(run_dir: Path, paths: list[Path], space, config) -> dict:
    """The app's Refine stage on the run: core.refinement.refine with its defaults."""
    from core.features import FeatureStore
    from core.pipeline import StegoPipeline, item_codes
    from core.refinement import RefineConfig, refine
    from core.rundir import RunDir

    rd = RunDir(run_dir)
    pipe = StegoPipeline.load(run_dir)
    store = FeatureStore.open(Path(json.loads(rd.state_json.read_text())["stores"]["infer"]))
    sizes = [(int(h), int(w)) for h, w in store.image_sizes()]      # one whole-image item per image

    def codes_of(i: int):
        codes = item_codes(pipe.head, store, i)
        return codes.reshape(-1, codes.shape[-1])

    settings = RefineConfig(crf=True, crf_resolution=config.crf_short_side, n_jobs=2, device="cpu")
    return refine(store, codes_of, pipe.centroids, space, paths, sizes, rd.segments_dir("refined"), settings)


def _scores(run_dir: Path, paths: list[Path], names) -> dict:
    """mIoU / pixel accuracy of the named cluster maps (with and without the CRF) and of the
    propagated maps (same names), on all images and on the train and val ones apart."""
    from core.metrics import named_scores
    from core.rundir import RunDir

    rd = RunDir(run_dir)
    masks = _mask_paths(paths)
    kinds = {"named_crf": "crf", "named_no_crf": "plain", "propagated": "refined"}
    out: dict = {"scored_on": "the 468 train + val images the run was fitted on (the product's protocol); "
                              "the train rows alone are the choosing split's"}
    counts: dict = {"train": {}, "val": {}}         # each map read once; "all" is their sum
    for part in counts:
        idx = [i for i, p in enumerate(paths) if p.parent.parent.name == part]
        for row, kind in kinds.items():
            if rd.has_segments(kind):
                counts[part][row] = _counts((rd.read_segments(i, kind) for i in idx), [masks[i] for i in idx],
                                            len(names))
    counts = {"all": {row: counts["train"][row] + counts["val"][row] for row in counts["train"]}, **counts}
    for part, rows in counts.items():
        out[part] = {}
        for row, matrix in rows.items():
            sc = named_scores(matrix, names)
            out[part][row] = {"miou": sc["miou"], "accuracy": sc["accuracy"]}
    return out


def _propagation_lines(report: dict, discovery: float, propagation: float | None) -> list[str]:
    if propagation is None:
        return []
    p = report["propagation"]
    lines = [f"Discovery {discovery:.0f} s, then propagation {propagation:.0f} s ({p['classes']} classes from "
             f"majority naming, not timed; `core.refinement.refine` with its defaults, CRF on)."]
    if "reference" in report:
        ref = report["reference"]
        lines.append(f"Against the discovery-only reference ({ref['file']}: {ref['steps']} steps, {ref['clusters']} "
                     f"clusters, {ref['total_s']:.0f} s): **{report['ratio_to_reference']:.2f}x** "
                     f"(target at most 2x: {'met' if report['ratio_to_reference'] <= 2 else 'NOT met'}).")
    lines.append(f"Quality (mIoU / pixel accuracy, %) on {p['scored_on']}:")
    lines += ["", "| images | " + " | ".join(p["all"]) + " |", "| --- |" + " --- |" * len(p["all"])]
    for part in ("all", "train", "val"):
        lines.append(f"| {part} | " + " | ".join(f"{100 * v['miou']:.1f} / {100 * v['accuracy']:.1f}"
                                                 for v in p[part].values()) + " |")
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
