"""The radius graph against a brute-force reference and against the official SCN graph."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import ase.build
import numpy as np
import pytest
import torch

from spherical_channels.data import AtomicBatch, build_graph, edge_vectors, neighbor_ranks
from spherical_channels.data.validation import StructureError

from scn_helpers import batch_from_preds

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


# --------------------------------------------------------------------------- reference
def brute_force(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """All (i, j, n) with 1e-4 < d^2 <= cutoff^2, by enumerating lattice images.

    Positions are wrapped first (the image range r_k = ceil(cutoff |b_k|) is complete
    only for wrapped positions), and the shifts mapped back to the given positions.
    Returns i [E], j [E], shifts [E, 3], d2 [E].
    """
    pos = np.asarray(pos, np.float64)
    cell = np.asarray(cell, np.float64)
    pbc = np.asarray(pbc, bool)
    n_atoms = len(pos)
    if pbc.any():
        inv = np.linalg.inv(cell)
        recip = inv.T  # rows b_k with a_i . b_k = delta_ik
        reps = np.where(pbc, np.ceil(cutoff * np.linalg.norm(recip, axis=1)), 0).astype(int)
        wrap = np.where(pbc, np.floor(pos @ inv), 0).astype(np.int64)  # [N, 3]
    else:
        reps = np.zeros(3, int)
        wrap = np.zeros((n_atoms, 3), np.int64)
    pw = pos - wrap @ cell
    out_i, out_j, out_s, out_d2 = [], [], [], []
    for n in itertools.product(*(range(-r, r + 1) for r in reps)):
        n = np.array(n)
        vec = pw[None, :, :] + n @ cell - pw[:, None, :]  # [i, j, 3]
        d2 = (vec**2).sum(-1)
        ii, jj = np.nonzero((d2 > 1e-4) & (d2 <= cutoff**2))
        out_i.append(ii)
        out_j.append(jj)
        out_s.append(n[None, :] - wrap[jj] + wrap[ii])
        out_d2.append(d2[ii, jj])
    return (
        np.concatenate(out_i),
        np.concatenate(out_j),
        np.concatenate(out_s).reshape(-1, 3),
        np.concatenate(out_d2),
    )


def edge_set(i, j, s) -> set[tuple[int, ...]]:
    return {(a, b, *c) for a, b, c in zip(np.asarray(i).tolist(), np.asarray(j).tolist(), np.asarray(s).tolist())}


def single_batch(pos, cell, pbc, dtype=torch.float64) -> AtomicBatch:
    n = len(pos)
    return AtomicBatch(
        positions=torch.as_tensor(np.asarray(pos), dtype=dtype),
        atomic_numbers=torch.full((n,), 29, dtype=torch.long),
        cell=torch.as_tensor(np.asarray(cell), dtype=dtype).reshape(1, 3, 3),
        pbc=torch.as_tensor(np.asarray(pbc), dtype=torch.bool).reshape(1, 3),
        natoms=torch.tensor([n]),
        batch=torch.zeros(n, dtype=torch.long),
        fixed=torch.zeros(n, dtype=torch.bool),
        tags=torch.zeros(n, dtype=torch.long),
    )


def _triclinic():
    rng = np.random.default_rng(0)
    cell = np.array([[5.0, 0.0, 0.0], [1.5, 4.5, 0.0], [0.8, 1.1, 4.7]])
    frac = rng.uniform(-1.5, 2.5, (10, 3))  # deliberately not wrapped
    return frac @ cell, cell, np.array([True, True, True]), 6.0


def _small_cell():
    atoms = ase.build.bulk("NaCl", "rocksalt", a=5.64)  # 2-atom fcc primitive cell
    atoms.positions[1] += [0.03, -0.02, 0.05]
    return atoms.positions, atoms.cell.array, np.array([True, True, True]), 8.0


def _mixed_pbc():
    rng = np.random.default_rng(1)
    cell = np.array([[4.0, 0.0, 0.0], [1.0, 4.2, 0.0], [0.0, 0.0, 10.0]])
    pos = rng.uniform(0, 1, (12, 3)) @ np.diag([4.0, 4.0, 16.0])  # z beyond the cell
    return pos, cell, np.array([True, True, False]), 5.0


def _molecule():
    mol = ase.build.molecule("C6H6")
    mol.rattle(0.01, seed=3)
    return mol.positions, np.zeros((3, 3)), np.array([False, False, False]), 3.0


CASES = {"triclinic": _triclinic, "small_cell": _small_cell, "mixed_pbc": _mixed_pbc, "molecule": _molecule}
# The CPU cell-list path and the all-pairs torch path (the GPU default) must agree everywhere.
METHODS = ["vesin", "torch"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_full_graph_matches_brute_force(name, method):
    pos, cell, pbc, cutoff = CASES[name]()
    ri, rj, rs, _ = brute_force(pos, cell, pbc, cutoff)
    g = build_graph(single_batch(pos, cell, pbc), cutoff, max_num_neighbors=10**6, method=method)
    assert g.edge_index.dtype == torch.long and g.cell_offsets.dtype == torch.long
    assert g.cell_offsets.shape == (g.num_edges, 3)
    ours = edge_set(g.edge_index[1], g.edge_index[0], g.cell_offsets)
    assert len(ours) == g.num_edges  # no duplicates
    assert ours == edge_set(ri, rj, rs)
    if not pbc.all():
        assert (g.cell_offsets[:, ~torch.as_tensor(pbc)] == 0).all()
    # The official edge order: (target, source, shift) lexicographic.
    keys = [tuple(k) for k in torch.cat([g.edge_index.flip(0).T, g.cell_offsets], 1).tolist()]
    assert keys == sorted(keys)
    if name == "small_cell":  # own periodic images must be neighbours
        assert (g.edge_index[0] == g.edge_index[1]).any()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("cap", [1, 12, 40])
@pytest.mark.parametrize("method", METHODS)
def test_capped_graph_keeps_nearest(name, cap, method):
    pos, cell, pbc, cutoff = CASES[name]()
    ri, rj, rs, rd2 = brute_force(pos, cell, pbc, cutoff)
    g = build_graph(single_batch(pos, cell, pbc), cutoff, max_num_neighbors=cap, method=method)
    i = g.edge_index[1].numpy()
    assert edge_set(i, g.edge_index[0], g.cell_offsets) <= edge_set(ri, rj, rs)
    d = edge_vectors(
        torch.as_tensor(pos), torch.as_tensor(cell)[None], torch.zeros(len(pos), dtype=torch.long), g
    ).norm(dim=1).numpy()
    for centre in range(len(pos)):
        ref = np.sort(np.sqrt(rd2[ri == centre]))[:cap]
        np.testing.assert_allclose(np.sort(d[i == centre]), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_unwrapped_positions_give_same_physical_edges(method):
    pos, cell, pbc, cutoff = _small_cell()
    shift = np.array([[3, -2, 1], [-5, 0, 7]])
    g0 = build_graph(single_batch(pos, cell, pbc), cutoff, 40, method=method)
    g1 = build_graph(single_batch(pos + shift @ cell, cell, pbc), cutoff, 40, method=method)
    # n_unwrapped = n + w_i - w_j maps the edges one to one.
    i, j = g0.edge_index[1].numpy(), g0.edge_index[0].numpy()
    mapped = g0.cell_offsets.numpy() + shift[i] - shift[j]
    assert edge_set(i, j, mapped) == edge_set(g1.edge_index[1], g1.edge_index[0], g1.cell_offsets)


@pytest.mark.parametrize("method", METHODS)
def test_no_edges_and_isolated_atom(method):
    for pos, cell, pbc in [
        (np.zeros((1, 3)), np.zeros((3, 3)), [False] * 3),  # isolated atom
        (np.array([[0.0, 0, 0], [20.0, 0, 0]]), np.zeros((3, 3)), [False] * 3),  # far apart
        (np.zeros((1, 3)), np.eye(3) * 30.0, [True] * 3),  # lone atom in a big box
    ]:
        g = build_graph(single_batch(pos, cell, pbc), 6.0, 40, method=method)
        assert g.edge_index.shape == (2, 0) and g.edge_index.dtype == torch.long
        assert g.cell_offsets.shape == (0, 3) and g.cell_offsets.dtype == torch.long
        d = edge_vectors(
            torch.as_tensor(pos), torch.as_tensor(cell)[None], torch.zeros(len(pos), dtype=torch.long), g
        )
        assert d.shape == (0, 3)
        assert neighbor_ranks(d.norm(dim=1), g.edge_index[1], len(pos)).shape == (0,)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_structures_uses_global_indices(method):
    structures = [_triclinic(), _molecule(), _mixed_pbc()]
    from ase import Atoms

    atoms = [Atoms("Cu" * len(p), positions=p, cell=c, pbc=b) for p, c, b, _ in structures]
    batch = AtomicBatch.from_atoms(atoms, dtype=torch.float64)
    g = build_graph(batch, 5.3, 10**6, method=method)
    offset = 0
    for s, (p, c, b, _) in enumerate(structures):
        ri, rj, rs, rd2 = brute_force(p, c, b, 5.3)
        ref = edge_set(ri + offset, rj + offset, rs)
        sel = batch.batch[g.edge_index[1]] == s
        assert (batch.batch[g.edge_index[0]][sel] == s).all()
        ours = edge_set(g.edge_index[1][sel], g.edge_index[0][sel], g.cell_offsets[sel])
        assert ours == ref
        offset += len(p)
    keys = [tuple(k) for k in torch.cat([g.edge_index.flip(0).T, g.cell_offsets], 1).tolist()]
    assert keys == sorted(keys)


@pytest.mark.parametrize("method", METHODS)
def test_overlapping_atoms_raise(method):
    mol = ase.build.molecule("CH4")
    pos = mol.positions.copy()
    pos[3] = pos[1] + [2e-5, 0, 0]
    from ase import Atoms

    good = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    bad = Atoms(mol.get_chemical_symbols(), positions=pos)
    batch = AtomicBatch.from_atoms([good, bad])
    expected = r"^structure 1: atoms 1 and 3 are 0\.00002 Å apart \(overlapping atoms: distance <= 0\.01 Å\)$"
    with pytest.raises(StructureError, match=expected) as info:
        build_graph(batch, 6.0, 40, method=method)
    assert info.value.index == 1


def test_neighbor_ranks_ties_are_a_permutation():
    target = torch.tensor([2, 0, 2, 2, 0, 1])
    distance = torch.tensor([1.0, 3.0, 1.0, 0.5, 3.0, 2.0])
    ranks = neighbor_ranks(distance, target, 4, max_num_neighbors=40)
    assert ranks[5] == 0 and ranks[3] == 0
    assert sorted(ranks[[1, 4]].tolist()) == [0, 1]
    assert sorted(ranks[[0, 2]].tolist()) == [1, 2]


def test_neighbor_ranks_any_order():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 7, (200,), generator=g)
    distance = torch.rand(200, generator=g, dtype=torch.float64)
    ranks = neighbor_ranks(distance, target, 9)
    for t in range(9):
        sel = target == t
        expected = torch.empty(int(sel.sum()), dtype=torch.long)
        expected[torch.argsort(distance[sel])] = torch.arange(int(sel.sum()))
        assert torch.equal(ranks[sel], expected)


def test_edge_vectors_gradient():
    pos, cell, pbc, cutoff = _triclinic()
    batch = single_batch(pos, cell, pbc)
    g = build_graph(batch, cutoff, 12)
    pos_t = batch.positions.clone().requires_grad_(True)
    cell_t = batch.cell.clone().requires_grad_(True)
    idx = batch.batch
    weights = torch.randn(g.num_edges, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def fn(p, c):  # a smooth scalar of the edge vectors, like an energy
        v = edge_vectors(p, c, idx, g)
        return (torch.exp(-v.norm(dim=1)) + (v * weights).sum(1) ** 2).sum()

    assert torch.autograd.gradcheck(fn, (pos_t, cell_t), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- official graph
def _load_fixture(cfg: str, name: str = "preds.npz"):
    path = FIXTURES / cfg / name
    if not path.exists():
        pytest.skip(f"missing fixture {path}")
    return dict(np.load(path))


def _fixture_batch(ref: dict, dtype: torch.dtype) -> AtomicBatch:
    batch = batch_from_preds(ref, dtype)
    batch.validate()
    return batch


def _global_edge_index(ref: dict) -> np.ndarray:
    """The fixture's per-structure local edge_index [2, E] as batch-global indices."""
    edge_struct = np.repeat(np.arange(len(ref["natoms"])), ref["nedges"])
    return ref["edge_index"] + (np.cumsum(ref["natoms"]) - ref["natoms"])[edge_struct]


