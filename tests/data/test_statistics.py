"""Dataset statistics (spherical_channels.data.statistics)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from spherical_channels.data import DatasetStatistics, compute_statistics, open_dataset, write_dataset

ELEMENT_ENERGIES = {1: -3.477, 6: -7.282, 8: -4.948, 29: -3.729}


def synthetic(count: int, noise: float = 0.0, seed: int = 0, forces: bool = True) -> list[Atoms]:
    """Molecules of random composition with E = sum_Z n_Z e_Z (+ noise per atom)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        n = int(rng.integers(2, 12))
        numbers = rng.choice(list(ELEMENT_ENERGIES), n)
        atoms = Atoms(numbers=numbers, positions=np.arange(n)[:, None] * [1.5, 0, 0])
        energy = sum(ELEMENT_ENERGIES[int(z)] for z in numbers) + noise * n * rng.normal()
        results = {"energy": energy}
        if forces:
            results["forces"] = rng.normal(0, 0.7, (n, 3))
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


def test_recovers_element_energies_exactly() -> None:
    stats = compute_statistics(synthetic(60), progress=False)
    assert stats.elements == [1, 6, 8, 29] and stats.num_structures == 60
    for z, e in ELEMENT_ENERGIES.items():
        assert stats.element_energies[z] == pytest.approx(e, abs=1e-10)
    assert abs(stats.energy_per_atom_mean) < 1e-12 and stats.energy_per_atom_std < 1e-12


def test_residual_and_force_statistics_with_noise() -> None:
    frames = synthetic(200, noise=1e-3, seed=1)
    stats = compute_statistics(frames, progress=False)
    for z, e in ELEMENT_ENERGIES.items():
        assert stats.element_energies[z] == pytest.approx(e, abs=2e-3)
    residual = np.array(
        [(a.calc.results["energy"] - stats.reference_energy(a.numbers)) / len(a) for a in frames]
    )
    assert stats.energy_per_atom_mean == pytest.approx(residual.mean(), abs=1e-15)
    assert stats.energy_per_atom_std == pytest.approx(residual.std(), rel=1e-12)
    all_forces = np.concatenate([a.calc.results["forces"] for a in frames])
    assert stats.force_rms == pytest.approx(np.sqrt(np.mean(all_forces**2)), rel=1e-12)
    assert stats.mean_num_atoms == pytest.approx(np.mean([len(a) for a in frames]))


def test_absent_elements_get_zero_and_are_listed() -> None:
    stats = compute_statistics(synthetic(30), progress=False, elements=[1, 6, 8, 29, 79])
    assert stats.element_energies[79] == 0.0 and stats.missing_elements == [79]
    assert stats.elements == [1, 6, 8, 29]


def test_dict_round_trip_through_json() -> None:
    stats = compute_statistics(synthetic(20), progress=False, elements=[1, 6, 8, 29, 47])
    back = DatasetStatistics.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert back == stats
    assert all(isinstance(z, int) for z in back.element_energies)


def test_max_structures_and_missing_targets() -> None:
    frames = synthetic(10, forces=False)
    frames[3].calc = None
    stats = compute_statistics(frames, max_structures=5, progress=False)
    assert (stats.num_structures, stats.num_with_energy, stats.num_with_forces) == (5, 4, 0)
    assert stats.force_rms is None


def test_underdetermined_fit_warns() -> None:
    water = [Atoms("H2O", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]]) for _ in range(3)]
    for k, atoms in enumerate(water):
        atoms.calc = SinglePointCalculator(atoms, energy=-14.0 + 0.01 * k)
    with pytest.warns(UserWarning, match="not determined"):
        compute_statistics(water, progress=False)


def test_statistics_of_a_dataset_file(tmp_path: Path) -> None:
    frames = synthetic(15)
    write_dataset(frames, tmp_path / "s.extxyz")
    from_file = compute_statistics(open_dataset(tmp_path / "s.extxyz"), progress=False)
    in_memory = compute_statistics(frames, progress=False)
    assert from_file == in_memory
