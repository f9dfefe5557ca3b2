"""Small test structures for the property suite, built with ASE only (no files, no randomness
beyond seeded rattles).

A :class:`Structure` is an ASE ``Atoms`` with a name and one flag: ``symmetric`` marks an
unrattled crystal whose neighbours come in exactly tied shells. The exact properties run on the
other structures; on symmetric ones the suite measures how far a model's tie rule (e.g. a
neighbour cap that breaks ties by atom order) breaks permutation and supercell consistency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule
from ase.constraints import FixAtoms

__all__ = ["Structure", "default_structures", "symmetric_crystal"]


@dataclass(frozen=True)
class Structure:
    """A named test structure.

    Attributes:
        name: shown in reports.
        atoms: the structure (never modified by the suite: properties work on copies).
        symmetric: ``True`` for an unrattled crystal with exactly tied neighbour shells.
    """

    name: str
    atoms: Atoms
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.atoms, Atoms):
            raise TypeError(f"Structure {self.name!r}: atoms must be an ase.Atoms, got {type(self.atoms).__name__}")
        if len(self.atoms) == 0:
            raise ValueError(f"Structure {self.name!r} has no atoms")

    @property
    def periodic_axes(self) -> np.ndarray:
        """``[3]`` bool, the periodic cell axes."""
        return np.asarray(self.atoms.pbc, dtype=bool)

    @property
    def fully_periodic(self) -> bool:
        """Periodic along all three axes (stress is defined)."""
        return bool(self.periodic_axes.all())

    @property
    def num_atoms(self) -> int:
        return len(self.atoms)


def _slab_with_adsorbate() -> Atoms:
    """Cu(111) 2x2x3, OH in the fcc hollow, bottom layer fixed, periodic along all axes with
    vacuum (the OC20 convention), rattled."""
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.25, "fcc")
    add_adsorbate(slab, "H", 2.2, "fcc")
    slab.pbc = True
    # Rattle first: ASE's rattle respects constraints, and an unrattled fixed layer would keep
    # exactly tied distances (a symmetric structure in disguise).
    slab.rattle(0.06, seed=11)
    # ASE numbers the layers from the top (1) down: layer 3 is the bottom one.
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
    return slab


def _rattled_bulk() -> Atoms:
    """A sheared, rattled Cu3Au-like fcc cell (4 atoms, triclinic: stress sees every strain)."""
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True)
    atoms.numbers[0] = 79
    cell = atoms.cell.array.copy()
    cell[1] += 0.15 * cell[0]
    cell[2] += 0.1 * cell[0] - 0.12 * cell[1]
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.08, seed=12)
    return atoms


def _molecule() -> Atoms:
    """Methanol in vacuum (no cell, no periodicity), rattled."""
    atoms = molecule("CH3OH")
    atoms.rattle(0.03, seed=13)
    return atoms


def _isolated_atom() -> Atoms:
    """One Cu atom in vacuum, off the origin."""
    return Atoms("Cu", positions=[[0.3, -0.7, 1.1]])


def _slab_2d() -> Atoms:
    """Pt(100) 2x2x2 periodic along a and b only, with a zero c vector (valid ASE input),
    rattled."""
    slab = fcc100("Pt", size=(2, 2, 2), vacuum=5.0)
    slab.pbc = [True, True, False]
    cell = slab.cell.array.copy()
    cell[2] = 0.0
    slab.set_cell(cell)
    slab.rattle(0.06, seed=14)
    return slab


def symmetric_crystal(lattice_constant: float = 2.875, repeat: tuple[int, int, int] = (2, 2, 1)) -> Atoms:
    """An unrattled bcc Fe crystal (the conventional cell repeated): every neighbour shell is
    exactly tied. The shells hold 8, 6, 12, 24, 8, ... neighbours (cumulative 8, 14, 26, 50,
    58), so a cut at rank 12 (SCN's two resolutions) splits the second shell, and a neighbour
    cap of 16 or 20 (the small configs, the official default) splits the third.

    The default lattice constant is a dyadic number (23/8 Å) so that positions, and hence the
    tied distances, are exact in binary floating point: the ties are bitwise, not within
    rounding, so a tie rule decides them rather than rounding noise.
    """
    return bulk("Fe", "bcc", a=lattice_constant, cubic=True).repeat(repeat)


def default_structures(include_symmetric: bool = True) -> list[Structure]:
    """The suite's default structures: a rattled periodic slab with an adsorbate and a
    ``FixAtoms`` constraint, a rattled triclinic bulk cell, a molecule in vacuum, an isolated
    atom, a 2-D slab with a zero third cell vector, and (``include_symmetric``) an unrattled bcc
    crystal whose shells are exactly tied.
    """
    out = [
        Structure("slab+OH", _slab_with_adsorbate()),
        Structure("bulk", _rattled_bulk()),
        Structure("molecule", _molecule()),
        Structure("atom", _isolated_atom()),
        Structure("slab_2d", _slab_2d()),
    ]
    if include_symmetric:
        out.append(Structure("bcc_symmetric", symmetric_crystal(), symmetric=True))
    return out