@pytest.mark.parametrize("cfg", ["cfg_tiny", "cfg_m0", "cfg_t1b1"])
def test_matches_official_graph_float32(cfg):
    """float32, as the official run: same edges in the same order, bitwise equal edge
    vectors and distances, and the same ranks, exact ties included."""
    ref = _load_fixture(cfg)
    batch = _fixture_batch(ref, torch.float32)
    g = build_graph(batch, cutoff=8.0, max_num_neighbors=40)
    np.testing.assert_array_equal(g.edge_index.numpy(), _global_edge_index(ref))
    np.testing.assert_array_equal(g.cell_offsets.numpy(), ref["cell_offsets"])
    vec = edge_vectors(batch.positions, batch.cell, batch.batch, g)
    dist = torch.linalg.vector_norm(vec, dim=-1)
    np.testing.assert_array_equal(vec.numpy(), ref["edge_distance_vec"])
    np.testing.assert_array_equal(dist.numpy(), ref["edge_distance"])
    ranks = neighbor_ranks(dist, g.edge_index[1], batch.num_atoms, max_num_neighbors=40)
    np.testing.assert_array_equal(ranks.numpy(), ref["edge_rank"])


@pytest.mark.parametrize("cfg", ["cfg_tiny", "cfg_t1b1"])
def test_matches_official_graph_float64(cfg):
    """The official float64 run kept the cell in float32 and formed n @ cell in float32
    (fairchem's ``cell_offsets.float().bmm(cell)``); its edge vectors are reproduced
    exactly that way, and ours (all float64) agree to float32 rounding of the offsets."""
    ref = _load_fixture(cfg, "preds_float64.npz")
    batch = _fixture_batch(ref, torch.float64)
    g = build_graph(batch, cutoff=8.0, max_num_neighbors=40)
    np.testing.assert_array_equal(g.edge_index.numpy(), _global_edge_index(ref))
    np.testing.assert_array_equal(g.cell_offsets.numpy(), ref["cell_offsets"])

    src, dst = g.edge_index
    cell32 = torch.as_tensor(ref["cell"])[batch.batch[dst]]
    official = (batch.positions[src] - batch.positions[dst]) + torch.bmm(
        g.cell_offsets.float().unsqueeze(1), cell32
    ).squeeze(1).double()
    np.testing.assert_array_equal(official.numpy(), ref["edge_distance_vec"])

    vec = edge_vectors(batch.positions, batch.cell, batch.batch, g)
    dist = torch.linalg.vector_norm(vec, dim=-1)
    np.testing.assert_allclose(dist.numpy(), ref["edge_distance"], rtol=0, atol=1e-6)
    ranks = neighbor_ranks(dist, g.edge_index[1], batch.num_atoms, max_num_neighbors=40)
    np.testing.assert_array_equal(ranks.numpy(), ref["edge_rank"])


