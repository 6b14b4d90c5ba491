import pytest
import torch

from core.head import (ContrastiveCorrelationLoss, LossWeights, SegmentationHead,
                       centred_feature_correlation, channel_dropout, correlation)


def test_head_is_linear_plus_nonlinear_path_and_pointwise():
    torch.manual_seed(0)
    head = SegmentationHead(16, code_dim=5, dropout=0.0).eval()
    x = torch.randn(2, 7, 16)
    out = head(x)
    assert out.shape == (2, 7, 5)
    expected = head.linear(x) + head.nonlinear[2](torch.relu(head.nonlinear[0](x)))
    torch.testing.assert_close(out, expected)
    # pointwise: a token's code does not depend on the other tokens
    torch.testing.assert_close(head(x[:, 3:4]), out[:, 3:4])
    with pytest.raises(ValueError, match="16-dim"):
        head(torch.randn(1, 3, 8))


def test_channel_dropout_drops_whole_channels_per_item():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(4, 50, 64)
    y = channel_dropout(x, 0.5, g)
    per_channel = y[:, 0, :]
    # every token of an item shares the same channel mask; kept channels are rescaled
    assert torch.equal(y, per_channel[:, None, :].expand_as(y))
    assert set(per_channel.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(per_channel[0], per_channel[1])  # masks differ between items


def test_head_dropout_only_in_training_mode():
    head = SegmentationHead(8, 4, dropout=0.5)
    x = torch.randn(2, 3, 8)
    head.eval()
    torch.testing.assert_close(head(x), head(x))
    head.train()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    assert not torch.allclose(head(x, generator=g1), head(x, generator=g2))


def test_pointwise_centering_equalises_row_means():
    torch.manual_seed(0)
    f, g = torch.randn(3, 10, 8) + 1.0, torch.randn(3, 12, 8) + 1.0
    raw = correlation(f, g)
    fd = centred_feature_correlation(f, g, pointwise=True)
    row_means = fd.mean(dim=-1)
    torch.testing.assert_close(row_means, torch.full_like(row_means, float(raw.mean())))
    torch.testing.assert_close(centred_feature_correlation(f, g, pointwise=False), raw)


def test_pair_loss_rewards_code_agreement_only_above_the_shift():
    loss = ContrastiveCorrelationLoss(pointwise=False, zero_clamp=True)
    f = torch.ones(1, 4, 3)                     # F = 1 everywhere
    same = torch.tensor([[[1.0, 0.0]] * 4])      # S = 1 everywhere
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]] * 2])
    # F above the shift: aligned codes lower the loss by (F - shift)
    assert float(loss.pair_loss(f, f, same, same, shift=0.25)) == pytest.approx(-0.75)
    # F below the shift: aligned codes are penalised
    assert float(loss.pair_loss(f, f, same, same, shift=1.5)) == pytest.approx(0.5)
    # zero clamp: anti-correlated pairs contribute nothing instead of a reward
    clamped = float(loss.pair_loss(f, f, opposite, opposite, shift=1.5))
    unclamped = float(ContrastiveCorrelationLoss(pointwise=False, zero_clamp=False)
                      .pair_loss(f, f, opposite, opposite, shift=1.5))
    assert clamped == pytest.approx(0.5 * 0.5)
    assert unclamped == pytest.approx(0.0)


def test_total_loss_is_weighted_sum_of_three_terms():
    torch.manual_seed(0)
    w = LossWeights(weight_self=0.5, weight_knn=2.0, weight_neg=3.0, shift_self=0.1, shift_knn=0.2,
                    shift_neg=0.3)
    loss = ContrastiveCorrelationLoss(w)
    f, fk = torch.randn(2, 9, 6), torch.randn(2, 9, 6)
    c, ck = torch.randn(2, 9, 4, requires_grad=True), torch.randn(2, 9, 4)
    negs_f = [f.flip(0), f.roll(1, 0)]
    negs_c = [c.flip(0), c.roll(1, 0)]
    total, terms = loss(f, c, fk, ck, negs_f, negs_c)
    neg = (loss.pair_loss(f, negs_f[0], c, negs_c[0], 0.3) + loss.pair_loss(f, negs_f[1], c, negs_c[1], 0.3)) / 2
    expected = 0.5 * loss.pair_loss(f, f, c, c, 0.1) + 2.0 * loss.pair_loss(f, fk, c, ck, 0.2) + 3.0 * neg
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert terms["neg"] == pytest.approx(float(neg.detach()), rel=1e-5)
    total.backward()
    assert c.grad is not None and torch.isfinite(c.grad).all()
