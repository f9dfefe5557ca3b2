"""Molecular dynamics: ASE's integrators for one structure, a batched torch integrator for many.

Two ways to run, with the same log, results and conventions:

* :func:`run_md` runs one structure with ASE's own integrators through a calculator
  (:class:`ase.md.verlet.VelocityVerlet` for NVE, :class:`ase.md.langevin.Langevin` for NVT),
  so every ASE constraint is honoured.
* :func:`md_many` integrates many independent structures or replicas at once, one model call
  per step for all of them, in float64 state on the model's device. It implements the very
  schemes of ASE: velocity Verlet, and for NVT the Langevin propagator of ASE's ``Langevin``
  (Vanden-Eijnden & Ciccotti, Chem. Phys. Lett. 429, 310 (2006), Eq. 23; ASE's ``fixcm=False``).
  Seeded alike, one structure follows the trajectory of :func:`run_md`, NVT noise included.

Units and conventions (both paths):

* ``timestep_fs`` in fs; ``friction_per_fs`` is the Langevin friction gamma in 1/fs (ASE's
  ``friction`` is ``friction_per_fs / ase.units.fs``; 0.01/fs = 10/ps, relaxing velocities in
  ~100 fs).
* The temperature is ASE's: ``2 Ekin / (kB * dof)`` with ``dof`` = 3 per atom minus what the
  constraints remove (3 per atom held by ``FixAtoms``); the centre of mass is not subtracted.
* Initial velocities: with ``initial_temperature_K`` given, a Maxwell-Boltzmann draw at that
  temperature (ASE's ``thermalize_momenta``), then for a structure without fixed atoms the
  centre-of-mass motion removed (``Stationary``) and, if it is periodic along no axis, the rigid
  rotation too (``ZeroRotation``), both rescaled back to the drawn temperature. Without it, the
  structure's own velocities are kept if it has them (a ``momenta`` array, as after an earlier
  run or read from a file that stores them), else drawn at ``temperature_K``. Atoms held by
  ``FixAtoms`` never move and have zero velocity.
* Seeds: ``seed`` gives the initial velocities and the Langevin noise (separate streams of
  ``numpy.random.SeedSequence(seed)``). :func:`md_many` gives structure ``i`` the seed
  ``seed + i`` unless a sequence of seeds is given, so replicas of one structure differ.

Log file (:func:`read_md_log` reads it back): a whitespace table, one line every
``log_interval`` steps plus the last step, with a ``#`` header naming the columns::

    # time_fs temperature_K epot_eV ekin_eV etot_eV

Total-energy drift per atom: ``(Etot_last - Etot_first) / num_atoms`` in eV/atom (all atoms,
fixed ones included), and the largest deviation ``max |Etot - Etot_0| / num_atoms``, both over
the logged lines. They measure energy conservation only in NVE with a conservative model (forces
``-dE/dx``); a model with a direct force head does not conserve energy, and a warning says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from ..data.batch import AtomicBatch
from .engine import model_dtype_device

__all__ = [
    "DIRECT_FORCES_MESSAGE",
    "ENSEMBLES",
    "LOG_COLUMNS",
    "DirectForcesWarning",
    "MDError",
    "MDResult",
    "block_average",
    "md_many",
    "read_md_log",
    "run_md",
]

ENSEMBLES = ("nve", "nvt")

#: Columns of the log file, in order.
LOG_COLUMNS = ("time_fs", "temperature_K", "epot_eV", "ekin_eV", "etot_eV")

DIRECT_FORCES_MESSAGE = (
    "the model predicts forces with a direct force head (direct_forces=True): they are not the "
    "gradient of its energy, so the dynamics does not conserve the total energy and the reported "
    "drift says nothing about the time step; use an energy-conserving model "
    "(direct_forces=False) for NVE"
)


class DirectForcesWarning(UserWarning):
    """Molecular dynamics with forces that are not ``-dE/dx`` (no energy conservation)."""


class MDError(ValueError):
    """A run stopped by non-finite energies or forces: ``step`` says where, ``result`` holds the
    run until the last good step; the trajectory and log written until then are kept."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
        self.result: MDResult | None = None  # the run until then (set by run_md)