def test_float64_graph_from_float32_fixture():
    """float64 from the float32 inputs: same edges; ranks equal except that distances
    equal in float32 but not in float64 may swap (never across rank 12)."""
    ref = _load_fixture("cfg_tiny")
    batch = _fixture_batch(ref, torch.float64)
    g = build_graph(batch, cutoff=8.0, max_num_neighbors=40)
    np.testing.assert_array_equal(g.edge_index.numpy(), _global_edge_index(ref))
    np.testing.assert_array_equal(g.cell_offsets.numpy(), ref["cell_offsets"])
    dist = torch.linalg.vector_norm(edge_vectors(batch.positions, batch.cell, batch.batch, g), dim=-1)
    ranks = neighbor_ranks(dist, g.edge_index[1], batch.num_atoms, max_num_neighbors=40).numpy()
    np.testing.assert_allclose(dist.numpy(), ref["edge_distance"], rtol=0, atol=1e-5)
    assert np.array_equal(ranks < 12, ref["edge_rank"] < 12)
    tgt = g.edge_index[1].numpy()
    dist_at_rank = {(t, r): d for t, r, d in zip(tgt.tolist(), ref["edge_rank"].tolist(), ref["edge_distance"].tolist())}
    for t, r, d in zip(tgt.tolist(), ranks.tolist(), ref["edge_distance"].tolist()):
        assert abs(dist_at_rank[(t, r)] - d) < 1e-5  # our rank holds an equally distant edge there


