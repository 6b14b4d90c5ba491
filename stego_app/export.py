"""Export a run's pseudo-labels (segments + the cluster->label mapping) as COCO.

Layout of <data_dir>/exports/<export_id>/::

    annotations/instances_default.json        COCO: images, categories, annotations
    annotations/panoptic_default.json         (option) COCO panoptic JSON
    annotations/panoptic_default/<stem>.png   (option) panoptic PNGs, id = R + 256 G + 256^2 B
    labels/<stem>.png                         (option) category id per pixel, 0 = none
    labels/categories.json                    (option) id -> name, colour for the label PNGs
    stego_run<run>_export<id>.zip             everything above, for download

Categories are the run's named labels with COCO id = Label.id (stable across exports
of the run: renaming keeps the id, merging label A into B gives A's pixels B's id);
clusters mapped to one label (merged) form one category; ignored clusters are void. Unnamed clusters are void unless
`include_unnamed`, then each is category "cluster <index>" with id
UNNAMED_CATEGORY_BASE + index. Images are streamed one at a time; the JSON files are
byte-identical for identical input (no timestamps or export ids inside).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sqlalchemy import select, update

from core.rundir import RunDir
from stego_app import coco
from stego_app.db import as_utc
from stego_app.errors import NotFound, UserError
from stego_app.labels.views import read_segments
from stego_app.models import (
    RUN_DONE,
    Cluster,
    Export,
    Image,
    Label,
    Project,
    Run,
    RunImage,
    utcnow,
)

log = logging.getLogger(__name__)

STYLES = ("stuff", "instance")
UNNAMED_CATEGORY_BASE = 60000          # + cluster index; keeps ids of unnamed clusters apart
INSTANCES_JSON = "annotations/instances_default.json"
PANOPTIC_JSON = "annotations/panoptic_default.json"
PANOPTIC_DIR = "annotations/panoptic_default"
LABELS_DIR = "labels"
EXPORT_RUNNING, EXPORT_DONE, EXPORT_FAILED = "running", "done", "failed"
EXPORT_STALE_AFTER = timedelta(hours=24)   # a 'running' export older than this is abandoned

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExportOptions:
    """What to export. See docs/export.md."""

    style: Literal["stuff", "instance"] = "stuff"   # stuff: RLE per image+label; instance: polygons
    crf: bool = True                 # CRF-refined segments when the run has them
    confirmed_only: bool = False     # only images a person confirmed
    min_area: int = 64               # instance style: smallest component (pixels) kept
    panoptic: bool = False           # also COCO panoptic JSON + PNGs
    label_pngs: bool = False         # also one category-id PNG per image
    include_unnamed: bool = False    # unnamed clusters as "cluster N" categories
    refined: bool = True             # refined (propagated) maps when the run has them for every image

    def validate(self) -> None:
        """Raise UserError for a value a person can fix."""
        if self.style not in STYLES:
            raise UserError(f"export style {self.style!r} must be one of {', '.join(STYLES)}")
        if not isinstance(self.min_area, int) or self.min_area < 0:
            raise UserError(f"minimum area {self.min_area!r} must be a whole number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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
    refined_used: bool = False       # refined (propagated) maps were exported

    @property
    def maps_used(self) -> str:
        """Which segment maps the export holds: "refined", "CRF" or "raw"."""
        return "refined" if self.refined_used else ("CRF" if self.crf_used else "raw")


@dataclass(frozen=True)
class CategoryPlan:
    """COCO categories plus the lookup table cluster index -> category id (0 = void)."""

    categories: list[dict[str, Any]]
    colours: dict[int, str]          # category id -> '#rrggbb'
    lut: np.ndarray                  # int32, len = max cluster index + 1


@dataclass(frozen=True)
class _ClusterRow:
    index: int
    label_id: int | None
    label_name: str | None
    label_colour: str | None
    ignored: bool
    colour: str


def plan_categories(clusters: Sequence[_ClusterRow], include_unnamed: bool) -> CategoryPlan:
    """Categories sorted by id; merged clusters share their label's id; ignored -> void."""
    names: dict[int, str] = {}
    colours: dict[int, str] = {}
    lut = np.zeros(max((c.index for c in clusters), default=-1) + 1, dtype=np.int32)
    label_ids = {c.label_id for c in clusters if c.label_id is not None}
    for c in clusters:
        if c.ignored:
            continue
        if c.label_id is not None:
            cid, name, colour = c.label_id, c.label_name or f"label {c.label_id}", c.label_colour or c.colour
        elif include_unnamed:
            cid, name, colour = UNNAMED_CATEGORY_BASE + c.index, f"cluster {c.index}", c.colour
            if cid in label_ids:
                raise UserError("label ids of this database collide with the ids reserved for unnamed "
                                "clusters; name the clusters instead of including unnamed ones")
        else:
            continue
        lut[c.index] = cid
        names[cid] = name
        colours[cid] = colour
    cats = [coco.category_entry(cid, names[cid]) for cid in sorted(names)]
    return CategoryPlan(categories=cats, colours=colours, lut=lut)


