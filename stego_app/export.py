"""Export a run's pseudo-labels (segments + the label mapping) for annotation tools.

Layout of <data_dir>/exports/<export_id>/ (and of the zip beside it)::

    annotations/instances_default.json        COCO: images, categories, annotations
    annotations/panoptic_default.json         (option) COCO panoptic JSON
    annotations/panoptic_default/<name>.png   (option) panoptic PNGs, id = R + 256 G + 256^2 B
    images/<file_name>                        (option) the images, as CVAT/Datumaro expect
    labels/<name>.png                         (option) category id per pixel, 0 = none
    labels/categories.json                    (option) id -> name, colour for the label PNGs
    label_studio/tasks.json                   (option) Label Studio tasks with predictions
    label_studio/label_config.xml             (option) the matching labelling config
    manifest.json                             image id, name as ingested, file_name, PNGs
    stego_run<run>_export<id>.zip             everything above, for download

Categories and masks come from stego_app.masks (the same path as seed annotations):
COCO id = Label.id (stable), merged clusters form one category, ignored clusters are
void. Thing labels give one annotation per connected region, stuff labels one per image.
Images are streamed one at a time; every file is byte-identical for identical input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update

from core.rundir import RunDir
from stego_app import coco, corrections, masks, polygons, refinement, segmaps, to_correct
from stego_app import label_studio as ls_files
from stego_app.db import as_utc
from stego_app.processes import hostname, owner_tag, pid_alive, split_owner
from stego_app.errors import NotFound, UserError
from stego_app.export_files import copy_image, export_file_names, png_name
from stego_app.labels.mapping import get_done_run
from stego_app.labels.views import read_segments
from stego_app.masks import UNNAMED_CATEGORY_BASE, CategoryPlan, ClusterEntry, Region
from stego_app.models import IMAGE_REMOVED, Cluster, Export, Image, Label, Project, Run, RunImage, utcnow
from stego_app.render import hex_to_rgb

log = logging.getLogger(__name__)

__all__ = ["ExportOptions", "ExportInfo", "export_run", "get_export", "list_exports",
           "UNNAMED_CATEGORY_BASE", "mark_abandoned_exports"]

STYLES = ("masks", "polygons")
STYLE_ALIASES = {"stuff": "masks", "instance": "polygons"}     # names before thing/stuff labels
INSTANCES_JSON = "annotations/instances_default.json"
PANOPTIC_JSON = "annotations/panoptic_default.json"
PANOPTIC_DIR = "annotations/panoptic_default"
IMAGES_DIR = "images"
LABELS_DIR = "labels"
LS_TASKS = "label_studio/tasks.json"
LS_CONFIG = "label_studio/label_config.xml"
MANIFEST = "manifest.json"
EXPORT_RUNNING, EXPORT_DONE, EXPORT_FAILED = "running", "done", "failed"
EXPORT_STALE_AFTER = timedelta(hours=24)   # a 'running' export older than this is abandoned
MAX_TOLERANCE = 10.0
_COMPRESSED_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".jp2", ".tif", ".tiff"}

Progress = Callable[[int, int], None]


def _opt(default: Any, help: str, label: str, choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field carrying its CLI/UI help text (one home for each option's words)."""
    return field(default=default, metadata={"help": help, "label": label, "choices": choices})


