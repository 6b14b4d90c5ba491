"""Corpus ingestion: uploaded files, zip archives and server folders.

Each file is checked on its own (size, full decode, pixel count, content hash) and
reported as added, duplicate or rejected; one bad file never stops the others. A file
whose content is that of an image already in the project but unreadable there (its copy
damaged or gone) replaces that copy: the image keeps its id, its runs and its labels.
Uploads and zip entries are copied to <data_dir>/images/<project_id>/<sha256>.<ext>;
server-folder images (only under config.allowed_roots) are referenced by path.
Rows are committed in chunks, each chunk one transaction.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import select

from core.atomic import atomic_path
from core.digest import sha256_file
from core.errors import ImageLoadError, PixelLimitError
from core.images import bomb_pixels, load_image, pixel_limit_error
from stego_app.config import ENV_PREFIX
from stego_app.db import as_utc, lock_for_update
from stego_app.errors import NotFound, UserError
from stego_app.models import IMAGE_ERROR, IMAGE_OK, IMAGE_REMOVED, Image, Project

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
CHUNK = 64                 # rows per transaction
_READ = 1 << 20
PIXEL_LIMIT_HINT = f"; the server's limit is set by {ENV_PREFIX}MAX_IMAGE_PIXELS"
NESTED_ARCHIVE = "nested archives are not opened: extract it and add its files (or add it on its own)"
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")
_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif",
        "WEBP": "webp", "PPM": "ppm", "TGA": "tga", "ICO": "ico", "JPEG2000": "jp2"}


@dataclass(frozen=True)
class ImageInfo:
    id: int
    project_id: int
    name: str
    sha256: str
    path: Path
    stored: bool
    width: int
    height: int
    mode: str
    format: str
    file_size: int
    status: str
    error: str | None
    created_at: datetime


@dataclass(frozen=True)
class FileProblem:
    name: str
    reason: str


@dataclass(frozen=True)
class IngestReport:
    added: list[ImageInfo] = field(default_factory=list)
    duplicates: list[FileProblem] = field(default_factory=list)
    rejected: list[FileProblem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)   # names among `added` that replaced an unreadable copy

    def summary(self) -> str:
        def n(k: int, word: str) -> str:
            return f"{k} {word}" + ("" if k == 1 else "s")
        fixed = f" ({len(self.repaired)} replacing an unreadable copy)" if self.repaired else ""
        return (f"{len(self.added)} added{fixed}, {n(len(self.duplicates), 'duplicate')}, "
                f"{len(self.rejected)} rejected")

    def within(self, archive: str) -> "IngestReport":
        """The same report with each refused entry named inside its archive ('photos.zip: a.png')."""
        def named(ps: list[FileProblem]) -> list[FileProblem]:
            return [FileProblem(f"{archive}: {p.name}", p.reason) for p in ps]
        return IngestReport(self.added, named(self.duplicates), named(self.rejected), self.repaired)

    @classmethod
    def merge(cls, reports: Sequence["IngestReport"]) -> "IngestReport":
        """Several reports (uploads + zips) as one, in order."""
        return cls(added=[a for r in reports for a in r.added],
                   duplicates=[d for r in reports for d in r.duplicates],
                   rejected=[p for r in reports for p in r.rejected],
                   repaired=[n for r in reports for n in r.repaired])


def refusal_message(added: int, duplicates: int, rejected: int) -> str | None:
    """What a person must hear when files were refused: None when everything was added."""
    refused = duplicates + rejected
    if not refused and added:
        return None
    if not added:
        if not refused:
            return "nothing was added: no files were found"
        return (f"nothing was added: all {refused} file{'s were' if refused != 1 else ' was'} refused "
                f"({rejected} rejected, {duplicates} already in the project or repeated)")
    return (f"{refused} of {added + refused} files were not added ({rejected} rejected, "
            f"{duplicates} duplicate{'s' if duplicates != 1 else ''}); see the lines above")


class Rejected(Exception):
    """A file that cannot be ingested; the message is the reason shown to the user."""


@dataclass(frozen=True)
class ImageMeta:
    width: int          # after EXIF rotation
    height: int
    mode: str
    format: str


def image_info(row: Image) -> ImageInfo:
    return ImageInfo(id=row.id, project_id=row.project_id, name=row.name, sha256=row.sha256,
                     path=Path(row.path), stored=row.stored, width=row.width, height=row.height,
                     mode=row.mode, format=row.format, file_size=row.file_size, status=row.status,
                     error=row.error, created_at=as_utc(row.created_at))  # type: ignore[arg-type]


# ---------------------------------------------------------------- checking one file

def inspect_image(path: Path, max_pixels: int) -> ImageMeta:
    """Fully decode `path` (core.images.load_image) and describe it; raises Rejected."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(path) as im:
                fmt, mode = im.format or "unknown", im.mode
    except UnidentifiedImageError:
        if Path(path).suffix.lower() == ".zip":
            raise Rejected("not a readable zip archive (damaged, or cut short while copying)") from None
        raise Rejected("not an image (unrecognised file format)") from None
    except PILImage.DecompressionBombError as exc:
        raise Rejected(pixel_limit_error(path, bomb_pixels(exc), max_pixels).reason
                       + PIXEL_LIMIT_HINT) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Rejected(f"corrupt image: {exc}") from None
    try:
        rgb = load_image(path, max_pixels=max_pixels)
    except PixelLimitError as exc:
        raise Rejected(exc.reason + PIXEL_LIMIT_HINT) from None
    except ImageLoadError as exc:
        raise Rejected(exc.reason) from None
    h, w = rgb.shape[:2]
    return ImageMeta(width=w, height=h, mode=mode, format=fmt)


