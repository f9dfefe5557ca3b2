"""Molecular dynamics (`simulation.md`): ASE's integrators and the batched torch integrator.

Physics is checked on the analytic Morse potential in float64, where the batched integrator
must reproduce ASE's step by step (same scheme, same arithmetic up to rounding).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.constraints import FixAtoms, FixCom
from ase.io import read
from ase.md.verlet import VelocityVerlet
from torch import nn

from spherical_channels.simulation import SCNCalculator
from spherical_channels.simulation.md import (
    LOG_COLUMNS,
    DirectForcesWarning,
    MDError,
    block_average,
    md_many,
    read_md_log,
    run_md,
)
from spherical_channels.testing.potentials import MorsePotential

pytestmark = pytest.mark.usefixtures("one_thread")

NEAREST = 2.6  # the Morse minimum: an fcc crystal at this spacing is at rest


def crystal(repeat: tuple[int, int, int] = (2, 2, 1), fixed: tuple[int, ...] = ()) -> Atoms:
    """Periodic fcc "Cu" (16 atoms by default) at the Morse spacing, rattled."""
    atoms = bulk("Cu", "fcc", a=NEAREST * math.sqrt(2.0), cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=1)
    if fixed:
        atoms.set_constraint(FixAtoms(indices=list(fixed)))
    return atoms


def cluster() -> Atoms:
    """A non-periodic tetrahedron and one more atom (no cell)."""
    d = NEAREST
    positions = [[0, 0, 0], [d, 0, 0], [d / 2, d * math.sqrt(3) / 2, 0], [d / 2, d / (2 * math.sqrt(3)), d * math.sqrt(2 / 3)],
                 [d / 2, d / (2 * math.sqrt(3)), -d * math.sqrt(2 / 3)]]
    atoms = Atoms("Cu5", positions=positions)
    atoms.rattle(0.05, seed=2)
    return atoms


@pytest.fixture(scope="module")
def potential() -> MorsePotential:
    return MorsePotential().to(torch.float64)


def with_velocities(atoms: Atoms, temperature_K: float, seed: int) -> Atoms:
    """Maxwell-Boltzmann momenta (fixed atoms at rest), set explicitly."""
    rng = np.random.default_rng(seed)
    momenta = rng.standard_normal((len(atoms), 3)) * np.sqrt(atoms.get_masses() * units.kB * temperature_K)[:, None]
    atoms.set_momenta(momenta)  # applies FixAtoms
    return atoms


class Direct(nn.Module):
    """The Morse potential's outputs from a model that declares direct forces."""

    conservative = False
    regress_forces = True

    def __init__(self) -> None:
        super().__init__()
        self.inner = MorsePotential()

    def forward(self, batch, stress: bool = False):  # noqa: ANN001, ANN201
        return self.inner(batch)


class NaNAfter(nn.Module):
    """The Morse potential until ``good`` calls were made, then NaN forces on the structures of
    ``size`` atoms (all if None): a diverging model."""

    conservative = True
    regress_forces = True

    def __init__(self, good: int, size: int | None = None) -> None:
        super().__init__()
        self.inner, self.good, self.size, self.calls = MorsePotential(), good, size, 0

    def forward(self, batch, stress: bool = False):  # noqa: ANN001, ANN201
        out = self.inner(batch, stress=stress)
        self.calls += 1
        if self.calls > self.good:
            hit = torch.ones_like(batch.batch, dtype=torch.bool)
            if self.size is not None:
                hit = batch.natoms[batch.batch] == self.size
            forces = out["forces"].clone()
            forces[hit] = float("nan")
            out = {**out, "forces": forces}
        return out


# ---------------------------------------------------------------------- the batched integrator is ASE's


