"""The Spherical Channel Network (Zitnick et al., NeurIPS 2022).

Data flow: ``AtomicBatch`` -> neighbour graph (cutoff, at most ``max_num_neighbors`` nearest,
periodic images) -> edge vectors, distances and neighbour ranks -> edge frames and their Wigner-D
rows -> ``num_interactions`` layers of message passing on spherical channels -> energy per
structure and forces per atom (direct, or ``-dE/dx`` by autograd).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..data.batch import AtomicBatch
from ..data.validation import validate_batch
from ..data.neighbors import Graph, build_graph, edge_vectors, neighbor_ranks
from ..so3.frames import edge_frames, reference_a
from ..so3.harmonics import grouped_reduced_coefficients, num_coefficients
from ..so3.wigner import WignerD
from .basis import make_distance_expansion
from .blocks import InteractionBlock, OutputMLP, SphereSampler
from .config import RUNTIME_OPTIONS, ConfigError, SCNConfig
from .ops import no_autocast
from .repulsion import ZBLRepulsion
from .normalization import check_finite_scalars, element_energy_table
from .response import compute_response
from .smooth import smooth_edge_copies

__all__ = ["SCN", "SCNConfig", "EdgeData", "NEAR_NEIGHBOR_RANKS"]

#: Neighbours of rank 0..11 use the full resolution; ranks 12.. the reduced one (paper B.1).
NEAR_NEIGHBOR_RANKS = 12


@dataclass
class EdgeData:
    """Per-edge geometry of a batch, edges grouped by resolution (``resolution_slices``).

    Shapes: ``edge_index [2, E]`` (source, target), ``vectors [E, 3]`` (target -> source image),
    ``distance [E]``, ``rank [E]``, ``frames [E, 3, 3]`` (``frames @ unit(vectors) = +y``).
    The smooth variant sends edges as weighted copies (:mod:`.smooth`): ``weight [E]`` multiplies
    each copy's message (``None``: all 1), and ``pairs`` holds the graph's own edges
    ``(edge_index [2, P], vectors [P, 3], distance [P])`` (``None``: the edges above are they).
    """

    edge_index: torch.Tensor
    cell_offsets: torch.Tensor
    vectors: torch.Tensor
    distance: torch.Tensor
    rank: torch.Tensor
    frames: torch.Tensor
    resolution_slices: list[slice]
    weight: torch.Tensor | None = None
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def graph_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(edge_index, vectors, distance)`` of the graph's edges, each once."""
        return self.pairs if self.pairs is not None else (self.edge_index, self.vectors, self.distance)


