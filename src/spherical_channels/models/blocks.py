"""The blocks of a Spherical Channel Network layer (paper section 2, Fig. 2).

Shapes: N atoms, E edges, B = ``num_basis_functions``, C = ``sphere_channels``,
C' = ``sphere_channels_reduce``, H = hidden channels of a resolution, K = number of kept
coefficients (|m| <= mmax) of a resolution, T = taps, P = grid or sphere points.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import silu

from ..so3.constants import ConstantsModule
from ..so3.grid import SphericalGrid
from ..so3.harmonics import num_coefficients, reduced_coefficients, spherical_harmonics
from ..so3.sphere_points import density_weights, fibonacci_points
from ..so3.taps import TapCombiner

__all__ = ["EdgeEmbedding", "MessageBlock", "InteractionBlock", "OutputMLP", "SphereSampler"]


class EdgeEmbedding(nn.Module):
    """Rotation-invariant edge features from distance and both atomic numbers.

    ``SiLU(Linear(SiLU(Linear(expanded distance) + emb_src(z_s) + emb_tgt(z_t))))``:
    ``[E, G]`` expanded distances -> ``[E, B]``.
    """

    def __init__(self, num_expansion: int, num_basis: int, max_num_elements: int) -> None:
        super().__init__()
        self.distance_linear = nn.Linear(num_expansion, num_basis)
        self.source_embedding = nn.Embedding(max_num_elements, num_basis)
        self.target_embedding = nn.Embedding(max_num_elements, num_basis)
        nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
        nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)
        self.mix = nn.Linear(num_basis, num_basis)

    def forward(
        self, expanded: torch.Tensor, source_z: torch.Tensor, target_z: torch.Tensor
    ) -> torch.Tensor:
        h = self.distance_linear(expanded) + self.source_embedding(source_z) + self.target_embedding(target_z)
        return silu(self.mix(silu(h)))


class MessageBlock(nn.Module):
    """Messages of one resolution (paper eq. 2 with taps, eqs. 6-9).

    For each edge s -> t: rotate x_s and x_t into the edge frame keeping |m| <= mmax, evaluate
    F_e at every tap roll, combine the taps, rotate back.
    """

    def __init__(
        self,
        lmax: int,
        mmax: int,
        num_taps: int,
        channels: int,
        hidden_channels: int,
        num_basis: int,
    ) -> None:
        super().__init__()
        self.lmax, self.mmax = lmax, mmax
        self.channels, self.hidden_channels = channels, hidden_channels
        self.num_coefficients = num_coefficients(lmax)
        self.kept = reduced_coefficients(lmax, mmax)
        kept = len(self.kept)
        self.taps = TapCombiner(lmax, mmax, num_taps)
        self.edge_gate = nn.Linear(num_basis, hidden_channels)
        self.edge_in = nn.Linear(2 * kept * channels, hidden_channels)
        self.hidden = nn.Linear(hidden_channels, hidden_channels)
        self.edge_out = nn.Linear(hidden_channels, kept * channels)
        # A module (not a function) so that tests can make F_e linear and check exact symmetries.
        self.activation: nn.Module = nn.SiLU()

    def _tap_input_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``edge_in`` applied after each tap's roll, folded into one ``[T*H, 2*K*C']`` weight.

        Rolling the rotated coefficients by tap t is the constant map ``tap_wigner[t]``, so
        ``W (D_t x) = (W D_t) x``: one matrix product serves all taps and the rotation itself is
        done once per edge instead of once per tap.
        """
        h, k, c = self.hidden_channels, len(self.kept), self.channels
        weight = self.edge_in.weight.view(h, 2, k, c)
        tap_wigner = self.taps.tap_wigner.to(weight.dtype)
        folded = torch.einsum("hsjc,tji->thsic", weight, tap_wigner)
        bias = self.edge_in.bias.repeat(self.taps.num_taps)
        return folded.reshape(self.taps.num_taps * h, 2 * k * c), bias

    def forward(
        self,
        x: torch.Tensor,
        edge_features: torch.Tensor,
        edge_index: torch.Tensor,
        wigner: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[N, (L+1)^2, C']`` node coefficients (this resolution's degrees only).
            edge_features: ``[E, B]`` invariant edge features.
            edge_index: ``[2, E]`` (source, target).
            wigner: ``[E, K, (L+1)^2]`` kept rows of each edge frame's Wigner-D.

        Returns:
            ``[E, (L+1)^2, C']`` messages in the global frame.
        """
        num_edges = edge_index.shape[1]
        taps = self.taps.num_taps
        act = self.activation
        gate = act(self.edge_gate(edge_features))
        rotated_source = torch.bmm(wigner, x[edge_index[0]])
        rotated_target = torch.bmm(wigner, x[edge_index[1]])
        pair = torch.cat([rotated_source.flatten(1), rotated_target.flatten(1)], dim=1)
        if taps == 1:
            h = act(self.edge_in(pair)).view(num_edges, 1, self.hidden_channels)
        else:
            weight, bias = self._tap_input_weights()
            h = act(nn.functional.linear(pair, weight, bias)).view(num_edges, taps, self.hidden_channels)
        h = h * gate.unsqueeze(1)
        h = act(self.hidden(h))
        out = act(self.edge_out(h)).view(num_edges, taps, len(self.kept), self.channels)
        combined = self.taps.combine_taps(out)
        return torch.bmm(wigner.transpose(1, 2), combined)


class InteractionBlock(nn.Module):
    """One SCN layer: edge features, messages per resolution, summation, 1x1 grid aggregation.

    Maps ``[N, (L+1)^2, C]`` -> ``[N, (L+1)^2, C]`` (the update; the caller adds the residual).
    """

    def __init__(
        self,
        lmax_list: list[int],
        mmax: int,
        num_taps: int,
        sphere_channels: int,
        sphere_channels_reduce: int,
        hidden_channels_list: list[int],
        num_expansion: int,
        num_basis: int,
        max_num_elements: int,
        use_grid: bool,
        num_bands: int,
    ) -> None:
        super().__init__()
        self.lmax = lmax_list[0]
        self.sphere_channels, self.channels = sphere_channels, sphere_channels_reduce
        self.edge_embedding = EdgeEmbedding(num_expansion, num_basis, max_num_elements)
        self.message_blocks = nn.ModuleList(
            MessageBlock(lmax, mmax, num_taps, sphere_channels_reduce, hidden, num_basis)
            for lmax, hidden in zip(lmax_list, hidden_channels_list)
        )
        self.resample = sphere_channels != sphere_channels_reduce
        if self.resample:
            # No bias: a bias on non-scalar coefficients would break equivariance.
            self.downsample = nn.Linear(sphere_channels, sphere_channels_reduce, bias=False)
            self.upsample = nn.Linear(sphere_channels_reduce, sphere_channels, bias=False)
        self.use_grid = use_grid
        if use_grid:
            self.grid = SphericalGrid(self.lmax, num_bands)
            width = 2 * num_bands * sphere_channels_reduce
            self.grid_mlp = nn.Sequential(
                nn.Linear(width, width),
                nn.SiLU(),
                nn.Linear(width, 2 * sphere_channels_reduce),
                nn.SiLU(),
                nn.Linear(2 * sphere_channels_reduce, sphere_channels_reduce),
            )

    def aggregate(self, x: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        """Pointwise 1x1 network on the sphere (paper eq. 10): ``[N, (L+1)^2, C']`` twice -> once."""
        samples = torch.cat([self.grid.to_grid(x), self.grid.to_grid(summed)], dim=-1)
        return self.grid.from_grid(self.grid_mlp(samples))

    def forward(
        self,
        x: torch.Tensor,
        expanded_distance: torch.Tensor,
        atomic_numbers: torch.Tensor,
        edge_index: torch.Tensor,
        groups: list[tuple[slice, torch.Tensor]],
    ) -> torch.Tensor:
        """
        Args:
            x: ``[N, (L+1)^2, C]`` node coefficients.
            expanded_distance: ``[E, G]`` distance expansion of every edge.
            atomic_numbers: ``[N]``.
            edge_index: ``[2, E]`` (source, target), edges grouped by resolution.
            groups: per resolution, ``(edge slice, wigner [E_r, K_r, (L_r+1)^2])``.

        Returns:
            ``[N, (L+1)^2, C]`` update.
        """
        num_atoms = x.shape[0]
        edge_features = self.edge_embedding(
            expanded_distance, atomic_numbers[edge_index[0]], atomic_numbers[edge_index[1]]
        )
        x_down = self.downsample(x) if self.resample else x
        summed = torch.zeros_like(x_down)
        for block, (edges, wigner) in zip(self.message_blocks, groups):
            basis = block.num_coefficients
            message = block(x_down[:, :basis], edge_features[edges], edge_index[:, edges], wigner)
            summed[:, :basis] = summed[:, :basis].index_add(0, edge_index[1, edges], message)
        out = self.aggregate(x_down, summed) if self.use_grid else summed
        return self.upsample(out) if self.resample else out


class OutputMLP(nn.Sequential):
    """Three-layer pointwise network ``C -> C -> C' -> 1`` with SiLU (energy or force head)."""

    def __init__(self, channels: int, reduced_channels: int) -> None:
        super().__init__(
            nn.Linear(channels, channels),
            nn.SiLU(),
            nn.Linear(channels, reduced_channels),
            nn.SiLU(),
            nn.Linear(reduced_channels, 1),
        )


class SphereSampler(ConstantsModule):
    """Evaluates node coefficients at the output points (paper eqs. 11-12, section B.2).

    ``weighting="fairchem"`` reproduces the official code: the Fibonacci points are scaled by
    their density weights w_i and the harmonics are evaluated on the scaled points without
    normalisation (degree l picks up w_i^l), and force directions are the scaled points.
    ``weighting="quadrature"`` evaluates at the unit points and uses w_i as quadrature weights.

    Buffers: ``harmonics [P, (L+1)^2]``, ``directions [P, 3]``, ``weights [P]``.
    """

    WEIGHTINGS = ("fairchem", "quadrature")

    def __init__(self, lmax: int, num_points: int, weighting: str = "fairchem") -> None:
        super().__init__()
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"unknown sphere weighting {weighting!r}; expected one of {self.WEIGHTINGS}")
        self.weighting = weighting
        points = fibonacci_points(num_points)
        weights = density_weights(points)
        if weighting == "fairchem":
            scaled = points * weights.unsqueeze(-1)
            self.register_constant("harmonics", spherical_harmonics(lmax, scaled, normalize=False))
            self.register_constant("directions", scaled)
            self.register_constant("weights", torch.ones(num_points, dtype=torch.float64))
        else:
            self.register_constant("harmonics", spherical_harmonics(lmax, points))
            self.register_constant("directions", points)
            self.register_constant("weights", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, (L+1)^2, C]`` -> ``[N, P, C]`` values at the points."""
        return torch.matmul(self.harmonics.to(x.dtype), x)

    def integrate(self, values: torch.Tensor) -> torch.Tensor:
        """Weighted mean over the points: ``[N, P, ...]`` -> ``[N, ...]``."""
        w = self.weights.to(values.dtype).view(1, -1, *([1] * (values.dim() - 2)))
        return (values * w).mean(dim=1)
