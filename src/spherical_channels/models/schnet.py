"""SchNet (Schütt et al., NeurIPS 2017 / J. Chem. Phys. 2018), the OC20 baseline, as fairchem runs it.

Data flow: ``AtomicBatch`` -> neighbour graph (cutoff, the 50 nearest per atom, periodic images)
-> edge lengths -> Gaussian expansion -> ``num_interactions`` continuous-filter convolutions,
each added to the atom features -> an atom-wise MLP gives each atom's energy -> summed (or
averaged) per structure; forces ``-dE/dx`` and stress by autograd
(:func:`~.response.compute_response`).

One interaction, for atom features ``h [N, F]`` and an edge j -> i of length d::

    W_ji = filter_net(gauss(d)) * 0.5 (cos(pi d / cutoff) + 1)       # [E, num_filters]
    m_i  = message_linear(sum_j neighbor_linear(h)_j * W_ji)         # [N, F]
    h   += update_linear(ssp(m))

with ``filter_net = Linear-ssp-Linear``, ``ssp(x) = softplus(x) - ln 2`` and
``gauss(d)_k = exp(coeff (d - mu_k)^2)``, ``mu = linspace(0, cutoff, G)``,
``coeff = -0.5 / (mu_1 - mu_0)^2``. The atomic energy is ``Linear(ssp(Linear(h)))``.
These are torch_geometric's ``SchNet`` numerics, which fairchem's ``SchNetWrap`` wraps: the
fixture tests reproduce its outputs to float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import AtomicBatch
from ..data.neighbors import Graph, build_graph, edge_vectors
from ..data.validation import validate_batch
from .ops import no_autocast
from .normalization import check_finite_scalars, element_energy_table
from .response import compute_response
from .schnet_config import SchNetConfig

__all__ = ["SchNet", "SchNetConfig", "ShiftedSoftplus", "GaussianSmearing", "SchNetInteraction"]

_LN2 = math.log(2.0)


class ShiftedSoftplus(nn.Module):
    """``softplus(x) - ln 2`` (zero at zero, so an untrained layer passes no constant on)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x) - _LN2


class GaussianSmearing(nn.Module):
    """Distances ``[E]`` -> Gaussians ``[E, G]`` centred on ``offset`` (a buffer, as the official
    checkpoints store it), of width the centres' spacing.

    The centres are created in float32 (what the official float32 model computes and saves), so
    a model moved to float64 keeps float32-rounded centres, as the official float64 runs do.
    The width coefficient comes from ``linspace(0, cutoff, G)`` in the distances' dtype, as the
    official model computes it at construction in its run dtype.
    """

    def __init__(self, cutoff: float, num_gaussians: int) -> None:
        super().__init__()
        self.cutoff, self.num_gaussians = float(cutoff), int(num_gaussians)
        self.register_buffer("offset", torch.linspace(0.0, self.cutoff, self.num_gaussians, dtype=torch.float32))
        # filled here, not on first use: a first use while torch.export traces would cache a
        # traced value, and the eager model would then compute with it
        self._coeff: dict[torch.dtype, float] = {}
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            self.coefficient(dtype)

    def coefficient(self, dtype: torch.dtype) -> float:
        """``-0.5 / spacing^2`` with the spacing of ``linspace`` in ``dtype``."""
        if dtype not in self._coeff:
            mu = torch.linspace(0.0, self.cutoff, self.num_gaussians, dtype=dtype)
            self._coeff[dtype] = -0.5 / (mu[1] - mu[0]).item() ** 2
        return self._coeff[dtype]

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        shifted = distance.view(-1, 1) - self.offset.to(distance.dtype).view(1, -1)
        return torch.exp(self.coefficient(distance.dtype) * torch.pow(shifted, 2))