@dataclass(frozen=True)
class ExportOptions:
    """What to export. See docs/export.md."""

    style: str = _opt("masks", "masks: pixel-exact COCO RLE (CVAT masks, brush editing); polygons: "
                      "editable outlines (CVAT/Label Studio polygons)", "COCO segmentation", STYLES)
    crf: bool = _opt(True, "use the CRF-refined segments when the run has them", "CRF-refined segments")
    confirmed_only: bool = _opt(False, "only images a person marked as checked", "confirmed images only")
    min_area: int = _opt(64, "thing labels: leave out objects smaller than this many pixels",
                         "smallest object (pixels)")
    tolerance: float = _opt(polygons.DEFAULT_TOLERANCE, "polygons: simplify outlines by up to this many "
                            "pixels (area kept within 1%); 0 = exact pixel outlines", "polygon tolerance (px)")
    stuff_iscrowd: int = _opt(1, "masks: iscrowd of stuff regions; 1 = COCO-stuff convention, 0 = usable "
                              "as COCOeval ground truth", "iscrowd of stuff masks", (0, 1))
    include_images: bool = _opt(False, "put the images in images/ beside annotations/ (needed by CVAT "
                                "project import and Datumaro)", "include images")
    panoptic: bool = _opt(False, "also COCO panoptic: a JSON file plus one PNG per image",
                          "COCO panoptic")
    label_pngs: bool = _opt(False, "also one PNG per image with the category id of each pixel",
                            "label PNGs")
    label_studio: bool = _opt(False, "also Label Studio tasks with predictions and the labelling config",
                              "Label Studio tasks")
    ls_regions: str = _opt("brush", "Label Studio regions: brush (pixel-exact masks) or polygons "
                           "(editable outlines)", "Label Studio regions", ls_files.REGION_KINDS)
    ls_image_prefix: str = _opt(ls_files.DEFAULT_IMAGE_PREFIX, "Label Studio: URL put before each "
                                "image's file_name (default: Label Studio's local-files serving)",
                                "Label Studio image URL prefix")
    include_unnamed: bool = _opt(False, "export unnamed clusters as 'cluster N' categories",
                                 "include unnamed clusters")
    refined: bool = _opt(True, "use the maps refined with names (propagation) when the run has them for "
                         "every image; off = the discovered segments", "maps refined with names")
    to_correct: int = _opt(0, "only the N images to correct first: the most typical image of each of N groups "
                           "of similar images, most useful first (0 = every image). Images whose corrections "
                           "are already imported are left out, so asking again gives the next batch. Correct "
                           "them in your annotation tool and import them back (Clusters → Import corrected "
                           "annotations)",
                           "images to correct first")
    removed_images: bool = _opt(False, "also the images removed from the project after the run (the run "
                                "keeps them; by default an export leaves them out)", "images removed since the run")

    def __post_init__(self) -> None:
        object.__setattr__(self, "style", STYLE_ALIASES.get(self.style, self.style))

    def validate(self) -> None:
        """Raise UserError for a value a person can fix."""
        if self.style not in STYLES:
            raise UserError(f"export style {self.style!r} must be one of {', '.join(STYLES)}")
        if isinstance(self.min_area, bool) or not isinstance(self.min_area, int) or self.min_area < 0:
            raise UserError(f"minimum area {self.min_area!r} must be a whole number >= 0")
        if (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                or not 0 <= self.tolerance <= MAX_TOLERANCE):
            raise UserError(f"polygon tolerance {self.tolerance!r} must be between 0 and {MAX_TOLERANCE:g} pixels")
        if self.stuff_iscrowd not in (0, 1) or isinstance(self.stuff_iscrowd, bool):
            raise UserError(f"iscrowd of stuff masks {self.stuff_iscrowd!r} must be 0 or 1")
        if self.ls_regions not in ls_files.REGION_KINDS:
            raise UserError(f"Label Studio regions {self.ls_regions!r} must be one of "
                            f"{', '.join(ls_files.REGION_KINDS)}")
        if isinstance(self.to_correct, bool) or not isinstance(self.to_correct, int) or self.to_correct < 0:
            raise UserError(f"images to correct first {self.to_correct!r} must be a whole number >= 0 "
                            "(0 = export every image)")
        if not isinstance(self.ls_image_prefix, str) or any(c in self.ls_image_prefix for c in "\n\r\t"):
            raise UserError("the Label Studio image URL prefix must be one line of text")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def option_fields() -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, default, {help, label, choices}) of every export option, in order (CLI and UI)."""
    return [(f.name, f.default if f.default is not MISSING else None, dict(f.metadata))
            for f in fields(ExportOptions)]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The export options as command-line flags (bool True -> --no-x, bool False -> --x)."""
    for name, default, meta in option_fields():
        flag = name.replace("_", "-")
        meta = {**meta, "help": meta["help"].replace("%", "%%")}
        if isinstance(default, bool):
            if default:
                parser.add_argument(f"--no-{flag}", dest=name, action="store_false", help=meta["help"])
            else:
                parser.add_argument(f"--{flag}", dest=name, action="store_true", help=meta["help"])
        else:
            parser.add_argument(f"--{flag}", dest=name, type=type(default), default=default,
                                choices=meta["choices"] if name != "style" else None,
                                help=meta["help"] + (f" (default {default})" if default != "" else ""))


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(**{name: getattr(args, name) for name, _, _ in option_fields() if hasattr(args, name)})


