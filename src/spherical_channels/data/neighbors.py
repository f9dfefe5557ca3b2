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
from .cells import complete_cell

__all__ = ["GRAPH_METHODS", "Graph", "build_graph", "edge_vectors", "neighbor_ranks"]

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
        _raise_overlap(structure, int(i[k]), int(j[k]), shift[k].tolist(), float(np.sqrt(d2[k])))

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


GRAPH_METHODS = ("auto", "vesin", "torch")
# Centre x neighbour x image distances evaluated at once by the torch path (bounds its memory:
# 2^22 float64 values and their vectors are ~130 MB).
_TORCH_CHUNK = 1 << 22


def build_graph(
    batch: AtomicBatch, cutoff: float, max_num_neighbors: int, method: str = "auto"
) -> Graph:
    """Radius graph of ``batch`` with the official SCN rules (see module docstring).

    Args:
        method: ``"vesin"`` (cell lists on the CPU; the result is moved to the batch's
            device), ``"torch"`` (all pairs against all needed lattice images, in chunks, on
            the batch's device: the fast path on a GPU), or ``"auto"``: torch for batches
            on a CUDA device, vesin otherwise. Both give the same edges in the same order
            (up to exact distance ties at the ``max_num_neighbors`` cut).

    Computed in float64 from ``batch.positions`` (no gradient). Raises ValueError for atoms
    closer than 0.01 A (naming the structure and atoms).
    """
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if method not in GRAPH_METHODS:
        raise ValueError(f"unknown graph method {method!r}; expected one of {GRAPH_METHODS}")
    if method == "auto":
        method = "torch" if batch.positions.is_cuda else "vesin"
    if method == "torch":
        return _torch_graph(batch, cutoff, max_num_neighbors)
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


def _torch_graph(batch: AtomicBatch, cutoff: float, max_num_neighbors: int) -> Graph:
    """The radius graph by the torch path (see :func:`build_graph`)."""
    device = batch.positions.device
    positions = batch.positions.detach().to(torch.float64)
    natoms = batch.natoms.tolist()
    starts = np.cumsum([0] + natoms[:-1])
    pbcs = batch.pbc.cpu().numpy().astype(bool)
    cells = [complete_cell(c, p) for c, p in zip(batch.cell.detach().cpu().double().numpy(), pbcs)]
    # Images n_k in [-r_k, r_k] along periodic axes, r_k = ceil(cutoff |b_k|), complete for
    # wrapped positions; structures with the same range are processed together.
    ranges = [
        tuple(int(np.ceil(cutoff * np.linalg.norm(b))) if p else 0 for b, p in zip(np.linalg.inv(c).T, pbc))
        for c, pbc in zip(cells, pbcs)
    ]
    groups: dict[tuple[int, ...], list[int]] = {}
    for s, r in enumerate(ranges):
        if natoms[s] and max_num_neighbors > 0:
            groups.setdefault(r, []).append(s)
    parts = []
    for r, members in groups.items():
        parts.append(
            _torch_group_edges(positions, cells, pbcs, starts, natoms, members, r, cutoff, max_num_neighbors)
        )
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Graph(torch.stack([empty, empty]), torch.zeros(0, 3, dtype=torch.long, device=device))
    i, j, shift, key = (torch.cat(t) for t in zip(*parts))
    # (target, source, image) lexicographic, as the vesin path: two stable sorts
    order = torch.sort(key, stable=True).indices
    order = order[torch.sort(i[order], stable=True).indices]
    return Graph(edge_index=torch.stack([j[order], i[order]]), cell_offsets=shift[order])


