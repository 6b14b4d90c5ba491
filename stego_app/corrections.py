"""Corrected masks imported back from an annotation tool (COCO instances JSON).

The loop a team runs: export the pre-labels, correct a few images in CVAT / Label Studio /
any COCO tool, export those as COCO and import the file here. Each corrected image becomes
checked, its masks are stored (``models.Correction``), and *Refine with names* then trains on
them as true seeds and writes them into the refined maps (exports use those).

Also read: Label Studio's JSON export (``label_studio.tasks_to_coco``: each task's latest
annotation, brush, polygon and rectangle regions).

Matching: an image by its ``file_name`` (the name the app's export gave it, or its ingested
name, also with leading folders dropped, and by the file name alone or without an annotation
tool's prefix when that is unambiguous) and its size; a category by its name
(case-insensitive) to a label of the run that some cluster carries. Whatever does not match is
reported and left out; the file is refused whole only when nothing in it can be used.
"""
from __future__ import annotations

import json
import logging
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select

from core.constants import NOT_NAMED

from stego_app import label_studio
from stego_app.coco import decode_rle, encode_rle, polygons_to_mask
from stego_app.db import as_utc
from stego_app.errors import NotFound, UserError
from stego_app.export_files import export_file_names
from stego_app.labels.mapping import carried_label_ids, corrected_label_ids, get_done_run, prune_labels
from stego_app.models import Cluster, Correction, Export, Image, Label, RunImage, SeedAnnotation, utcnow

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 512 * 1024 * 1024     # a COCO file larger than this is refused (read whole)


@dataclass
class CorrectionReport:
    """What one import did, for people."""

    source: str
    images: list[str] = field(default_factory=list)           # names of the images corrected
    annotations: int = 0                                      # annotations used
    unknown_images: list[str] = field(default_factory=list)   # file_name not in the run
    wrong_size: list[str] = field(default_factory=list)       # "name: WxH in the file, W'xH' here"
    unknown_categories: dict[str, int] = field(default_factory=dict)   # name -> annotations left out
    unreadable: int = 0                                       # annotations whose segmentation failed
    without_annotations: int = 0                              # images in the file with none of their own

    def summary(self) -> str:
        one = len(self.images) == 1
        done = (f"{len(self.images)} image{'' if one else 's'} corrected from {self.source} "
                f"({self.annotations} annotation{'s' if self.annotations != 1 else ''}); "
                f"{'it is' if one else 'they are'} checked now and Refine with names uses {'it' if one else 'them'}")
        return "; ".join([done, *self.problems(), *self.not_counted()]) + "."

    def not_counted(self) -> list[str]:
        """Images the file lists without any annotation: nothing tells a reviewed image with nothing
        to draw from one never opened (CVAT exports every image of a task), so they stay uncorrected."""
        k = self.without_annotations
        if not k:
            return []
        return [f"{k} image{'s' if k != 1 else ''} in the file {'have' if k != 1 else 'has'} no annotation and "
                f"{'are' if k != 1 else 'is'} not counted as corrected, so images to correct can offer "
                f"{'them' if k != 1 else 'it'} again (draw at least one region of a named label on each "
                "image you reviewed)"]

    def problems(self) -> list[str]:
        parts = []
        if self.unknown_categories:
            cats = ", ".join(f"'{n}' ({k} annotation{'s' if k != 1 else ''})"
                             for n, k in sorted(self.unknown_categories.items()))
            parts.append(f"left out, no label of that name in this run: {cats} (name a cluster or find it "
                         "with that name, then import again)")
        if self.unknown_images:
            parts.append(f"{len(self.unknown_images)} image(s) not in this run: " + _few(self.unknown_images))
        if self.wrong_size:
            parts.append(f"{len(self.wrong_size)} image(s) of another size: " + _few(self.wrong_size))
        if self.unreadable:
            parts.append(f"{self.unreadable} annotation(s) with an unreadable segmentation")
        return parts


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------- reading the file