def test_ranks_with_exact_ties_reproduce_official():
    """The fixtures contain exact ties (an atom's own images at +n and -n): the
    official tie order is reproduced, not just the multiset of ranks."""
    ref = _load_fixture("cfg_tiny")
    edge_struct = np.repeat(np.arange(len(ref["natoms"])), ref["nedges"])
    tgt = ref["edge_index"][1] + (np.cumsum(ref["natoms"]) - ref["natoms"])[edge_struct]
    d = ref["edge_distance"]
    order = np.lexsort((d, tgt))
    tied = (tgt[order][1:] == tgt[order][:-1]) & (d[order][1:] == d[order][:-1])
    assert tied.sum() > 10
    ranks = neighbor_ranks(torch.as_tensor(d), torch.as_tensor(tgt), int(ref["natoms"].sum()), 40)
    np.testing.assert_array_equal(ranks.numpy(), ref["edge_rank"])
    # Edge order within a target does not change non-tied ranks.
    perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(0))
    shuffled = neighbor_ranks(torch.as_tensor(d)[perm], torch.as_tensor(tgt)[perm], int(ref["natoms"].sum()))
    ok = ~np.isin(np.arange(len(d)), np.concatenate([order[1:][tied], order[:-1][tied]]))
    np.testing.assert_array_equal(shuffled.numpy()[ok[perm.numpy()]], ref["edge_rank"][perm.numpy()][ok[perm.numpy()]])


