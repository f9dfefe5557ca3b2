"""relax_many: the batched relaxation engine against ASE, failures, in-flight batching, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import optimize as ase_optimize
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule
from ase.constraints import FixAtoms, FixBondLength
from ase.filters import FrechetCellFilter
from ase.io import read
from ase.io.trajectory import Trajectory

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models import SCN
from spherical_channels.resources import EXAMPLE_STRUCTURES, resource_path
from spherical_channels.simulation import RelaxOutcome, SCNCalculator, relax_many
from spherical_channels.testing.potentials import MorsePotential

from scn_helpers import scale_like_fixtures

F64 = torch.float64
# Same float64 numbers as ASE up to summation order: rounding grows to ~1e-13 Å over a
# relaxation; the cell filter's matrix log/exp (scipy vs torch) to ~1e-9 Å.
TOLERANCE = 1e-6
NAN_TAG, RAISE_TAG = 7, 8


def slab(kind: str = "111", seed: int = 1, size: tuple = (2, 2, 3), height: float = 1.2):
    """A Cu slab with an O adsorbate, rattled away from the minimum, bottom layer fixed."""
    build = fcc111 if kind == "111" else fcc100
    atoms = build("Cu", size=size, vacuum=6.0)
    atoms.pbc = True
    add_adsorbate(atoms, "O", height, "fcc" if kind == "111" else "hollow")
    atoms.rattle(0.1, seed=seed)
    atoms.set_constraint(FixAtoms(indices=[a.index for a in atoms if a.tag == size[2]]))
    return atoms


def strained_bulk(seed: int = 2):
    """A rattled, sheared and strained Cu cell, far from the Morse minimum in cell and positions."""
    atoms = bulk("Cu", "fcc", a=3.9, cubic=True) * (2, 1, 1)
    strain = np.array([[0.03, 0.01, 0.0], [0.01, -0.02, 0.005], [0.0, 0.005, 0.01]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def morse() -> MorsePotential:
    return MorsePotential().to(F64)


def ase_relax(atoms, name: str, fmax: float, steps: int, cell: bool = False, **options):
    """``(frames, nsteps, converged)``: positions and cell at every frame of ASE's run."""
    atoms = atoms.copy()
    atoms.calc = SCNCalculator(morse(), dtype=F64)
    target = FrechetCellFilter(atoms) if cell else atoms
    opt = getattr(ase_optimize, name)(target, logfile=None, **options)
    frames = []
    for converged in opt.irun(fmax=fmax, steps=steps):
        frames.append((atoms.get_positions().copy(), atoms.cell.array.copy(), atoms.get_potential_energy()))
    return frames, opt.nsteps, converged


class Sabotaged(torch.nn.Module):
    """Morse, except: structures with an atom tagged ``NAN_TAG`` get NaN energy and forces once
    ``after`` calls on them have passed, and any batch holding an atom tagged ``RAISE_TAG`` raises."""

    conservative = True
    regress_forces = True

    def __init__(self, after: int = 0) -> None:
        super().__init__()
        self.inner = MorsePotential()
        self.after, self.calls = after, 0

    def forward(self, batch, stress: bool = False):  # noqa: ANN001, ANN201
        if bool((batch.tags == RAISE_TAG).any()):
            raise RuntimeError("sabotaged structure")
        out = dict(self.inner(batch, stress=stress))
        marked = torch.zeros(batch.num_structures, dtype=torch.long).index_add_(
            0, batch.batch, (batch.tags == NAN_TAG).long()
        ) > 0
        if bool(marked.any()):
            self.calls += 1
        if self.calls > self.after:
            out["energy"] = torch.where(marked, float("nan"), out["energy"])
            out["forces"] = torch.where(marked[batch.batch, None], float("nan"), out["forces"])
        return out


def tagged(atoms, tag: int):
    atoms = atoms.copy()
    tags = atoms.get_tags()
    tags[-1] = tag
    atoms.set_tags(tags)
    return atoms


# ---------------------------------------------------------------------------- against ASE
@pytest.mark.parametrize("name", ["FIRE", "LBFGS"])
def test_one_structure_follows_ase_to_convergence(name: str, tmp_path: Path) -> None:
    atoms = slab()
    frames, nsteps, converged = ase_relax(atoms, name, fmax=0.01, steps=200)
    assert converged and nsteps > 20
    [out] = relax_many([atoms], morse(), optimizer=name, fmax=0.01, steps=200, dtype=F64,
                       trajectories=tmp_path, progress=False)
    assert isinstance(out, RelaxOutcome) and out.error is None
    assert out.converged and out.steps == nsteps
    written = read(out.trajectory, ":")
    assert len(written) == nsteps + 1  # ASE writes the start and every step
    error = max(np.abs(w.positions - p).max() for w, (p, _, _) in zip(written, frames))
    assert error < TOLERANCE
    assert out.energy == pytest.approx(frames[-1][2], abs=1e-9)
    forces = out.atoms.get_forces(apply_constraint=True)
    assert out.max_force == pytest.approx(float(np.linalg.norm(forces, axis=1).max()), abs=1e-12)
    assert out.max_force < 0.01
    fixed = atoms.constraints[0].get_indices()
    np.testing.assert_array_equal(out.atoms.positions[fixed], atoms.positions[fixed])


