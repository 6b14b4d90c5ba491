"""SQLAlchemy 2.0 typed ORM models.

Feature arrays, model weights and per-pixel segment maps stay on disk (the run
directory, the feature cache); the database references them by path. Every schema
change gets one Alembic revision in migrations/versions/.

Relations::

    Project 1-n Image                       (unique per project by sha256)
    Project 1-n Run 1-n RunImage n-1 Image  (RunImage.position = index i of segments/{i:06d}.png)
    Run 1-n Cluster n-1 Label               (Cluster.label_id NULL = unnamed; ignored = void)
    Run 1-n Label                           (labels are per run; name unique per run)
    Run 1-n SeedAnnotation n-1 Image, n-1 Label
    Run 1-n Correction n-1 Image, n-1 Label  (masks a person corrected in another tool, imported)
    Run 1-n Export
"""
from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData,
                        String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware current time (stored as UTC)."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class RunStatus(enum.StrEnum):
    """Run.status values (str-valued: the database stores and returns the plain words)."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    DONE = "done"


# short names of the statuses, used throughout the services
RUN_QUEUED = RunStatus.QUEUED
RUN_RUNNING = RunStatus.RUNNING
RUN_CANCELLED = RunStatus.CANCELLED
RUN_FAILED = RunStatus.FAILED
RUN_INTERRUPTED = RunStatus.INTERRUPTED
RUN_DONE = RunStatus.DONE
RUN_ACTIVE = (RUN_QUEUED, RUN_RUNNING)
RUN_RESUMABLE = (RUN_CANCELLED, RUN_FAILED, RUN_INTERRUPTED)
RUN_CANCELLABLE = (RUN_QUEUED, RUN_RUNNING, RUN_INTERRUPTED)

# Image.status values
IMAGE_OK = "ok"
IMAGE_ERROR = "error"
IMAGE_REMOVED = "removed"     # taken out of the project; kept only for the runs that used it


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    is_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    images: Mapped[list["Image"]] = relationship(back_populates="project",
                                                 cascade="all, delete-orphan")
    runs: Mapped[list["Run"]] = relationship(back_populates="project",
                                             cascade="all, delete-orphan")


class Image(Base):
    """One distinct image of a project (by content hash of the file bytes).

    `path` is absolute. `stored` is True when the app owns a copy under
    data_dir/images/<project_id>/<sha256>.<ext> (uploads, zips, demo), False when it
    references a file in a configured server folder. width/height are after EXIF
    rotation; mode/format describe the original file.
    """

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("project_id", "sha256", name="uq_images_project_sha256"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(1000))          # original file name / zip entry
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    stored: Mapped[bool] = mapped_column(Boolean, default=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))            # PIL mode of the file, e.g. "I;16", "P"
    format: Mapped[str] = mapped_column(String(16))          # PIL format, e.g. "PNG"
    file_size: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=IMAGE_OK)   # ok | error | removed
    error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    project: Mapped[Project] = relationship(back_populates="images")


class Run(Base):
    """A pipeline run over a fixed, ordered list of images (RunImage).

    `params` holds every hyper-parameter (core.settings.RunSettings as a dict); `backbone` and
    `weights_source` are filled when the worker resolves them. Progress columns are
    written by the worker at most every ~0.5 s so any process can read them.
    `mapping_version` increases with every cluster/label edit.
    """

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=RUN_QUEUED, index=True)
    backbone: Mapped[Optional[str]] = mapped_column(String(64))
    weights_source: Mapped[Optional[str]] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    run_dir: Mapped[str] = mapped_column(Text, default="")
    stage: Mapped[Optional[str]] = mapped_column(String(32))
    stage_progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    history: Mapped[list[Any]] = mapped_column(JSON, default=list)      # loss points [{step, loss, ...}]
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # seconds per stage
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # result.json extras
    error: Mapped[Optional[str]] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    owner: Mapped[Optional[str]] = mapped_column(String(200))          # "host:pid:token" of the worker
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    mapping_version: Mapped[int] = mapped_column(Integer, default=0)
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    project: Mapped[Project] = relationship(back_populates="runs")
    images: Mapped[list["RunImage"]] = relationship(back_populates="run", order_by="RunImage.position",
                                                    cascade="all, delete-orphan")
    clusters: Mapped[list["Cluster"]] = relationship(back_populates="run", order_by="Cluster.index",
                                                     cascade="all, delete-orphan")
    labels: Mapped[list["Label"]] = relationship(back_populates="run", cascade="all, delete-orphan")
    exports: Mapped[list["Export"]] = relationship(back_populates="run", cascade="all, delete-orphan")


class RunImage(Base):
    """Image `image_id` is item `position` of the run (segments/{position:06d}.png).

    `confirmed` records that a person checked this image's segmentation in this run.
    """

    __tablename__ = "run_images"
    __table_args__ = (UniqueConstraint("run_id", "image_id", name="uq_run_images_run_image"),)

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    confirmed_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    run: Mapped[Run] = relationship(back_populates="images")
    image: Mapped[Image] = relationship()


class Label(Base):
    """A class name chosen by a person within one run; colour is '#rrggbb', unique per run.

    `isthing`: True = countable objects (exported as instances), False = stuff (one region
    per image), NULL = not chosen: guessed from the name (stego_app.label_kinds).
    """

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_labels_run_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    colour: Mapped[str] = mapped_column(String(7))
    isthing: Mapped[Optional[bool]] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    run: Mapped[Run] = relationship(back_populates="labels")
    clusters: Mapped[list["Cluster"]] = relationship(back_populates="label")


class Cluster(Base):
    """A discovered cluster of a run and where it is mapped.

    Mapping: label_id set = named (several clusters with one label = merged);
    label_id NULL and not ignored = unnamed; ignored = void (label_id NULL).
    `centroid_ref` points into the run directory, e.g. "centroids.npy#3".
    `examples` are image ids, most confident first. `colour` is the colour the
    cluster shows while unnamed.
    """

    __tablename__ = "clusters"
    __table_args__ = (UniqueConstraint("run_id", "index", name="uq_clusters_run_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    pixels: Mapped[int] = mapped_column(BigInteger, default=0)   # over all images of the run
    share: Mapped[float] = mapped_column(Float, default=0.0)
    centroid_ref: Mapped[str] = mapped_column(Text, default="")
    examples: Mapped[list[Any]] = mapped_column(JSON, default=list)
    colour: Mapped[str] = mapped_column(String(7))
    label_id: Mapped[Optional[int]] = mapped_column(ForeignKey("labels.id", ondelete="SET NULL"), index=True)
    ignored: Mapped[bool] = mapped_column(Boolean, default=False)

    run: Mapped[Run] = relationship(back_populates="clusters")
    label: Mapped[Optional[Label]] = relationship(back_populates="clusters")


class _LabelMask:
    """Columns of one label's mask in one image of a run (COCO RLE and its pixel count)."""

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), index=True)
    rle: Mapped[dict[str, Any]] = mapped_column(JSON)
    area: Mapped[int] = mapped_column(Integer)

    @declared_attr
    def label(cls) -> Mapped[Label]:
        return relationship()


