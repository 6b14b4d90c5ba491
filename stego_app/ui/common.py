"""What every tab module of the UI shares: the error guard, progress callbacks, sizes."""
from __future__ import annotations

import functools
import logging
from typing import Callable

import gradio as gr

from stego_app import thumbnails
from stego_app.errors import UserError
from stego_app.ui import formatting as H

log = logging.getLogger(__name__)

GALLERY_PAGE = thumbnails.PER_PAGE      # thumbnails per gallery page (the Explore dropdown lists every image)
THUMB_SIZE = thumbnails.DEFAULT_SIZE    # long side of gallery thumbnails (cached files)


ERROR_TOAST_S = 15          # seconds an error toast stays
REFUSED_TITLE = "Not done"  # the toast of an action refused for the user's input (not a failure of the app)


def session_id() -> str | None:
    """The browser session of the event being handled (None outside an event).

    Gradio keeps the current request in a context variable while a handler runs; reading it
    there saves passing ``gr.Request`` through every handler that redraws the label views.
    """
    try:
        from gradio.context import LocalContext

        request = LocalContext.request.get(None)
    except (ImportError, AttributeError, LookupError):
        return None
    return getattr(request, "session_hash", None) if request is not None else None


class ShownVersions:
    """The mapping version each browser session was last sent, per run (bounded, thread-safe).

    The 1 s poll reads it to tell edits made in this tab from edits made elsewhere: a poll sent
    while this tab's own edit was in flight still carries the old version, and redrawing then
    would overwrite the edit's own (newer) views and selections with a second copy.
    """

    def __init__(self, limit: int = 2000):
        import threading
        from collections import OrderedDict

        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.limit = limit

    def record(self, run_id: int, version: int | None) -> None:
        key = (session_id(), run_id)
        if key[0] is None or version is None:
            return
        with self._lock:
            self._data[key] = max(version, self._data.get(key, version))
            self._data.move_to_end(key)
            while len(self._data) > self.limit:
                self._data.popitem(last=False)

    def sent(self, run_id: int) -> int | None:
        key = (session_id(), run_id)
        if key[0] is None:
            return None
        with self._lock:
            return self._data.get(key)


def show_refused(exc: UserError) -> None:
    """The toast of an action refused for the user's input, saying what to do."""
    gr.Warning(str(exc), duration=ERROR_TOAST_S, title=REFUSED_TITLE)


def guard(fn: Callable) -> Callable:
    """Show a refused action (UserError) as a toast titled "Not done", saying what to do; log
    anything else (a bug) and show a short toast titled "Error".

    The handler's outputs are all skipped: a refused action leaves every component as it was
    (raising gr.Error would put a red "Error" badge over every output until the next success).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            log.info("UI action %s refused: %s", fn.__name__, exc)
            show_refused(exc)
        except Exception as exc:  # a bug: the trace goes to the server log, not the page
            log.exception("UI action %s failed", fn.__name__)
            gr.Warning(f"Something went wrong ({type(exc).__name__}: {exc}). "
                       "The details are in the server log.", duration=ERROR_TOAST_S, title="Error")
        return gr.skip()

    return wrapper


def int_or_none(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def progress_cb(progress, desc: str):
    """A service progress callback (done, total) that drives a gr.Progress."""
    def cb(done: int, total: int) -> None:
        try:
            progress((done, total) if total else 0.0, desc=desc)
        except Exception:  # noqa: BLE001 - progress display is best effort
            pass
    return cb


def page_views(gallery, slider, page) -> dict:
    """A thumbnail gallery and its page slider (hidden while everything fits on one page)."""
    return {gallery: [(str(path), info.name) for info, path in page.items],
            slider: gr.update(maximum=page.n_pages, value=page.page, visible=page.n_pages > 1,
                              info=H.page_caption(page.start, page.stop, page.total))}


def job_buttons(cancel_btn, resume_btn, job) -> dict:
    """Cancel / resume buttons pressable only when ``job`` (a run or refinement info, or None)
    is in a state that allows them."""
    return {cancel_btn: gr.update(interactive=job is not None and job.is_cancellable),
            resume_btn: gr.update(interactive=job is not None and job.is_resumable)}