class SCN(nn.Module):
    """Spherical Channel Network predicting energies and forces (and stress when conservative).

    Build it from an :class:`~.config.SCNConfig`, or with the official constructor's keyword
    arguments (``SCN(lmax=6, mmax=1, ...)``: the ``model_attributes`` of an official config can be
    passed as they are). The configuration is ``model.config`` (read-only; options that do not
    change the parameters, such as the roll rule, change with :meth:`update_config`).

    Input: an :class:`~spherical_channels.data.batch.AtomicBatch`. Output (see
    :func:`~.response.compute_response`): ``{"energy": [S], "forces": [N, 3]}`` (forces only if
    ``regress_forces``), plus ``"stress": [S, 3, 3]`` (eV/Å^3, ASE's sign) with ``stress=True``
    for energy-conserving models.
    """

    def __init__(self, config: SCNConfig | None = None, **options) -> None:
        super().__init__()
        if config is None:
            config = SCNConfig.from_official(options)
        elif options:
            config = config.replace(**options)
        self._config = config
        c = config

        if c.num_resolutions == 2:
            self.lmax_list = [c.lmax, max(4, c.lmax - 2)]
            self.hidden_channels_list = [c.hidden_channels, c.hidden_channels // 4]
            self.rank_boundaries = [NEAR_NEIGHBOR_RANKS]
        else:
            self.lmax_list, self.hidden_channels_list, self.rank_boundaries = [c.lmax], [c.hidden_channels], []
        # A second resolution above the first (lmax < 4) would read coefficients that don't exist.
        self.lmax_list = [min(l, c.lmax) for l in self.lmax_list]

        self.sphere_embedding = nn.Embedding(c.max_num_elements, c.sphere_channels)
        self.distance_expansion = make_distance_expansion(
            c.distance_function, c.cutoff, c.distance_resolution, c.basis_width_scalar
        )
        self.wigner = nn.ModuleList(
            WignerD(l, rows=grouped_reduced_coefficients(l, c.mmax)) for l in self.lmax_list
        )
        self.interactions = nn.ModuleList(
            InteractionBlock(
                lmax_list=self.lmax_list,
                mmax=c.mmax,
                num_taps=c.num_taps,
                sphere_channels=c.sphere_channels,
                sphere_channels_reduce=c.sphere_channels_reduce,
                hidden_channels_list=self.hidden_channels_list,
                num_expansion=self.distance_expansion.num_output,
                num_basis=c.num_basis_functions,
                max_num_elements=c.max_num_elements,
                use_grid=c.use_grid,
                num_bands=c.num_bands,
            )
            for _ in range(c.num_interactions)
        )
        self.sphere_sampler = SphereSampler(
            lmax=c.lmax, num_points=c.num_sphere_samples, weighting=c.sphere_weighting
        )
        self.energy_head = OutputMLP(channels=c.sphere_channels, reduced_channels=c.sphere_channels_reduce)
        if c.regress_forces and c.direct_forces:
            self.force_head = OutputMLP(channels=c.sphere_channels, reduced_channels=c.sphere_channels_reduce)
        # Target normalisation: E = energy_scale * E_net + energy_shift + sum_i element_energies[Z_i]
        # and F = force_scale * F_net. Official checkpoints set scale and shift (their
        # "normalizers"); this package's trainer sets the per-element reference energies (least
        # squares on the training set) and one scale for both, so -dE/dx stays the force.
        # Set them with set_normalization().
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))
        self.register_buffer("force_scale", torch.tensor(1.0))
        self.register_buffer("element_energies", torch.zeros(c.max_num_elements))
        self.repulsion = ZBLRepulsion(c.max_num_elements, c.zbl_radius_scale, c.envelope_exponent) if c.zbl else None

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> SCNConfig:
        """The model's configuration (frozen; see :meth:`update_config`)."""
        return self._config

    def update_config(self, **changes) -> None:
        """Change options that do not change the parameters (``RUNTIME_OPTIONS``: the roll
        rules); any other change needs a new model."""
        fixed = set(changes) - RUNTIME_OPTIONS
        if fixed:
            raise ConfigError(
                f"{sorted(fixed)} change the model's parameters or numerics: build a new model "
                f"(SCN(model.config.replace(...))) instead; changeable here: {sorted(RUNTIME_OPTIONS)}"
            )
        self._config = self._config.replace(**changes)

    def __getattr__(self, name: str):  # noqa: ANN204 - config options read as attributes
        if name not in ("_config",) and name in SCNConfig.option_names():
            return getattr(self.__dict__["_config"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:  # noqa: ANN001
        if name in SCNConfig.option_names():
            raise AttributeError(
                f"SCN.{name} is part of the frozen configuration: use model.update_config({name}=...) "
                f"for runtime options, or build a new model from model.config.replace({name}=...)"
            )
        super().__setattr__(name, value)

    @property
    def conservative(self) -> bool:
        """Whether forces are ``-dE/dx`` (energy-conserving, with stress)."""
        return self.regress_forces and not self.direct_forces

    @torch.no_grad()
    def set_normalization(
        self,
        energy_scale: float = 1.0,
        energy_shift: float = 0.0,
        force_scale: float = 1.0,
        element_energies: Mapping[int, float] | torch.Tensor | None = None,
    ) -> None:
        """Set the target normalisation (see the buffers in ``__init__``).

        Args:
            energy_scale, energy_shift: ``E = energy_scale * E_net + energy_shift + sum_i e[Z_i]``.
            force_scale: direct forces are ``force_scale * F_net`` (conservative forces follow
                the energy and so ``energy_scale``).
            element_energies: per-element reference energies ``{Z: eV}`` or a
                ``[max_num_elements]`` tensor; ``None`` means zero.
        """
        check_finite_scalars(energy_scale=energy_scale, energy_shift=energy_shift, force_scale=force_scale)
        table = element_energy_table(element_energies, like=self.element_energies)
        for name, value in (("energy_scale", energy_scale), ("energy_shift", energy_shift), ("force_scale", force_scale)):
            getattr(self, name).fill_(float(value))
        self.element_energies.copy_(table)

    # ------------------------------------------------------------------ geometry
    @property
    def current_roll(self) -> str:
        """The roll rule in force: ``roll`` in training mode, ``eval_roll`` in eval mode."""
        return self.roll if self.training or self.eval_roll is None else self.eval_roll

    def check_inputs(self, batch: AtomicBatch) -> None:
        """Raise ``StructureError`` (a ``ValueError``) on input the model cannot handle, rather
        than return NaN: the package's one validation layer, with this model's element table
        (overlapping atoms are reported by the radius graph)."""
        validate_batch(batch, max_atomic_number=self.max_num_elements - 1)

    def build_graph(self, batch: AtomicBatch) -> Graph:
        """The radius graph this model uses (cutoff, neighbour cap and tie rule of its config);
        build it ahead (e.g. in DataLoader workers) and pass it to ``forward(batch, graph)``."""
        return build_graph(batch, self.cutoff, self.config.neighbor_cap, ties=self.neighbor_ties)

    def edge_data(
        self,
        batch: AtomicBatch,
        positions: torch.Tensor,
        graph: Graph | None = None,
        cell: torch.Tensor | None = None,
    ) -> EdgeData:
        """Graph, edge geometry, ranks and frames, edges grouped by resolution, at ``positions``
        ``[N, 3]`` and ``cell`` ``[S, 3, 3]`` (default: the batch's)."""
        if graph is None:
            graph = self.build_graph(batch)
        cell = batch.cell.to(positions.dtype) if cell is None else cell
        vectors = edge_vectors(positions, cell, batch.batch, graph)
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
        if self.smooth:
            return self._smooth_edges(edge_index, cell_offsets, vectors, distance)
        rank = neighbor_ranks(
            distance.detach(), edge_index[1], num_atoms, self.max_num_neighbors, ties=self.neighbor_ties
        )
        resolution = torch.zeros_like(rank)
        for boundary in self.rank_boundaries:
            resolution += (rank >= boundary).long()
        order, slices = self._group_by_resolution(resolution)
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

    def _group_by_resolution(self, resolution: torch.Tensor) -> tuple[torch.Tensor, list[slice]]:
        """The order ``[E]`` that groups edges by ``resolution [E]`` (stable within a group) and
        each group's slice of the reordered edges."""
        order = torch.argsort(resolution, stable=True)
        counts = torch.bincount(resolution, minlength=len(self.lmax_list)).tolist()
        starts = list(itertools.accumulate(counts, initial=0))
        return order, [slice(starts[i], starts[i + 1]) for i in range(len(counts))]

    def _smooth_edges(
        self, edge_index: torch.Tensor, cell_offsets: torch.Tensor, vectors: torch.Tensor, distance: torch.Tensor
    ) -> EdgeData:
        """The smooth variant's weighted edge copies, grouped by resolution."""
        copies = smooth_edge_copies(
            vectors, distance,
            cutoff=self.cutoff, exponent=self.envelope_exponent, num_resolutions=len(self.lmax_list),
            resolution_distance=self.resolution_distance, resolution_band=self.resolution_band,
            reference_a=reference_a(vectors),
        )
        order, slices = self._group_by_resolution(copies.resolution)
        edge = copies.edge[order]
        copy_vectors = vectors[edge]
        roll = self.current_roll if self.edge_rotation else "none"
        return EdgeData(
            edge_index=edge_index[:, edge],
            cell_offsets=cell_offsets[edge],
            vectors=copy_vectors,
            distance=distance[edge],
            rank=torch.zeros_like(edge),
            frames=edge_frames(copy_vectors, roll, use_b=copies.use_b[order]),
            resolution_slices=slices,
            weight=copies.weight[order],
            pairs=(edge_index, vectors, distance),
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
                (edges_r, wigner(edges.frames[edges_r]), None if edges.weight is None else edges.weight[edges_r])
                for edges_r, wigner in zip(edges.resolution_slices, self.wigner)
            ]
        for layer, interaction in enumerate(self.interactions):
            # The first layer's input is the degree-0 embedding: its messages take a cheaper path.
            update = interaction(x, expanded, z, edges.edge_index, groups, scalar_input=layer == 0)
            x = update if layer == 0 else x + update
        return x

    def forward(
        self, batch: AtomicBatch, graph: Graph | None = None, stress: bool = False
    ) -> dict[str, torch.Tensor]:
        """Energy ``[S]``, forces ``[N, 3]`` and (``stress=True``, conservative models) stress
        ``[S, 3, 3]`` of every structure in ``batch`` (see :func:`~.response.compute_response`)."""
        self.check_inputs(batch)
        return compute_response(self, batch, graph=graph, stress=stress, create_graph=self.training)

    def energy_terms(
        self, batch: AtomicBatch, positions: torch.Tensor, cell: torch.Tensor, graph: Graph | None = None
    ) -> dict[str, torch.Tensor]:
        """Energy ``[S]`` (and direct forces ``[N, 3]``) at ``positions`` ``[N, 3]`` and ``cell``
        ``[S, 3, 3]`` (the response's strained copies of the batch's)."""
        with no_autocast(positions):  # geometry and frames are never autocast
            edges = self.edge_data(batch, positions, graph, cell)
        return self.predict(batch, edges)

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
        energy = energy + self.energy_shift
        if self.repulsion is not None:
            pair_index, pair_vectors, pair_distance = edges.graph_pairs()
            energy = energy + self.repulsion(
                pair_distance.to(dtype), pair_index, batch.atomic_numbers, batch.batch, batch.num_structures
            )
        out = {"energy": energy}
        if self.regress_forces and self.direct_forces:
            magnitude = self.force_head(values)  # [N, P, 1]
            directions = self.sphere_sampler.directions.to(magnitude.dtype)
            out["forces"] = self.sphere_sampler.integrate(magnitude * directions).to(dtype) * self.force_scale
            if self.repulsion is not None:  # the prior's own forces, analytic
                out["forces"] = out["forces"] + self.repulsion.forces(
                    pair_vectors.detach().to(dtype), pair_index, batch.atomic_numbers
                )
        return out

    @property
    def num_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_fairchem(cls, path: str, weights: str = "auto", trust_pickle: bool = False, **overrides) -> "SCN":
        """Load a checkpoint written by the official implementation (see
        :func:`~.checkpoint.load_model`, which reads both kinds)."""
        from .checkpoint import load_model

        return load_model(path, weights=weights, trust_pickle=trust_pickle, **overrides)
