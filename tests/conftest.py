

# --- synthetic token corpus (head/training/shifts/clustering/pipeline tests) ---------------
import pytest as _pytest_stego


def make_planted_corpus(n_items: int = 24, grid: tuple[int, int] = (8, 8), dim: int = 32,
                        n_classes: int = 3, noise: float = 0.2, seed: int = 0):
    """ArrayFeatures whose tokens come from ``n_classes`` planted prototypes.

    Each item shows two different classes (left/right halves). Returns
    (features, labels list of (h, w) arrays, knn (n, k) int64 from pooled cosine).
    """
    import numpy as np

    from core.tokens import ArrayFeatures, pooled_features

    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(n_classes, dim))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    h, w = grid
    maps, labels = [], []
    for i in range(n_items):
        a = i % n_classes
        b = (a + 1 + (i // n_classes) % (n_classes - 1)) % n_classes
        lab = np.full((h, w), a, dtype=np.int64)
        lab[:, w // 2:] = b
        tok = protos[lab] + noise * rng.normal(size=(h, w, dim)) + 0.5  # common offset like real features
        maps.append(tok.astype(np.float16))
        labels.append(lab)
    feats = ArrayFeatures(maps)
    pooled = pooled_features(feats)
    sims = pooled @ pooled.T
    np.fill_diagonal(sims, -np.inf)
    knn = np.argsort(-sims, axis=1)[:, : min(10, n_items - 1)].astype(np.int64)
    return feats, labels, knn


@_pytest_stego.fixture
def planted_corpus():
    """(features, labels, knn) of a small planted 3-class token corpus."""
    return make_planted_corpus()


# --- stego_app: configuration, context, image files ---------------------------------------------
@_pytest_stego.fixture
def app_config(tmp_path):
    """AppConfig in a temporary data dir: no worker, no demo, test_tiny backbone on CPU.

    `tmp_path / "server"` is an allowed root for server-folder ingest.
    """
    from stego_app.config import AppConfig

    (tmp_path / "server").mkdir(exist_ok=True)
    return AppConfig(data_dir=tmp_path / "data", worker=False, demo=False, backbone="test_tiny",
                     device="cpu", allowed_roots=[tmp_path / "server"])


@_pytest_stego.fixture
def app_ctx(app_config):
    """A migrated AppContext (no run worker) over app_config; closed afterwards."""
    from stego_app.context import create_context

    ctx = create_context(app_config)
    yield ctx
    ctx.close()


def write_scene_images(folder, n: int = 4, size: tuple[int, int] = (64, 48), seed: int = 0):
    """n small RGB PNGs of 'sky over grass with a red box' (distinct content, so distinct hashes).

    Returns the list of paths.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image as PILImage

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(n):
        img = np.zeros((h, w, 3), np.float32)
        horizon = h // 3 + int(rng.integers(-4, 5))
        img[:horizon] = (90, 150, 235)
        img[horizon:] = (60, 150, 50)
        x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(horizon, h - 10))
        img[y0:y0 + 10, x0:x0 + 16] = (200, 30, 30)
        img += rng.normal(0, 8, img.shape)
        path = folder / f"scene_{seed}_{i}.png"
        PILImage.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


# --- backbones / images / features fixtures (core: issue 3) --------------------------------

@_pytest_stego.fixture(scope="session")
def tiny_backbone():
    """The random-init ``test_tiny`` ViT (patch 8, 32-d) on CPU."""
    from core.backbones import create_backbone

    return create_backbone("test_tiny", device="cpu")


def write_test_images(folder, sizes=((48, 64), (64, 48), (40, 40), (48, 64), (56, 72)), seed: int = 0,
                      ext: str = "png"):
    """Write smooth random RGB images of the given (H, W) sizes; return their paths in order."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        small = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        path = folder / f"img{i:03d}.{ext}"
        img.save(path)
        paths.append(path)
    return paths


@_pytest_stego.fixture
def image_files(tmp_path):
    """Five small RGB images of mixed sizes on disk."""
    return write_test_images(tmp_path / "images")


# --- stego_app: a throwaway PostgreSQL server, where one is installed -----------------------------
@_pytest_stego.fixture(scope="session")
def postgres_server():
    """Base URL of a temporary PostgreSQL server on a unix socket; skips when PostgreSQL
    (initdb/pg_ctl) or the psycopg driver is not installed."""
    import os
    import shutil
    import subprocess
    import tempfile

    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _pytest_stego.skip("psycopg is not installed")
    if not initdb or not pg_ctl:
        _pytest_stego.skip("PostgreSQL is not installed")
    root = tempfile.mkdtemp(prefix="stego-pg-")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        prefix = ["su", "postgres", "-s", "/bin/sh", "-c"]

    def sh(cmd: str) -> subprocess.CompletedProcess:
        args = [*prefix, cmd] if prefix else ["/bin/sh", "-c", cmd]
        return subprocess.run(args, capture_output=True, text=True, timeout=120)

    db = f"{root}/db"
    init = sh(f"{initdb} -D {db} -A trust -U stego --no-sync")
    start = sh(f"{pg_ctl} -D {db} -o '-k {root} -c listen_addresses= -c fsync=off' -l {root}/log -w start") \
        if init.returncode == 0 else init
    if start.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        _pytest_stego.skip(f"could not start PostgreSQL: {start.stderr.strip()[:200]}")
    try:
        yield f"postgresql+psycopg://stego@/{{db}}?host={root}"
    finally:
        sh(f"{pg_ctl} -D {db} -m immediate stop")
        shutil.rmtree(root, ignore_errors=True)


@_pytest_stego.fixture
def postgres_url(postgres_server):
    """URL of a fresh, empty database on the temporary PostgreSQL server (dropped afterwards)."""
    import uuid

    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server.format(db="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres_server.format(db=name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def make_finished_run(root, n_images: int = 5, **params):
    """(ctx with a worker, RunInfo) of a real finished run (test_tiny, CRF on) on scene images in ``root``.

    The caller closes the context.
    """
    from core.settings import RunSettings
    from stego_app import ingest, projects, runs
    from stego_app.config import AppConfig
    from stego_app.context import create_context

    ctx = create_context(AppConfig(data_dir=root / "data", worker=True, demo=False, backbone="test_tiny",
                                   device="cpu", pipeline_jobs=1))
    project = projects.create_project(ctx, "scenes")
    ingest.ingest_files(ctx, project.id, write_scene_images(root / "imgs", n=n_images, size=(64, 48)))
    settings = {**dict(backbone="test_tiny", resolution=48, n_clusters=4, batch_size=4, code_dim=8, steps=10,
                       crf=True), **params}
    run = runs.wait_for_run(ctx, runs.start_run(ctx, project.id, RunSettings(**settings)).id, timeout=300)
    assert run.status == "done", run.error
    return ctx, run