@dataclass
class MDResult:
    """Outcome of one molecular-dynamics run.

    Attributes:
        atoms: the last completed state: positions, momenta, and the energy and forces there
            as a ``SinglePointCalculator`` (the start, if no step completed).
        steps: completed integration steps.
        time_fs, temperature_K, epot_eV, ekin_eV, etot_eV: [L] the logged lines (the log file's
            columns).
        num_atoms: atoms of the structure (the denominator of the drifts).
        trajectory, logfile: the files written, or None.
        error: why the run stopped early (non-finite energies or forces), else None.

    Properties ``drift_per_atom``, ``max_deviation_per_atom`` and ``mean_temperature_K`` are
    computed from the logged lines, so they are exactly what the log file gives.
    """

    atoms: Atoms
    steps: int
    time_fs: np.ndarray
    temperature_K: np.ndarray
    epot_eV: np.ndarray
    ekin_eV: np.ndarray
    etot_eV: np.ndarray
    num_atoms: int
    ensemble: str = "nve"
    trajectory: Path | None = None
    logfile: Path | None = None
    error: str | None = None

    @property
    def drift_per_atom(self) -> float:
        """``(Etot_last - Etot_first) / num_atoms`` over the log, eV/atom."""
        self._need_log()
        return float(self.etot_eV[-1] - self.etot_eV[0]) / self.num_atoms

    @property
    def max_deviation_per_atom(self) -> float:
        """``max |Etot - Etot_0| / num_atoms`` over the log, eV/atom."""
        self._need_log()
        return float(np.abs(self.etot_eV - self.etot_eV[0]).max()) / self.num_atoms

    @property
    def mean_temperature_K(self) -> float:
        """Mean logged temperature after the start (the start itself if nothing else), K."""
        self._need_log()
        values = self.temperature_K[1:] if len(self.temperature_K) > 1 else self.temperature_K
        return float(values.mean())

    def _need_log(self) -> None:
        if len(self.etot_eV) == 0:
            raise ValueError(f"the run logged nothing ({self.error or 'no step'})")


def block_average(values: np.ndarray, blocks: int = 8) -> tuple[float, float]:
    """Mean of a correlated time series ``[L]`` and its standard error from ``blocks``
    contiguous block means (valid when a block is much longer than the correlation time)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if blocks < 2 or len(values) < blocks:
        raise ValueError(f"need at least {max(blocks, 2)} values for {blocks} blocks, got {len(values)}")
    usable = len(values) - len(values) % blocks  # equal blocks; the first few values dropped
    means = values[len(values) - usable:].reshape(blocks, -1).mean(axis=1)
    return float(values.mean()), float(means.std(ddof=1) / math.sqrt(blocks))


def read_md_log(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of a log written by :func:`run_md` / :func:`md_many`, as ``{name: [L]}``."""
    path = Path(path)
    with path.open() as handle:
        header = handle.readline().lstrip("#").split()
    if tuple(header) != LOG_COLUMNS:
        raise ValueError(f"{path}: not a molecular-dynamics log (header {header}, expected {list(LOG_COLUMNS)})")
    table = np.loadtxt(path, ndmin=2).reshape(-1, len(LOG_COLUMNS))
    return {name: table[:, k] for k, name in enumerate(LOG_COLUMNS)}


# ---------------------------------------------------------------------- shared pieces