def read_coco(path: Path) -> tuple[dict[str, Any], str]:
    """The COCO instances dict of a .json file, or of the one instances JSON inside a .zip
    (a CVAT / Datumaro "COCO 1.0" export); and a name for it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.name}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"{path.name} is larger than {MAX_FILE_BYTES // 2**20} MB; import it in parts")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            found = []
            for info in zf.infolist():
                if info.is_dir() or not info.filename.lower().endswith(".json"):
                    continue
                try:
                    data = json.loads(zf.read(info).decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    continue
                if _is_instances(data):
                    found.append((info.filename, data))
            if not found:
                raise UserError(f"{path.name} holds no COCO instances JSON (a file with 'images', "
                                "'annotations' and 'categories'); export the corrected images as COCO")
            if len(found) > 1:
                raise UserError(f"{path.name} holds {len(found)} COCO instances files "
                                f"({_few([n for n, _ in found])}); import them one at a time")
            return found[0][1], f"{path.name}:{found[0][0]}"
    if path.suffix.lower() == ".zip":
        raise UserError(f"{path.name} is not a readable zip archive (damaged, or cut short while downloading); "
                        "export it from the tool again")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path.name} is not a JSON file ({exc}); give the COCO .json or the tool's .zip") from None
    if label_studio.is_tasks_export(data):
        return label_studio.tasks_to_coco(data), f"{path.name} (Label Studio JSON)"
    if not _is_instances(data):
        raise UserError(f"{path.name} is neither a COCO instances file ('images', 'annotations' and "
                        "'categories' lists; a COCO panoptic file is not read, export instances) nor "
                        "Label Studio's JSON export (a list of tasks with 'data' and 'annotations')")
    return data, path.name


def _is_instances(data: Any) -> bool:
    """COCO instances (not panoptic, whose annotations are per image with segments_info)."""
    return (isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories"))
            and not any(isinstance(a, dict) and "segments_info" in a for a in data["annotations"][:10]))


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _segmentation_mask(seg: Any, h: int, w: int) -> np.ndarray:
    if isinstance(seg, dict):                      # RLE, compressed or not
        if list(seg.get("size", [])) != [h, w]:
            raise ValueError(f"RLE of size {seg.get('size')} on a {w}x{h} image")
        return decode_rle(seg).astype(bool)
    if isinstance(seg, list):                      # polygons
        return polygons_to_mask(seg, h, w).astype(bool)
    raise ValueError(f"unknown segmentation {type(seg).__name__}")


# ---------------------------------------------------------------- the service

def _run_labels(s, run_id: int) -> dict[str, Label]:
    """Labels some cluster of the run carries, by case-folded name."""
    rows = s.scalars(select(Label).join(Cluster, Cluster.label_id == Label.id)
                     .where(Cluster.run_id == run_id).distinct())
    return {lab.name.strip().casefold(): lab for lab in rows}


@dataclass
class _Names:
    """The names a corrected file may give a run's images, each -> (RunImage, Image)."""

    exact: dict[str, tuple[RunImage, Image]]            # export name or ingested name, case-folded
    base: dict[str, dict[int, tuple[RunImage, Image]]]  # file name alone -> image id -> the image
    copied: dict[str, tuple[RunImage, Image]]           # Label Studio's "<md5 of URL>__name" copies


