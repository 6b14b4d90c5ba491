"""Application configuration: environment variables (STEGO_*) first, then CLI flags."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from core.constants import PRECISIONS
from stego_app.errors import UserError

ENV_PREFIX = "STEGO_"


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """'user:password' -> ('user', 'password'); None/'' -> None."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("authentication must be given as user:password")
    return user, password


def _parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off", ""}:
        return False
    raise UserError(f"not a yes/no value: {value!r}")


@dataclass
class AppConfig:
    """Everything the app needs to know about its environment.

    Paths are stored as given; `resolved()` returns a copy with absolute paths and
    the defaults filled in (database URL, cache dir).
    """

    data_dir: Path = Path("data")
    database_url: str | None = None          # default sqlite:///<data_dir>/stego.db
    cache_dir: Path | None = None            # default <data_dir>/cache
    allowed_roots: list[Path] = field(default_factory=list)
    backbone: str | None = None              # None = best available
    weights: str | None = None               # explicit checkpoint file
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    max_image_pixels: int = 80_000_000
    max_upload_bytes: int = 2_000_000_000
    demo: bool = True
    worker: bool = True                      # start the background run worker
    pipeline_jobs: int = 2                   # processes for the segments/CRF stages (1 = in-process)
    precision: str = "auto"                  # backbone compute precision (core.constants.PRECISIONS)
    ray_address: str | None = None           # STEGO_RAY_ADDRESS / --ray: Ray engine ("auto" = local cluster)
    ray_staging: str | None = None           # STEGO_RAY_STAGING / --ray-staging: where workers put shards

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "AppConfig":
        """Read STEGO_* variables; keyword overrides (CLI flags) win when not None."""
        env = os.environ if environ is None else environ
        cfg = cls()

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value if value not in (None, "") else None

        if (v := get("DATA_DIR")) is not None:
            cfg.data_dir = Path(v)
        cfg.database_url = get("DATABASE_URL")
        if (v := get("CACHE_DIR")) is not None:
            cfg.cache_dir = Path(v)
        if (v := get("ALLOWED_ROOTS")) is not None:
            cfg.allowed_roots = [Path(p) for p in v.split(os.pathsep) if p]
        cfg.backbone = get("BACKBONE")
        cfg.weights = get("WEIGHTS")
        if (v := get("DEVICE")) is not None:
            cfg.device = v
        if (v := get("PRECISION")) is not None:
            if v not in PRECISIONS:
                raise UserError(f"STEGO_PRECISION must be one of {', '.join(PRECISIONS)}, got {v!r}")
            cfg.precision = v
        if (v := get("HOST")) is not None:
            cfg.host = v
        try:
            if (v := get("PORT")) is not None:
                cfg.port = int(v)
            if (v := get("MAX_IMAGE_PIXELS")) is not None:
                cfg.max_image_pixels = int(v)
            if (v := get("MAX_UPLOAD_BYTES")) is not None:
                cfg.max_upload_bytes = int(v)
            if (v := get("PIPELINE_JOBS")) is not None:
                cfg.pipeline_jobs = int(v)
        except ValueError as exc:
            raise UserError(f"bad number in a STEGO_* variable: {exc}") from None
        cfg.auth = parse_auth(get("AUTH"))
        cfg.ray_address = get("RAY_ADDRESS")
        cfg.ray_staging = get("RAY_STAGING")
        if (v := get("DEMO")) is not None:
            cfg.demo = _parse_bool(v)
        return cfg.with_overrides(**overrides)

    def with_overrides(self, **overrides) -> "AppConfig":
        """Copy with every non-None override applied (unknown names are an error)."""
        known = {k: v for k, v in overrides.items() if v is not None}
        for key in ("data_dir", "cache_dir"):
            if key in known:
                known[key] = Path(known[key])
        if "allowed_roots" in known:
            known["allowed_roots"] = [Path(p) for p in known["allowed_roots"]]
        return replace(self, **known)

    def resolved(self) -> "AppConfig":
        """Copy with absolute paths and defaults filled in."""
        data_dir = Path(self.data_dir).expanduser().resolve()
        cache_dir = (Path(self.cache_dir).expanduser().resolve() if self.cache_dir
                     else data_dir / "cache")
        url = self.database_url or f"sqlite:///{data_dir / 'stego.db'}"
        roots = [Path(p).expanduser().resolve() for p in self.allowed_roots]
        if self.ray_staging is not None:      # refused before any run is made, not when one starts
            from core.distributed import RayConfig

            try:
                RayConfig(staging=self.ray_staging)
            except ValueError as exc:
                raise UserError(f"--ray-staging / STEGO_RAY_STAGING: {exc}") from None
        return replace(self, data_dir=data_dir, cache_dir=cache_dir, database_url=url,
                       allowed_roots=roots)

    # Locations under data_dir (call on a resolved config).
    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def downloads_dir(self) -> Path:        # random-named links to exports (stego_app.downloads)
        return self.data_dir / "downloads"

    @property
    def thumbs_dir(self) -> Path:
        return self.data_dir / "thumbs"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def feature_cache_dir(self) -> Path:
        return (self.cache_dir or self.data_dir / "cache") / "features"
