"""Fibonacci points on the sphere and their density weights (SCN output blocks, paper B.2)."""

from __future__ import annotations

import math

import torch

__all__ = ["fibonacci_points", "density_weights"]

# exp(-|p_i - p_j|^2 / 0.15): the official code's "0.5 * 0.3" Gaussian width.
DENSITY_WIDTH = 0.15


def fibonacci_points(num_points: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Spherical Fibonacci points: point i has azimuth 2 pi i / golden ratio about z and polar
    angle arccos(1 - 2 (i + 0.5) / N). Returns unit vectors ``[N, 3]``."""
    golden = (1.0 + 5.0**0.5) / 2.0
    i = torch.arange(num_points, dtype=dtype).unsqueeze(-1)
    azimuth = 2.0 * math.pi * i / golden
    polar = torch.arccos(1.0 - 2.0 * (i + 0.5) / num_points)
    return torch.cat(
        [torch.cos(azimuth) * torch.sin(polar), torch.sin(azimuth) * torch.sin(polar), torch.cos(polar)],
        dim=1,
    )


def density_weights(points: torch.Tensor, width: float = DENSITY_WIDTH) -> torch.Tensor:
    """Inverse Gaussian density of each point among all points, normalised to mean 1.

    ``w_i = 1 / sum_j exp(-|p_i - p_j|^2 / width)``; ``points [N, 3]`` -> ``[N]``.
    """
    sq_dist = torch.sum((points.unsqueeze(0) - points.unsqueeze(1)) ** 2, dim=-1)
    inv_density = 1.0 / torch.exp(-sq_dist / width).sum(dim=1)
    return points.shape[0] * inv_density / inv_density.sum()