@pytest.mark.parametrize("name, options", [
    ("FIRE", dict(dt=0.05, maxstep=0.1, dtmax=0.6, Nmin=3, finc=1.2, fdec=0.6, astart=0.2, fa=0.95, a=0.15)),
    ("LBFGS", dict(maxstep=0.1, memory=4, damping=0.8, alpha=40.0)),
])
def test_non_default_parameters_follow_ase(name: str, options: dict, tmp_path: Path) -> None:
    atoms = slab("100", seed=4)
    frames, nsteps, converged = ase_relax(atoms, name, fmax=0.02, steps=200, **options)
    assert converged
    [out] = relax_many([atoms], morse(), optimizer=name, fmax=0.02, steps=200, dtype=F64,
                       optimizer_options=options, trajectories=tmp_path, progress=False)
    assert out.converged and out.steps == nsteps
    written = read(out.trajectory, ":")
    assert max(np.abs(w.positions - p).max() for w, (p, _, _) in zip(written, frames)) < TOLERANCE


@pytest.mark.parametrize("name, steps", [("FIRE", 200), ("LBFGS", 40)])
def test_cell_relaxation_follows_ase_frechet_cell_filter(name: str, steps: int, tmp_path: Path) -> None:
    atoms = strained_bulk()
    frames, nsteps, converged = ase_relax(atoms, name, fmax=0.01, steps=steps, cell=True)
    [out] = relax_many([atoms], morse(), optimizer=name, fmax=0.01, steps=steps, dtype=F64, cell=True,
                       trajectories=tmp_path, progress=False)
    assert out.error is None and out.steps == nsteps and out.converged == converged
    written = read(out.trajectory, ":")
    assert len(written) == len(frames)
    assert max(np.abs(w.positions - p).max() for w, (p, _, _) in zip(written, frames)) < TOLERANCE
    assert max(np.abs(w.cell.array - c).max() for w, (_, c, _) in zip(written, frames)) < TOLERANCE
    assert np.abs(frames[-1][1] - atoms.cell.array).max() > 0.05  # the cell did relax
    assert out.atoms.get_stress().shape == (6,)
    if name == "FIRE":
        assert converged and np.abs(out.atoms.get_stress()).max() * out.atoms.get_volume() / len(atoms) < 0.01


# ---------------------------------------------------------------------------- batching
@pytest.mark.parametrize("name, budget", [("FIRE", dict(max_structures=2)), ("LBFGS", dict(max_atoms=40))])
def test_in_flight_batching_gives_each_structure_its_own_relaxation(name: str, budget: dict) -> None:
    structures = [
        slab("111", seed=1),
        slab("100", seed=2, size=(2, 2, 2)),
        slab("111", seed=3, size=(3, 2, 3), height=1.8),
        slab("100", seed=5, size=(3, 3, 2)),
        slab("111", seed=6, size=(2, 2, 2), height=2.5),
    ]  # 13, 9, 19, 19 and 9 atoms
    settings = dict(optimizer=name, fmax=0.05, steps=45, dtype=F64, progress=False)
    alone = [relax_many([a], morse(), **settings)[0] for a in structures]
    assert len({o.steps for o in alone}) > 2  # structures leave the batch at different times
    together = relax_many(structures, morse(), **settings, **budget)
    assert [o.index for o in together] == list(range(len(structures)))
    for a, b in zip(alone, together):
        assert (a.steps, a.converged, a.error) == (b.steps, b.converged, b.error)
        np.testing.assert_allclose(b.atoms.positions, a.atoms.positions, rtol=0, atol=1e-10)
        assert b.energy == pytest.approx(a.energy, abs=1e-10)
    # the energy at the input comes with each outcome, also for late arrivals in the batch
    initial = morse()(AtomicBatch.from_atoms(structures, dtype=F64))["energy"]
    np.testing.assert_allclose([o.initial_energy for o in together], initial.numpy(), rtol=0, atol=1e-10)
    assert all(o.initial_energy > o.energy for o in together)  # relaxing went downhill