def test_batched_nve_follows_ase_velocity_verlet_step_by_step(potential, tmp_path: Path) -> None:
    atoms = with_velocities(crystal(fixed=(0, 1)), 300.0, seed=3)
    reference = atoms.copy()
    reference.calc = SCNCalculator(potential, dtype=torch.float64)
    dynamics = VelocityVerlet(reference, timestep=2.0 * units.fs)
    expected = []
    dynamics.attach(lambda: expected.append((reference.get_positions(), reference.get_temperature(),
                                             reference.get_total_energy())), interval=1)
    dynamics.run(100)

    (result,) = md_many([atoms], potential, timestep_fs=2.0, steps=100, log_interval=1, progress=False,
                        trajectories=[tmp_path / "t.traj"])
    frames = read(tmp_path / "t.traj", ":")
    assert len(frames) == len(expected) == 101
    # identical arithmetic but for rounding: positions agree to far below 1e-8 A
    error = max(np.abs(frame.positions - ref[0]).max() for frame, ref in zip(frames, expected))
    assert error < 1e-8
    np.testing.assert_allclose(result.temperature_K, [ref[1] for ref in expected], rtol=1e-9)  # ASE's dof
    np.testing.assert_allclose(result.etot_eV, [ref[2] for ref in expected], rtol=0, atol=1e-9)
    assert np.abs(frames[-1].positions - frames[0].positions)[2:].max() > 0.05  # the free atoms moved...
    np.testing.assert_array_equal(frames[-1].positions[:2], atoms.positions[:2])  # ...the fixed ones did not
    np.testing.assert_array_equal(frames[-1].get_momenta()[:2], 0.0)


def test_batched_langevin_follows_ase_langevin_with_the_same_seed(potential) -> None:
    atoms = crystal(fixed=(0,))
    options = dict(ensemble="nvt", timestep_fs=2.0, steps=40, temperature_K=500.0, friction_per_fs=0.02, seed=7,
                   initial_temperature_K=200.0, log_interval=1, progress=False)
    ase_run = run_md(atoms, SCNCalculator(potential, dtype=torch.float64), **options)
    (batched,) = md_many([atoms], potential, **options)
    np.testing.assert_allclose(batched.atoms.positions, ase_run.atoms.positions, rtol=0, atol=1e-9)
    np.testing.assert_allclose(batched.temperature_K, ase_run.temperature_K, rtol=1e-9)
    np.testing.assert_allclose(batched.etot_eV, ase_run.etot_eV, rtol=0, atol=1e-9)
    assert ase_run.temperature_K[-1] != pytest.approx(ase_run.temperature_K[0], rel=0.05)  # the bath acted
    np.testing.assert_array_equal(ase_run.atoms.positions[0], atoms.positions[0])
    np.testing.assert_array_equal(batched.atoms.positions[0], atoms.positions[0])


