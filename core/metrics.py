"""Evaluation metrics: confusion matrix with Hungarian matching, and the linear probe.

The confusion matrix is accumulated image by image (int64, clusters x classes), so memory
does not grow with the number of images.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)

__all__ = ["ConfusionMatrix", "hungarian_match", "LinearProbe", "downsample_labels", "with_void",
           "majority_names", "named_scores"]


def hungarian_match(matrix: np.ndarray) -> dict[int, int]:
    """One-to-one cluster -> class matching maximising matched pixels (K x C matrix)."""
    rows, cols = linear_sum_assignment(np.asarray(matrix, dtype=np.float64), maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols)}


class ConfusionMatrix:
    """Counts (predicted id, true class) pairs; target pixels equal to ``ignore_index`` or
    outside [0, n_classes) are skipped."""

    def __init__(self, n_pred: int, n_classes: int, ignore_index: int | None = None):
        if n_pred < 1 or n_classes < 1:
            raise ValueError(f"n_pred and n_classes must be >= 1, got {n_pred}, {n_classes}")
        self.n_pred = int(n_pred)
        self.n_classes = int(n_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.n_pred, self.n_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> "ConfusionMatrix":
        """Add one prediction/target pair of equal shape."""
        pred = np.asarray(pred)
        target = np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape; "
                             "predict at the mask's resolution")
        pred = pred.ravel().astype(np.int64)
        target = target.ravel().astype(np.int64)
        valid = (target >= 0) & (target < self.n_classes)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if pred.size and (pred.min() < 0 or pred.max() >= self.n_pred):
            raise ValueError(f"predicted ids must be in [0, {self.n_pred}), got {pred.min()}..{pred.max()}")
        self.matrix += np.bincount(pred * self.n_classes + target,
                                   minlength=self.n_pred * self.n_classes).reshape(self.n_pred, self.n_classes)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.matrix.shape != self.matrix.shape:
            raise ValueError("cannot merge confusion matrices of different shapes")
        self.matrix += other.matrix
        return self

    def scores(self, hungarian: bool = True, many_to_one: bool = False) -> dict:
        """mIoU (over classes present in the targets), pixel accuracy, per-class IoU, matching.

        hungarian: one-to-one matching (clusters left unmatched count as errors);
        many_to_one: each cluster to its majority class (for over-clustering);
        neither: prediction id i is class i.
        """
        m = self.matrix
        if many_to_one:
            matching = {k: int(np.argmax(m[k])) for k in range(self.n_pred) if m[k].sum() > 0}
        elif hungarian:
            matching = hungarian_match(m)
        else:
            matching = {k: k for k in range(min(self.n_pred, self.n_classes))}
        mapped = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)  # predicted class x true class
        for k, c in matching.items():
            mapped[c] += m[k]
        return {**_class_scores(mapped, m.sum(axis=0)), "matching": {int(k): int(c) for k, c in matching.items()}}


def _class_scores(mapped: np.ndarray, gt: np.ndarray) -> dict:
    """mIoU over present classes, pixel accuracy, per-class IoU from a (predicted class x true class)
    matrix and the true pixels per class (which may exceed the matrix's column sums)."""
    tp = np.diag(mapped)
    union = gt + mapped.sum(axis=1) - tp
    present = gt > 0
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    total = int(gt.sum())
    return {
        "miou": float(np.mean(iou[present])) if present.any() else float("nan"),
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "per_class_iou": [float(v) if p else None for v, p in zip(iou, present)],
        "n_pixels": total,
    }


def with_void(mask: np.ndarray, n_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """The mask with every unlabelled pixel (``ignore_index`` or outside [0, n_classes)) set to
    ``n_classes``: count it with ``ConfusionMatrix(K, n_classes + 1)`` to know each cluster's void share."""
    mask = np.asarray(mask).astype(np.int64)
    void = (mask < 0) | (mask >= n_classes)
    if ignore_index is not None:
        void |= mask == ignore_index
    return np.where(void, n_classes, mask)


def majority_names(counts: np.ndarray, max_void_share: float = 0.5) -> np.ndarray:
    """(K,) int the majority class of each cluster (a careful person's naming); -1 = left unnamed.

    ``counts`` (K, C + 1): pixels of each cluster per true class, the last column unlabelled
    (void) pixels (see ``with_void``). A cluster whose void share exceeds ``max_void_share``, or
    that has no pixels, is left unnamed (ignored).
    """
    m = np.asarray(counts, dtype=np.int64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"counts must be (K, C + 1) with a void column last, got {m.shape}")
    names = m[:, :-1].argmax(axis=1).astype(np.int64)
    total = m.sum(axis=1)
    names[(total == 0) | (m[:, -1] > max_void_share * total) | (m[:, :-1].sum(axis=1) == 0)] = -1
    return names


def named_scores(counts: np.ndarray, names: np.ndarray) -> dict:
    """Scores of a many-to-one named segmentation from cluster x class counts.

    ``counts`` (K, C + 1) as in ``majority_names`` (void column last, not scored); ``names`` (K,)
    the class each cluster was named, -1 = unnamed: its labelled pixels count as errors (a false
    negative of their true class). Unlike Hungarian or STEGO's own metric code, no pixel of an
    extra cluster is dropped. Returns mIoU over classes present, pixel accuracy over labelled
    pixels, per-class IoU, and the naming actions (clusters named) and clusters left unnamed.
    """
    m = np.asarray(counts, dtype=np.int64)[:, :-1]
    names = np.asarray(names).astype(np.int64).ravel()
    if names.shape[0] != m.shape[0]:
        raise ValueError(f"{names.shape[0]} names for {m.shape[0]} clusters")
    C = m.shape[1]
    if names.max(initial=-1) >= C:
        raise ValueError(f"names must be classes in [0, {C}) or -1")
    mapped = np.zeros((C, C), dtype=np.int64)
    for k in np.flatnonzero(names >= 0):
        mapped[names[k]] += m[k]
    return {
        **_class_scores(mapped, m.sum(axis=0)),
        "naming_actions": int((names >= 0).sum()),
        "unnamed_clusters": int((names < 0).sum()),
        "classes_found": int(len(set(names[names >= 0].tolist()))),
    }


def downsample_labels(mask: np.ndarray, grid: tuple[int, int], n_classes: int,
                      ignore_index: int | None = None) -> np.ndarray:
    """(h, w) majority label of the mask pixels under each token cell; -1 where none is valid.

    The token grid is taken to cover the whole image (the image was resized, not cropped).
    """
    mask = np.asarray(mask).astype(np.int64)
    H, W = mask.shape
    h, w = grid
    cell = (np.arange(H) * h // H)[:, None] * w + (np.arange(W) * w // W)[None, :]
    valid = (mask >= 0) & (mask < n_classes)
    if ignore_index is not None:
        valid &= mask != ignore_index
    counts = np.bincount(cell[valid] * n_classes + mask[valid], minlength=h * w * n_classes)
    counts = counts.reshape(h * w, n_classes)
    out = counts.argmax(axis=1)
    out[counts.sum(axis=1) == 0] = -1
    return out.reshape(h, w)


class LinearProbe:
    """Multinomial logistic regression on tokens (the linear-probe upper bound; uses labels).

    Inputs are standardised with the training mean/std; trained with Adam on mini-batches
    of the labelled tokens. Labels outside [0, n_classes) are ignored.
    """

    def __init__(self, n_classes: int, epochs: int = 10, lr: float = 1e-3, batch_size: int = 4096,
                 weight_decay: float = 0.0, seed: int = 0):
        self.n_classes = n_classes
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LinearProbe":
        if self.n_classes < 2 or self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("LinearProbe needs n_classes >= 2, epochs >= 1, batch_size >= 1, lr > 0")
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y).astype(np.int64).ravel()
        if X.ndim != 2 or X.shape[0] != y.shape[0]:
            raise ValueError(f"X must be (n, d) with one label per row; got {X.shape} and {y.shape}")
        rows = np.flatnonzero((y >= 0) & (y < self.n_classes))  # indices, not a copy of X
        if rows.size == 0:
            raise ValueError("no labelled rows to fit the linear probe on")
        total = np.zeros(X.shape[1], dtype=np.float64)
        for s in range(0, rows.size, 65536):  # chunked statistics: no full copy of X
            total += X[rows[s:s + 65536]].sum(axis=0, dtype=np.float64)
        mean = total / rows.size
        sq = np.zeros(X.shape[1], dtype=np.float64)
        for s in range(0, rows.size, 65536):
            sq += ((X[rows[s:s + 65536]] - mean) ** 2).sum(axis=0)
        self.mean_ = mean.astype(np.float32)
        self.scale_ = (np.sqrt(sq / rows.size) + 1e-6).astype(np.float32)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            layer = torch.nn.Linear(X.shape[1], self.n_classes)
        mean, scale = torch.from_numpy(self.mean_), torch.from_numpy(self.scale_)
        opt = torch.optim.Adam(layer.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        n = rows.size
        for _ in range(self.epochs):
            order = rows[torch.randperm(n, generator=gen).numpy()]
            for s in range(0, n, self.batch_size):
                idx = np.sort(order[s:s + self.batch_size])
                xb = (torch.from_numpy(X[idx]) - mean) / scale  # standardised per batch: no copy of X
                loss = torch.nn.functional.cross_entropy(layer(xb), torch.from_numpy(y[idx]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.coef_ = layer.weight.detach().numpy().copy()
        self.intercept_ = layer.bias.detach().numpy().copy()
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(..., n_classes) logits for (..., d) inputs."""
        if not hasattr(self, "coef_"):
            raise RuntimeError("LinearProbe is not fitted: call fit() first")
        X = np.asarray(X, dtype=np.float32)
        if X.shape[-1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} features, got {X.shape[-1]}")
        return ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.decision_function(X).argmax(axis=-1)
