"""The Spherical Channel Network (Zitnick et al., NeurIPS 2022).

Data flow: ``AtomicBatch`` -> neighbour graph (cutoff, at most ``max_num_neighbors`` nearest,
periodic images) -> edge vectors, distances and neighbour ranks -> edge frames and their Wigner-D
rows -> ``num_interactions`` layers of message passing on spherical channels -> energy per
structure and forces per atom (direct, or ``-dE/dx`` by autograd).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..data.batch import AtomicBatch
from ..data.neighbors import Graph, build_graph, edge_vectors, neighbor_ranks
from ..so3.frames import edge_frames
from ..so3.harmonics import grouped_reduced_coefficients, num_coefficients
from ..so3.wigner import WignerD
from .basis import make_distance_expansion
from .blocks import InteractionBlock, OutputMLP, SphereSampler
from .ops import no_autocast

__all__ = ["SCN", "EdgeData", "NEAR_NEIGHBOR_RANKS"]

#: Neighbours of rank 0..11 use the full resolution; ranks 12.. the reduced one (paper B.1).
NEAR_NEIGHBOR_RANKS = 12


@dataclass
class EdgeData:
    """Per-edge geometry of a batch, edges grouped by resolution (``resolution_slices``).

    Shapes: ``edge_index [2, E]`` (source, target), ``vectors [E, 3]`` (target -> source image),
    ``distance [E]``, ``rank [E]``, ``frames [E, 3, 3]`` (``frames @ unit(vectors) = +y``).
    """

    edge_index: torch.Tensor
    cell_offsets: torch.Tensor
    vectors: torch.Tensor
    distance: torch.Tensor
    rank: torch.Tensor
    frames: torch.Tensor
    resolution_slices: list[slice]


class SCN(nn.Module):
    """Spherical Channel Network predicting energies and forces.

    Constructor arguments carry the official implementation's names and defaults, so the
    ``model_attributes`` of an official config can be passed as they are. Additions:

    Args:
        direct_forces: ``True``: forces from the force head (as the paper); ``False``: forces are
            ``-dE/dpositions`` by autograd (energy-conserving).
        roll: roll rule of the edge frames in training mode: ``"random"`` (paper) or ``"fixed"``.
        eval_roll: roll rule in eval mode (``"fixed"``: deterministic inference); ``None`` = ``roll``.
        edge_rotation: ``False`` is the paper's "no rotation" ablation (identity frames).
        sphere_weighting: ``"fairchem"`` (official output points) or ``"quadrature"``.
        use_pbc, use_pbc_single, otf_graph, show_timing_info: accepted for config compatibility;
            periodicity comes from each structure's ``pbc`` and the graph is always built here.

    Input: an :class:`~spherical_channels.data.batch.AtomicBatch`. Output: ``{"energy": [S],
    "forces": [N, 3]}`` (forces only if ``regress_forces``).
    """

    def __init__(
        self,
        use_pbc: bool = True,
        use_pbc_single: bool = True,
        regress_forces: bool = True,
        otf_graph: bool = True,
        max_num_neighbors: int = 20,
        cutoff: float = 8.0,
        max_num_elements: int = 90,
        num_interactions: int = 8,
        lmax: int = 6,
        mmax: int = 1,
        num_resolutions: int = 2,
        sphere_channels: int = 128,
        sphere_channels_reduce: int = 128,
        hidden_channels: int = 256,
        num_taps: int = -1,
        use_grid: bool = True,
        num_bands: int = 1,
        num_sphere_samples: int = 128,
        num_basis_functions: int = 128,
        distance_function: str = "gaussian",
        basis_width_scalar: float = 1.0,
        distance_resolution: float = 0.02,
        show_timing_info: bool = False,
        direct_forces: bool = True,
        roll: str = "random",
        eval_roll: str | None = "fixed",
        edge_rotation: bool = True,
        sphere_weighting: str = "fairchem",
    ) -> None:
        super().__init__()
        if not 1 <= lmax <= 10:
            raise ValueError(f"lmax must be in 1..10, got {lmax}")
        if not 0 <= mmax <= lmax:
            raise ValueError(f"mmax must be in 0..lmax={lmax}, got {mmax}")
        if num_resolutions not in (1, 2):
            raise ValueError(f"num_resolutions must be 1 or 2, got {num_resolutions}")
        for name, value in (("roll", roll), ("eval_roll", eval_roll or roll)):
            if value not in ("fixed", "random"):
                raise ValueError(f"{name} must be 'fixed' or 'random', got {value!r}")
        self.config = {
            k: v for k, v in locals().items() if k not in ("self", "__class__", "name", "value")
        }
        self.regress_forces = regress_forces
        self.direct_forces = direct_forces
        self.max_num_neighbors = max_num_neighbors
        self.cutoff = cutoff
        self.max_num_elements = max_num_elements
        self.lmax, self.mmax = lmax, mmax
        self.sphere_channels = sphere_channels
        self.roll, self.eval_roll = roll, eval_roll
        self.edge_rotation = edge_rotation

        if num_resolutions == 2:
            self.lmax_list = [lmax, max(4, lmax - 2)]
            self.hidden_channels_list = [hidden_channels, hidden_channels // 4]
            self.rank_boundaries = [NEAR_NEIGHBOR_RANKS]
        else:
            self.lmax_list, self.hidden_channels_list, self.rank_boundaries = [lmax], [hidden_channels], []
        # A second resolution above the first (lmax < 4) would read coefficients that don't exist.
        self.lmax_list = [min(l, lmax) for l in self.lmax_list]

        self.sphere_embedding = nn.Embedding(max_num_elements, sphere_channels)
        self.distance_expansion = make_distance_expansion(
            distance_function, cutoff, distance_resolution, basis_width_scalar
        )
        self.wigner = nn.ModuleList(
            WignerD(l, rows=grouped_reduced_coefficients(l, mmax)) for l in self.lmax_list
        )
        self.interactions = nn.ModuleList(
            InteractionBlock(
                self.lmax_list,
                mmax,
                num_taps,
                sphere_channels,
                sphere_channels_reduce,
                self.hidden_channels_list,
                self.distance_expansion.num_output,
                num_basis_functions,
                max_num_elements,
                use_grid,
                num_bands,
            )
            for _ in range(num_interactions)
        )
        self.sphere_sampler = SphereSampler(lmax, num_sphere_samples, sphere_weighting)
        self.energy_head = OutputMLP(sphere_channels, sphere_channels_reduce)
        if regress_forces and direct_forces:
            self.force_head = OutputMLP(sphere_channels, sphere_channels_reduce)
        # Target normalisation: E = energy_scale * E_net + energy_shift + sum_i element_energies[Z_i]
        # and F = force_scale * F_net. Official checkpoints set scale and shift (their
        # "normalizers"); this package's trainer sets the per-element reference energies (least
        # squares on the training set) and one scale for both, so -dE/dx stays the force.
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))
        self.register_buffer("force_scale", torch.tensor(1.0))
        self.register_buffer("element_energies", torch.zeros(max_num_elements))

    # ------------------------------------------------------------------ geometry
    @property
    def current_roll(self) -> str:
        """The roll rule in force: ``roll`` in training mode, ``eval_roll`` in eval mode."""
        return self.roll if self.training or self.eval_roll is None else self.eval_roll

    def check_inputs(self, batch: AtomicBatch) -> None:
        """Raise ``ValueError`` on input the model cannot handle (rather than return NaN)."""
        z = batch.atomic_numbers
        bad = (z < 1) | (z >= self.max_num_elements)
        if bool(bad.any()):
            atom = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"atom {atom} (structure {int(batch.batch[atom])}) has atomic number {int(z[atom])}, "
                f"outside this model's element table 1..{self.max_num_elements - 1}"
            )
        if not bool(torch.isfinite(batch.positions).all()):
            atom = int(torch.nonzero(~torch.isfinite(batch.positions).all(dim=1))[0])
            raise ValueError(f"atom {atom} (structure {int(batch.batch[atom])}) has a non-finite position")

    def edge_data(
        self, batch: AtomicBatch, positions: torch.Tensor, graph: Graph | None = None
    ) -> EdgeData:
        """Graph, edge geometry, ranks and frames, edges grouped by resolution."""
        if graph is None:
            graph = build_graph(batch, self.cutoff, self.max_num_neighbors)
        vectors = edge_vectors(positions, batch.cell.to(positions.dtype), batch.batch, graph)
        return self.edges_from_vectors(graph.edge_index, graph.cell_offsets, vectors, positions.shape[0])

    def edges_from_vectors(
        self,
        edge_index: torch.Tensor,
        cell_offsets: torch.Tensor,
        vectors: torch.Tensor,
        num_atoms: int,
    ) -> EdgeData:
        """Ranks, resolution groups and frames for given edges ``[2, E]`` and vectors ``[E, 3]``."""
        distance = torch.linalg.vector_norm(vectors, dim=-1)
        rank = neighbor_ranks(distance.detach(), edge_index[1], num_atoms, self.max_num_neighbors)
        resolution = torch.zeros_like(rank)
        for boundary in self.rank_boundaries:
            resolution += (rank >= boundary).long()
        # Group edges by resolution, keeping their order within a group.
        order = torch.argsort(resolution, stable=True)
        counts = torch.bincount(resolution, minlength=len(self.lmax_list)).tolist()
        starts = list(itertools.accumulate(counts, initial=0))
        slices = [slice(starts[i], starts[i + 1]) for i in range(len(counts))]
        vectors = vectors[order]
        roll = self.current_roll if self.edge_rotation else "none"
        return EdgeData(
            edge_index=edge_index[:, order],
            cell_offsets=cell_offsets[order],
            vectors=vectors,
            distance=distance[order],
            rank=rank[order],
            frames=edge_frames(vectors, roll),
            resolution_slices=slices,
        )

    # ------------------------------------------------------------------ forward
    def embed(self, batch: AtomicBatch, edges: EdgeData) -> torch.Tensor:
        """Node coefficients after all interaction layers: ``[N, (L+1)^2, C]``."""
        z = batch.atomic_numbers
        dtype = edges.vectors.dtype
        x = torch.zeros(
            z.shape[0], num_coefficients(self.lmax), self.sphere_channels, dtype=dtype, device=z.device
        )
        x[:, 0, :] = self.sphere_embedding(z).to(dtype)
        expanded = self.distance_expansion(edges.distance)
        with no_autocast(edges.frames):
            groups = [
                (edges_r, wigner(edges.frames[edges_r]))
                for edges_r, wigner in zip(edges.resolution_slices, self.wigner)
            ]
        for layer, interaction in enumerate(self.interactions):
            # The first layer's input is the degree-0 embedding: its messages take a cheaper path.
            update = interaction(x, expanded, z, edges.edge_index, groups, scalar_input=layer == 0)
            x = update if layer == 0 else x + update
        return x

    def forward(self, batch: AtomicBatch, graph: Graph | None = None) -> dict[str, torch.Tensor]:
        """Energy ``[S]`` and forces ``[N, 3]`` of every structure in ``batch``."""
        self.check_inputs(batch)
        conservative = self.regress_forces and not self.direct_forces
        positions = batch.positions
        # A caller that differentiates wrt positions itself needs the graph kept.
        caller_grad = positions.requires_grad
        with torch.set_grad_enabled(torch.is_grad_enabled() or conservative):
            if conservative and not positions.requires_grad:
                positions = positions.detach().requires_grad_(True)
            with no_autocast(positions):  # geometry and frames are never autocast
                edges = self.edge_data(batch, positions, graph)
            out = self.predict(batch, edges)
            if conservative:
                (grad,) = torch.autograd.grad(
                    out["energy"].sum(),
                    positions,
                    create_graph=self.training,
                    retain_graph=self.training or caller_grad,
                    allow_unused=True,
                )
                out["forces"] = -grad if grad is not None else torch.zeros_like(positions)
        return out

    def predict(self, batch: AtomicBatch, edges: EdgeData) -> dict[str, torch.Tensor]:
        """Energy ``[S]`` (and direct forces ``[N, 3]``) from prepared edges."""
        x = self.embed(batch, edges)
        values = self.sphere_sampler(x)  # [N, P, C]
        # under mixed precision the heads run in lower precision; the sums do not
        dtype = self.energy_scale.dtype
        node_energy = self.sphere_sampler.integrate(self.energy_head(values)).squeeze(-1).to(dtype)
        node_energy = node_energy * self.energy_scale + self.element_energies[batch.atomic_numbers].to(node_energy.dtype)
        energy = torch.zeros(batch.num_structures, dtype=node_energy.dtype, device=node_energy.device)
        energy = energy.index_add(0, batch.batch, node_energy)
        out = {"energy": energy + self.energy_shift}
        if self.regress_forces and self.direct_forces:
            magnitude = self.force_head(values)  # [N, P, 1]
            directions = self.sphere_sampler.directions.to(magnitude.dtype)
            out["forces"] = self.sphere_sampler.integrate(magnitude * directions).to(dtype) * self.force_scale
        return out

    @property
    def num_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_fairchem(cls, path: str, weights: str = "auto", **overrides) -> "SCN":
        """Load a checkpoint written by the official implementation (see :mod:`.fairchem`)."""
        from .fairchem import load_fairchem_checkpoint

        return load_fairchem_checkpoint(path, weights=weights, **overrides)