@dataclass(frozen=True)
class ExportInfo:
    """One export as recorded in the database."""

    id: int
    run_id: int
    status: str                      # running | done | failed
    options: ExportOptions
    crf_used: bool                   # CRF segments were used (asked for and available)
    directory: Path | None
    zip_path: Path | None
    json_path: Path | None
    panoptic_json_path: Path | None
    labels_dir: Path | None
    n_images: int
    n_annotations: int
    n_categories: int
    mapping_version: int
    error: str | None
    created_at: datetime | None
    finished_at: datetime | None
    warnings: tuple[str, ...] = ()   # things a person should know about this export
    images_dir: Path | None = None
    label_studio_tasks: Path | None = None
    label_studio_config: Path | None = None
    manifest_path: Path | None = None
    refined_used: bool = False       # refined (propagated) maps were exported
    to_correct_images: tuple[str, ...] = ()   # with to_correct: the file names exported, most useful first
    to_correct_done: int = 0         # with to_correct: images left out because their corrections are imported

    @property
    def maps_used(self) -> str:
        """Which segment maps the export holds: "refined", "CRF" or "raw"."""
        return "refined" if self.refined_used else ("CRF" if self.crf_used else "raw")


def _paths(directory: Path | None, options: ExportOptions) -> dict[str, Path | None]:
    if directory is None:
        return dict.fromkeys(("json", "panoptic", "labels", "images", "ls_tasks", "ls_config", "manifest"))
    return {"json": directory / INSTANCES_JSON,
            "panoptic": directory / PANOPTIC_JSON if options.panoptic else None,
            "labels": directory / LABELS_DIR if options.label_pngs else None,
            "images": directory / IMAGES_DIR if options.include_images else None,
            "ls_tasks": directory / LS_TASKS if options.label_studio else None,
            "ls_config": directory / LS_CONFIG if options.label_studio else None,
            "manifest": directory / MANIFEST}


def _warnings(recorded: dict[str, Any]) -> tuple[str, ...]:
    out = []
    if recorded.get("crf_missing"):
        out.append("the run was made with CRF, but CRF-refined segments are missing for some "
                   "images; the raw segments were exported")
    stale = recorded.get("stale")
    if stale is None:        # exports recorded before the reasons were (refinement.stale_reasons)
        stale = refinement.stale_reasons(1 if recorded.get("refined_stale") else None, 0,
                                         int(recorded.get("corrections_pending") or 0))
    out += list(stale)
    empty = int(recorded.get("empty_images") or 0)
    if empty:
        out.append(f"{empty} image{'s' if empty != 1 else ''} got no annotation (only ignored or "
                   "unnamed clusters there, or objects below the minimum area)")
    renamed = recorded.get("renamed") or []
    if renamed:
        shown = ", ".join(f"{a} -> {b}" for a, b in renamed[:5])
        more = f" and {len(renamed) - 5} more" if len(renamed) > 5 else ""
        out.append(f"{len(renamed)} image{'s' if len(renamed) != 1 else ''} would share a file name with "
                   f"another image, so {'they are' if len(renamed) != 1 else 'it is'} exported as: "
                   f"{shown}{more} (all names: manifest.json)")
    return tuple(out)


