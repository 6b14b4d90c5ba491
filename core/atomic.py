"""Atomic file writes: write a temporary sibling, then os.replace it onto the target.

Readers (another process, a resumed run) see the whole old file or the whole new one,
never half a file; a failed write leaves the old file and no temporary behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_npy"]


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary path next to `path`; moved onto `path` when the block succeeds.

    `suffix` ends the temporary name (".npy" / ".npz" keep numpy from appending its own).
    Example: ``with atomic_path(p, ".npy") as tmp: np.save(tmp, arr)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, data: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))


def atomic_save_npy(path: Path | str, arr: Any) -> None:
    """np.save, atomically."""
    import numpy as np

    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, arr)
