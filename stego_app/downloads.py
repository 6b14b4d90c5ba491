"""Files handed to a browser for download, under names nobody can guess.

Exports live in <data_dir>/exports/<id>/..., a path anyone could guess, so that folder is
never served. To offer a file, `offer` links (or copies) it to
<data_dir>/downloads/<random token>/<name>; only that folder is a Gradio allowed path, and
Gradio serves it (behind the login when --auth is set) from its own cache under a name
derived from the content and the server's secret seed. Links older than `MAX_AGE_S` are
swept on the next offer.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

MAX_AGE_S = 24 * 3600
TOKEN_BYTES = 24          # 192 random bits in every download path


def offer(config, path: str | Path) -> Path:
    """A path under the download folder, in a fresh random sub-folder, holding `path`'s bytes."""
    src = Path(path)
    root = config.downloads_dir
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    folder = root / secrets.token_urlsafe(TOKEN_BYTES)
    folder.mkdir()
    dest = folder / src.name
    try:
        os.link(src, dest)
    except OSError:          # another file system, or links not allowed
        shutil.copyfile(src, dest)
    return dest


def _sweep(root: Path) -> None:
    cutoff = time.time() - MAX_AGE_S
    for folder in root.iterdir():
        try:
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError as exc:
            log.debug("could not sweep %s: %s", folder, exc)
