"""SpinConv's blocks: the distance expansion, the element-conditioned MLP, the spin convolution
and the message and force blocks (the official module tree, under names that say what each
part is; :mod:`.spinconv_official` maps the official state-dict keys onto them).

Shapes: E edges, S spheres (one per edge in the message blocks, one per atom and frame in the
force block), C = ``hidden_channels``, M = ``mid_hidden_channels``, a ``lat x lon`` grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .spinconv_geometry import SphereSplat

__all__ = [
    "EdgeDistanceEmbedding",
    "ElementMixingMLP",
    "ForceBlock",
    "GaussianBasis",
    "MessageBlock",
    "SpinConvolution",
    "NUM_MIXING_BASES",
]

#: Bases of every element-conditioned MLP (hard-coded in the official code).
NUM_MIXING_BASES = 8


class GaussianBasis(nn.Module):
    """Distances ``[E]`` -> Gaussians ``[E, G]``: ``exp(coeff (d - mu_k)^2)``, centres
    ``mu = linspace(0, cutoff, G)`` (the buffer ``offset``), ``coeff = -0.5 / (w (mu_1 - mu_0))^2``
    with ``w = basis_width_scalar``.

    The centres are created in float32, as the official model computes and saves them, so a
    model moved to float64 keeps float32-rounded centres (as the official float64 runs, which
    load them from float32 checkpoints); the width comes from ``linspace`` in the distances'
    dtype, as the official model computes it at construction in its run dtype.
    """

    def __init__(self, cutoff: float, num_gaussians: int, width_scalar: float) -> None:
        super().__init__()
        self.cutoff, self.num_gaussians, self.width_scalar = float(cutoff), int(num_gaussians), float(width_scalar)
        self.register_buffer("offset", torch.linspace(0.0, self.cutoff, self.num_gaussians, dtype=torch.float32))
        self._coeff: dict[torch.dtype, float] = {}

    def coefficient(self, dtype: torch.dtype) -> float:
        """``-0.5 / (w * spacing)^2`` with the spacing of ``linspace`` in ``dtype``."""
        if dtype not in self._coeff:
            mu = torch.linspace(0.0, self.cutoff, self.num_gaussians, dtype=dtype)
            self._coeff[dtype] = -0.5 / (self.width_scalar * (mu[1] - mu[0])).item() ** 2
        return self._coeff[dtype]

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        shifted = distance.view(-1, 1) - self.offset.to(distance.dtype).view(1, -1)
        return torch.exp(self.coefficient(distance.dtype) * torch.pow(shifted, 2))


class EdgeDistanceEmbedding(nn.Module):
    """Edge lengths ``[E]`` -> features ``[E, M]``: each (source, target) element pair scales
    its distances by a learned factor in ``[1/scalar_max, scalar_max]`` and shifts them
    (``scale_distances``), then Gaussians and a linear layer."""

    def __init__(
        self, basis: GaussianBasis, out_channels: int, max_num_elements: int, scalar_max: float, scale_distances: bool
    ) -> None:
        super().__init__()
        self.basis = basis
        self.max_num_elements = int(max_num_elements)
        self.log_scalar_max = math.log(scalar_max)
        self.scale_distances = bool(scale_distances)
        if self.scale_distances:
            self.pair_scale = nn.Embedding(self.max_num_elements**2, 1)
            self.pair_shift = nn.Embedding(self.max_num_elements**2, 1)
            nn.init.uniform_(self.pair_scale.weight, -0.0001, 0.0001)
            nn.init.uniform_(self.pair_shift.weight, -0.0001, 0.0001)
        self.linear = nn.Linear(basis.num_gaussians, out_channels)

    def forward(self, distance: torch.Tensor, source_element: torch.Tensor, target_element: torch.Tensor) -> torch.Tensor:
        if self.scale_distances:
            pair = source_element * self.max_num_elements + target_element
            scale = torch.exp(self.log_scalar_max * (2.0 * torch.sigmoid(self.pair_scale(pair).view(-1)) - 1.0))
            distance = scale * distance + self.pair_shift(pair).view(-1)
        return self.linear(self.basis(distance))


class ElementMixingMLP(nn.Module):
    """``x [R, in]`` -> ``[R, out]``: an MLP whose hidden layer has ``NUM_MIXING_BASES``
    versions, mixed by softmax weights chosen by a source and a target element (the official
    ``EmbeddingBlock``)::

        w = softmax(basis_weights([source_embedding[a]; target_embedding[b]]))    # [R, B]
        h = silu(basis_linear(silu(input_linear(x))))                             # [R, B * M]
        out = output_linear(sum_b w_b h_b)
    """

    def __init__(
        self, in_channels: int, out_channels: int, mid_channels: int, embedding_size: int, max_num_elements: int,
        num_bases: int = NUM_MIXING_BASES,
    ) -> None:
        super().__init__()
        self.num_bases, self.mid_channels = int(num_bases), int(mid_channels)
        self.input_linear = nn.Linear(in_channels, mid_channels)
        self.basis_linear = nn.Linear(mid_channels, num_bases * mid_channels)
        self.output_linear = nn.Linear(mid_channels, out_channels)
        self.source_embedding = nn.Embedding(max_num_elements, embedding_size)
        self.target_embedding = nn.Embedding(max_num_elements, embedding_size)
        nn.init.uniform_(self.source_embedding.weight, -0.0001, 0.0001)
        nn.init.uniform_(self.target_embedding.weight, -0.0001, 0.0001)
        self.basis_weights = nn.Linear(2 * embedding_size, num_bases)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, source_element: torch.Tensor, target_element: torch.Tensor) -> torch.Tensor:
        elements = torch.cat([self.source_embedding(source_element), self.target_embedding(target_element)], dim=1)
        weights = torch.softmax(self.basis_weights(elements), dim=1)
        h = self.act(self.basis_linear(self.act(self.input_linear(x))))
        h = (h.view(-1, self.num_bases, self.mid_channels) * weights.view(-1, self.num_bases, 1)).sum(dim=1)
        return self.output_linear(h)


class SpinConvolution(nn.Module):
    """Messages ``[E, C]`` splatted on S spheres -> a roll-invariant feature ``[S, M]``.

    ``"fullconv"``: the grid ``[S, C, lat, lon]`` as ``C * lat`` channels along longitude, a
    circular convolution over the whole longitude (kernel ``lon``, ``C // 8`` groups), SiLU,
    the mean over the ``lon`` distinct shifts (a roll by whole cells permutes them: invariant).
    ``"rotspharmwd"``: the grid's spherical-harmonic coefficients (degree <= ``lmax``, e3nn's
    ``FromS2Grid``), an MLP on them summed over the ``lon`` rolls by ``2 pi / lon`` about the
    pole (Wigner-D). Both end in a GroupNorm (``C // 8`` groups).
    """

    def __init__(self, in_channels: int, out_channels: int, lat: int, lon: int, message: str, lmax: int | bool) -> None:
        super().__init__()
        self.in_channels, self.lat, self.lon, self.message = int(in_channels), int(lat), int(lon), message
        groups = self.in_channels // 8
        self.act = nn.SiLU()
        if message == "fullconv":
            self.conv = nn.Conv1d(
                self.in_channels * lat, out_channels, lon, groups=groups, padding=lon // 2, padding_mode="circular"
            )
        elif message == "rotspharmwd":
            from e3nn import o3

            lmax = int(lmax)
            self.to_harmonics = o3.FromS2Grid((lat, lon), lmax)
            self.num_harmonics = (lmax + 1) ** 2
            self.harmonics_linear = nn.Linear(self.in_channels * self.num_harmonics, out_channels)
            # D(roll by 2 pi k / lon)^k for k = 0..lon-1 (the official code applies D once per step)
            step = torch.block_diag(
                *[o3.wigner_D(l, torch.tensor(2 * math.pi / lon, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                              torch.tensor(0.0, dtype=torch.float64)) for l in range(lmax + 1)]
            )
            powers = [torch.eye(self.num_harmonics, dtype=torch.float64)]
            for _ in range(lon - 1):
                powers.append(step @ powers[-1])
            self.register_buffer("rolls", torch.stack(powers), persistent=False)
        else:
            raise ValueError(f"sphere message must be 'fullconv' or 'rotspharmwd', got {message!r}")
        self.norm = nn.GroupNorm(groups, out_channels)

    def project(self, x: torch.Tensor, splat: SphereSplat) -> torch.Tensor:
        """Bilinear splat of the rows ``x[splat.source]`` onto the grids: ``[S, C, lat, lon]``."""
        cells = self.lat * self.lon
        grid = torch.zeros(splat.num_spheres * cells, x.shape[1], dtype=x.dtype, device=x.device)
        values = x[splat.source]
        for corner in range(4):  # in place on a fresh tensor: autograd needs none of its values
            grid.index_add_(0, splat.index[corner], values * splat.weight[corner].view(-1, 1).to(x.dtype))
        grid = grid.view(splat.num_spheres, cells, x.shape[1]).transpose(1, 2)
        return grid.reshape(splat.num_spheres, x.shape[1], self.lat, self.lon)

    def circular_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """The convolution as one matrix per group, ``[G, Cg * lon, Og * lon]``: a circular
        convolution whose kernel spans the whole period is ``out[o, t] = sum_{c, j}
        W[o, c, (j - t + pad) mod lon] x[c, j]`` (pad = lon // 2, the official padding; its
        first ``lon`` outputs are the ``lon`` distinct shifts)."""
        weight = self.conv.weight.to(dtype)  # [O, Cg, lon]
        out_channels, group_in, lon = weight.shape
        groups = self.conv.groups
        j = torch.arange(lon, device=weight.device).view(-1, 1)
        t = torch.arange(lon, device=weight.device).view(1, -1)
        rolled = weight[:, :, (j - t + lon // 2) % lon]  # [O, Cg, lon(j), lon(t)]
        rolled = rolled.view(groups, out_channels // groups, group_in, lon, lon).permute(0, 2, 3, 1, 4)
        return rolled.reshape(groups, group_in * lon, out_channels // groups * lon)

    def forward(self, x: torch.Tensor, splat: SphereSplat) -> torch.Tensor:
        grid = self.project(x, splat)
        s = splat.num_spheres
        if self.message == "fullconv":
            # nn.Conv1d's grouped circular convolution as a matrix product (the same sums; CPU
            # float64 has no fast grouped convolution)
            weights = self.circular_weights(grid.dtype)
            groups = weights.shape[0]
            h = torch.einsum("sgi,gio->sgo", grid.reshape(s, groups, weights.shape[1]), weights)
            h = h.reshape(s, self.conv.out_channels, self.lon) + self.conv.bias.to(grid.dtype).view(1, -1, 1)
            h = self.act(h).mean(dim=-1)
        else:
            coefficients = self.to_harmonics(grid)  # [S, C, B]
            rolled = torch.einsum("kij,scj->ksci", self.rolls.to(grid.dtype), coefficients)
            h = self.act(self.harmonics_linear(rolled.reshape(self.lon, s, self.harmonics_linear.in_features))).sum(dim=0)
        return self.norm(h)


class MessageBlock(nn.Module):
    """One message update: messages ``[E, C]`` -> ``[E, C]`` from the spin convolution of each
    edge's sphere, the edge's distance features ``[E, M]`` and its elements::

        h = mix_in(spin(x))  + distance_mlp(distance_features)
        out = mix_out(silu(h))
    """

    def __init__(
        self, channels: int, mid_channels: int, embedding_size: int, lat: int, lon: int, max_num_elements: int,
        message: str, lmax: int | bool,
    ) -> None:
        super().__init__()
        self.spin = SpinConvolution(channels, mid_channels, lat, lon, message, lmax)
        self.mix_in = ElementMixingMLP(mid_channels, mid_channels, mid_channels, embedding_size, max_num_elements)
        self.mix_out = ElementMixingMLP(mid_channels, channels, mid_channels, embedding_size, max_num_elements)
        self.distance_mlp = nn.Sequential(nn.Linear(mid_channels, mid_channels), nn.SiLU(), nn.Linear(mid_channels, mid_channels))
        self.act = nn.SiLU()

    def forward(
        self, x: torch.Tensor, distance_features: torch.Tensor, source_element: torch.Tensor,
        target_element: torch.Tensor, splat: SphereSplat,
    ) -> torch.Tensor:
        h = self.mix_in(self.spin(x, splat), source_element, target_element)
        h = self.act(h + self.distance_mlp(distance_features))
        return self.mix_out(h, source_element, target_element)


class ForceBlock(nn.Module):
    """The force-centric output: messages ``[E, C]`` splatted on per-atom spheres (one per atom
    and frame) -> ``[S, 2]``, of which column 0 is the force along the frame's first axis
    (column 1 is unused, as officially)."""

    def __init__(
        self, channels: int, mid_channels: int, embedding_size: int, lat: int, lon: int, max_num_elements: int,
        message: str, lmax: int | bool,
    ) -> None:
        super().__init__()
        self.spin = SpinConvolution(channels, mid_channels, lat, lon, message, lmax)
        self.mix_in = ElementMixingMLP(mid_channels, mid_channels, mid_channels, embedding_size, max_num_elements)
        self.mix_out = ElementMixingMLP(mid_channels, 2, mid_channels, embedding_size, max_num_elements)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, element: torch.Tensor, splat: SphereSplat) -> torch.Tensor:
        h = self.mix_in(self.spin(x, splat), element, element)
        return self.mix_out(self.act(h), element, element)
