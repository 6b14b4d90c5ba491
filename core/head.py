"""STEGO segmentation head and the contrastive correlation loss.

Everything here works on *gathered tokens*: tensors of shape (B, T, C) holding T token
vectors per item. The head is pointwise (a 1x1 convolution is a Linear layer on tokens),
so running it on sampled tokens is exactly running it on the full map and sampling after.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SegmentationHead", "ContrastiveCorrelationLoss", "LossWeights", "correlation",
           "centred_feature_correlation", "pointwise_centre", "channel_dropout", "PAIR_KINDS"]

PAIR_KINDS = ("self", "knn", "neg")


def channel_dropout(f: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Dropout2d on token tensors: zero whole channels per item, scale the rest by 1/(1-p).

    ``f`` is (B, T, C); one Bernoulli mask of shape (B, 1, C) is drawn per call.
    """
    if p <= 0.0:
        return f
    if p >= 1.0:
        return torch.zeros_like(f)
    keep = torch.rand((f.shape[0], 1, f.shape[-1]), generator=generator, device=f.device,
                      dtype=f.dtype) >= p
    return f * keep.to(f.dtype) / (1.0 - p)


class SegmentationHead(nn.Module):
    """code = lin(f) + nonlin(f): Linear(C->D) plus Linear(C->C) -> ReLU -> Linear(C->D).

    Works on any (..., C) token tensor. In training mode, channel dropout (Dropout2d-like,
    one mask per item over its channels) is applied to the input of each path.
    """

    def __init__(self, in_dim: int, code_dim: int = 70, dropout: float = 0.1):
        super().__init__()
        if in_dim < 1 or code_dim < 1:
            raise ValueError(f"in_dim and code_dim must be positive, got {in_dim}, {code_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.code_dim = code_dim
        self.dropout = dropout
        self.linear = nn.Linear(in_dim, code_dim)
        self.nonlinear = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(),
                                       nn.Linear(in_dim, code_dim))

    def forward(self, f: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, T, C) -> (B, T, D). ``generator`` drives the dropout masks in training mode."""
        if f.shape[-1] != self.in_dim:
            raise ValueError(f"head expects {self.in_dim}-dim tokens, got {f.shape[-1]}")
        if self.training and self.dropout > 0:
            # one item per leading index; a 2-D (T, C) input is a single item
            flat = f.reshape(1 if f.dim() < 3 else f.shape[0], -1, f.shape[-1])
            a = channel_dropout(flat, self.dropout, generator).reshape(f.shape)
            b = channel_dropout(flat, self.dropout, generator).reshape(f.shape)
            return self.linear(a) + self.nonlinear(b)
        return self.linear(f) + self.nonlinear(f)


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Cosine correlation of every token of ``a`` (B, T, C) with every token of ``b`` (B, U, C)."""
    return torch.einsum("btc,buc->btu", F.normalize(a, dim=-1, eps=1e-10),
                        F.normalize(b, dim=-1, eps=1e-10))


def centred_feature_correlation(f: Tensor, g: Tensor, pointwise: bool = True) -> Tensor:
    """Feature correlation F (B, T, U) with STEGO's pointwise spatial centering.

    Pointwise: subtract from each location its mean correlation over the partner's
    locations, then add back the global mean of F (of the whole batch).
    """
    fd = correlation(f, g)
    return pointwise_centre(fd) if pointwise else fd


def pointwise_centre(fd: Tensor) -> Tensor:
    """STEGO's spatial centering of a correlation (B, T, U): each location minus its mean over the
    partner's locations, plus the global mean back."""
    old_mean = fd.mean()
    fd = fd - fd.mean(dim=-1, keepdim=True)
    return fd - fd.mean() + old_mean


@dataclass(frozen=True)
class LossWeights:
    """Per pair kind weight and shift of the contrastive correlation loss."""

    weight_self: float = 0.67
    weight_knn: float = 0.25
    weight_neg: float = 0.63
    shift_self: float = 0.18
    shift_knn: float = 0.12
    shift_neg: float = 0.46


class ContrastiveCorrelationLoss(nn.Module):
    """STEGO loss: L = sum_k w_k * -mean((F_k - b_k) * clamp(S_k, 0)) over self/KNN/negative pairs.

    F is the (pointwise-centred) cosine correlation of backbone features, computed without
    gradient; S the cosine correlation of the codes. The negative term is averaged over
    the negative samples given.
    """

    def __init__(self, weights: LossWeights = LossWeights(), pointwise: bool = True,
                 zero_clamp: bool = True):
        super().__init__()
        self.weights = weights
        self.pointwise = pointwise
        self.zero_clamp = zero_clamp

    def pair_loss(self, f1: Tensor, f2: Tensor, c1: Tensor, c2: Tensor, shift: float,
                  normalized: bool = False) -> Tensor:
        """-mean((F - shift) * S) for one pair kind (``normalized``: inputs are unit vectors)."""
        if not normalized:
            f1, f2 = F.normalize(f1, dim=-1, eps=1e-10), F.normalize(f2, dim=-1, eps=1e-10)
            c1, c2 = F.normalize(c1, dim=-1, eps=1e-10), F.normalize(c2, dim=-1, eps=1e-10)
        with torch.no_grad():
            fd = torch.einsum("btc,buc->btu", f1, f2)
            if self.pointwise:
                fd = pointwise_centre(fd)
            fd = fd - shift
        cd = torch.einsum("btc,buc->btu", c1, c2)
        cd = cd.clamp(min=0.0) if self.zero_clamp else cd
        return -(fd * cd).mean()

    def forward(self, feats: Tensor, codes: Tensor, feats_knn: Tensor, codes_knn: Tensor,
                feats_neg: list[Tensor], codes_neg: list[Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Return (total loss, {"loss", "self", "knn", "neg"} as floats for logging)."""
        if len(feats_neg) != len(codes_neg):
            raise ValueError("feats_neg and codes_neg must have the same length")
        w = self.weights

        def unit(x: Tensor) -> Tensor:
            return F.normalize(x, dim=-1, eps=1e-10)

        with torch.no_grad():
            fn0, fk = unit(feats), unit(feats_knn)
            fns = [unit(f) for f in feats_neg]
        cn0, ck = unit(codes), unit(codes_knn)
        cns = [unit(c) for c in codes_neg]
        l_self = self.pair_loss(fn0, fn0, cn0, cn0, w.shift_self, normalized=True)
        l_knn = self.pair_loss(fn0, fk, cn0, ck, w.shift_knn, normalized=True)
        if feats_neg:
            l_neg = torch.stack([self.pair_loss(fn0, fn, cn0, cn, w.shift_neg, normalized=True)
                                 for fn, cn in zip(fns, cns)]).mean()
        else:
            l_neg = torch.zeros((), dtype=codes.dtype)
        total = w.weight_self * l_self + w.weight_knn * l_knn + w.weight_neg * l_neg
        terms = {"loss": float(total.detach()), "self": float(l_self.detach()),
                 "knn": float(l_knn.detach()), "neg": float(l_neg.detach())}
        return total, terms
