"""Cells of partly periodic structures: which ones are usable, and making them invertible."""

from __future__ import annotations

import numpy as np

__all__ = [
    "SINGULAR_REL_TOL",
    "ZERO_VECTOR_TOL",
    "complete_cell",
    "periodic_cell_is_singular",
    "periodic_cells_are_singular",
    "periodic_heights",
    "periodic_heights_many",
]

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
    return bool(periodic_cells_are_singular(np.asarray(cell)[None], pbc, tol)[0])


def periodic_cells_are_singular(cells: np.ndarray, pbc: np.ndarray, tol: float = SINGULAR_REL_TOL) -> np.ndarray:
    """[S] bool: :func:`periodic_cell_is_singular` for cells [S, 3, 3] sharing one ``pbc``."""
    rows = np.asarray(cells, dtype=np.float64)[:, np.asarray(pbc, dtype=bool)]  # [S, P, 3]
    if rows.shape[1] == 0:
        return np.zeros(len(rows), dtype=bool)
    gram = np.linalg.det(rows @ rows.transpose(0, 2, 1))
    return gram <= (tol * np.prod(np.linalg.norm(rows, axis=2), axis=1)) ** 2


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


def periodic_heights(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """[P] for each periodic axis (in axis order): the distance between the cell's opposite
    faces along it, within the lattice of the periodic axes alone, i.e. the distance from its
    vector to the span of the other periodic vectors (its length when it is the only periodic
    axis). Non-periodic vectors do not count: a slab's third vector may be anything.

    The image search of a neighbour list visits about ``2 * cutoff / height`` images along each
    periodic axis."""
    return periodic_heights_many(np.asarray(cell)[None], pbc)[0]


def periodic_heights_many(cells: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """[S, P]: :func:`periodic_heights` for cells [S, 3, 3] sharing one ``pbc``."""
    rows = np.asarray(cells, dtype=np.float64)[:, np.asarray(pbc, dtype=bool)]  # [S, P, 3]
    count, p = rows.shape[:2]
    if p == 0:
        return np.zeros((count, 0))
    gram = rows @ rows.transpose(0, 2, 1)
    full = np.maximum(np.linalg.det(gram), 0.0)
    heights = np.zeros((count, p))
    for k in range(p):
        others = [m for m in range(p) if m != k]
        minor = np.linalg.det(gram[:, others][:, :, others]) if others else np.ones(count)
        ok = minor > 0
        heights[ok, k] = np.sqrt(full[ok] / minor[ok])
    return heights
