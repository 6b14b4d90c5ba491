"""A data folder that was moved or copied keeps working.

The database and each run's files hold absolute paths: the stored images
(``<data>/images/<project>/<file>``), the run folders (``<data>/runs/<id>``), the exports
(``<data>/exports/<id>``), and inside a run folder its image list, its feature stores
(``<data>/cache/...`` by default) and what its stages wrote. After ``mv data /bigger/disk/data``
they all point at a folder that is gone; after ``cp -r data copy`` the copy's database points
into the original, so the copy would read and write the original's runs.

``relocate`` runs at every start (``stego_app.context.create_context``). It finds the data
folders the stored paths were written under, ``X`` with ``X/runs/<id>`` a run folder or
``X/images/<project>/<file>`` a stored image, where ``X`` is not the data folder the app runs
on and this data folder holds the same run folder or image (and, with a database outside the
data folder, which other hosts may share, where ``X`` is gone). Then every stored path under
``X`` (database columns, and every JSON file of the run folders and feature stores that now
live under the data folder; a cache folder elsewhere, which other data folders may share, is not
touched) is rewritten to the same place under the data folder. Paths
outside any such ``X`` (images added from a server folder in place, a cache folder set
elsewhere) are left alone. Nothing is done when nothing moved: a start costs two queries that
return no row.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import select

from core.atomic import atomic_write_json
from stego_app.models import Export, Image, Run

log = logging.getLogger(__name__)


def _database_inside(cfg) -> bool:
    """Whether the database is a SQLite file inside the data folder (so a copy of the folder is a
    copy of the database too)."""
    from sqlalchemy.engine import make_url

    url = make_url(str(cfg.database_url))
    if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
        return False
    return Path(url.database).resolve().is_relative_to(Path(cfg.data_dir).resolve())


def old_data_dirs(db, cfg) -> set[Path]:
    """Data folders other than ``cfg.data_dir`` that stored paths point into, whose runs or
    images this data folder holds too. With a database outside the data folder (PostgreSQL, or
    a SQLite file elsewhere) several hosts may share it, each mounting the data at its own
    place: then only a folder that no longer exists here counts (moved, not mounted elsewhere)."""
    found: set[Path] = set()
    here = str(cfg.data_dir) + os.sep        # paths already under this folder are not read at all
    with db.read() as s:
        for run_id, run_dir in s.execute(select(Run.id, Run.run_dir).where(
                ~Run.run_dir.startswith(here, autoescape=True))):
            p = Path(run_dir or "")
            if p.name == str(run_id) and p.parent.name == "runs" and p.parent.parent != cfg.data_dir \
                    and (cfg.runs_dir / p.name).is_dir():
                found.add(p.parent.parent)
        for project_id, path in s.execute(select(Image.project_id, Image.path).where(
                Image.stored.is_(True), ~Image.path.startswith(here, autoescape=True))):
            p = Path(path or "")
            if p.parent.name == str(project_id) and p.parent.parent.name == "images" \
                    and p.parents[2] != cfg.data_dir and (cfg.images_dir / p.parent.name / p.name).is_file():
                found.add(p.parents[2])
    if not _database_inside(cfg):
        found = {p for p in found if not p.exists()}
    return found


def _moved(value: str, olds: Iterable[Path], new: Path) -> str | None:
    """``value`` with an old data folder prefix replaced by ``new``; None when it has none."""
    for old in olds:
        o = str(old)
        if value == o:
            return str(new)
        if value.startswith(o.rstrip("/") + "/"):
            return str(new) + value[len(o.rstrip("/")):]
    return None


def _rewrite(obj: Any, olds: list[Path], new: Path) -> tuple[Any, int]:
    """A JSON value with every string under an old data folder moved; and how many were."""
    if isinstance(obj, str):
        moved = _moved(obj, olds, new)
        return (obj, 0) if moved is None else (moved, 1)
    if isinstance(obj, list):
        out, n = [], 0
        for v in obj:
            v, k = _rewrite(v, olds, new)
            out.append(v)
            n += k
        return out, n
    if isinstance(obj, dict):
        res, n = {}, 0
        for key, v in obj.items():
            v, k = _rewrite(v, olds, new)
            res[key] = v
            n += k
        return res, n
    return obj, 0


def _rewrite_json_files(folders: Iterable[Path], olds: list[Path], new: Path) -> int:
    n = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.rglob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                continue                                  # not ours, or unreadable: leave it
            data, k = _rewrite(data, olds, new)
            if k:
                atomic_write_json(path, data, indent=1)
                n += k
    return n


def relocate(db, cfg) -> dict[str, int]:
    """Rewrite the stored paths of a moved or copied data folder to ``cfg.data_dir`` (resolved);
    returns what was rewritten ({} when nothing moved)."""
    olds = sorted(old_data_dirs(db, cfg), key=lambda p: -len(str(p)))     # the longest prefix first
    if not olds:
        return {}
    new = cfg.data_dir
    counts = {"images": 0, "runs": 0, "exports": 0, "files": 0}
    with db.write() as s:
        for img in s.scalars(select(Image)):
            if (moved := _moved(img.path or "", olds, new)) is not None:
                img.path = moved
                counts["images"] += 1
        for run in s.scalars(select(Run)):
            if (moved := _moved(run.run_dir or "", olds, new)) is not None:
                run.run_dir = moved
                counts["runs"] += 1
        for exp in s.scalars(select(Export)):
            for column in ("directory", "path"):
                if (moved := _moved(getattr(exp, column) or "", olds, new)) is not None:
                    setattr(exp, column, moved)
                    counts["exports"] += 1
    folders = [cfg.runs_dir]
    if Path(cfg.feature_cache_dir).resolve().is_relative_to(Path(new).resolve()):
        folders.append(cfg.feature_cache_dir)        # a cache that moved with the data (the default)
    counts["files"] = _rewrite_json_files(folders, olds, new)
    log.warning("the data folder was moved or copied from %s to %s: paths rewritten (%s)",
                ", ".join(map(str, olds)), new, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts
