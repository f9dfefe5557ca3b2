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
from ..so3.harmonics import (
    grouped_reduced_coefficients,
    num_coefficients,
    reduced_coefficients,
    spherical_harmonics,
)
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


class _GatherRotate(torch.autograd.Function):
    """``out[e] = D[e] @ x[index[e]]`` without keeping the gathered ``x[index]`` for backward.

    The gathered tensor is ``[E, (L+1)^2, C]``, the largest per-edge tensor of a layer; autograd
    of ``bmm(D, x[index])`` would keep one per call. Here only ``D``, ``x`` and ``index`` (alive
    anyway) are saved and the gather is redone in backward. The backward is written with
    differentiable operations, so double backward (training with conservative forces) works.
    """

    @staticmethod
    def forward(ctx, wigner: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(wigner, x, index)
        return torch.bmm(wigner, x[index])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        wigner, x, index = ctx.saved_tensors
        grad_wigner = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_wigner = torch.bmm(grad, x[index].transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_x = torch.zeros_like(x).index_add(0, index, torch.bmm(wigner.transpose(1, 2), grad))
        return grad_wigner, grad_x, None


def gather_rotate(wigner: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[E, K, B] @ x[index]`` with ``x [N, B, C]``, ``index [E]`` -> ``[E, K, C]``."""
    return _GatherRotate.apply(wigner, x, index)


class MessageBlock(nn.Module):
    """Messages of one resolution (paper eq. 2 with taps, eqs. 6-9).

    For each edge s -> t: rotate x_s and x_t into the edge frame keeping |m| <= mmax, evaluate
    F_e at every tap roll, combine the taps, rotate back.

    Parameters keep the official layouts (``edge_in`` columns ordered (source/target,
    coefficient, channel) over :func:`reduced_coefficients`; ``edge_out`` rows (coefficient,
    channel)). Internally the coefficients are ordered by :func:`grouped_reduced_coefficients`
    (``self.kept``; the Wigner rows passed in must follow it), which makes the taps cheap:
    a roll by phi maps the (l, -m), (l, m) pair to (c x_- - s x_+, s x_- + c x_+) with
    c = cos(m phi), s = sin(m phi), so ``edge_in`` at tap t is

        W x_t = W_0 x_0 + sum_m [cos(m phi_t) (W_-m x_-m + W_m x_m) + sin(m phi_t) (W_m x_-m - W_-m x_m)]

    i.e. 1 + 2 mmax products with column blocks instead of 4 mmax products with all columns.
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
        self.kept = grouped_reduced_coefficients(lmax, mmax)
        official = reduced_coefficients(lmax, mmax)
        position = {index: k for k, index in enumerate(official)}
        self.register_buffer(
            "official_position", torch.tensor([position[i] for i in self.kept]), persistent=False
        )
        kept = len(self.kept)
        # column blocks of the grouped coefficients: m = 0, then (-m, +m) for m = 1..mmax
        self.group_sizes = [lmax + 1] + [lmax + 1 - m for m in range(1, mmax + 1)]
        self.taps = TapCombiner(lmax, mmax, num_taps, coefficients=self.kept)
        self.edge_gate = nn.Linear(num_basis, hidden_channels)
        self.edge_in = nn.Linear(2 * kept * channels, hidden_channels)
        self.hidden = nn.Linear(hidden_channels, hidden_channels)
        self.edge_out = nn.Linear(hidden_channels, kept * channels)
        # A module (not a function) so that tests can make F_e linear and check exact symmetries.
        self.activation: nn.Module = nn.SiLU()

    def _input_weight(self) -> torch.Tensor:
        """``edge_in.weight`` with columns in the internal order (coefficient, source/target,
        channel): ``[H, K * 2 * C']``."""
        h, k, c = self.hidden_channels, len(self.kept), self.channels
        weight = self.edge_in.weight.view(h, 2, k, c)[:, :, self.official_position]
        return weight.transpose(1, 2).reshape(h, 2 * k * c)

    def _tap_inputs(self, pair: torch.Tensor) -> torch.Tensor:
        """``edge_in`` at every tap: ``[E, K * 2 * C']`` -> ``[E, T, H]`` (before activation)."""
        weight, bias = self._input_weight(), self.edge_in.bias
        width = 2 * self.channels  # columns per coefficient
        if self.taps.num_taps == 1:
            return nn.functional.linear(pair, weight, bias).unsqueeze(1)
        n0 = self.group_sizes[0] * width
        terms = [nn.functional.linear(pair[:, :n0], weight[:, :n0], bias)]
        start = n0
        for size in self.group_sizes[1:]:
            n = size * width
            w_minus, w_plus = weight[:, start : start + n], weight[:, start + n : start + 2 * n]
            block = torch.cat(
                [torch.cat([w_minus, w_plus], dim=1), torch.cat([w_plus, -w_minus], dim=1)], dim=0
            )
            both = nn.functional.linear(pair[:, start : start + 2 * n], block)  # [E, 2H]: A_m, B_m
            terms.extend(both.chunk(2, dim=1))
            start += 2 * n
        terms = torch.stack(terms, dim=1)  # [E, 1 + 2 mmax, H]
        return torch.matmul(self.taps.harmonic_weights.to(terms.dtype), terms)

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
            wigner: ``[E, K, (L+1)^2]`` rows ``self.kept`` of each edge frame's Wigner-D.

        Returns:
            ``[E, (L+1)^2, C']`` messages in the global frame.
        """
        num_edges = edge_index.shape[1]
        k, c = len(self.kept), self.channels
        act = self.activation
        gate = act(self.edge_gate(edge_features))
        rotated = torch.stack(
            [gather_rotate(wigner, x, edge_index[0]), gather_rotate(wigner, x, edge_index[1])], dim=2
        )  # [E, K, 2, C']
        h = act(self._tap_inputs(rotated.reshape(num_edges, k * 2 * c)))  # [E, T, H]
        h = h * gate.unsqueeze(1)
        h = act(self.hidden(h))
        out_weight = self.edge_out.weight.view(k, c, -1)[self.official_position].reshape(k * c, -1)
        out_bias = self.edge_out.bias.view(k, c)[self.official_position].reshape(k * c)
        out = act(nn.functional.linear(h, out_weight, out_bias)).view(num_edges, self.taps.num_taps, k, c)
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
