"""Radius graph with the semantics of the official SCN code (fairchem-core 1.10).

Per structure, candidate edges are all (centre i, neighbour j, lattice shift n),
including j == i with n != 0, kept if ``1e-4 < d^2 <= cutoff^2`` where
``d = |pos[j] + n @ cell - pos[i]|``; then at most ``max_num_neighbors`` nearest
neighbours per centre are kept. Pairs closer than 0.01 A (which the official code
silently drops) raise instead, because they mean overlapping atoms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import vesin

from .batch import AtomicBatch

__all__ = ["Graph", "build_graph", "edge_vectors", "neighbor_ranks"]

# Squared distance (A^2) at or below which two atoms (or an atom and its image)
# overlap; the official code drops such pairs.
_MIN_DIST_SQ = 1e-4
# Vesin is asked for a slightly larger cutoff so that the inclusive rule
# d^2 <= cutoff^2 is decided here, not by vesin's own comparison.
_CUTOFF_PAD = 1e-6


@dataclass
class Graph:
    """Directed edges j -> i of a batch.

    Attributes:
        edge_index: [2, E] long; row 0 = source (neighbour j), row 1 = target
            (centre i); global atom indices. Sorted by target, then source, then
            shift (lexicographic), as in the official code.
        cell_offsets: [E, 3] long; integer lattice shift n of the source image, so
            the edge vector is ``positions[j] + n @ cell[s] - positions[i]``.
    """

    edge_index: torch.Tensor
    cell_offsets: torch.Tensor

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to(self, device: torch.device | str) -> "Graph":
        return Graph(self.edge_index.to(device), self.cell_offsets.to(device))


def _structure_edges(
    pos: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    max_num_neighbors: int,
    structure: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges of one structure: (i [E], j [E], shift [E,3]) int64, local indices,
    sorted by (i, j, shift)."""
    n = pos.shape[0]
    if n == 0 or max_num_neighbors <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 3), dtype=np.int64)

    # Vesin ignores the box along non-periodic axes (a zero cell is fine there) and
    # handles unwrapped positions, cells smaller than the cutoff and self-images.
    box = cell if pbc.any() else np.zeros((3, 3))
    # One thread: vesin's output order is then reproducible (it fixes the order of
    # ties below), and on few cores it was faster than its automatic threading.
    nl = vesin.NeighborList(
        cutoff=cutoff * (1.0 + _CUTOFF_PAD) + _CUTOFF_PAD, full_list=True, n_threads=1
    )
    i, j, shift, vec = nl.compute(pos, box, [bool(p) for p in pbc], quantities="ijSD")
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    shift = shift.astype(np.int64)
    d2 = np.einsum("ek,ek->e", vec, vec)

    close = d2 <= _MIN_DIST_SQ
    if close.any():
        k = int(np.flatnonzero(close)[0])
        a, b, dist = int(i[k]), int(j[k]), float(np.sqrt(d2[k]))
        if a == b:
            msg = (
                f"atom {a} of structure {structure} is {dist:.5f} A from its own "
                f"periodic image {shift[k].tolist()}"
            )
        else:
            a, b = min(a, b), max(a, b)
            msg = f"atoms {a} and {b} of structure {structure} are {dist:.5f} A apart"
        raise ValueError(msg + " (overlapping atoms: distance <= 0.01 A)")

    keep = d2 <= cutoff * cutoff
    i, j, shift, d2 = i[keep], j[keep], shift[keep], d2[keep]

    # Sort by centre, then distance (two stable sorts: faster than np.lexsort here);
    # equal distances keep vesin's (deterministic) order.
    order = np.argsort(d2, kind="stable")
    order = order[np.argsort(i[order], kind="stable")]
    i, j, shift = i[order], j[order], shift[order]

    counts = np.bincount(i, minlength=n)
    first = np.cumsum(counts) - counts
    rank = np.arange(i.shape[0]) - first[i]
    keep = rank < max_num_neighbors
    i, j, shift = i[keep], j[keep], shift[keep]

    # Output in the official order, (i, j, n) lexicographic: SCN's ranking breaks
    # exact distance ties (an atom's images at +n and -n) by position in this order.
    order = np.lexsort((shift[:, 2], shift[:, 1], shift[:, 0], j, i))
    return i[order], j[order], shift[order]


