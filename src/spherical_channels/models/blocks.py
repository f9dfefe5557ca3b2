"""The blocks of a Spherical Channel Network layer (paper section 2, Fig. 2).

Shapes: N atoms, E edges, G = distance expansion size, B = ``num_basis_functions``,
C = ``sphere_channels``,
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
from .ops import rotate_scatter, rotated_linears, sample_grid, sample_silu_linear, silu_linear

__all__ = ["EdgeEmbedding", "MessageBlock", "InteractionBlock", "OutputMLP", "SphereSampler"]


class EdgeEmbedding(nn.Module):
    """Rotation-invariant edge features from distance and both atomic numbers.

    ``SiLU(Linear(SiLU(Linear(expanded distance) + emb_src(z_s) + emb_tgt(z_t))))``:
    ``[E, G]`` expanded distances -> ``[E, B]``.
    """

    def __init__(self, *, num_expansion: int, num_basis: int, max_num_elements: int) -> None:
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


def act_linear(
    activation: nn.Module,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    output_activation: bool = False,
) -> torch.Tensor:
    """``linear(activation(x) * scale, weight, bias)`` (then ``activation`` again if
    ``output_activation``); with SiLU, the memory-lean fused form.

    The activation is a module so that tests can swap it (``nn.Identity`` makes a block linear
    and its symmetries exact).
    """
    if type(activation) is nn.SiLU:
        return silu_linear(x, weight, bias, scale, output_silu=output_activation)
    a = activation(x)
    out = nn.functional.linear(a if scale is None else a * scale, weight, bias)
    return activation(out) if output_activation else out


class MessageBlock(nn.Module):
    """Messages of one resolution, summed at their targets (paper eq. 2 with taps, eqs. 6-9).

    For each edge s -> t: rotate x_s and x_t into the edge frame keeping |m| <= mmax, evaluate
    F_e at every tap roll, combine the taps, rotate back, and sum at t.

    Parameters keep the official layouts (``edge_in`` columns ordered (source/target,
    coefficient, channel) over :func:`reduced_coefficients`; ``edge_out`` rows (coefficient,
    channel)). Internally the coefficients are ordered by :func:`grouped_reduced_coefficients`
    (``self.kept``; the Wigner rows passed in must follow it), which makes the taps cheap:
    a roll by phi maps the (l, -m), (l, m) pair to (c x_- - s x_+, s x_- + c x_+) with
    c = cos(m phi), s = sin(m phi), so ``edge_in`` at tap t is

        W x_t = W_0 x_0 + sum_m [cos(m phi_t) (W_-m x_-m + W_m x_m) + sin(m phi_t) (W_m x_-m - W_-m x_m)]

    i.e. 1 + 2 mmax products with column blocks instead of 4 mmax products with all columns.

    With ``scalar_input=True`` (SCN's first layer, whose input is an embedding of degree 0
    only) the rotated input is ``(x_0, 0, ..., 0)`` for every tap, so F_e is evaluated once and
    only the output rows the tap combination keeps are computed (the m = 0 rows for equally
    spaced taps). The result is the same as the general path, up to rounding.
    """

    def __init__(
        self,
        *,
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
        # column blocks of the grouped coefficients: m = 0, then (-m, +m) for m = 1..mmax
        self.group_sizes = [lmax + 1] + [lmax + 1 - m for m in range(1, mmax + 1)]
        self.taps = TapCombiner(lmax, mmax, num_taps, coefficients=self.kept)
        self.edge_gate = nn.Linear(num_basis, hidden_channels)
        self.edge_in = nn.Linear(2 * len(self.kept) * channels, hidden_channels)
        self.hidden = nn.Linear(hidden_channels, hidden_channels)
        self.edge_out = nn.Linear(hidden_channels, len(self.kept) * channels)
        self.activation: nn.Module = nn.SiLU()

    def _input_weight(self) -> torch.Tensor:
        """``edge_in.weight`` with columns in the internal order (coefficient, source/target,
        channel): ``[H, K * 2 * C']``."""
        h, k, c = self.hidden_channels, len(self.kept), self.channels
        weight = self.edge_in.weight.view(h, 2, k, c)[:, :, self.official_position]
        return weight.transpose(1, 2).reshape(h, 2 * k * c)

    def _output_weight(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``edge_out`` weight ``[R * C', H]`` and bias ``[R * C']`` for internal rows ``rows``
        (default: all K), in the internal order."""
        k, c = len(self.kept), self.channels
        position = self.official_position if rows is None else self.official_position[rows]
        weight = self.edge_out.weight.view(k, c, -1)[position].reshape(len(position) * c, -1)
        bias = self.edge_out.bias.view(k, c)[position].reshape(-1)
        return weight, bias

    def _tap_inputs(
        self, x: torch.Tensor, wigner: torch.Tensor, source: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """``edge_in`` at every tap of the rotated end points: ``[E, T, H]`` (before activation)."""
        weight, bias = self._input_weight(), self.edge_in.bias
        width = 2 * self.channels  # columns per coefficient
        if self.taps.num_taps == 1:
            (h,) = rotated_linears(wigner, x, source, target, [(0, weight.shape[1])], [weight], [bias])
            return h.unsqueeze(1)
        n0 = self.group_sizes[0] * width
        spans, weights, biases = [(0, n0)], [weight[:, :n0]], [bias]
        start = n0
        for size in self.group_sizes[1:]:
            n = size * width
            w_minus, w_plus = weight[:, start : start + n], weight[:, start + n : start + 2 * n]
            # one product gives A_m = W_-m x_-m + W_m x_m and B_m = W_m x_-m - W_-m x_m
            weights.append(torch.cat([torch.cat([w_minus, w_plus], dim=1), torch.cat([w_plus, -w_minus], dim=1)], dim=0))
            spans.append((start, start + 2 * n))
            biases.append(None)
            start += 2 * n
        terms = rotated_linears(wigner, x, source, target, spans, weights, biases)
        h = terms[0].unsqueeze(1)  # [E, 1, H]
        tap_weights = self.taps.harmonic_weights.to(h.dtype).unsqueeze(-1)  # [T, 1 + 2 mmax, 1]
        for m, both in enumerate(terms[1:], start=1):
            a_m, b_m = both.unsqueeze(1).chunk(2, dim=2)
            h = torch.addcmul(h, tap_weights[:, 2 * m - 1], a_m)  # + cos(m phi_t) A_m
            h = torch.addcmul(h, tap_weights[:, 2 * m], b_m)  # + sin(m phi_t) B_m
        return h

    def forward(
        self,
        x: torch.Tensor,
        edge_features: torch.Tensor,
        edge_index: torch.Tensor,
        wigner: torch.Tensor,
        scalar_input: bool = False,
        edge_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[N, (L+1)^2, C']`` node coefficients (this resolution's degrees only).
            edge_features: ``[E, B]`` invariant edge features.
            edge_index: ``[2, E]`` (source, target).
            wigner: ``[E, K, (L+1)^2]`` rows ``self.kept`` of each edge frame's Wigner-D.
            scalar_input: ``x`` is zero above degree 0 (see the class docstring).
            edge_weight: ``[E]`` factor of each message (the smooth variant's envelope and
                switches); ``None``: 1.

        Returns:
            ``[N, (L+1)^2, C']`` sum of the messages arriving at each node, global frame.
        """
        num_edges, num_nodes = edge_index.shape[1], x.shape[0]
        source, target = edge_index
        k, c = len(self.kept), self.channels
        act = self.activation
        gate = act(self.edge_gate(edge_features)).unsqueeze(1)  # [E, 1, H]
        if scalar_input:
            # D_00 = 1 and D_k0 = 0 otherwise: the rotated input is (x_0, 0, ...) at every tap.
            pair = torch.cat([x[source, 0], x[target, 0]], dim=1)  # [E, 2C']
            h = nn.functional.linear(pair, self._input_weight()[:, : 2 * c], self.edge_in.bias)
            h = h.unsqueeze(1)  # [E, 1, H]
            rows = self.taps.identical_taps_rows
            out_weight, out_bias = self._output_weight(rows)
        else:
            h = self._tap_inputs(x, wigner, source, target)  # [E, T, H]
            out_weight, out_bias = self._output_weight()
        h = act_linear(act, h, self.hidden.weight, self.hidden.bias, scale=gate)
        out = act_linear(act, h, out_weight, out_bias, output_activation=True)  # [E, T, R * C']
        if scalar_input:
            combined = self.taps.combine_identical_taps(out.view(num_edges, len(rows), c))
            wigner = wigner.index_select(1, rows)
        else:
            combined = self.taps.combine_taps(out.view(num_edges, self.taps.num_taps, k, c))
        if edge_weight is not None:
            combined = combined * edge_weight.to(combined.dtype).view(-1, 1, 1)
        return rotate_scatter(wigner, combined, target, num_nodes)


class InteractionBlock(nn.Module):
    """One SCN layer: edge features, messages per resolution, summation, 1x1 grid aggregation.

    Maps ``[N, (L+1)^2, C]`` -> ``[N, (L+1)^2, C]`` (the update; the caller adds the residual).
    """

    def __init__(
        self,
        *,
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
        self.edge_embedding = EdgeEmbedding(num_expansion=num_expansion, num_basis=num_basis, max_num_elements=max_num_elements)
        self.message_blocks = nn.ModuleList(
            MessageBlock(
                lmax=lmax, mmax=mmax, num_taps=num_taps, channels=sphere_channels_reduce,
                hidden_channels=hidden, num_basis=num_basis,
            )
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

    def _mix_channels(self, x: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        """The first 1x1 layer's channel mixing, applied before sampling: ``[N, (L+1)^2, C']``
        twice -> ``[(L+1)^2, N, F]``, so that sampling the result gives the layer's output
        (without its bias) at every grid point.

        Sampling is linear, so mixing coefficients then sampling equals sampling then mixing,
        with several times fewer operations; and the bands merge here: band b reads the first
        ``band_coefficients[b]`` coefficients through the same sampling matrix.
        """
        c, first = self.channels, self.grid_mlp[0]
        bands = self.grid.num_bands
        both = torch.cat([x, summed], dim=2).transpose(0, 1)  # [(L+1)^2, N, 2C']
        # first.weight columns: (x: band, channel), then (summed: band, channel)
        weight = first.weight.view(-1, 2, bands, c)
        per_band = [weight[:, :, b].reshape(-1, 2 * c) for b in range(bands)]  # [F, 2C'] each
        pieces, start = [], 0
        for b in reversed(range(bands)):  # coefficient ranges read by bands 0..b
            stop = self.grid.band_coefficients[b]
            if stop > start:
                pieces.append(nn.functional.linear(both[start:stop], sum(per_band[: b + 1])))
            start = stop
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def aggregate(self, x: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
        """Pointwise 1x1 network on the sphere (paper eq. 10): ``[N, (L+1)^2, C']`` twice -> once.

        Grid tensors are point-major ``[P, N, features]`` so that sampling and projecting back
        are single matrix products.
        """
        mlp = self.grid_mlp
        mixed = self._mix_channels(x, summed)  # [(L+1)^2, N, F]
        sample = self.grid.sample_matrix.to(mixed.dtype)
        if type(mlp[1]) is nn.SiLU:
            h = sample_silu_linear(mixed, sample, mlp[0].bias, mlp[2].weight, mlp[2].bias)
        else:
            h = act_linear(mlp[1], sample_grid(mixed, sample, mlp[0].bias), mlp[2].weight, mlp[2].bias)
        h = act_linear(mlp[3], h, mlp[4].weight, mlp[4].bias)  # [P, N, C']
        num_points, num_nodes, c = h.shape
        out = torch.mm(self.grid.from_matrix.to(h.dtype), h.reshape(num_points, num_nodes * c))
        return out.view(-1, num_nodes, c).transpose(0, 1)

    def forward(
        self,
        x: torch.Tensor,
        expanded_distance: torch.Tensor,
        atomic_numbers: torch.Tensor,
        edge_index: torch.Tensor,
        groups: list[tuple[slice, torch.Tensor]],
        scalar_input: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[N, (L+1)^2, C]`` node coefficients.
            expanded_distance: ``[E, G]`` distance expansion of every edge.
            atomic_numbers: ``[N]``.
            edge_index: ``[2, E]`` (source, target), edges grouped by resolution.
            groups: per resolution, ``(edge slice, wigner [E_r, K_r, (L_r+1)^2], weight [E_r]
                or None)``.
            scalar_input: ``x`` is zero above degree 0 (the first layer).

        Returns:
            ``[N, (L+1)^2, C]`` update.
        """
        edge_features = self.edge_embedding(
            expanded_distance, atomic_numbers[edge_index[0]], atomic_numbers[edge_index[1]]
        )
        x_down = self.downsample(x) if self.resample else x
        summed = None
        for block, (edges, wigner, weight) in zip(self.message_blocks, groups):
            message = block(
                x_down[:, : block.num_coefficients],
                edge_features[edges],
                edge_index[:, edges],
                wigner,
                scalar_input=scalar_input,
                edge_weight=weight,
            )
            missing = x_down.shape[1] - block.num_coefficients  # a lower-degree resolution
            if missing:
                message = nn.functional.pad(message, (0, 0, 0, missing))
            summed = message if summed is None else summed + message
        out = self.aggregate(x_down, summed) if self.use_grid else summed
        return self.upsample(out) if self.resample else out


class OutputMLP(nn.Sequential):
    """Three-layer pointwise network ``C -> C -> C' -> 1`` with SiLU (energy or force head)."""

    def __init__(self, *, channels: int, reduced_channels: int) -> None:
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

    def __init__(self, *, lmax: int, num_points: int, weighting: str = "fairchem") -> None:
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
