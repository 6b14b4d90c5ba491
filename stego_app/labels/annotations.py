"""Seed annotations: one COCO-RLE mask per (image, label) of a run, kept in step with its mapping.

Also the per-image "checked by a person" flag (confirm_image) that marks which images
are trusted seed annotations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sqlalchemy import delete, func, select

from stego_app import masks
from stego_app.db import lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.labels.mapping import Mapping, get_done_run, snapshot
from stego_app.labels.views import read_segments
from stego_app.models import Image, Label, Run, RunImage, SeedAnnotation, utcnow


@dataclass(frozen=True)
class SeedAnnotationInfo:
    id: int
    run_id: int
    image_id: int
    label_id: int
    label_name: str
    colour: str
    rle: dict
    area: int
    bbox: tuple[int, int, int, int]
    crf: bool
    confirmed: bool


# ---------------------------------------------------------------- seed annotations

def _compute_image(mapping: Mapping, position: int, size: tuple[int, int], crf: bool
                   ) -> list[tuple[int, dict, int, list[int]]]:
    plan = masks.plan_categories([masks.ClusterEntry(c.index, c.label_id, c.label_name, None, None,
                                                     c.ignored, c.colour) for c in mapping.clusters])
    cat_map = masks.category_map(read_segments(mapping.run_dir, position, crf, size=size), plan.lut)
    return [(cid, *masks.rle_area_bbox(mask)) for cid, mask in masks.label_masks(cat_map)]


def seed_annotations(ctx, run_id: int, image_ids: Sequence[int] | None = None, crf: bool | None = None,
                     confirmed_only: bool = False) -> list[SeedAnnotationInfo]:
    """One COCO-RLE mask per (image, label) present, matching the run's current mapping.

    Stale rows (another mapping version or CRF setting) are recomputed from the segment
    maps and stored; unnamed and ignored clusters give no annotation.
    """
    for _attempt in range(5):
        with ctx.db.read() as s:
            mapping = snapshot(s, get_done_run(s, run_id))
            use_crf = bool((mapping.crf_default if crf is None else crf) and mapping.has_crf)
            q = (select(RunImage.position, RunImage.image_id, RunImage.confirmed, Image.width, Image.height)
                 .join(Image, RunImage.image_id == Image.id).where(RunImage.run_id == run_id))
            if image_ids is not None:
                wanted = [int(i) for i in image_ids]
                q = q.where(RunImage.image_id.in_(wanted))
            if confirmed_only:
                q = q.where(RunImage.confirmed.is_(True))
            items = s.execute(q.order_by(RunImage.position)).all()
            if image_ids is not None:
                found = {it.image_id for it in items}
                missing = [i for i in wanted if i not in found]
                if missing and not confirmed_only:
                    raise NotFound(f"image {missing[0]} is not part of run {run_id}")
            fresh: set[int] = set()
            if items:
                rows = s.execute(select(SeedAnnotation.image_id, SeedAnnotation.mapping_version,
                                        SeedAnnotation.crf)
                                 .where(SeedAnnotation.run_id == run_id,
                                        SeedAnnotation.image_id.in_([it.image_id for it in items]))).all()
                state: dict[int, bool] = {}
                for image_id, version, row_crf in rows:
                    ok = version == mapping.version and row_crf == use_crf
                    state[image_id] = state.get(image_id, True) and ok
                fresh = {i for i, ok in state.items() if ok}
        stale = [it for it in items if it.image_id not in fresh]
        if mapping.label_clusters():
            computed = {it.image_id: _compute_image(mapping, it.position, (it.width, it.height), use_crf)
                        for it in stale}
        else:
            computed = {it.image_id: [] for it in stale}
        if not stale:
            break
        with ctx.db.write() as s:
            run = lock_for_update(s, Run, run_id)
            if run is None or run.mapping_version != mapping.version:
                continue            # the mapping changed meanwhile: compute again
            confirmed = {ri.image_id: ri.confirmed for ri in s.scalars(
                select(RunImage).where(RunImage.run_id == run_id,
                                       RunImage.image_id.in_(list(computed))))}
            s.execute(delete(SeedAnnotation).where(SeedAnnotation.run_id == run_id,
                                                   SeedAnnotation.image_id.in_(list(computed))))
            for image_id, anns in computed.items():
                for label_id, rle, area, bbox in anns:
                    s.add(SeedAnnotation(run_id=run_id, image_id=image_id, label_id=label_id, rle=rle,
                                         area=area, bbox=list(bbox), crf=use_crf,
                                         mapping_version=mapping.version,
                                         confirmed=confirmed.get(image_id, False)))
        break
    else:
        raise UserError("the labels of this run keep changing; try again")
    with ctx.db.read() as s:
        q = (select(SeedAnnotation, Label).join(Label, SeedAnnotation.label_id == Label.id)
             .where(SeedAnnotation.run_id == run_id,
                    SeedAnnotation.image_id.in_([it.image_id for it in items]))
             .order_by(SeedAnnotation.image_id, Label.name))
        if confirmed_only:
            q = q.where(SeedAnnotation.confirmed.is_(True))
        return [SeedAnnotationInfo(id=a.id, run_id=a.run_id, image_id=a.image_id, label_id=a.label_id,
                                   label_name=lab.name, colour=lab.colour, rle=dict(a.rle), area=a.area,
                                   bbox=tuple(a.bbox), crf=a.crf, confirmed=a.confirmed)  # type: ignore[arg-type]
                for a, lab in s.execute(q).all()]


def confirm_image(ctx, run_id: int, image_id: int, confirmed: bool = True) -> None:
    """Record that a person checked (or un-checked) this image's segmentation in this run."""
    with ctx.db.write() as s:
        get_done_run(s, run_id, lock=True)
        ri = s.scalars(select(RunImage).where(RunImage.run_id == run_id,
                                              RunImage.image_id == image_id)).first()
        if ri is None:
            raise NotFound(f"image {image_id} is not part of run {run_id}")
        ri.confirmed = bool(confirmed)
        ri.confirmed_at = utcnow() if confirmed else None
        for ann in s.scalars(select(SeedAnnotation).where(SeedAnnotation.run_id == run_id,
                                                          SeedAnnotation.image_id == image_id)):
            ann.confirmed = bool(confirmed)
    if confirmed:
        seed_annotations(ctx, run_id, [image_id])


def confirmed_count(ctx, run_id: int) -> int:
    with ctx.db.read() as s:
        return s.scalar(select(func.count()).select_from(RunImage).where(
            RunImage.run_id == run_id, RunImage.confirmed.is_(True))) or 0
