"""Propagation ("refine with names"): a token classifier trained on the names people gave clusters.

After a person has named (some of) the K discovered clusters, every token whose cluster is
named confidently becomes a pseudo-label; tokens of person-checked images become true seeds
with a larger weight. A small classifier (MLP, or linear with ``hidden=0``) is trained on the
*backbone features* of those tokens (not on the codes, which lose information), then predicts
every token of every image; ``class_map`` upsamples its log-probabilities to the image and
refines them with the dense CRF.

    labels, weights = pseudo_labels(cluster_probs, cluster_to_class)      # per item
    prop = Propagator(n_classes).fit(features, labels_per_item, weights_per_item)
    log_p = prop.predict_log_proba(features.tokens(i))                     # (T, n_classes)
    result = class_map(ClassMapJob(log_p.reshape(h, w, -1), size, image_path, crf=True))

This module imports torch only inside ``Propagator``'s methods, so worker processes that run
``class_map`` start without it.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from core.crf import CRFParams, crf_marginals, crf_size
from core.errors import Cancelled
from core.tokens import TokenFeatures

if TYPE_CHECKING:
    from core.pixel_head import PixelHeadArrays

log = logging.getLogger(__name__)

__all__ = ["Propagator", "pseudo_labels", "with_found", "views_log_proba", "cluster_probabilities",
           "ClassMapJob", "ClassMap", "class_map", "class_weights",
           "LABEL_PASSES",
           "DEFAULT_PSEUDO_ALPHA", "DEFAULT_MIN_CONFIDENCE", "PROPAGATOR_DEFAULTS"]

# Temperature for cluster probabilities used to rank pseudo-labels (confidence = sigmoid(alpha *
# margin) is monotone in the margin, so selection by quantile does not depend on it).
DEFAULT_PSEUDO_ALPHA = 10.0
# Pseudo-labels below this confidence are left out (swept 0.3 / 0.5 / 0.7 on CamVid train:
# within 0.8 mIoU, 0.5 best with 0.3; docs/evaluation.md).
DEFAULT_MIN_CONFIDENCE = 0.5
# The Propagator's training defaults: the one home of these values (the app's refinement stage and
# evaluate take them from here). Chosen on CamVid train, docs/evaluation.md.
PROPAGATOR_DEFAULTS = {"hidden": 256, "keep_fraction": 0.7, "class_balance": 0.5, "steps": 1000,
                       "batch_size": 1024, "lr": 1e-3, "rounds": 1}

Progress = Callable[[int, int, float], None]   # (step, steps, loss)
LabelSource = Callable[[int], tuple[np.ndarray, "np.ndarray | None"]]   # item -> (labels, weights)
LABEL_PASSES = 2           # Propagator.fit reads a LabelSource this many times per item and round
WEIGHT_STEPS = 1024        # weights are ranked for keep_fraction in steps of 1/1024
MAX_WEIGHT_KEY = 64 * WEIGHT_STEPS   # weights above 64 rank as equal


def _weight_keys(weights: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(weights, np.float64) * WEIGHT_STEPS), 0, MAX_WEIGHT_KEY).astype(np.int64)


def class_weights(counts: np.ndarray, class_balance: float) -> np.ndarray:
    """Loss weight per class from its training count: (n_max / n_c) ** class_balance, scaled so
    the mean weight over the training samples is 1; 0 for a class with no samples."""
    counts = np.asarray(counts, dtype=np.float64)
    cw = np.zeros(counts.shape[0])
    seen = counts > 0
    cw[seen] = (counts[seen].max() / counts[seen]) ** float(class_balance)
    cw[seen] /= (cw[seen] * counts[seen]).sum() / counts[seen].sum()
    return cw


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cluster_probabilities(vectors: np.ndarray, centroids: np.ndarray, alpha: float = DEFAULT_PSEUDO_ALPHA
                          ) -> np.ndarray:
    """(T, K) float32 softmax(alpha * cosine similarity) of (T, D) vectors to (K, D) centroids."""
    logits = alpha * (_normalize(vectors) @ _normalize(centroids).T)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return p.astype(np.float32)


def with_found(labels: np.ndarray, weights: np.ndarray, found: np.ndarray, hit: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Pseudo-labels with found regions (click-to-find) on top: a token whose ``found`` class is
    >= 0 takes it at full weight; a token in ``hit`` (default: found >= 0) whose found class is
    -1 is left out (weight 0). Returns the labels, the weights and how many tokens took a class."""
    hit = found >= 0 if hit is None else hit
    take = hit & (found >= 0)
    lab = np.where(take, found, np.where(hit, -1, labels))
    wt = np.where(take, 1.0, np.where(hit, 0.0, weights)).astype(np.float32)
    return lab, wt, int(take.sum())


