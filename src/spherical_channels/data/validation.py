"""One validation layer for atomic structures: the rules, and one message format.

Every entry point (the dataset readers, :class:`~spherical_channels.data.batch.AtomicBatch`,
the models and the radius graph) checks structures with the functions here, so a structure is
either accepted everywhere or rejected everywhere with the same message:
``"<path>: structure <i>: <what>"`` (the path part only where a file is known).

The rules, in the order they are checked (the first one broken is reported):

* the structure has atoms; atomic numbers lie in the element table ``1..max_atomic_number``
  (``1..118`` when no model table is given);
* positions and cell are finite, also in float32 (the precision models run in);
* periodic axes have non-zero, linearly independent cell vectors;
* targets, where present (or required): one finite energy and finite [N, 3] forces (finite in
  float32 too), within plausibility bounds (:data:`MAX_ABS_ENERGY_PER_ATOM`,
  :data:`MAX_ABS_FORCE`);
* no two atoms, and no atom and one of its periodic images, overlap: their distance is at
  most :data:`MIN_DISTANCE` Angstrom (the official radius graph drops such pairs silently; here
  they are an error, with :func:`overlap_message`);
* every periodic axis is at least :data:`MIN_CELL_HEIGHT` thick (else the neighbour search
  would have to visit hundreds of periodic images along it and can exhaust memory).

:class:`StructureError` (a ``ValueError``) is raised for in-memory structures and batches;
the readers raise its subclass :class:`~spherical_channels.data.formats.common.DataError`,
which also names the file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from .cells import (
    ZERO_VECTOR_TOL,
    periodic_cell_is_singular,
    periodic_cells_are_singular,
    periodic_heights,
    periodic_heights_many,
)

if TYPE_CHECKING:
    import ase

    from .batch import AtomicBatch

__all__ = [
    "DEFAULT_MAX_ATOMIC_NUMBER",
    "FLOAT32_MAX",
    "MAX_ABS_ENERGY_PER_ATOM",
    "MAX_ABS_FORCE",
    "MIN_CELL_HEIGHT",
    "MIN_DISTANCE",
    "PERIODIC_TABLE_SIZE",
    "StructureError",
    "atoms_problem",
    "cell_problem",
    "element_problem",
    "located_message",
    "overlap_message",
    "overlap_problem",
    "structure_problem",
    "target_problem",
    "thickness_problem",
    "validate_atoms",
    "validate_batch",
]

#: Atoms at or closer than this (Angstrom) overlap.
MIN_DISTANCE = 0.01
#: Periodic axes thinner than this (Angstrom, distance between opposite cell faces) are
#: rejected. Real cells are far thicker (a one-atom fcc/bcc cell of the densest metal is
#: ~1.5 A thick, the H-H bond is 0.74 A), and the neighbour search visits about
#: 2 * cutoff / thickness images along an axis: at 0.5 A and a 12 A cutoff already ~50, at
#: 0.02 A ~1200 per axis, which exhausts memory. A cell this thin is either wrong or an
#: unreduced basis of a sound lattice (then reduce it, e.g. ase.geometry.minkowski_reduce).
MIN_CELL_HEIGHT = 0.5
#: Largest atomic number the readers accept by default (89 = Ac, the last element of
#: OC20-style embeddings of 90 rows, which start at 0).
DEFAULT_MAX_ATOMIC_NUMBER = 89
#: Elements in the periodic table (the element table when no model's table is given).
PERIODIC_TABLE_SIZE = 118
#: Largest finite float32: a target or coordinate beyond it becomes inf in a float32 model.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Default bound on |energy| / atom (eV). Even all-electron total energies stay below it:
#: about 20.9 Z^(7/3) eV (Thomas-Fermi) is 7e5 eV for Ac (Z = 89), ~8e5 eV at Z = 100;
#: pseudopotential DFT labels (OC20, OMat, MPtrj) are within 1e4 eV/atom.
MAX_ABS_ENERGY_PER_ATOM = 1e6
#: Default bound on a force component (eV/Angstrom). DFT labels, even of rattled or
#: compressed structures, stay below ~1e3 eV/A; 1e4 eV/A is the bare Coulomb repulsion of
#: two oxygen nuclei 0.25 A apart, a geometry no data set holds.
MAX_ABS_FORCE = 1e4

# The overlap search asks vesin for pairs within this distance (Angstrom) and filters:
# vesin's cell list uses bins of about the cutoff, so a 0.01 A cutoff makes it ~200x
# slower (12 ms instead of 60 us for an 80-atom slab) while pairs < 2 A are few.
_OVERLAP_SEARCH_CUTOFF = 2.0
# A cell thinner than min_distance / this along a periodic axis is too thin even to look
# for overlapping images (the search would list too many images).
_MAX_IMAGES_PER_AXIS = 64
# vesin drops pairs at exactly its cutoff: ask for slightly more so that d <= min_distance
# is decided here.
_CUTOFF_PAD = 1e-6
# Cutoff quoted in the thin-cell message (the demo configuration's).
_TYPICAL_CUTOFF = 6.0
# At most this many atom indices are listed in a message.
_MAX_LISTED = 10


class StructureError(ValueError):
    """A structure that no model can be evaluated on (the message names it and its atoms).

    ``path`` (None for structures in memory) and ``index`` (None for errors about a whole
    file or batch) hold where it is for programs.
    """

    def __init__(self, message: str, path: Optional[os.PathLike | str] = None, index: Optional[int] = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.index = index


def located_message(what: str, *, path: Optional[os.PathLike | str] = None, index: Optional[int] = None) -> str:
    """``"<path>: structure <index>: <what>"``, leaving out the parts that are None."""
    parts = [] if path is None else [str(path)]
    if index is not None:
        parts.append(f"structure {index}")
    return ": ".join(parts + [what])


def overlap_message(
    a: int, b: int, distance: float, shift: list[int] | None = None, *, min_distance: float = MIN_DISTANCE
) -> str:
    """The message for overlapping atoms ``a`` and ``b`` (indices within their structure);
    ``a == b`` means an atom and its periodic image at lattice ``shift``."""
    if a == b:
        what = f"atom {a} is {distance:.5f} Å from its own periodic image {list(shift or [])}"
    else:
        a, b = min(a, b), max(a, b)
        what = f"atoms {a} and {b} are {distance:.5f} Å apart"
    return f"{what} (overlapping atoms: distance <= {min_distance} Å)"


def _fmt_atoms(idx: Sequence[int]) -> str:
    idx = [int(i) for i in idx]
    text = ", ".join(str(i) for i in idx[:_MAX_LISTED])
    if len(idx) > _MAX_LISTED:
        text += f", ... ({len(idx)} in all)"
    return text


# ---------------------------------------------------------------------------- the rules
def element_problem(numbers: np.ndarray, max_atomic_number: Optional[int] = None) -> Optional[str]:
    """Atomic numbers outside ``1..max_atomic_number`` (1..118 if None), or None."""
    top = PERIODIC_TABLE_SIZE if max_atomic_number is None else int(max_atomic_number)
    numbers = np.asarray(numbers).reshape(-1)
    bad = np.flatnonzero((numbers < 1) | (numbers > top))
    if not bad.size:
        return None
    found = sorted({int(z) for z in numbers[bad]})
    return f"unknown element: atomic numbers {found} outside the element table 1..{top} for atoms {_fmt_atoms(bad)}"


def _positions_problem(positions: np.ndarray) -> Optional[str]:
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        return f"non-finite (NaN/inf) positions for atoms {_fmt_atoms(bad)}"
    bad = np.flatnonzero((np.abs(positions) > FLOAT32_MAX).any(axis=1))
    if bad.size:
        return f"positions not finite in float32 (|x| > {FLOAT32_MAX:.3g} Å) for atoms {_fmt_atoms(bad)}"
    return None


def cell_problem(cell: np.ndarray, pbc: np.ndarray) -> Optional[str]:
    """A non-finite cell, or a zero or linearly dependent vector on a periodic axis, or None.
    (The thickness rule is :func:`thickness_problem`; it comes after the overlap check.)"""
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if not np.isfinite(cell).all():
        return "cell has non-finite (NaN/inf) entries"
    if (np.abs(cell) > FLOAT32_MAX).any():
        return f"cell has entries not finite in float32 (|x| > {FLOAT32_MAX:.3g} Å)"
    if not pbc.any():
        return None
    zero = np.flatnonzero(pbc & (np.linalg.norm(cell, axis=1) <= ZERO_VECTOR_TOL))
    if zero.size:
        return f"singular cell: axis {int(zero[0])} is periodic (pbc={pbc.tolist()}) but its cell vector is zero"
    if periodic_cell_is_singular(cell, pbc):
        return (
            f"singular cell: the vectors of its periodic axes (pbc={pbc.tolist()}) are linearly dependent; "
            f"give every periodic axis an independent cell vector"
        )
    return None


def thickness_problem(cell: np.ndarray, pbc: np.ndarray) -> Optional[str]:
    """A periodic axis thinner than :data:`MIN_CELL_HEIGHT`, or None (for a cell that passed
    :func:`cell_problem`)."""
    pbc = np.asarray(pbc, dtype=bool)
    if not pbc.any():
        return None
    heights = periodic_heights(cell, pbc)
    k = int(np.argmin(heights))
    height = float(heights[k])
    if height >= MIN_CELL_HEIGHT:
        return None
    axis = int(np.flatnonzero(pbc)[k])
    images = "very many" if height <= 0 else f"about {round(2 * _TYPICAL_CUTOFF / height)}"
    return (
        f"cell too thin: {height:.3g} Å between opposite faces along periodic axis {axis} "
        f"(pbc={pbc.tolist()}), below {MIN_CELL_HEIGHT} Å; a neighbour search with a {_TYPICAL_CUTOFF:g} Å "
        f"cutoff would visit {images} periodic images along it. If the lattice is right, use a "
        f"reduced cell (ase.geometry.minkowski_reduce)"
    )


def _cells_suspect(cells: np.ndarray, pbcs: np.ndarray) -> np.ndarray:
    """[S] bool: which of the cells [S, 3, 3] (periodicity [S, 3]) may break a rule of
    :func:`cell_problem` or :func:`thickness_problem`, computed for all at once with the same
    functions (per distinct ``pbc``); those are then examined one by one."""
    cells = np.asarray(cells, dtype=np.float64)
    pbcs = np.asarray(pbcs, dtype=bool)
    with np.errstate(invalid="ignore"):
        suspect = ~np.isfinite(cells).all(axis=(1, 2)) | (np.abs(cells) > FLOAT32_MAX).any(axis=(1, 2))
    for pattern in {tuple(p) for p in pbcs[~suspect].tolist() if any(p)}:
        members = np.flatnonzero(~suspect & (pbcs == pattern).all(axis=1))
        group, pbc = cells[members], np.array(pattern)
        zero = (pbc & (np.linalg.norm(group, axis=2) <= ZERO_VECTOR_TOL)).any(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            bad = zero | periodic_cells_are_singular(group, pbc)
            bad |= periodic_heights_many(group, pbc).min(axis=1) < MIN_CELL_HEIGHT
        suspect[members] = bad
    return suspect


def overlap_problem(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, min_distance: float = MIN_DISTANCE
) -> Optional[str]:
    """Two atoms, or an atom and one of its periodic images, at most ``min_distance`` apart
    (the closest such pair is named), or None (for a cell that passed :func:`cell_problem`)."""
    import vesin

    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    cutoff = _OVERLAP_SEARCH_CUTOFF
    if pbc.any():
        # vesin lists every periodic image within the cutoff: keep the cutoff within a cell
        # height so that a thin cell cannot ask for millions of images.
        thinnest = float(periodic_heights(cell, pbc).min())
        if min_distance > _MAX_IMAGES_PER_AXIS * thinnest:
            return thickness_problem(cell, pbc)
        cutoff = min(cutoff, thinnest)
    cutoff = max(cutoff, min_distance) * (1.0 + _CUTOFF_PAD)
    nl = vesin.NeighborList(cutoff=cutoff, full_list=False, n_threads=1)
    box = cell if pbc.any() else np.zeros((3, 3))
    i, j, shift, d = nl.compute(positions, box, [bool(p) for p in pbc], quantities="ijSd")
    close = np.flatnonzero(d <= min_distance)
    if not close.size:
        return None
    k = close[np.argmin(d[close])]
    message = overlap_message(int(i[k]), int(j[k]), float(d[k]), shift[k].tolist(), min_distance=min_distance)
    return message + (f"; {close.size} such pairs in all" if close.size > 1 else "")


def target_problem(
    energy: Any,
    forces: Any,
    natoms: int,
    *,
    require_energy: bool = False,
    require_forces: bool = False,
    max_abs_force: Optional[float] = MAX_ABS_FORCE,
    max_abs_energy_per_atom: Optional[float] = MAX_ABS_ENERGY_PER_ATOM,
) -> Optional[str]:
    """A missing (if required), malformed, non-finite (also in float32) or implausible energy
    or force array of a structure of ``natoms`` atoms, or None. A bound of None is not checked."""
    if energy is None:
        if require_energy:
            return "no energy (required)"
    else:
        e = np.asarray(energy)
        if e.size != 1 or e.dtype.kind not in "iuf":
            return f"energy must be one number, got shape {e.shape} and dtype {e.dtype}"
        value = float(e.reshape(()))
        if not math.isfinite(value):
            return f"non-finite energy ({value})"
        if abs(value) > FLOAT32_MAX:
            return f"energy {value:.4g} eV is not finite in float32 (|E| > {FLOAT32_MAX:.3g}), the precision models train in"
        per_atom = abs(value) / max(natoms, 1)
        if max_abs_energy_per_atom is not None and per_atom > max_abs_energy_per_atom:
            return (
                f"implausible energy {value:.4g} eV ({per_atom:.3g} eV/atom in magnitude, above the bound of "
                f"{max_abs_energy_per_atom:g} eV/atom: max_abs_energy_per_atom, --max-energy-per-atom)"
            )
    if forces is None:
        return "no forces (required)" if require_forces else None
    f = np.asarray(forces)
    if f.shape != (natoms, 3) or f.dtype.kind not in "iuf":
        return f"forces have shape {f.shape} (dtype {f.dtype}), expected ({natoms}, 3)"
    bad = np.flatnonzero(~np.isfinite(f).all(axis=1))
    if bad.size:
        return f"non-finite (NaN/inf) forces for atoms {_fmt_atoms(bad)}"
    magnitude = np.abs(f.astype(np.float64))
    bad = np.flatnonzero((magnitude > FLOAT32_MAX).any(axis=1))
    if bad.size:
        return f"forces not finite in float32 (|F| > {FLOAT32_MAX:.3g} eV/Å) for atoms {_fmt_atoms(bad)}"
    if max_abs_force is not None:
        bad = np.flatnonzero((magnitude > max_abs_force).any(axis=1))
        if bad.size:
            return (
                f"implausible forces for atoms {_fmt_atoms(bad)} (largest component {float(magnitude.max()):.4g} eV/Å, "
                f"above the bound of {max_abs_force:g} eV/Å: max_abs_force, --max-force)"
            )
    return None


def _problem(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    targets: Optional[dict],
    *,
    max_atomic_number: Optional[int],
    check_overlaps: bool,
    min_distance: float,
) -> Optional[str]:
    """The first rule a structure breaks (see the module docstring for the order); targets
    (keyword arguments of :func:`target_problem` plus ``energy`` and ``forces``) are checked
    when given."""
    numbers = np.asarray(numbers).reshape(-1)
    n = numbers.shape[0]
    if n == 0:
        return "no atoms"
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (n, 3):
        return f"positions have shape {positions.shape}, expected ({n}, 3)"
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    if cell.shape != (3, 3) or pbc.shape != (3,):
        return f"cell has shape {cell.shape} and pbc {pbc.shape}, expected (3, 3) and (3,)"
    problem = element_problem(numbers, max_atomic_number) or _positions_problem(positions) or cell_problem(cell, pbc)
    if problem is None and targets is not None:
        targets = dict(targets)
        problem = target_problem(targets.pop("energy", None), targets.pop("forces", None), n, **targets)
    if problem is None and check_overlaps and min_distance > 0:
        problem = overlap_problem(positions, cell, pbc, min_distance)
    return problem or thickness_problem(cell, pbc)


def structure_problem(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    *,
    max_atomic_number: Optional[int] = None,
    check_overlaps: bool = True,
    min_distance: float = MIN_DISTANCE,
) -> Optional[str]:
    """What is wrong with the structure given by ``numbers`` [N], ``positions`` [N, 3],
    ``cell`` [3, 3] and ``pbc`` [3] (the first rule broken, as a message without the
    "structure <i>" prefix), or None if it is fine. Targets are not looked at."""
    return _problem(
        numbers, positions, cell, pbc, None,
        max_atomic_number=max_atomic_number, check_overlaps=check_overlaps, min_distance=min_distance,
    )


def atoms_problem(
    atoms: "ase.Atoms",
    *,
    require_energy: bool = False,
    require_forces: bool = False,
    max_atomic_number: Optional[int] = None,
    check_overlaps: bool = True,
    min_distance: float = MIN_DISTANCE,
    max_abs_force: Optional[float] = MAX_ABS_FORCE,
    max_abs_energy_per_atom: Optional[float] = MAX_ABS_ENERGY_PER_ATOM,
) -> Optional[str]:
    """What is wrong with ``atoms`` and the energy/forces stored on its calculator (never
    triggering a calculation), or None."""
    results = dict(getattr(atoms.calc, "results", None) or {})
    targets = dict(
        energy=results.get("energy"),
        forces=results.get("forces"),
        require_energy=require_energy,
        require_forces=require_forces,
        max_abs_force=max_abs_force,
        max_abs_energy_per_atom=max_abs_energy_per_atom,
    )
    return _problem(
        atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, targets,
        max_atomic_number=max_atomic_number, check_overlaps=check_overlaps, min_distance=min_distance,
    )


def validate_atoms(
    atoms: "ase.Atoms",
    *,
    path: Optional[os.PathLike | str] = None,
    index: Optional[int] = None,
    **options: Any,
) -> None:
    """Raise :class:`StructureError` ("<path>: structure <index>: ...") if :func:`atoms_problem`
    (given ``options``) finds something wrong with ``atoms``."""
    problem = atoms_problem(atoms, **options)
    if problem is not None:
        raise StructureError(located_message(problem, path=path, index=index), path, index)


# ---------------------------------------------------------------------------- batches
def _check_layout(batch: "AtomicBatch") -> None:
    """Shapes, natoms and the batch index (errors about the batch as a whole)."""
    import torch

    n, s = batch.num_atoms, batch.num_structures
    if batch.positions.dim() != 2 or batch.positions.shape[1] != 3:
        raise StructureError(f"positions must have shape [N, 3], got {tuple(batch.positions.shape)}")
    expect = {
        "positions": (n, 3),
        "atomic_numbers": (n,),
        "cell": (s, 3, 3),
        "pbc": (s, 3),
        "natoms": (s,),
        "batch": (n,),
        "fixed": (n,),
        "tags": (n,),
        "energy": (s,),
        "forces": (n, 3),
    }
    for name, shape in expect.items():
        t = getattr(batch, name)
        if t is not None and tuple(t.shape) != shape:
            raise StructureError(
                f"{name} has shape {tuple(t.shape)}, expected {shape} for {s} structures with {n} atoms in all"
            )
    natoms = batch.natoms.detach().cpu()
    empty = torch.nonzero(natoms <= 0).flatten().tolist()
    if empty:
        raise StructureError(located_message("no atoms", index=empty[0]), index=empty[0])
    if int(natoms.sum()) != n:
        raise StructureError(f"natoms sums to {int(natoms.sum())} but there are {n} atoms")
    if batch.batch.device.type == "cpu":
        # numpy: torch's parallel repeat_interleave took ~20 ms on two busy cores
        expected = torch.from_numpy(np.repeat(np.arange(s), natoms.numpy()))
    else:
        expected = torch.repeat_interleave(torch.arange(s, device=batch.batch.device), batch.natoms.to(batch.batch.device))
    if not torch.equal(batch.batch, expected.to(batch.batch.dtype)):
        raise StructureError("batch index does not match natoms (atoms must be grouped by structure, in order)")


def validate_batch(
    batch: "AtomicBatch",
    *,
    max_atomic_number: int | None = None,
    check_overlaps: bool = False,
    min_distance: float = MIN_DISTANCE,
) -> None:
    """Raise :class:`StructureError` ("structure <i>: <what>", ``index`` = i) for a batch no
    model can be evaluated on: malformed shapes, an empty structure, atomic numbers outside
    ``1..max_atomic_number`` (the model's element table; 1..118 if None), non-finite positions,
    cell or targets (also in float32), zero or dependent periodic cell vectors, a periodic axis
    thinner than :data:`MIN_CELL_HEIGHT`, and with ``check_overlaps`` overlapping atoms (the
    radius graph reports those itself, so models leave it off). Target plausibility bounds are
    the readers' business and not checked here.

    Atom-level checks run on the batch's device (a few small synchronisations), cells are
    checked on the CPU all at once; structures are examined one by one (on the CPU, with the
    rules of :func:`structure_problem`, so the messages are the readers') only when suspect,
    or all of them with ``check_overlaps``. About 1 ms for 32 slabs of 37 atoms on a CPU.
    """
    import torch

    _check_layout(batch)
    s_count = batch.num_structures
    top = PERIODIC_TABLE_SIZE if max_atomic_number is None else int(max_atomic_number)
    z = batch.atomic_numbers.detach()
    positions = batch.positions.detach()
    bad_atom = (z < 1) | (z > top) | ~torch.isfinite(positions).all(dim=1) | (positions.abs() > FLOAT32_MAX).any(dim=1)
    if batch.forces is not None:
        forces = batch.forces.detach()
        bad_atom |= ~torch.isfinite(forces).all(dim=1) | (forces.abs() > FLOAT32_MAX).any(dim=1)
    counts = torch.zeros(s_count, dtype=torch.long, device=bad_atom.device)
    bad = counts.index_add(0, batch.batch.to(bad_atom.device), bad_atom.long()) > 0
    if batch.energy is not None:
        energy = batch.energy.detach().to(bad.device)
        bad |= ~torch.isfinite(energy) | (energy.abs() > FLOAT32_MAX)
    cells = batch.cell.detach().cpu().to(torch.float64).numpy()
    pbcs = batch.pbc.detach().cpu().numpy().astype(bool)
    suspect = bad.cpu().numpy() | _cells_suspect(cells, pbcs) | check_overlaps
    ends = np.cumsum(batch.natoms.detach().cpu().numpy())
    for s in np.flatnonzero(suspect).tolist():
        lo, hi = (int(ends[s - 1]) if s else 0), int(ends[s])
        targets = dict(
            energy=None if batch.energy is None else batch.energy[s].item(),
            forces=None if batch.forces is None else batch.forces[lo:hi].detach().cpu().double().numpy(),
            max_abs_force=None,
            max_abs_energy_per_atom=None,
        )
        problem = _problem(
            z[lo:hi].cpu().numpy(),
            positions[lo:hi].cpu().double().numpy(),
            cells[s],
            pbcs[s],
            targets,
            max_atomic_number=top,
            check_overlaps=check_overlaps,
            min_distance=min_distance,
        )
        if problem is not None:
            raise StructureError(located_message(problem, index=s), index=s)
