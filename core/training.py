"""STEGO head training on cached token features (the backbone never runs here).

Per step: a batch of items is drawn without replacement; each item gets
``feature_samples**2`` random token positions, a KNN partner (random among its top
``num_neighbors``) with its own random positions, and ``neg_samples`` negatives taken from
the other items of the batch (a cyclic derangement: never the item itself). The head runs
on the gathered tokens only.

Training is deterministic for a seed (numpy Generator for sampling, a private torch
Generator for dropout, head initialised under a forked global RNG) and resumable: the
checkpoint holds head, optimizer, both RNG states, the step and the history, and is
written atomically (temporary file, then ``os.replace``) every ``checkpoint_every`` steps and
whenever ``checkpoint_seconds`` have passed since the last one, so a killed process loses
at most that much work.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.atomic import atomic_path
from core.errors import Cancelled
from core.head import ContrastiveCorrelationLoss, LossWeights, SegmentationHead
from core.precision import resolve_device
from core.settings import AUTO_STEPS_MAX, DEFAULTS, SettingsError, check
from core.shifts import NEG_ATTRACT_FACTOR, ShiftEstimator
from core.tokens import TokenFeatures

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "StegoTrainer", "PAPER_SHIFTS", "LEGACY_DEFAULTS", "encode_tokens"]

# The paper's ViT-S defaults (DINO ViT-S/8, COCO-Stuff).
PAPER_SHIFTS: dict[str, float] = {"self": 0.18, "knn": 0.12, "neg": 0.46}

# Fields that may change between an interrupted run and its resumption.
_RESUMABLE_FIELDS = ("steps", "checkpoint_every", "checkpoint_seconds", "device")
# Fields added after runs were stored, with the value that reproduces what those runs did.
LEGACY_DEFAULTS = {"auto_shift_neg_factor": 1.0}


@dataclass
class TrainConfig:
    """Hyper-parameters of head training (defaults: the paper's ViT-S settings)."""

    code_dim: int = DEFAULTS.code_dim
    steps: int = AUTO_STEPS_MAX
    batch_size: int = DEFAULTS.batch_size
    lr: float = DEFAULTS.lr
    feature_samples: int = 11
    num_neighbors: int = 7
    neg_samples: int = 5
    pointwise: bool = True
    zero_clamp: bool = True
    dropout: float = 0.1
    weight_self: float = DEFAULTS.weight_self
    weight_knn: float = DEFAULTS.weight_knn
    weight_neg: float = DEFAULTS.weight_neg
    shift_self: float | None = None  # None = automatic (core.shifts)
    shift_knn: float | None = None
    shift_neg: float | None = None
    auto_shift_attract: float | None = None  # automatic shifts: partners attracted per location,
    #                                          None = ln(feature_samples**2) (see core.shifts)
    auto_shift_neg_factor: float = NEG_ATTRACT_FACTOR  # automatic shifts: random pairs attract this many times
    #                                                   as many partners per location (see core.shifts)
    seed: int = DEFAULTS.seed
    checkpoint_every: int = 200
    checkpoint_seconds: float = 30.0  # also checkpoint when this long has passed since the last one (0 = off)
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what to use instead."""
        for name in ("code_dim", "lr", "weight_self", "weight_knn", "weight_neg", "shift_self", "shift_knn",
                     "shift_neg", "seed"):      # the limits of the run settings schema (core.settings)
            try:
                check(name, getattr(self, name))
            except SettingsError as exc:
                raise ValueError(f"TrainConfig.{name}: {exc}") from None
        positive = ("batch_size", "feature_samples", "num_neighbors", "checkpoint_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"TrainConfig.steps must be >= 0, got {self.steps}")
        if not self.checkpoint_seconds >= 0:
            raise ValueError(f"TrainConfig.checkpoint_seconds must be >= 0 (0 = by steps only), "
                             f"got {self.checkpoint_seconds}")
        if self.neg_samples < 0:
            raise ValueError(f"TrainConfig.neg_samples must be >= 0, got {self.neg_samples}")
        if self.auto_shift_attract is not None and not 0 < self.auto_shift_attract < self.feature_samples ** 2:
            raise ValueError(f"TrainConfig.auto_shift_attract must be in (0, feature_samples**2), "
                             f"got {self.auto_shift_attract}")
        if not self.auto_shift_neg_factor > 0:
            raise ValueError(f"TrainConfig.auto_shift_neg_factor must be > 0, got {self.auto_shift_neg_factor}")
        if self.neg_samples > 0 and self.batch_size < 2:
            raise ValueError("negative pairs come from other items of the batch: use batch_size >= 2 "
                             "or neg_samples = 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.device not in ("cpu", "auto") and not self.device.startswith(("cuda", "mps")):
            raise ValueError(f"TrainConfig.device must be 'cpu', 'auto', 'cuda[:n]' or 'mps', got {self.device!r}")

    def manual_shifts(self) -> dict[str, float | None]:
        return {"self": self.shift_self, "knn": self.shift_knn, "neg": self.shift_neg}



def encode_tokens(head: SegmentationHead, tokens: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Codes (T, D) float32 of tokens (T, C) with the head in eval mode (no dropout)."""
    was_training = head.training
    head.eval()
    device = next(head.parameters()).device
    out = np.empty((tokens.shape[0], head.code_dim), dtype=np.float32)
    with torch.no_grad():
        for s in range(0, tokens.shape[0], chunk):
            t = torch.from_numpy(np.asarray(tokens[s:s + chunk], dtype=np.float32)).to(device)
            out[s:s + chunk] = head(t).cpu().numpy()
    head.train(was_training)
    return out


class StegoTrainer:
    """Trains a SegmentationHead with the contrastive correlation loss (sklearn-style)."""

    def __init__(self, config: TrainConfig | None = None):
        self.config = config if config is not None else TrainConfig()
        self.config.validate()
        self.head: SegmentationHead | None = None
        self.shifts: dict[str, float] = {}
        self.history: list[dict] = []
        self.step_: int = 0

    # ------------------------------------------------------------------ helpers
    def _check_inputs(self, features: TokenFeatures, knn: np.ndarray) -> np.ndarray:
        n = len(features)
        if n < 2:
            raise ValueError(f"training needs at least 2 images (items), got {n}: add images")
        knn = np.asarray(knn)
        if knn.ndim != 2 or knn.shape[0] != n or knn.shape[1] < 1:
            raise ValueError(f"knn must be (n_items={n}, k>=1), got shape {knn.shape}; "
                             "compute it with core.knn.compute_knn on the same features")
        if not np.issubdtype(knn.dtype, np.integer) or knn.min() < 0 or knn.max() >= n:
            raise ValueError("knn must hold item indices in [0, n_items); recompute it for these features")
        for i in range(n):
            h, w = features.grid(i)
            if h * w < 1:
                raise ValueError(f"item {i} has an empty token grid")
        return knn.astype(np.int64)

    def _resolve_shifts(self, features: TokenFeatures, knn: np.ndarray) -> dict[str, float]:
        manual = self.config.manual_shifts()
        if all(v is not None for v in manual.values()):
            return {k: float(v) for k, v in manual.items()}
        cfg = self.config
        est = ShiftEstimator(attract_per_location=cfg.auto_shift_attract,
                             feature_samples=cfg.feature_samples, num_neighbors=cfg.num_neighbors,
                             batch_size=max(2, cfg.batch_size), pointwise=cfg.pointwise,
                             seed=cfg.seed, neg_factor=cfg.auto_shift_neg_factor).fit(features, knn)
        shifts = {k: float(v if v is not None else est.shifts_[k]) for k, v in manual.items()}
        log.info("automatic shifts %s (manual overrides: %s)", est.shifts_,
                 {k: v for k, v in manual.items() if v is not None})
        return shifts

    def _config_key(self) -> dict:
        d = dataclasses.asdict(self.config)
        for name in _RESUMABLE_FIELDS:
            d.pop(name)
        return d

    def _save(self, path: Path, opt: torch.optim.Optimizer, rng: np.random.Generator,
              gen: torch.Generator, signature: dict) -> None:
        state = {"step": self.step_, "head": self.head.state_dict(), "optimizer": opt.state_dict(),
                 "numpy_rng": rng.bit_generator.state, "torch_rng": gen.get_state(),
                 "history": self.history, "shifts": self.shifts, "config": self._config_key(),
                 "signature": signature}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    # ---------------------------------------------------------------- training
    def fit(self, features: TokenFeatures, knn: np.ndarray, checkpoint_path: Path | None = None,
            progress: Callable[[int, dict[str, float]], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> "StegoTrainer":
        """Train (or resume from ``checkpoint_path``) for ``config.steps`` steps.

        ``progress(step, terms)`` is called after every step with the loss terms
        (loss, self, knn, neg). ``cancel()`` returning True saves a checkpoint and raises
        core.errors.Cancelled.
        """
        cfg = self.config
        knn = self._check_inputs(features, knn)
        n = len(features)
        device = resolve_device(cfg.device)
        signature = {"n_items": n, "embed_dim": int(features.embed_dim)}
        checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.head = SegmentationHead(features.embed_dim, cfg.code_dim, cfg.dropout)
        self.head.to(device)
        opt = torch.optim.Adam(self.head.parameters(), lr=cfg.lr)
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.step_, self.history = 0, []

        state = None
        if checkpoint_path is not None and checkpoint_path.exists():
            state = torch.load(checkpoint_path, map_location=device, weights_only=False)
            if {**LEGACY_DEFAULTS, **state["config"]} != self._config_key() or state["signature"] != signature:
                raise ValueError(f"checkpoint {checkpoint_path} was written for another configuration "
                                 "or corpus; delete it or use another checkpoint path")
            self.head.load_state_dict(state["head"])
            opt.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["numpy_rng"]
            gen.set_state(state["torch_rng"])
            self.step_ = int(state["step"])
            self.history = list(state["history"])
            self.shifts = dict(state["shifts"])
            log.info("resuming training from %s at step %d", checkpoint_path, self.step_)
        else:
            self.shifts = self._resolve_shifts(features, knn)

        loss_fn = ContrastiveCorrelationLoss(
            LossWeights(cfg.weight_self, cfg.weight_knn, cfg.weight_neg,
                        self.shifts["self"], self.shifts["knn"], self.shifts["neg"]),
            pointwise=cfg.pointwise, zero_clamp=cfg.zero_clamp)
        batch = min(cfg.batch_size, n)
        n_samples = cfg.feature_samples ** 2
        n_nb = min(cfg.num_neighbors, knn.shape[1])
        sizes = np.array([h * w for h, w in (features.grid(i) for i in range(n))], dtype=np.int64)
        self.head.train()

        last_save = [time.monotonic()]

        def save() -> None:
            if checkpoint_path is not None:
                self._save(checkpoint_path, opt, rng, gen, signature)
                last_save[0] = time.monotonic()

        def save_due() -> bool:
            if self.step_ % cfg.checkpoint_every == 0 or self.step_ == cfg.steps:
                return True
            return cfg.checkpoint_seconds > 0 and time.monotonic() - last_save[0] >= cfg.checkpoint_seconds

        while self.step_ < cfg.steps:
            if cancel is not None and cancel():
                save()
                raise Cancelled(f"training cancelled at step {self.step_}")
            items = rng.choice(n, size=batch, replace=False)
            partners = knn[items, rng.integers(0, n_nb, size=batch)]
            pos_a = rng.integers(0, sizes[items][:, None], size=(batch, n_samples))
            pos_b = rng.integers(0, sizes[partners][:, None], size=(batch, n_samples))
            orders = [rng.permutation(batch) for _ in range(cfg.neg_samples)]
            f = np.stack([np.asarray(features.tokens(int(i))[p], dtype=np.float32)
                          for i, p in zip(items, pos_a)])
            g = np.stack([np.asarray(features.tokens(int(j))[p], dtype=np.float32)
                          for j, p in zip(partners, pos_b)])
            fg = torch.from_numpy(np.concatenate([f, g])).to(device)
            codes = self.head(fg, generator=gen)
            feats, feats_knn = fg[:batch], fg[batch:]
            c, c_knn = codes[:batch], codes[batch:]
            negs = []
            for order in orders:  # cyclic derangement along a random order: never the item itself
                perm = np.empty(batch, dtype=np.int64)
                perm[order] = np.roll(order, -1)
                negs.append(torch.from_numpy(perm).to(device))
            loss, terms = loss_fn(feats, c, feats_knn, c_knn, [feats[p] for p in negs],
                                  [c[p] for p in negs])  # negatives: other items of the batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.step_ += 1
            record = {"step": self.step_, **terms}
            self.history.append(record)
            if progress is not None:
                progress(self.step_, terms)
            if save_due():
                save()
        self.head.eval()
        return self

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        """Codes (T, D) of tokens (T, C) with the trained head."""
        if self.head is None:
            raise RuntimeError("call fit() before encode()")
        return encode_tokens(self.head, tokens)
