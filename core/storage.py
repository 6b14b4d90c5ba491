"""A folder that every worker of a cluster can reach: a local/shared path or an fsspec URL.

``Location("/mnt/shared/stego")``, ``Location("s3://bucket/stego")`` (needs ``s3fs``),
``Location("memory://x")`` (tests, one process only). Objects are whole files written at
once: ``write_bytes`` is atomic (temporary name + rename on file systems, one PUT on
object stores), so a reader never sees half an object and an interrupted writer leaves
nothing that looks finished. Names ending in ``.tmp`` are never listed.
"""
from __future__ import annotations

import io
import os
import posixpath
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_bytes

__all__ = ["Location", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


class Location:
    """A root folder on some fsspec file system, with the few verbs the engines need."""

    def __init__(self, url: str | os.PathLike):
        import fsspec

        text = os.fspath(url)
        if "://" not in text:
            text = str(Path(text).expanduser().resolve())
        self.url = text.rstrip("/") or "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        """True when the root is a path of this machine's file system."""
        return "file" in _protocols(self.fs)

    def __truediv__(self, name: str) -> "Location":
        return Location(self._join_url(name))

    def _join_url(self, name: str) -> str:
        return self.url + "/" + name.strip("/")

    def path(self, name: str) -> str:
        """The file system's path of ``name`` under the root."""
        return posixpath.join(self.root, name)

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        self._forget_listings()
        return bool(self.fs.exists(self.path(name)))

    def list(self, suffix: str = "") -> list[str]:
        """Names (not paths) of the finished objects directly under the root, sorted."""
        self._forget_listings()
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = [posixpath.basename(str(e).rstrip("/")) for e in entries]
        return sorted(n for n in names if n.endswith(suffix) and not n.endswith(TMP_SUFFIX)
                      and not n.startswith("."))

    def _forget_listings(self) -> None:
        """Object-store file systems (s3fs) cache listings: other workers' new objects would not show."""
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(self.root)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.path(name), "rb") as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write the object ``name`` atomically (parents created)."""
        target = self.path(name)
        parent = posixpath.dirname(target)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            atomic_write_bytes(target, data)
        else:  # object stores: a single PUT is atomic; in-memory and others: written in one call
            self.fs.pipe_file(target, data)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    # arrays: one .npz object per name
    def save_arrays(self, name: str, **arrays: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.write_bytes(name, buf.getvalue())

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self.read_bytes(name)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def __repr__(self) -> str:
        return f"Location({self.url!r})"


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