def _check_arguments(ensemble: str, timestep_fs: float, steps: int, temperature_K: float, friction_per_fs: float,
                     initial_temperature_K: float | None, log_interval: int) -> None:
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; expected one of {list(ENSEMBLES)}")
    if not (math.isfinite(timestep_fs) and timestep_fs > 0):  # also refuses NaN
        raise ValueError(f"the time step must be a positive number of fs, got {timestep_fs}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    if not (math.isfinite(temperature_K) and temperature_K >= 0):
        raise ValueError(f"the temperature must be >= 0 K, got {temperature_K}")
    if initial_temperature_K is not None and not (math.isfinite(initial_temperature_K) and initial_temperature_K >= 0):
        raise ValueError(f"the initial temperature must be >= 0 K, got {initial_temperature_K}")
    if ensemble == "nvt" and not (math.isfinite(friction_per_fs) and friction_per_fs > 0):
        raise ValueError(f"NVT needs a friction > 0 (1/fs), got {friction_per_fs}")
    if int(log_interval) != log_interval or log_interval < 1:
        raise ValueError(f"log_interval must be an integer >= 1, got {log_interval}")


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the initial velocities and the Langevin noise."""
    velocities, noise = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(velocities), np.random.default_rng(noise)


def _free_mask(atoms: Atoms) -> np.ndarray:
    """[N] bool: atoms not held by a ``FixAtoms``."""
    free = np.ones(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            free[np.asarray(constraint.get_indices(), dtype=np.int64)] = False
    return free


def _check_structure(atoms: Atoms, where: str) -> None:
    if len(atoms) == 0:
        raise ValueError(f"{where}: no atoms")
    if atoms.get_number_of_degrees_of_freedom() <= 0:
        raise ValueError(f"{where}: every atom is fixed: nothing to move")
    masses = atoms.get_masses()
    if not (np.isfinite(masses).all() and (masses > 0).all()):
        raise ValueError(f"{where}: every atom needs a positive mass (atoms {np.flatnonzero(~(masses > 0)).tolist()})")


def _initialise_velocities(atoms: Atoms, initial_temperature_K: float | None, temperature_K: float,
                           rng: np.random.Generator) -> None:
    """Set ``atoms``' momenta in place (see the module's conventions)."""
    if initial_temperature_K is None:
        if atoms.has("momenta"):
            atoms.set_momenta(atoms.get_momenta(), apply_constraint=True)  # fixed atoms at rest
            return
        initial_temperature_K = temperature_K
    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.29
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as _mb

        def thermalize_momenta(atoms: Atoms, temperature_K: float, rng: Any) -> None:  # noqa: ANN001
            _mb(atoms, temperature_K=temperature_K, rng=rng)

    from ase.md.velocitydistribution import Stationary, ZeroRotation

    thermalize_momenta(atoms, temperature_K=initial_temperature_K, rng=rng)
    # a structure anchored by fixed atoms has no free translation or rotation to remove (and
    # removing it would give the fixed atoms velocities that the constraint then zeroes)
    if initial_temperature_K > 0 and _free_mask(atoms).all() and len(atoms) > 1:
        Stationary(atoms)
        if not atoms.pbc.any() and len(atoms) > 2:
            ZeroRotation(atoms)


def _model_of(calculator: Any) -> Any:
    return calculator if isinstance(calculator, torch.nn.Module) else getattr(calculator, "model", None)


def _warn_if_direct(model: Any) -> None:
    if model is not None and getattr(model, "conservative", True) is False:
        warnings.warn(DIRECT_FORCES_MESSAGE, DirectForcesWarning, stacklevel=3)


class _Log:
    """One run's log: in memory, and line by line (flushed) to a file if one is given."""

    def __init__(self, path: Path | None) -> None:
        self.rows: list[tuple[float, float, float, float, float]] = []
        self.path = path
        self.handle: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = path.open("w")
            self.handle.write("# " + " ".join(LOG_COLUMNS) + "\n")
            self.handle.flush()

    def add(self, time_fs: float, temperature: float, epot: float, ekin: float) -> None:
        row = (time_fs, temperature, epot, ekin, epot + ekin)
        self.rows.append(row)
        if self.handle is not None:
            # energies to 1e-10 eV: the drift computed from the file is the printed one
            self.handle.write("%.6f %.6f %.10f %.10f %.10f\n" % row)
            self.handle.flush()  # an interruption keeps every line written

    def columns(self) -> dict[str, np.ndarray]:
        table = np.array(self.rows, dtype=np.float64).reshape(-1, len(LOG_COLUMNS))
        return {name: table[:, k] for k, name in enumerate(LOG_COLUMNS)}

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _open_trajectory(path: Path | None) -> Any:
    if path is None:
        return None
    from ase.io.trajectory import Trajectory

    path.parent.mkdir(parents=True, exist_ok=True)
    return Trajectory(str(path), "w")


