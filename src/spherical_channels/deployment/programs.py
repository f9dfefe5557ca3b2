"""The tensor programs that are exported: a model's energy (and forces) from flat tensors.

A program is an ``nn.Module`` whose ``forward`` takes the tensors of
:func:`~.inputs.flat_inputs` and returns ``(energy [S], forces [N, 3])`` (``(energy,)`` for a
model without forces). It holds the model and calls the model's own code from the edge vectors
on (``SCN.predict``, ``SchNet.energy_from_distances``), so the exported numbers are the
model's. For an energy-conserving model the forces are ``-dE/dx`` by ``torch.autograd.grad``
inside ``forward``; tracing it with ``make_fx`` writes the backward pass into the graph as
ordinary operations, which is what makes it exportable.

Supported: the SCN (not the smooth variant; eval roll ``"fixed"`` or no rotation) and SchNet.
SpinConv is refused: its edge frames and sphere splats pick neighbours and poles from the data
and check them with Python-side conditionals (``int(...)``, ``float(...)``), which a graph of
fixed operations cannot hold.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .inputs import GraphOptions

__all__ = ["ExportError", "ProgramSpec", "program_spec"]


class ExportError(ValueError):
    """A model (or a request) that cannot be exported, or an artefact that fails its checks."""


class ProgramBatch:
    """What the models read of a batch inside a program, with sizes kept symbolic (an
    ``AtomicBatch`` turns them into Python ints, which tracing would freeze).

    Shapes: ``atomic_numbers [N]``, ``batch [N]``, ``natoms [S]``.
    """

    def __init__(self, atomic_numbers: torch.Tensor, batch: torch.Tensor, natoms: torch.Tensor) -> None:
        self.atomic_numbers, self.batch, self.natoms = atomic_numbers, batch, natoms

    @property
    def num_structures(self):  # noqa: ANN201 - an int, or a symbolic size while tracing
        return self.natoms.shape[0]

    @property
    def num_atoms(self):  # noqa: ANN201
        return self.atomic_numbers.shape[0]


class _Program(nn.Module):
    """Shared part: edge vectors from the flat inputs, forces by autograd when conservative."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.conservative = bool(model.conservative)
        self.regress_forces = bool(model.regress_forces)

    def terms(
        self, batch: ProgramBatch, edge_index: torch.Tensor, vectors: torch.Tensor, group_sizes: list
    ) -> dict[str, torch.Tensor]:
        """The model's ``{"energy": [S], ("forces": [N, 3] of a direct head)}`` from edges
        ``[2, E]`` and vectors ``[E, 3]`` (groups of ``group_sizes`` edges, in order)."""
        raise NotImplementedError

    def forward(
        self, positions: torch.Tensor, atomic_numbers: torch.Tensor, batch: torch.Tensor, natoms: torch.Tensor,
        *edge_groups: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """``(energy [S], forces [N, 3])`` (``(energy,)`` without forces); inputs as
        :func:`~.inputs.flat_inputs` gives them."""
        gradient = self.conservative and self.regress_forces
        with torch.enable_grad() if gradient else contextlib.nullcontext():
            if gradient:
                positions = positions.detach().requires_grad_(True)
            indices, shifts = list(edge_groups[0::2]), list(edge_groups[1::2])
            edge_index = torch.cat(indices, dim=1) if len(indices) > 1 else indices[0]
            shift = torch.cat(shifts, dim=0) if len(shifts) > 1 else shifts[0]
            # (pos_j - pos_i) + n @ cell, the order of edge_vectors: the same bits
            vectors = (positions[edge_index[0]] - positions[edge_index[1]]) + shift
            sizes = [index.shape[1] for index in indices]
            out = self.terms(ProgramBatch(atomic_numbers, batch, natoms), edge_index, vectors, sizes)
            energy = out["energy"]
            if gradient:
                (grad,) = torch.autograd.grad(energy.sum(), positions, allow_unused=True)
                forces = -grad if grad is not None else torch.zeros_like(positions)
                return energy.detach(), forces.detach()
        if self.regress_forces:
            return energy, out["forces"]
        return (energy,)


class SCNProgram(_Program):
    """An :class:`~spherical_channels.models.SCN` as a program (edge groups = resolutions)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.roll = model.current_roll if model.edge_rotation else "none"

    def terms(
        self, batch: ProgramBatch, edge_index: torch.Tensor, vectors: torch.Tensor, group_sizes: list
    ) -> dict[str, torch.Tensor]:
        from ..models.scn import EdgeData
        from ..so3.frames import edge_frames

        starts = [0]
        for size in group_sizes:
            starts.append(starts[-1] + size)
        edges = EdgeData(
            edge_index=edge_index,
            cell_offsets=None,  # not read by SCN.predict (the shifts are in the vectors)
            vectors=vectors,
            distance=torch.linalg.vector_norm(vectors, dim=-1),
            rank=None,  # ranks chose the groups outside; SCN.predict does not read them
            frames=edge_frames(vectors, self.roll),
            resolution_slices=[slice(starts[g], starts[g + 1]) for g in range(len(group_sizes))],
        )
        return self.model.predict(batch, edges)


class SchNetProgram(_Program):
    """A :class:`~spherical_channels.models.SchNet` as a program (one edge group)."""

    def terms(
        self, batch: ProgramBatch, edge_index: torch.Tensor, vectors: torch.Tensor, group_sizes: list
    ) -> dict[str, torch.Tensor]:
        distance = torch.linalg.vector_norm(vectors, dim=-1)
        return {"energy": self.model.energy_from_distances(batch, edge_index, distance)}


@dataclass(frozen=True)
class ProgramSpec:
    """How one kind of model is exported: its registry name, graph options and program."""

    name: str
    graph_options: Callable[[nn.Module], GraphOptions]
    program: Callable[[nn.Module], _Program]
    max_atomic_number: Callable[[nn.Module], int]


def _scn_options(model: nn.Module) -> GraphOptions:
    c = model.config
    cap = c.neighbor_cap
    # A group that no edge can reach (a cap at or below its rank boundary) is left out: its
    # messages are sums over no edges, i.e. zero.
    boundaries = tuple(b for b in model.rank_boundaries if b < cap)
    return GraphOptions(
        cutoff=float(c.cutoff), max_num_neighbors=int(cap), ties=c.neighbor_ties, use_pbc=True,
        rank_boundaries=boundaries, rank_width=int(c.max_num_neighbors),
    )


def _schnet_options(model: nn.Module) -> GraphOptions:
    c = model.config
    return GraphOptions(
        cutoff=float(c.cutoff), max_num_neighbors=int(c.neighbor_cap), ties=c.neighbor_ties, use_pbc=bool(c.use_pbc)
    )


def _check_scn(model: nn.Module) -> None:
    c = model.config
    if c.smooth:
        raise ExportError(
            "the smooth SCN cannot be exported: which edges it sends twice depends on the distances "
            "(a data-dependent number of edge copies); export a model with smooth=False"
        )
    if c.edge_rotation and model.current_roll != "fixed":
        raise ExportError(
            f"this SCN's eval roll is {model.current_roll!r}: an exported model is deterministic; "
            "set eval_roll='fixed' (model.update_config(eval_roll='fixed')) before exporting"
        )


def program_spec(model: nn.Module) -> ProgramSpec:
    """The :class:`ProgramSpec` of ``model``, or :class:`ExportError` saying why it has none."""
    from ..models.registry import spec_of

    try:
        name = spec_of(model).name
    except TypeError:  # not a registered model
        raise ExportError(
            f"cannot export a {type(model).__name__}: only this package's SCN and SchNet models can be exported"
        ) from None
    if name == "scn":
        _check_scn(model)
        return ProgramSpec("scn", _scn_options, SCNProgram, lambda m: int(m.config.max_num_elements) - 1)
    if name == "schnet":
        return ProgramSpec("schnet", _schnet_options, SchNetProgram, lambda m: int(m.config.max_num_elements) - 1)
    raise ExportError(
        f"cannot export a {name} model: only SCN and SchNet can be exported (SpinConv's edge frames and sphere "
        "splats choose neighbours and poles from the data, which a fixed graph of operations cannot hold)"
    )
