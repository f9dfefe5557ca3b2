"""Batched FIRE and LBFGS against ASE's, step by step, on the Morse potential in float64."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import optimize as ase_optimize
from ase.build import add_adsorbate, fcc100, fcc111
from ase.constraints import FixAtoms

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.simulation import SCNCalculator
from spherical_channels.simulation.optimizers import (
    FIRE,
    LBFGS,
    FIREState,
    LBFGSState,
    make_optimizer,
    segment_max,
    segment_sum,
)
from spherical_channels.testing.potentials import MorsePotential

STEPS = 50
# Both sides compute the same float64 numbers, summed in another order: rounding (~1e-16
# relative) grows over 50 steps of a contracting optimisation to ~1e-13 here; 1e-6 Å is the
# bound asked of the engine.
TOLERANCE = 1e-6

NON_DEFAULT = {
    "FIRE": dict(dt=0.05, maxstep=0.1, dtmax=0.6, Nmin=3, finc=1.2, fdec=0.6, astart=0.2, fa=0.95, a=0.15),
    "LBFGS": dict(maxstep=0.1, memory=4, damping=0.8, alpha=40.0),
}


def slab(kind: str = "111", seed: int = 1) -> "ase.Atoms":  # noqa: F821
    """A Cu slab with an O adsorbate, rattled away from the minimum, bottom layer fixed."""
    build = fcc111 if kind == "111" else fcc100
    atoms = build("Cu", size=(2, 2, 3), vacuum=6.0)
    atoms.pbc = True
    add_adsorbate(atoms, "O", 1.2, "fcc" if kind == "111" else "hollow")
    atoms.rattle(0.1, seed=seed)
    atoms.set_constraint(FixAtoms(indices=[a.index for a in atoms if a.tag == 3]))
    return atoms


def morse() -> MorsePotential:
    return MorsePotential().to(torch.float64)


def ase_path(atoms, name: str, options: dict, steps: int = STEPS) -> tuple[list[np.ndarray], int, bool]:
    """Positions before every step of ASE's optimiser (as its irun yields), its nsteps and
    whether it converged (fmax 1e-6: not within ``steps``)."""
    atoms = atoms.copy()
    atoms.calc = SCNCalculator(morse(), dtype=torch.float64)
    opt = getattr(ase_optimize, name)(atoms, logfile=None, **options)
    path = []
    for converged in opt.irun(fmax=1e-6, steps=steps):
        path.append(atoms.get_positions().copy())
    return path, opt.nsteps, converged


def batched_path(structures, optimizer, steps: int = STEPS) -> list[np.ndarray]:
    """Positions ``[steps + 1, N, 3]`` of all structures, driving ``optimizer`` by hand."""
    pot = morse()
    batch = AtomicBatch.from_atoms(structures, dtype=torch.float64)
    state = optimizer.init_state(batch.natoms)
    x = batch.positions.clone()
    path = [x.numpy().copy()]
    for _ in range(steps):
        forces = pot(replace(batch, positions=x))["forces"]
        forces = torch.where(batch.fixed[:, None], 0.0, forces)  # FixAtoms.adjust_forces
        x = x + optimizer.step(state, x, forces)
        path.append(x.numpy().copy())
    return path


@pytest.mark.parametrize("name", ["FIRE", "LBFGS"])
@pytest.mark.parametrize("options", ["default", "non-default"])
def test_each_structure_of_a_batch_follows_ase(name: str, options: str) -> None:
    params = {} if options == "default" else NON_DEFAULT[name]
    structures = [slab("111", seed=1), slab("100", seed=2), slab("111", seed=3)[:-1]]  # 13, 13, 12 atoms
    path = batched_path(structures, make_optimizer(name, params))
    ends = np.cumsum([0] + [len(a) for a in structures])
    for s, atoms in enumerate(structures):
        reference, nsteps, converged = ase_path(atoms, name, params)
        assert nsteps == STEPS and not converged  # the comparison covers all 50 steps
        mine = [p[ends[s] : ends[s + 1]] for p in path]
        moved = np.abs(reference[-1] - reference[0]).max()
        assert moved > 0.1  # a real relaxation, not a standstill
        error = max(np.abs(a - b).max() for a, b in zip(mine, reference))
        assert error < TOLERANCE, f"structure {s}: {error}"
        fixed = atoms.constraints[0].get_indices()
        np.testing.assert_array_equal(mine[-1][fixed], atoms.positions[fixed])


@pytest.mark.parametrize("name", ["FIRE", "LBFGS"])
def test_state_can_be_split_and_joined_between_steps(name: str) -> None:
    """Structures leaving and joining (in-flight batching) do not disturb the others."""
    pot = morse()
    optimizer = make_optimizer(name, NON_DEFAULT[name] if name == "LBFGS" else {})
    structures = [slab("111", seed=1), slab("100", seed=2), slab("111", seed=3)]
    alone = batched_path(structures[1:2], make_optimizer(name, NON_DEFAULT[name] if name == "LBFGS" else {}), 12)

    batch = AtomicBatch.from_atoms(structures, dtype=torch.float64)
    state = optimizer.init_state(batch.natoms)
    x = batch.positions.clone()
    for step in range(12):
        forces = torch.where(batch.fixed[:, None], 0.0, pot(replace(batch, positions=x))["forces"])
        x = x + optimizer.step(state, x, forces)
        if step == 4:  # the first structure leaves, a fresh one joins at the front
            keep = torch.tensor([False, True, True])
            state = state.select(keep)
            x = x[keep[batch.batch]]
            batch = AtomicBatch.concatenate([AtomicBatch.from_atoms([slab("100", seed=5)], torch.float64),
                                             AtomicBatch.from_atoms(structures[1:], torch.float64)])
            fresh = optimizer.init_state(batch.natoms[:1])
            state = type(state).concatenate([fresh, state])
            x = torch.cat([batch.positions[:13], x])
    assert isinstance(state, FIREState if name == "FIRE" else LBFGSState)
    assert state.num_structures == 3 and state.num_rows == batch.num_atoms
    np.testing.assert_allclose(x[13:26].numpy(), alone[-1], rtol=0, atol=1e-12)


def test_fire_caps_the_whole_step_and_lbfgs_the_longest_row() -> None:
    """ASE's FIRE caps the norm of a structure's whole step vector, LBFGS its longest row."""
    counts = torch.tensor([2, 1])
    forces = torch.tensor([[100.0, 0, 0], [0, 100.0, 0], [0, 0, 1e-3]], dtype=torch.float64)
    x = torch.zeros(3, 3, dtype=torch.float64)
    fire = FIRE(maxstep=0.2)
    dr = fire.step(fire.init_state(counts), x, forces)
    assert float(dr[:2].norm()) == pytest.approx(0.2, rel=1e-12)
    # a small force is not capped: dt^2 F
    assert float(dr[2, 2]) == pytest.approx(0.1 * 0.1 * 1e-3, rel=1e-12)
    lbfgs = LBFGS(maxstep=0.2)
    dr = lbfgs.step(lbfgs.init_state(counts), x, forces)
    np.testing.assert_allclose(dr[:2].norm(dim=1).numpy(), [0.2, 0.2], rtol=1e-12)
    assert float(dr[2, 2]) == pytest.approx(1e-3 / 70.0, rel=1e-12)  # first step: F / alpha


def test_segment_reductions() -> None:
    seg = torch.tensor([0, 0, 2, 2, 2])
    values = torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0], dtype=torch.float64)
    assert segment_sum(values, seg, 3).tolist() == [3.0, 0.0, 12.0]
    assert segment_max(values, seg, 3).tolist() == [2.0, 0.0, 5.0]


def test_bad_optimizer_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("BFGS")
    with pytest.raises(ValueError, match="bad optimizer options"):
        make_optimizer("FIRE", {"maxmove": 0.1})
    with pytest.raises(ValueError, match="downhill_check"):
        FIRE(downhill_check=True)
    with pytest.raises(ValueError, match="too large"):
        LBFGS(maxstep=1.5)  # ASE's own limit
    with pytest.raises(ValueError, match="memory"):
        LBFGS(memory=0)
    with pytest.raises(ValueError, match="dt"):
        FIRE(dt=float("nan"))
    assert make_optimizer("lbfgs", {"alpha": 50.0}).options()["alpha"] == 50.0