def _info(row: Export) -> ExportInfo:
    options = ExportOptions.from_dict(row.options or {})
    directory = Path(row.directory) if row.directory else None
    done = row.status == EXPORT_DONE and directory is not None
    paths = _paths(directory if done else None, options)
    return ExportInfo(id=row.id, run_id=row.run_id, status=row.status, options=options,
                      crf_used=bool((row.options or {}).get("crf_used", False)),
                      directory=directory, zip_path=Path(row.path) if row.path else None,
                      json_path=paths["json"], panoptic_json_path=paths["panoptic"],
                      labels_dir=paths["labels"], n_images=row.n_images,
                      n_annotations=row.n_annotations, n_categories=row.n_categories,
                      mapping_version=row.mapping_version, error=row.error,
                      created_at=as_utc(row.created_at), finished_at=as_utc(row.finished_at),
                      warnings=_warnings(row.options or {}) if row.status == EXPORT_DONE else (),
                      images_dir=paths["images"], label_studio_tasks=paths["ls_tasks"],
                      label_studio_config=paths["ls_config"], manifest_path=paths["manifest"],
                      refined_used=bool((row.options or {}).get("refined_used", False)),
                      to_correct_images=tuple((row.options or {}).get("to_correct_images") or ()),
                      to_correct_done=int((row.options or {}).get("to_correct_done") or 0))


def get_export(ctx, export_id: int) -> ExportInfo:
    """One export by id."""
    with ctx.db.read() as s:
        row = s.get(Export, export_id)
        if row is None:
            raise NotFound(f"export {export_id} does not exist")
        return _info(row)


def list_exports(ctx, run_id: int) -> list[ExportInfo]:
    """Exports of a run, newest first."""
    with ctx.db.read() as s:
        if s.get(Run, run_id) is None:
            raise NotFound(f"run {run_id} does not exist")
        rows = s.execute(select(Export).where(Export.run_id == run_id)
                         .order_by(Export.id.desc())).scalars().all()
        return [_info(r) for r in rows]


@dataclass(frozen=True)
class _Item:
    image_id: int
    position: int
    name: str                        # as ingested
    file_name: str                   # unique name in the export
    path: Path
    width: int
    height: int


def _load_snapshot(ctx, run_id: int, options: ExportOptions):
    """Everything the export reads from the database, in one read transaction."""
    with ctx.db.read() as s:
        run = get_done_run(s, run_id, needs="only finished runs can be exported")
        project = s.get(Project, run.project_id)
        rows = s.execute(select(Cluster, Label).outerjoin(Label, Cluster.label_id == Label.id)
                         .where(Cluster.run_id == run_id).order_by(Cluster.index)).all()
        clusters = [ClusterEntry(c.index, c.label_id, lab.name if lab else None,
                                 lab.colour if lab else None, lab.isthing if lab else None,
                                 bool(c.ignored), c.colour)
                    for c, lab in rows]
        rows = s.execute(select(RunImage, Image).join(Image, RunImage.image_id == Image.id)
                         .where(RunImage.run_id == run_id).order_by(RunImage.position)).all()
        names = export_file_names((img.id, img.name) for _, img in rows)   # over all the run's images
        items = [_Item(img.id, ri.position, img.name, names[img.id], Path(img.path), img.width, img.height)
                 for ri, img in rows if (ri.confirmed or not options.confirmed_only)
                 and (img.status != IMAGE_REMOVED or options.removed_images)]
        return (Path(run.run_dir), project.name if project else "", run.mapping_version,
                bool((run.params or {}).get("crf", True)), clusters, items)


def export_owner() -> str:
    """'host:pid' of this process, recorded on the exports it writes."""
    return owner_tag()


def export_owner_alive(owner: str | None, created_at: datetime | None) -> bool:
    """Whether the process that started an export may still be writing it.

    Gone: no owner recorded, the process no longer exists (same host), or the export
    started more than EXPORT_STALE_AFTER ago (other hosts cannot be checked; pids are reused).
    """
    if not owner:
        return False
    if created_at is not None and utcnow() - created_at > EXPORT_STALE_AFTER:
        return False
    host, pid, _ = split_owner(owner)
    if host != hostname():
        return True
    if pid is None:
        return False
    return pid == os.getpid() or pid_alive(pid)


