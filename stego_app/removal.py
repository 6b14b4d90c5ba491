"""Removing images from a project without breaking the runs that used them.

An image no run has used is deleted: its row and the app's stored copy (a referenced
server file is never touched). An image that runs used stays as a row with status
"removed" and keeps its file, so those runs' segments, Explore views and exports stay
readable; it leaves the project's lists, counts, galleries and every NEW run. Such runs
are marked stale: `removed_in_run` counts their images removed since, and the UI and
CLI say so. Adding the same image again brings the row back (stego_app.ingest).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sqlalchemy import delete, func, select

from stego_app.db import lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.models import IMAGE_REMOVED, Image, Project, Run, RunImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemovalReport:
    deleted: list[str] = field(default_factory=list)            # names gone for good
    kept_for_runs: dict[str, list[int]] = field(default_factory=dict)  # name -> runs that still show it
    not_found: list[str] = field(default_factory=list)

    @property
    def n_removed(self) -> int:
        return len(self.deleted) + len(self.kept_for_runs)

    def summary(self) -> str:
        n = self.n_removed
        text = f"{n} image{'s' if n != 1 else ''} removed from the project"
        if self.kept_for_runs:
            used = sorted({r for rs in self.kept_for_runs.values() for r in rs})
            text += (f"; {len(self.kept_for_runs)} of them stay readable in the run"
                     f"{'s' if len(used) != 1 else ''} that used them ({', '.join(map(str, used))}), "
                     "which are now marked as using removed images")
        if self.not_found:
            text += f"; not in the project: {', '.join(self.not_found)}"
        return text


def remove_images(ctx, project_id: int, images: Sequence[int | str]) -> RemovalReport:
    """Remove images (ids, or names as the project lists them) from a project.

    UserError when none of them is in the project; unknown ones are reported.
    """
    if not images:
        raise UserError("choose the images to remove")
    files: list[Path] = []
    deleted: list[str] = []
    kept: dict[str, list[int]] = {}
    missing: list[str] = []
    with ctx.db.write() as s:
        if lock_for_update(s, Project, project_id) is None:
            raise NotFound(f"project {project_id} does not exist")
        rows: list[Image] = []
        for key in images:
            row = _find(s, project_id, key)
            if row is None:
                missing.append(str(key))
            elif row not in rows:
                rows.append(row)
        if not rows:
            raise UserError(f"no such image in this project: {', '.join(missing)}")
        for row in rows:
            used = list(s.scalars(select(RunImage.run_id).where(RunImage.image_id == row.id)
                                  .order_by(RunImage.run_id)).all())
            if used:
                row.status, row.error = IMAGE_REMOVED, "removed from the project"
                kept[row.name] = used
            else:
                if row.stored:
                    files.append(Path(row.path))
                deleted.append(row.name)
                s.execute(delete(Image).where(Image.id == row.id))
    for path in files:          # after the commit: a failed transaction leaves every file in place
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete %s: %s", path, exc)
    log.info("project %s: %d images deleted, %d kept for runs", project_id, len(deleted), len(kept))
    return RemovalReport(deleted, kept, missing)


def _find(s, project_id: int, key: int | str) -> Image | None:
    text = str(key).strip()
    q = select(Image).where(Image.project_id == project_id, Image.status != IMAGE_REMOVED)
    row = s.scalars(q.where(Image.name == text)).first()
    if row is None and text.isdigit():
        row = s.scalars(q.where(Image.id == int(text))).first()
    return row


def removed_in_run(ctx, run_id: int) -> int:
    """How many of a run's images were removed from the project after it started (0 = not stale)."""
    with ctx.db.read() as s:
        if s.get(Run, run_id) is None:
            raise NotFound(f"run {run_id} does not exist")
        return s.scalar(select(func.count()).select_from(RunImage).join(Image, RunImage.image_id == Image.id)
                        .where(RunImage.run_id == run_id, Image.status == IMAGE_REMOVED)) or 0


def stale_note(n_removed: int) -> str:
    """What the UI and CLI say about a run some of whose images were removed ('' when none)."""
    if not n_removed:
        return ""
    return (f"{n_removed} image{'s' if n_removed != 1 else ''} of this run "
            f"{'were' if n_removed != 1 else 'was'} removed from the project since; the run still "
            "shows and exports them (start a new run to leave them out)")