def build_graph(batch: AtomicBatch, cutoff: float, max_num_neighbors: int) -> Graph:
    """Radius graph of ``batch`` with the official SCN rules (see module docstring).

    Computed on CPU in float64 from ``batch.positions`` (no gradient); the result is
    put on the device of ``batch.positions``. Raises ValueError for atoms closer than
    0.01 A (naming the structure and atoms).
    """
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    positions = batch.positions.detach().to("cpu", torch.float64).numpy()
    cells = batch.cell.detach().to("cpu", torch.float64).numpy()
    pbcs = batch.pbc.detach().cpu().numpy().astype(bool)
    natoms = batch.natoms.detach().cpu().numpy()
    starts = np.cumsum(natoms) - natoms

    empty = np.zeros(0, dtype=np.int64)
    sources, targets, shifts = [empty], [empty], [np.zeros((0, 3), dtype=np.int64)]
    for s in range(len(natoms)):
        lo, hi = int(starts[s]), int(starts[s] + natoms[s])
        i, j, shift = _structure_edges(
            np.ascontiguousarray(positions[lo:hi]), cells[s], pbcs[s], cutoff, max_num_neighbors, s
        )
        targets.append(i + lo)
        sources.append(j + lo)
        shifts.append(shift)

    device = batch.positions.device
    edge_index = torch.from_numpy(np.stack([np.concatenate(sources), np.concatenate(targets)]))
    cell_offsets = torch.from_numpy(np.concatenate(shifts))
    return Graph(edge_index=edge_index.to(device), cell_offsets=cell_offsets.to(device))


def edge_vectors(
    positions: torch.Tensor, cell: torch.Tensor, batch_index: torch.Tensor, graph: Graph
) -> torch.Tensor:
    """Edge vectors ``positions[j] + n @ cell[s] - positions[i]``: [E, 3].

    Args:
        positions: [N, 3]; cell: [S, 3, 3]; batch_index: [N] structure of each atom.
    Differentiable with respect to ``positions`` and ``cell`` (for forces and stress).
    """
    src, dst = graph.edge_index[0], graph.edge_index[1]
    offsets = graph.cell_offsets.to(positions.dtype)
    # Same operation order as the official code, (pos_j - pos_i) + n @ cell: an atom's
    # images at +n and -n then get bitwise equal lengths, as there.
    shift = torch.bmm(offsets.unsqueeze(1), cell[batch_index[dst]]).squeeze(1)
    return (positions[src] - positions[dst]) + shift


def neighbor_ranks(
    distance: torch.Tensor,
    target: torch.Tensor,
    num_atoms: int,
    max_num_neighbors: int | None = None,
) -> torch.Tensor:
    """Rank of each edge among the edges of its target by distance (0 = nearest): [E] long.

    Args:
        distance: [E] edge lengths; target: [E] centre atom of each edge (any order);
        num_atoms: N, number of atoms (targets lie in [0, N));
        max_num_neighbors: width K of the per-atom table (default: the largest number
            of edges of one target). Pass the graph's cap to break ties exactly as SCN.

    Follows the official algorithm (fairchem ``SCN._rank_edge_distances``): each
    target's distances, in edge order, fill a row of an [N, K] table padded with inf,
    and the rows are sorted with ``torch.sort``. Distinct distances get the same ranks
    under any method; exact ties (an atom's images at +n and -n) then fall as in the
    official code, given the same edge order and distances, on CPU.
    """
    e = target.shape[0]
    device = target.device
    if e == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    # Group by target, keeping the edge order within a target (it decides ties).
    perm = torch.sort(target, stable=True).indices
    tgt = target[perm]
    counts = torch.bincount(target, minlength=num_atoms)
    width = int(counts.max())
    if max_num_neighbors is not None:
        width = max(width, int(max_num_neighbors))
    column = torch.arange(e, device=device) - (torch.cumsum(counts, 0) - counts)[tgt]
    table = torch.full((num_atoms, width), float("inf"), dtype=distance.dtype, device=device)
    table[tgt, column] = distance.detach()[perm]
    order = torch.sort(table, dim=1).indices  # order[t, r] = column holding rank r
    rank_of_column = torch.empty_like(order)
    rank_of_column.scatter_(1, order, torch.arange(width, device=device).expand(num_atoms, width))
    ranks = torch.empty(e, dtype=torch.long, device=device)
    ranks[perm] = rank_of_column[tgt, column]
    return ranks
