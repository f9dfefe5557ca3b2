"""Structure relaxation with an ASE optimiser (fixed atoms stay fixed through ``FixAtoms``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.optimize import BFGS, FIRE, LBFGS, BFGSLineSearch
from ase.optimize.optimize import Optimizer

__all__ = ["OPTIMIZERS", "RelaxResult", "relax", "max_free_force"]

OPTIMIZERS: dict[str, type[Optimizer]] = {"BFGS": BFGS, "LBFGS": LBFGS, "FIRE": FIRE, "BFGSLineSearch": BFGSLineSearch}


@dataclass
class RelaxResult:
    """Outcome of one relaxation."""

    atoms: Atoms  # relaxed structure, with the final energy and forces as calculator results
    converged: bool
    steps: int
    energy: float  # eV
    max_force: float  # eV/A, largest force on a free atom
    trajectory: Path | None = None


def max_free_force(atoms: Atoms) -> float:
    """Largest force norm on an atom not held by a constraint (eV/A)."""
    forces = atoms.get_forces(apply_constraint=True)  # fixed atoms' forces are zeroed
    return float(np.linalg.norm(forces, axis=1).max()) if len(forces) else 0.0


def relax(
    atoms: Atoms,
    calculator: Calculator,
    optimizer: str = "BFGS",
    fmax: float = 0.05,
    steps: int = 200,
    trajectory: str | Path | None = None,
    logfile: str | None = None,
) -> RelaxResult:
    """Relax a copy of ``atoms`` until every free atom's force is below ``fmax`` (eV/A) or
    ``steps`` optimiser steps have passed.

    Args:
        optimizer: one of :data:`OPTIMIZERS`.
        trajectory: write the relaxation as an ASE trajectory here.
        logfile: the optimiser's log (``"-"`` for standard output, None for none).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
    if not fmax > 0 or steps < 0:  # "not >" also refuses a NaN fmax
        raise ValueError(f"need fmax > 0 and steps >= 0, got fmax={fmax}, steps={steps}")
    work = atoms.copy()
    work.calc = calculator
    trajectory = Path(trajectory) if trajectory is not None else None
    if trajectory is not None:
        trajectory.parent.mkdir(parents=True, exist_ok=True)
    # the optimiser closes its trajectory and log on leaving the block, also when it fails
    with OPTIMIZERS[optimizer](work, logfile=logfile, trajectory=str(trajectory) if trajectory else None) as opt:
        # a non-finite energy or force would move the atoms to NaN and surface steps later
        # as a puzzling error about positions: stop at the step that produced it
        opt.attach(lambda: _check_finite(work, opt.nsteps), interval=1)
        converged = bool(opt.run(fmax=fmax, steps=steps))
    energy = float(work.get_potential_energy())
    forces = work.get_forces(apply_constraint=False)
    _check_finite(work, opt.nsteps)
    force = max_free_force(work)
    from ase.calculators.singlepoint import SinglePointCalculator

    result = work.copy()
    result.calc = SinglePointCalculator(result, energy=energy, forces=forces)
    return RelaxResult(result, converged, int(opt.get_number_of_steps()), energy, force, trajectory)


def _check_finite(atoms: Atoms, step: int) -> None:
    """Raise if the calculator's latest energy or forces on ``atoms`` are not finite."""
    results = getattr(atoms.calc, "results", None) or {}
    energy, forces = results.get("energy"), results.get("forces")
    if energy is not None and not np.isfinite(energy):
        raise ValueError(f"the calculator returned a non-finite energy at step {step}")
    if forces is not None and not np.isfinite(forces).all():
        raise ValueError(f"the calculator returned non-finite forces at step {step}")