# --------------------------------------------------------------------------- scale
def test_large_bulk_10k_atoms():
    atoms = ase.build.bulk("Cu", cubic=True) * (14, 14, 13)
    atoms.rattle(0.05, seed=0)
    batch = AtomicBatch.from_atoms([atoms], dtype=torch.float32)
    t0 = time.perf_counter()
    g = build_graph(batch, cutoff=8.0, max_num_neighbors=40)
    elapsed = time.perf_counter() - t0
    print(f"\n10k-atom graph: {len(atoms)} atoms, {g.num_edges} edges, {elapsed:.2f} s")
    n = len(atoms)
    assert g.num_edges == 40 * n
    assert torch.equal(torch.bincount(g.edge_index[1], minlength=n), torch.full((n,), 40))
    # Spot-check a few centres against brute force over the 27 nearest images.
    pos = atoms.positions
    cell = atoms.cell.array
    d = edge_vectors(batch.positions.double(), batch.cell.double(), batch.batch, g).norm(dim=1).numpy()
    tgt = g.edge_index[1].numpy()
    images = np.array(list(itertools.product((-1, 0, 1), repeat=3))) @ cell
    for c in (0, 1234, n - 1):
        all_d = np.linalg.norm(pos[None, :, :] + images[:, None, :] - pos[c], axis=-1).ravel()
        all_d = np.sort(all_d[(all_d > 1e-2) & (all_d <= 8.0)])[:40]
        np.testing.assert_allclose(np.sort(d[tgt == c]), all_d, atol=1e-4)


