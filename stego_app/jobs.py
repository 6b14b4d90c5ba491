"""The lifecycle shared by background jobs (discovery runs, refinements): one home for its rules.

Both tables carry ``status``, ``cancel_requested``, ``owner``, ``heartbeat_at``,
``finished_at`` and ``error``. Cancelling, queueing again, waiting and marking the jobs of a
stopped process as interrupted are the same for both; callers pass the row (locked in their
write transaction) and the words that name it in messages.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from sqlalchemy import select, update

from core.errors import ImageLoadError
from stego_app.db import as_utc
from stego_app.errors import UserError
from stego_app.models import (IMAGE_ERROR, RUN_ACTIVE, RUN_CANCELLABLE, RUN_CANCELLED, RUN_INTERRUPTED, RUN_QUEUED, RUN_RESUMABLE,
                              RUN_RUNNING, Image, RunImage, utcnow)

log = logging.getLogger(__name__)

__all__ = ["cancel", "requeue", "wait", "mark_interrupted", "failure_text", "image_at", "mark_unreadable"]


def image_at(s, run_id: int, path) -> Image | None:
    """The image of run ``run_id`` whose stored file is ``path`` (an ImageLoadError's path)."""
    return s.scalars(select(Image).join(RunImage, RunImage.image_id == Image.id).where(
        RunImage.run_id == run_id, Image.path == str(path))).first()


def failure_text(db, run_id: int, exc: BaseException) -> str:
    """The error a failed job stores. An image that cannot be read is named as the user knows it
    (its file name and id in the project), not by the stored copy's path."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BrokenProcessPool):
        return ("a worker process stopped abruptly, most often because the machine ran out of memory "
                "(very large images, many clusters, several pipeline jobs at once: STEGO_PIPELINE_JOBS=1 "
                f"halves the memory). Resume to try again ({text})")
    if not isinstance(exc, ImageLoadError):
        return text
    try:
        with db.read() as s:
            image = image_at(s, run_id, exc.path)
            named = None if image is None else (image.name, image.id)
    except Exception:   # the plain text is still right; the name is a courtesy
        return text
    if named is None:
        return text
    return (f"image '{named[0]}' (id {named[1]}) cannot be read: {exc.reason}. Add a good copy of it in the "
            f"Project tab and resume, or start a new run, which leaves it out ({type(exc).__name__})")


def mark_unreadable(db, run_id: int, exc: BaseException) -> None:
    """The image named in a load error gets status 'error': later runs leave it out, and adding
    a good copy of it in the Project tab replaces the stored one (so the failed job can resume)."""
    if not isinstance(exc, ImageLoadError):
        return
    try:
        with db.write() as s:
            image = image_at(s, run_id, exc.path)
            if image is not None:
                image.status, image.error = IMAGE_ERROR, exc.reason
                log.warning("image %s marked unreadable: %s", image.id, image.error)
    except Exception:
        log.exception("could not mark the unreadable image of run %s", run_id)


def cancel(row: Any, what: str, plural: str) -> None:
    """A queued or interrupted job is cancelled at once, a running one at its next check.

    ``what`` names the row ("run 3"), ``plural`` the kind in the refusal ("runs", "ones").
    """
    if row.status not in RUN_CANCELLABLE:
        raise UserError(f"{what} is {row.status}; only {', '.join(RUN_CANCELLABLE[:-1])} or {RUN_CANCELLABLE[-1]} "
                        f"{plural} can be cancelled")
    if row.status == RUN_RUNNING:
        row.cancel_requested = True
    else:
        row.status, row.finished_at = RUN_CANCELLED, utcnow()


def check_resumable(row: Any, what: str, plural: str) -> None:
    if row.status not in RUN_RESUMABLE:
        raise UserError(f"{what} is {row.status}; only interrupted, failed or cancelled {plural} can be resumed")


def requeue(row: Any, owner: str) -> None:
    """Queue the job again under the worker ``owner`` (check_resumable first)."""
    row.status, row.cancel_requested, row.error = RUN_QUEUED, False, None
    row.owner, row.finished_at, row.heartbeat_at = owner, None, utcnow()


def wait(get: Callable[[], Any], timeout: float | None = None, poll: float = 0.2) -> Any:
    """Poll ``get()`` until its result is no longer active (or the timeout passes); return it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = get()
        if not info.is_active or (deadline is not None and time.monotonic() >= deadline):
            return info
        time.sleep(poll)


def mark_interrupted(db, model, is_alive: Callable, error: str) -> list[int]:
    """Jobs of ``model`` queued/running under a worker that is gone become 'interrupted'."""
    with db.write() as s:
        rows = s.scalars(select(model).where(model.status.in_(RUN_ACTIVE))).all()
        dead = [r.id for r in rows if not is_alive(r.owner, as_utc(r.heartbeat_at))]
        if dead:
            s.execute(update(model).where(model.id.in_(dead)).values(
                status=RUN_INTERRUPTED, owner=None, cancel_requested=False, error=error))
    return dead
