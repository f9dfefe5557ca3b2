"""Spherical grid sampling (1 and 2 bands) and the 1x1 aggregation's equivariance."""

import pytest
import torch
from e3nn import o3

from spherical_channels.models.blocks import InteractionBlock
from spherical_channels.so3.grid import SphericalGrid, grid_resolution
from spherical_channels.so3.harmonics import num_coefficients, spherical_harmonics
from spherical_channels.so3.wigner import wigner_D


@pytest.mark.parametrize("lmax", [1, 4, 6, 8])
@pytest.mark.parametrize("num_bands", [1, 2])
def test_to_grid_then_from_grid_is_identity(lmax: int, num_bands: int) -> None:
    grid = SphericalGrid(lmax, num_bands).double()
    x = torch.randn(3, num_coefficients(lmax), 5, dtype=torch.float64)
    samples = grid.to_grid(x)
    assert samples.shape == (3, grid.num_points, num_bands * 5)
    band0 = samples.view(3, grid.num_points, num_bands, 5)[:, :, 0]
    torch.testing.assert_close(grid.from_grid(band0), x, atol=1e-10, rtol=0)


def test_samples_are_function_values() -> None:
    lmax = 4
    grid = SphericalGrid(lmax, 2).double()
    x = torch.randn(1, num_coefficients(lmax), 1, dtype=torch.float64)
    res_beta, res_alpha = grid_resolution(lmax)
    betas, alphas = torch.meshgrid(
        (torch.arange(res_beta, dtype=torch.float64) + 0.5) / res_beta * torch.pi,
        torch.arange(res_alpha, dtype=torch.float64) / res_alpha * 2 * torch.pi,
        indexing="ij",
    )
    points = o3.angles_to_xyz(alphas.flatten(), betas.flatten())
    y = spherical_harmonics(lmax, points)  # [P, (L+1)^2]
    values = grid.to_grid(x).view(-1, 2)
    # "integral" normalisation of the grid: values are sum_i x_i Y_i(p) / sqrt(4 pi) ... find the
    # scale from the data and check it is one constant (a wrong point order would not be)
    full = y @ x[0, :, 0]
    truncated = y[:, : num_coefficients(lmax - 1)] @ x[0, : num_coefficients(lmax - 1), 0]
    for band, reference in ((0, full), (1, truncated)):
        ratio = values[:, band] / reference
        torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("num_bands", [1, 2])
def test_linear_1x1_aggregation_is_rotation_equivariant(num_bands: int) -> None:
    lmax, channels = 4, 6
    block = _block(lmax, channels, num_bands).double()
    for k in (1, 3):
        block.grid_mlp[k] = torch.nn.Identity()  # pointwise linear network
    x = torch.randn(7, num_coefficients(lmax), channels, dtype=torch.float64)
    s = torch.randn_like(x)
    d = wigner_D(o3.rand_matrix(dtype=torch.float64), lmax)
    rotated_first = block.aggregate(d @ x, d @ s)
    rotated_after = d @ block.aggregate(x, s)
    torch.testing.assert_close(rotated_first, rotated_after, atol=1e-10, rtol=0)


def test_silu_1x1_aggregation_is_only_approximately_equivariant() -> None:
    """The paper's Table 5: a non-linear pointwise network is not exactly equivariant."""
    torch.manual_seed(0)
    lmax, channels = 4, 6
    block = _block(lmax, channels, 2).double()
    x = torch.randn(7, num_coefficients(lmax), channels, dtype=torch.float64)
    s = torch.randn_like(x)
    d = wigner_D(o3.rand_matrix(dtype=torch.float64), lmax)
    out = d @ block.aggregate(x, s)
    mad = (block.aggregate(d @ x, d @ s) - out).abs().mean() / out.abs().mean()
    assert 1e-4 < mad < 0.5


def _block(lmax: int, channels: int, num_bands: int) -> InteractionBlock:
    return InteractionBlock(
        lmax_list=[lmax], mmax=1, num_taps=1, sphere_channels=channels, sphere_channels_reduce=channels,
        hidden_channels_list=[8], num_expansion=10, num_basis=4, max_num_elements=5, use_grid=True,
        num_bands=num_bands,
    )
