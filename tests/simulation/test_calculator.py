"""The ASE calculator: numbers, determinism, relaxation with ASE optimisers, molecular dynamics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms
from ase.md.verlet import VelocityVerlet

from spherical_channels import SCNCalculator
from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models import SCN
from spherical_channels.models.checkpoint import load_model
from spherical_channels.resources import EXAMPLE_CHECKPOINT, resource_path
from spherical_channels.simulation import relax

from scn_helpers import scale_like_fixtures

SMALL = dict(num_interactions=2, lmax=3, mmax=1, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
             num_sphere_samples=16, num_basis_functions=8, max_num_neighbors=20, cutoff=5.0)


def slab_with_adsorbate():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    slab.pbc = True
    add_adsorbate(slab, "O", 1.6, "fcc")
    slab.rattle(0.02, seed=0)  # before the constraint: ASE's rattle leaves fixed atoms in place
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 3]))  # bottom layer
    return slab


def conservative_model() -> SCN:
    """Random weights scaled as the fixtures' (outputs O(1), so a relaxation has work to do)."""
    torch.manual_seed(0)
    # No neighbour cap and one resolution: the rank-based switches make SCN's energy jump
    # (SPEC section 7), which random weights amplify; the cutoff is the only jump left.
    options = {**SMALL, "max_num_neighbors": 500, "num_resolutions": 1}
    return scale_like_fixtures(SCN(**options, direct_forces=False)).double().eval()


def test_calculator_matches_the_model_and_is_deterministic() -> None:
    path = resource_path(EXAMPLE_CHECKPOINT)
    atoms = slab_with_adsorbate()
    atoms.calc = SCNCalculator(path)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)
    out = load_model(path)(AtomicBatch.from_atoms([atoms]))
    assert energy == pytest.approx(float(out["energy"][0].detach()), abs=1e-6)
    np.testing.assert_allclose(forces, out["forces"].detach().numpy(), atol=1e-6)
    assert atoms.get_potential_energy(force_consistent=True) == energy  # free energy = energy
    fresh = atoms.copy()
    fresh.calc = SCNCalculator(path)
    assert fresh.get_potential_energy() == energy  # same structure, same prediction


def test_rotation_averaging_is_deterministic_and_close() -> None:
    path = resource_path(EXAMPLE_CHECKPOINT)
    atoms = slab_with_adsorbate()
    plain = SCNCalculator(path, dtype=torch.float64).get_potential_energy(atoms)
    averaged = SCNCalculator(path, dtype=torch.float64, rotation_average=3, seed=1)
    a, b = averaged.get_potential_energy(atoms), SCNCalculator(path, dtype=torch.float64, rotation_average=3, seed=1).get_potential_energy(atoms)
    assert a == b
    assert a != plain and abs(a - plain) < 0.05 * abs(plain)  # a small equivariance correction


def test_relaxation_reaches_fmax_and_keeps_fixed_atoms(tmp_path) -> None:
    atoms = slab_with_adsorbate()
    fixed = atoms.constraints[0].get_indices()
    calc = SCNCalculator(conservative_model(), dtype=torch.float64)
    start = atoms.copy()
    start.calc = calc
    assert np.linalg.norm(start.get_forces(), axis=1).max() > 0.5  # far from converged at first
    # FIRE: robust on the arbitrary energy surface of random weights (BFGS can wander off there)
    result = relax(atoms, calc, optimizer="FIRE", fmax=0.05, steps=300, trajectory=tmp_path / "r.traj")
    assert result.converged and result.max_force < 0.05
    np.testing.assert_array_equal(result.atoms.positions[fixed], atoms.positions[fixed])
    assert np.abs(result.atoms.positions - atoms.positions).max() > 1e-4  # something moved
    assert (tmp_path / "r.traj").exists()
    assert result.energy <= SCNCalculator(conservative_model(), dtype=torch.float64).get_potential_energy(atoms)


def test_molecular_dynamics_conserves_energy() -> None:
    atoms = slab_with_adsorbate()
    atoms.set_constraint()
    atoms.calc = SCNCalculator(conservative_model(), dtype=torch.float64)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    start = atoms.get_total_energy()
    dyn.run(10)
    assert abs(atoms.get_total_energy() - start) < 1e-3 * max(1.0, abs(start))


def test_model_without_forces_is_rejected() -> None:
    with pytest.raises(ValueError, match="forces"):
        SCNCalculator(SCN(**SMALL, regress_forces=False))


def _strained_cu():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.set_cell(atoms.cell.array @ np.diag([1.03, 0.98, 1.01]), scale_atoms=True)
    atoms.rattle(0.02, seed=1)
    return atoms


def test_stress_matches_ase_numerical_stress() -> None:
    atoms = _strained_cu()
    atoms.calc = SCNCalculator(conservative_model(), dtype=torch.float64)
    stress = atoms.get_stress()  # Voigt, eV/A^3
    numerical = atoms.calc.calculate_numerical_stress(atoms, d=1e-5)
    assert np.abs(numerical).max() > 1e-3
    # ASE's numerical stress is a 2-point difference: error O(d^2 E''') ~ 1e-5 relative here
    np.testing.assert_allclose(stress, numerical, atol=1e-4 * np.abs(numerical).max())


def test_direct_force_model_says_why_it_has_no_stress() -> None:
    from ase.calculators.calculator import PropertyNotImplementedError

    torch.manual_seed(0)
    atoms = _strained_cu()
    atoms.calc = SCNCalculator(SCN(**SMALL).eval())
    atoms.get_forces()
    with pytest.raises(PropertyNotImplementedError, match="direct force head"):
        atoms.get_stress()


def test_cell_relaxation_with_frechet_cell_filter_converges() -> None:
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    torch.manual_seed(1)  # a random model whose energy has a minimum near fcc Cu (measured)
    model = scale_like_fixtures(SCN(**SMALL, direct_forces=False, max_num_elements=30)).double().eval()
    atoms = _strained_cu()
    start_cell = atoms.cell.array.copy()
    atoms.calc = SCNCalculator(model, dtype=torch.float64)
    optimizer = BFGS(FrechetCellFilter(atoms), logfile=None)
    assert optimizer.run(fmax=0.01, steps=300)
    assert np.abs(atoms.get_forces()).max() <= 0.01
    assert np.abs(atoms.get_stress()).max() * atoms.get_volume() <= 0.01 * 3  # the filter's stress criterion
    assert np.abs(atoms.cell.array - start_cell).max() > 0.01  # the cell did relax