def _hex_rgb(colour: str) -> list[int]:
    h = colour.lstrip("#")
    try:
        return [int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)]
    except (ValueError, IndexError):
        return [128, 128, 128]


def _paths(directory: Path, options: ExportOptions) -> dict[str, Path | None]:
    return {"json": directory / INSTANCES_JSON,
            "panoptic": directory / PANOPTIC_JSON if options.panoptic else None,
            "labels": directory / LABELS_DIR if options.label_pngs else None}


def _warnings(recorded: dict[str, Any]) -> tuple[str, ...]:
    out = []
    if recorded.get("crf_missing"):
        out.append("the run was made with CRF, but CRF-refined segments are missing for some "
                   "images; the raw segments were exported")
    if recorded.get("refined_stale"):
        out.append("the refined maps were made before the latest naming changes; refine again to "
                   "propagate the new names")
    empty = int(recorded.get("empty_images") or 0)
    if empty:
        out.append(f"{empty} image{'s' if empty != 1 else ''} got no annotation (only ignored or "
                   "unnamed clusters there, or regions below the minimum area)")
    return tuple(out)


def _info(row: Export) -> ExportInfo:
    options = ExportOptions.from_dict(row.options or {})
    directory = Path(row.directory) if row.directory else None
    done = row.status == EXPORT_DONE and directory is not None
    paths = _paths(directory, options) if done else {"json": None, "panoptic": None, "labels": None}
    return ExportInfo(id=row.id, run_id=row.run_id, status=row.status, options=options,
                      crf_used=bool((row.options or {}).get("crf_used", False)),
                      directory=directory, zip_path=Path(row.path) if row.path else None,
                      json_path=paths["json"], panoptic_json_path=paths["panoptic"],
                      labels_dir=paths["labels"], n_images=row.n_images,
                      n_annotations=row.n_annotations, n_categories=row.n_categories,
                      mapping_version=row.mapping_version, error=row.error,
                      created_at=as_utc(row.created_at), finished_at=as_utc(row.finished_at),
                      warnings=_warnings(row.options or {}) if row.status == EXPORT_DONE else (),
                      refined_used=bool((row.options or {}).get("refined_used", False)))


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
    name: str
    width: int
    height: int


def _load_snapshot(ctx, run_id: int, options: ExportOptions):
    """Everything the export reads from the database, in one read transaction."""
    with ctx.db.read() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        if run.status != RUN_DONE:
            raise UserError(f"run {run_id} is {run.status}; only finished runs can be exported")
        project = s.get(Project, run.project_id)
        rows = s.execute(select(Cluster, Label).outerjoin(Label, Cluster.label_id == Label.id)
                         .where(Cluster.run_id == run_id).order_by(Cluster.index)).all()
        clusters = [_ClusterRow(c.index, c.label_id, lab.name if lab else None,
                                lab.colour if lab else None, bool(c.ignored), c.colour)
                    for c, lab in rows]
        q = (select(RunImage, Image).join(Image, RunImage.image_id == Image.id)
             .where(RunImage.run_id == run_id).order_by(RunImage.position))
        if options.confirmed_only:
            q = q.where(RunImage.confirmed.is_(True))
        items = [_Item(img.id, ri.position, img.name, img.width, img.height)
                 for ri, img in s.execute(q).all()]
        return (Path(run.run_dir), project.name if project else "", run.mapping_version,
                bool((run.params or {}).get("crf", True)), clusters, items)


def _hostname() -> str:
    return socket.gethostname()[:100]


def export_owner() -> str:
    """'host:pid' of this process, recorded on the exports it writes."""
    return f"{_hostname()}:{os.getpid()}"