def _snapshot(atoms: Atoms, energy: float, forces: np.ndarray) -> Atoms:
    """A copy of ``atoms`` (positions, momenta, constraints) with the energy and forces."""
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, energy=energy, free_energy=energy, forces=forces)
    return frame


def _result(atoms: Atoms, steps: int, log: _Log, ensemble: str, trajectory: Path | None,
            error: str | None = None) -> MDResult:
    columns = log.columns()
    return MDResult(atoms=atoms, steps=steps, num_atoms=len(atoms), ensemble=ensemble, trajectory=trajectory,
                    logfile=log.path, error=error, **columns)


def _progress(steps: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)


# ---------------------------------------------------------------------- one structure, ASE


def run_md(
    atoms: Atoms,
    calculator_or_model: Calculator | torch.nn.Module,
    *,
    ensemble: str = "nve",
    timestep_fs: float = 0.5,
    steps: int = 1000,
    temperature_K: float = 300.0,
    friction_per_fs: float = 0.01,
    seed: int = 0,
    initial_temperature_K: float | None = None,
    trajectory: str | Path | None = None,
    logfile: str | Path | None = None,
    log_interval: int = 10,
    progress: bool = True,
) -> MDResult:
    """Run NVE (ASE's ``VelocityVerlet``) or NVT (ASE's ``Langevin``, ``fixcm=False``) on a
    copy of ``atoms``; the input is left as it was.

    Args:
        calculator_or_model: an ASE calculator, or a model (``model(batch) -> {"energy",
            "forces"}``), which is wrapped in an :class:`~.calculator.SCNCalculator` in the
            model's own dtype and device.
        temperature_K: the thermostat's temperature (NVT), and the initial one if the
            structure has no velocities and ``initial_temperature_K`` is None.
        friction_per_fs: Langevin friction gamma, 1/fs (NVT only).
        seed: initial velocities and Langevin noise.
        initial_temperature_K: draw Maxwell-Boltzmann velocities at this temperature (0: at
            rest); None keeps the structure's velocities if it has them (``atoms.has("momenta")``).
        trajectory: ASE trajectory file, one frame (positions, momenta, energy, forces) every
            ``log_interval`` steps and at the last step.
        logfile: the log table (module docstring), same lines as the result's arrays.
        progress: a tqdm progress bar.

    Raises:
        MDError: non-finite energy or forces; the trajectory and log so far are kept.
        ValueError: bad arguments or a structure with nothing to move.
    """
    _check_arguments(ensemble, timestep_fs, steps, temperature_K, friction_per_fs, initial_temperature_K, log_interval)
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    model = _model_of(calculator_or_model)
    _warn_if_direct(model)
    if isinstance(calculator_or_model, torch.nn.Module):
        from .calculator import SCNCalculator

        dtype, device = model_dtype_device(calculator_or_model, torch.float64)
        calculator = SCNCalculator(calculator_or_model, device=device, dtype=dtype)
    else:
        calculator = calculator_or_model
    work = atoms.copy()
    _check_structure(work, "run_md")
    velocity_rng, noise_rng = _streams(seed)
    _initialise_velocities(work, initial_temperature_K, temperature_K, velocity_rng)
    work.calc = calculator
    dt = timestep_fs * units.fs
    if ensemble == "nve":
        dynamics = VelocityVerlet(work, timestep=dt)
    else:
        dynamics = Langevin(work, timestep=dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs,
                            fixcm=False, rng=noise_rng)

    trajectory = Path(trajectory) if trajectory is not None else None
    log = _Log(Path(logfile) if logfile is not None else None)
    writer = None
    last_good: Atoms | None = None
    done = 0
    bar = _progress(steps, f"md {ensemble}", progress)
    try:
        writer = _open_trajectory(trajectory)
        for _ in _stepping(dynamics, steps, timestep_fs):
            step = dynamics.nsteps
            energy, forces = _finite_results(work, step, timestep_fs)
            last_good, done = _snapshot(work, energy, forces), step
            if step % log_interval == 0 or step == steps:
                log.add(step * timestep_fs, work.get_temperature(), energy, work.get_kinetic_energy())
                if writer is not None:
                    writer.write(last_good)
                bar.set_postfix(T=f"{log.rows[-1][1]:.0f}K", refresh=False)
            if step:
                bar.update(1)
    except MDError as err:
        # what was done is the caller's to report: the last good state and the log so far
        log.close()
        err.result = _result(last_good if last_good is not None else work, done, log, ensemble, trajectory, str(err))
        raise
    finally:
        bar.close()
        log.close()
        if writer is not None:
            writer.close()
    return _result(last_good if last_good is not None else work, done, log, ensemble, trajectory)


