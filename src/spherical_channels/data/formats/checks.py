"""Per-structure validation of what a reader returns: the rules of
:mod:`spherical_channels.data.validation`, raised as a :class:`DataError` that names the file,
the structure and, where it applies, the atoms (so that a bad structure in a
million-structure dataset can be found).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from ..validation import (
    DEFAULT_MAX_ATOMIC_NUMBER,
    MAX_ABS_ENERGY_PER_ATOM,
    MAX_ABS_FORCE,
    MIN_DISTANCE,
    atoms_problem,
)
from .common import located

if TYPE_CHECKING:
    import ase

__all__ = ["check_structure", "DEFAULT_MAX_ATOMIC_NUMBER", "DEFAULT_MIN_DISTANCE"]

#: Atoms at or closer than this (Angstrom) overlap: the one rule of the validation layer.
DEFAULT_MIN_DISTANCE = MIN_DISTANCE


def check_structure(
    atoms: "ase.Atoms",
    path: os.PathLike | str,
    index: int,
    *,
    require_energy: bool = False,
    require_forces: bool = False,
    max_atomic_number: int = DEFAULT_MAX_ATOMIC_NUMBER,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    max_abs_force: Optional[float] = MAX_ABS_FORCE,
    max_abs_energy_per_atom: Optional[float] = MAX_ABS_ENERGY_PER_ATOM,
) -> None:
    """Raise :class:`DataError` ("<path>: structure <index>: ...") if ``atoms`` breaks a rule
    of :func:`~spherical_channels.data.validation.atoms_problem`: no atoms, unknown elements,
    non-finite positions or cell, a singular or too thin periodic cell, missing (if required),
    malformed, non-finite or implausible energy/forces, or atoms (or an atom and a periodic
    image) at most ``min_distance`` Angstrom apart (``min_distance <= 0`` skips that search)."""
    problem = atoms_problem(
        atoms,
        require_energy=require_energy,
        require_forces=require_forces,
        max_atomic_number=max_atomic_number,
        check_overlaps=min_distance > 0,
        min_distance=min_distance,
        max_abs_force=max_abs_force,
        max_abs_energy_per_atom=max_abs_energy_per_atom,
    )
    if problem is not None:
        raise located(path, index, problem)
