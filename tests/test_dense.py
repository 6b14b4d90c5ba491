import numpy as np
import pytest

from core.dense import DENSITY, SHIFTS, dense_tokens, interleave, shifted_views


def _ramp(H: int, W: int) -> np.ndarray:
    """An image whose red channel rises 1.5 per pixel to the right and green 2 per pixel down."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[..., 0] = np.round(20 + 1.5 * x)
    rgb[..., 1] = np.round(10 + 2.0 * y)
    return rgb


def test_the_dense_grid_samples_the_image_at_half_patch_steps_where_bilinear_upsampling_expects_them():
    H, W, p, grid = 112, 140, 14, (4, 5)            # the views are 56 x 70: half the image's size
    views = shifted_views(_ramp(H, W), grid, p)
    assert views.shape == (4, 56, 70, 3)
    # each token's stand-in: the mean colour of its patch (a linear ramp's mean is its value at the centre)
    means = views.reshape(4, 4, p, 5, p, 3).mean(axis=(2, 4))
    dense = interleave(means)
    assert dense.shape == (8, 10, 3)
    sy, sx = H / 56, W / 70
    for r in range(1, 7):                           # border cells see reflected pixels
        for c in range(1, 9):
            u, v = (r + 0.5) * p / DENSITY, (c + 0.5) * p / DENSITY     # cell centre, view pixels
            assert dense[r, c, 0] == pytest.approx(20 + 1.5 * (v * sx - 0.5), abs=1.0)
            assert dense[r, c, 1] == pytest.approx(10 + 2.0 * (u * sy - 0.5), abs=1.0)


def test_interleave_puts_each_shift_on_its_own_phase_and_checks_its_input():
    grids = np.stack([np.full((2, 3, 1), k, dtype=np.float32) for k in range(len(SHIFTS))])
    out = interleave(grids)[..., 0]
    for k, (dy, dx) in enumerate(SHIFTS):
        assert (out[int(dy > 0)::2, int(dx > 0)::2] == k).all()
    with pytest.raises(ValueError, match="expected 4 grids"):
        interleave(grids[:3])
    with pytest.raises(ValueError, match="uint8 image"):
        shifted_views(np.zeros((8, 8), dtype=np.uint8), (1, 1), 14)


def test_dense_tokens_of_a_real_backbone_match_its_shifted_views():
    from core.backbones import create_backbone

    bb = create_backbone("test_tiny", device="cpu")
    rgb = _ramp(40, 56)
    grid = (40 // bb.patch_size, 56 // bb.patch_size)
    out = dense_tokens(bb, rgb, grid)
    assert out.shape == (4 * grid[0] * grid[1], bb.embed_dim)
    first = bb(bb.preprocess(shifted_views(rgb, grid, bb.patch_size)[0])[None])[0].permute(1, 2, 0).numpy()
    dense = out.reshape(2 * grid[0], 2 * grid[1], -1)
    np.testing.assert_allclose(dense[0::2, 0::2], first, rtol=1e-4, atol=1e-4)
