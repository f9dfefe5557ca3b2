"""The one validation layer (spherical_channels.data.validation): the same rules and messages
for the readers, AtomicBatch and validate_batch."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from spherical_channels.data import AtomicBatch, DataError, StructureError, open_dataset, write_dataset
from spherical_channels.data.cells import periodic_heights
from spherical_channels.data.validation import (
    FLOAT32_MAX,
    MIN_CELL_HEIGHT,
    MIN_DISTANCE,
    atoms_problem,
    overlap_message,
    validate_atoms,
    validate_batch,
)


def good(seed: int = 0) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = Atoms("Cu2O", positions=[[0, 0, 0], [1.8, 1.8, 0], [0.9, 0.9, 1.8]], cell=np.eye(3) * 3.6, pbc=True)
    atoms.positions += rng.normal(0, 0.02, (3, 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-10.0, forces=rng.normal(size=(3, 3)))
    return atoms


def _nan_position(a: Atoms) -> Atoms:
    a.positions[1, 2] = np.nan
    return a


def _nan_cell(a: Atoms) -> Atoms:
    cell = a.cell.array.copy()
    cell[2, 2] = np.inf
    a.set_cell(cell)
    return a


def _unknown_element(a: Atoms) -> Atoms:
    a.numbers[2] = 95
    return a


def _zero_periodic_vector(a: Atoms) -> Atoms:
    a.set_cell([[3.6, 0, 0], [0, 3.6, 0], [0, 0, 0]])
    return a


def _dependent_vectors(a: Atoms) -> Atoms:
    a.set_cell([[3.6, 0, 0], [0, 3.6, 0], [3.6, 3.6, 0]])
    return a


def _overlap(a: Atoms) -> Atoms:
    a.positions[2] = a.positions[0] + [0.004, 0.0, 0.003]
    return a


def _own_image(a: Atoms) -> Atoms:
    single = Atoms("Cu", positions=[[0.1, 0.2, 0.3]], cell=np.diag([0.008, 3.0, 3.0]), pbc=True)
    single.calc = SinglePointCalculator(single, energy=-1.0, forces=np.zeros((1, 3)))
    return single


def _thin_cell(a: Atoms) -> Atoms:
    thin = Atoms("Cu", positions=[[0, 0, 0]], cell=np.diag([3.0, 3.0, 0.02]), pbc=True)
    thin.calc = SinglePointCalculator(thin, energy=-1.0, forces=np.zeros((1, 3)))
    return thin


def _nan_forces(a: Atoms) -> Atoms:
    a.calc.results["forces"][1, 0] = np.nan
    return a


BAD = {
    "nan position": (_nan_position, r"non-finite \(NaN/inf\) positions for atoms 1"),
    "nan cell": (_nan_cell, r"cell has non-finite \(NaN/inf\) entries"),
    "unknown element": (_unknown_element, r"unknown element: atomic numbers \[95\] outside the element table 1\.\.89 for atoms 2"),
    "zero periodic vector": (_zero_periodic_vector, r"singular cell: axis 2 is periodic .* but its cell vector is zero"),
    "dependent vectors": (_dependent_vectors, r"singular cell: the vectors of its periodic axes .* linearly dependent"),
    "overlap": (_overlap, r"atoms 0 and 2 are 0\.00500 Å apart \(overlapping atoms: distance <= 0\.01 Å\)"),
    "own image": (_own_image, r"atom 0 is 0\.00800 Å from its own periodic image \[-?1, 0, 0\] \(overlapping atoms"),
    "thin cell": (_thin_cell, r"cell too thin: 0\.02 Å between opposite faces along periodic axis 2 .*visit about 600 periodic images along it"),
    "nan forces": (_nan_forces, r"non-finite \(NaN/inf\) forces for atoms 1"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_one_message_from_every_entry_point(tmp_path: Path, name: str) -> None:
    """A bad structure gets the same message from validate_atoms, the reader (with the file
    in front) and validate_batch (from_atoms); the good ones around it pass everywhere."""
    spoil, what = BAD[name]
    frames = [good(0), spoil(good(1)), good(2)]
    problem = atoms_problem(frames[1], max_atomic_number=89)
    assert problem is not None and re.match(what, problem), problem
    for k in (0, 2):
        assert atoms_problem(frames[k], max_atomic_number=89) is None
    with pytest.raises(StructureError) as direct:
        validate_atoms(frames[1], index=1, max_atomic_number=89)
    assert str(direct.value) == f"structure 1: {problem}" and direct.value.index == 1

    path = tmp_path / "bad.extxyz"
    write_dataset(frames, path)
    ds = open_dataset(path)
    ds[0], ds[2]
    with pytest.raises(DataError) as read:
        ds[1]
    assert str(read.value) == f"{path}: structure 1: {problem}"
    assert (read.value.path, read.value.index) == (path, 1)

    with pytest.raises(StructureError) as batched:
        validate_batch(
            _unchecked(frames),
            max_atomic_number=89,
            check_overlaps=True,
        )
    assert str(batched.value) == f"structure 1: {problem}" and batched.value.index == 1


def _unchecked(frames: list[Atoms]) -> AtomicBatch:
    """A float64 batch built without from_atoms's own validation."""
    parts = []
    for atoms in frames:
        n = len(atoms)
        parts.append(
            AtomicBatch(
                positions=torch.tensor(atoms.positions, dtype=torch.float64),
                atomic_numbers=torch.tensor(atoms.numbers),
                cell=torch.tensor(atoms.cell.array, dtype=torch.float64).view(1, 3, 3),
                pbc=torch.tensor(atoms.pbc).view(1, 3),
                natoms=torch.tensor([n]),
                batch=torch.zeros(n, dtype=torch.long),
                fixed=torch.zeros(n, dtype=torch.bool),
                tags=torch.zeros(n, dtype=torch.long),
                energy=torch.tensor([atoms.calc.results["energy"]], dtype=torch.float64),
                forces=torch.tensor(atoms.calc.results["forces"], dtype=torch.float64),
            )
        )
    return AtomicBatch.concatenate(parts)