class SchNetInteraction(nn.Module):
    """One continuous-filter convolution block: ``[N, F]`` -> the update ``[N, F]`` (the caller
    adds it to the features)."""

    def __init__(self, hidden_channels: int, num_gaussians: int, num_filters: int, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.filter_net = nn.Sequential(
            nn.Linear(num_gaussians, num_filters), ShiftedSoftplus(), nn.Linear(num_filters, num_filters)
        )
        self.neighbor_linear = nn.Linear(hidden_channels, num_filters, bias=False)
        self.message_linear = nn.Linear(num_filters, hidden_channels)
        self.activation = ShiftedSoftplus()
        self.update_linear = nn.Linear(hidden_channels, hidden_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Xavier-uniform weights, zero biases."""
        for linear in (self.filter_net[0], self.filter_net[2], self.neighbor_linear, self.message_linear, self.update_linear):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(
        self, h: torch.Tensor, edge_index: torch.Tensor, distance: torch.Tensor, expanded: torch.Tensor
    ) -> torch.Tensor:
        """``h [N, F]``, ``edge_index [2, E]`` (source j, target i), ``distance [E]``,
        ``expanded [E, G]`` -> update ``[N, F]``."""
        envelope = 0.5 * (torch.cos(distance * math.pi / self.cutoff) + 1.0)
        filters = self.filter_net(expanded) * envelope.view(-1, 1)
        messages = self.neighbor_linear(h)[edge_index[0]] * filters
        pooled = messages.new_zeros(h.shape[0], messages.shape[1]).index_add(0, edge_index[1], messages)
        return self.update_linear(self.activation(self.message_linear(pooled)))


class SchNet(nn.Module):
    """SchNet predicting energies, forces ``-dE/dx`` and stress (same interface as the SCN).

    Build it from a :class:`~.schnet_config.SchNetConfig`, or with the official constructor's
    keyword arguments (``SchNet(hidden_channels=1024, num_filters=256, ...)``: the
    ``model_attributes`` of an official config can be passed as they are). The configuration
    is ``model.config`` (read-only; its options also read as attributes, ``model.cutoff``).

    Input: an :class:`~spherical_channels.data.batch.AtomicBatch`. Output (see
    :func:`~.response.compute_response`): ``{"energy": [S], "forces": [N, 3]}`` (forces only
    if ``regress_forces``), plus ``"stress": [S, 3, 3]`` (eV/Å^3, ASE's sign) with
    ``stress=True``.
    """

    def __init__(self, config: SchNetConfig | None = None, **options) -> None:
        super().__init__()
        if config is None:
            config = SchNetConfig.from_official(options)
        elif options:
            config = config.replace(**options)
        self._config = config
        c = config
        # padding_idx 0 as the official embedding: no atom has Z = 0, and its row stays zero
        self.embedding = nn.Embedding(c.max_num_elements, c.hidden_channels, padding_idx=0)
        self.distance_expansion = GaussianSmearing(c.cutoff, c.num_gaussians)
        self.interactions = nn.ModuleList(
            SchNetInteraction(c.hidden_channels, c.num_gaussians, c.num_filters, c.cutoff)
            for _ in range(c.num_interactions)
        )
        self.output = nn.Sequential(
            nn.Linear(c.hidden_channels, c.hidden_channels // 2), ShiftedSoftplus(), nn.Linear(c.hidden_channels // 2, 1)
        )
        for linear in (self.output[0], self.output[2]):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        # E = energy_scale * E_net + energy_shift + sum_i element_energies[Z_i] (set_normalization):
        # official checkpoints set scale and shift (their "normalizers"), this package's trainer
        # the per-element reference energies and the scale.
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))
        self.register_buffer("element_energies", torch.zeros(c.max_num_elements))

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> SchNetConfig:
        """The model's configuration (frozen)."""
        return self._config

    def __getattr__(self, name: str):  # noqa: ANN204 - config options read as attributes
        if name != "_config" and name in SchNetConfig.option_names():
            return getattr(self.__dict__["_config"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:  # noqa: ANN001
        if name in SchNetConfig.option_names():
            raise AttributeError(
                f"SchNet.{name} is part of the frozen configuration: build a new model from "
                f"model.config.replace({name}=...)"
            )
        super().__setattr__(name, value)

    @property
    def conservative(self) -> bool:
        """Forces are always ``-dE/dx`` (when predicted), so the model has stress too."""
        return self.config.regress_forces

    @property
    def num_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def set_normalization(
        self,
        energy_scale: float = 1.0,
        energy_shift: float = 0.0,
        force_scale: float | None = None,
        element_energies: Mapping[int, float] | torch.Tensor | None = None,
    ) -> None:
        """Set the target normalisation ``E = energy_scale * E_net + energy_shift + sum_i e[Z_i]``.

        Args:
            energy_scale, energy_shift: as in the formula (eV).
            force_scale: accepted for the SCN's interface: the forces are ``-dE/dx``, so they
                scale with ``energy_scale``; a different value is refused (None: the same).
            element_energies: per-element reference energies ``{Z: eV}`` or a
                ``[max_num_elements]`` tensor; ``None`` means zero.
        """
        check_finite_scalars(energy_scale=energy_scale, energy_shift=energy_shift)
        if force_scale is not None and not math.isclose(float(force_scale), float(energy_scale), rel_tol=1e-6):
            raise ValueError(
                f"SchNet's forces are -dE/dx, so they scale with the energy: force_scale ({force_scale}) must "
                f"equal energy_scale ({energy_scale})"
            )
        table = element_energy_table(element_energies, like=self.element_energies)
        self.energy_scale.fill_(float(energy_scale))
        self.energy_shift.fill_(float(energy_shift))
        self.element_energies.copy_(table)

    # ------------------------------------------------------------------ geometry
    def check_inputs(self, batch: AtomicBatch) -> None:
        """Raise ``StructureError`` (a ``ValueError``) on input the model cannot handle (atomic
        numbers outside its table, bad cells, ...) rather than return NaN."""
        validate_batch(batch, max_atomic_number=self.config.max_num_elements - 1)

    def graph_batch(self, batch: AtomicBatch) -> AtomicBatch:
        """The batch as the graph sees it: without periodicity when ``use_pbc`` is off."""
        if self.config.use_pbc:
            return batch
        return replace(batch, pbc=torch.zeros_like(batch.pbc))

    def build_graph(self, batch: AtomicBatch) -> Graph:
        """The radius graph this model uses (cutoff, neighbour cap and tie rule of its config);
        build it ahead (e.g. in DataLoader workers) and pass it to ``forward(batch, graph)``."""
        c = self.config
        return build_graph(self.graph_batch(batch), c.cutoff, c.neighbor_cap, ties=c.neighbor_ties)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: AtomicBatch, graph: Graph | None = None, stress: bool = False) -> dict[str, torch.Tensor]:
        """Energy ``[S]``, forces ``[N, 3]`` and (``stress=True``) stress ``[S, 3, 3]`` of every
        structure in ``batch`` (see :func:`~.response.compute_response`)."""
        self.check_inputs(batch)
        return compute_response(self, batch, graph=graph, stress=stress, create_graph=self.training)

    def energy_terms(
        self, batch: AtomicBatch, positions: torch.Tensor, cell: torch.Tensor, graph: Graph | None = None
    ) -> dict[str, torch.Tensor]:
        """Energy ``[S]`` at ``positions`` ``[N, 3]`` and ``cell`` ``[S, 3, 3]`` (the response's
        strained copies of the batch's)."""
        if graph is None or (not self.config.use_pbc and bool(graph.cell_offsets.any())):
            # (a periodic graph from a caller that builds graphs by cutoff and cap alone, such
            # as the trainer's collate, is not this model's when it ignores the cells)
            graph = self.build_graph(batch)
        with no_autocast(positions):  # geometry is never autocast
            if not self.config.use_pbc:
                cell = torch.zeros_like(cell)
            vectors = edge_vectors(positions, cell, batch.batch, graph)
            distance = torch.linalg.vector_norm(vectors, dim=-1)
        return {"energy": self.energy_from_distances(batch, graph.edge_index, distance)}

    def atom_energies(self, atomic_numbers: torch.Tensor, edge_index: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """The network's energy per atom ``[N]`` (before normalisation) from the edges
        ``[2, E]`` (source j, target i) and their lengths ``[E]``."""
        expanded = self.distance_expansion(distance)
        h = self.embedding(atomic_numbers)
        for interaction in self.interactions:
            h = h + interaction(h, edge_index, distance, expanded)
        return self.output(h).squeeze(-1)

    def energy_from_distances(self, batch: AtomicBatch, edge_index: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """Energy ``[S]`` of every structure from given edges ``[2, E]`` and lengths ``[E]``
        (differentiable in the lengths; :meth:`energy_terms` builds them from the positions)."""
        if edge_index.shape[1] != distance.shape[0]:
            raise ValueError(f"{edge_index.shape[1]} edges but {distance.shape[0]} distances")
        dtype = self.energy_scale.dtype
        # under mixed precision the network runs in lower precision; the sums do not
        atom_energy = self.atom_energies(batch.atomic_numbers, edge_index, distance).to(dtype)
        per_structure = torch.zeros(batch.num_structures, dtype=dtype, device=atom_energy.device)
        per_structure = per_structure.index_add(0, batch.batch, atom_energy)
        if self.config.readout == "mean":
            per_structure = per_structure / batch.natoms.to(dtype)
        reference = torch.zeros_like(per_structure).index_add(
            0, batch.batch, self.element_energies[batch.atomic_numbers].to(dtype)
        )
        return per_structure * self.energy_scale + self.energy_shift + reference

    @classmethod
    def from_fairchem(cls, path: str, weights: str = "auto", trust_pickle: bool = False, **overrides) -> "SchNet":
        """Load a checkpoint of the official SchNet (see :func:`~.checkpoint.load_model`, which
        reads every kind); a checkpoint of another model is refused."""
        from .checkpoint import CheckpointError, load_model

        model = load_model(path, weights=weights, trust_pickle=trust_pickle, **overrides)
        if not isinstance(model, cls):
            raise CheckpointError(f"{path}: a {type(model).__name__} checkpoint, not SchNet")
        return model
