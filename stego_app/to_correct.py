"""The images a person should correct first: one typical image of each kind of scene in a run.

Correcting a few images in an annotation tool and importing them is where a team's pre-labels
gain most (docs/evaluation.md, *Which images to correct*). ``pick`` orders a run's images with
``core.selection`` on the run's cached image features; the Export tab's *images to correct
first* option (``ExportOptions.to_correct``) exports just those, and ``app.py label RUN
to-correct`` lists them. Images whose corrections are already imported are never picked again:
asking again after an import gives the next batch (``core.selection``'s ``done``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sqlalchemy import select

from core.constants import TO_CORRECT_COUNT
from core.selection import DEFAULT_PICK, image_pooled, pick_images
from stego_app.corrections import corrected_images
from stego_app.errors import UserError
from stego_app.found import infer_store
from stego_app.labels.mapping import get_done_run
from stego_app.models import Image, RunImage


@dataclass(frozen=True)
class ImageToCorrect:
    rank: int           # 1 = correct this one first
    image_id: int
    name: str
    position: int       # index in the run


def check_count(n) -> int:
    """``n`` as a whole number >= 1, or a UserError that says what to give."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"the number of images to correct must be a whole number >= 1, got {n!r}")
    return n


def pick(run_dir: Path, positions: Sequence[int], n: int, done: Sequence[int] = (), seed: int = 0) -> list[int]:
    """Indices into ``positions`` (a run's image positions) of the images to correct next, the
    most useful first: ``n`` of them, or every one left. ``done``: indices into ``positions`` of
    images already corrected (never picked; they count as covered)."""
    check_count(n)
    if not positions:
        return []
    done = sorted(set(done))
    left = len(positions) - len(done)
    if left < 1:
        raise UserError(f"all {len(positions)} images already have imported corrections: there is no "
                        "image left to correct")
    pooled = image_pooled(infer_store(run_dir))[list(positions)]
    return pick_images(pooled, min(n, left), DEFAULT_PICK, seed=seed, done=done)


def corrected_ids(ctx, run_id: int) -> set[int]:
    """Ids of the run's images whose corrections are imported (checked or not): not picked again."""
    return set(corrected_images(ctx, run_id))


def pick_next(ctx, run_id: int, run_dir: Path, positions: Sequence[int], image_ids: Sequence[int],
              n: int) -> tuple[list[int], int]:
    """``pick`` for the run's images at ``positions`` (with their ``image_ids``), leaving out those
    whose corrections are imported; also returns how many were left out."""
    corrected = corrected_ids(ctx, run_id)
    done = [j for j, image_id in enumerate(image_ids) if image_id in corrected]
    return pick(run_dir, positions, n, done=done), len(done)


def images_to_correct(ctx, run_id: int, n: int = TO_CORRECT_COUNT) -> list[ImageToCorrect]:
    """The ``n`` images of a finished run to correct next (fewer when fewer are left), leaving
    out the images whose corrections are already imported."""
    check_count(n)
    with ctx.db.read() as s:
        run = get_done_run(s, run_id, needs="images to correct are picked from a finished run")
        rows = s.execute(select(RunImage.position, Image.id, Image.name).join(Image, RunImage.image_id == Image.id)
                         .where(RunImage.run_id == run_id).order_by(RunImage.position)).all()
        run_dir = Path(run.run_dir)
    chosen, _ = pick_next(ctx, run_id, run_dir, [r[0] for r in rows], [r[1] for r in rows], n)
    return [ImageToCorrect(k + 1, rows[j][1], rows[j][2], rows[j][0]) for k, j in enumerate(chosen)]