def test_structures_in_a_batch_are_independent(potential) -> None:
    """Each structure's noise comes from its own generator: the batch composition changes nothing."""
    a, b = crystal(fixed=(3,)), cluster()
    options = dict(ensemble="nvt", timestep_fs=2.0, steps=30, friction_per_fs=0.05, initial_temperature_K=300.0,
                   log_interval=5, progress=False)
    together = md_many([a, b], potential, seed=[11, 12], **options)
    alone = [md_many([s], potential, seed=[k], **options)[0] for s, k in ((a, 11), (b, 12))]
    for joint, single in zip(together, alone):
        np.testing.assert_allclose(joint.atoms.positions, single.atoms.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(joint.etot_eV, single.etot_eV, rtol=0, atol=1e-10)
    # replicas of one structure with the default seeds (seed + i) are different runs
    first, second = md_many([a, a], potential, **options)
    assert np.abs(first.atoms.positions - second.atoms.positions).max() > 1e-3


# ---------------------------------------------------------------------- physics


def test_nve_conserves_energy_with_an_error_of_order_dt_squared(potential) -> None:
    """Velocity Verlet's energy error over a fixed time is O(dt^2): halving dt divides it by 4."""
    atoms = crystal()
    deviations = []
    for timestep, steps in ((4.0, 50), (2.0, 100)):
        (result,) = md_many([atoms], potential, timestep_fs=timestep, steps=steps, initial_temperature_K=300.0,
                            log_interval=1, progress=False)
        assert result.steps == steps and result.time_fs[-1] == pytest.approx(200.0)
        assert result.mean_temperature_K > 50.0  # something moves
        assert abs(result.drift_per_atom) <= result.max_deviation_per_atom < 1e-4  # vs ekin ~ 0.04 eV/atom
        deviations.append(result.max_deviation_per_atom)
    assert 3.0 < deviations[0] / deviations[1] < 5.0


def test_nvt_reaches_the_target_temperature_within_its_statistical_error(potential) -> None:
    """Four replicas start at rest (0 K) and are thermalised by the Langevin bath. Over the
    second half, the mean temperature is within 4 standard errors (block averages; 8 blocks of
    25 steps = 100 fs, against a temperature correlation time ~1/(2 gamma) = 10 fs) of the
    target, and the instantaneous temperature fluctuates as in the canonical ensemble,
    std(T) = T sqrt(2 / dof)."""
    target, replicas = 300.0, 4
    atoms = crystal()
    results = md_many([atoms] * replicas, potential, ensemble="nvt", timestep_fs=4.0, steps=400,
                      temperature_K=target, friction_per_fs=0.05, initial_temperature_K=0.0, log_interval=1,
                      seed=5, progress=False)
    assert all(r.temperature_K[0] == 0.0 for r in results)
    halves = [r.temperature_K[len(r.temperature_K) // 2:] for r in results]
    stats = [block_average(half, blocks=8) for half in halves]
    mean = float(np.mean([m for m, _ in stats]))
    error = math.sqrt(sum(e * e for _, e in stats)) / replicas  # independent replicas
    assert error < 0.03 * target  # a meaningful test: the statistics pin the temperature down
    assert abs(mean - target) < 4.0 * error
    canonical = target * math.sqrt(2.0 / (3 * len(atoms)))
    assert np.concatenate(halves).std() == pytest.approx(canonical, rel=0.25)


# ---------------------------------------------------------------------- logs, trajectories, velocities


def test_log_trajectory_and_drift_agree(potential, tmp_path: Path) -> None:
    atoms = crystal(fixed=(0, 5))
    log, trajectory = tmp_path / "md.log", tmp_path / "md.traj"
    result = run_md(atoms, potential, timestep_fs=1.0, steps=23, log_interval=5, initial_temperature_K=400.0,
                    logfile=log, trajectory=trajectory, progress=False)
    assert log.read_text().splitlines()[0] == "# " + " ".join(LOG_COLUMNS)
    columns = read_md_log(log)
    np.testing.assert_allclose(columns["time_fs"], [0, 5, 10, 15, 20, 23])  # every 5 steps and the last
    for name in LOG_COLUMNS:
        np.testing.assert_allclose(columns[name], getattr(result, name), rtol=0, atol=1e-6)
    np.testing.assert_allclose(columns["etot_eV"], columns["epot_eV"] + columns["ekin_eV"], atol=2e-10)
    from_log = (columns["etot_eV"][-1] - columns["etot_eV"][0]) / len(atoms)
    assert result.drift_per_atom == pytest.approx(from_log, abs=1e-10)
    frames = read(trajectory, ":")
    assert len(frames) == 6 and result.steps == 23
    np.testing.assert_allclose(frames[-1].positions, result.atoms.positions)
    np.testing.assert_allclose(frames[-1].get_momenta(), result.atoms.get_momenta())
    assert frames[-1].get_potential_energy() == pytest.approx(columns["epot_eV"][-1], abs=1e-9)
    # the temperature counts the free atoms only: 3 (N - 2) degrees of freedom
    expected = 2 * frames[-1].get_kinetic_energy() / (3 * (len(atoms) - 2) * units.kB)
    assert columns["temperature_K"][-1] == pytest.approx(expected, rel=1e-6)
    assert not atoms.has("momenta")  # the input is left alone


def test_initial_velocities(potential) -> None:
    # a free cluster: no centre-of-mass motion and no rotation, at the drawn temperature
    start = run_md(cluster(), potential, steps=0, initial_temperature_K=300.0, seed=1, progress=False).atoms
    assert np.abs(start.get_momenta().sum(axis=0)).max() < 1e-12
    assert np.abs(start.get_angular_momentum()).max() < 1e-10
    assert start.get_temperature() > 10.0
    # existing velocities are kept when no initial temperature is given
    given = with_velocities(crystal(), 100.0, seed=2)
    kept = run_md(given, potential, steps=0, progress=False).atoms
    np.testing.assert_array_equal(kept.get_momenta(), given.get_momenta())
    # at rest on request; a slab keeps its fixed atoms at rest and its centre-of-mass motion
    rest = md_many([given], potential, steps=0, initial_temperature_K=0.0, progress=False)[0].atoms
    assert not rest.get_momenta().any()
    slab = run_md(crystal(fixed=(0, 1, 2)), potential, steps=0, initial_temperature_K=300.0, progress=False).atoms
    assert not slab.get_momenta()[:3].any() and slab.get_momenta()[3:].all()


# ---------------------------------------------------------------------- warnings and errors


def test_a_direct_force_model_is_warned_about(potential) -> None:
    with pytest.warns(DirectForcesWarning, match="does not conserve the total energy"):
        run_md(crystal(), Direct().double(), steps=1, progress=False)
    with pytest.warns(DirectForcesWarning, match="direct force head"):
        md_many([crystal()], Direct().double(), steps=1, progress=False)


def test_non_finite_forces_stop_run_md_at_their_step_keeping_the_files(tmp_path: Path) -> None:
    trajectory, log = tmp_path / "t.traj", tmp_path / "t.log"
    with pytest.raises(MDError, match="non-finite forces at step 3 ") as exc:
        run_md(crystal(), NaNAfter(good=3).double(), steps=10, log_interval=1, initial_temperature_K=300.0,
               trajectory=trajectory, logfile=log, progress=False)
    assert exc.value.step == 3 and exc.value.result.steps == 2
    frames = read(trajectory, ":")  # closed and readable: steps 0, 1, 2
    assert len(frames) == 3 and np.isfinite(frames[-1].positions).all()
    np.testing.assert_allclose(read_md_log(log)["time_fs"], [0.0, 0.5, 1.0])


def test_a_diverging_structure_stops_alone_in_a_batch(tmp_path: Path) -> None:
    model = NaNAfter(good=4, size=len(cluster())).double()  # structure 1 gets NaN forces at step 4
    paths = [tmp_path / f"{k}.log" for k in range(3)]
    results = md_many([crystal(), cluster(), crystal((1, 1, 1))], model, steps=10, log_interval=3,
                      initial_temperature_K=300.0, logfiles=paths, progress=False)
    assert [r.steps for r in results] == [10, 3, 10]
    assert results[0].error is None and results[2].error is None
    assert "structure 1" in results[1].error and "non-finite forces at step 4" in results[1].error
    np.testing.assert_allclose(read_md_log(paths[1])["time_fs"], [0.0, 1.5])  # its last good step, logged
    np.testing.assert_allclose(read_md_log(paths[0])["time_fs"], [0.0, 1.5, 3.0, 4.5, 5.0])
    assert np.isfinite(results[1].atoms.positions).all() and np.isfinite(results[2].etot_eV).all()


class RaisesAfter(NaNAfter):
    """The Morse potential until ``good`` calls, then an error (as for atoms too close)."""

    def forward(self, batch, stress: bool = False):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.calls > self.good:
            raise ValueError("atoms 0 and 1 are 0.01 A apart\n(details)")
        return self.inner(batch, stress=stress)


def test_a_failing_model_call_names_the_step(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    with pytest.raises(MDError, match=r"the model failed at step 2 \(t = 1 fs\): atoms 0 and 1 are 0.01 A apart$"):
        run_md(crystal(), RaisesAfter(good=2).double(), steps=5, log_interval=1, logfile=log, progress=False)
    np.testing.assert_allclose(read_md_log(log)["time_fs"], [0.0, 0.5])
    with pytest.raises(MDError, match=r"failed at step 0 .* structures \[0, 1\]: atoms 0 and 1"):
        md_many([crystal(), cluster()], RaisesAfter(good=0).double(), steps=5, progress=False)


def test_bad_arguments_are_clear(potential) -> None:
    atoms = crystal()
    for kwargs, match in (
        (dict(ensemble="npt"), "unknown ensemble"),
        (dict(timestep_fs=0.0), "time step"),
        (dict(timestep_fs=float("nan")), "time step"),
        (dict(steps=-1), "steps"),
        (dict(temperature_K=-1.0), "temperature"),
        (dict(ensemble="nvt", friction_per_fs=0.0), "friction"),
        (dict(log_interval=0), "log_interval"),
    ):
        with pytest.raises(ValueError, match=match):
            run_md(atoms, potential, progress=False, **kwargs)
        with pytest.raises(ValueError, match=match):
            md_many([atoms], potential, progress=False, **kwargs)
    frozen = crystal(fixed=tuple(range(16)))
    with pytest.raises(ValueError, match="every atom is fixed"):
        run_md(frozen, potential, progress=False)
    com = crystal()
    com.set_constraint(FixCom())
    with pytest.raises(ValueError, match="FixAtoms constraints only.*run_md"):
        md_many([com], potential, progress=False)
    with pytest.raises(ValueError, match="2 seeds for 1 structures"):
        md_many([atoms], potential, seed=[1, 2], progress=False)
    with pytest.raises(ValueError, match="no structures"):
        md_many([], potential)
    with pytest.raises(ValueError, match="at least 8 values"):
        block_average(np.ones(5))