def mark_abandoned_exports(db, exports_dir: Path,
                           is_alive: Callable[[str | None, datetime | None], bool] = export_owner_alive
                           ) -> list[int]:
    """Exports left 'running' by a process that is gone become 'failed'; their partial files go."""
    with db.write() as s:
        rows = s.execute(select(Export.id, Export.owner, Export.created_at)
                         .where(Export.status == EXPORT_RUNNING)).all()
        dead = [r.id for r in rows if not is_alive(r.owner, as_utc(r.created_at))]
        if dead:
            s.execute(update(Export).where(Export.id.in_(dead), Export.status == EXPORT_RUNNING).values(
                status=EXPORT_FAILED, finished_at=utcnow(),
                error="the app stopped while this export was being written; export the run again"))
    for export_id in dead:
        shutil.rmtree(exports_dir / str(export_id), ignore_errors=True)
        log.warning("export %s was left unfinished by a stopped process: marked failed", export_id)
    return dead


def _zip_dir(directory: Path, zip_path: Path) -> None:
    """Zip every file under directory (sorted, fixed timestamps) except the zip itself."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p != zip_path)
    tmp = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for p in files:
            rel = p.relative_to(directory).as_posix()
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            stored = p.suffix.lower() in _COMPRESSED_SUFFIXES           # images: already compressed
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            with open(p, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(zip_path)


def export_run(ctx, run_id: int, options: ExportOptions | None = None,
               progress: Progress | None = None) -> ExportInfo:
    """Write the export of a finished run, zip it and record it in the database."""
    options = options or ExportOptions()
    options.validate()
    run_dir, project_name, mapping_version, run_crf, clusters, items = _load_snapshot(ctx, run_id, options)
    plan = masks.plan_categories(clusters, options.include_unnamed)
    if not plan.categories:
        raise UserError("nothing to export: name at least one cluster"
                        + ("" if options.include_unnamed else " (or include unnamed clusters)"))
    if not items:
        raise UserError("no image of this run is confirmed yet" if options.confirmed_only
                        else "the run has no images")
    already_corrected = 0
    if options.to_correct:
        chosen, already_corrected = to_correct.pick_next(ctx, run_id, run_dir, [it.position for it in items],
                                                         [it.image_id for it in items], options.to_correct)
        items = [items[j] for j in chosen]
    for it in items:
        if not RunDir(run_dir).segment_path(it.position, "plain").is_file():
            raise UserError(f"run {run_id} has no segment map for image {it.name!r}; "
                            "resume the run before exporting")
        if options.include_images and not it.path.is_file():
            raise UserError(f"the file of image {it.name!r} is missing ({it.path}); export without "
                            "images or put the file back")
    crf_used = options.crf and all(RunDir(run_dir).segment_path(it.position, "crf").is_file() for it in items)
    crf_missing = options.crf and not crf_used and run_crf   # made with CRF, yet maps are missing
    if crf_missing:
        log.warning("run %s has no CRF segments for every exported image; using raw segments", run_id)
    label_dtype: type = np.uint8
    if options.label_pngs:
        try:
            label_dtype = coco.label_png_dtype(max(c.id for c in plan.categories))
        except ValueError:
            raise UserError("category ids above 65535 do not fit in label PNGs; export without "
                            "label PNGs (the COCO JSON has no such limit)") from None
    renamed = [[it.name, it.file_name] for it in sorted(items, key=lambda i: i.image_id)
               if it.file_name != it.name]

    refined_meta = segmaps.refined_meta(run_dir) if options.refined else None
    refined_used = bool(refined_meta is not None
                        and segmaps.has_maps(run_dir, "refined", [it.position for it in items]))
    with ctx.db.read() as s:
        pending = corrections.pending(s, run_id, refinement.inputs_time(refined_meta) if refined_used else None)
    stale = refinement.stale_reasons(refined_meta.get("mapping_version") if refined_used else None,
                                     mapping_version, pending)
    recorded = {**options.to_dict(), "crf_used": crf_used, "crf_missing": crf_missing, "renamed": renamed,
                "refined_used": refined_used, "stale": list(stale),
                "to_correct_images": [it.file_name for it in items] if options.to_correct else None,
                "to_correct_done": already_corrected if options.to_correct else None}
    with ctx.db.write() as s:
        row = Export(run_id=run_id, status=EXPORT_RUNNING, options=recorded, owner=export_owner(),
                     mapping_version=mapping_version, n_categories=len(plan.categories))
        s.add(row)
        s.flush()
        export_id = row.id
    directory = ctx.config.exports_dir / str(export_id)
    zip_path = directory / f"stego_run{run_id}_export{export_id}.zip"
    try:
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        info = {"description": f"STEGO pseudo-labels: project {project_name}, run {run_id}",
                "version": "1.0", "run_id": run_id, "style": options.style, "crf": crf_used,
                "maps": "refined" if refined_used else ("crf" if crf_used else "raw")}
        writer = _Writer(directory, options, plan, run_dir, crf_used, label_dtype, info,
                         model_version=f"stego run {run_id}, mapping {mapping_version}", refined=refined_used)
        n_ann, n_empty = writer.write(items, progress)
        _zip_dir(directory, zip_path)
    except BaseException as exc:
        shutil.rmtree(directory, ignore_errors=True)
        with ctx.db.write() as s:
            failed = s.get(Export, export_id)
            if failed is not None:
                failed.status = EXPORT_FAILED
                failed.error = str(exc) or type(exc).__name__
                failed.finished_at = utcnow()
        raise
    with ctx.db.write() as s:
        done = s.get(Export, export_id)
        done.status = EXPORT_DONE
        done.directory = str(directory)
        done.path = str(zip_path)
        done.n_images = len(items)
        done.n_annotations = n_ann
        done.finished_at = utcnow()
        done.options = {**recorded, "empty_images": n_empty}
    log.info("export %s of run %s: %s images, %s annotations, %s categories -> %s", export_id,
             run_id, len(items), n_ann, len(plan.categories), zip_path)
    return get_export(ctx, export_id)


class _Writer:
    """Streams every image through the COCO, panoptic, label PNG and Label Studio outputs."""

    def __init__(self, directory: Path, options: ExportOptions, plan: CategoryPlan, run_dir: Path,
                 crf_used: bool, label_dtype: type, info: dict[str, Any], model_version: str,
                 refined: bool = False):
        self.directory, self.options, self.plan = directory, options, plan
        self.run_dir, self.crf_used, self.label_dtype = run_dir, crf_used, label_dtype
        self.refined = refined
        self.info, self.model_version = info, model_version
        self.paths = _paths(directory, options)
        self.names = {c.id: c.name for c in plan.categories}

    def _coco_categories(self, panoptic: bool) -> list[dict[str, Any]]:
        return [coco.category_entry(c.id, c.name, "", isthing=int(c.isthing), color=hex_to_rgb(c.colour))
                if panoptic else coco.category_entry(c.id, c.name) for c in self.plan.categories]

    def _polygons(self, r: Region) -> list[list[int]]:
        return polygons.mask_polygons(r.mask, self.options.tolerance, offset=(r.rows.start, r.cols.start))

    def _segment(self, r: Region, polys: list[list[int]] | None) -> coco.Segment:
        if polys is None:                                        # masks: exact RLE
            crowd = 0 if r.isthing else self.options.stuff_iscrowd
            full = r.full_mask(self.shape)
            return coco.Segment(r.category_id, coco.encode_rle(full), r.area, r.bbox, crowd)
        # polygons: area and box of what pycocotools rasterises (the simplified outline)
        y0, x0 = r.rows.start, r.cols.start
        local = [[v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(p)] for p in polys]
        raster = coco.polygons_to_mask(local, r.mask.shape[0], r.mask.shape[1]).astype(bool)
        bx, by, bw, bh = coco.mask_bbox(raster)
        return coco.Segment(r.category_id, polys, int(raster.sum()), [bx + x0, by + y0, bw, bh], 0)

    def write(self, items: Sequence[_Item], progress: Progress | None) -> tuple[int, int]:
        opts, paths = self.options, self.paths
        pan_writer = ls_writer = None
        manifest: list[dict[str, Any]] = []
        try:
            if opts.panoptic:
                pan_writer = coco.PanopticWriter(paths["panoptic"], self.directory / PANOPTIC_DIR, self.info,
                                                 self._coco_categories(panoptic=True))
            if opts.label_studio:
                ls_writer = ls_files.TasksWriter(paths["ls_tasks"])
                paths["ls_config"].write_text(ls_files.label_config(
                    [(c.name, c.colour) for c in self.plan.categories], opts.ls_regions), encoding="utf-8")
            if paths["labels"] is not None:
                paths["labels"].mkdir(parents=True)
                legend = [{"id": c.id, "name": c.name, "colour": c.colour, "isthing": int(c.isthing)}
                          for c in self.plan.categories]
                (paths["labels"] / "categories.json").write_text(json.dumps(
                    {"background": 0, "dtype": np.dtype(self.label_dtype).name, "categories": legend},
                    ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            n_empty = 0
            with coco.CocoWriter(paths["json"], self.info, self._coco_categories(panoptic=False)) as writer:
                for k, it in enumerate(items):
                    n_empty += self._image(it, writer, pan_writer, ls_writer, manifest) == 0
                    if progress is not None:
                        progress(k + 1, len(items))
            if pan_writer is not None:
                pan_writer.close()
            if ls_writer is not None:
                ls_writer.close()
            (self.directory / MANIFEST).write_text(json.dumps(
                {"images": manifest}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        finally:
            if pan_writer is not None:
                pan_writer.abort()   # no-op after a successful close
            if ls_writer is not None:
                ls_writer.abort()
        return writer.n_annotations, n_empty

    def _image(self, it: _Item, writer: coco.CocoWriter, pan_writer, ls_writer,
               manifest: list[dict[str, Any]]) -> int:
        opts = self.options
        self.shape = (it.height, it.width)
        seg = read_segments(self.run_dir, it.position, self.crf_used, size=(it.width, it.height),
                            refined=self.refined)
        cat_map = masks.category_map(seg, self.plan.lut)
        image = coco.image_entry(it.image_id, it.file_name, it.width, it.height)
        writer.add_image(image)
        n_before = writer.n_annotations
        pan_ids = np.zeros(cat_map.shape, np.uint32) if pan_writer is not None else None
        pan_info: list[dict[str, Any]] = []
        ls_results: list[dict[str, Any]] = []
        for k, r in enumerate(masks.regions(cat_map, self.plan.things, opts.min_area)):
            polys = self._polygons(r) if opts.style == "polygons" else None
            segment = self._segment(r, polys)
            writer.add_segment(it.image_id, segment)
            if pan_ids is not None:
                pan_info.append({"id": len(pan_info) + 1, "category_id": r.category_id, "area": r.area,
                                 "bbox": r.bbox, "iscrowd": 0})
                pan_ids[r.rows, r.cols][r.mask] = len(pan_info)
            if ls_writer is not None:
                rid = f"i{it.image_id}r{k}"
                if opts.ls_regions == "brush":
                    ls_results.append(ls_files.brush_result(rid, self.names[r.category_id],
                                                                r.full_mask(self.shape)))
                else:
                    ls_results.extend(ls_files.polygon_results(
                        rid, self.names[r.category_id], polys if polys is not None else self._polygons(r),
                        it.width, it.height))
        entry: dict[str, Any] = {"image_id": it.image_id, "name": it.name, "file_name": it.file_name}
        if opts.include_images:
            copy_image(it.path, self.directory / IMAGES_DIR / it.file_name)
            entry["image"] = f"{IMAGES_DIR}/{it.file_name}"
        png = png_name(it.file_name)
        if pan_writer is not None:
            pan_writer.add_image(image, png, pan_ids, pan_info)
            entry["panoptic_png"] = f"{PANOPTIC_DIR}/{png}"
        if self.paths["labels"] is not None:
            coco.write_png(self.paths["labels"] / png, cat_map.astype(self.label_dtype))
            entry["label_png"] = f"{LABELS_DIR}/{png}"
        if ls_writer is not None:
            ls_writer.add(ls_files.image_url(opts.ls_image_prefix, it.file_name), it.image_id,
                          it.file_name, self.model_version, ls_results)
        manifest.append(entry)
        return writer.n_annotations - n_before