def test_a_failing_structure_is_reported_and_the_others_go_on() -> None:
    good = [slab("111", seed=1), slab("100", seed=2), slab("111", seed=3, size=(3, 2, 3))]
    overlapping = slab("111", seed=9)
    overlapping.positions[5] = overlapping.positions[4] + 0.001
    bad_constraint = slab("100", seed=7)
    bad_constraint.set_constraint(FixBondLength(0, 1))
    structures = [good[0], tagged(slab(seed=11), NAN_TAG), overlapping, good[1],
                  tagged(slab(seed=12), RAISE_TAG), bad_constraint, good[2]]
    reference = relax_many(good, morse(), fmax=0.02, steps=60, dtype=F64, progress=False)
    model = Sabotaged(after=3)  # the NaN comes mid-run, at the fourth evaluation
    out = relax_many(structures, model, fmax=0.02, steps=60, dtype=F64, progress=False)
    for ref, got in zip(reference, [out[0], out[3], out[6]]):
        assert got.error is None and (got.steps, got.converged) == (ref.steps, ref.converged)
        np.testing.assert_allclose(got.atoms.positions, ref.atoms.positions, rtol=0, atol=1e-9)
    nan, overlap, raised, constraint = out[1], out[2], out[4], out[5]
    assert "non-finite energy or forces at step 3" in nan.error and nan.steps == 3
    assert "overlapping" in overlap.error and "atoms 4 and 5" in overlap.error and overlap.steps == 0
    assert "sabotaged structure" in raised.error and raised.steps == 0
    assert "FixBondLength" in constraint.error
    for failed in (nan, overlap, raised, constraint):
        assert not failed.converged and failed.energy is None and failed.max_force is None
        assert failed.atoms.calc is None and len(failed.atoms) == len(structures[failed.index])


class TooBig(torch.nn.Module):
    """Morse that fails (as if out of memory) on calls with more than ``limit`` atoms."""

    conservative = True
    regress_forces = True

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.failures = MorsePotential(), limit, 0

    def forward(self, batch, stress: bool = False):  # noqa: ANN001, ANN201
        if batch.num_atoms > self.limit:
            self.failures += 1
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.inner(batch, stress=stress)


def test_a_batch_too_big_for_the_model_is_evaluated_in_smaller_calls() -> None:
    structures = [slab(seed=s) for s in range(4)]  # 13 atoms each, 52 in one batch
    reference = relax_many(structures, morse(), fmax=0.05, steps=30, dtype=F64, progress=False)
    model = TooBig(limit=30)
    with pytest.warns(RuntimeWarning, match="each structure works alone; model calls now take at most 26 atoms"):
        out = relax_many(structures, model, fmax=0.05, steps=30, dtype=F64, progress=False)
    assert model.failures == 1  # afterwards the batch is evaluated two structures at a time
    for ref, got in zip(reference, out):
        assert got.error is None and (got.steps, got.converged) == (ref.steps, ref.converged)
        np.testing.assert_allclose(got.atoms.positions, ref.atoms.positions, rtol=0, atol=1e-10)


class ConstantForce(torch.nn.Module):
    """A uniform field: the same force on every atom at any position (E = -F . x), so LBFGS's
    gradient differences vanish and its curvature 1 / (y . s) is infinite."""

    conservative = False
    regress_forces = True

    def forward(self, batch, stress: bool = False):  # noqa: ANN001, ANN201, ARG002
        forces = torch.zeros_like(batch.positions)
        forces[:, 2] = 1.0
        energy = torch.zeros(batch.num_structures, dtype=batch.positions.dtype).index_add_(
            0, batch.batch, -batch.positions[:, 2]
        )
        return {"energy": energy, "forces": forces}


def test_a_degenerate_lbfgs_step_is_reported_not_taken() -> None:
    structures = [slab(seed=1), slab(seed=2)]
    out = relax_many(structures, ConstantForce(), optimizer="LBFGS", fmax=0.05, steps=10, dtype=F64, progress=False)
    for o, atoms in zip(out, structures):
        assert "LBFGS step was not finite (degenerate curvature) after step 1" in o.error
        assert o.steps == 1 and np.isfinite(o.atoms.positions).all()
        # the one finite step, F / alpha capped at maxstep, was taken
        assert np.abs(o.atoms.positions - atoms.positions).max() == pytest.approx(1.0 / 70.0, rel=1e-12)
    fire = relax_many(structures, ConstantForce(), optimizer="FIRE", fmax=0.05, steps=10, dtype=F64, progress=False)
    assert all(o.error is None and o.steps == 10 and not o.converged for o in fire)


