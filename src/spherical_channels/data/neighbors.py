"""Radius graph with the semantics of the official SCN code (fairchem-core 1.10), and an
order-independent variant of its neighbour cap.

Candidates (every rule, both methods). Per structure, all (centre i, neighbour j, lattice
shift n), including j == i with n != 0, with ``d = |(pos[j] - pos[i]) + n @ cell|`` computed
in float64 from the given (possibly unwrapped) positions, by the same formula in both methods,
kept if ``d <= cutoff`` (inclusive, as the official ``d^2 <= cutoff^2``). Atoms (or an atom and
its image) at ``d <= MIN_DISTANCE`` (0.01 A; the official code drops them silently) raise
:class:`~spherical_channels.data.validation.StructureError`.

The cap (``max_num_neighbors`` = K per centre) and the neighbour ranks, by ``ties``:

``"official"`` (the official models; the fixtures)
    Cap: the K nearest. fairchem sorts each centre's d^2 (float32) in (j, n) order with the
    unstable ``torch.sort``, so which members of a shell of equal distances survive a cut
    through it depends on atom order and on the sort's internals. Here exact float64 ties at
    the cut are broken by the edge vector instead (x, then y, then z, ascending), which names
    no atom: the kept set is the same under any permutation of the atoms. It cannot be made
    independent of translation: translating and wrapping a perfect crystal changes its equal
    distances by rounding (~1e-15 relative), and the rule then keeps the rounding's choice.
    Structures without ties at the cut get the official edges (fairchem decides in the model's
    dtype, here in float64: distances equal to within float32 rounding may differ).
    Ranks (:func:`neighbor_ranks`): fairchem's ``SCN._rank_edge_distances``, reproduced
    exactly: each centre's distances fill a row of an [N, K] table in edge order, (j, n),
    padded with inf, sorted by ``torch.sort``. Ties (an atom's own images at +n and -n have
    bitwise equal lengths; in crystals, whole shells) fall as that sort puts them: on the CPU,
    ``std::sort``, unstable for rows over 16 entries. This stays dependent on atom order: it is
    not the order of the row (only 6 of the 26 tie groups of the fixtures are ranked in edge
    order), so any rule that does not run the same sort on the same row changes the fixtures'
    ranks. Only ranks at a resolution boundary (12) change results; the fixtures have none.

``"shell"`` (order-independent)
    A centre's distances, sorted, split into shells wherever the gap between consecutive
    distances exceeds :data:`SHELL_TOLERANCE` (1e-4 A). An edge's rank is the number of edges
    in nearer shells (all members of a shell share the lowest rank). Cap: edges of rank < K,
    i.e. a shell that the cap would cut is kept whole (at most K - 1 + shell size edges; a
    centre never gets fewer than min(K, candidates)). Resolution (rank < 12 full): a shell
    across rank 12 gets the full resolution whole. Both depend on distances alone, so the
    edge set maps exactly under permutations and translate+wrap.

Sizes. Before anything is allocated, a periodic structure whose cutoff sphere would reach more
than :data:`MAX_PERIODIC_IMAGES` periodic images of its cell, or about
:data:`MAX_CANDIDATE_PAIRS` candidate pairs, raises ``StructureError`` (the cell is too small
for the cutoff: a 0.02 A cell with a 6 A cutoff would need ~1e8 pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import vesin

from .batch import AtomicBatch
from .cells import complete_cell, periodic_heights
from .validation import MIN_DISTANCE, StructureError, cell_problem, located_message, overlap_message

__all__ = [
    "GRAPH_METHODS",
    "MAX_CANDIDATE_PAIRS",
    "MAX_PERIODIC_IMAGES",
    "SHELL_TOLERANCE",
    "TIES",
    "Graph",
    "build_graph",
    "edge_vectors",
    "neighbor_ranks",
]

GRAPH_METHODS = ("auto", "vesin", "torch")
#: Rules for equal distances at the neighbour cap and at resolution boundaries.
TIES = ("official", "shell")
#: Distances (Angstrom) closer than this to the next one belong to one shell (``ties="shell"``).
#: Above the noise of equal distances: a float32 coordinate below 64 A is rounded by at most
#: 3.8e-6 A, so distances from float32 positions, or computed in float32, carry at most
#: ~2e-5 A of error. Far below any physical distinction: relaxations converge positions to
#: ~1e-3 A, and fairchem's own non-strict cap counts d^2 within 0.01 A^2 (1e-3 A at 5 A) as equal.
SHELL_TOLERANCE = 1e-4
#: Most lattice translations per structure that the image search may need, prod(2 r_k + 1)
#: with r_k = ceil(cutoff / thickness_k). A cell 0.5 A thick (the validation layer's minimum)
#: with a 20 A cutoff needs 81^3 = 5.3e5; real cells (>= 1.5 A) at 12 A need <= 17^3.
MAX_PERIODIC_IMAGES = 1_000_000
#: Most candidate pairs (i, j, n) within the cutoff per structure, estimated beforehand. Each
#: costs ~170 bytes while the graph is built (measured), so this is ~8 GB: 2.7e5 Cu atoms at
#: 8 A, far beyond what one SCN forward pass fits; a 0.02 A cell at 6 A needs 1.1e8 per atom.
MAX_CANDIDATE_PAIRS = 50_000_000

# Candidates are searched slightly beyond the cutoff, so that the inclusive rule d <= cutoff is
# decided here on the common float64 distance, not by each search's own rounding.
_CUTOFF_PAD = 1e-6
# Centre x neighbour x image distances evaluated at once by the torch path (bounds its memory:
# 2^22 float64 values and their vectors are ~130 MB).
_TORCH_CHUNK = 1 << 22


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


# ---------------------------------------------------------------------------- entry point
def build_graph(
    batch: AtomicBatch,
    cutoff: float,
    max_num_neighbors: int,
    method: str = "auto",
    ties: str = "official",
) -> Graph:
    """Radius graph of ``batch``: at most ``max_num_neighbors`` nearest neighbours per atom
    within ``cutoff`` (Angstrom, inclusive), periodic images included (module docstring).

    Args:
        method: ``"vesin"`` (cell lists on the CPU; the result is moved to the batch's
            device), ``"torch"`` (all pairs against all needed lattice images, in chunks, on
            the batch's device: the fast path on a GPU), or ``"auto"``: torch for batches
            on a CUDA device, vesin otherwise. Both give the same edges in the same order.
        ties: ``"official"`` (the K nearest; exact ties at the cut broken by the edge
            vector) or ``"shell"`` (a shell of distances within :data:`SHELL_TOLERANCE`
            that the cap would cut is kept whole); see :data:`TIES`.

    Computed in float64 from ``batch.positions`` (no gradient). Raises ``ValueError`` for bad
    arguments and :class:`~spherical_channels.data.validation.StructureError` (naming the
    structure) for non-finite positions, singular periodic cells, cells too small for the
    cutoff and overlapping atoms.
    """
    _check_arguments(cutoff, max_num_neighbors, method, ties)
    cutoff = float(cutoff)
    if method == "auto":
        method = "torch" if batch.positions.is_cuda else "vesin"
    device = batch.positions.device
    positions = batch.positions.detach().to(torch.float64)
    cells = batch.cell.detach().to("cpu", torch.float64).numpy()
    pbcs = batch.pbc.detach().cpu().numpy().astype(bool)
    natoms = batch.natoms.detach().cpu().numpy().astype(np.int64)
    starts = np.cumsum(natoms) - natoms
    _check_structures(positions, cells, pbcs, natoms, starts, cutoff)

    search = cutoff * (1.0 + _CUTOFF_PAD) + _CUTOFF_PAD
    if method == "torch":
        i, j, shift = _torch_candidates(positions, cells, pbcs, natoms, starts, search)
    else:
        i, j, shift = _vesin_candidates(positions.cpu().numpy(), cells, pbcs, natoms, starts, search)
        i, j, shift = (torch.from_numpy(t).to(device) for t in (i, j, shift))

    structure = torch.repeat_interleave(
        torch.arange(len(natoms), device=device), torch.as_tensor(natoms, device=device)
    )
    # Shifts along non-periodic axes are 0; zero those rows so that whatever they hold (NaN
    # included) cannot reach the vectors.
    periodic_cells = torch.as_tensor(np.where(pbcs[:, :, None], cells, 0.0), device=device)
    vec = _vectors64(positions, periodic_cells, structure[i], i, j, shift)
    d2 = vec[:, 0] * vec[:, 0] + vec[:, 1] * vec[:, 1] + vec[:, 2] * vec[:, 2]
    _check_overlaps(d2, i, j, shift, structure, starts)
    inside = d2 <= cutoff * cutoff
    i, j, shift, d2, vec = i[inside], j[inside], shift[inside], d2[inside], vec[inside]

    keep = _cap(i, d2, vec, positions.shape[0], max_num_neighbors, ties)
    if keep is not None:
        i, j, shift = i[keep], j[keep], shift[keep]
    # Output in the official order, (i, j, n) lexicographic: SCN's ranking breaks exact
    # distance ties (an atom's images at +n and -n) by position in this order.
    order = _edge_order(i, j, shift, positions.shape[0])
    return Graph(edge_index=torch.stack([j[order], i[order]]), cell_offsets=shift[order])


def _check_arguments(cutoff: float, max_num_neighbors: int, method: str, ties: str) -> None:
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not math.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"cutoff must be a finite positive number (Angstrom), got {cutoff!r}")
    integer = isinstance(max_num_neighbors, (int, np.integer)) and not isinstance(max_num_neighbors, bool)
    if not integer or max_num_neighbors < 1:
        # fairchem reads a cap <= 0 as "no cap": refuse rather than guess either way.
        raise ValueError(f"max_num_neighbors must be a positive integer, got {max_num_neighbors!r}")
    if method not in GRAPH_METHODS:
        raise ValueError(f"unknown graph method {method!r}; expected one of {GRAPH_METHODS}")
    _check_ties(ties)


def _check_ties(ties: str) -> None:
    if not isinstance(ties, str) or ties not in TIES:
        raise ValueError(f"unknown neighbour tie rule {ties!r}; expected one of {TIES}")


# ---------------------------------------------------------------------------- structure checks
def _check_structures(
    positions: torch.Tensor,
    cells: np.ndarray,
    pbcs: np.ndarray,
    natoms: np.ndarray,
    starts: np.ndarray,
    cutoff: float,
) -> None:
    """Finite positions, usable periodic cells, and a neighbour search of bounded size."""
    bad = ~torch.isfinite(positions).all(dim=1)
    if bool(bad.any()):
        atoms = torch.nonzero(bad).flatten().cpu().numpy()
        s = int(np.searchsorted(starts + natoms, atoms[0], side="right"))
        local = atoms[(atoms >= starts[s]) & (atoms < starts[s] + natoms[s])] - starts[s]
        listed = ", ".join(str(int(a)) for a in local[:10])
        listed += f", ... ({len(local)} in all)" if len(local) > 10 else ""
        _raise(s, f"non-finite (NaN/inf) positions for atoms {listed}")
    for s in range(len(natoms)):
        if not pbcs[s].any() or natoms[s] == 0:
            continue
        problem = cell_problem(cells[s], pbcs[s])
        if problem is not None:
            _raise(s, problem)
        _check_size(s, positions[starts[s] : starts[s] + natoms[s]], cells[s], pbcs[s], int(natoms[s]), cutoff)


def _check_size(s: int, positions: torch.Tensor, cell: np.ndarray, pbc: np.ndarray, n: int, cutoff: float) -> None:
    """Raise if the cutoff sphere reaches too many periodic images or candidate pairs."""
    heights = periodic_heights(cell, pbc)
    thinnest = float(heights.min())
    if thinnest <= 0:
        _raise(s, "singular cell: its periodic axes have zero thickness")
    with np.errstate(over="ignore"):
        reps = np.ceil(cutoff / heights)
        images = float(np.prod(2.0 * reps + 1.0))
    if images > MAX_PERIODIC_IMAGES:
        _raise(
            s,
            f"cell too small for the cutoff: a {cutoff:g} Å cutoff reaches "
            f"{' x '.join(f'{2 * r + 1:.0f}' for r in reps)} = {images:.3g} periodic images of the cell "
            f"(limit {MAX_PERIODIC_IMAGES:.0e}); its thinnest periodic axis is {thinnest:.3g} Å thick. "
            f"Check the cell's units, or use a reduced cell (ase.geometry.minkowski_reduce)",
        )
    # Lattice points of the periodic lattice within the cutoff (ball over the cell's measure),
    # times n^2 pairs: the leading-order count of candidates, exact on average for 3-D cells.
    rows = cell[pbc]
    p = len(rows)
    measure = math.sqrt(max(float(np.linalg.det(rows @ rows.T)), 0.0))
    ball = {1: 2.0 * cutoff, 2: math.pi * cutoff**2, 3: 4.0 / 3.0 * math.pi * cutoff**3}[p]
    per_pair = ball / measure
    estimate = n * n * per_pair
    if estimate > MAX_CANDIDATE_PAIRS and p < 3:
        # Slabs and wires: images lie in the periodic directions only, so atoms spread over
        # an extent T (area A) across them meet within the cutoff about (4/3 pi rc^3) / (ball T)
        # as often as atoms in one plane (line).
        normals = np.linalg.svd(rows)[2][p:]  # orthonormal basis of the non-periodic directions
        proj = positions.cpu().numpy() @ normals.T
        extent = float(np.prod(proj.max(axis=0) - proj.min(axis=0)))
        if extent > 0:
            estimate = n * n * min(per_pair, 4.0 / 3.0 * math.pi * cutoff**3 / (measure * extent))
    if estimate > MAX_CANDIDATE_PAIRS:
        _raise(
            s,
            f"cell too small for the cutoff: about {estimate:.3g} candidate neighbour pairs within "
            f"{cutoff:g} Å ({n} atoms, ~{per_pair:.3g} periodic images of each within the cutoff; "
            f"limit {MAX_CANDIDATE_PAIRS:.0e}). Check the cell's units, or lower the cutoff",
        )


def _raise(s: int, what: str) -> None:
    raise StructureError(located_message(what, index=s), index=s)


# ---------------------------------------------------------------------------- candidates
def _vesin_candidates(
    positions: np.ndarray,
    cells: np.ndarray,
    pbcs: np.ndarray,
    natoms: np.ndarray,
    starts: np.ndarray,
    search: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, n) within ``search`` by vesin cell lists, global indices (any order)."""
    empty = np.zeros(0, dtype=np.int64)
    out_i, out_j, out_s = [empty], [empty], [np.zeros((0, 3), dtype=np.int64)]
    # One thread: on few cores it was faster than vesin's automatic threading.
    nl = vesin.NeighborList(cutoff=search, full_list=True, n_threads=1)
    for s in range(len(natoms)):
        if natoms[s] == 0:
            continue
        lo, hi = int(starts[s]), int(starts[s] + natoms[s])
        # Vesin ignores the box along non-periodic axes (a zero row is fine there) and handles
        # unwrapped positions, cells smaller than the cutoff and self-images.
        box = cells[s] if pbcs[s].any() else np.zeros((3, 3))
        periodic = [bool(p) for p in pbcs[s]]
        i, j, shift = nl.compute(np.ascontiguousarray(positions[lo:hi]), box, periodic, quantities="ijS")
        out_i.append(i.astype(np.int64) + lo)
        out_j.append(j.astype(np.int64) + lo)
        out_s.append(shift.astype(np.int64).reshape(-1, 3))
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def _torch_candidates(
    positions: torch.Tensor,
    cells: np.ndarray,
    pbcs: np.ndarray,
    natoms: np.ndarray,
    starts: np.ndarray,
    search: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (i, j, n) within ``search`` by all pairs against all needed images, on the
    positions' device, global indices (any order)."""
    device = positions.device
    full = [complete_cell(c, p) for c, p in zip(cells, pbcs)]
    # Images n_k in [-r_k, r_k] along periodic axes, r_k = ceil(cutoff |b_k|), complete for
    # wrapped positions; structures with the same range are processed together.
    groups: dict[tuple[int, ...], list[int]] = {}
    for s, (c, pbc) in enumerate(zip(full, pbcs)):
        if natoms[s]:
            r = tuple(int(np.ceil(search * np.linalg.norm(b))) if p else 0 for b, p in zip(np.linalg.inv(c).T, pbc))
            groups.setdefault(r, []).append(s)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    parts = [(empty, empty, torch.zeros(0, 3, dtype=torch.long, device=device))]
    for reps, members in groups.items():
        parts.append(_torch_group_candidates(positions, full, pbcs, starts, natoms, members, reps, search))
    i, j, shift = (torch.cat(t) for t in zip(*parts))
    return i, j, shift


def _torch_group_candidates(
    positions: torch.Tensor,
    cells: list[np.ndarray],
    pbcs: np.ndarray,
    starts: np.ndarray,
    natoms: np.ndarray,
    members: list[int],
    reps: tuple[int, ...],
    search: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of the structures sharing the image range ``reps``: global i, j, shift."""
    device = positions.device
    num = len(members)
    width = int(max(natoms[s] for s in members))  # atoms padded to the largest structure
    shifts = torch.cartesian_prod(*(torch.arange(-k, k + 1, device=device) for k in reps)).view(-1, 3)
    num_images = shifts.shape[0]
    zero_image = num_images // 2  # n = (0, 0, 0) sits in the middle of the product
    cell = torch.tensor(np.stack([cells[s] for s in members]), dtype=torch.float64, device=device)
    pbc = torch.tensor(pbcs[members], device=device)

    index = torch.full((num, width), -1, dtype=torch.long, device=device)
    for g, s in enumerate(members):
        index[g, : natoms[s]] = torch.arange(int(starts[s]), int(starts[s] + natoms[s]), device=device)
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
    out_g, out_i, out_j, out_m = [], [], [], []
    for lo in range(0, width, chunk):
        hi = min(width, lo + chunk)
        d2 = ((images.unsqueeze(1) - pos[:, lo:hi, None, None, :]) ** 2).sum(-1)  # [G, c, A, M]
        centre = torch.arange(lo, hi, device=device)
        self_pair = (centre.view(1, -1, 1, 1) == torch.arange(width, device=device).view(1, 1, -1, 1)) & (
            torch.arange(num_images, device=device).view(1, 1, 1, -1) == zero_image
        )
        mask = valid[:, lo:hi, None, None] & valid[:, None, :, None] & ~self_pair & (d2 <= search * search)
        g, c, j, m = torch.nonzero(mask, as_tuple=True)
        out_g.append(g)
        out_i.append(c + lo)
        out_j.append(j)
        out_m.append(m)
    g, i, j, m = (torch.cat(t) for t in (out_g, out_i, out_j, out_m))
    shift = shifts[m] - wrap[g, j] + wrap[g, i]
    return index[g, i], index[g, j], shift


# ---------------------------------------------------------------------------- selection
def _vectors64(
    positions: torch.Tensor,
    cells: torch.Tensor,
    edge_structure: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    shift: torch.Tensor,
) -> torch.Tensor:
    """float64 ``(pos[j] - pos[i]) + n @ cell`` by separate elementwise operations, so that
    every method and device gets bitwise the same vectors (ties are decided on them)."""
    n = shift.to(torch.float64)
    cell = cells.reshape(-1, 9)
    cell = cell if cell.shape[0] == 1 else cell[edge_structure]
    offset = n[:, 0:1] * cell[:, 0:3] + n[:, 1:2] * cell[:, 3:6] + n[:, 2:3] * cell[:, 6:9]
    return (positions[j] - positions[i]) + offset


def _check_overlaps(
    d2: torch.Tensor, i: torch.Tensor, j: torch.Tensor, shift: torch.Tensor, structure: torch.Tensor, starts: np.ndarray
) -> None:
    """Raise for the closest overlapping pair of the first structure that has one."""
    close = d2 <= MIN_DISTANCE * MIN_DISTANCE
    if not bool(close.any()):
        return
    idx = torch.nonzero(close).flatten()
    s_all = structure[i[idx]]
    idx = idx[s_all == s_all.min()]
    s = int(structure[i[idx[0]]])
    a, b = (i[idx] - int(starts[s])).cpu().numpy(), (j[idx] - int(starts[s])).cpu().numpy()
    n, dist = shift[idx].cpu().numpy(), d2[idx].sqrt().cpu().numpy()
    k = np.lexsort((-n[:, 2], -n[:, 1], -n[:, 0], np.maximum(a, b), np.minimum(a, b), dist))[0]
    _raise(s, overlap_message(int(a[k]), int(b[k]), float(dist[k]), n[k].tolist()))


def _cap(
    i: torch.Tensor, d2: torch.Tensor, vec: torch.Tensor, num_atoms: int, k: int, ties: str
) -> torch.Tensor | None:
    """[E] bool: the edges kept by the cap of ``k`` per centre under rule ``ties`` (None: all).

    Each rule keeps the edges up to a distance threshold per over-full centre, read off its
    sorted row of distances; only "official" ties at the threshold need a choice."""
    e = i.shape[0]
    device = i.device
    counts = torch.bincount(i, minlength=num_atoms)
    if e == 0 or int(counts.max()) <= k:
        return None
    over = torch.nonzero(counts > k).flatten()
    # The over-full centres' distances as rows of a table padded with inf, sorted.
    row_of = torch.full((num_atoms,), -1, dtype=torch.long, device=device)
    row_of[over] = torch.arange(over.numel(), device=device)
    sel = torch.nonzero(row_of[i] >= 0).flatten()
    sel = sel[torch.sort(i[sel], stable=True).indices]  # grouped by centre
    rows = row_of[i[sel]]
    first = torch.cumsum(counts[over], 0) - counts[over]
    column = torch.arange(sel.numel(), device=device) - first[rows]
    table = torch.full((over.numel(), int(counts.max())), float("inf"), dtype=d2.dtype, device=device)
    table[rows, column] = d2[sel]
    table = torch.sort(table, dim=1).values
    threshold = torch.full((num_atoms,), float("inf"), dtype=d2.dtype, device=device)
    if ties == "shell":
        # Keep through the end of the shell holding the k-th nearest: the first gap above
        # the tolerance at or after it (the padding's inf gap ends every row but full ones).
        dist = table.sqrt()
        gap = (dist[:, k:] - dist[:, k - 1 : -1]) > SHELL_TOLERANCE
        end = torch.where(gap.any(dim=1), k - 1 + gap.to(torch.uint8).argmax(dim=1), dist.shape[1] - 1)
        threshold[over] = dist[torch.arange(over.numel(), device=device), end]
        return d2.sqrt() <= threshold[i]
    threshold[over] = table[:, k - 1]  # the k-th nearest d^2
    keep = d2 < threshold[i]
    # Exact ties with the k-th nearest: the places left go to the tied edges in the order
    # of their vectors (x, y, z), which names no atom.
    tied = torch.nonzero(d2 == threshold[i]).flatten()
    room = k - torch.bincount(i[keep], minlength=num_atoms)
    v = vec[tied]
    tied = tied[_lexsort([i[tied], v[:, 0], v[:, 1], v[:, 2]])]
    t = i[tied]
    place = torch.arange(tied.numel(), device=device) - torch.searchsorted(t, t)  # t sorted: first index per centre
    keep[tied] = place < room[t]
    return keep


def _shell_ranks_sorted(target: torch.Tensor, distance: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Shell ranks of edges sorted by (target, distance); ``first[t]`` = position of the
    first edge of target t. A shell starts wherever the distance grows by more than
    :data:`SHELL_TOLERANCE` over the previous edge's (or the target changes)."""
    e = target.shape[0]
    new = torch.ones(e, dtype=torch.bool, device=target.device)
    new[1:] = (target[1:] != target[:-1]) | ((distance[1:] - distance[:-1]) > SHELL_TOLERANCE)
    index = torch.arange(e, device=target.device)
    shell_start = torch.cummax(torch.where(new, index, torch.zeros_like(index)), dim=0).values
    return shell_start - first[target]


def _edge_order(i: torch.Tensor, j: torch.Tensor, shift: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """Permutation sorting edges by (i, j, n): one sort of a combined integer key where it
    fits in 63 bits (always, but for absurdly unwrapped positions), else five."""
    if i.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=i.device)
    low = shift.min(dim=0).values
    span = (shift.max(dim=0).values - low + 1).tolist()
    if num_atoms * num_atoms * span[0] * span[1] * span[2] >= 2**63:
        return _lexsort([i, j, shift[:, 0], shift[:, 1], shift[:, 2]])
    s = shift - low
    key = ((i * num_atoms + j) * span[0] + s[:, 0]) * span[1] + s[:, 1]
    return torch.sort(key * span[2] + s[:, 2]).indices  # keys are distinct: no stability needed


def _lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Permutation sorting by ``keys[0]``, then ``keys[1]``, ... (successive stable sorts)."""
    order = torch.sort(keys[-1], stable=True).indices
    for key in reversed(keys[:-1]):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


# ---------------------------------------------------------------------------- model side
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
    ties: str = "official",
) -> torch.Tensor:
    """Rank of each edge among the edges of its target by distance (0 = nearest): [E] long.

    Args:
        distance: [E] edge lengths; target: [E] centre atom of each edge (any order);
        num_atoms: N, number of atoms (targets lie in [0, N));
        max_num_neighbors: width K of the per-atom table of the official rule (default: the
            largest number of edges of one target). Pass the graph's cap to break ties
            exactly as SCN. Not used by ``"shell"``.
        ties: ``"official"``: fairchem ``SCN._rank_edge_distances``: each target's distances,
            in edge order, fill a row of an [N, K] table padded with inf, and the rows are
            sorted with ``torch.sort``; distinct distances get the same ranks under any
            method, exact ties (an atom's images at +n and -n) fall as in the official code,
            given the same edge order and distances, on CPU. ``"shell"``: the number of
            the target's edges in nearer shells (module docstring): all members of a shell
            share one rank, independent of edge and atom order.
    """
    _check_ties(ties)
    e = target.shape[0]
    device = target.device
    if e == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    distance = distance.detach()
    counts = torch.bincount(target, minlength=num_atoms)
    if ties == "shell":
        order = _lexsort([target, distance])
        ranks = torch.empty(e, dtype=torch.long, device=device)
        ranks[order] = _shell_ranks_sorted(target[order], distance[order], torch.cumsum(counts, 0) - counts)
        return ranks
    # Group by target, keeping the edge order within a target (it decides ties).
    perm = torch.sort(target, stable=True).indices
    tgt = target[perm]
    width = int(counts.max())
    if max_num_neighbors is not None:
        width = max(width, int(max_num_neighbors))
    column = torch.arange(e, device=device) - (torch.cumsum(counts, 0) - counts)[tgt]
    table = torch.full((num_atoms, width), float("inf"), dtype=distance.dtype, device=device)
    table[tgt, column] = distance[perm]
    order = torch.sort(table, dim=1).indices  # order[t, r] = column holding rank r
    rank_of_column = torch.empty_like(order)
    rank_of_column.scatter_(1, order, torch.arange(width, device=device).expand(num_atoms, width))
    ranks = torch.empty(e, dtype=torch.long, device=device)
    ranks[perm] = rank_of_column[tgt, column]
    return ranks