def _stepping(dynamics: Any, steps: int, timestep_fs: float) -> Any:
    """``dynamics.irun(steps)``, with a failure of the calculator raised as :class:`MDError`
    naming the step it happened at."""
    run = dynamics.irun(steps)
    first = True
    while True:
        step = 0 if first else dynamics.nsteps + 1  # the first yield comes after the initial evaluation
        first = False
        try:
            yield next(run)
        except StopIteration:
            return
        except (MDError, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - e.g. atoms too close for the model
            raise MDError(f"the model failed at step {step} (t = {step * timestep_fs:g} fs): {_one_line(err)}",
                          step) from err


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _finite_results(atoms: Atoms, step: int, timestep_fs: float) -> tuple[float, np.ndarray]:
    """The calculator's energy and (unconstrained) forces at ``atoms``; :class:`MDError` if
    either is not finite (NaN forces would move the atoms to NaN and fail later, obscurely)."""
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces(apply_constraint=False))
    if not np.isfinite(energy) or not np.isfinite(forces).all():
        what = "energy" if not np.isfinite(energy) else "forces"
        raise MDError(f"the model gave a non-finite {what} at step {step} (t = {step * timestep_fs:g} fs); "
                      "the run stopped there", step)
    return energy, forces


# ---------------------------------------------------------------------- many structures, torch


@dataclass
class _Run:
    """One structure of :func:`md_many` and what is written for it."""

    index: int
    atoms: Atoms  # template: numbers, cell, constraints; positions and momenta at the start
    batch: AtomicBatch  # single-structure batch in the model's dtype, on its device
    noise: np.random.Generator
    dof: int
    log: _Log
    trajectory: Path | None = None
    writer: Any = None
    steps: int = 0
    error: str | None = None
    final: Atoms | None = field(default=None, repr=False)

    def frame(self, positions: np.ndarray, momenta: np.ndarray, energy: float, forces: np.ndarray) -> Atoms:
        atoms = self.atoms.copy()
        atoms.set_positions(positions, apply_constraint=False)
        atoms.set_momenta(momenta, apply_constraint=False)
        return _snapshot(atoms, energy, forces)


