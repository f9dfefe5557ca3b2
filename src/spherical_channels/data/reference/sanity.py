"""Sanity checks on relaxed adsorbate+slab systems: desorption and fragmentation.

Both checks use covalent radii (``ase.data.covalent_radii``) and minimum-image
distances, so they work across periodic boundaries.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.geometry import get_distances

from .catalysts import TAG_ADSORBATE

__all__ = [
    "BOND_TOLERANCE",
    "DESORPTION_FACTOR",
    "DROP_REASONS",
    "adsorbate_bonds",
    "drop_reason",
    "is_broken",
    "is_desorbed",
]

# Two adsorbate atoms are bonded if closer than (1 + BOND_TOLERANCE) times the sum of
# their covalent radii. 0.25 keeps every template bond (C-H 1.09 A vs 1.07 A radii sum)
# and separates bonded from non-bonded pairs (e.g. H...H across NH3 ~1.6 A > 1.3 A).
BOND_TOLERANCE = 0.3
# The adsorbate is still bound if some adsorbate atom is within DESORPTION_FACTOR times
# the covalent radii sum of some slab atom (OC20's anomaly detection uses 1.5 as well).
DESORPTION_FACTOR = 1.5

DROP_REASONS = ("not_converged", "desorbed", "broken")


def _adsorbate_indices(atoms: Atoms) -> np.ndarray:
    idx = np.flatnonzero(atoms.get_tags() == TAG_ADSORBATE)
    if len(idx) == 0:
        raise ValueError("no adsorbate atoms (tag 2) in the structure")
    return idx


def _distances(atoms: Atoms, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Minimum-image distances between atoms ``a`` and ``b``, [len(a), len(b)]."""
    _, dist = get_distances(atoms.positions[a], atoms.positions[b], cell=atoms.cell, pbc=atoms.pbc)
    return dist


def adsorbate_bonds(atoms: Atoms) -> frozenset[tuple[int, int]]:
    """Bonds (i, j), i < j, between adsorbate atoms, as indices into the adsorbate (tag 2) atoms."""
    ads = _adsorbate_indices(atoms)
    dist = _distances(atoms, ads, ads)
    radii = covalent_radii[atoms.numbers[ads]]
    bonded = dist < (1.0 + BOND_TOLERANCE) * (radii[:, None] + radii[None, :])
    return frozenset((int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(bonded, k=1))))


def _is_connected(num_nodes: int, bonds: frozenset[tuple[int, int]]) -> bool:
    """Whether the graph on ``num_nodes`` nodes with edges ``bonds`` is connected."""
    seen, stack = {0}, [0]
    while stack:
        node = stack.pop()
        for i, j in bonds:
            other = j if i == node else i if j == node else None
            if other is not None and other not in seen:
                seen.add(other)
                stack.append(other)
    return len(seen) == num_nodes


def is_desorbed(atoms: Atoms) -> bool:
    """True if no adsorbate atom is within bonding distance of any slab atom."""
    ads = _adsorbate_indices(atoms)
    slab = np.flatnonzero(atoms.get_tags() != TAG_ADSORBATE)
    dist = _distances(atoms, ads, slab)
    radii = covalent_radii[atoms.numbers]
    cutoff = DESORPTION_FACTOR * (radii[ads][:, None] + radii[slab][None, :])
    return not bool((dist < cutoff).any())


def is_broken(atoms: Atoms, reference: Atoms | None = None) -> bool:
    """True if the adsorbate fell apart or rearranged.

    Broken means its bond graph is disconnected, or differs from the bond graph of
    ``reference`` (e.g. the initial structure: an H hopped from C to O) when given.
    """
    bonds = adsorbate_bonds(atoms)
    if not _is_connected(len(_adsorbate_indices(atoms)), bonds):
        return True
    return reference is not None and bonds != adsorbate_bonds(reference)


def drop_reason(initial: Atoms, relaxed: Atoms, converged: bool) -> str | None:
    """Why a relaxed system is dropped (first of ``DROP_REASONS`` that applies), or None to keep it."""
    if not converged:
        return "not_converged"
    if is_desorbed(relaxed):
        return "desorbed"
    if is_broken(relaxed, reference=initial):
        return "broken"
    return None