def test_from_atoms_rejects_without_overlap_search() -> None:
    """AtomicBatch.from_atoms checks everything but overlaps (the radius graph reports those)."""
    for name in ("nan position", "nan cell", "zero periodic vector", "dependent vectors", "thin cell", "nan forces"):
        spoil, what = BAD[name]
        with pytest.raises(StructureError, match=r"^structure 1: " + what):
            AtomicBatch.from_atoms([good(0), spoil(good(1))])
    AtomicBatch.from_atoms([good(0), _overlap(good(1))])  # not searched here
    with pytest.raises(StructureError, match=r"^structure 0: atoms 0 and 2 are"):
        validate_batch(AtomicBatch.from_atoms([_overlap(good(1))], dtype=torch.float64), check_overlaps=True)


def test_empty_structure_everywhere(tmp_path: Path) -> None:
    empty = Atoms()
    assert atoms_problem(empty) == "no atoms"
    with pytest.raises(StructureError, match=r"^structure 1: no atoms$"):
        AtomicBatch.from_atoms([good(0), empty])
    write_dataset([good(0), empty], tmp_path / "e.extxyz")
    with pytest.raises(DataError, match=r"e\.extxyz: structure 1: no atoms$"):
        open_dataset(tmp_path / "e.extxyz")[1]


def test_element_table_of_the_model() -> None:
    uranium = Atoms("U", positions=[[0, 0, 0]])
    batch = AtomicBatch.from_atoms([good(0), uranium])  # 92 is an element
    with pytest.raises(StructureError, match=r"^structure 1: unknown element: atomic numbers \[92\] outside the element table 1\.\.89 for atoms 0$"):
        validate_batch(batch, max_atomic_number=89)
    validate_batch(batch, max_atomic_number=92)
    batch.atomic_numbers[0] = 119
    with pytest.raises(StructureError, match=r"^structure 0: .*\[119\] outside the element table 1\.\.118"):
        batch.validate()


