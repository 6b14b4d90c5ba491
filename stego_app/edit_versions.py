"""Optimistic concurrency for label edits: an edit states the mapping version it was made on.

Every edit of a run's cluster -> label mapping runs in one write transaction that locks the
run (stego_app.labels.mapping._Edit) and bumps ``Run.mapping_version``. A page that showed version
v makes its edit inside ``expect_version(v)``; if another tab or the CLI changed the mapping
since, the edit is refused with `StaleMapping` (nothing is written) and the page shows the
current state instead. Without ``expect_version`` (the CLI, scripts) edits apply to
whatever is current, serialised as before.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from stego_app.errors import UserError

_EXPECTED: contextvars.ContextVar[int | None] = contextvars.ContextVar("stego_expected_mapping_version",
                                                                       default=None)


class StaleMapping(UserError):
    """The mapping changed since the page that made this edit showed it."""

    def __init__(self, run_id: int, expected: int, current: int):
        super().__init__(f"not saved: the names of run {run_id} were changed elsewhere (another tab or "
                         f"person) since this page showed them; the page now shows the current names, "
                         "check them and redo your change if it is still needed")
        self.run_id, self.expected, self.current = run_id, expected, current


@contextlib.contextmanager
def expect_version(version: int | None) -> Iterator[None]:
    """Edits inside this block are refused unless the run's mapping is still at `version`."""
    token = _EXPECTED.set(None if version is None else int(version))
    try:
        yield
    finally:
        _EXPECTED.reset(token)


def check(run_id: int, current: int) -> None:
    """Called by the edit transaction with the locked run's version; raises StaleMapping."""
    expected = _EXPECTED.get()
    if expected is not None and expected != current:
        raise StaleMapping(run_id, expected, current)


def mapping_version(ctx, run_id: int) -> int:
    """The run's current mapping version (read it BEFORE the clusters a page shows)."""
    from stego_app.runs import get_run

    return get_run(ctx, run_id).mapping_version
