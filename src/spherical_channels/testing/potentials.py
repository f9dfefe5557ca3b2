"""A cheap analytic potential in torch with the model interface, for testing what runs on models.

Relaxation engines, MD integrators and calculators take any model that maps an
:class:`~spherical_channels.data.batch.AtomicBatch` to ``{"energy": [S], "forces": [N, 3]}``
(and ``"stress": [S, 3, 3]`` with ``stress=True``). :class:`MorsePotential` is such a model whose
energy surface is smooth and known in closed form, so a test can check an algorithm against ASE
without a trained network, in float64, in milliseconds.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.batch import AtomicBatch
from ..data.neighbors import build_graph, edge_vectors
from ..models.response import compute_response

__all__ = ["MorsePotential"]


class MorsePotential(nn.Module):
    """Pair potential ``E = sum_{i<j} D (exp(-2a(r-r0)) - 2 exp(-a(r-r0))) * f(r)``, one
    parameter set for every element.

    ``f`` is a smooth switch, 1 below ``cutoff - width`` and 0 at ``cutoff`` with zero first
    and second derivatives at both ends, so forces and their derivatives are continuous.
    Forces are ``-dE/dx`` and stress the strain derivative (:func:`compute_response`), so the
    model is ``conservative``. Nothing is trained: the parameters are buffers.

    Args:
        depth: D, eV. r0: equilibrium distance, Å. alpha: a, 1/Å.
        cutoff, width: the switching band ``[cutoff - width, cutoff]``, Å.
    """

    conservative = True
    regress_forces = True

    def __init__(
        self, depth: float = 0.3, r0: float = 2.6, alpha: float = 1.5, cutoff: float = 5.0, width: float = 1.0
    ) -> None:
        super().__init__()
        if not 0 < width <= cutoff:
            raise ValueError(f"need 0 < width <= cutoff, got width={width}, cutoff={cutoff}")
        # buffers, so that ``.to(dtype)`` says which precision the potential runs in
        self.register_buffer("depth", torch.tensor(float(depth)))
        self.register_buffer("r0", torch.tensor(float(r0)))
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.cutoff, self.width = float(cutoff), float(width)
        self.eval()  # nothing trains; eval mode keeps the outputs free of a derivative graph

    def _switch(self, r: torch.Tensor) -> torch.Tensor:
        t = ((r - (self.cutoff - self.width)) / self.width).clamp(0.0, 1.0)
        return 1.0 - t * t * t * (10.0 - 15.0 * t + 6.0 * t * t)  # smoothstep, C2

    def energy_terms(
        self, batch: AtomicBatch, positions: torch.Tensor, cell: torch.Tensor, graph: object | None
    ) -> dict[str, torch.Tensor]:
        """Energy ``[S]`` at ``positions`` ``[N, 3]`` and ``cell`` ``[S, 3, 3]``."""
        if graph is None:
            graph = build_graph(batch, self.cutoff, max_num_neighbors=1 << 30)
        r = edge_vectors(positions, cell, batch.batch, graph).norm(dim=-1)
        x = torch.exp(-self.alpha * (r - self.r0))
        pair = self.depth * (x * x - 2.0 * x) * self._switch(r)
        # every pair appears as two directed edges
        energy = positions.new_zeros(batch.num_structures).index_add(0, batch.batch[graph.edge_index[1]], 0.5 * pair)
        return {"energy": energy}

    def forward(self, batch: AtomicBatch, graph: object | None = None, stress: bool = False) -> dict[str, torch.Tensor]:
        """``{"energy": [S], "forces": [N, 3]}`` and, with ``stress``, ``"stress": [S, 3, 3]``."""
        return compute_response(self, batch, graph=graph, stress=stress, create_graph=self.training)