def load_rgb_path(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """HxWx3 uint8 of an ingested image, EXIF-rotated; UserError if it cannot be read."""
    try:
        if max_pixels is None:
            return load_image(path)
        return load_image(path, max_pixels=max_pixels)
    except ImageLoadError as exc:
        raise UserError(f"cannot read image {path.name}: {exc.reason}") from None


# ---------------------------------------------------------------- the shared loop

@dataclass
class _Candidate:
    name: str
    path: Path                 # a file to check (may be a temporary extraction)
    reference: bool = False    # keep `path` as the image's path instead of copying
    temporary: bool = False    # delete `path` when done
    problem: str | None = None  # already known to be bad


@dataclass
class _Pending:
    name: str
    sha256: str
    path: Path
    stored: bool
    meta: ImageMeta
    size: int
    created_file: bool
    repairs: int | None = None   # id of the unreadable image this file is a good copy of


@dataclass(frozen=True)
class _Known:
    id: int
    name: str
    path: str
    status: str


def _unreadable(known: _Known) -> bool:
    """Whether an image already in the project can no longer be read where it is stored:
    marked so by a run or a refinement that failed on it, or its file gone."""
    if known.status == IMAGE_ERROR:
        return True
    path = Path(known.path)
    try:
        return not path.is_file()
    except OSError:
        return True


class _Ingest:
    """Checks candidates one by one and commits accepted images in chunks."""

    def __init__(self, ctx, project_id: int, progress: Progress | None):
        self.ctx = ctx
        self.project_id = project_id
        self.progress = progress
        self.cfg = ctx.config
        self.added: list[ImageInfo] = []
        self.duplicates: list[FileProblem] = []
        self.rejected: list[FileProblem] = []
        self.repaired: list[str] = []
        self.pending: list[_Pending] = []
        self.seen: dict[str, str] = {}
        with ctx.db.read() as s:
            if s.get(Project, project_id) is None:
                raise NotFound(f"project {project_id} does not exist")
            self.known = {row.sha256: _Known(row.id, row.name, row.path, row.status) for row in
                          s.execute(select(Image.sha256, Image.id, Image.name, Image.path, Image.status)
                                    .where(Image.project_id == project_id, Image.status != IMAGE_REMOVED))}
        self.store_dir = self.cfg.images_dir / str(project_id)

    def run(self, candidates: Iterable[_Candidate], total: int) -> IngestReport:
        done = 0
        for cand in candidates:
            try:
                self._one(cand)
            except Exception as exc:  # one bad file never aborts the rest
                log.exception("unexpected error ingesting %s", cand.name)
                self.rejected.append(FileProblem(cand.name, f"could not be read: {exc}"))
            finally:
                if cand.temporary:
                    cand.path.unlink(missing_ok=True)
            done += 1
            if len(self.pending) >= CHUNK:
                self._flush()
            if self.progress is not None:
                self.progress(done, total)
        self._flush()
        log.info("ingest into project %s: %d added, %d duplicates, %d rejected", self.project_id,
                 len(self.added), len(self.duplicates), len(self.rejected))
        return IngestReport(self.added, self.duplicates, self.rejected, self.repaired)

    def _one(self, cand: _Candidate) -> None:
        if cand.problem is not None:
            self.rejected.append(FileProblem(cand.name, cand.problem))
            return
        try:
            size = cand.path.stat().st_size
            if size == 0:
                raise Rejected("empty file")
            if size > self.cfg.max_upload_bytes:
                raise Rejected(f"file too large: {size:,} bytes is over the limit of "
                               f"{self.cfg.max_upload_bytes:,}")
            meta = inspect_image(cand.path, self.cfg.max_image_pixels)
        except Rejected as exc:
            self.rejected.append(FileProblem(cand.name, str(exc)))
            return
        except OSError as exc:
            self.rejected.append(FileProblem(cand.name, f"cannot read file: {exc.strerror or exc}"))
            return
        sha = sha256_file(cand.path)
        if sha in self.seen:
            self.duplicates.append(FileProblem(cand.name, f"same image as {self.seen[sha]} in this batch"))
            return
        known = self.known.get(sha)
        if known is not None and not _unreadable(known):
            self.duplicates.append(FileProblem(cand.name, f"already in the project as {known.name}"))
            return
        self.seen[sha] = cand.name
        if cand.reference:
            dest, created = cand.path, False
        else:
            dest = self.store_dir / f"{sha}.{_EXT.get(meta.format, meta.format.lower())}"
            created = not dest.exists()
            if created or known is not None:   # a damaged copy is written over
                with atomic_path(dest) as tmp:
                    shutil.copyfile(cand.path, tmp)
        self.pending.append(_Pending(cand.name, sha, dest, not cand.reference, meta, size, created,
                                     None if known is None else known.id))

    def _flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            with self.ctx.db.write() as s:
                lock_for_update(s, Project, self.project_id)   # serialise ingests into one project
                present = {row.sha256: row for row in s.scalars(
                    select(Image).where(Image.project_id == self.project_id,
                                        Image.sha256.in_([p.sha256 for p in batch])))}
                rows = []
                for p in batch:
                    old = present.get(p.sha256)
                    if old is not None and old.id == p.repairs:   # a good copy of an unreadable image
                        old.path, old.stored = str(p.path), p.stored
                        old.status, old.error = IMAGE_OK, None
                        rows.append(old)
                        self.repaired.append(old.name)
                        log.info("image %s (%s) repaired from %s", old.id, old.name, p.name)
                        continue
                    if old is not None and old.status == IMAGE_REMOVED:   # removed before: it comes back
                        old.name, old.path, old.stored = p.name[:1000], str(p.path), p.stored
                        old.status, old.error = IMAGE_OK, None
                        rows.append(old)
                        continue
                    if old is not None:   # another ingest added it meanwhile
                        self.duplicates.append(FileProblem(p.name, f"already in the project as {old.name}"))
                        continue
                    row = Image(project_id=self.project_id, name=p.name[:1000], sha256=p.sha256,
                                path=str(p.path), stored=p.stored, width=p.meta.width,
                                height=p.meta.height, mode=p.meta.mode[:16], format=p.meta.format[:16],
                                file_size=p.size, status=IMAGE_OK)
                    s.add(row)
                    rows.append(row)
                s.flush()
                infos = [image_info(r) for r in rows]
        except Exception:
            for p in batch:  # leave no orphan copies behind
                if p.created_file:
                    p.path.unlink(missing_ok=True)
            raise
        self.added.extend(infos)
        for info in infos:
            self.known[info.sha256] = _Known(info.id, info.name, str(info.path), info.status)


# ---------------------------------------------------------------- public services

def ingest_files(ctx, project_id: int, paths: Sequence[Path | str], names: Sequence[str] | None = None,
                 progress: Progress | None = None) -> IngestReport:
    """Copy uploaded files into the project; `names` are the names shown to the user."""
    if names is not None and len(names) != len(paths):
        raise UserError("names and paths differ in length")
    cands = []
    for i, p in enumerate(paths):
        path = Path(p)
        name = names[i] if names is not None else path.name
        problem = None if path.is_file() else ("not found" if not path.exists() else "not a regular file")
        cands.append(_Candidate(name=name, path=path, problem=problem))
    return _Ingest(ctx, project_id, progress).run(cands, len(cands))


def unsafe_zip_name(name: str) -> str | None:
    """Why a zip entry name is unsafe to extract (zip-slip), or None."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "unsafe path in archive: absolute path"
    if any(part == ".." for part in PurePosixPath(norm).parts):
        return "unsafe path in archive: escapes the target folder (..)"
    if "\x00" in norm:
        return "unsafe path in archive: NUL character"
    return None


def ingest_zip(ctx, project_id: int, zip_path: Path | str, progress: Progress | None = None,
               display_name: str | None = None) -> IngestReport:
    """Ingest every image in a zip archive (nested folders included)."""
    zip_path = Path(zip_path)
    label = display_name or zip_path.name
    cfg = ctx.config
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise UserError(f"{label} is not a readable zip archive ({exc})") from None
    with zf:
        entries = [i for i in zf.infolist() if not i.is_dir()]
        cfg.tmp_dir.mkdir(parents=True, exist_ok=True)

        def candidates() -> Iterator[_Candidate]:
            total = 0
            for info in entries:
                name = info.filename
                reason = unsafe_zip_name(name)
                mode = (info.external_attr >> 16) & 0o170000
                if reason is None and mode == stat.S_IFLNK:
                    reason = "symbolic link in archive (not extracted)"
                if reason is None and name.lower().endswith(_ARCHIVE_SUFFIXES):
                    reason = NESTED_ARCHIVE
                if reason is None and info.flag_bits & 0x1:
                    reason = "encrypted archive entry"
                if reason is None and info.file_size > cfg.max_upload_bytes:
                    reason = f"entry too large: {info.file_size:,} bytes (limit {cfg.max_upload_bytes:,})"
                if reason is None and total + info.file_size > cfg.max_upload_bytes:
                    reason = f"archive content over the limit of {cfg.max_upload_bytes:,} bytes"
                if reason is not None:
                    yield _Candidate(name=name, path=zip_path, problem=reason)
                    continue
                total += info.file_size
                yield _extract(zf, info, cfg.tmp_dir, cfg.max_upload_bytes)

        return _Ingest(ctx, project_id, progress).run(candidates(), len(entries))


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, tmp_dir: Path, limit: int) -> _Candidate:
    """Stream one entry to a temporary file, never trusting the declared size."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="zip-")
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while chunk := src.read(_READ):
                written += len(chunk)
                if written > limit or written > info.file_size:
                    raise Rejected("entry is larger than declared (possible zip bomb)")
                out.write(chunk)
    except Rejected as exc:
        Path(tmp).unlink(missing_ok=True)
        return _Candidate(name=info.filename, path=Path(tmp), problem=str(exc))
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        Path(tmp).unlink(missing_ok=True)
        return _Candidate(name=info.filename, path=Path(tmp), problem=f"corrupt archive entry: {exc}")
    if zipfile.is_zipfile(tmp):    # an archive inside, whatever its name
        Path(tmp).unlink(missing_ok=True)
        return _Candidate(name=info.filename, path=Path(tmp), problem=NESTED_ARCHIVE)
    return _Candidate(name=info.filename, path=Path(tmp), temporary=True)


def _allowed(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def ingest_folder(ctx, project_id: int, folder: str | Path, progress: Progress | None = None) -> IngestReport:
    """Reference every image under a server folder (recursively), which must lie in allowed_roots."""
    cfg = ctx.config
    if not cfg.allowed_roots:
        raise UserError("ingesting server folders is disabled: set STEGO_ALLOWED_ROOTS "
                        "(or --allowed-root) to the folders people may import from")
    raw = str(folder).strip()
    if not raw:
        raise UserError("no folder given")
    real = Path(raw).expanduser().resolve()
    if not _allowed(real, cfg.allowed_roots):
        roots = ", ".join(str(r) for r in cfg.allowed_roots)
        raise UserError(f"{raw} is outside the folders that may be imported from ({roots})")
    if not real.is_dir():
        raise UserError(f"{raw} is not an existing folder")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in sorted(filenames))

    def candidates() -> Iterator[_Candidate]:
        for f in files:
            name = str(f.relative_to(real))
            target = f.resolve()
            if not _allowed(target, cfg.allowed_roots):
                yield _Candidate(name=name, path=f, problem="link to a file outside the allowed folders")
            elif not target.is_file():
                yield _Candidate(name=name, path=f, problem="not a regular file")
            else:
                yield _Candidate(name=name, path=target, reference=True)

    return _Ingest(ctx, project_id, progress).run(candidates(), len(files))


def list_images(ctx, project_id: int) -> list[ImageInfo]:
    with ctx.db.read() as s:
        if s.get(Project, project_id) is None:
            raise NotFound(f"project {project_id} does not exist")
        rows = s.scalars(select(Image).where(Image.project_id == project_id, Image.status != IMAGE_REMOVED)
                         .order_by(Image.id)).all()
        return [image_info(r) for r in rows]


def get_image(ctx, image_id: int) -> ImageInfo:
    with ctx.db.read() as s:
        row = s.get(Image, image_id)
        if row is None:
            raise NotFound(f"image {image_id} does not exist")
        return image_info(row)


def load_rgb(ctx, image_id: int) -> np.ndarray:
    """The image as HxWx3 uint8 after EXIF rotation."""
    info = get_image(ctx, image_id)
    if not info.path.is_file():
        raise UserError(f"the file of image {info.name} is missing: {info.path}")
    return load_rgb_path(info.path, ctx.config.max_image_pixels)
