"""Models and structures shared by the diagnostics tests (import as ``diagnostics_helpers``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.io import read
from torch import nn

from spherical_channels.models import SCN
from spherical_channels.so3.harmonics import spherical_harmonics

from scn_helpers import scale_like_fixtures

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

#: A tiny SCN: 2 layers, lmax 3, every neighbour within 5 A (no cap ties under rotation).
TINY = dict(
    num_interactions=2, lmax=3, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
    num_sphere_samples=32, num_basis_functions=8, max_num_neighbors=60, basis_width_scalar=2.0, cutoff=5.0,
)
#: The paper's least equivariant ablation: m in [-1, 1], one tap, with the 1x1 grid network.
M1_ONE_TAP = dict(mmax=1, num_taps=1, num_bands=1, use_grid=True)
#: m = 0 messages without the grid network: an exactly equivariant trunk.
M0_NO_GRID = dict(mmax=0, use_grid=False)


def structures(count: int = 3) -> list[Atoms]:
    """The first ``count`` fixture structures (slabs with adsorbates, 28-33 atoms)."""
    return read(FIXTURES / "structures_small.extxyz", f":{count}")


def make_scn(dtype: torch.dtype = torch.float64, seed: int = 0, **options) -> SCN:
    """A tiny SCN with amplified random weights (outputs of order 1), in eval mode."""
    torch.manual_seed(seed)
    return scale_like_fixtures(SCN(**{**TINY, **options})).to(dtype).eval()


def linearize(model: SCN) -> SCN:
    """Every activation the model lets one swap (messages, grid network, output heads) made the
    identity: the network is then linear in its coefficients."""
    for block in model.interactions:
        for message_block in block.message_blocks:
            message_block.activation = nn.Identity()
        if block.use_grid:
            block.grid_mlp[1] = block.grid_mlp[3] = nn.Identity()
    for head in (model.energy_head, getattr(model, "force_head", None)):
        if head is not None:
            head[1] = head[3] = nn.Identity()
    return model


def exact_output_quadrature(model: SCN) -> SCN:
    """Replace the output points by a product Gauss rule (Gauss-Legendre in the polar cosine,
    equally spaced azimuths) that integrates every polynomial of degree <= lmax + 1 on the
    sphere exactly: linear heads' integrands (degree lmax for the energy, lmax + 1 for the
    force, which multiplies by the direction) are then integrated without error."""
    lmax = model.lmax
    num_polar, num_azimuth = lmax + 2, 2 * lmax + 4  # exact to degree 2 n - 1 and n_azimuth - 1
    nodes, weights = np.polynomial.legendre.leggauss(num_polar)
    cos_t = torch.tensor(nodes, dtype=torch.float64).repeat_interleave(num_azimuth)
    w = torch.tensor(weights, dtype=torch.float64).repeat_interleave(num_azimuth)
    phi = (torch.arange(num_azimuth, dtype=torch.float64) * 2 * np.pi / num_azimuth).repeat(num_polar)
    sin_t = (1 - cos_t**2).sqrt()
    points = torch.stack([sin_t * phi.cos(), sin_t * phi.sin(), cos_t], dim=1)
    sampler = model.sphere_sampler
    sampler.weighting = "quadrature"
    sampler.register_constant("harmonics", spherical_harmonics(lmax, points))
    sampler.register_constant("directions", points)
    sampler.register_constant("weights", w * len(w) / w.sum())  # integrate() takes the mean
    dtype = model.energy_scale.dtype
    return model.to(dtype)


def rotations_for(batch, count: int = 2) -> list:  # noqa: ANN001
    """``count`` seeded draws of one rotation per structure of ``batch``."""
    import torch

    from spherical_channels.diagnostics.equivariance import draw_rotations

    return draw_rotations(batch.num_structures, count, torch.Generator().manual_seed(0))
