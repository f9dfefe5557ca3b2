"""Relaxing many structures at once: one model call per step for a whole batch of structures.

:func:`relax_many` keeps a queue of structures and a batch of those being relaxed. Every step
evaluates the model once on the whole batch, checks each structure's convergence as ASE's
``Optimizer.irun`` does (before stepping; ``steps`` counts optimiser steps, as ASE's
``nsteps``), lets the structures that converged, failed or ran out of steps leave, steps the
others with a batched optimiser (:mod:`.optimizers`, ASE's FIRE and LBFGS, state in float64)
and lets waiting structures enter. The batch is rebuilt only when its membership changes;
otherwise positions (and cells) are written into it in place.

A structure that cannot be evaluated (a :class:`~spherical_channels.data.validation.StructureError`
such as overlapping atoms, any other exception from the model, non-finite energies, forces or
stress, a non-finite optimiser step) is reported in its :class:`RelaxOutcome` and leaves; the
others go on. When a batched model call raises, the batch's structures are evaluated one by one
to find the culprits.

With ``cell=True`` the cell relaxes too, through ASE's ``FrechetCellFilter`` (default settings)
in torch: each structure's generalised coordinates are its atoms' positions in the undeformed
cell and ``exp_cell_factor * log(F)`` of the deformation gradient ``F`` (three extra rows), and
the generalised forces are ASE's.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..data.batch import AtomicBatch
from ..data.validation import StructureError
from .optimizers import STATE_DTYPE, BatchedOptimizer, PackedState, make_optimizer, row_norms, segment_max, segment_sum

if TYPE_CHECKING:
    import ase

__all__ = ["DEFAULT_CPU_MAX_ATOMS", "RelaxOutcome", "relax_many"]

#: Atoms per batch on a CPU when ``max_atoms`` is not given. Measured on one core (OC20-like
#: slabs): the cost per atom of a model call falls up to ~200-700 atoms per call (Morse 73 ->
#: 51 us/atom from 177 to 708 atoms, a small direct SCN flat at ~450 us/atom) and rises
#: beyond (a small conservative SCN: 0.8-1.0 ms/atom up to 708 atoms, 1.6 ms at 1416, 1.9 ms
#: at 2832, out of cache).
DEFAULT_CPU_MAX_ATOMS = 512
# CUDA sizing: the first model call runs on at most this many atoms; its peak memory per atom
# then sizes the batch to this fraction of the memory free on the device.
_CUDA_PROBE_ATOMS = 2048
_CUDA_MEMORY_FRACTION = 0.7
_CUDA_MAX_ATOMS = 500_000
# Trajectory files kept open at once; further ones are opened for each frame.
_MAX_OPEN_TRAJECTORIES = 128


@dataclass
class RelaxOutcome:
    """The outcome of relaxing one structure.

    Attributes:
        index: position of the structure in the input.
        atoms: the final structure (a copy, constraints kept) with a SinglePointCalculator
            holding the energy and (unconstrained) forces at it, and the stress with
            ``cell=True``; for a failed structure, its last positions and no calculator.
        energy: final energy (eV); None if the relaxation failed.
        max_force: largest force norm on a free atom (eV/Å) at the final positions; None if
            failed.
        steps: optimiser steps taken (ASE's ``nsteps``).
        converged: whether the largest (generalised) force norm fell below ``fmax``.
        error: None, or one line saying why the structure failed.
        trajectory: the structure's trajectory file, if trajectories were asked for.
        initial_energy: the energy (eV) at the input structure (the first evaluation), or None
            if the model gave none there.
    """

    index: int
    atoms: "ase.Atoms"
    energy: Optional[float]
    max_force: Optional[float]
    steps: int
    converged: bool
    error: Optional[str] = None
    trajectory: Optional[Path] = None
    initial_energy: Optional[float] = None


def relax_many(
    structures: Sequence["ase.Atoms"],
    model: torch.nn.Module,
    *,
    optimizer: str = "FIRE",
    fmax: float = 0.05,
    steps: int = 200,
    max_atoms: Optional[int] = None,
    max_structures: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
    optimizer_options: Optional[dict[str, Any]] = None,
    trajectories: Optional[str | os.PathLike | Sequence[str | os.PathLike]] = None,
    cell: bool = False,
    progress: bool = True,
    on_finish: Optional[Callable[[RelaxOutcome], None]] = None,
) -> list[RelaxOutcome]:
    """Relax every structure (free atoms; FixAtoms honoured) until its largest free-atom force
    norm is below ``fmax`` or ``steps`` optimiser steps have passed, many structures per model
    call.

    Each structure follows ASE's optimiser on its own: ``relax_many([atoms], ...)`` takes the
    steps of ``ase.optimize.FIRE(atoms).run(fmax, steps)`` (or LBFGS, or with ``cell=True`` of
    the optimiser on ``FrechetCellFilter(atoms)``), to rounding. Convergence is ASE's test,
    ``max |F| < fmax`` over free atoms (and, with ``cell=True``, the filter's cell rows).

    Args:
        structures: the structures (not modified).
        model: ``model(batch, stress=...) -> {"energy": [S], "forces": [N, 3], ("stress":
            [S, 3, 3])}`` with attributes ``regress_forces`` and ``conservative``. It is moved
            to ``device`` and ``dtype`` and evaluated in eval mode (its mode is restored).
        optimizer: ``"FIRE"`` or ``"LBFGS"``.
        fmax: force threshold (eV/Å), > 0.
        steps: most optimiser steps per structure, >= 0.
        max_atoms, max_structures: the batch holds at most this many atoms / structures (a
            structure larger than ``max_atoms`` is relaxed alone). Defaults: on a CPU
            :data:`DEFAULT_CPU_MAX_ATOMS` atoms; on CUDA the first call's peak memory per atom
            sizes the batch to 70% of the free device memory. No structure limit by default.
        device: where the model runs (default: where its parameters are, else the CPU).
        dtype: the model's precision; the optimiser works in float64 regardless.
        optimizer_options: ASE's parameters of the optimiser (FIRE: dt, maxstep, dtmax,
            Nmin, finc, fdec, astart, fa, a; LBFGS: maxstep, memory, damping, alpha).
        trajectories: a directory; each structure's relaxation (every evaluated frame, as an
            ASE optimiser's trajectory) is written to ``<index>.traj`` in it as it goes. Or
            one path per structure.
        cell: relax the cell too (ASE's FrechetCellFilter, default settings). Needs a
            conservative model and structures periodic along all three axes.
        progress: a progress bar over structures.
        on_finish: called with each structure's outcome as soon as it is done (converged,
            out of steps or failed), e.g. to save it at once.

    Returns:
        One :class:`RelaxOutcome` per structure, in input order.

    Raises:
        ValueError: bad arguments (fmax <= 0, steps < 0, unknown optimiser or option, a model
            without forces, ``cell=True`` with a direct-force model or a structure that is not
            periodic along all axes).
    """
    structures = list(structures)
    _check_arguments(structures, model, fmax, steps, max_atoms, max_structures, cell)
    opt = make_optimizer(optimizer, optimizer_options, history_limit=int(steps))
    device = model_dtype_device(model)[1] if device is None else torch.device(device)
    paths: Optional[list[Path]] = None
    if isinstance(trajectories, (str, os.PathLike)):
        folder = Path(trajectories)
        folder.mkdir(parents=True, exist_ok=True)
        width = len(str(max(len(structures) - 1, 0)))
        paths = [folder / f"{i:0{width}d}.traj" for i in range(len(structures))]
    elif trajectories is not None:
        paths = [Path(p) for p in trajectories]
        if len(paths) != len(structures):
            raise ValueError(f"trajectories: {len(paths)} paths for {len(structures)} structures")
        for folder in {p.parent for p in paths}:
            folder.mkdir(parents=True, exist_ok=True)
    modes = {module: module.training for module in model.modules()}
    model = model.to(device=device, dtype=dtype)
    model.eval()
    try:
        engine = _Engine(model, opt, float(fmax), int(steps), cell, device, dtype, max_atoms, max_structures)
        engine.on_finish = on_finish
        return engine.run(structures, paths, progress)
    finally:
        for module, training in modes.items():  # each module's own mode, as it was
            module.training = training


# ---------------------------------------------------------------------------- arguments
def _check_arguments(
    structures: list, model: Any, fmax: Any, steps: Any, max_atoms: Any, max_structures: Any, cell: bool
) -> None:
    """Raise ValueError for arguments no relaxation can run with."""
    if not isinstance(fmax, (int, float)) or isinstance(fmax, bool) or not fmax > 0 or not math.isfinite(fmax):
        raise ValueError(f"fmax must be a finite number > 0 (eV/Å), got {fmax!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    for name, value in (("max_atoms", max_atoms), ("max_structures", max_structures)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not getattr(model, "regress_forces", False):
        raise ValueError("this model does not predict forces (regress_forces=False): it cannot relax structures")
    if cell:
        if not getattr(model, "has_stress", True):
            raise ValueError("cell=True needs stress; an exported model computes energies and forces only: use its checkpoint")
        if not getattr(model, "conservative", False):
            raise ValueError(
                "cell=True needs stress, which only an energy-conserving model has (its forces are -dE/dx); "
                "this model predicts forces with a direct force head"
            )
        for i, atoms in enumerate(structures):
            if not np.all(atoms.pbc):
                raise ValueError(
                    f"cell=True needs structures periodic along all three axes; structure {i} has pbc={atoms.pbc.tolist()}"
                )


def model_dtype_device(
    model: torch.nn.Module, default_dtype: torch.dtype = torch.float32
) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first floating-point parameter or buffer
    (``default_dtype`` on the CPU for a model that has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return default_dtype, torch.device("cpu")


def _one_line(err: BaseException) -> str:
    """An exception as one line; a single-structure batch's "structure 0: " prefix dropped."""
    from ..cli.common import one_line

    text = one_line(err)
    if isinstance(err, StructureError) and text.startswith("structure 0: "):
        text = text[len("structure 0: "):]
    return text


def _unsupported_constraint(atoms: "ase.Atoms") -> Optional[str]:
    """A reason to refuse a structure's constraints (only FixAtoms is honoured), or None."""
    from ase.constraints import FixAtoms

    others = sorted({type(c).__name__ for c in atoms.constraints if not isinstance(c, FixAtoms)})
    return f"constraints {others} are not supported (only FixAtoms)" if others else None


# ---------------------------------------------------------------------------- cell filter
def _frechet_derivative_adjoint(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``M[mu, nu] = <dexp(A)[E_mu_nu], G>`` ``[S, 3, 3]`` for ``a``, ``g`` ``[S, 3, 3]``: the
    force on log(F) given the force ``g`` on F.

    The adjoint of the Fréchet derivative of expm at A is the Fréchet derivative at A^T, so the
    nine directional derivatives ASE takes come from one block exponential:
    ``expm([[A^T, G], [0, A^T]])`` holds ``dexp(A^T)[G]`` in its upper right block.
    """
    s = a.shape[0]
    block = a.new_zeros(s, 6, 6)
    at = a.transpose(1, 2)
    block[:, :3, :3] = at
    block[:, 3:, 3:] = at
    block[:, :3, 3:] = g
    return torch.linalg.matrix_exp(block)[:, :3, 3:]


# ---------------------------------------------------------------------------- the batch
@dataclass
class _Entry:
    """Host-side bookkeeping of one structure being relaxed."""

    index: int
    atoms: "ase.Atoms"
    steps: int = 0  # set when it leaves the batch (the batch counts steps)
    trajectory: Optional[Path] = None
    initial_energy: Optional[float] = None


@dataclass
class _Group:
    """The structures being relaxed, as tensors on the device.

    Rows (the optimiser's coordinates) are grouped by structure: a structure's atoms, then
    with a cell filter its three cell rows.

    Attributes:
        batch: what the model sees (model dtype); positions and cell updated in place.
        x: [R, 3] float64 generalised coordinates.
        positions: [N, 3] float64 Cartesian positions. cell: [S, 3, 3] float64.
        orig_cell: [S, 3, 3] float64, the cell the relaxation started from (cell filter).
        state: the optimiser's state.
        bad_step: [S] bool, the last optimiser step was not finite (reported next).
        steps: [S] (host) optimiser steps each structure has taken.
        has_trajectory: [S] (host) bool, the structure's frames are written.
    """

    entries: list[_Entry]
    batch: AtomicBatch
    x: torch.Tensor
    positions: torch.Tensor
    cell: torch.Tensor
    orig_cell: torch.Tensor
    state: PackedState
    bad_step: torch.Tensor
    steps: np.ndarray
    has_trajectory: np.ndarray

    # derived layout, recomputed by _layout()
    row_seg: torch.Tensor = None  # type: ignore[assignment]
    fixed_rows: torch.Tensor = None  # type: ignore[assignment]
    atom_rows: torch.Tensor = None  # type: ignore[assignment]
    cell_rows: torch.Tensor = None  # type: ignore[assignment]

    @property
    def size(self) -> int:
        return len(self.entries)

    @property
    def num_atoms(self) -> int:
        return self.batch.num_atoms


def _row_counts(natoms: torch.Tensor, cell: bool) -> torch.Tensor:
    return natoms + 3 if cell else natoms


def _layout(group: _Group, cell: bool) -> _Group:
    """Fill in the row layout of ``group`` (after its membership changed)."""
    b = group.batch
    group.row_seg = group.state.seg
    if not cell:
        group.atom_rows = torch.arange(b.num_atoms, device=b.positions.device)
        group.cell_rows = None
        group.fixed_rows = b.fixed
        return group
    starts = torch.cumsum(_row_counts(b.natoms, True), 0) - _row_counts(b.natoms, True)
    group.atom_rows = torch.arange(b.num_atoms, device=b.positions.device) + 3 * b.batch
    group.cell_rows = (starts + b.natoms)[:, None] + torch.arange(3, device=b.positions.device)
    fixed_rows = torch.zeros(group.x.shape[0], dtype=torch.bool, device=b.positions.device)
    fixed_rows[group.atom_rows] = b.fixed
    group.fixed_rows = fixed_rows
    return group


def _select_batch(batch: AtomicBatch, keep: torch.Tensor) -> AtomicBatch:
    """The structures of ``batch`` where ``keep`` ``[S]`` is True."""
    rows = keep[batch.batch]
    natoms = batch.natoms[keep]
    return replace(
        batch,
        positions=batch.positions[rows],
        atomic_numbers=batch.atomic_numbers[rows],
        cell=batch.cell[keep],
        pbc=batch.pbc[keep],
        natoms=natoms,
        batch=torch.repeat_interleave(torch.arange(natoms.shape[0], device=natoms.device), natoms),
        fixed=batch.fixed[rows],
        tags=batch.tags[rows],
        energy=None,
        forces=None,
    )


class _Engine:
    """One call of :func:`relax_many`: the queue, the batch and the loop."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: BatchedOptimizer,
        fmax: float,
        steps: int,
        cell: bool,
        device: torch.device,
        dtype: torch.dtype,
        max_atoms: Optional[int],
        max_structures: Optional[int],
    ) -> None:
        self.model, self.optimizer, self.fmax, self.steps, self.cell = model, optimizer, fmax, steps, cell
        self.device, self.dtype = device, dtype
        self.max_structures = max_structures
        self.sized = max_atoms is not None or device.type != "cuda"
        if max_atoms is not None:
            self.max_atoms = int(max_atoms)
        elif device.type == "cuda":
            self.max_atoms = _CUDA_PROBE_ATOMS
        else:
            self.max_atoms = DEFAULT_CPU_MAX_ATOMS
        if not self.sized:
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)

    # ------------------------------------------------------------------ the loop
    on_finish: Optional[Callable[[RelaxOutcome], None]] = None

    def run(self, structures: list, paths: Optional[list[Path]], progress: bool) -> list[RelaxOutcome]:
        from tqdm import tqdm

        self.outcomes: list[Optional[RelaxOutcome]] = [None] * len(structures)
        self.writers = _TrajectoryFiles()
        pending = [
            _Entry(i, atoms, trajectory=None if paths is None else paths[i]) for i, atoms in enumerate(structures)
        ]
        pending.reverse()  # pop() takes the next in input order
        self.counts = {"converged": 0, "failed": 0}
        group: Optional[_Group] = None
        bar = tqdm(total=len(structures), desc="relax", unit="structure", disable=not progress, dynamic_ncols=True)
        self.bar = bar
        try:
            while pending or group is not None:
                group = self._admit(group, pending)
                if group is None:
                    continue
                group = self._iterate(group)
        finally:
            self.writers.close()
            bar.close()
        return list(self.outcomes)  # type: ignore[arg-type]

    def _admit(self, group: Optional[_Group], pending: list[_Entry]) -> Optional[_Group]:
        """Move waiting structures into the batch while it has room (always at least one)."""
        size = 0 if group is None else group.size
        atoms_in = 0 if group is None else group.num_atoms
        new: list[_Entry] = []
        batches: list[AtomicBatch] = []
        while pending:
            entry = pending[-1]
            n = len(entry.atoms)
            if (size or new) and (
                (self.max_structures is not None and size + len(new) >= self.max_structures)
                or atoms_in + n > self.max_atoms
            ):
                break
            pending.pop()
            problem = _unsupported_constraint(entry.atoms)
            if problem is None:
                try:
                    batches.append(AtomicBatch.from_atoms([entry.atoms.copy()], dtype=self.dtype, device=self.device))
                except Exception as err:  # noqa: BLE001 (any failure of one structure is reported)
                    problem = _one_line(err)
            if problem is not None:
                self._finish_failed(entry, entry.atoms.copy(), problem)
                continue
            new.append(entry)
            atoms_in += n
        if not new:
            return group
        fresh = self._new_group(new, AtomicBatch.concatenate(batches) if len(batches) > 1 else batches[0])
        return fresh if group is None else self._join(group, fresh)

    def _new_group(self, entries: list[_Entry], batch: AtomicBatch) -> _Group:
        positions = torch.from_numpy(np.concatenate([e.atoms.get_positions() for e in entries])).to(
            device=self.device, dtype=STATE_DTYPE
        )
        cell = torch.from_numpy(np.stack([e.atoms.cell.array for e in entries])).to(device=self.device, dtype=STATE_DTYPE)
        counts = _row_counts(batch.natoms, self.cell)
        x = torch.zeros(int(counts.sum()), 3, dtype=STATE_DTYPE, device=self.device)
        group = _Group(
            entries=entries,
            batch=batch,
            x=x,
            positions=positions,
            cell=cell,
            orig_cell=cell.clone(),
            state=self.optimizer.init_state(counts),
            bad_step=torch.zeros(len(entries), dtype=torch.bool, device=self.device),
            steps=np.zeros(len(entries), dtype=np.int64),
            has_trajectory=np.array([e.trajectory is not None for e in entries], dtype=bool),
        )
        _layout(group, self.cell)
        # the filter starts at F = I: the coordinates are the positions, log(F) = 0
        group.x[group.atom_rows] = positions
        return group

    def _join(self, a: _Group, b: _Group) -> _Group:
        group = _Group(
            entries=a.entries + b.entries,
            batch=AtomicBatch.concatenate([a.batch, b.batch]),
            x=torch.cat([a.x, b.x]),
            positions=torch.cat([a.positions, b.positions]),
            cell=torch.cat([a.cell, b.cell]),
            orig_cell=torch.cat([a.orig_cell, b.orig_cell]),
            state=type(a.state).concatenate([a.state, b.state]),
            bad_step=torch.cat([a.bad_step, b.bad_step]),
            steps=np.concatenate([a.steps, b.steps]),
            has_trajectory=np.concatenate([a.has_trajectory, b.has_trajectory]),
        )
        return _layout(group, self.cell)

    def _select(self, group: _Group, keep: np.ndarray) -> Optional[_Group]:
        if not keep.any():
            return None
        if keep.all():
            return group
        k = torch.from_numpy(keep).to(self.device)
        rows = k[group.row_seg]
        atoms = k[group.batch.batch]
        out = _Group(
            entries=[e for e, kept in zip(group.entries, keep) if kept],
            batch=_select_batch(group.batch, k),
            x=group.x[rows],
            positions=group.positions[atoms],
            cell=group.cell[k],
            orig_cell=group.orig_cell[k],
            state=group.state.select(k),
            bad_step=group.bad_step[k],
            steps=group.steps[keep],
            has_trajectory=group.has_trajectory[keep],
        )
        return _layout(out, self.cell)

    # ------------------------------------------------------------------ one step
    def _iterate(self, group: _Group) -> Optional[_Group]:
        """Evaluate the batch once; finish and remove structures that are done; step the rest."""
        out, errors = self._evaluate(group)
        b = group.batch
        s = group.size
        energy = out["energy"].detach().to(STATE_DTYPE)
        forces = out["forces"].detach().to(STATE_DTYPE)
        stress = out["stress"].detach().to(STATE_DTYPE) if self.cell else None
        finite = torch.isfinite(energy) & (segment_sum((~torch.isfinite(forces)).any(dim=1).to(STATE_DTYPE), b.batch, s) == 0)
        if stress is not None:
            finite &= torch.isfinite(stress).flatten(1).all(dim=1)
        # ASE's FixAtoms zeroes the forces on fixed atoms
        free_forces = torch.where(b.fixed[:, None], 0.0, torch.nan_to_num(forces))
        max_force = segment_max(row_norms(free_forces), b.batch, s)
        if self.cell:
            generalised = self._frechet_forces(group, free_forces, torch.nan_to_num(stress))
            gmax = segment_max(row_norms(generalised), group.row_seg, s)
        else:
            generalised, gmax = free_forces, max_force
        summary = torch.stack([finite.to(STATE_DTYPE), group.bad_step.to(STATE_DTYPE), gmax, max_force, energy], 1).cpu().numpy()
        if not self.sized:
            self._size_from_memory(group)

        failed = (summary[:, 0] == 0) | (summary[:, 1] != 0)
        failed[list(errors)] = True
        converged = ~failed & (summary[:, 2] < self.fmax)  # ASE's test: strictly below fmax
        for i in np.flatnonzero((group.steps == 0) & ~failed).tolist():  # first evaluation: the input
            group.entries[i].initial_energy = float(summary[i, 4])
        done = failed | converged | (group.steps >= self.steps)
        frames = self._host_frames(group, energy, forces, stress, summary)
        # host bookkeeping only for the structures that leave or have a trajectory to extend
        for i in np.flatnonzero(done | group.has_trajectory).tolist():
            entry, taken = group.entries[i], int(group.steps[i])
            entry.steps = taken
            if failed[i]:
                if i in errors:
                    reason = errors[i]
                elif summary[i, 1]:
                    entry.steps = taken = taken - 1  # the step was counted but not taken
                    reason = f"the {self.optimizer.name} step was not finite (degenerate curvature) after step {taken}"
                else:
                    what = "energy, forces or stress" if self.cell else "energy or forces"
                    reason = f"the model returned non-finite {what} at step {taken}"
                self._finish_failed(entry, frames(i, results=False), reason)
                continue
            frame = frames(i, results=True)
            if entry.trajectory is not None:
                self.writers.write(entry.trajectory, frame)
            if done[i]:
                self._finish(entry, frame, float(summary[i, 4]), float(summary[i, 3]), bool(converged[i]))

        if done.any():
            self.writers.release([e.trajectory for e, d in zip(group.entries, done) if d])
            keep = ~done
            k = torch.from_numpy(keep).to(self.device)
            generalised = generalised[k[group.row_seg]]
            group = self._select(group, keep)
            if group is None:
                return None
        self._step(group, generalised)
        return group

    def _step(self, group: _Group, generalised: torch.Tensor) -> None:
        """One optimiser step of every structure; the new positions written into the batch."""
        dx = self.optimizer.step(group.state, group.x, generalised)
        dx = torch.where(group.fixed_rows[:, None], 0.0, dx)  # FixAtoms: fixed atoms stay
        good = segment_sum((~torch.isfinite(dx)).any(dim=1).to(STATE_DTYPE), group.row_seg, group.size) == 0
        group.bad_step = ~good
        # a structure whose step is not finite stays where it is and is reported next time
        group.x = torch.where(good[group.row_seg, None], group.x + torch.nan_to_num(dx), group.x)
        if self.cell:
            log_f = group.x[group.cell_rows] / _exp_cell_factor(group)[:, None, None]
            deform = torch.linalg.matrix_exp(log_f)  # F
            ft = deform.transpose(1, 2)
            group.positions = torch.bmm(group.x[group.atom_rows].unsqueeze(1), ft[group.batch.batch]).squeeze(1)
            group.cell = group.orig_cell @ ft
            group.batch.cell.copy_(group.cell)
        else:
            group.positions = group.x
        group.batch.positions.copy_(group.positions)
        group.steps += 1

    def _frechet_forces(self, group: _Group, forces: torch.Tensor, stress: torch.Tensor) -> torch.Tensor:
        """ASE's FrechetCellFilter forces ``[R, 3]``: atoms' forces on the undeformed
        coordinates, then the force on ``exp_cell_factor * log(F)`` (scalar pressure 0)."""
        log_f = group.x[group.cell_rows] / _exp_cell_factor(group)[:, None, None]
        deform = torch.linalg.matrix_exp(log_f)
        volume = torch.linalg.det(group.cell).abs()
        virial = -volume[:, None, None] * stress
        cell_grad = virial @ torch.linalg.inv(deform.transpose(1, 2))
        cell_force = _frechet_derivative_adjoint(log_f, cell_grad) / _exp_cell_factor(group)[:, None, None]
        out = torch.zeros_like(group.x)
        out[group.atom_rows] = torch.bmm(forces.unsqueeze(1), deform[group.batch.batch]).squeeze(1)
        out[group.cell_rows] = cell_force
        return out

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, group: _Group) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
        """The model's outputs for the batch and the structures it could not evaluate
        (``{position in batch: reason}``; their outputs are NaN).

        One call for the whole batch, unless the batch outgrew the atom budget (which shrinks
        when a batch fails that each structure passes alone): then one call per chunk of
        consecutive structures within the budget.
        """
        if group.num_atoms <= self.max_atoms or group.size == 1:
            return self._evaluate_part(group.batch, group.size)
        ends = np.cumsum(group.batch.natoms.cpu().numpy())
        outs, errors, start = [], {}, 0
        while start < group.size:
            # as many consecutive structures as fit the budget, at least one
            limit = (int(ends[start - 1]) if start else 0) + self.max_atoms
            stop = max(start + 1, int(np.searchsorted(ends, limit, side="right")))
            chunk = torch.zeros(group.size, dtype=torch.bool, device=self.device)
            chunk[start:stop] = True
            out, errs = self._evaluate_part(_select_batch(group.batch, chunk), stop - start)
            outs.append(out)
            errors.update({start + i: reason for i, reason in errs.items()})
            start = stop
        return {key: torch.cat([o[key] for o in outs]) for key in outs[0]}, errors

    def _evaluate_part(self, batch: AtomicBatch, size: int) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
        """:meth:`_evaluate` for one model call; on an exception, structure by structure."""
        try:
            return self._call(batch), {}
        except Exception as err:  # noqa: BLE001 (find the structures that cause it)
            batch_error = err
        outs: list[dict[str, torch.Tensor]] = []
        errors: dict[int, str] = {}
        for i, single in enumerate(batch.split()):
            try:
                outs.append(self._call(single))
            except Exception as err:  # noqa: BLE001
                errors[i] = _one_line(err)
                outs.append(self._nan_outputs(single))
        if not errors:
            # every structure works alone: the batch was too big (e.g. out of memory)
            self.max_atoms = max(1, batch.num_atoms // 2)
            warnings.warn(
                f"relax_many: a model call on {size} structures ({batch.num_atoms} atoms) failed "
                f"({_one_line(batch_error)}) but each structure works alone; model calls now take at most "
                f"{self.max_atoms} atoms",
                RuntimeWarning,
                stacklevel=4,
            )
        return {key: torch.cat([o[key] for o in outs]) for key in outs[0]}, errors

    def _call(self, batch: AtomicBatch) -> dict[str, torch.Tensor]:
        out = self.model(batch, stress=self.cell)
        keys = ("energy", "forces", "stress") if self.cell else ("energy", "forces")
        result = {}
        for key in keys:
            if key not in out:
                raise RuntimeError(f"the model returned no {key!r}")
            result[key] = out[key].detach()
        s, n = batch.num_structures, batch.num_atoms
        shapes = {"energy": (s,), "forces": (n, 3), "stress": (s, 3, 3)}
        for key, value in result.items():
            if tuple(value.shape) != shapes[key]:
                raise RuntimeError(f"the model returned {key} of shape {tuple(value.shape)}, expected {shapes[key]}")
        return result

    def _nan_outputs(self, batch: AtomicBatch) -> dict[str, torch.Tensor]:
        nan = dict(dtype=self.dtype, device=self.device)
        out = {
            "energy": torch.full((batch.num_structures,), float("nan"), **nan),
            "forces": torch.full((batch.num_atoms, 3), float("nan"), **nan),
        }
        if self.cell:
            out["stress"] = torch.full((batch.num_structures, 3, 3), float("nan"), **nan)
        return out

    def _size_from_memory(self, group: _Group) -> None:
        """Size CUDA batches from the first call's peak memory per atom (see ``relax_many``)."""
        self.sized = True
        try:
            free, _ = torch.cuda.mem_get_info(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            reusable = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        except Exception:  # noqa: BLE001 (keep the probe size)
            return
        # the optimiser's state grows with the batch too (LBFGS: its history)
        state_bytes = sum(
            t.element_size() * t.numel() for t in vars(group.state).values() if isinstance(t, torch.Tensor)
        )
        per_atom = max((peak - self.baseline + state_bytes) / max(group.num_atoms, 1), 1.0)
        budget = _CUDA_MEMORY_FRACTION * (free + reusable + peak) / per_atom
        self.max_atoms = int(min(max(budget, group.num_atoms), _CUDA_MAX_ATOMS))

    # ------------------------------------------------------------------ results
    def _host_frames(self, group: _Group, energy, forces, stress, summary):  # noqa: ANN001, ANN202
        """``frames(i, results) -> ase.Atoms`` for structure i of the batch at its current
        positions, with a SinglePointCalculator if ``results``; the tensors come to the host
        only if a frame is asked for."""
        cache: dict[str, np.ndarray] = {}

        def host() -> dict[str, np.ndarray]:
            if not cache:
                cache["positions"] = group.positions.cpu().numpy()
                cache["cell"] = group.cell.cpu().numpy()
                cache["forces"] = forces.cpu().numpy()
                if stress is not None:
                    cache["stress"] = stress.cpu().numpy()
                cache["ends"] = np.cumsum(group.batch.natoms.cpu().numpy())
            return cache

        def frame(i: int, results: bool) -> "ase.Atoms":
            from ase.calculators.singlepoint import SinglePointCalculator

            h = host()
            lo, hi = (int(h["ends"][i - 1]) if i else 0), int(h["ends"][i])
            atoms = group.entries[i].atoms.copy()
            if self.cell:
                atoms.set_cell(h["cell"][i], scale_atoms=False)
            # bypass the constraints: fixed atoms are where the relaxation put them
            atoms.positions[:] = h["positions"][lo:hi]
            if results:
                extra = {}
                if stress is not None:
                    s = h["stress"][i]
                    extra["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
                e = float(summary[i, 4])
                atoms.calc = SinglePointCalculator(atoms, energy=e, free_energy=e, forces=h["forces"][lo:hi].copy(), **extra)
            return atoms

        return frame

    def _finish(self, entry: _Entry, atoms: "ase.Atoms", energy: float, max_force: float, converged: bool) -> None:
        self.outcomes[entry.index] = RelaxOutcome(
            entry.index, atoms, energy, max_force, entry.steps, converged, None, entry.trajectory,
            entry.initial_energy,
        )
        self.counts["converged"] += int(converged)
        self._advance(entry.index)

    def _finish_failed(self, entry: _Entry, atoms: "ase.Atoms", reason: str) -> None:
        atoms.calc = None
        self.outcomes[entry.index] = RelaxOutcome(
            entry.index, atoms, None, None, entry.steps, False, reason, entry.trajectory, entry.initial_energy
        )
        self.counts["failed"] += 1
        self.writers.release([entry.trajectory])
        self._advance(entry.index)

    def _advance(self, index: int) -> None:
        self.bar.update(1)
        self.bar.set_postfix(self.counts, refresh=False)
        if self.on_finish is not None:
            self.on_finish(self.outcomes[index])  # type: ignore[arg-type]


def _exp_cell_factor(group: _Group) -> torch.Tensor:
    """ASE's default ``exp_cell_factor``: the number of atoms ``[S]``."""
    return group.batch.natoms.to(STATE_DTYPE)


class _TrajectoryFiles:
    """ASE trajectory files written frame by frame: up to :data:`_MAX_OPEN_TRAJECTORIES` kept
    open, the others opened in append mode for each frame."""

    def __init__(self) -> None:
        self.open: dict[Path, Any] = {}
        self.started: set[Path] = set()

    def write(self, path: Path, atoms: "ase.Atoms") -> None:
        from ase.io.trajectory import Trajectory

        if path in self.open:
            self.open[path].write(atoms)
            return
        mode = "a" if path in self.started else "w"
        self.started.add(path)
        if len(self.open) < _MAX_OPEN_TRAJECTORIES:
            self.open[path] = Trajectory(str(path), mode)
            self.open[path].write(atoms)
        else:
            with Trajectory(str(path), mode) as traj:
                traj.write(atoms)

    def release(self, paths: Sequence[Optional[Path]]) -> None:
        """Close the files of structures that are done."""
        for path in paths:
            traj = self.open.pop(path, None) if path is not None else None
            if traj is not None:
                traj.close()

    def close(self) -> None:
        self.release(list(self.open))