def views_log_proba(prop: Propagator, views: Sequence[np.ndarray]) -> np.ndarray:
    """(T, n_classes) log-probabilities of an item's token views (``core.tokens.token_views``); with an
    image and its mirror, the mean in probability of the two predictions."""
    lps = [prop.predict_log_proba(v) for v in views]
    return lps[0] if len(lps) == 1 else np.logaddexp(lps[0], lps[1]) - np.log(2.0)


def pseudo_labels(cluster_probs: np.ndarray, cluster_to_class: np.ndarray, *,
                  min_confidence: float = DEFAULT_MIN_CONFIDENCE
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels of one item's tokens from cluster probabilities and the names of the clusters.

    ``cluster_probs`` (T, K): each token's cluster probabilities; ``cluster_to_class`` (K,) int:
    the class each cluster was named, -1 = unnamed or ignored (void). A token takes the class of
    its most probable cluster; it gets no label (-1) when that cluster is unnamed. Its weight is
    the confidence ``q1 / (q1 + q2)`` in [0.5, 1], where q1 is the largest cluster probability
    and q2 the largest among clusters named another class (or unnamed): many clusters of one
    class do not make a token more confident. Tokens below ``min_confidence`` get no label.

    Returns (labels (T,) int64, weights (T,) float32; 0 where unlabelled).
    """
    p = np.asarray(cluster_probs, dtype=np.float32)
    names = np.asarray(cluster_to_class).astype(np.int64).ravel()
    if p.ndim != 2 or p.shape[1] != names.shape[0]:
        raise ValueError(f"cluster_probs must be (T, K) with K = len(cluster_to_class) = {names.shape[0]}, "
                         f"got {p.shape}")
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    if p.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    top = p.argmax(axis=1)
    q1 = p[np.arange(p.shape[0]), top]
    cls = names[top]
    # unnamed clusters are each their own "class" for the margin (their key: -1 - k)
    keys = np.where(names >= 0, names, -1 - np.arange(names.shape[0]))
    other = np.where(keys[None, :] != keys[top][:, None], p, 0.0)
    q2 = other.max(axis=1)
    conf = q1 / np.maximum(q1 + q2, 1e-12)
    labels = np.where((cls >= 0) & (conf >= min_confidence), cls, -1).astype(np.int64)
    weights = np.where(labels >= 0, conf, 0.0).astype(np.float32)
    return labels, weights


@contextlib.contextmanager
def single_cpu_thread(device) -> Iterator[None]:
    """Train on one CPU thread, restoring the count after. The classifier's matrices are small (a batch of
    1024 tokens): a second OpenMP thread gains a third on an idle CPU and costs several times that on a
    shared one, where each of the thousands of small parallel regions waits for both threads to be
    scheduled (docs/DESIGN.md, "Threads")."""
    import torch

    if getattr(device, "type", str(device)) != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Propagator:
    """Token classifier trained on pseudo-labels and seeds (scikit-learn style).

    Hyper-parameters:
    - ``hidden``: width of the MLP's hidden layer; 0 = a linear classifier.
    - ``keep_fraction``: per class, the share of its labelled tokens kept for training, the ones
      with the largest weights (seeds, whose weights exceed 1, come first); 1 keeps all.
    - ``class_balance``: loss weight of class c is (n_max / n_c) ** class_balance (0 = none,
      0.5 = inverse square root, 1 = inverse frequency), n_c counted after selection.
    - ``weighted``: multiply each token's loss by its weight (else 1 for pseudo-labels, the
      weight for seeds only).
    - ``max_tokens``: cap on training tokens held in memory (a uniform subsample beyond it), so
      memory is flat in the number of images.
    - ``rounds``: 1 = train once; more = self-training, each round a new classifier trained on the
      previous one's predictions (seeds and found regions keep their labels).
    - ``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``dropout``, ``label_smoothing``: training.
    """

    def __init__(self, n_classes: int, *, hidden: int = PROPAGATOR_DEFAULTS["hidden"],
                 keep_fraction: float = PROPAGATOR_DEFAULTS["keep_fraction"],
                 class_balance: float = PROPAGATOR_DEFAULTS["class_balance"], weighted: bool = False,
                 max_tokens: int = 300_000, steps: int = PROPAGATOR_DEFAULTS["steps"],
                 batch_size: int = PROPAGATOR_DEFAULTS["batch_size"], lr: float = PROPAGATOR_DEFAULTS["lr"],
                 weight_decay: float = 1e-4,
                 dropout: float = 0.2, label_smoothing: float = 0.1, rounds: int = PROPAGATOR_DEFAULTS["rounds"],
                 seed: int = 0, device: str = "cpu"):
        self.n_classes = n_classes
        self.hidden = hidden
        self.keep_fraction = keep_fraction
        self.class_balance = class_balance
        self.weighted = weighted
        self.max_tokens = max_tokens
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.label_smoothing = label_smoothing
        self.rounds = rounds
        self.seed = seed
        self.device = device

    # ----------------------------------------------------------------- helpers
    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in ("n_classes", "hidden", "keep_fraction", "class_balance", "weighted",
                                               "max_tokens", "steps", "batch_size", "lr", "weight_decay",
                                               "dropout", "label_smoothing", "rounds", "seed", "device")}

    def _validate(self) -> None:
        if int(self.n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if int(self.hidden) < 0:
            raise ValueError(f"hidden must be >= 0 (0 = linear), got {self.hidden}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.class_balance < 0:
            raise ValueError(f"class_balance must be >= 0, got {self.class_balance}")
        for name in ("max_tokens", "steps", "batch_size", "rounds"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("dropout and label_smoothing must be in [0, 1)")

    def _build(self, in_dim: int):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.hidden:
                net = torch.nn.Sequential(torch.nn.Linear(in_dim, self.hidden), torch.nn.ReLU(),
                                          torch.nn.Dropout(self.dropout), torch.nn.Linear(self.hidden, self.n_classes))
            else:
                net = torch.nn.Sequential(torch.nn.Dropout(self.dropout), torch.nn.Linear(in_dim, self.n_classes))
        return net

    def _source(self, features: TokenFeatures, labels: Sequence[np.ndarray] | LabelSource,
                weights: Sequence[np.ndarray] | None) -> LabelSource:
        """One way to read the labels of item i, whether given as lists or as a callable."""
        if callable(labels):
            if weights is not None:
                raise ValueError("a labels callable returns (labels, weights) itself; do not pass weights too")
            return labels
        n = len(features)
        if len(labels) != n or (weights is not None and len(weights) != n):
            raise ValueError(f"labels (and weights) need one array per item: {n} items, {len(labels)} label arrays"
                             + ("" if weights is None else f", {len(weights)} weight arrays"))
        return lambda i: (labels[i], None if weights is None else weights[i])

    def _item(self, features: TokenFeatures, source: LabelSource, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Checked labels (T,) int64 (-1 where the weight is 0) and weights (T,) float32 of item i."""
        h, w = features.grid(i)
        lab, wt = source(i)
        lab = np.asarray(lab).astype(np.int64).ravel()
        if lab.shape[0] != h * w:
            raise ValueError(f"labels[{i}] has {lab.shape[0]} entries, item {i} has {h * w} tokens ({h}x{w})")
        if lab.size and lab.max() >= self.n_classes:
            raise ValueError(f"labels[{i}] holds class {lab.max()} but n_classes is {self.n_classes}")
        wt = np.ones(lab.shape, np.float32) if wt is None else np.asarray(wt, np.float32).ravel()
        if wt.shape != lab.shape:
            raise ValueError(f"weights[{i}] has {wt.shape[0]} entries, labels[{i}] {lab.shape[0]}")
        return np.where(wt > 0, lab, -1), wt

    def _select(self, features: TokenFeatures, source: LabelSource, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The training tokens (features float16, labels, weights) in two streaming passes.

        Pass 1 counts, per class, the labelled tokens by weight (quantised to 1/WEIGHT_STEPS);
        that fixes each class's weight threshold for ``keep_fraction`` and the sampling rate that
        keeps about ``max_tokens``. Pass 2 reads the labels again and keeps the tokens above the
        thresholds (at random within a threshold's own weight step), so memory holds only the kept
        tokens and per-class counts, whatever the number of items.
        """
        C = int(self.n_classes)
        n = len(features)
        hist = [np.zeros(0, np.int64) for _ in range(C)]
        for i in range(n):
            lab, wt = self._item(features, source, i)
            on = lab >= 0
            if not on.any():
                continue
            keys, labelled = _weight_keys(wt[on]), lab[on]
            for c in np.unique(labelled):
                counts = np.bincount(keys[labelled == c])
                if counts.size > hist[c].size:
                    hist[c] = np.pad(hist[c], (0, counts.size - hist[c].size))
                hist[c][:counts.size] += counts
        totals = np.array([h.sum() for h in hist], np.int64)
        if not totals.any():
            raise ValueError("no labelled tokens: name at least one cluster (or give seed images) first")
        present = np.flatnonzero(totals)
        if present.size < 2:
            raise ValueError(f"only one class ({int(present[0])}) has labelled tokens; a classifier needs at "
                             "least two: name clusters of another class too")
        # per class: keep weight keys above `cut`, and a share `part` of the tokens at `cut` itself
        cut = np.full(C, np.iinfo(np.int64).max, np.int64)
        part = np.zeros(C)
        wanted = 0
        for c in present:
            n_keep = max(1, int(round(self.keep_fraction * totals[c])))
            above = np.cumsum(hist[c][::-1])                       # tokens at or above each key, top down
            j = int(np.searchsorted(above, n_keep))                 # first key reaching n_keep
            cut[c] = hist[c].size - 1 - j
            before = above[j - 1] if j else 0
            part[c] = (n_keep - before) / hist[c][cut[c]]
            wanted += n_keep
        rate = min(1.0, int(self.max_tokens) / wanted)              # uniform subsample beyond max_tokens
        room = min(wanted, int(self.max_tokens))
        room += int(6 * np.sqrt(room)) + 64                          # Bernoulli slack, trimmed below
        X = np.empty((room, int(features.embed_dim)), dtype=np.float16)  # float16 like the feature store
        y = np.empty(room, np.int64)
        w = np.empty(room, np.float32)
        off = 0
        for i in range(n):
            lab, wt = self._item(features, source, i)
            on = lab >= 0
            if not on.any():
                continue
            keys = _weight_keys(wt)
            c = np.where(on, lab, 0)
            r = rng.random(lab.shape[0])
            keep = on & ((keys > cut[c]) | ((keys == cut[c]) & (r < part[c])))
            if rate < 1.0:
                keep &= rng.random(lab.shape[0]) < rate
            pos = np.flatnonzero(keep)[:room - off]
            if pos.size:
                X[off:off + pos.size] = np.asarray(features.tokens(i))[pos]
                y[off:off + pos.size] = lab[pos]
                w[off:off + pos.size] = wt[pos]
                off += pos.size
        if off > self.max_tokens:
            pick = np.sort(rng.choice(off, size=int(self.max_tokens), replace=False))
            return X[pick], y[pick], w[pick]
        return X[:off], y[:off], w[:off]

    # ---------------------------------------------------------------- fitting
    def fit(self, features: TokenFeatures, labels: Sequence[np.ndarray] | LabelSource,
            weights: Sequence[np.ndarray] | None = None, progress: Progress | None = None,
            cancel: Callable[[], bool] | None = None) -> "Propagator":
        """Train on the labelled tokens of every item.

        ``labels[i]`` (h*w,) int class per token of item i (-1 = no label); ``weights[i]`` (h*w,)
        confidence per token (0 = unlabelled; pseudo-labels in (0, 1], seeds > 1, e.g. 3). Or
        ``labels`` is a callable ``i -> (labels, weights)`` (weights may be None), called twice
        per item and round, so that nothing of the size of the corpus is held in memory.
        With ``rounds`` > 1 each later round trains a new classifier on the previous one's
        predictions (self-training), tokens of weight >= 1 (seeds, found regions) keeping theirs.
        ``progress(step, steps, loss)`` is called every 50 steps (counted over all rounds);
        ``cancel()`` is polled as often and raises core.errors.Cancelled.
        """
        self._validate()
        rng = np.random.default_rng(self.seed)
        source = self._source(features, labels, weights)
        self.history_: list[float] = []
        for r in range(int(self.rounds)):
            X, y, w = self._select(features, source if r == 0 else self._predicted(features, source), rng)
            self._train_round(X, y, w, r, progress, cancel)
            del X, y, w
        return self

    def _predicted(self, features: TokenFeatures, source: LabelSource) -> LabelSource:
        """Labels of the next self-training round: this classifier's most probable class and its
        probability, except where the given weight is >= 1 (seeds and found regions)."""
        def labels_of(i: int) -> tuple[np.ndarray, np.ndarray]:
            lab, wt = self._item(features, source, i)
            lp = self.predict_log_proba(np.asarray(features.tokens(i)))
            keep = wt >= 1.0
            return np.where(keep, lab, lp.argmax(axis=1)), np.where(keep, wt, np.exp(lp.max(axis=1))).astype(np.float32)
        return labels_of

    def _train_round(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, r: int, progress: Progress | None,
                     cancel: Callable[[], bool] | None) -> None:
        import torch

        C = int(X.shape[1])
        mean = X.mean(axis=0, dtype=np.float64)
        var = np.zeros(C)
        for s in range(0, X.shape[0], 65536):
            var += ((X[s:s + 65536].astype(np.float64) - mean) ** 2).sum(axis=0)
        self.mean_ = mean.astype(np.float32)
        self.scale_ = (np.sqrt(var / X.shape[0]) + 1e-6).astype(np.float32)
        counts = np.bincount(y, minlength=self.n_classes).astype(np.float64)
        cw = class_weights(counts, self.class_balance)
        sample_w = np.where(w > 1.0, w, w if self.weighted else 1.0).astype(np.float32)
        self.class_counts_ = counts.astype(np.int64)
        self.n_train_tokens_ = int(y.shape[0])

        device = torch.device(self.device if self.device != "auto" else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
        with single_cpu_thread(device):     # see single_cpu_thread
            net = self._build(C).to(device)
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=int(self.steps), pct_start=0.1)
            gen = torch.Generator().manual_seed(self.seed + r)
            mean_t, scale_t = torch.from_numpy(self.mean_).to(device), torch.from_numpy(self.scale_).to(device)
            cw_t = torch.from_numpy(cw.astype(np.float32)).to(device)
            yt, wt = torch.from_numpy(y), torch.from_numpy(sample_w)
            n = y.shape[0]
            bs = min(int(self.batch_size), n)
            net.train()
            running = 0.0
            for step in range(1, int(self.steps) + 1):
                idx = torch.randint(0, n, (bs,), generator=gen).sort().values  # sorted: faster gather
                xb = (torch.from_numpy(X[idx.numpy()].astype(np.float32)).to(device) - mean_t) / scale_t
                yb, wb = yt[idx].to(device), wt[idx].to(device)
                loss_tok = torch.nn.functional.cross_entropy(net(xb), yb, reduction="none",
                                                             label_smoothing=float(self.label_smoothing))
                loss = (loss_tok * wb * cw_t[yb]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach())
                if step % 50 == 0 or step == self.steps:
                    k = 50 if step % 50 == 0 else step % 50
                    self.history_.append(running / k)
                    running = 0.0
                    if progress is not None:
                        progress(r * int(self.steps) + step, int(self.rounds) * int(self.steps), self.history_[-1])
                    if cancel is not None and cancel():
                        raise Cancelled(f"propagation training cancelled at step {step} of round {r + 1}")
        net.eval()
        self.net_ = net.cpu()
        self.n_features_in_ = C

    # -------------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise RuntimeError("Propagator is not fitted: call fit() or Propagator.load() first")

    def predict_log_proba(self, tokens: np.ndarray) -> np.ndarray:
        """(T, n_classes) float32 log-probabilities of (T, C) tokens."""
        import torch

        self._check_fitted()
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.n_features_in_:
            raise ValueError(f"tokens must be (T, {self.n_features_in_}), got {tokens.shape}")
        out = np.empty((tokens.shape[0], int(self.n_classes)), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, tokens.shape[0], 65536):
                x = (torch.from_numpy(np.asarray(tokens[s:s + 65536], dtype=np.float32)) - torch.from_numpy(self.mean_)) \
                    / torch.from_numpy(self.scale_)
                out[s:s + 65536] = torch.log_softmax(self.net_(x), dim=1).numpy()
        return out

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) int64 most probable class of each token."""
        return self.predict_log_proba(tokens).argmax(axis=1)

    # -------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write the fitted classifier to ``path`` atomically (one torch file)."""
        import torch

        self._check_fitted()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"params": self.get_params(), "state_dict": self.net_.state_dict(), "mean": self.mean_,
                   "scale": self.scale_, "n_features_in": self.n_features_in_,
                   "class_counts": self.class_counts_, "history": self.history_}
        tmp = path.with_name(path.name + ".tmp")
        buf = io.BytesIO()
        torch.save(payload, buf)
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Propagator":
        """A fitted Propagator from a file written by ``save``."""
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no propagation model at {path}; run propagation first")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        params = dict(payload["params"])
        self = cls(params.pop("n_classes"), **params)
        self.n_features_in_ = int(payload["n_features_in"])
        net = self._build(self.n_features_in_)
        net.load_state_dict(payload["state_dict"])
        self.net_ = net.eval()
        self.mean_, self.scale_ = payload["mean"], payload["scale"]
        self.class_counts_, self.history_ = payload["class_counts"], payload["history"]
        return self

    def __repr__(self) -> str:
        return f"Propagator({json.dumps(self.get_params())})"


@dataclass(frozen=True)
class ClassMapJob:
    """Token log-probabilities of one image -> full-resolution class labels (optionally CRF-refined)."""

    log_probs: np.ndarray             # (h, w, n_classes) at token resolution
    size: tuple[int, int]             # (H, W) of the full image
    image_path: str | None = None     # needed when crf is True
    crf: bool = False
    crf_resolution: int | None = None # short side the CRF runs at (core.crf.crf_size); None = full size
    params: CRFParams = CRFParams()
    pixel: np.ndarray | None = None   # (h, w, hidden) core.pixel_head projection of the image's tokens
    pixel_arrays: "PixelHeadArrays | None" = None
    pixel_weight: float = 1.0         # the pixel head's log-probabilities are added with this weight
    plain: bool = True                # also the full-resolution labels without the CRF (with crf only)
    ruled_out: np.ndarray | None = None   # (H, W) bool: pixels that are none of the first ruled_out_classes
    ruled_out_classes: int = 0            # classes (a person's corrected image left those pixels out of them)


@dataclass(frozen=True)
class ClassMap:
    labels: np.ndarray | None         # (H, W) uint8/uint16 argmax of the upsampled probabilities
    labels_crf: np.ndarray | None     # (H, W) after the CRF, when asked
    confidence: np.ndarray | None     # (H, W) float16 max probability (before the CRF); None with labels


def _upsampled_log_probs(log_probs: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(n, H, W) log_softmax of the bilinearly upsampled token logits."""
    from core.clustering import log_softmax_, upsample_bilinear

    up = log_softmax_(upsample_bilinear(np.asarray(log_probs, dtype=np.float32), hw))  # (H, W, n)
    return np.ascontiguousarray(np.moveaxis(up, -1, 0))


def _with_pixel(lp: np.ndarray, job: ClassMapJob, image: np.ndarray) -> np.ndarray:
    """``lp`` (n, H, W) with the job's pixel head on ``image`` (H, W, 3) added (core.pixel_head.combine)."""
    if job.pixel is None:
        return lp
    from core.pixel_head import combine, pixel_log_proba

    return combine(lp, pixel_log_proba(job.pixel, image, job.pixel_arrays), job.pixel_arrays.taught,
                   job.pixel_weight)


RULED_OUT_LOG_PROB = -1e4   # a ruled-out class's log-probability: no CRF pairwise term brings it back


def _ruled_out_mask(job: ClassMapJob, n_classes: int) -> np.ndarray | None:
    """The job's ruled-out pixels as a bool mask, or None when nothing is ruled out or ruling out
    its ``ruled_out_classes`` would leave no class of ``n_classes``."""
    if job.ruled_out is None or not 0 < int(job.ruled_out_classes) < n_classes:
        return None
    return np.asarray(job.ruled_out, dtype=bool)


def _without_ruled_out(lp: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray:
    """``lp`` (n, h, w) with its first ``k`` classes made impossible where ``mask`` (any size, resized
    to (h, w) by nearest neighbour) is set."""
    if mask is None:
        return lp
    h, w = lp.shape[1:]
    if mask.shape != (h, w):
        H, W = mask.shape
        mask = mask[(np.arange(h) * H // h)[:, None], (np.arange(w) * W // w)[None, :]]
    if not mask.any():
        return lp
    out = np.array(lp, dtype=np.float32, copy=True)
    out[:k, mask] = RULED_OUT_LOG_PROB
    return out


def _plain_labels(job: ClassMapJob, image: np.ndarray | None, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(labels, confidence) at full size without the CRF, made band by band: the (n, H, W)
    probabilities of a large image are never held at once."""
    from core.clustering import log_softmax_, upsampled_bands

    H, W = (int(v) for v in job.size)
    labels = np.empty((H, W), dtype=dtype)
    conf = np.empty((H, W), dtype=np.float16)
    mask, k = _ruled_out_mask(job, job.log_probs.shape[-1]), int(job.ruled_out_classes)
    for rows, band in upsampled_bands(job.log_probs, (H, W)):
        lp = np.moveaxis(log_softmax_(band, axis=-1), -1, 0)                   # (n, b, W)
        if job.pixel is not None:
            from core.pixel_head import combine, pixel_log_proba

            lp = combine(lp, pixel_log_proba(job.pixel, image, job.pixel_arrays, rows=rows),
                         job.pixel_arrays.taught, job.pixel_weight)
        lp = _without_ruled_out(lp, None if mask is None else mask[rows], k)
        labels[rows] = lp.argmax(axis=0)
        conf[rows] = np.exp(lp.max(axis=0))
    return labels, conf


def class_map(job: ClassMapJob) -> ClassMap:
    """Run one ClassMapJob (module-level, torch-free: worker processes can run it).

    With the CRF at a reduced resolution and ``plain`` off, the full-resolution probabilities
    (and the pixel head on every full-resolution pixel) are never computed: only the CRF's labels
    come back."""
    H, W = (int(v) for v in job.size)
    image = None
    if job.crf or job.pixel is not None:
        if job.image_path is None:
            raise ValueError("a CRF or pixel-head job needs the image path")
        from core.images import load_image

        image = load_image(job.image_path)
        if image.shape[:2] != (H, W):
            raise ValueError(f"{job.image_path} is {image.shape[:2]}, expected {(H, W)}; "
                             "did the file change since its features were extracted?")
    h, w = crf_size(H, W, job.crf_resolution) if job.crf else (H, W)
    dtype = np.uint8 if job.log_probs.shape[-1] <= 256 else np.uint16
    labels = conf = refined = None
    mask, k = _ruled_out_mask(job, job.log_probs.shape[-1]), int(job.ruled_out_classes)
    full_crf = job.crf and (h, w) == (H, W)
    if full_crf:      # a CRF at full size needs every pixel's (n, H, W) probabilities at once
        lp = _upsampled_log_probs(job.log_probs, (H, W))
        lp = _without_ruled_out(_with_pixel(lp, job, image), mask, k)
        labels = lp.argmax(axis=0).astype(dtype)
        conf = np.exp(lp.max(axis=0)).astype(np.float16)
        refined = crf_marginals(image, lp, job.params).argmax(axis=0).astype(dtype)
    elif not job.crf or job.plain:
        labels, conf = _plain_labels(job, image, dtype)
    if job.crf and not full_crf:
        from PIL import Image

        from core.clustering import upsampled_argmax

        small = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        q = crf_marginals(small, _without_ruled_out(
            _with_pixel(_upsampled_log_probs(job.log_probs, (h, w)), job, small), mask, k), job.params)

        def rule_out(band: np.ndarray, rows: slice) -> None:      # the mask's edges too, at full size
            band[mask[rows], :k] = -1.0

        refined = upsampled_argmax(np.moveaxis(q, 0, -1), (H, W), None if mask is None else rule_out).astype(dtype)
        if not job.plain:
            labels = conf = None
    return ClassMap(labels, refined, conf)