def _torch_group_edges(
    positions: torch.Tensor,
    cells: list[np.ndarray],
    pbcs: np.ndarray,
    starts: np.ndarray,
    natoms: list[int],
    members: list[int],
    reps: tuple[int, ...],
    cutoff: float,
    max_num_neighbors: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edges of structures sharing the image range ``reps``: global target i, source j, shift
    and a key ordering the edges of one target by (source, image)."""
    device = positions.device
    num = len(members)
    width = max(natoms[s] for s in members)  # atoms padded to the largest structure
    shifts = torch.cartesian_prod(*(torch.arange(-k, k + 1, device=device) for k in reps)).view(-1, 3)
    num_images = shifts.shape[0]
    zero_image = num_images // 2  # n = (0, 0, 0) sits in the middle of the product
    cell = torch.tensor(np.stack([cells[s] for s in members]), dtype=torch.float64, device=device)
    pbc = torch.tensor(pbcs[members], device=device)

    index = torch.full((num, width), -1, dtype=torch.long, device=device)
    for g, s in enumerate(members):
        index[g, : natoms[s]] = torch.arange(starts[s], starts[s] + natoms[s], device=device)
    valid = index >= 0
    pos = positions[index.clamp(min=0)]  # [G, A, 3]
    # Wrap into the cell along periodic axes; shifts are mapped back to the given positions.
    frac = torch.linalg.solve(cell.transpose(1, 2), pos.transpose(1, 2)).transpose(1, 2)
    wrap = torch.where(pbc.unsqueeze(1), torch.floor(frac), torch.zeros_like(frac))
    pos = pos - torch.bmm(wrap, cell)
    wrap = wrap.long()
    image_vectors = torch.einsum("mk,gkc->gmc", shifts.double(), cell)  # [G, M, 3]
    images = pos.unsqueeze(2) + image_vectors.unsqueeze(1)  # [G, A(j), M, 3]

    chunk = max(1, _TORCH_CHUNK // max(1, num * width * num_images))
    k = min(max_num_neighbors, width * num_images)
    out_i, out_j, out_m, out_g = [], [], [], []
    for lo in range(0, width, chunk):
        hi = min(width, lo + chunk)
        d2 = ((images.unsqueeze(1) - pos[:, lo:hi, None, None, :]) ** 2).sum(-1)  # [G, c, A, M]
        centre = torch.arange(lo, hi, device=device)
        self_pair = (centre.view(1, -1, 1, 1) == torch.arange(width, device=device).view(1, 1, -1, 1)) & (
            torch.arange(num_images, device=device).view(1, 1, 1, -1) == zero_image
        )
        pair_valid = valid[:, lo:hi, None, None] & valid[:, None, :, None] & ~self_pair
        close = pair_valid & (d2 <= _MIN_DIST_SQ)
        if bool(close.any()):
            g, c, j, m = (int(t) for t in torch.nonzero(close)[0])
            _raise_overlap(members[g], lo + c, j, shifts[m].tolist(), float(d2[g, c, j, m].sqrt()))
        d2 = torch.where(pair_valid & (d2 <= cutoff * cutoff), d2, torch.full_like(d2, float("inf")))
        values, flat = torch.topk(d2.view(num, hi - lo, -1), k, dim=2, largest=False, sorted=False)
        g, c, slot = torch.nonzero(torch.isfinite(values), as_tuple=True)
        chosen = flat[g, c, slot]
        out_g.append(g)
        out_i.append(c + lo)
        out_j.append(torch.div(chosen, num_images, rounding_mode="floor"))
        out_m.append(chosen % num_images)
    g, i, j, m = (torch.cat(t) for t in (out_g, out_i, out_j, out_m))
    shift = shifts[m] - wrap[g, j] + wrap[g, i]
    global_i, global_j = index[g, i], index[g, j]
    return global_i, global_j, shift, j * num_images + m


def _raise_overlap(structure: int, a: int, b: int, shift: list[int], dist: float) -> None:
    if a == b:
        msg = f"atom {a} of structure {structure} is {dist:.5f} A from its own periodic image {shift}"
    else:
        a, b = min(a, b), max(a, b)
        msg = f"atoms {a} and {b} of structure {structure} are {dist:.5f} A apart"
    raise ValueError(msg + " (overlapping atoms: distance <= 0.01 A)")


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