def _image_names(s, run_id: int) -> _Names:
    rows = s.execute(select(RunImage, Image).join(Image, RunImage.image_id == Image.id)
                     .where(RunImage.run_id == run_id)).all()
    exported = export_file_names((img.id, img.name) for _, img in rows)
    prefixes = {label_studio.DEFAULT_IMAGE_PREFIX}
    for options in s.scalars(select(Export.options).where(Export.run_id == run_id)):
        if isinstance(options, dict) and isinstance(options.get("ls_image_prefix"), str):
            prefixes.add(options["ls_image_prefix"])
    names = _Names({}, {}, {})
    for ri, img in rows:
        for name in {exported[img.id], img.name}:
            names.exact[name.casefold()] = (ri, img)
            names.base.setdefault(PurePosixPath(name.replace("\\", "/")).name.casefold(), {})[img.id] = (ri, img)
        for prefix in prefixes:
            copied = label_studio.copied_file_name(label_studio.image_url(prefix, exported[img.id]))
            names.copied[copied.casefold()] = (ri, img)
    return names


# Label Studio names the files of its exports "<8 hex>__name" (a local file it copied) or
# "<8 hex>-name" (an upload)
_TOOL_PREFIX = re.compile(r"^[0-9a-f]{8}(__|-)", re.IGNORECASE)


def _lookup(name: str, size: tuple[int, int], names: _Names) -> tuple[RunImage, Image] | None:
    """The run image a file name in the corrected file means: the name itself, or with its leading
    folders dropped one by one (``images/a/b.png``, ``/data/upload/3/b.png``); a Label Studio copy
    of a task's image (``images/<md5 of its URL>__b.png``); else its file name alone, or without an
    annotation tool's prefix, when exactly one image of the run (of that size) has it."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    for k in range(max(len(parts) - 1, 1)):        # the last part alone only when it is the whole name
        hit = names.exact.get("/".join(parts[k:]).casefold())
        if hit is not None:
            return hit
    if not parts:
        return None
    if (hit := names.copied.get(parts[-1].casefold())) is not None:
        return hit
    for key in dict.fromkeys([parts[-1], _TOOL_PREFIX.sub("", parts[-1])]):
        same = list(names.base.get(key.casefold(), {}).values())
        if len(same) > 1:
            same = [(ri, img) for ri, img in same if (img.width, img.height) == size]
        if len(same) == 1:
            return same[0]
    return None


def import_corrections(ctx, run_id: int, path: Path) -> CorrectionReport:
    """Store the masks of a COCO file as the corrections of the run's images it names.

    Each image with at least one usable annotation replaces its earlier corrections and
    becomes checked; nothing is written when nothing in the file can be used.
    """
    with ctx.db.read() as s:
        get_done_run(s, run_id)          # a wrong run is said first, before the file is read
    data, source = read_coco(path)
    report = CorrectionReport(source=source)
    cats = {c.get("id"): str(c.get("name", "")) for c in data["categories"] if isinstance(c, dict)}
    by_image: dict[Any, list[dict]] = {}
    for a in data["annotations"]:
        if isinstance(a, dict):
            by_image.setdefault(a.get("image_id"), []).append(a)
    with ctx.db.write() as s:
        get_done_run(s, run_id, lock=True)
        labels = _run_labels(s, run_id)
        names = _image_names(s, run_id)
        unknown_cats: Counter = Counter()
        plans: list[tuple[RunImage, Image, dict[int, np.ndarray], int]] = []
        for entry in data["images"]:
            if not isinstance(entry, dict):
                continue
            name = str(entry.get("file_name", ""))
            anns = by_image.get(entry.get("id"), [])
            if not anns:
                report.without_annotations += 1
                continue
            hit = _lookup(name, (_int(entry.get("width"), -1), _int(entry.get("height"), -1)), names)
            if hit is None:
                report.unknown_images.append(name)
                continue
            ri, img = hit
            if (_int(entry.get("width"), img.width), _int(entry.get("height"), img.height)) != (img.width, img.height):
                report.wrong_size.append(f"{name}: {entry.get('width')}x{entry.get('height')} in the file, "
                                         f"{img.width}x{img.height} here")
                continue
            masks: dict[int, np.ndarray] = {}
            used = 0
            # larger regions first, so a small object drawn over a large one keeps its pixels
            for a in sorted(anns, key=lambda a: -float(a.get("area") or 0)):
                cat = cats.get(a.get("category_id"), f"category {a.get('category_id')}")
                lab = labels.get(cat.strip().casefold())
                if lab is None:
                    unknown_cats[cat] += 1
                    continue
                try:
                    m = _segmentation_mask(a.get("segmentation"), img.height, img.width)
                except (ValueError, TypeError, KeyError) as exc:
                    log.info("annotation %s of %s unreadable: %s", a.get("id"), name, exc)
                    report.unreadable += 1
                    continue
                for other in masks.values():
                    other &= ~m
                masks[lab.id] = masks[lab.id] | m if lab.id in masks else m
                used += 1
            if used:
                plans.append((ri, img, masks, used))
        report.unknown_categories = dict(unknown_cats)
        if not plans:
            why = report.problems() or ["it has no annotations"]
            raise UserError(f"nothing imported from {source}, the run is as it was: " + "; ".join(why) + ".")
        now = utcnow()
        for ri, img, masks, used in plans:
            s.execute(delete(Correction).where(Correction.run_id == run_id, Correction.image_id == img.id))
            for label_id, m in masks.items():
                if m.any():
                    s.add(Correction(run_id=run_id, image_id=img.id, label_id=label_id, rle=encode_rle(m),
                                     area=int(m.sum()), source=source[:1000], created_at=now))
            ri.confirmed, ri.confirmed_at = True, now
            for ann in s.scalars(select(SeedAnnotation).where(SeedAnnotation.run_id == run_id,
                                                              SeedAnnotation.image_id == img.id)):
                ann.confirmed = True
            report.images.append(img.name)
            report.annotations += used
        prune_labels(s, run_id)
    log.info("run %s: %s", run_id, report.summary())
    return report


def corrected_label_names(ctx, run_id: int) -> set[str]:
    """Names of the run's labels that imported corrections use."""
    with ctx.db.read() as s:
        return set(s.scalars(select(Label.name).where(Label.id.in_(corrected_label_ids(s, run_id)))))