def test_cutoff_is_inclusive():
    pos = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0000001]])
    g = build_graph(single_batch(pos, np.zeros((3, 3)), [False] * 3), 2.0, 40)
    pairs = set(zip(g.edge_index[1].tolist(), g.edge_index[0].tolist()))
    assert pairs == {(0, 1), (1, 0)}


def test_official_graph_from_unwrapped_extxyz():
    """from_atoms on the fixture structures, with atoms moved by lattice vectors out of
    the cell: the same physical edges as the official graph (offsets shifted to match)."""
    import ase.io

    path = FIXTURES / "structures_small.extxyz"
    ref = _load_fixture("cfg_tiny")
    atoms_list = ase.io.read(path, ":")
    rng = np.random.default_rng(0)
    shifts = [rng.integers(-2, 3, (len(a), 3)) for a in atoms_list]
    for atoms, w in zip(atoms_list, shifts):
        atoms.positions = atoms.positions + w @ atoms.cell.array
    batch = AtomicBatch.from_atoms(atoms_list, dtype=torch.float64)
    g = build_graph(batch, 8.0, 40)

    shift = torch.as_tensor(np.concatenate(shifts))
    src, tgt = g.edge_index
    # pos' = pos + w @ cell  =>  the official offset is n' + w_j - w_i.
    offs = (g.cell_offsets + shift[src] - shift[tgt]).numpy()
    edge_struct = np.repeat(np.arange(len(ref["natoms"])), ref["nedges"])
    ref_start = (np.cumsum(ref["natoms"]) - ref["natoms"])[edge_struct]
    ours = edge_set(tgt.numpy(), src.numpy(), offs)
    theirs = edge_set(ref["edge_index"][1] + ref_start, ref["edge_index"][0] + ref_start, ref["cell_offsets"])
    assert ours == theirs


def test_torch_and_vesin_paths_give_identical_graphs():
    """Same edges in the same order: capped at 40 on the fixture structures, uncapped and
    capped at 16 in a batch that also holds a one-atom bulk cell, whose many images of itself
    give the torch path a different image range than the slabs, and whose exact distance
    ties at the cap both paths decide on the same float64 vectors."""
    from ase.io import read

    frames = read(FIXTURES / "structures_small.extxyz", ":")
    bulk = ase.build.bulk("Cu", "fcc", a=3.6)
    for cutoff, cap, structures in [(8.0, 40, frames), (6.0, 10**6, frames + [bulk]), (6.0, 16, frames[:2] + [bulk])]:
        batch = AtomicBatch.from_atoms(structures, dtype=torch.float64)
        a = build_graph(batch, cutoff, cap, method="vesin")
        b = build_graph(batch, cutoff, cap, method="torch")
        assert torch.equal(a.edge_index, b.edge_index)
        assert torch.equal(a.cell_offsets, b.cell_offsets)
    with pytest.raises(ValueError, match="unknown graph method"):
        build_graph(batch, 8.0, 40, method="gpu")


def test_complete_cell_is_invertible_and_keeps_periodic_rows():
    from spherical_channels.data.cells import complete_cell

    hexagonal = np.array([[2.5, 0.0, 0.0], [1.25, 2.165, 0.0], [0.0, 0.0, 0.0]])  # 60 degrees apart
    for cell, pbc in [
        (hexagonal, [True, True, False]),
        (np.array([[3.0, 1.0, 0.5], [0, 0, 0], [0, 0, 0]]), [True, False, False]),
        (np.zeros((3, 3)), [False, False, False]),
    ]:
        done = complete_cell(cell, np.array(pbc))
        assert abs(np.linalg.det(done)) > 1e-6
        np.testing.assert_array_equal(done[np.array(pbc)], cell[np.array(pbc)])
        for k in np.flatnonzero(~np.array(pbc)):  # added rows are orthogonal to the periodic ones
            assert np.allclose(cell[np.array(pbc)] @ done[k], 0.0)