def export_owner_alive(owner: str | None, created_at: datetime | None) -> bool:
    """Whether the process that started an export may still be writing it.

    Gone: no owner recorded, the process no longer exists (same host), or the export
    started more than EXPORT_STALE_AFTER ago (other hosts cannot be checked; pids are reused).
    """
    if not owner:
        return False
    if created_at is not None and utcnow() - created_at > EXPORT_STALE_AFTER:
        return False
    host, _, pid_s = owner.rpartition(":")
    if host != _hostname():
        return True
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by another user
        pass
    return True


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
            info.compress_type = zipfile.ZIP_STORED if p.suffix == ".png" else zipfile.ZIP_DEFLATED
            with open(p, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(zip_path)


def export_run(ctx, run_id: int, options: ExportOptions | None = None,
               progress: Progress | None = None) -> ExportInfo:
    """Write the COCO export of a finished run, zip it and record it in the database."""
    options = options or ExportOptions()
    options.validate()
    run_dir, project_name, mapping_version, run_crf, clusters, items = _load_snapshot(ctx, run_id, options)
    plan = plan_categories(clusters, options.include_unnamed)
    if not plan.categories:
        raise UserError("nothing to export: name at least one cluster"
                        + ("" if options.include_unnamed else " (or include unnamed clusters)"))
    if not items:
        raise UserError("no image of this run is confirmed yet" if options.confirmed_only
                        else "the run has no images")
    for it in items:
        if not RunDir(run_dir).segment_path(it.position, "plain").is_file():
            raise UserError(f"run {run_id} has no segment map for image {it.name!r}; "
                            "resume the run before exporting")
    crf_used = options.crf and all(RunDir(run_dir).segment_path(it.position, "crf").is_file() for it in items)
    crf_missing = options.crf and not crf_used and run_crf   # made with CRF, yet maps are missing
    if crf_missing:
        log.warning("run %s has no CRF segments for every exported image; using raw segments", run_id)
    label_dtype: type = np.uint8
    if options.label_pngs:
        try:
            label_dtype = coco.label_png_dtype(max(c["id"] for c in plan.categories))
        except ValueError:
            raise UserError("category ids above 65535 do not fit in label PNGs; export without "
                            "label PNGs (the COCO JSON has no such limit)") from None

    from stego_app import segmaps

    refined_meta = segmaps.refined_meta(run_dir) if options.refined else None
    refined_used = bool(refined_meta is not None
                        and segmaps.has_maps(run_dir, "refined", [it.position for it in items]))
    refined_stale = refined_used and refined_meta.get("mapping_version") != mapping_version
    recorded = {**options.to_dict(), "crf_used": crf_used, "crf_missing": crf_missing,
                "refined_used": refined_used, "refined_stale": refined_stale}
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
        n_ann, n_empty = _write(directory, options, plan, items, run_dir, crf_used, label_dtype,
                                info=info, progress=progress, refined=refined_used)
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


def _write(directory: Path, options: ExportOptions, plan: CategoryPlan, items: Sequence[_Item],
           run_dir: Path, crf_used: bool, label_dtype: type, info: dict[str, Any],
           progress: Progress | None, refined: bool = False) -> tuple[int, int]:
    """Stream every image through the writers; returns (COCO annotations, images without any)."""
    paths = _paths(directory, options)
    isthing = 1 if options.style == "instance" else 0
    pan_writer = None
    if options.panoptic:
        pan_cats = [coco.category_entry(c["id"], c["name"], c["supercategory"], isthing=isthing,
                                        color=_hex_rgb(plan.colours[c["id"]])) for c in plan.categories]
        pan_writer = coco.PanopticWriter(paths["panoptic"], directory / PANOPTIC_DIR, info, pan_cats)
    labels_dir = paths["labels"]
    if labels_dir is not None:
        labels_dir.mkdir(parents=True)
        legend = [{"id": c["id"], "name": c["name"], "colour": plan.colours[c["id"]]}
                  for c in plan.categories]
        (labels_dir / "categories.json").write_text(
            json.dumps({"background": 0, "dtype": np.dtype(label_dtype).name, "categories": legend},
                       ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    used_names: set[str] = set()
    n_empty = 0
    try:
        with coco.CocoWriter(paths["json"], info, plan.categories) as writer:
            for k, it in enumerate(items):
                seg = read_segments(run_dir, it.position, crf_used, size=(it.width, it.height), refined=refined)
                cat_map = coco.category_map(seg, plan.lut)
                writer.add_image(coco.image_entry(it.image_id, it.name, it.width, it.height))
                n_before = writer.n_annotations
                pan_ids = np.zeros(cat_map.shape, np.uint32) if pan_writer else None
                pan_info: list[dict[str, Any]] = []
                if options.style == "stuff":
                    for seg, mask in coco.stuff_segments(cat_map):
                        writer.add_segment(it.image_id, seg)
                        if pan_ids is not None:
                            pan_info.append(coco.panoptic_segment_info(len(pan_info) + 1, seg))
                            pan_ids[mask] = len(pan_info)
                else:
                    for seg, sl, comp in coco.instance_segments(cat_map, options.min_area):
                        writer.add_segment(it.image_id, seg)
                        if pan_ids is not None:
                            pan_info.append(coco.panoptic_segment_info(len(pan_info) + 1, seg))
                            pan_ids[sl][comp] = len(pan_info)
                n_empty += writer.n_annotations == n_before
                png_name = coco.unique_png_name(it.name, it.image_id, used_names)
                if pan_writer is not None:
                    pan_writer.add_image(coco.image_entry(it.image_id, it.name, it.width, it.height),
                                         png_name, pan_ids, pan_info)
                if labels_dir is not None:
                    coco.write_png(labels_dir / png_name, cat_map.astype(label_dtype))
                if progress is not None:
                    progress(k + 1, len(items))
        if pan_writer is not None:
            pan_writer.close()
    finally:
        if pan_writer is not None:
            pan_writer.abort()   # no-op after a successful close
    return writer.n_annotations, n_empty
