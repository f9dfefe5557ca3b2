"""Coefficient layouts and real spherical harmonics (e3nn's convention)."""

import pytest
import torch
from e3nn import o3

from spherical_channels.so3.harmonics import (
    coefficient_degrees,
    coefficient_index,
    coefficient_orders,
    num_coefficients,
    reduced_coefficients,
    spherical_harmonics,
)


def test_coefficient_layout() -> None:
    assert num_coefficients(6) == 49
    assert coefficient_index(0, 0) == 0
    assert coefficient_index(2, -2) == 4
    assert coefficient_index(3, 3) == 15
    degrees, orders = coefficient_degrees(4), coefficient_orders(4)
    for l in range(5):
        for m in range(-l, l + 1):
            k = coefficient_index(l, m)
            assert (degrees[k], orders[k]) == (l, m)
    with pytest.raises(ValueError):
        coefficient_index(1, 2)


def test_reduced_coefficients_official_order() -> None:
    # the official list: for each l, m = -min(l, mmax)..min(l, mmax)
    assert reduced_coefficients(2, 0) == [0, 2, 6]
    assert reduced_coefficients(2, 1) == [0, 1, 2, 3, 5, 6, 7]
    assert len(reduced_coefficients(6, 1)) == 6 + 1 + 2 * 6
    assert reduced_coefficients(3, 3) == list(range(16))
    with pytest.raises(ValueError):
        reduced_coefficients(2, 3)


@pytest.mark.parametrize("lmax", [1, 6, 10])
def test_matches_e3nn_and_polar_axis(lmax: int) -> None:
    x = torch.randn(20, 3, dtype=torch.float64)
    y = spherical_harmonics(lmax, x)
    ref = o3.spherical_harmonics(list(range(lmax + 1)), x, normalize=True, normalization="integral")
    torch.testing.assert_close(y, ref)
    # m = 0 harmonics depend on the y coordinate only: the polar axis is y
    x2 = x / x.norm(dim=1, keepdim=True)
    spun = torch.stack([x2[:, 2], x2[:, 1], -x2[:, 0]], dim=1)  # rotation about y
    m0 = [coefficient_index(l, 0) for l in range(lmax + 1)]
    torch.testing.assert_close(spherical_harmonics(lmax, spun)[:, m0], y[:, m0])


def test_unnormalised_harmonics_are_homogeneous() -> None:
    x = torch.randn(5, 3, dtype=torch.float64)
    y1 = spherical_harmonics(4, x, normalize=False)
    y2 = spherical_harmonics(4, 2.0 * x, normalize=False)
    scale = 2.0 ** coefficient_degrees(4).double()
    torch.testing.assert_close(y2, y1 * scale)
