"""The neighbour cap and ranks at equal distances (``ties``), and the graph's input guards."""

from __future__ import annotations

from pathlib import Path

import ase.build
import numpy as np
import pytest
import torch
from ase import Atoms

from spherical_channels.data import AtomicBatch, build_graph, edge_vectors, neighbor_ranks
from spherical_channels.data.neighbors import SHELL_TOLERANCE
from spherical_channels.data.validation import StructureError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
METHODS = ["vesin", "torch"]
# fcc: 12 neighbours at a/sqrt(2), 6 at a, 24 at a sqrt(3/2), 12 at a sqrt(2) (cumulative 12, 18, 42, 54).
FCC_SHELLS = (12, 6, 24, 12)


def fcc_bulk(a: float = 3.61) -> Atoms:
    return ase.build.bulk("Cu", "fcc", a=a, cubic=True) * (2, 2, 2)  # 32 atoms


def fcc_slab() -> Atoms:
    slab = ase.build.fcc111("Cu", size=(3, 3, 4), a=3.61, vacuum=7.5)
    slab.pbc = True  # as OC20: periodic, with vacuum
    return slab


def edges(atoms: Atoms, cutoff: float, cap: int, ties: str, method: str = "vesin", dtype=torch.float64):
    """(set of (i, j, n), set of full-resolution (rank < 12) edges, per-atom counts)."""
    batch = AtomicBatch.from_atoms([atoms], dtype=dtype)
    g = build_graph(batch, cutoff, cap, method=method, ties=ties)
    dist = edge_vectors(batch.positions, batch.cell, batch.batch, g).norm(dim=1)
    rank = neighbor_ranks(dist, g.edge_index[1], batch.num_atoms, cap, ties=ties)
    keys = [(i, j, *n) for i, j, n in zip(g.edge_index[1].tolist(), g.edge_index[0].tolist(), g.cell_offsets.tolist())]
    full = {k for k, r in zip(keys, rank.tolist()) if r < 12}
    return set(keys), full, torch.bincount(g.edge_index[1], minlength=len(atoms))


def raw_batch(positions, cell, pbc) -> AtomicBatch:
    """A one-structure batch built directly (no validation: the validation layer refuses
    some of these structures itself; the graph must too)."""
    n = len(positions)
    return AtomicBatch(
        positions=torch.as_tensor(np.asarray(positions, dtype=np.float64)),
        atomic_numbers=torch.full((n,), 29),
        cell=torch.as_tensor(np.asarray(cell, dtype=np.float64))[None],
        pbc=torch.as_tensor(pbc, dtype=torch.bool).reshape(1, 3),
        natoms=torch.tensor([n]),
        batch=torch.zeros(n, dtype=torch.long),
        fixed=torch.zeros(n, dtype=torch.bool),
        tags=torch.zeros(n, dtype=torch.long),
    )


def moved(atoms: Atoms, rng: np.random.Generator, permute: bool, translate: bool):
    """A permuted and/or translated-and-wrapped copy, and the map of an edge (i, j, n) of
    ``atoms`` onto the copy: (new[i], new[j], n + w_j - w_i)."""
    n = len(atoms)
    perm = rng.permutation(n) if permute else np.arange(n)
    cell = atoms.cell.array
    pos = atoms.positions + (rng.uniform(0, 1, 3) @ cell if translate else 0.0)
    w = np.floor(pos @ np.linalg.inv(cell)).astype(np.int64)  # all axes periodic here
    pos = pos - w @ cell
    new = np.argsort(perm)  # new index of old atom

    def mapping(keys):
        return {(new[i], new[j], *(np.array(s) + w[j] - w[i]).tolist()) for i, j, *s in keys}

    out = Atoms(atoms.numbers[perm], positions=pos[perm], cell=cell, pbc=atoms.pbc)
    return out, mapping