# ---------------------------------------------------------------------------- a real model
def test_tiny_scn_relaxes_the_example_structures_with_fixed_atoms_in_place(one_thread, tmp_path: Path) -> None:  # noqa: ARG001
    structures = read(resource_path(EXAMPLE_STRUCTURES), ":")
    for atoms in structures:  # OC20: sub-surface atoms (tag 0) held
        atoms.set_constraint(FixAtoms(mask=atoms.get_tags() == 0))
    assert sum(int((a.get_tags() == 0).sum()) for a in structures) > 0
    torch.manual_seed(0)
    options = dict(num_interactions=2, lmax=3, mmax=1, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
                   num_sphere_samples=16, num_basis_functions=8, max_num_neighbors=20, cutoff=5.0)
    for direct in (True, False):
        model = scale_like_fixtures(SCN(**options, direct_forces=direct)).eval()
        budget = dict(max_structures=3) if direct else {}  # in flight, or all eight in one batch
        out = relax_many(structures, model, optimizer="LBFGS" if direct else "FIRE", fmax=0.05, steps=3,
                         trajectories=tmp_path / str(direct), progress=False, **budget)
        assert [o.error for o in out] == [None] * len(structures)
        assert any(o.steps > 0 for o in out)
        for o, atoms in zip(out, structures):
            fixed = atoms.get_tags() == 0
            np.testing.assert_array_equal(o.atoms.positions[fixed], atoms.positions[fixed])
            assert np.isfinite(o.energy) and np.isfinite(o.max_force) and o.steps <= 3
            if o.steps:
                assert np.abs(o.atoms.positions - atoms.positions).max() > 0
            assert len(read(o.trajectory, ":")) == o.steps + 1
        assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_trajectories_hold_every_frame_with_results(tmp_path: Path) -> None:
    structures = [slab(seed=1), slab("100", seed=2)]
    out = relax_many(structures, morse(), fmax=0.05, steps=7, dtype=F64, trajectories=tmp_path / "t", progress=False)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["0.traj", "1.traj"]
    for o in out:
        frames = read(o.trajectory, ":")
        assert len(frames) == o.steps + 1 == 8
        assert frames[-1].get_potential_energy() == pytest.approx(o.energy, abs=1e-12)
        np.testing.assert_allclose(frames[-1].positions, o.atoms.positions, rtol=0, atol=1e-12)
        np.testing.assert_allclose(frames[0].positions, structures[o.index].positions, rtol=0, atol=1e-12)
        assert isinstance(frames[0].constraints[0], FixAtoms)
        with Trajectory(o.trajectory) as traj:
            assert traj[3].get_forces().shape == (len(structures[o.index]), 3)


def test_zero_steps_and_converged_structures() -> None:
    atoms = slab()
    [out] = relax_many([atoms], morse(), fmax=0.05, steps=0, dtype=F64, progress=False)
    assert out.steps == 0 and not out.converged and out.error is None
    np.testing.assert_array_equal(out.atoms.positions, atoms.positions)
    relaxed = relax_many([atoms], morse(), fmax=0.05, steps=300, dtype=F64, progress=False)[0].atoms
    [again] = relax_many([relaxed], morse(), fmax=0.05, steps=300, dtype=F64, progress=False)
    assert again.converged and again.steps == 0


# ---------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_clear_errors() -> None:
    atoms = [slab()]
    pot = morse()
    for fmax in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="fmax"):
            relax_many(atoms, pot, fmax=fmax, progress=False)
    with pytest.raises(ValueError, match="steps"):
        relax_many(atoms, pot, steps=-1, progress=False)
    with pytest.raises(ValueError, match="unknown optimizer"):
        relax_many(atoms, pot, optimizer="BFGS", progress=False)
    with pytest.raises(ValueError, match="bad optimizer options"):
        relax_many(atoms, pot, optimizer_options={"dt_max": 1.0}, progress=False)
    with pytest.raises(ValueError, match="max_structures"):
        relax_many(atoms, pot, max_structures=0, progress=False)
    torch.manual_seed(0)
    direct = SCN(num_interactions=1, lmax=2, mmax=1, sphere_channels=4, sphere_channels_reduce=4, hidden_channels=8,
                 num_sphere_samples=8, num_basis_functions=4, cutoff=4.0, direct_forces=True)
    with pytest.raises(ValueError, match="cell=True needs stress"):
        relax_many([strained_bulk()], direct, cell=True, progress=False)
    molecule_in_box = molecule("H2O", vacuum=4.0)
    with pytest.raises(ValueError, match="periodic along all three axes; structure 1"):
        relax_many([strained_bulk(), molecule_in_box], pot, cell=True, progress=False)
