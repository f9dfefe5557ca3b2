"""Sampling spherical functions on a polar x azimuthal grid and projecting them back.

SCN's 1x1 aggregation (paper eq. 10) evaluates coefficient vectors on a grid of
``2(L+1) x (2(L+1)+1)`` (polar x azimuthal) points with e3nn's ``ToS2Grid`` and returns with
``FromS2Grid`` (``normalization="integral"``). With two bands each function is sampled twice:
from all degrees <= L and from degrees <= L-1. Here both transforms are collapsed into dense
matrices once, at construction, so a transform is a single matrix product.
"""

from __future__ import annotations

import torch
from e3nn.o3 import FromS2Grid, ToS2Grid

from .constants import ConstantsModule, float64_default
from .harmonics import num_coefficients

__all__ = ["SphericalGrid", "grid_resolution"]


def grid_resolution(lmax: int) -> tuple[int, int]:
    """(polar, azimuthal) resolution SCN uses for degree ``lmax``: (2(L+1), 2(L+1)+1)."""
    return 2 * (lmax + 1), 2 * (lmax + 1) + 1


class SphericalGrid(ConstantsModule):
    """Grid sampling with ``num_bands`` bands and its inverse, for coefficients of degree <= lmax.

    ``to_grid``: ``[N, (L+1)^2, C]`` -> ``[N, P, num_bands * C]`` with ``P = res_beta * res_alpha``
    grid points (polar-major), features ordered band-major (band 0 = degrees <= L, band 1 =
    degrees <= L-1).
    ``from_grid``: ``[N, P, C]`` -> ``[N, (L+1)^2, C]``.

    ``from_grid(to_grid(x))`` is the identity on coefficients of degree <= L (one band).

    Buffers: ``to_matrix [P * bands, B]`` (rows ordered (point, band)), ``sample_matrix [P, B]``
    (band 0), ``from_matrix [B, P]``; ``band_coefficients[b]`` is how many coefficients band b reads.
    """

    def __init__(self, lmax: int, num_bands: int = 1) -> None:
        super().__init__()
        if num_bands not in (1, 2):
            raise ValueError(f"num_bands must be 1 or 2, got {num_bands}")
        if lmax - (num_bands - 1) < 0:
            raise ValueError(f"lmax={lmax} too small for {num_bands} bands")
        self.lmax = lmax
        self.num_bands = num_bands
        self.resolution = grid_resolution(lmax)
        res_beta, res_alpha = self.resolution
        self.num_points = res_beta * res_alpha
        basis = num_coefficients(lmax)

        with float64_default():  # e3nn builds parts of its grids in the default dtype
            to_grids = [
                ToS2Grid(lmax - b, self.resolution, normalization="integral", dtype=torch.float64)
                for b in range(num_bands)
            ]
            from_grid = FromS2Grid(self.resolution, lmax, normalization="integral", dtype=torch.float64)
        bands = []
        for to_grid in to_grids:
            # value[beta, alpha] = sum_m sha[alpha, m] sum_i shb[m, beta, i] x[i]
            dense = torch.einsum("am,mbi->bai", to_grid.sha.double(), to_grid.shb.double())
            dense = dense.reshape(self.num_points, -1)
            padded = torch.zeros(self.num_points, basis, dtype=torch.float64)
            padded[:, : dense.shape[1]] = dense
            bands.append(padded)
        # [num_bands * P, basis], rows ordered (point, band) so a reshape gives band-minor features
        to_matrix = torch.stack(bands, dim=1).reshape(self.num_points * num_bands, basis)

        # x[i] = sum_{beta, m} shb[m, beta, i] sum_alpha sha[alpha, m] value[beta, alpha]
        from_matrix = torch.einsum("mbi,am->iba", from_grid.shb.double(), from_grid.sha.double())
        from_matrix = from_matrix.reshape(basis, self.num_points)

        self.register_constant("to_matrix", to_matrix)
        self.register_constant("from_matrix", from_matrix)
        # Band b samples the first num_coefficients(lmax - b) coefficients with the same matrix
        # (e3nn's "integral" grids do not depend on lmax), which lets callers fold the bands.
        self.register_constant("sample_matrix", bands[0])
        self.band_coefficients = [num_coefficients(lmax - b) for b in range(num_bands)]

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, (L+1)^2, C]`` -> ``[N, P, num_bands * C]`` grid samples."""
        n, _, c = x.shape
        grid = torch.matmul(self.to_matrix.to(x.dtype), x)  # [N, P * bands, C]
        return grid.view(n, self.num_points, self.num_bands * c)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """``[N, P, C]`` grid samples -> ``[N, (L+1)^2, C]`` coefficients."""
        return torch.matmul(self.from_matrix.to(grid.dtype), grid)

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, num_bands={self.num_bands}, resolution={self.resolution}"