# --------------------------------------------------------------------------- "shell"
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("structure, cutoff, cap", [("bulk", 6.0, 16), ("slab", 7.0, 20)])
def test_shell_edges_map_exactly_under_permutation_and_translation(method, dtype, structure, cutoff, cap):
    """The defect: with the official rule, which members of a shell cut by the cap survive
    (and which get rank < 12) depends on atom order. Under "shell", a permuted,
    translated and wrapped perfect crystal has exactly the mapped edges and ranks, also
    from float32 positions (whose rounding breaks the crystal's symmetry by ~1e-6 A)."""
    atoms = fcc_bulk() if structure == "bulk" else fcc_slab()
    rng = np.random.default_rng(0)
    ref, ref_full, _ = edges(atoms, cutoff, cap, "shell", method, dtype)
    for permute, translate in [(True, False), (True, True)]:
        other, mapping = moved(atoms, rng, permute, translate)
        got, got_full, _ = edges(other, cutoff, cap, "shell", method, dtype)
        assert got == mapping(ref)
        assert got_full == mapping(ref_full)


def test_official_rule_depends_on_atom_order_where_shell_does_not():
    """The official rule at a cut through a shell (K = 16 in fcc: 12 + 4 of 6) keeps a
    choice that translating the crystal changes; the shell rule does not."""
    atoms = fcc_bulk()
    rng = np.random.default_rng(1)
    ref, _, counts = edges(atoms, 6.0, 16, "official")
    assert (counts == 16).all()
    changed = 0
    for _ in range(5):
        other, mapping = moved(atoms, rng, permute=True, translate=True)
        changed += edges(other, 6.0, 16, "official")[0] != mapping(ref)
    assert changed >= 1


@pytest.mark.parametrize("cap, expected", [(8, 12), (12, 12), (13, 18), (16, 18), (18, 18), (19, 42), (40, 42)])
def test_shell_cut_by_the_cap_is_kept_whole(cap, expected):
    """fcc Cu: a centre keeps every edge of the shells up to the one holding its cap-th
    nearest neighbour; official keeps exactly the cap."""
    atoms = fcc_bulk()
    for ties, want in [("shell", expected), ("official", cap)]:
        _, _, counts = edges(atoms, 6.5, cap, ties)
        assert (counts == want).all(), (ties, counts.unique())


def test_shell_rank_boundary_gives_a_shell_one_resolution():
    """bcc Fe: 8 neighbours at a sqrt(3)/2 and 6 at a. The second shell spans ranks 8..13
    officially (2 of its edges fall past rank 11: reduced resolution); under "shell" all 6
    share rank 8 and get the full resolution."""
    bcc = ase.build.bulk("Fe", "bcc", a=2.87, cubic=True) * (2, 2, 2)
    batch = AtomicBatch.from_atoms([bcc], dtype=torch.float64)
    g = build_graph(batch, 5.0, 40)
    dist = edge_vectors(batch.positions, batch.cell, batch.batch, g).norm(dim=1)
    official = neighbor_ranks(dist, g.edge_index[1], batch.num_atoms, 40)
    shell = neighbor_ranks(dist, g.edge_index[1], batch.num_atoms, 40, ties="shell")
    target = g.edge_index[1]
    for t in range(batch.num_atoms):
        sel = target == t
        assert int((official[sel] < 12).sum()) == 12
        assert int((shell[sel] < 12).sum()) == 14
        second = sel & (torch.abs(dist - 2.87) < 1e-9)
        assert int(second.sum()) == 6 and (shell[second] == 8).all()


def test_shell_ranks_rule():
    """Competition ranking by shells: distances within the tolerance of the previous one
    share the shell's lowest rank; the result does not depend on edge order."""
    tol = SHELL_TOLERANCE
    d = torch.tensor([1.0, 1.0, 1.0 + 0.5 * tol, 2.0, 2.0 + 0.9 * tol, 2.0 + 1.8 * tol, 2.5, 3.0])
    t = torch.zeros(8, dtype=torch.long)
    expected = torch.tensor([0, 0, 0, 3, 3, 3, 6, 7])  # the second shell chains to 1.8 x the tolerance
    assert torch.equal(neighbor_ranks(d, t, 1, ties="shell"), expected)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = torch.randperm(8, generator=gen)
        assert torch.equal(neighbor_ranks(d[perm], t[perm], 1, ties="shell"), expected[perm])
    # several targets, interleaved; a gap just above the tolerance splits
    d2 = torch.tensor([5.0, 1.0, 5.0 + 1.01 * SHELL_TOLERANCE, 1.0, 0.5])
    t2 = torch.tensor([1, 0, 1, 1, 0])
    assert torch.equal(neighbor_ranks(d2, t2, 3, ties="shell"), torch.tensor([1, 1, 2, 0, 0]))


