"""Projects: create, list, open; the demo project on first start."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from stego_app.db import as_utc
from stego_app.errors import NotFound, UserError
from stego_app.models import IMAGE_REMOVED, Image, Project, Run

log = logging.getLogger(__name__)

MAX_NAME = 200
DEMO_NAME = "Demo"


@dataclass(frozen=True)
class ProjectInfo:
    id: int
    name: str
    description: str
    is_demo: bool
    created_at: datetime
    n_images: int
    n_runs: int


def _info(s, p: Project) -> ProjectInfo:
    n_images = s.scalar(select(func.count()).select_from(Image).where(
        Image.project_id == p.id, Image.status != IMAGE_REMOVED)) or 0
    n_runs = s.scalar(select(func.count()).select_from(Run).where(Run.project_id == p.id)) or 0
    return ProjectInfo(id=p.id, name=p.name, description=p.description, is_demo=p.is_demo,
                       created_at=as_utc(p.created_at), n_images=n_images, n_runs=n_runs)  # type: ignore[arg-type]


def clean_name(name: str, what: str = "project name", max_len: int = MAX_NAME) -> str:
    """Strip and check a user-chosen name."""
    cleaned = " ".join((name or "").split())
    if not cleaned:
        raise UserError(f"the {what} must not be empty")
    if len(cleaned) > max_len:
        raise UserError(f"the {what} is too long ({len(cleaned)} characters; at most {max_len})")
    return cleaned


def create_project(ctx, name: str, description: str = "", *, is_demo: bool = False) -> ProjectInfo:
    name = clean_name(name)
    try:
        with ctx.db.write() as s:
            clash = s.scalars(select(Project).where(func.lower(Project.name) == name.lower())).first()
            if clash is not None:
                raise UserError(f"a project named {clash.name!r} already exists")
            p = Project(name=name, description=(description or "").strip(), is_demo=is_demo)
            s.add(p)
            s.flush()
            info = _info(s, p)
    except IntegrityError:  # created by someone else at the same moment
        raise UserError(f"a project named {name!r} already exists") from None
    log.info("project %s created: %s", info.id, info.name)
    return info


def list_projects(ctx) -> list[ProjectInfo]:
    with ctx.db.read() as s:
        return [_info(s, p) for p in s.scalars(select(Project).order_by(Project.id)).all()]


def recent_project(ctx) -> int | None:
    """The project a page opened without one in its address shows: the one with the latest
    activity (created, or a run started in it); None without projects."""
    with ctx.db.read() as s:
        rows = s.execute(select(Project.id, Project.created_at, func.max(Run.created_at))
                         .outerjoin(Run, Run.project_id == Project.id).group_by(Project.id, Project.created_at)).all()
    if not rows:
        return None
    return max(rows, key=lambda r: (max(as_utc(t) for t in r[1:] if t is not None), r[0]))[0]


def get_project(ctx, project_id: int) -> ProjectInfo:
    with ctx.db.read() as s:
        p = s.get(Project, project_id)
        if p is None:
            raise NotFound(f"project {project_id} does not exist")
        return _info(s, p)


def find_project(ctx, name_or_id: str | int) -> ProjectInfo:
    """A project by id (digits) or by name (case-insensitive)."""
    key = str(name_or_id).strip()
    with ctx.db.read() as s:
        p = s.scalars(select(Project).where(func.lower(Project.name) == key.lower())).first()
        if p is None and key.isdigit():
            p = s.get(Project, int(key))
        if p is None:
            raise NotFound(f"no project named or numbered {key!r}")
        return _info(s, p)


def ensure_demo_project(ctx) -> ProjectInfo | None:
    """Create the demo project from scikit-image's sample photographs, once per database.

    Returns None when a demo project was made before (even if renamed) or no sample
    images are available.
    """
    from stego_app import demo
    from stego_app.ingest import ingest_files

    with ctx.db.read() as s:
        if s.scalars(select(Project).where(Project.is_demo.is_(True))).first() is not None:
            return None
    files = demo.demo_image_files()
    if not files:
        log.warning("no demo images available; demo project not created")
        return None
    name = DEMO_NAME
    with ctx.db.read() as s:
        taken = {n.lower() for n in s.scalars(select(Project.name))}
    k = 2
    while name.lower() in taken:
        name, k = f"{DEMO_NAME} {k}", k + 1
    try:
        project = create_project(ctx, name, demo.DESCRIPTION, is_demo=True)
    except UserError:  # another process created it at the same moment
        return None
    report = ingest_files(ctx, project.id, [p for _, p in files], [n for n, _ in files])
    if report.rejected:
        log.warning("demo images rejected: %s", report.rejected)
    return get_project(ctx, project.id)
