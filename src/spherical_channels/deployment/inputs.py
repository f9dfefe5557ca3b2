"""The graph side of an exported model: from an ``AtomicBatch`` to the program's flat tensors.

An exported program takes no ``AtomicBatch`` and builds no graph (neither is a tensor program:
both have sizes that depend on the data). The radius graph, and for the SCN each edge's rank
among its target's edges and hence its resolution, are computed here, in Python, by this
package's own graph code, with the options stored in the artefact; the program receives

    positions [N, 3], atomic_numbers [N], batch [N], natoms [S],
    then per edge group g: edge_index_g [2, E_g] (source, target), shifts_g [E_g, 3]

where ``shifts = n @ cell`` is the Cartesian lattice shift of each edge's source image, so that
the program's edge vectors ``positions[source] - positions[target] + shifts`` are the models'
own (:func:`~spherical_channels.data.neighbors.edge_vectors`, same operation order, so the same
bits). Edge groups are the SCN's resolutions (ranks ``< 12`` first, then the rest, each in the
graph's order); other models have one group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

import torch

from ..data.batch import AtomicBatch
from ..data.neighbors import Graph, build_graph, neighbor_ranks

__all__ = ["BASE_INPUTS", "GraphOptions", "flat_inputs", "input_names"]

#: The program's inputs before the edge groups.
BASE_INPUTS = ("positions", "atomic_numbers", "batch", "natoms")


@dataclass(frozen=True)
class GraphOptions:
    """How an exported model's graph is built (stored in the artefact).

    Attributes:
        cutoff: radius (Å, inclusive).
        max_num_neighbors: the graph's neighbour cap per atom.
        ties: the tie rule of the cap and the ranks (``"official"`` or ``"shell"``).
        use_pbc: ``False``: every structure is treated as a molecule (SchNet's option).
        rank_boundaries: edges of rank ``>= b`` (among their target's edges, by distance) go to
            the next group; empty: one group.
        rank_width: width of the official rank table (the SCN's ``max_num_neighbors``).
    """

    cutoff: float
    max_num_neighbors: int
    ties: str = "official"
    use_pbc: bool = True
    rank_boundaries: tuple[int, ...] = field(default_factory=tuple)
    rank_width: int | None = None

    @property
    def num_groups(self) -> int:
        """Number of edge groups the program takes."""
        return len(self.rank_boundaries) + 1

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON)."""
        out = asdict(self)
        out["rank_boundaries"] = list(self.rank_boundaries)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GraphOptions":
        """The options written by :meth:`to_dict`."""
        values = dict(values)
        values["rank_boundaries"] = tuple(int(b) for b in values.get("rank_boundaries", ()))
        return cls(**values)


def input_names(num_groups: int) -> list[str]:
    """Names of the program's inputs, in order."""
    names = list(BASE_INPUTS)
    for g in range(num_groups):
        names += [f"edge_index_{g}", f"shifts_{g}"]
    return names


def flat_inputs(batch: AtomicBatch, options: GraphOptions, graph: Graph | None = None) -> tuple[torch.Tensor, ...]:
    """The program's inputs for ``batch`` (module docstring): ``4 + 2 * num_groups`` tensors.

    Args:
        batch: the structures, in the program's dtype and on its device.
        options: the artefact's graph options.
        graph: a prebuilt graph of ``batch`` with these options (else it is built here).
    """
    if graph is None:
        graph_batch = batch if options.use_pbc else replace(batch, pbc=torch.zeros_like(batch.pbc))
        graph = build_graph(graph_batch, options.cutoff, options.max_num_neighbors, ties=options.ties)
    positions = batch.positions.detach()
    cell = batch.cell.detach().to(positions.dtype)
    if not options.use_pbc:
        cell = torch.zeros_like(cell)
    edge_index = graph.edge_index
    source, target = edge_index
    offsets = graph.cell_offsets.to(positions.dtype)
    shifts = torch.bmm(offsets.unsqueeze(1), cell[batch.batch[target]]).squeeze(1)
    groups: list[tuple[torch.Tensor, torch.Tensor]]
    if options.rank_boundaries:
        distance = torch.linalg.vector_norm((positions[source] - positions[target]) + shifts, dim=-1)
        rank = neighbor_ranks(distance, target, positions.shape[0], options.rank_width, ties=options.ties)
        group = torch.zeros_like(rank)
        for boundary in options.rank_boundaries:
            group += (rank >= boundary).long()
        order = torch.argsort(group, stable=True)  # the SCN's own grouping: stable within a group
        counts = torch.bincount(group, minlength=options.num_groups).tolist()
        index_parts = torch.split(edge_index[:, order], counts, dim=1)
        shift_parts = torch.split(shifts[order], counts, dim=0)
        groups = list(zip(index_parts, shift_parts))
    else:
        groups = [(edge_index, shifts)]
    flat = [positions, batch.atomic_numbers, batch.batch, batch.natoms]
    for index, shift in groups:
        flat += [index.contiguous(), shift.contiguous()]
    return tuple(flat)