@pytest.mark.parametrize("ties", ["official", "shell"])
def test_methods_agree_at_ties(ties):
    """vesin and torch paths decide the cut on the same float64 vectors, so they agree
    even where exact ties fall at the cap (a one-atom fcc cell: 12 equal images)."""
    structures = [ase.build.bulk("Cu", "fcc", a=3.6), fcc_bulk(4.0), fcc_slab()]
    batch = AtomicBatch.from_atoms(structures, dtype=torch.float64)
    for cutoff, cap in [(6.0, 16), (5.0, 7)]:
        a = build_graph(batch, cutoff, cap, method="vesin", ties=ties)
        b = build_graph(batch, cutoff, cap, method="torch", ties=ties)
        assert torch.equal(a.edge_index, b.edge_index)
        assert torch.equal(a.cell_offsets, b.cell_offsets)


def test_official_exact_ties_broken_by_vector():
    """a = 4 A makes every coordinate exact, so the 6 second-shell neighbours are exact
    ties; with K = 16 the 4 kept are those of smallest vector (x, then y, then z), the
    same for every centre and under any permutation of the atoms."""
    atoms = fcc_bulk(4.0)
    batch = AtomicBatch.from_atoms([atoms], dtype=torch.float64)
    g = build_graph(batch, 6.0, 16)
    vec = edge_vectors(batch.positions, batch.cell, batch.batch, g)
    second = (vec.norm(dim=1) - 4.0).abs() < 1e-12
    kept = {tuple(v) for v in vec[second].tolist()}
    assert kept == {(-4.0, 0.0, 0.0), (0.0, -4.0, 0.0), (0.0, 0.0, -4.0), (0.0, 0.0, 4.0)}
    assert int(second.sum()) == 4 * len(atoms)
    ref = edges(atoms, 6.0, 16, "official")[0]
    rng = np.random.default_rng(2)
    for _ in range(3):
        other, mapping = moved(atoms, rng, permute=True, translate=False)
        assert edges(other, 6.0, 16, "official")[0] == mapping(ref)


def test_shell_equals_official_on_the_tie_free_fixtures():
    """The fixture structures are rattled: no two distances within the tolerance meet the
    cap (40) or the resolution boundary (12), so the shell rule gives the official graph
    and the same resolution for every edge."""
    from ase.io import read

    frames = read(FIXTURES / "structures_small.extxyz", ":")
    batch = AtomicBatch.from_atoms(frames, dtype=torch.float32)
    a = build_graph(batch, 8.0, 40)
    b = build_graph(batch, 8.0, 40, ties="shell")
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.cell_offsets, b.cell_offsets)
    dist = edge_vectors(batch.positions, batch.cell, batch.batch, a).norm(dim=1)
    official = neighbor_ranks(dist, a.edge_index[1], batch.num_atoms, 40)
    shell = neighbor_ranks(dist, a.edge_index[1], batch.num_atoms, 40, ties="shell")
    assert torch.equal(official < 12, shell < 12)
    assert (shell <= official).all() and (shell != official).any()  # the +-n self-image ties share a rank


# --------------------------------------------------------------------------- guards
@pytest.mark.parametrize("method", METHODS)
def test_tiny_cell_raises_before_allocating(method):
    """A 0.02 A cell with a 6 A cutoff would need ~1e8 pairs (it exhausted memory)."""
    batch = raw_batch([[0.0, 0.0, 0.0]], np.eye(3) * 0.02, [True] * 3)
    expected = r"^structure 0: cell too small for the cutoff: a 6 Å cutoff reaches 601 x 601 x 601 = 2\.17e\+08 periodic"
    with pytest.raises(StructureError, match=expected) as info:
        build_graph(batch, 6.0, 40, method=method)
    assert info.value.index == 0


