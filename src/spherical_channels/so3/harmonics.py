"""Real spherical harmonics and the coefficient layouts SCN uses.

Conventions are e3nn's: the coefficient of degree l and order m sits at flat index
``l*l + l + m``, and the polar axis is **y** (the m = 0 harmonics are functions of y alone).
"""

from __future__ import annotations

import torch
from e3nn import o3

__all__ = [
    "num_coefficients",
    "coefficient_index",
    "reduced_coefficients",
    "grouped_reduced_coefficients",
    "coefficient_degrees",
    "coefficient_orders",
    "spherical_harmonics",
]


def num_coefficients(lmax: int) -> int:
    """Number of real spherical-harmonic coefficients of degrees 0..lmax: (lmax+1)^2."""
    return (lmax + 1) ** 2


def coefficient_index(l: int, m: int) -> int:
    """Flat index of the (l, m) coefficient: l^2 + l + m."""
    if abs(m) > l:
        raise ValueError(f"order m={m} outside [-{l}, {l}]")
    return l * l + l + m


def reduced_coefficients(lmax: int, mmax: int) -> list[int]:
    """Flat indices of the coefficients SCN's messages keep: |m| <= mmax.

    For each degree l in increasing order, the orders m = -min(l, mmax) .. min(l, mmax); this is
    the order of the official implementation's reduced coefficient list.
    """
    if not 0 <= mmax <= lmax:
        raise ValueError(f"mmax={mmax} must be in [0, lmax={lmax}]")
    out = []
    for l in range(lmax + 1):
        mm = min(l, mmax)
        out.extend(coefficient_index(l, m) for m in range(-mm, mm + 1))
    return out


def grouped_reduced_coefficients(lmax: int, mmax: int) -> list[int]:
    """The same coefficients as :func:`reduced_coefficients`, grouped by order:
    all m = 0 (l increasing), then m = -1 for l >= 1, m = +1 for l >= 1, then m = -2, m = +2, ...

    Within the -m and +m groups the degrees line up, so a roll about the polar axis (which mixes
    (l, -m) with (l, m)) acts on two contiguous, aligned blocks.
    """
    if not 0 <= mmax <= lmax:
        raise ValueError(f"mmax={mmax} must be in [0, lmax={lmax}]")
    out = [coefficient_index(l, 0) for l in range(lmax + 1)]
    for m in range(1, mmax + 1):
        out.extend(coefficient_index(l, -m) for l in range(m, lmax + 1))
        out.extend(coefficient_index(l, m) for l in range(m, lmax + 1))
    return out


def coefficient_degrees(lmax: int) -> torch.Tensor:
    """Degree l of each flat coefficient, shape [(lmax+1)^2]."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


def coefficient_orders(lmax: int) -> torch.Tensor:
    """Order m of each flat coefficient, shape [(lmax+1)^2]."""
    return torch.cat([torch.arange(-l, l + 1) for l in range(lmax + 1)])


def spherical_harmonics(lmax: int, vectors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Real spherical harmonics of degrees 0..lmax in e3nn's convention ("integral" normalisation).

    Args:
        lmax: highest degree (up to 10 is tested).
        vectors: ``[..., 3]`` points.
        normalize: project the points onto the unit sphere first. With ``False`` the harmonics are
            evaluated as homogeneous polynomials, so degree l scales with ``|v|^l`` (the official
            SCN output block relies on this).

    Returns:
        ``[..., (lmax+1)^2]``.
    """
    return o3.spherical_harmonics(
        list(range(lmax + 1)), vectors, normalize=normalize, normalization="integral"
    )
