"""Ray as an optional engine for the per-image stages (feature extraction, segments + CRF).

Training and clustering stay on the driver (the process that runs ``StegoPipeline.fit``);
the two stages whose cost grows with the corpus fan out over a Ray cluster:

* **features**: one actor per worker holds the backbone (one GPU each where the cluster has
  GPUs, else ``cpus_per_worker`` CPUs and as many torch threads). The driver plans the store
  exactly as ``core.features.extract_features`` does (same cache key, same layout, same
  batches of equal-size items) and hands out *shards* of whole batches. A worker writes each
  finished shard as one object into a staging ``core.storage.Location`` that every node
  reaches (default: ``<store>/shards`` on the driver's file system, which suits one machine or
  a shared mount; ``RayConfig.staging`` may be any fsspec URL such as ``s3://bucket/stego``).
  The driver moves each shard into the store (pwrite, fsync, per-item ``done.u8`` flags) and
  deletes the object. An interrupted run resumes per shard: items marked done are kept, shard
  objects finished after the driver stopped are ingested first, and only the rest is
  recomputed.
* **segments / CRF**: ``ordered_map`` runs ``core.crf.cluster_map`` jobs (codes computed on the
  driver, the image read by the worker) as Ray tasks in batches, results in order, at most
  two batches per worker in flight; the driver writes the segment maps into the run
  directory and keeps its per-image resume bookkeeping unchanged.

Workers must import this project (same code and virtualenv on every node; a local cluster
gets it through ``PYTHONPATH``) and must reach the image files and the backbone weights
(same paths, or ``--weights``/``STEGO_WEIGHTS`` on a shared mount).

``ray`` is an install extra (``pip install -r requirements-ray.txt``); without it, and
without an address, nothing here is imported and the pipeline runs as before.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from core.errors import Cancelled
from core.atomic import atomic_write_json
from core.features import (FeatureConfig, FeatureStore, _batches, _locked, _open_or_create, _scan,
                           _Writer, cache_key, META, BOXES)
from core.storage import Location

log = logging.getLogger(__name__)

__all__ = ["RayConfig", "RayEngine", "ENV_ADDRESS", "LOCAL_ADDRESSES", "engine_for", "close_engines",
           "address_from_env"]

ENV_ADDRESS = "STEGO_RAY_ADDRESS"
LOCAL_ADDRESSES = ("auto", "local")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARD_SUFFIX = ".npz"
WORKER_START_TIMEOUT_S = 600


def address_from_env(environ: dict | None = None) -> str | None:
    """``$STEGO_RAY_ADDRESS`` or None when unset/empty."""
    value = (os.environ if environ is None else environ).get(ENV_ADDRESS, "").strip()
    return value or None


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("a Ray address was given but Ray is not installed: "
                          "pip install -r requirements-ray.txt (or drop --ray / STEGO_RAY_ADDRESS)") from exc
    return ray


@dataclass(frozen=True)
class RayConfig:
    """How the pipeline uses a Ray cluster.

    ``address``: "auto" (or "local") starts a private local cluster that lives as long as the
    engine; anything else ("host:6379", "ray://host:10001") connects to a running cluster.
    """

    address: str = "auto"
    num_workers: int | None = None          # None: one per GPU if the cluster has GPUs, else CPUs // cpus_per_worker
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None    # None: 1 where the cluster has GPUs, else 0
    shard_items: int = 64                   # feature items per task (whole batches)
    map_batch: int = 4                      # segment/CRF jobs per task
    staging: str | None = None              # path or fsspec URL for finished feature shards; None = <store>/shards
    num_cpus: int | None = None             # local clusters only: CPUs the cluster offers (None = all)
    object_store_mb: int | None = None      # local clusters only: object store size
    init_kwargs: dict[str, Any] = field(default_factory=dict)   # passed to ray.init as is

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("the Ray address is empty: use 'auto' for a local cluster or host:port")
        if self.cpus_per_worker < 1 or self.shard_items < 1 or self.map_batch < 1:
            raise ValueError("cpus_per_worker, shard_items and map_batch must be >= 1")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.staging is not None:
            try:                     # an unknown protocol or a missing client (s3fs) is said now
                Location(self.staging)
            except (ImportError, ValueError) as exc:
                raise ValueError(f"the shard staging location {self.staging!r} cannot be used: {exc}") from None


# ---------------------------------------------------------------------------- worker side

class FeatureWorker:
    """Ray actor body: one backbone, extracting shards of a planned store into the staging area."""

    def __init__(self, backbone: str, checkpoint: str | None, device: str, cache_dir: str | None, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        from core.backbones import create_backbone

        ray = _ray()
        if device == "auto" and not ray.get_gpu_ids():
            device = "cpu"                                   # no GPU given to this actor
        self.backbone = create_backbone(backbone, checkpoint=checkpoint, device=device,
                                        cache_dir=Path(cache_dir) if cache_dir else None)
        self._context: tuple[str, tuple] | None = None

    def describe(self, precision: str) -> dict:
        from core.precision import resolve_precision

        b = self.backbone
        return {"name": b.spec.name, "weights_id": b.weights_id, "weights_source": b.weights_source,
                "embed_dim": int(b.embed_dim), "patch_size": int(b.patch_size), "device": str(b.device),
                "precision": resolve_precision(precision, b.device), "host": os.uname().nodename}

    def extract(self, key: str, context: list, batches: list[np.ndarray], config: dict, precision: str,
                staging: str, name: str) -> dict:
        import torch

        from core.features import _Loader, encode_batch
        from core.precision import autocast

        ray = _ray()
        if self._context is None or self._context[0] != key:
            self._context = (key, ray.get(context[0]))       # (paths, index, boxes, sizes), once per store
        paths, index, boxes, sizes = self._context[1]
        cfg = FeatureConfig(**config)
        t0 = time.perf_counter()
        arrays: dict[str, np.ndarray] = {}
        loader = _Loader([Path(p) for p in paths], index, boxes, sizes, batches, self.backbone, cfg)
        try:
            with torch.inference_mode(), autocast(self.backbone.device, precision):
                for b, (items, x) in enumerate(loader):
                    main, flipped, pooled = encode_batch(self.backbone, x, cfg.flip, precision)
                    arrays[f"items_{b}"], arrays[f"tokens_{b}"], arrays[f"pooled_{b}"] = items, main, pooled
                    if flipped is not None:
                        arrays[f"flip_{b}"] = flipped
        finally:
            loader.close()
        Location(staging).save_arrays(name, **arrays)
        n = int(sum(len(b) for b in batches))
        return {"name": name, "items": n, "seconds": time.perf_counter() - t0}


def _run_batch(fn: Callable, items: list) -> list:
    """Ray task body: ``[fn(x) for x in items]``."""
    return [fn(x) for x in items]


# ---------------------------------------------------------------------------- driver side

class RayEngine:
    """The Ray engine the pipeline hands its per-image stages to (see the module docstring)."""

    def __init__(self, config: RayConfig | None = None, **overrides):
        self.config = config if config is not None else RayConfig(**overrides)
        if config is not None and overrides:
            from dataclasses import replace

            self.config = replace(config, **overrides)
        self._owns_ray = False
        self._started = False
        self._actors: list = []
        self._actor_key: tuple | None = None
        self._batch_task = None
        self.last_stats: dict[str, Any] = {}

    # -- lifetime
    def start(self) -> "RayEngine":
        if self._started:
            return self
        ray = _ray()
        cfg = self.config
        if not ray.is_initialized():
            env = {"PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", ""))
                                                 if p)}
            kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False,
                                      "include_dashboard": False}
            if cfg.address in LOCAL_ADDRESSES:
                kwargs["address"] = "local"
                if cfg.num_cpus is not None:
                    kwargs["num_cpus"] = cfg.num_cpus
                if cfg.object_store_mb is not None:
                    kwargs["object_store_memory"] = int(cfg.object_store_mb) << 20
            else:
                kwargs["address"] = cfg.address
                kwargs.pop("include_dashboard")
            kwargs.update(cfg.init_kwargs)
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise ConnectionError(f"cannot reach the Ray cluster at {cfg.address!r} ({exc}); start it with "
                                      "`ray start --head` or use --ray auto for a local one") from None
            self._owns_ray = True
        self._started = True
        res = ray.cluster_resources()
        log.info("Ray engine: %s, cluster CPUs %s, GPUs %s", cfg.address, res.get("CPU", 0), res.get("GPU", 0))
        return self

    def close(self) -> None:
        """Release the workers; shut Ray down if this engine started or connected it."""
        self.release_workers()
        if self._owns_ray:
            ray = _ray()
            if ray.is_initialized():
                ray.shutdown()
        self._owns_ray = self._started = False

    def __enter__(self) -> "RayEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sizing
    def _gpus_per_worker(self) -> float:
        if self.config.gpus_per_worker is not None:
            return float(self.config.gpus_per_worker)
        return 1.0 if _ray().cluster_resources().get("GPU", 0) >= 1 else 0.0

    def n_workers(self) -> int:
        """Workers the engine uses (feature actors; also the parallelism of the map stages)."""
        self.start()
        if self.config.num_workers is not None:
            return self.config.num_workers
        res = _ray().cluster_resources()
        gpus = self._gpus_per_worker()
        if gpus > 0:
            return max(1, int(res.get("GPU", 0) // gpus))
        return max(1, int(res.get("CPU", 1) // self.config.cpus_per_worker))

    def _feature_actors(self, backbone: str, checkpoint: str | None, device: str, cache_dir: str | None) -> list:
        key = (backbone, checkpoint, device, cache_dir)
        if self._actors and self._actor_key == key:
            return self._actors
        self.release_workers()
        ray = _ray()
        gpus = self._gpus_per_worker()
        cls = ray.remote(num_cpus=self.config.cpus_per_worker, num_gpus=gpus)(FeatureWorker)
        dev = device if gpus > 0 or device not in ("auto",) else "cpu"
        self._actors = [cls.remote(backbone, checkpoint, dev, cache_dir, self.config.cpus_per_worker)
                        for _ in range(self.n_workers())]
        self._actor_key = key
        return self._actors

    def release_workers(self) -> None:
        """Stop the feature actors (frees their CPUs/GPUs for the map stages)."""
        if self._actors:
            ray = _ray()
            for a in self._actors:
                ray.kill(a)
        self._actors, self._actor_key = [], None

    # -- features
    def extract_features(self, image_paths: Sequence[Path], config: FeatureConfig, cache_root: Path, *,
                         checkpoint: str | None = None, device: str = "auto", weights_cache: Path | None = None,
                         progress: Callable[[int, int], None] | None = None,
                         cancel: Callable[[], bool] | None = None) -> FeatureStore:
        """``core.features.extract_features`` with the forward passes on the cluster's workers.

        Same store (cache key, layout, values per batch); resumable per shard.
        """
        paths = [Path(p) for p in image_paths]
        if not paths:
            raise ValueError("no images given: extract_features needs at least one image path")
        self.start()
        ray = _ray()
        actors = self._feature_actors(config.backbone, checkpoint, device,
                                      str(weights_cache) if weights_cache else None)
        try:
            infos = ray.get([a.describe.remote(config.precision) for a in actors], timeout=WORKER_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.release_workers()
            raise TimeoutError(f"{len(actors)} Ray feature workers did not start within {WORKER_START_TIMEOUT_S} s: "
                               "the cluster has too few free CPUs/GPUs (another job holds them?) or the "
                               "workers cannot load the backbone; lower num_workers or free the cluster") from None
        for field_name in ("name", "weights_id", "embed_dim", "patch_size", "precision"):
            values = {i[field_name] for i in infos}
            if len(values) > 1:
                raise ValueError(f"the Ray workers disagree on the backbone's {field_name} ({sorted(map(str, values))}); "
                                 "give every node the same weights (--weights on a shared path) and, with mixed "
                                 "GPU/CPU nodes, an explicit precision")
        info = infos[0]
        if config.backbone != info["name"]:
            raise ValueError(f"config.backbone is {config.backbone!r} but the workers built {info['name']!r}")
        if config.resolution < info["patch_size"]:
            raise ValueError(f"resolution {config.resolution} is smaller than the patch size {info['patch_size']}")
        precision = info["precision"]
        t0 = time.perf_counter()
        hashes, sizes = _scan(paths)
        key = cache_key(info["name"], info["weights_id"], config, hashes, precision)
        root = Path(cache_root) / key
        like = SimpleNamespace(spec=SimpleNamespace(name=info["name"]), weights_id=info["weights_id"],
                               weights_source=info["weights_source"], embed_dim=info["embed_dim"],
                               patch_size=info["patch_size"])
        staging = Location(f"{self.config.staging.rstrip('/')}/{key}") if self.config.staging \
            else Location(root / "shards")
        with _locked(root):
            store = _open_or_create(root, paths, hashes, sizes, like, config, precision)
            index = store._index
            done = store._done.copy()
            n = len(index)
            writer = _Writer(root, store.embed_dim, config.flip)
            stats = {"workers": len(actors), "devices": sorted({i["device"] for i in infos}),
                     "hosts": sorted({i["host"] for i in infos}), "precision": precision, "shards": 0,
                     "worker_seconds": 0.0, "resumed_shards": 0}
            try:
                stats["resumed_shards"] = self._ingest_leftovers(staging, index, done, writer)
                pending = np.flatnonzero(~done)
                if progress:
                    progress(n - pending.size, n)
                if pending.size:
                    log.info("Extracting %d of %d items of %s on %d Ray workers (%s)", pending.size, n, root,
                             len(actors), ", ".join(stats["devices"]))
                    context = ray.put(([str(p) for p in paths], index, np.load(root / BOXES), sizes))
                    shards = _plan_shards(_batches(index, pending, config.batch_size), self.config.shard_items)
                    self._run_shards(actors, shards, key, context, config, precision, staging, index, done,
                                     writer, stats, progress, cancel)
            finally:
                writer.sync()
                writer.close()
            meta = dict(store.meta, completed=time.time(), seconds=round(time.perf_counter() - t0, 3),
                        engine={"ray": self.config.address, **{k: stats[k] for k in ("workers", "devices")}})
            atomic_write_json(root / META, meta)
        stats["seconds"] = time.perf_counter() - t0
        self.last_stats["features"] = stats
        return FeatureStore.open(root)

    def _run_shards(self, actors: list, shards: list[list[np.ndarray]], key: str, context, config: FeatureConfig,
                    precision: str, staging: Location, index: np.ndarray, done: np.ndarray, writer: _Writer,
                    stats: dict, progress, cancel) -> None:
        ray = _ray()
        todo = deque(enumerate(shards))
        inflight: dict = {}
        cfg = asdict(config)

        def submit(actor_i: int) -> None:
            if not todo:
                return
            s, batches = todo.popleft()
            name = f"shard-{int(batches[0][0]):09d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
            ref = actors[actor_i].extract.remote(key, [context], batches, cfg, precision, staging.url, name)
            inflight[ref] = actor_i

        for i in range(len(actors)):
            for _ in range(2):   # two shards queued per actor: it never waits for the driver
                submit(i)
        n = len(index)
        while inflight:
            if cancel is not None and cancel():
                # shards still running finish on their workers; the next run ingests them
                raise Cancelled(f"feature extraction cancelled after {int(done.sum())} of {n} items")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                actor_i = inflight.pop(ref)
                result = ray.get(ref)
                self._ingest(staging, result["name"], index, done, writer)
                stats["shards"] += 1
                stats["worker_seconds"] += result["seconds"]
                submit(actor_i)
                if progress:
                    progress(int(done.sum()), n)

    @staticmethod
    def _ingest(staging: Location, name: str, index: np.ndarray, done: np.ndarray, writer: _Writer) -> int:
        """Move one shard object into the store (synced, items marked done); returns items taken."""
        arrays = staging.load_arrays(name)
        taken = 0
        b = 0
        while f"items_{b}" in arrays:
            items = arrays[f"items_{b}"].astype(np.int64)
            tokens, pooled = arrays[f"tokens_{b}"], arrays[f"pooled_{b}"]
            h, w = (int(v) for v in index[items[0], 1:3])
            if tokens.shape[1:3] != (h, w) or tokens.shape[-1] != writer.C or len(items) != len(tokens):
                raise ValueError(f"shard {name} does not match the store's layout; delete {staging.url}")
            writer.write(items, index, tokens, arrays.get(f"flip_{b}"), pooled)
            done[items] = True
            taken += len(items)
            b += 1
        writer.sync()
        staging.remove(name)
        return taken

    def _ingest_leftovers(self, staging: Location, index: np.ndarray, done: np.ndarray, writer: _Writer) -> int:
        count = 0
        for name in staging.list(SHARD_SUFFIX):
            try:
                self._ingest(staging, name, index, done, writer)
                count += 1
            except (ValueError, KeyError, OSError, IndexError) as exc:
                log.warning("dropping unusable feature shard %s (%s)", name, exc)
                staging.remove(name)
        if count:
            log.info("resumed: %d feature shards finished by workers after the last run stopped", count)
        return count

    # -- map stages
    def ordered_map(self, fn: Callable, items: Iterable, n_jobs: int | None = None) -> Iterator:
        """``map(fn, items)`` as Ray tasks of ``map_batch`` items, results in input order.

        ``items`` is consumed lazily, at most two tasks per worker in flight (memory stays flat).
        ``fn`` must be importable by the workers (a module-level function).
        """
        self.start()
        self.release_workers()
        ray = _ray()
        if self._batch_task is None:
            self._batch_task = ray.remote(num_cpus=1)(_run_batch)
        limit = 2 * (n_jobs or self.n_workers())
        pending: deque = deque()
        batch: list = []
        try:
            for item in items:
                batch.append(item)
                if len(batch) >= self.config.map_batch:
                    pending.append(self._batch_task.remote(fn, batch))
                    batch = []
                    while len(pending) >= limit:
                        yield from ray.get(pending.popleft())
            if batch:
                pending.append(self._batch_task.remote(fn, batch))
            while pending:
                yield from ray.get(pending.popleft())
        finally:
            for ref in pending:
                ray.cancel(ref)


def _plan_shards(batches: list[np.ndarray], shard_items: int) -> list[list[np.ndarray]]:
    """Consecutive batches grouped into shards of about ``shard_items`` items (whole batches)."""
    shards: list[list[np.ndarray]] = []
    current: list[np.ndarray] = []
    size = 0
    for b in batches:
        current.append(b)
        size += len(b)
        if size >= shard_items:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


_ENGINES: dict[tuple, RayEngine] = {}


def engine_for(address: str | None, **config) -> RayEngine | None:
    """The process's engine for ``address`` and ``config`` (created and started once), or None
    without an address."""
    if not address:
        return None
    key = (address, tuple(sorted((k, repr(v)) for k, v in config.items())))
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = RayEngine(RayConfig(address=address, **config)).start()
    return engine


def close_engines() -> None:
    """Close every engine ``engine_for`` made."""
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        engine.close()