@pytest.mark.parametrize("method", METHODS)
def test_many_atoms_in_a_small_cell_raise(method):
    """18 atoms in a 0.15 A cell: few enough images (81^3) but ~9e7 candidate pairs."""
    grid = np.stack(np.meshgrid([0.0, 0.05, 0.1], [0.0, 0.05, 0.1], [0.0, 0.07], indexing="ij"), -1).reshape(-1, 3)
    batch = raw_batch(grid, np.eye(3) * 0.15, [True] * 3)
    expected = r"^structure 0: cell too small for the cutoff: about 8\.\d+e\+07 candidate neighbour pairs"
    with pytest.raises(StructureError, match=expected):
        build_graph(batch, 6.0, 40, method=method)


def test_thick_slab_is_not_mistaken_for_a_small_cell(monkeypatch):
    """A 1x1 Cu(111) column 200 layers thick, periodic in x, y only: n^2 x (in-plane images
    within the cutoff) is 8e5 pairs, but the atoms are spread over 417 A, so the estimate
    (and the true count, ~1.5e4) stays below a limit of 1e5 set for the test."""
    from spherical_channels.data import neighbors

    monkeypatch.setattr(neighbors, "MAX_CANDIDATE_PAIRS", 100_000)
    column = ase.build.fcc111("Cu", size=(1, 1, 200), a=3.61, vacuum=0.0, periodic=False)
    column.pbc = (True, True, False)
    area = np.linalg.norm(np.cross(*column.cell.array[:2]))
    assert len(column) ** 2 * np.pi * 6.0**2 / area > 100_000
    _, _, counts = edges(column, 6.0, 500, "official")
    thickness = np.ptp(column.positions[:, 2])
    estimate = len(column) ** 2 * 4 / 3 * np.pi * 6.0**3 / (area * thickness)
    assert 0.7 < int(counts.sum()) / estimate < 1.3
    # the same column in a 3-D cell: the n^2 x images estimate is right there, and refuses
    column.cell[2] = [0.0, 0.0, 0.9 * 6.0]
    column.pbc = True
    with pytest.raises(StructureError, match="cell too small for the cutoff: about"):
        build_graph(raw_batch(column.positions, column.cell.array, [True] * 3), 6.0, 40)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_positions_raise(method):
    batch = raw_batch([[0.0, 0, 0], [1.5, 0, 0], [np.nan, 0, 0]], np.zeros((3, 3)), [False] * 3)
    # the torch path used to drop the NaN atom silently
    with pytest.raises(StructureError, match=r"^structure 0: non-finite \(NaN/inf\) positions for atoms 2$"):
        build_graph(batch, 5.0, 40, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_singular_periodic_cell_raises(method):
    batch = raw_batch([[0.0, 0, 0], [1.5, 0, 0]], np.diag([3.0, 3.0, 0.0]), [True] * 3)
    # raw "box matrix is not invertible" / LinAlgError before
    with pytest.raises(StructureError, match=r"^structure 0: singular cell: axis 2 is periodic"):
        build_graph(batch, 5.0, 40, method=method)


def test_bad_arguments_raise():
    batch = AtomicBatch.from_atoms([Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])])
    for cutoff in [0.0, -1.0, float("nan"), float("inf"), "6"]:
        with pytest.raises(ValueError, match="cutoff must be a finite positive number"):
            build_graph(batch, cutoff, 40)
    for cap in [0, -5, 2.5, True, None]:  # fairchem reads <= 0 as "no cap"; the old code gave no edges
        with pytest.raises(ValueError, match="max_num_neighbors must be a positive integer"):
            build_graph(batch, 6.0, cap)
    with pytest.raises(ValueError, match="unknown neighbour tie rule 'shells'"):
        build_graph(batch, 6.0, 40, ties="shells")
    with pytest.raises(ValueError, match="unknown neighbour tie rule"):
        neighbor_ranks(torch.ones(2), torch.zeros(2, dtype=torch.long), 1, ties=None)
    assert build_graph(batch, 6.0, np.int64(1)).num_edges == 2
