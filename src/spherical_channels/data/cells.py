"""Cells of partly periodic structures: which ones are usable, and making them invertible."""

from __future__ import annotations

import numpy as np

__all__ = ["SINGULAR_REL_TOL", "ZERO_VECTOR_TOL", "complete_cell", "periodic_cell_is_singular"]

# Relative volume below which cell vectors count as linearly dependent.
SINGULAR_REL_TOL = 1e-6
# Cell vectors shorter than this (Angstrom) count as zero.
ZERO_VECTOR_TOL = 1e-6


def periodic_cell_is_singular(cell: np.ndarray, pbc: np.ndarray, tol: float = SINGULAR_REL_TOL) -> bool:
    """Whether the cell vectors of the periodic axes are (nearly) linearly dependent: the
    Gram determinant of those rows is at most ``tol^2`` times the squared product of their
    lengths (scale-free; for three periodic axes this is ``|det| <= tol * |a||b||c|``). Vectors
    of non-periodic axes do not matter: a slab may be periodic in x and y only, with a zero
    third vector."""
    rows = np.asarray(cell, dtype=np.float64)[np.asarray(pbc, dtype=bool)]
    if len(rows) == 0:
        return False
    gram = np.linalg.det(rows @ rows.T)
    return bool(gram <= (tol * float(np.prod(np.linalg.norm(rows, axis=1)))) ** 2)


def complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The cell, with non-periodic rows replaced where needed so that it is invertible.

    Only fractional coordinates along periodic axes are used (for wrapping and for the
    image range), so a non-periodic row may be any vector independent of the others; an
    orthonormal complement of the periodic rows keeps the periodic reciprocal vectors those
    of the periodic lattice alone.
    """
    cell = np.array(cell, dtype=np.float64)
    if abs(np.linalg.det(cell)) > 1e-12 * max(1.0, np.prod(np.linalg.norm(cell, axis=1))):
        return cell
    # orthonormal basis of the periodic vectors' span (Gram-Schmidt)
    ortho: list[np.ndarray] = []
    for k in range(3):
        if pbc[k]:
            v = cell[k] - sum(np.dot(cell[k], q) * q for q in ortho)
            ortho.append(v / np.linalg.norm(v))
    for k in range(3):
        if pbc[k]:
            continue
        # the first coordinate axis with a component outside the span so far
        for axis in np.eye(3):
            v = axis - sum(np.dot(axis, q) * q for q in ortho)
            if np.linalg.norm(v) > 1e-6:
                break
        cell[k] = v / np.linalg.norm(v)
        ortho.append(cell[k])
    return cell
