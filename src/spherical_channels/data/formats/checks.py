"""Cheap per-structure validation, run on every structure a dataset returns.

Each check raises a :class:`DataError` naming the file, the structure and, where it
applies, the atoms, so that a bad structure in a million-structure dataset can be found.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..cells import ZERO_VECTOR_TOL, complete_cell, periodic_cell_is_singular

from .common import located, stored_results

if TYPE_CHECKING:
    import ase

__all__ = ["check_structure", "DEFAULT_MAX_ATOMIC_NUMBER", "DEFAULT_MIN_DISTANCE"]

#: Largest atomic number accepted by default (89 = Ac, the last element in OC20-style
#: embeddings of 90 rows, which start at 0).
DEFAULT_MAX_ATOMIC_NUMBER = 89
#: Atoms closer than this (Angstrom) overlap; the same threshold the radius graph uses.
DEFAULT_MIN_DISTANCE = 0.01
# The overlap search asks vesin for pairs within this distance (Angstrom) and filters:
# vesin's cell list uses bins of about the cutoff, so a 0.01 A cutoff makes it ~200x
# slower (12 ms instead of 60 us for an 80-atom slab) while pairs < 2 A are few.
_OVERLAP_SEARCH_CUTOFF = 2.0
# A cell thinner than min_distance / this along a periodic axis is rejected outright
# (the image search would list too many images).
_MAX_IMAGES_PER_AXIS = 64
# At most this many atom indices are listed in a message.
_MAX_LISTED = 10


def _fmt_atoms(idx: Sequence[int]) -> str:
    idx = [int(i) for i in idx]
    text = ", ".join(str(i) for i in idx[:_MAX_LISTED])
    if len(idx) > _MAX_LISTED:
        text += f", ... ({len(idx)} in all)"
    return text


def check_structure(
    atoms: "ase.Atoms",
    path: os.PathLike | str,
    index: int,
    *,
    require_energy: bool = False,
    require_forces: bool = False,
    max_atomic_number: int = DEFAULT_MAX_ATOMIC_NUMBER,
    min_distance: float = DEFAULT_MIN_DISTANCE,
) -> None:
    """Raise :class:`DataError` ("<path>: structure <index>: ...") if ``atoms`` is
    malformed: no atoms, missing or non-finite or mis-shaped energy/forces, non-finite
    positions or cell, unknown elements, a singular periodic cell, or two atoms (or an
    atom and a periodic image) closer than ``min_distance`` Angstrom."""

    def fail(what: str) -> None:
        raise located(path, index, what)

    n = len(atoms)
    if n == 0:
        fail("no atoms")
    _check_numbers(atoms.numbers, max_atomic_number, fail)
    positions = atoms.positions
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        fail(f"non-finite (NaN/inf) positions for atoms {_fmt_atoms(bad)}")
    _check_targets(stored_results(atoms), n, require_energy, require_forces, fail)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    _check_cell(cell, pbc, fail)
    if min_distance > 0:
        _check_overlaps(positions, cell, pbc, min_distance, fail)


def _check_numbers(numbers: np.ndarray, max_atomic_number: int, fail) -> None:
    bad = np.flatnonzero((numbers < 1) | (numbers > max_atomic_number))
    if bad.size:
        found = sorted({int(z) for z in numbers[bad]})
        fail(
            f"unknown element: atomic numbers {found} outside 1..{max_atomic_number} "
            f"for atoms {_fmt_atoms(bad)}"
        )


def _check_targets(results: dict, n: int, require_energy: bool, require_forces: bool, fail) -> None:
    energy = results.get("energy")
    if energy is None:
        if require_energy:
            fail("no energy (required)")
    else:
        e = np.asarray(energy)
        if e.size != 1 or not np.issubdtype(e.dtype, np.number):
            fail(f"energy must be one number, got shape {e.shape} and dtype {e.dtype}")
        if not np.isfinite(e).all():
            fail(f"non-finite energy ({float(e.reshape(()))})")
    forces = results.get("forces")
    if forces is None:
        if require_forces:
            fail("no forces (required)")
        return
    f = np.asarray(forces)
    if f.shape != (n, 3) or not np.issubdtype(f.dtype, np.number):
        fail(f"forces have shape {f.shape} (dtype {f.dtype}), expected ({n}, 3)")
    bad = np.flatnonzero(~np.isfinite(f).all(axis=1))
    if bad.size:
        fail(f"non-finite (NaN/inf) forces for atoms {_fmt_atoms(bad)}")


def _check_cell(cell: np.ndarray, pbc: np.ndarray, fail) -> None:
    if not np.isfinite(cell).all():
        fail("cell has non-finite (NaN/inf) entries")
    if not pbc.any():
        return
    norms = np.linalg.norm(cell, axis=1)
    zero = np.flatnonzero(pbc & (norms <= ZERO_VECTOR_TOL))
    if zero.size:
        fail(f"singular cell: axis {int(zero[0])} is periodic (pbc={pbc.tolist()}) but its cell vector is zero")
    # As AtomicBatch.validate: the periodic cell vectors must be independent (a slab may be
    # periodic in x and y only, with a zero or arbitrary third vector).
    if periodic_cell_is_singular(cell, pbc):
        fail(f"singular cell: the vectors of its periodic axes (pbc={pbc.tolist()}) are linearly dependent")


def _cell_heights(cell: np.ndarray) -> np.ndarray:
    """[3] distances between opposite faces of the cell (Angstrom)."""
    volume = abs(float(np.linalg.det(cell)))
    areas = np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    return volume / areas


def _check_overlaps(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, min_distance: float, fail) -> None:
    import vesin

    cutoff = _OVERLAP_SEARCH_CUTOFF
    if pbc.any():
        # vesin lists every periodic image within the cutoff: keep the cutoff within a
        # cell height so that a tiny cell cannot ask for millions of images.
        heights = _cell_heights(complete_cell(cell, pbc))[pbc]  # a 2-D slab's third vector may be 0
        thinnest = float(heights.min())
        if min_distance > _MAX_IMAGES_PER_AXIS * thinnest:
            fail(
                f"cell is only {thinnest:.3g} Å thick along a periodic axis "
                f"(pbc={pbc.tolist()}); atoms overlap their periodic images"
            )
        cutoff = min(cutoff, thinnest)
    cutoff = max(cutoff, min_distance)
    nl = vesin.NeighborList(cutoff=cutoff, full_list=False, n_threads=1)
    box = cell if pbc.any() else np.zeros((3, 3))
    i, j, shift, d = nl.compute(
        np.ascontiguousarray(positions, dtype=np.float64), box, [bool(p) for p in pbc], quantities="ijSd"
    )
    close = np.flatnonzero(d < min_distance)
    if not close.size:
        return
    k = close[np.argmin(d[close])]
    a, b, dist = int(i[k]), int(j[k]), float(d[k])
    more = f"; {close.size} such pairs in all" if close.size > 1 else ""
    if a == b:
        fail(
            f"atom {a} is {dist:.5f} Å from its own periodic image {shift[k].tolist()} "
            f"(overlapping atoms; the cell is too small){more}"
        )
    a, b = min(a, b), max(a, b)
    fail(f"atoms {a} and {b} are {dist:.5f} Å apart (overlapping atoms){more}")

