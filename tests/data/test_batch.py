"""AtomicBatch: construction from ASE, conversion, concatenation and validation."""

from __future__ import annotations

import ase.build
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from spherical_channels.data import AtomicBatch


def _slab() -> Atoms:
    slab = ase.build.fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    ase.build.add_adsorbate(slab, "O", 1.5, "fcc")
    slab.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    slab.rattle(0.01, seed=0)
    return slab


def _with_results(atoms: Atoms, energy: float) -> Atoms:
    forces = np.arange(3 * len(atoms), dtype=float).reshape(-1, 3) / 10
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def test_from_atoms_fields():
    slab = _slab()
    mol = ase.build.molecule("H2O")  # pbc False, zero cell
    batch = AtomicBatch.from_atoms([slab, mol])
    n_slab = len(slab)
    assert batch.num_structures == len(batch) == 2
    assert batch.num_atoms == n_slab + 3
    assert batch.positions.shape == (n_slab + 3, 3) and batch.positions.dtype == torch.float32
    assert batch.cell.shape == (2, 3, 3) and batch.cell.dtype == torch.float32
    assert torch.equal(batch.cell[1], torch.zeros(3, 3))
    assert batch.pbc.tolist() == [[True, True, False], [False, False, False]]
    assert batch.natoms.tolist() == [n_slab, 3]
    assert batch.batch.tolist() == [0] * n_slab + [1] * 3
    assert batch.atomic_numbers.dtype == torch.long
    assert batch.atomic_numbers[-3:].tolist() == [8, 1, 1]
    assert batch.fixed.tolist() == [True] * 4 + [False] * (n_slab - 4) + [False] * 3
    assert torch.equal(batch.tags[:n_slab], torch.as_tensor(slab.get_tags()))
    assert batch.tags[n_slab:].tolist() == [0, 0, 0]
    assert batch.energy is None and batch.forces is None
    np.testing.assert_allclose(batch.positions[:n_slab].numpy(), slab.positions, atol=1e-5)


def test_targets_from_calculator():
    slab, mol = _with_results(_slab(), -3.5), _with_results(ase.build.molecule("CH4"), 1.25)
    batch = AtomicBatch.from_atoms([slab, mol], dtype=torch.float64)
    assert batch.energy.dtype == torch.float64
    assert batch.energy.tolist() == [-3.5, 1.25]
    np.testing.assert_allclose(batch.forces.numpy(), np.concatenate([slab.calc.results["forces"], mol.calc.results["forces"]]))
    # A structure without stored results: targets are absent, not partially filled.
    partial = AtomicBatch.from_atoms([slab, ase.build.molecule("H2O")])
    assert partial.energy is None and partial.forces is None


def test_to_and_concatenate_and_split():
    a = AtomicBatch.from_atoms([_with_results(_slab(), -1.0)])
    b = AtomicBatch.from_atoms([_with_results(ase.build.molecule("CH4"), 2.0), _with_results(ase.build.bulk("Cu"), 0.5)])
    both = AtomicBatch.concatenate([a, b])
    direct = AtomicBatch.from_atoms(
        [_with_results(_slab(), -1.0), _with_results(ase.build.molecule("CH4"), 2.0), _with_results(ase.build.bulk("Cu"), 0.5)]
    )
    for name in ("positions", "atomic_numbers", "cell", "pbc", "natoms", "batch", "fixed", "tags", "energy", "forces"):
        assert torch.equal(getattr(both, name), getattr(direct, name)), name
    both.validate()

    d = both.to(dtype=torch.float64)
    assert d.positions.dtype == d.cell.dtype == d.energy.dtype == d.forces.dtype == torch.float64
    assert d.atomic_numbers.dtype == d.natoms.dtype == d.batch.dtype == d.tags.dtype == torch.long
    assert d.pbc.dtype == d.fixed.dtype == torch.bool
    assert both.positions.dtype == torch.float32  # the original is unchanged
    assert d.to(device="cpu").positions.device.type == "cpu"

    parts = both.split()
    assert [p.num_atoms for p in parts] == both.natoms.tolist()
    again = AtomicBatch.concatenate(parts)
    for name in ("positions", "batch", "energy", "forces", "cell"):
        assert torch.equal(getattr(again, name), getattr(both, name)), name


def _bad_batch(modify) -> AtomicBatch:
    atoms = [ase.build.molecule("H2O"), _slab(), ase.build.molecule("CH4")]
    modify(atoms)
    return AtomicBatch.from_atoms(atoms)


def test_nan_position_names_structure_and_atom():
    def modify(atoms):
        p = atoms[1].positions
        p[5, 1] = np.nan
        atoms[1].positions = p

    with pytest.raises(ValueError, match=r"^structure 1: non-finite \(NaN/inf\) positions for atoms 5$"):
        _bad_batch(modify)


def test_nan_cell():
    def modify(atoms):
        c = atoms[1].cell.array.copy()
        c[0, 0] = np.inf
        atoms[1].set_cell(c)

    with pytest.raises(ValueError, match=r"^structure 1: cell has non-finite \(NaN/inf\) entries$"):
        _bad_batch(modify)


def test_singular_cell_with_pbc():
    def modify(atoms):
        atoms[2].pbc = True
        atoms[2].set_cell([[4.0, 0, 0], [8.0, 0, 0], [0, 0, 4.0]])

    with pytest.raises(ValueError, match=r"^structure 2: singular cell: the vectors of its periodic axes"):
        _bad_batch(modify)


def test_zero_vector_on_periodic_axis():
    def modify(atoms):
        atoms[0].pbc = [True, False, False]  # cell is all zero

    with pytest.raises(ValueError, match=r"^structure 0: singular cell: axis 0 is periodic \(pbc=\[True, False, False\]\) but its cell vector is zero$"):
        _bad_batch(modify)


def test_zero_cell_without_pbc_is_fine():
    batch = AtomicBatch.from_atoms([ase.build.molecule("C6H6")])
    assert torch.equal(batch.cell, torch.zeros(1, 3, 3))


def test_bad_atomic_number():
    def modify(atoms):
        z = atoms[2].numbers
        z[3] = 0
        atoms[2].numbers = z

    with pytest.raises(ValueError, match=r"^structure 2: unknown element: atomic numbers \[0\] outside the element table 1\.\.118 for atoms 3$"):
        _bad_batch(modify)


def test_mismatched_lengths():
    batch = AtomicBatch.from_atoms([_with_results(ase.build.molecule("H2O"), 0.0)])
    with pytest.raises(ValueError, match="forces has shape"):
        AtomicBatch(**{**batch.__dict__, "forces": batch.forces[:2]}).validate()
    with pytest.raises(ValueError, match="natoms"):
        AtomicBatch(**{**batch.__dict__, "natoms": torch.tensor([2])}).validate()
    with pytest.raises(ValueError, match="tags has shape"):
        AtomicBatch(**{**batch.__dict__, "tags": torch.zeros(5, dtype=torch.long)}).validate()
