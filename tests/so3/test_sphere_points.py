"""Fibonacci output points and their density weights (SPEC 2.1)."""

import math

import torch

from spherical_channels.so3.sphere_points import density_weights, fibonacci_points


def test_fibonacci_points_formula() -> None:
    n = 16
    p = fibonacci_points(n)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(n, dtype=torch.float64))
    golden = (1 + 5**0.5) / 2
    for i in (0, 5, 15):
        azimuth, polar = 2 * math.pi * i / golden, math.acos(1 - 2 * (i + 0.5) / n)
        expected = [math.cos(azimuth) * math.sin(polar), math.sin(azimuth) * math.sin(polar), math.cos(polar)]
        torch.testing.assert_close(p[i], torch.tensor(expected, dtype=torch.float64))


def test_density_weights() -> None:
    p = fibonacci_points(128)
    w = density_weights(p)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0, dtype=torch.float64))
    i = 7
    manual = 1.0 / torch.exp(-((p - p[i]) ** 2).sum(dim=1) / 0.15).sum()
    ratio = w[i] / manual
    torch.testing.assert_close(w / ratio, 1.0 / torch.exp(-((p[:, None] - p[None]) ** 2).sum(-1) / 0.15).sum(1))
    # a near-uniform set: weights close to 1, densest regions (poles) weighted least
    assert 0.8 < w.min() < 1.0 < w.max() < 1.2