class SeedAnnotation(_LabelMask, Base):
    """The mask of one label in one image, derived from a run's segments and its mapping.

    `rle` is a COCO RLE {"size": [h, w], "counts": str} (pycocotools, compressed);
    `bbox` is [x, y, w, h]. `crf` tells which segment maps it came from and
    `mapping_version` which mapping; rows are refreshed when either is out of date
    (stego_app.labels.seed_annotations). `confirmed` mirrors RunImage.confirmed.
    """

    __tablename__ = "seed_annotations"
    __table_args__ = (
        UniqueConstraint("run_id", "image_id", "label_id", name="uq_seed_annotations_run_image_label"),
        Index("ix_seed_annotations_run_image", "run_id", "image_id"),
    )

    bbox: Mapped[list[Any]] = mapped_column(JSON)
    crf: Mapped[bool] = mapped_column(Boolean, default=False)
    mapping_version: Mapped[int] = mapped_column(Integer, default=0)
    confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    image: Mapped[Image] = relationship()


class Correction(_LabelMask, Base):
    """The mask of one label in one image as a person corrected it in an annotation tool and
    imported it back (stego_app.corrections): the truth for that image, which refinement uses as
    seeds and writes into the refined map. `rle` is a COCO RLE {"size": [h, w], "counts": str};
    `source` the name of the file it came from. Kept when the image is unchecked (then unused).
    """

    __tablename__ = "corrections"
    __table_args__ = (
        UniqueConstraint("run_id", "image_id", "label_id", name="uq_corrections_run_image_label"),
        Index("ix_corrections_run_image", "run_id", "image_id"),
    )

    source: Mapped[str] = mapped_column(String(1000), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Export(Base):
    """One COCO export of a run (written by stego_app.export).

    status: "running" | "done" | "failed". `path` is the zip file, `directory` the
    unpacked export folder; `options` is ExportOptions as a dict. `owner` ("host:pid")
    is the process writing it: an export left 'running' by a process that is gone
    becomes 'failed' at the next start (stego_app.export.mark_abandoned_exports).
    """

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    directory: Mapped[Optional[str]] = mapped_column(Text)
    path: Mapped[Optional[str]] = mapped_column(Text)
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    n_annotations: Mapped[int] = mapped_column(Integer, default=0)
    n_categories: Mapped[int] = mapped_column(Integer, default=0)
    mapping_version: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[Optional[str]] = mapped_column(Text)
    owner: Mapped[Optional[str]] = mapped_column(String(200))          # "host:pid" of the writer
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    run: Mapped[Run] = relationship(back_populates="exports")


class Refinement(Base):
    """One propagation ("refine with names") job of a finished run (stego_app.refinement).

    status: queued | running | done | failed | cancelled | interrupted (the Run statuses).
    `mapping_version` is the run's naming the job was started with; the refined maps it
    writes (run_dir/segments_refined/) carry that version, so the app can say when the names changed
    since. `params` holds the propagation settings, `metrics` what the job reported.
    """

    __tablename__ = "refinements"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=RUN_QUEUED, index=True)
    stage: Mapped[Optional[str]] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    mapping_version: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[Optional[str]] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    owner: Mapped[Optional[str]] = mapped_column(String(200))          # "host:pid:token" of the worker
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
