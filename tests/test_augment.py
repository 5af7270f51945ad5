"""The augmentation's resampling: per-image affine views of decoded pixels."""

import numpy as np
import torch
import torch.nn.functional as F

from runner.config import AugmentConfig
from runner.data.pipeline import identity_affines, random_affines, resample, sampling_grid


def _pixels(n=4, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def test_the_sampling_grid_is_torchs_affine_grid():
    theta = random_affines(64, AugmentConfig(), np.random.default_rng(1))
    for size in (1, 7, 64):
        ours = sampling_grid(theta, size)
        torchs = F.affine_grid(theta, [64, 3, size, size], align_corners=False)
        assert ours.shape == torchs.shape
        assert torch.allclose(ours, torchs, atol=1e-6)


def test_the_identity_view_is_the_image_channels_first():
    pixels = _pixels()
    out = resample(pixels, identity_affines(len(pixels)), 8)
    assert out.dtype == np.uint8 and out.shape == (4, 3, 8, 8)
    assert np.array_equal(out, pixels.transpose(0, 3, 1, 2))


def test_a_mirror_matrix_mirrors_left_right():
    pixels = _pixels()
    theta = identity_affines(len(pixels))
    theta[:, 0, 0] = -1.0
    out = resample(pixels, theta, 8)
    assert np.array_equal(out, pixels.transpose(0, 3, 1, 2)[..., ::-1])


def test_every_image_gets_its_own_random_view():
    cfg = AugmentConfig()
    theta = random_affines(32, cfg, np.random.default_rng(2))
    assert len({tuple(t.flatten().tolist()) for t in theta}) == 32
    pixels = np.repeat(_pixels(1, 72), 32, axis=0)  # one image, 32 times
    views = resample(pixels, theta, 64)
    assert len({v.tobytes() for v in views}) == 32