def corrected_images(ctx, run_id: int) -> dict[int, int]:
    """image id -> number of corrected label masks, for the run's images that have any."""
    with ctx.db.read() as s:
        rows = s.execute(select(Correction.image_id).where(Correction.run_id == run_id)).scalars()
        return dict(Counter(int(i) for i in rows))


@dataclass(frozen=True)
class ImageCorrections:
    """The imported corrections of one image of a run, for people."""

    image_id: int
    name: str
    labels: tuple[str, ...]        # label names, largest area first
    source: str                    # the file they came from
    imported_at: datetime
    checked: bool                  # unchecked: kept, but refinement does not use them
    in_maps: bool                  # the refined maps hold them (written as drawn)
    unnamed: tuple[str, ...] = ()  # labels of these masks that no cluster carries now (kept, unused)

    @property
    def text(self) -> str:
        what = f"Corrected in an annotation tool ({', '.join(self.labels)}; from {self.source})"
        if not self.checked:
            return what + ": kept but unused while the image is unchecked."
        if not self.in_maps:
            text = what + ": not in the refined maps yet; refine with names to write them in."
        else:
            text = what + (": the refined maps show them as drawn; what no mask covers is none of the "
                           "named labels.")
        if self.unnamed:
            names = " or ".join(repr(n) for n in self.unnamed)
            text += (f" No cluster is named {names} now: refinement leaves those masks out (they are kept) "
                     "until a cluster carries the name again.")
        return text


