"""The images a person should correct first: one typical image of each kind of scene in a run.

Correcting a few images in an annotation tool and importing them is where a team's pre-labels
gain most (docs/evaluation.md, *Which images to correct*). ``pick`` orders a run's images with
``core.selection`` on the run's cached image features; the Export tab's *images to correct
first* option (``ExportOptions.to_correct``) exports just those, and ``app.py label RUN
to-correct`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sqlalchemy import select

from core.constants import TO_CORRECT_COUNT
from core.selection import DEFAULT_PICK, image_pooled, pick_images
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


def pick(run_dir: Path, positions: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """Indices into ``positions`` (a run's image positions) of the ``min(n, len(positions))``
    images to correct first, the most useful first."""
    check_count(n)
    if not positions:
        return []
    pooled = image_pooled(infer_store(run_dir))[list(positions)]
    return pick_images(pooled, min(n, len(positions)), DEFAULT_PICK, seed=seed)


def images_to_correct(ctx, run_id: int, n: int = TO_CORRECT_COUNT) -> list[ImageToCorrect]:
    """The ``n`` images of a finished run to correct first (fewer when the run has fewer)."""
    check_count(n)
    with ctx.db.read() as s:
        run = get_done_run(s, run_id, needs="images to correct are picked from a finished run")
        rows = s.execute(select(RunImage.position, Image.id, Image.name).join(Image, RunImage.image_id == Image.id)
                         .where(RunImage.run_id == run_id).order_by(RunImage.position)).all()
        run_dir = Path(run.run_dir)
    chosen = pick(run_dir, [r[0] for r in rows], n)
    return [ImageToCorrect(k + 1, rows[j][1], rows[j][2], rows[j][0]) for k, j in enumerate(chosen)]