@pytest.mark.parametrize("distance, overlaps", [(MIN_DISTANCE, True), (0.0101, False), (0.0099, True)])
def test_overlap_rule_is_inclusive_everywhere(tmp_path: Path, distance: float, overlaps: bool) -> None:
    """distance <= MIN_DISTANCE overlaps, for the reader and for the batch check alike."""
    pair = Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    pair.positions[1, 0] += distance
    d = float(np.linalg.norm(pair.positions[1] - pair.positions[0]))
    assert (d <= MIN_DISTANCE) == overlaps  # the float distance is on the intended side
    path = tmp_path / f"pair_{distance}.extxyz"
    write_dataset([pair], path)
    batch = AtomicBatch.from_atoms([pair], dtype=torch.float64)
    if overlaps:
        with pytest.raises(DataError, match="atoms 0 and 1 are .* apart"):
            open_dataset(path)[0]
        with pytest.raises(StructureError, match="^structure 0: atoms 0 and 1 are .* apart"):
            validate_batch(batch, check_overlaps=True)
    else:
        assert len(open_dataset(path)[0]) == 2
        validate_batch(batch, check_overlaps=True)


def test_overlap_message_format() -> None:
    assert overlap_message(3, 1, 0.004) == "atoms 1 and 3 are 0.00400 Å apart (overlapping atoms: distance <= 0.01 Å)"
    assert overlap_message(2, 2, 0.005, [0, 1, 0]).startswith("atom 2 is 0.00500 Å from its own periodic image [0, 1, 0]")


def test_periodic_heights() -> None:
    np.testing.assert_allclose(periodic_heights(np.diag([2.0, 3.0, 4.0]), [True] * 3), [2, 3, 4], rtol=1e-14)
    slab = np.array([[3.0, 0, 0], [1.0, 2.0, 0], [0, 0, 0]])
    np.testing.assert_allclose(periodic_heights(slab, [True, True, False]), [6 / np.sqrt(5), 2.0], rtol=1e-14)
    # a non-periodic vector nearly along a periodic one does not make the cell thin
    skew = slab.copy()
    skew[2] = [10.0, 0.0, 1e-3]
    np.testing.assert_allclose(periodic_heights(skew, [True, True, False]), [6 / np.sqrt(5), 2.0], rtol=1e-12)
    wire = np.diag([0.0, 0.0, 2.5])
    np.testing.assert_allclose(periodic_heights(wire, [False, False, True]), [2.5])


def test_thin_cell_limit_and_slabs() -> None:
    fine = Atoms("Cu", positions=[[0, 0, 0]], cell=np.diag([3.0, 3.0, MIN_CELL_HEIGHT * 1.01]), pbc=True)
    AtomicBatch.from_atoms([fine])
    thin = Atoms("Cu", positions=[[0, 0, 0]], cell=np.diag([3.0, 3.0, MIN_CELL_HEIGHT * 0.99]), pbc=True)
    with pytest.raises(StructureError, match="cell too thin"):
        AtomicBatch.from_atoms([thin])
    # A slab periodic in x, y with a short third vector: only periodic axes count.
    slab = Atoms("Cu", positions=[[0, 0, 0]], cell=[[3.0, 0, 0], [0, 3.0, 0], [2.9, 0, 0.01]], pbc=[True, True, False])
    AtomicBatch.from_atoms([slab])
    assert atoms_problem(slab) is None


def test_a_very_thin_cell_is_rejected_fast() -> None:
    """0.02 Å (which exhausted memory in the neighbour list) and 1e-7 Å cells are rejected
    without searching their images."""
    import time

    for height in (0.02, 1e-5):
        atoms = Atoms("Cu4", positions=np.zeros((4, 3)) + np.arange(4)[:, None] * [0.7, 0.7, 0], cell=np.diag([3.0, 3.0, height]), pbc=True)
        start = time.perf_counter()
        problem = atoms_problem(atoms)
        assert problem is not None and problem.startswith("cell too thin"), problem
        with pytest.raises(StructureError, match="cell too thin"):
            AtomicBatch.from_atoms([atoms])
        assert time.perf_counter() - start < 1.0


