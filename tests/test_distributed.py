"""The Ray engine (core.distributed) on a local cluster on 127.0.0.1 that the tests start and stop,
the storage locations it writes through, and flat-memory token sampling."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from core.clustering import sample_tokens
from core.errors import Cancelled
from core.features import FeatureConfig, FeatureStore, extract_features
from core.pipeline import StegoPipeline
from core.rundir import RunDir
from core.storage import Location
from core.tokens import ArrayFeatures
from tests.test_pipeline import _config, _write_images

ray = pytest.importorskip("ray", reason="ray is installed by requirements-ray.txt")

from core.distributed import RayConfig, RayEngine, address_from_env, engine_for  # noqa: E402

HEAD_PORT = 6380   # this project's Ray ports: 6380-6389
S3_PORT = 6387     # the S3 stand-in (moto's server)
S3_BUCKET = "stego-shards"


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server on 127.0.0.1 (moto, from requirements-test.txt) with one bucket, and the standard
    AWS variables pointing at it, set before the Ray cluster starts so that its workers see them
    as a real cluster's nodes would see their own credentials. None when moto is not installed."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{S3_PORT}"
    env = {"AWS_ENDPOINT_URL_S3": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=S3_BUCKET)
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """`ray start --head --block` on 127.0.0.1:6380 (2 CPUs), stopped by killing its process group."""
    temp = tempfile.mkdtemp(prefix="ray15_", dir="/tmp")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(HEAD_PORT), "--num-cpus", "2", "--num-gpus", "0",
           "--object-store-memory", str(200 << 20), "--include-dashboard", "false", "--temp-dir", temp,
           "--node-manager-port", "6381", "--object-manager-port", "6382", "--metrics-export-port", "6383",
           "--dashboard-agent-grpc-port", "6384", "--dashboard-agent-listen-port", "6385",
           "--runtime-env-agent-port", "6386"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
    address = f"127.0.0.1:{HEAD_PORT}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start failed: {proc.stderr.read().decode()[-2000:]}")
            probe = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", address],
                                   capture_output=True, text=True, env=env)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up: {probe.stderr[-2000:]}")
            time.sleep(1.0)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def engine(ray_cluster):
    eng = RayEngine(RayConfig(address=ray_cluster, shard_items=2, map_batch=2))
    eng.start()
    yield eng
    eng.close()




def test_a_run_through_ray_gives_the_same_clusters_as_one_process(tmp_path, engine):
    paths = _write_images(tmp_path / "imgs", n=8)
    local = StegoPipeline(_config(n_jobs=1), tmp_path / "run_local", tmp_path / "cache_local").fit(paths)
    remote = StegoPipeline(_config(n_jobs=1), tmp_path / "run_ray", tmp_path / "cache_ray", engine=engine).fit(paths)
    assert engine.n_workers() == 2
    stats = engine.last_stats["features"]
    assert stats["workers"] == 2 and stats["shards"] >= 2 and stats["devices"] == ["cpu"]
    # the same feature store (key, layout and values), extracted by the workers
    a_root = Path(json.loads((tmp_path / "run_local" / "state.json").read_text())["stores"]["infer"])
    b_root = Path(json.loads((tmp_path / "run_ray" / "state.json").read_text())["stores"]["infer"])
    assert a_root.name == b_root.name and b_root.is_relative_to(tmp_path / "cache_ray")
    fa, fb = FeatureStore.open(a_root), FeatureStore.open(b_root)
    assert fb.complete and not (b_root / "shards").exists() or not list((b_root / "shards").iterdir())
    for i in range(len(fa)):
        np.testing.assert_array_equal(fa.tokens(i), fb.tokens(i))
    np.testing.assert_array_equal(fa.pooled(), fb.pooled())
    # same seed -> same head, centroids, segment maps (plain and CRF) and cluster summary
    np.testing.assert_allclose(np.load(tmp_path / "run_local" / "centroids.npy"),
                               np.load(tmp_path / "run_ray" / "centroids.npy"), atol=1e-6)
    for i in range(len(paths)):
        for sub in ("segments", "segments_crf"):
            kind = "crf" if sub == "segments_crf" else "plain"
            assert np.array_equal(RunDir(tmp_path / "run_local").read_segments(i, kind),
                                  RunDir(tmp_path / "run_ray").read_segments(i, kind)), (sub, i)
    assert (json.loads((tmp_path / "run_local" / "clusters.json").read_text())
            == json.loads((tmp_path / "run_ray" / "clusters.json").read_text()))
    assert local.n_images == remote.n_images == 8


@pytest.mark.parametrize("staging", ["store", "s3"])
def test_ray_feature_extraction_resumes_per_shard(tmp_path, engine, s3_endpoint, staging):
    """A cancelled extraction resumes per shard, from the shards staged in the store's folder or in
    an S3 bucket (moto's server here): the same tokens as one process, the staging area emptied."""
    if staging == "s3":
        if s3_endpoint is None:
            pytest.skip("moto is installed by requirements-test.txt")
        pytest.importorskip("s3fs", reason="s3fs is installed by requirements-ray.txt")
        engine.release_workers()           # the cluster has 2 CPUs: one engine's actors at a time
        eng = RayEngine(RayConfig(address=engine.config.address, shard_items=2, staging=f"s3://{S3_BUCKET}/run"))
    else:
        eng = engine
    paths = _write_images(tmp_path / "imgs", n=10, seed=3)
    cfg = FeatureConfig(backbone="test_tiny", resolution=32, batch_size=2)
    seen = []

    def cancel() -> bool:
        return bool(seen) and seen[-1] > 0

    with pytest.raises(Cancelled):
        eng.extract_features(paths, cfg, tmp_path / "cache", device="cpu",
                             progress=lambda d, t: seen.append(d), cancel=cancel)
    root = next((tmp_path / "cache").iterdir())
    partial = FeatureStore.open(root)
    done_before = int(partial._done.sum())
    assert 0 < done_before < len(partial)
    time.sleep(2.0)          # shards still running when the driver stopped land in the staging area
    store = eng.extract_features(paths, cfg, tmp_path / "cache", device="cpu")
    stats = eng.last_stats["features"]
    assert store.complete and store.root == root
    # only what was missing was computed again (leftover shards ingested, finished items kept)
    assert stats["shards"] * 2 <= len(store) - done_before
    from core.backbones import create_backbone

    ref = extract_features(paths, create_backbone("test_tiny", device="cpu"), cfg, tmp_path / "cache_ref")
    assert ref.root.name == root.name
    for i in range(len(ref)):
        np.testing.assert_array_equal(ref.tokens(i), store.tokens(i))
    if staging == "s3":
        assert Location(f"s3://{S3_BUCKET}/run/{root.name}").list() == []      # ingested, then removed
        eng.release_workers()


def test_shards_can_be_staged_in_an_fsspec_url(tmp_path, engine):
    paths = _write_images(tmp_path / "imgs", n=4, seed=7)
    cfg = FeatureConfig(backbone="test_tiny", resolution=32, batch_size=2)
    staging = f"file://{tmp_path / 'bucket'}"
    engine.release_workers()               # the cluster has 2 CPUs: one engine's actors at a time
    eng = RayEngine(RayConfig(address=engine.config.address, shard_items=2, staging=staging))
    store = eng.extract_features(paths, cfg, tmp_path / "cache", device="cpu")
    assert store.complete and eng.last_stats["features"]["shards"] == 2
    assert Location(staging + "/" + store.root.name).list() == []      # ingested, then removed
    eng.release_workers()


def test_a_staging_url_that_cannot_be_used_is_refused_up_front():
    with pytest.raises(ValueError, match="cannot be used: Protocol not known"):
        RayConfig(staging="nosuch://bucket/x")
    from stego_app.config import AppConfig

    assert AppConfig.from_env({"STEGO_RAY_STAGING": "s3://b/stego"}).ray_staging == "s3://b/stego"
    assert AppConfig.from_env({}, ray_staging="/mnt/shared").ray_staging == "/mnt/shared"
    from stego_app.errors import UserError

    with pytest.raises(UserError, match="STEGO_RAY_STAGING: the shard staging location 'nosuch://b' cannot be used"):
        AppConfig.from_env({"STEGO_RAY_STAGING": "nosuch://b"}).resolved()


def test_without_an_address_there_is_no_engine(monkeypatch):
    monkeypatch.delenv("STEGO_RAY_ADDRESS", raising=False)
    assert engine_for(None) is None and address_from_env() is None
    assert address_from_env({"STEGO_RAY_ADDRESS": " auto "}) == "auto"
    with pytest.raises(ValueError, match="address"):
        RayConfig(address="")
    with pytest.raises(ValueError, match=">= 1"):
        RayConfig(shard_items=0)


def test_the_app_takes_the_address_from_a_flag_or_the_environment():
    from stego_app.config import AppConfig

    assert AppConfig.from_env({}).ray_address is None
    assert AppConfig.from_env({"STEGO_RAY_ADDRESS": "10.0.0.5:6379"}).ray_address == "10.0.0.5:6379"
    assert AppConfig.from_env({"STEGO_RAY_ADDRESS": "x:1"}, ray_address="auto").ray_address == "auto"


# ------------------------------------------------------------------------ storage and sampling

@pytest.mark.parametrize("kind", ["path", "file", "memory"])
def test_locations_write_whole_objects(tmp_path, kind):
    url = {"path": str(tmp_path / "loc"), "file": f"file://{tmp_path / 'loc'}", "memory": "memory://s15test"}[kind]
    loc = Location(url)
    loc.makedirs()
    loc.save_arrays("b.npz", x=np.arange(5))
    loc.write_bytes("a.bin", b"hello")
    if loc.is_local:
        Path(loc.path("c.npz.tmp")).write_bytes(b"half")   # an interrupted writer's leftover
    assert loc.list() == ["a.bin", "b.npz"] and loc.list(".npz") == ["b.npz"]
    assert loc.read_bytes("a.bin") == b"hello" and loc.exists("a.bin")
    np.testing.assert_array_equal(loc.load_arrays("b.npz")["x"], np.arange(5))
    loc.remove("a.bin")
    loc.remove("a.bin")                                    # removing twice is fine
    assert loc.list() == ["b.npz"]
    assert (loc / "sub").url.endswith("/sub")
    if kind == "memory":
        loc.remove("b.npz")


def test_sampling_tokens_stays_bounded_when_items_outnumber_the_budget():
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(2, 2, 3)).astype(np.float16) for _ in range(600)]
    feats = ArrayFeatures(maps)
    got = sample_tokens(feats, max_tokens=100, seed=0)
    assert got.shape == (100, 3)                           # not one row per item (600)
    all_rows = np.concatenate([m.reshape(-1, 3) for m in maps]).astype(np.float32)
    assert len({r.tobytes() for r in got}) == 100          # distinct positions
    assert all(any(np.array_equal(r, a) for a in all_rows[:]) for r in got[:5])
    coded = sample_tokens(feats, max_tokens=100, seed=0, transform=lambda x: x[:, :1] * 2)
    np.testing.assert_array_equal(coded, got[:, :1] * 2)
    np.testing.assert_array_equal(sample_tokens(feats, 100, seed=0), got)   # deterministic
