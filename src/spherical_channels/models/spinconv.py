"""SpinConv (Shuaibi et al., "Rotation Invariant Graph Neural Networks using Spin Convolutions"),
the OC20 baseline, with the numerics of the official OCP code.

Data flow: ``AtomicBatch`` -> neighbour graph (cutoff, the ``max_num_neighbors`` nearest per
atom, periodic images) -> edge vectors -> per edge j -> i: its length (Gaussians, scaled per
element pair) and its frame (x along the edge, the roll fixed by i's environment) -> messages
``[E, C]`` on the edges, ``num_interactions`` times updated from a spin convolution over the
sphere of each edge, on which the messages of every edge k -> j are splatted at their
direction (latitude, longitude) in the edge's frame -> energy: the messages summed at each atom
(divided by ``max_num_neighbors / 2 + 1``), an element-conditioned MLP, summed per structure.

Forces, by ``force_estimator``:

* ``"grad"`` (energy-centric) with ``exact_gradient=True``: ``-dE/dx`` by autograd
  (:func:`~.response.compute_response`; stress too). With ``exact_gradient=False`` (the
  official code, for its checkpoints): the gradient with the splat weights held constant,
  i.e. through the edge lengths only; that is not ``-dE/dx`` (on the official fixtures
  finite differences of E differ from it by 25-36 %), so the model is not ``conservative``.
  The exact gradient includes the frames' own: where an atom's environment vector a_i nearly
  vanishes (centrosymmetric sites of perfect crystals) the official frame takes its roll from
  a constant 1e-4 Å offset, and the energy turns with it ~1e4 times faster than elsewhere
  (a perfect fcc cell gets forces where symmetry has none); where the frame degenerates
  altogether the exact forces are refused (:data:`DEGENERATE_FRAME_SINE`).
* ``"random"`` (force-centric): the messages into each atom are splatted on spheres in
  ``num_rand_rotations`` frames per atom x 3 axes; a force block reads the force along each
  axis, rotated back and averaged. The frames are random in the official code (its forces
  change from call to call); in eval mode they are a fixed sequence by default
  (``eval_force_rotations``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..data.batch import AtomicBatch
from ..data.neighbors import Graph, build_graph, edge_vectors
from ..data.validation import StructureError, located_message, validate_batch
from .config import ConfigError
from .ops import no_autocast
from .normalization import check_finite_scalars, element_energy_table
from .response import compute_response
from .spinconv_blocks import EdgeDistanceEmbedding, ElementMixingMLP, ForceBlock, GaussianBasis, MessageBlock
from .spinconv_config import RUNTIME_OPTIONS, SpinConvConfig
from .spinconv_geometry import (
    SphereSplat,
    axis_frames,
    edge_frames,
    edge_sphere_points,
    force_frames,
    rotate_points,
    sphere_splat,
    unit_vectors,
)

__all__ = ["DEGENERATE_FRAME_SINE", "SpinConv", "SpinConvConfig", "SpinConvEdges"]

#: Below this ``|x × a|`` an edge frame's roll is undefined: energy-conserving forces are refused
#: there. The regular test structures have >= 0.012; a perfect bcc crystal 1e-12.
DEGENERATE_FRAME_SINE = 1e-6


@dataclass
class SpinConvEdges:
    """Per-edge geometry of a batch (E edges j -> i, P sphere points).

    Attributes:
        edge_index: ``[2, E]`` (source j, target i).
        vectors: ``[E, 3]`` ``pos_j + n.cell - pos_i``.
        distance: ``[E]``.
        directions: ``[E, 3]`` unit vectors.
        frames: ``[E, 3, 3]`` rows x (the edge), y, z.
        frame_sine: ``[E]`` how well each frame's roll is defined (``edge_frames``).
        splat: the messages of the edges k -> j splatted on each edge's sphere.
    """

    edge_index: torch.Tensor
    vectors: torch.Tensor
    distance: torch.Tensor
    directions: torch.Tensor
    frames: torch.Tensor
    frame_sine: torch.Tensor
    splat: SphereSplat


class SpinConv(nn.Module):
    """SpinConv predicting energies and forces (and stress when ``conservative``): the SCN's
    interface.

    Build it from a :class:`~.spinconv_config.SpinConvConfig`, or with the official
    constructor's keyword arguments (``SpinConv(hidden_channels=32, sphere_size_lat=16, ...)``:
    the ``model_attributes`` of an official config can be passed as they are). The
    configuration is ``model.config`` (read-only; its options also read as attributes; the
    force-frame rules change with :meth:`update_config`).

    Input: an :class:`~spherical_channels.data.batch.AtomicBatch`. Output (see
    :func:`~.response.compute_response`): ``{"energy": [S], "forces": [N, 3]}`` (forces only if
    ``regress_forces``), plus ``"stress": [S, 3, 3]`` (eV/Å^3, ASE's sign) with ``stress=True``
    for conservative models (energy-centric with ``exact_gradient``).
    """

    def __init__(self, config: SpinConvConfig | None = None, **options) -> None:
        super().__init__()
        if config is None:
            config = SpinConvConfig.from_official(options)
        elif options:
            config = config.replace(**options)
        self._config = c = config
        mid, hidden, emb, elements = c.mid_hidden_channels, c.hidden_channels, c.embedding_size, c.max_num_elements
        lat, lon = c.sphere_size_lat, c.sphere_size_long

        self.distance_expansion = GaussianBasis(c.cutoff, c.num_basis_functions, c.basis_width_scalar)
        self.edge_distance = EdgeDistanceEmbedding(
            self.distance_expansion, mid, elements, c.distance_block_scalar_max, c.scale_distances
        )
        self.initial_mlp = nn.Sequential(nn.Linear(mid, mid), nn.SiLU(), nn.Linear(mid, mid), nn.SiLU())
        self.initial_mix = ElementMixingMLP(mid, hidden, mid, emb, elements)
        self.message_blocks = nn.ModuleList(
            MessageBlock(hidden, mid, emb, lat, lon, elements, c.sphere_message, c.lmax) for _ in range(c.num_interactions)
        )
        self.energy_head = ElementMixingMLP(hidden, 1, mid, emb, elements)
        if c.force_estimator == "random":
            self.force_head = ForceBlock(hidden, mid, emb, lat, lon, elements, c.output_message, c.lmax)
        # Target normalisation: E = energy_scale * E_net + energy_shift + sum_i element_energies[Z_i],
        # F = force_scale * F_net. Official checkpoints set scale and shift (their "normalizers");
        # this package's trainer sets the per-element reference energies and one scale for both.
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))
        self.register_buffer("force_scale", torch.tensor(1.0))
        self.register_buffer("element_energies", torch.zeros(elements))

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> SpinConvConfig:
        """The model's configuration (frozen; see :meth:`update_config`)."""
        return self._config

    def update_config(self, **changes) -> None:
        """Change options that do not change the parameters (the force-frame rules); any
        other change needs a new model."""
        fixed = set(changes) - RUNTIME_OPTIONS
        if fixed:
            raise ConfigError(
                f"{sorted(fixed)} change the model's parameters or numerics: build a new model "
                f"(SpinConv(model.config.replace(...))) instead; changeable here: {sorted(RUNTIME_OPTIONS)}"
            )
        self._config = self._config.replace(**changes)

    def __getattr__(self, name: str):  # noqa: ANN204 - config options read as attributes
        if name != "_config" and name in SpinConvConfig.option_names():
            return getattr(self.__dict__["_config"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:  # noqa: ANN001
        if name in SpinConvConfig.option_names():
            raise AttributeError(
                f"SpinConv.{name} is part of the frozen configuration: use model.update_config({name}=...) for "
                f"runtime options, or build a new model from model.config.replace({name}=...)"
            )
        super().__setattr__(name, value)

    @property
    def conservative(self) -> bool:
        """Whether the forces are ``-dE/dx`` (energy-centric with ``exact_gradient``): only
        then is there a stress, and do energies conserve in MD. The official energy-centric
        forces (``exact_gradient=False``) are a gradient of part of the energy only: not
        conservative."""
        return self._config.conservative

    @property
    def num_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    @property
    def current_force_rotations(self) -> str:
        """The force-frame rule in force: ``force_rotations`` in training mode,
        ``eval_force_rotations`` in eval mode."""
        c = self._config
        return c.force_rotations if self.training or c.eval_force_rotations is None else c.eval_force_rotations

    @torch.no_grad()
    def set_normalization(
        self,
        energy_scale: float = 1.0,
        energy_shift: float = 0.0,
        force_scale: float | None = None,
        element_energies: Mapping[int, float] | torch.Tensor | None = None,
    ) -> None:
        """Set the target normalisation.

        Args:
            energy_scale, energy_shift: ``E = energy_scale * E_net + energy_shift + sum_i e[Z_i]``.
            force_scale: forces are ``force_scale * F_net`` (``None``: ``energy_scale``). A
                conservative model's forces are ``-dE/dx`` and so scale with the energy: a
                different value is refused.
            element_energies: per-element reference energies ``{Z: eV}`` or a
                ``[max_num_elements]`` tensor; ``None`` means zero.
        """
        force_scale = energy_scale if force_scale is None else force_scale
        check_finite_scalars(energy_scale=energy_scale, energy_shift=energy_shift, force_scale=force_scale)
        if self.conservative and not math.isclose(float(force_scale), float(energy_scale), rel_tol=1e-6):
            raise ValueError(
                f"this SpinConv's forces are -dE/dx (exact_gradient), so they scale with the energy: force_scale "
                f"({force_scale}) must equal energy_scale ({energy_scale})"
            )
        table = element_energy_table(element_energies, like=self.element_energies)
        self.energy_scale.fill_(float(energy_scale))
        self.energy_shift.fill_(float(energy_shift))
        self.force_scale.fill_(float(force_scale))
        self.element_energies.copy_(table)

    # ------------------------------------------------------------------ geometry
    def check_inputs(self, batch: AtomicBatch) -> None:
        """Raise ``StructureError`` (a ``ValueError``) on input the model cannot handle (atomic
        numbers outside its table, bad cells, ...) rather than return NaN."""
        validate_batch(batch, max_atomic_number=self._config.max_num_elements - 1)

    def graph_batch(self, batch: AtomicBatch) -> AtomicBatch:
        """The batch as the graph sees it: without periodicity when ``use_pbc`` is off."""
        return batch if self._config.use_pbc else replace(batch, pbc=torch.zeros_like(batch.pbc))

    def build_graph(self, batch: AtomicBatch) -> Graph:
        """The radius graph this model uses (cutoff, neighbour cap and tie rule of its config),
        the official one (with the official rule its own edge filter is then a no-op); build it
        ahead (e.g. in DataLoader workers) and pass it to ``forward(batch, graph)``."""
        c = self._config
        return build_graph(self.graph_batch(batch), c.cutoff, c.neighbor_cap, ties=c.neighbor_ties)

    def edges_from_vectors(self, edge_index: torch.Tensor, vectors: torch.Tensor, num_atoms: int) -> SpinConvEdges:
        """Lengths, directions, frames and the edge spheres' splat for edges ``[2, E]`` (sorted
        by target, as :meth:`build_graph` gives them) with vectors ``[E, 3]``."""
        c = self._config
        distance = torch.linalg.vector_norm(vectors, dim=-1)
        directions = unit_vectors(vectors)
        frames, frame_sine = edge_frames(vectors, edge_index[1], num_atoms, c.cutoff)
        sphere, source = edge_sphere_points(edge_index, num_atoms)
        points = rotate_points(frames[sphere], directions[source])
        splat = self._splat(points, sphere, source, edge_index.shape[1])
        return SpinConvEdges(edge_index, vectors, distance, directions, frames, frame_sine, splat)

    def _splat(self, points: torch.Tensor, sphere: torch.Tensor, source: torch.Tensor, num_spheres: int) -> SphereSplat:
        c = self._config
        exact = c.energy_centric and c.exact_gradient
        return sphere_splat(
            points, sphere, source, num_spheres, c.sphere_size_lat, c.sphere_size_long,
            pole_rule=c.pole_rule, pole_tolerance=c.pole_tolerance,
            # the official energy-centric model builds the weights without gradient ("NaNs otherwise")
            differentiable=not (c.energy_centric and not c.exact_gradient),
            smooth_latitude=exact,
        )

    # ------------------------------------------------------------------ forward
    def forward(self, batch: AtomicBatch, graph: Graph | None = None, stress: bool = False) -> dict[str, torch.Tensor]:
        """Energy ``[S]``, forces ``[N, 3]`` and (``stress=True``, conservative models) stress
        ``[S, 3, 3]`` of every structure in ``batch`` (see :func:`~.response.compute_response`)."""
        self.check_inputs(batch)
        return compute_response(self, batch, graph=graph, stress=stress, create_graph=self.training)

    @property
    def _inner_gradient(self) -> bool:
        """Forces by the official partial gradient, computed here rather than by the response."""
        c = self._config
        return c.regress_forces and c.energy_centric and not c.exact_gradient

    def energy_terms(
        self, batch: AtomicBatch, positions: torch.Tensor, cell: torch.Tensor, graph: Graph | None = None
    ) -> dict[str, torch.Tensor]:
        """Energy ``[S]`` (and, for non-conservative models, forces ``[N, 3]``) at ``positions``
        ``[N, 3]`` and ``cell`` ``[S, 3, 3]`` (the response's strained copies of the batch's)."""
        if graph is None:
            graph = self.build_graph(batch)
        caller_grad = positions.requires_grad
        keep = self.training or caller_grad
        inner = self._inner_gradient
        if inner:
            context = torch.enable_grad()
        elif not (self.conservative or keep):
            context = torch.no_grad()  # direct outputs in eval mode: detached, and no graph is built
        else:
            context = contextlib.nullcontext()
        with context:
            if inner and not caller_grad:
                positions = positions.detach().requires_grad_(True)
            with no_autocast(positions):  # geometry is never autocast
                if not self._config.use_pbc:
                    cell = torch.zeros_like(cell)
                vectors = edge_vectors(positions, cell, batch.batch, graph)
            return self.terms_from_vectors(
                batch, positions, graph.edge_index, vectors, create_graph=keep
            )

    def terms_from_vectors(
        self,
        batch: AtomicBatch,
        positions: torch.Tensor,
        edge_index: torch.Tensor,
        vectors: torch.Tensor,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Energy ``[S]`` (and the forces ``[N, 3]`` of a non-conservative model) from given
        edges ``[2, E]`` (sorted by target) and their vectors ``[E, 3]``.

        For the official energy-centric forces ``vectors`` must be a function of ``positions``
        (which then requires grad): the forces are ``-force_scale * d E_net / d positions`` with
        the splat weights held constant. ``create_graph`` keeps the graph of the outputs
        (training; a caller differentiating them): without it a non-conservative model's
        outputs come detached.
        """
        with no_autocast(vectors):
            edges = self.edges_from_vectors(edge_index, vectors, batch.num_atoms)
        if self.conservative:
            self._check_frames(batch, edges)
        messages = self.messages(batch.atomic_numbers, edges)
        network_energy = self.network_energy(batch, edge_index, messages)  # [S]
        out = {"energy": self.denormalized_energy(batch, network_energy)}
        c = self._config
        if self._inner_gradient:
            if not positions.requires_grad:
                raise ValueError("terms_from_vectors: the official energy-centric forces need positions that require grad")
            (gradient,) = torch.autograd.grad(
                network_energy.sum(), positions, create_graph=create_graph, retain_graph=create_graph, allow_unused=True
            )
            if gradient is None:  # no edges at all
                gradient = torch.zeros_like(positions)
            out["forces"] = -gradient * self.force_scale
        elif c.regress_forces and c.force_estimator == "random":
            out["forces"] = self.direct_forces(batch, edges, messages) * self.force_scale
        if not (create_graph or self.conservative):
            out = {k: v.detach() for k, v in out.items()}
        return out

    def _check_frames(self, batch: AtomicBatch, edges: SpinConvEdges) -> None:
        """Refuse ``-dE/dx`` where an edge frame degenerates: the energy is then not
        differentiable (the roll jumps with the rounding; its gradient reaches 1e18 eV/Å on
        a perfect bcc crystal, whose nearest neighbours lie along the reference (1, 1, 1))."""
        if edges.frame_sine.numel() == 0:
            return
        worst = int(torch.argmin(edges.frame_sine))
        sine = float(edges.frame_sine[worst])
        if sine < DEGENERATE_FRAME_SINE:
            j, i = (int(k) for k in edges.edge_index[:, worst])
            s = int(batch.batch[i])
            start = int(torch.cumsum(batch.natoms, 0)[s] - batch.natoms[s])
            raise StructureError(
                located_message(
                    f"atoms {i - start} <- {j - start}: SpinConv's edge frame is degenerate (the edge lies along "
                    f"the atom's reference direction, |x × a| = {sine:.1e}; a perfect crystal's symmetric site "
                    f"does this), so its energy has no usable gradient there: rattle the structure, or use the "
                    f"official forces (exact_gradient=False)",
                    index=s,
                ),
                index=s,
            )

    def messages(self, atomic_numbers: torch.Tensor, edges: SpinConvEdges) -> torch.Tensor:
        """Edge messages ``[E, C]`` after every message block."""
        source = atomic_numbers[edges.edge_index[0]]
        target = atomic_numbers[edges.edge_index[1]]
        distance_features = self.edge_distance(edges.distance, source, target)  # [E, M]
        x = self.initial_mix(self.initial_mlp(distance_features), source, target)
        for layer, block in enumerate(self.message_blocks):
            update = block(x, distance_features, source, target, edges.splat)
            x = update if layer == 0 else x + update
        return x

    def network_energy(self, batch: AtomicBatch, edge_index: torch.Tensor, messages: torch.Tensor) -> torch.Tensor:
        """The network's (normalised) energy ``[S]``: messages summed at their target atoms."""
        node = torch.zeros(batch.num_atoms, messages.shape[1], dtype=messages.dtype, device=messages.device)
        node = node.index_add(0, edge_index[1], messages) / (self._config.max_num_neighbors / 2.0 + 1.0)
        z = batch.atomic_numbers
        atom_energy = self.energy_head(node, z, z).squeeze(-1)
        dtype = self.energy_scale.dtype
        energy = torch.zeros(batch.num_structures, dtype=dtype, device=atom_energy.device)
        return energy.index_add(0, batch.batch, atom_energy.to(dtype))

    def denormalized_energy(self, batch: AtomicBatch, network_energy: torch.Tensor) -> torch.Tensor:
        """``energy_scale * E_net + energy_shift + sum_i element_energies[Z_i]``: ``[S]``."""
        reference = torch.zeros_like(network_energy).index_add(
            0, batch.batch, self.element_energies[batch.atomic_numbers].to(network_energy.dtype)
        )
        return network_energy * self.energy_scale + self.energy_shift + reference

    def force_frame_rotations(self, batch: AtomicBatch, dtype: torch.dtype) -> torch.Tensor:
        """The force block's per-atom rotations ``[R, N, 3, 3]`` under the current rule."""
        return force_frames(
            self.current_force_rotations, batch.natoms, self._config.num_rand_rotations, dtype, batch.positions.device
        )

    def direct_forces(
        self, batch: AtomicBatch, edges: SpinConvEdges, messages: torch.Tensor, rotations: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The force block's forces ``[N, 3]`` (network units) from the messages ``[E, C]``,
        with the per-atom ``rotations [R, N, 3, 3]`` (default: :meth:`force_frame_rotations`)."""
        n = batch.num_atoms
        if rotations is None:
            rotations = self.force_frame_rotations(batch, edges.vectors.dtype)
        num_rotations = rotations.shape[0]
        with no_autocast(edges.vectors):
            frames = axis_frames(rotations).reshape(-1, n, 3, 3)  # [3R, N, 3, 3], frame f = 3 r + axis
            target = edges.edge_index[1]
            num_edges = target.shape[0]
            points = torch.einsum("feij,ej->fei", frames[:, target], edges.directions).reshape(-1, 3)
            offsets = torch.arange(frames.shape[0], device=target.device).view(-1, 1) * n
            sphere = (offsets + target.view(1, -1)).reshape(-1)
            source = torch.arange(num_edges, device=target.device).repeat(frames.shape[0])
            splat = self._splat(points, sphere, source, frames.shape[0] * n)
        element = batch.atomic_numbers.repeat(frames.shape[0])
        along_axis = self.force_head(messages, element, splat)[:, 0].view(num_rotations, 3, n)
        # back to the global frame: F = A^T f, averaged over the rotations
        forces = torch.einsum("rnji,rjn->ni", rotations.to(along_axis.dtype), along_axis) / num_rotations
        return forces.to(self.force_scale.dtype)

    @classmethod
    def from_fairchem(cls, path: str, weights: str = "auto", trust_pickle: bool = False, **overrides) -> "SpinConv":
        """Load a checkpoint of the official SpinConv (OCP layout; needs the registry entry
        that :func:`~.checkpoint.load_model` uses); a checkpoint of another model is refused."""
        from .checkpoint import CheckpointError, load_model

        model = load_model(path, weights=weights, trust_pickle=trust_pickle, **overrides)
        if not isinstance(model, cls):
            raise CheckpointError(f"{path}: a {type(model).__name__} checkpoint, not SpinConv")
        return model