def test_targets_beyond_float32_are_errors_even_without_bounds(tmp_path: Path) -> None:
    frames = [good(k) for k in range(4)]
    frames[1].calc.results["energy"] = 1e39
    frames[2].calc.results["forces"][0, 1] = -1e39
    frames[3].calc.results["energy"] = 1e30  # finite in float32, but implausible
    path = tmp_path / "big.extxyz"
    write_dataset(frames, path)
    for bounds in ({}, {"max_abs_force": None, "max_abs_energy_per_atom": None}):
        ds = open_dataset(path, require_energy=True, require_forces=True, **bounds)
        with pytest.raises(DataError, match=r"structure 1: energy 1e\+39 eV is not finite in float32"):
            ds[1]
        with pytest.raises(DataError, match=r"structure 2: forces not finite in float32 .* for atoms 0$"):
            ds[2]
    strict = open_dataset(path, require_energy=True)
    with pytest.raises(DataError, match=r"structure 3: implausible energy 1e\+30 eV \(3\.33e\+29 eV/atom"):
        strict[3]
    assert open_dataset(path, max_abs_energy_per_atom=None)[3].calc.results["energy"] == 1e30


def test_force_and_energy_bounds() -> None:
    atoms = good(0)
    atoms.calc.results["forces"][2, 0] = 2e4
    assert "implausible forces for atoms 2 (largest component 2e+04 eV/Å" in atoms_problem(atoms)
    assert atoms_problem(atoms, max_abs_force=3e4) is None
    atoms = good(0)
    atoms.calc.results["energy"] = -3.1e6  # 1.03e6 eV/atom
    assert "implausible energy" in atoms_problem(atoms)
    assert atoms_problem(atoms, max_abs_energy_per_atom=2e6) is None
    atoms.calc.results["energy"] = -2.9e6  # below 1e6 eV/atom: an all-electron scale, accepted
    assert atoms_problem(atoms) is None


def test_batch_targets() -> None:
    batch = AtomicBatch.from_atoms([good(0), good(1)], dtype=torch.float64)
    batch.energy[1] = float("inf")
    with pytest.raises(StructureError, match=r"^structure 1: non-finite energy \(inf\)$"):
        batch.validate()
    batch.energy[1] = 1e39
    with pytest.raises(StructureError, match=r"^structure 1: energy 1e\+39 eV is not finite in float32"):
        batch.validate()
    batch.energy[1] = 1e30  # plausibility bounds are the readers' business
    batch.validate()
    f32 = [good(0), good(1)]
    f32[0].calc.results["energy"] = 1e39  # becomes inf in a float32 batch
    with pytest.raises(StructureError, match=r"^structure 0: non-finite energy"):
        AtomicBatch.from_atoms(f32)


def test_error_types() -> None:
    assert issubclass(DataError, StructureError) and issubclass(StructureError, ValueError)
    batch = AtomicBatch.from_atoms([good(0)])
    with pytest.raises(StructureError, match="forces has shape"):
        AtomicBatch(**{**batch.__dict__, "forces": batch.forces[:2]}).validate()
    with pytest.raises(StructureError, match="batch index does not match"):
        AtomicBatch(**{**batch.__dict__, "batch": torch.tensor([0, 0, 1])}).validate()
    assert FLOAT32_MAX == float(np.finfo(np.float32).max)


def test_batched_cell_screen_agrees_with_the_per_structure_rules() -> None:
    """validate_batch screens all cells at once; it must flag every cell the per-structure
    rules reject (and here, exactly those)."""
    from spherical_channels.data.validation import _cells_suspect, cell_problem, thickness_problem

    rng = np.random.default_rng(5)
    cells, pbcs = [], []
    for k in range(300):
        cell = np.diag(rng.uniform(0.3, 5.0, 3)) + rng.normal(0, 0.3, (3, 3))
        kind = k % 6
        if kind == 1:
            cell[2] = cell[0] * rng.uniform(0.5, 2)  # dependent
        elif kind == 2:
            cell[rng.integers(3)] = 0.0
        elif kind == 3:
            cell[0, 0] = np.nan
        cells.append(cell)
        pbcs.append(rng.random(3) < 0.7)
    cells, pbcs = np.array(cells), np.array(pbcs)
    expected = np.array([cell_problem(c, p) is not None or thickness_problem(c, p) is not None for c, p in zip(cells, pbcs)])
    assert 30 < expected.sum() < 270  # both kinds well represented
    np.testing.assert_array_equal(_cells_suspect(cells, pbcs), expected)
