"""The ``evaluate`` command: fit the app's pipeline on a labelled split and score it with ``core.evaluate``.

    python app.py evaluate --train-images T/images --train-masks T/masks \\
        --images V/images --masks V/masks --classes 11 --ignore 11 --out bench/results/camvid_eval

The pipeline is fitted (features, KNN, head, clusters) in a run directory under
``<cache>/eval_runs/<key>`` keyed by its settings and images, so a second run with the same
settings reuses it; then ``core.evaluate.evaluate`` writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

from core.correspondence import DEFAULT_THRESHOLD
from core.evaluate import CHECKED_PICKS, CORRECTION_WEIGHT, EvalSettings, Report, evaluate, pair_images_and_masks
from core.pipeline import PipelineConfig, StegoPipeline
from core.pixel_head import DEFAULT_PIXEL_HEAD_WEIGHT
from core.precision import PRECISIONS
from core.selection import DEFAULT_PICK
from core.shifts import auto_neg_factor
from core.training import PAPER_SHIFTS
from stego_app.cli_settings import add_settings_arguments, settings_from_args

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "fit_pipeline", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the evaluate command's options on ``parser``."""
    g = parser.add_argument_group("data")
    g.add_argument("--images", "--val-images", dest="images", required=True, type=Path, help="folder of images to score")
    g.add_argument("--masks", "--val-masks", dest="masks", required=True, type=Path,
                   help="folder of label PNGs (same stem as the images) for the scored images")
    g.add_argument("--train-images", type=Path, default=None,
                   help="folder of images to fit on (default: the scored images)")
    g.add_argument("--train-masks", type=Path, default=None,
                   help="label PNGs of the training images, for the supervised linear probes")
    g.add_argument("--classes", type=int, required=True, help="number of classes (labels 0..N-1)")
    g.add_argument("--ignore", type=int, default=255, help="label value to ignore (values >= --classes are ignored too)")
    g.add_argument("--class-names", default=None, help="comma-separated class names for the report")
    g.add_argument("--max-images", type=int, default=None, help="use only the first N images of each folder")
    g.add_argument("--score-every", type=int, default=1,
                   help="score every N-th scored image only (a subset of the fitting images reuses their features)")
    add_settings_arguments(parser, default_text={"n_clusters": "--classes (the Hungarian rows need K = C)",
                                                 "crf": "on (--no-crf skips the CRF rows)"})
    m = parser.add_argument_group("how the pipeline runs")
    m.add_argument("--weights", default=None, help="explicit backbone checkpoint file")
    m.add_argument("--device", default="auto")
    m.add_argument("--precision", default="auto", choices=PRECISIONS)
    m.add_argument("--compare-paper-shifts", action="store_true",
                   help="also fit with the paper's ViT-S shifts (0.18/0.12/0.46) and report it")
    m.add_argument("--jobs", type=int, default=2, help="worker processes for scoring and CRF")
    e = parser.add_argument_group("evaluation")
    e.add_argument("--k-multiples", default="1,2,4,8", help="over-clustering sweep: K = each multiple x --classes")
    e.add_argument("--kmeans-samples", type=int, default=None,
                   help="tokens the evaluation's own k-means are fitted on (default: the pipeline's)")
    e.add_argument("--kmeans-n-init", type=int, default=None, help="k-means restarts (default: 20 at K = C, 5 above)")
    e.add_argument("--no-probes", action="store_true", help="skip the supervised linear probes")
    e.add_argument("--no-propagation", action="store_true", help="skip the propagation rows")
    e.add_argument("--propagate-k", default=None, help="comma-separated K values to propagate (default: all)")
    e.add_argument("--propagate-from", default="stego", choices=("stego", "raw"))
    e.add_argument("--propagation", default="{}", help="JSON of core.propagation.Propagator keyword arguments")
    e.add_argument("--propagation-crf", default="{}",
                   help="JSON of core.crf.CRFParams keyword arguments for the propagated rows' CRF")
    e.add_argument("--find-missing", action="store_true",
                   help="also propagate after a click-to-find stand-in: finds for each class no cluster was "
                        "named after, clicked on the scored tokens that class fills most")
    e.add_argument("--find-clicks", type=int, default=1,
                   help="clicks per class left unnamed with --find-missing, each in another scored image "
                        "(each counts as a naming action; default 1)")
    e.add_argument("--find-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"similarity threshold of those finds (default {DEFAULT_THRESHOLD}, the app's)")
    e.add_argument("--checked", default=None, metavar="N[,N...]",
                   help="also propagate after a person checked N scored images (their true labels become "
                        "seeds, as corrected images imported from an annotation tool); scored on the others")
    e.add_argument("--checked-pick", choices=CHECKED_PICKS, default=DEFAULT_PICK,
                   help=f"how those N images are picked (default {DEFAULT_PICK}, as the app suggests them; "
                        "even: spread evenly over the list; random: at random, from --seed)")
    e.add_argument("--checked-batches", action="store_true",
                   help="take the --checked counts as successive batches, as the app gives them after each "
                        "import (5,10: the first 5, then the next 5 that leave those out); default: each "
                        "count picked afresh")
    e.add_argument("--pixel-head-weights", default=None, metavar="W[,W...]|none",
                   help="the checked rows also with a pixel head (core.pixel_head: colour + upsampled feature, "
                        "trained on the checked images' pixels), its log-probabilities added at each weight "
                        f"(default with --checked: {DEFAULT_PIXEL_HEAD_WEIGHT}, the app's; none: no such rows)")
    e.add_argument("--seed-weight", type=float, default=CORRECTION_WEIGHT,
                   help=f"loss weight of the checked images' tokens (default {CORRECTION_WEIGHT}, the app's)")
    e.add_argument("--predict-resolution", type=int, default=None,
                   help="short side of the features the propagated rows predict on (default: the run's "
                        "resolution; more finds thinner things, extracts the scored images' features again)")
    e.add_argument("--predict-dense", action="store_true",
                   help="the propagated rows predict on a token grid twice as dense: each scored image seen "
                        "four times, shifted by a quarter patch (same token scale; four backbone passes per image)")
    o = parser.add_argument_group("output")
    o.add_argument("--cache-dir", type=Path, default=None,
                   help="where weights, features and fitted runs are cached (default: $STEGO_CACHE_DIR)")
    o.add_argument("--out", type=Path, default=Path("evaluation"), help="output path without extension")


def fit_pipeline(config: PipelineConfig, images: list[Path], cache: Path, progress=None) -> StegoPipeline:
    """Fit (or reuse) the pipeline of ``config`` on ``images`` in ``<cache>/eval_runs/<key>``."""
    key = hashlib.sha1(json.dumps([config.to_dict(), [str(p) for p in images]], sort_keys=True).encode())
    run_dir = cache / "eval_runs" / key.hexdigest()[:16]
    pipe = StegoPipeline(config, run_dir, cache)
    pipe.fit(images, progress=progress)
    return pipe


def sweep_pipelines(pipe: StegoPipeline, sweep: Sequence[int], images: list[Path], cache: Path
                    ) -> dict[int, StegoPipeline]:
    """K -> the pipeline whose head a run of K clusters trains, for the K of the sweep whose head differs
    from ``pipe``'s: with automatic shifts the random pairs attract more in runs of few clusters
    (core.shifts.auto_neg_factor), so the over-clustered rows are scored on the head the app would train."""
    tcfg = pipe.config.train
    if tcfg.shift_neg is not None:
        return {}                       # the random pairs' shift given: the factor changes nothing
    by_factor = {tcfg.auto_shift_neg_factor: pipe}
    out = {}
    for K in sweep:
        factor = auto_neg_factor(K)
        if factor not in by_factor:
            train = dataclasses.replace(tcfg, auto_shift_neg_factor=factor)
            by_factor[factor] = fit_pipeline(dataclasses.replace(pipe.config, train=train), images, cache)
        if by_factor[factor] is not pipe:
            out[K] = by_factor[factor]
    return out


def pixel_head_weights(value: str | None, checked: bool) -> tuple[float, ...]:
    """``--pixel-head-weights``: left out, the app's weight when there are checked rows (what *Refine
    with names* does with corrected images); ``none``: no pixel-head rows."""
    if value is None:
        return (DEFAULT_PIXEL_HEAD_WEIGHT,) if checked else ()
    if value.strip().lower() == "none":
        return ()
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--pixel-head-weights takes numbers separated by commas, or none; got {value!r}") from None


def run(args: argparse.Namespace) -> Report:
    """Fit and evaluate as described by parsed ``args``; write OUT.json / OUT.md; return the report."""
    from core.weights import default_cache_dir

    C = int(args.classes)
    images, masks = pair_images_and_masks(args.images, args.masks, args.max_images)
    if args.score_every < 1:
        raise ValueError("--score-every must be >= 1")
    px_weights = pixel_head_weights(args.pixel_head_weights, bool(args.checked))
    if args.train_images is not None:
        if args.train_masks is None:
            raise ValueError("--train-images needs --train-masks (for the linear probes)")
        fit_images, fit_masks = pair_images_and_masks(args.train_images, args.train_masks, args.max_images)
    else:
        fit_images, fit_masks = images, masks
    cache = Path(args.cache_dir or default_cache_dir())
    settings = settings_from_args(args, n_clusters=C, crf=True)   # the CRF rows: on unless --no-crf
    if settings.backbone is None:
        from core.backbones import default_backbone_name

        settings = settings.replace(backbone=default_backbone_name(cache, checkpoint=args.weights))
    items = len(fit_images) * (5 if settings.crop_mode == "five" else 1)
    pcfg = dataclasses.replace(   # the CRF rows are the evaluation's own (settings.crf)
        PipelineConfig.from_settings(settings, backbone=settings.backbone, n_train_items=items, device=args.device,
                                     precision=args.precision, checkpoint=args.weights, n_jobs=args.jobs),
        crf=False)
    tcfg = pcfg.train
    pipe = fit_pipeline(pcfg, fit_images, cache)
    compare = {}
    if args.compare_paper_shifts:
        paper = dataclasses.replace(tcfg, shift_self=PAPER_SHIFTS["self"], shift_knn=PAPER_SHIFTS["knn"],
                                    shift_neg=PAPER_SHIFTS["neg"])
        compare["paper_shifts"] = fit_pipeline(dataclasses.replace(pcfg, train=paper), fit_images, cache)
    settings = EvalSettings(
        n_classes=C, ignore_index=args.ignore,
        class_names=tuple(args.class_names.split(",")) if args.class_names else None,
        k_multiples=tuple(int(v) for v in args.k_multiples.split(",")), crf=settings.crf,
        propagate=not args.no_propagation, kmeans_samples=args.kmeans_samples, kmeans_n_init=args.kmeans_n_init,
        probes=not args.no_probes,
        propagate_k=tuple(int(v) for v in args.propagate_k.split(",")) if args.propagate_k else None,
        propagate_from=args.propagate_from, propagation=json.loads(args.propagation),
        propagation_crf=json.loads(args.propagation_crf), n_jobs=args.jobs,
        find_missing=args.find_missing, find_clicks=args.find_clicks, find_threshold=args.find_threshold,
        checked=tuple(int(v) for v in args.checked.split(",")) if args.checked else (), seed_weight=args.seed_weight,
        checked_pick=args.checked_pick, checked_batches=args.checked_batches,
        pixel_head_weights=px_weights,
        predict_resolution=args.predict_resolution, predict_dense=args.predict_dense,
        seed=settings.seed)
    report = evaluate(pipe, images[::args.score_every], masks[::args.score_every], settings, fit_masks=fit_masks,
                      compare=compare, sweep_pipelines=sweep_pipelines(pipe, settings.sweep, fit_images, cache))
    report.write(Path(args.out))
    log.info("wrote %s.json and %s.md", args.out, args.out)
    return report


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(prog="python -m stego_app.evaluate_cli", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(args)


if __name__ == "__main__":
    main()