def list_corrections(ctx, run_id: int, maps_since: float | None,
                     image_id: int | None = None) -> list[ImageCorrections]:
    """The run's corrected images (or the one ``image_id``), by name. ``maps_since``: when the job
    that made the refined maps read its inputs (``refinement.inputs_time``; None: no refined maps)."""
    with ctx.db.read() as s:
        carried = carried_label_ids(s, run_id)
        q = (select(Correction.image_id, Correction.source, Correction.created_at, Image.name, RunImage.confirmed,
                    Label.name, Correction.label_id)
             .join(Image, Image.id == Correction.image_id).join(Label, Label.id == Correction.label_id)
             .join(RunImage, (RunImage.run_id == Correction.run_id) & (RunImage.image_id == Correction.image_id))
             .where(Correction.run_id == run_id).order_by(Image.name, Correction.area.desc()))
        if image_id is not None:
            q = q.where(Correction.image_id == image_id)
        by_image: dict[int, list] = {}
        for row in s.execute(q).all():
            by_image.setdefault(int(row[0]), []).append(row)
    out = []
    for iid, rows in by_image.items():
        _, source, _, name, checked, _, _ = rows[0]
        at = max(as_utc(r[2]) for r in rows)
        out.append(ImageCorrections(iid, name, tuple(r[5] for r in rows), source, at, bool(checked),
                                    maps_since is not None and at.timestamp() <= maps_since,
                                    tuple(r[5] for r in rows if r[6] not in carried)))
    return out


def remove_corrections(ctx, run_id: int, image_id: int) -> int:
    """Forget the imported corrections of one image (it stays checked); returns how many."""
    with ctx.db.write() as s:
        get_done_run(s, run_id, lock=True)
        if s.scalars(select(RunImage).where(RunImage.run_id == run_id, RunImage.image_id == image_id)).first() is None:
            raise NotFound(f"image {image_id} is not part of run {run_id}")
        n = s.execute(delete(Correction).where(Correction.run_id == run_id,
                                               Correction.image_id == image_id)).rowcount or 0
        prune_labels(s, run_id)          # a label kept only for these corrections goes with them
    return int(n)


def _used(query, run_id: int):
    """``query`` restricted to the run's corrections that count: those of checked images."""
    return (query.join(RunImage, (RunImage.run_id == Correction.run_id) & (RunImage.image_id == Correction.image_id))
            .where(Correction.run_id == run_id, RunImage.confirmed.is_(True)))


def pending(s, run_id: int, since: float | None) -> int:
    """Checked images of the run whose corrections were imported after ``since`` (epoch seconds;
    None: every corrected image): what the refined maps made at ``since`` do not show yet."""
    rows = s.execute(_used(select(Correction.image_id, Correction.created_at), run_id)).all()
    return len({i for i, t in rows if since is None or as_utc(t).timestamp() > since})


def fingerprint(s, run_id: int) -> tuple[int, str]:
    """(count, latest import time) of the corrections that count: changes with every import,
    removal and check / uncheck of a corrected image (one aggregate query, for polling)."""
    n, last = s.execute(_used(select(func.count(Correction.id), func.max(Correction.created_at)), run_id)).one()
    return int(n or 0), str(last)


def correction_maps(s, run_id: int, label_cluster: dict[int, int]) -> dict[int, np.ndarray]:
    """image id -> (H, W) int64 cluster index of each corrected pixel, for the run's checked images
    with corrections; ``NOT_NAMED`` elsewhere: a pixel the person left out of every mask (a wrong
    region deleted, or never a named label) is none of the named labels, so the refined map keeps an
    unnamed or ignored cluster there and exports leave it out, as the person left it.
    ``label_cluster``: label id -> the cluster index its class is written as; a label no cluster
    carries any more is left out (its pixels are then none of the named labels either). An image's
    masks are disjoint (``import_corrections`` gives each pixel to one label), so their order does
    not matter."""
    rows = s.execute(_used(select(Correction), run_id)).scalars().all()
    out: dict[int, np.ndarray] = {}
    for c in rows:
        if c.label_id not in label_cluster:
            continue
        m = decode_rle(c.rle).astype(bool)
        target = out.setdefault(c.image_id, np.full(m.shape, NOT_NAMED, dtype=np.int64))
        target[m] = label_cluster[c.label_id]
    return out