def md_many(
    structures: Sequence[Atoms],
    model: torch.nn.Module,
    *,
    ensemble: str = "nve",
    timestep_fs: float = 0.5,
    steps: int = 1000,
    temperature_K: float = 300.0,
    friction_per_fs: float = 0.01,
    seed: int | Sequence[int] = 0,
    initial_temperature_K: float | None = None,
    trajectories: Sequence[str | Path | None] | None = None,
    logfiles: Sequence[str | Path | None] | None = None,
    log_interval: int = 10,
    progress: bool = True,
) -> list[MDResult]:
    """Integrate independent structures (or replicas: pass copies) together, one model call per
    step for all, with the state (positions, momenta) in float64 on the model's device.

    The schemes are ASE's (module docstring): velocity Verlet for NVE, ASE's Langevin propagator
    for NVT with each structure's noise drawn from its own generator, so a structure's
    trajectory does not depend on the others in the batch. Only ``FixAtoms`` constraints are
    supported (their atoms stay put); use :func:`run_md` for others.

    Args:
        structures: S structures.
        model: ``model(batch) -> {"energy": [S], "forces": [N, 3]}`` (eval mode is set).
        seed: one seed (structure ``i`` gets ``seed + i``) or S seeds.
        trajectories, logfiles: S paths (or None entries), or None for none at all.
        Others as in :func:`run_md`.

    Returns:
        One :class:`MDResult` per structure. A structure whose energy or forces become
        non-finite stops there (its ``error`` says at which step; the last good state is its
        ``atoms``) and the others go on.
    """
    _check_arguments(ensemble, timestep_fs, steps, temperature_K, friction_per_fs, initial_temperature_K, log_interval)
    structures = list(structures)
    count = len(structures)
    if count == 0:
        raise ValueError("md_many: no structures")
    seeds = [seed + i for i in range(count)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    trajectories = [None] * count if trajectories is None else list(trajectories)
    logfiles = [None] * count if logfiles is None else list(logfiles)
    for name, values in (("seeds", seeds), ("trajectories", trajectories), ("logfiles", logfiles)):
        if len(values) != count:
            raise ValueError(f"md_many: {len(values)} {name} for {count} structures")
    for i, atoms in enumerate(structures):
        _check_structure(atoms, f"structure {i}")
        other = [type(c).__name__ for c in atoms.constraints if not isinstance(c, FixAtoms)]
        if other:
            raise ValueError(f"structure {i}: md_many supports FixAtoms constraints only, not {other}; "
                             "run it with run_md (ASE's integrators)")
    _warn_if_direct(model)
    model.eval()
    dtype, device = model_dtype_device(model, torch.float64)

    runs: list[_Run] = []
    try:
        for i, atoms in enumerate(structures):
            work = atoms.copy()
            velocity_rng, noise_rng = _streams(seeds[i])
            _initialise_velocities(work, initial_temperature_K, temperature_K, velocity_rng)
            path = Path(trajectories[i]) if trajectories[i] is not None else None
            runs.append(_Run(i, work, AtomicBatch.from_atoms([work], dtype=dtype, device=device), noise_rng,
                             int(work.get_number_of_degrees_of_freedom()),
                             _Log(Path(logfiles[i]) if logfiles[i] is not None else None), path))
            runs[-1].writer = _open_trajectory(path)
        _integrate(runs, model, ensemble, timestep_fs, steps, temperature_K, friction_per_fs, log_interval, progress,
                   device)
    finally:
        for run in runs:
            run.log.close()
            if run.writer is not None:
                run.writer.close()
    return [_result(run.final if run.final is not None else run.atoms, run.steps, run.log, ensemble, run.trajectory,
                    run.error) for run in runs]


class _State:
    """The active structures' per-atom state, concatenated: positions, momenta [N, 3] float64,
    masses [N, 1], free [N, 1] (1 free, 0 held by FixAtoms), the energy [S] and forces [N, 3]
    (zero on fixed atoms) at the positions, and the model's batch."""

    def __init__(self, runs: list[_Run], device: torch.device) -> None:
        def cat(arrays: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(arrays)).to(device=device, dtype=torch.float64)

        self.runs = runs
        self.positions = cat([r.atoms.get_positions() for r in runs])
        self.masses = cat([r.atoms.get_masses() for r in runs]).unsqueeze(1)
        self.free = cat([_free_mask(r.atoms).astype(np.float64) for r in runs]).unsqueeze(1)
        self.momenta = cat([r.atoms.get_momenta() for r in runs]) * self.free
        self.energy = torch.zeros(len(runs), dtype=torch.float64, device=device)
        self.forces = torch.zeros_like(self.positions)
        self._rebatch()

    def _rebatch(self) -> None:
        self.dof_array = np.array([r.dof for r in self.runs], dtype=np.float64)
        self.template = AtomicBatch.concatenate([r.batch for r in self.runs])
        self.index = self.template.batch  # [N] structure (position in self.runs) of each atom
        self.sizes = [len(r.atoms) for r in self.runs]

    def without(self, drop: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks ``(structures [S], atoms [N])`` keeping all but ``drop``."""
        keep = torch.ones(len(self.runs), dtype=torch.bool, device=self.index.device)
        keep[sorted(drop)] = False
        return keep, keep[self.index]

    def keep(self, structures: torch.Tensor, atoms: torch.Tensor) -> None:
        """Keep only the structures (and their atoms) where the masks are True."""
        for name in ("positions", "momenta", "masses", "free", "forces"):
            setattr(self, name, getattr(self, name)[atoms])
        self.energy = self.energy[structures]
        self.runs = [run for run, kept in zip(self.runs, structures.tolist()) if kept]
        self._rebatch()

    def kinetic(self) -> torch.Tensor:
        """[S] kinetic energies, eV."""
        per_atom = 0.5 * (self.momenta * self.momenta / self.masses).sum(dim=1)
        return per_atom.new_zeros(len(self.runs)).index_add(0, self.index, per_atom)

    def frames(self) -> list[Atoms]:
        """Each active structure's state as ``Atoms`` (momenta, energy and forces)."""
        parts = [torch.split(t.cpu(), self.sizes) for t in (self.positions, self.momenta, self.forces)]
        energies = self.energy.cpu().numpy()
        return [run.frame(parts[0][k].numpy(), parts[1][k].numpy(), float(energies[k]), parts[2][k].numpy())
                for k, run in enumerate(self.runs)]

    def noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard normal ``xi, eta`` [N, 3], each structure's from its own generator, drawn
        in ASE's order (``xi`` then ``eta``)."""
        xi, eta = [], []
        for run, n in zip(self.runs, self.sizes):
            xi.append(run.noise.standard_normal(size=(n, 3)))
            eta.append(run.noise.standard_normal(size=(n, 3)))
        to = dict(device=self.positions.device, dtype=torch.float64)
        return torch.from_numpy(np.concatenate(xi)).to(**to), torch.from_numpy(np.concatenate(eta)).to(**to)


def _evaluate(model: torch.nn.Module, state: _State, positions: torch.Tensor, step: int,
              timestep_fs: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy [S] and forces [N, 3] in float64 at ``positions`` [N, 3]; a failing model call
    is an :class:`MDError` naming the step (and the structures then in the batch)."""
    batch = replace(state.template, positions=positions.to(state.template.cell.dtype))
    try:
        out = model(batch)
    except Exception as err:  # noqa: BLE001 - e.g. atoms too close for the model
        which = [run.index for run in state.runs]
        raise MDError(f"the model failed at step {step} (t = {step * timestep_fs:g} fs) on the batch of structures "
                      f"{which}: {_one_line(err)}", step) from err
    return out["energy"].detach().to(torch.float64).reshape(-1), out["forces"].detach().to(torch.float64)


def _non_finite(state: _State, energy: torch.Tensor, forces: torch.Tensor) -> dict[int, str]:
    """``{position in state.runs: "energy" | "forces"}`` of the structures with a non-finite
    result (fixed atoms included: zeroing their forces must not hide a NaN)."""
    bad_atoms = (~torch.isfinite(forces)).any(dim=1).to(torch.float64)
    bad_forces = bad_atoms.new_zeros(len(state.runs)).index_add(0, state.index, bad_atoms) > 0
    bad_energy = ~torch.isfinite(energy)
    return {k: "energy" if bool(bad_energy[k]) else "forces"
            for k in torch.nonzero(bad_energy | bad_forces).flatten().tolist()}


class _Langevin:
    """ASE's Langevin coefficients (``ase.md.langevin.Langevin.updatevars``), per atom [N, 1]."""

    def __init__(self, dt: float, temperature_K: float, friction_per_fs: float) -> None:
        self.dt, self.gamma, self.kT = dt, friction_per_fs / units.fs, units.kB * temperature_K

    def coefficients(self, masses: torch.Tensor) -> tuple[float, float, torch.Tensor, torch.Tensor, torch.Tensor]:
        dt, gamma = self.dt, self.gamma
        sigma = torch.sqrt(2.0 * self.kT * gamma / masses)
        c1 = dt / 2.0 - dt * dt * gamma / 8.0
        c2 = dt * gamma / 2.0 - dt * dt * gamma * gamma / 8.0
        c3 = math.sqrt(dt) * sigma / 2.0 - dt ** 1.5 * gamma * sigma / 8.0
        c5 = dt ** 1.5 * sigma / (2.0 * math.sqrt(3.0))
        return c1, c2, c3, gamma / 2.0 * c5, c5


def _integrate(runs: list[_Run], model: torch.nn.Module, ensemble: str, timestep_fs: float, steps: int,
               temperature_K: float, friction_per_fs: float, log_interval: int, progress: bool,
               device: torch.device) -> None:
    state = _State(runs, device)
    dt = timestep_fs * units.fs
    langevin = _Langevin(dt, temperature_K, friction_per_fs)
    bar = _progress(steps, f"md {ensemble} x{len(runs)}", progress)

    def log(step: int) -> None:
        kinetic = state.kinetic().cpu().numpy()
        energies = state.energy.cpu().numpy()
        frames = state.frames() if any(run.writer is not None for run in state.runs) else None
        for k, run in enumerate(state.runs):
            temperature = 2.0 * kinetic[k] / (run.dof * units.kB)
            run.log.add(step * timestep_fs, float(temperature), float(energies[k]), float(kinetic[k]))
            if frames is not None and run.writer is not None:
                run.writer.write(frames[k])
        temperatures = 2.0 * kinetic / (state.dof_array * units.kB)
        bar.set_postfix(T=f"{temperatures.mean():.0f}K", refresh=False)

    def stop(step: int, bad: dict[int, str], logged_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """End the structures in ``bad`` at their last good state (still in ``state``: step - 1),
        logged if it was not; returns the masks that keep the others."""
        frames = state.frames()
        for k, what in bad.items():
            run, atoms = state.runs[k], frames[k]
            run.error = (f"structure {run.index}: the model gave a non-finite {what} at step {step} "
                         f"(t = {step * timestep_fs:g} fs); this structure stopped there")
            run.steps = max(step - 1, 0)
            if step == 0:
                continue  # no good state at all: nothing to log
            run.final = atoms
            if not logged_last:
                run.log.add(run.steps * timestep_fs, float(atoms.get_temperature()),
                            float(atoms.get_potential_energy()), float(atoms.get_kinetic_energy()))
                if run.writer is not None:
                    run.writer.write(atoms)
        structures, atoms_mask = state.without(set(bad))
        state.keep(structures, atoms_mask)
        return structures, atoms_mask

    done = 0
    try:
        energy, forces = _evaluate(model, state, state.positions, 0, timestep_fs)
        bad = _non_finite(state, energy, forces)
        if bad:
            structures, atoms_mask = stop(0, bad, True)
            energy, forces = energy[structures], forces[atoms_mask]
        state.energy, state.forces = energy, forces * state.free
        if state.runs:
            log(0)
        for step in range(1, steps + 1):
            if not state.runs:
                break
            positions, momenta, forces = state.positions, state.momenta, state.forces
            masses, free = state.masses, state.free
            if ensemble == "nve":  # as ase.md.verlet.VelocityVerlet.step
                momenta = momenta + 0.5 * dt * forces
                positions = positions + dt * momenta / masses * free
                energy, forces = _evaluate(model, state, positions, step, timestep_fs)
                raw_forces, forces = forces, forces * free
                momenta = (momenta + 0.5 * dt * forces) * free
            else:  # as ase.md.langevin.Langevin.step with fixcm=False
                c1, c2, c3, c4, c5 = langevin.coefficients(masses)
                xi, eta = state.noise()
                random_position, random_velocity = c5 * eta, c3 * xi - c4 * eta
                velocities = momenta / masses
                velocities = velocities + c1 * forces / masses - c2 * velocities + random_velocity
                positions = positions + (dt * velocities + random_position) * free
                energy, forces = _evaluate(model, state, positions, step, timestep_fs)
                raw_forces, forces = forces, forces * free
                velocities = velocities + c1 * forces / masses - c2 * velocities + random_velocity
                momenta = velocities * masses * free
            bad = _non_finite(state, energy, raw_forces)
            if bad:
                structures, atoms_mask = stop(step, bad, (step - 1) % log_interval == 0)
                positions, momenta, forces = positions[atoms_mask], momenta[atoms_mask], forces[atoms_mask]
                energy = energy[structures]
            state.positions, state.momenta, state.energy, state.forces = positions, momenta, energy, forces
            done = step
            if state.runs and (step % log_interval == 0 or step == steps):
                log(step)
            bar.update(1)
    finally:
        bar.close()
        # the survivors' last state (also after an interruption: what the log reached)
        if state.runs:
            for run, atoms in zip(state.runs, state.frames()):
                run.steps, run.final = done, atoms
