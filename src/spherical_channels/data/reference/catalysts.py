"""Catalyst slabs: fcc metals and binary alloys with OC20 tags and fixed bottom layers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc111, fcc211
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.data import atomic_numbers, reference_states

__all__ = [
    "CATALYSTS",
    "FACETS",
    "Catalyst",
    "Slab",
    "build_slab",
    "emt_lattice_constant",
    "TAG_SUBSURFACE",
    "TAG_SURFACE",
    "TAG_ADSORBATE",
]

# OC20 tag convention.
TAG_SUBSURFACE = 0
TAG_SURFACE = 1
TAG_ADSORBATE = 2

# Vacuum added on each side of the slab (Angstrom): a 2 * 7 = 14 A gap along z, wide
# enough that neither EMT nor an SCN radius graph (cutoff <= 8 A, minus the adsorbate
# height) couples a slab to its periodic image across the vacuum.
VACUUM = 7.0
# Layers at the top of the slab that relax (tag 1); the ones below are fixed (tag 0).
NUM_FREE_LAYERS = 2
# The lattice-constant fit samples E(a) at a0 * (1 + s) for s in +-this range ...
_FIT_STRAIN = 0.03
# ... at this many points, and fits a parabola (EMT is smooth there).
_FIT_POINTS = 7
# fcc211 slabs are one step unit wide: 3 atom rows across the step (ase.build needs
# a multiple of 3), about as wide as 2-3 atoms of a (111) or (100) slab.
_STEP_WIDTH_211 = 3

FACETS: dict[str, Callable[..., Atoms]] = {"111": fcc111, "100": fcc100, "211": fcc211}


@dataclass(frozen=True)
class Catalyst:
    """An fcc catalyst: a pure metal (``solute is None``) or a binary substitutional alloy.

    Attributes:
        name: label written to ``info["catalyst"]`` (e.g. ``"Cu"``, ``"CuPd"``, ``"Cu3Au"``).
        host: element of the fcc lattice before substitution.
        solute: substituted element, or None for a pure metal.
        solute_fraction: fraction of slab atoms that are ``solute`` (exact, rounded).
        pattern: ``"random"`` (seeded random substitution) or ``"layered"``
            (alternating atomic planes parallel to the surface, an L1_0/L1_1-like order).
    """

    name: str
    host: str
    solute: str | None = None
    solute_fraction: float = 0.0
    pattern: str = "random"

    @property
    def elements(self) -> tuple[str, ...]:
        """Elements of the catalyst."""
        return (self.host,) if self.solute is None else (self.host, self.solute)


_METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
_ALLOYS = (
    Catalyst("CuPd", "Cu", "Pd", 0.5, "random"),
    Catalyst("AuAg", "Au", "Ag", 0.5, "layered"),
    Catalyst("Cu3Au", "Cu", "Au", 0.25, "random"),
    Catalyst("NiPt", "Ni", "Pt", 0.5, "layered"),
)
CATALYSTS: dict[str, Catalyst] = {
    **{m: Catalyst(m, m) for m in _METALS},
    **{c.name: c for c in _ALLOYS},
}


@dataclass
class Slab:
    """A built slab and the indices of its topmost atomic layer (where adsorbates bind)."""

    atoms: Atoms
    top_layer: np.ndarray


@lru_cache(maxsize=None)
def emt_lattice_constant(symbol: str) -> float:
    """Equilibrium fcc lattice constant (Angstrom) of ``symbol`` under ASE's EMT.

    A parabola fitted to E(a) around ASE's tabulated reference value: slabs built with
    it are unstrained for EMT, so relaxations move the adsorbate, not the metal.
    """
    state = reference_states[atomic_numbers[symbol]]
    if state is None or state.get("symmetry") != "fcc":
        raise ValueError(f"{symbol} is not an fcc metal in ase.data.reference_states")
    a0 = float(state["a"])
    lattice = a0 * (1.0 + np.linspace(-_FIT_STRAIN, _FIT_STRAIN, _FIT_POINTS))
    energies = []
    for a in lattice:
        atoms = bulk(symbol, "fcc", a=a)
        atoms.calc = EMT()
        energies.append(atoms.get_potential_energy())
    c2, c1, _ = np.polyfit(lattice, energies, 2)
    return float(-c1 / (2.0 * c2))


def catalyst_lattice_constant(catalyst: Catalyst) -> float:
    """Lattice constant of a catalyst: Vegard's law over the EMT constants of its elements."""
    a_host = emt_lattice_constant(catalyst.host)
    if catalyst.solute is None:
        return a_host
    x = catalyst.solute_fraction
    return (1.0 - x) * a_host + x * emt_lattice_constant(catalyst.solute)


def _layer_from_top(atoms: Atoms, atoms_per_layer: int) -> np.ndarray:
    """Layer index of each atom counted from the top (0 = outermost layer).

    Sorting by height works for every facet, including fcc(211) whose "layers" (one
    step-terrace unit) hold several rows at different heights.
    """
    order = np.argsort(-atoms.positions[:, 2], kind="stable")
    layer = np.empty(len(atoms), dtype=np.int64)
    layer[order] = np.arange(len(atoms)) // atoms_per_layer
    return layer


def _substitute(atoms: Atoms, catalyst: Catalyst, rng: np.random.Generator) -> None:
    """Replace a ``solute_fraction`` of the host atoms by the solute, in place."""
    if catalyst.solute is None:
        return
    n = len(atoms)
    if catalyst.pattern == "random":
        count = int(round(catalyst.solute_fraction * n))
        chosen = rng.choice(n, size=count, replace=False)
    elif catalyst.pattern == "layered":
        # Alternate whole atomic planes (distinct heights); which element ends on top is
        # random so both terminations occur.
        heights = np.round(atoms.positions[:, 2], 3)
        plane = np.searchsorted(np.unique(-heights), -heights)
        chosen = np.flatnonzero(plane % 2 == rng.integers(2))
    else:
        raise ValueError(f"unknown alloy pattern {catalyst.pattern!r} for {catalyst.name}")
    symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
    symbols[chosen] = catalyst.solute
    atoms.set_chemical_symbols(list(symbols))


def build_slab(
    catalyst: Catalyst,
    facet: str,
    repeat: tuple[int, int],
    layers: int,
    rng: np.random.Generator,
) -> Slab:
    """Build a tagged, constrained, fully periodic slab with vacuum along z.

    Args:
        catalyst: the metal or alloy.
        facet: ``"111"``, ``"100"`` or ``"211"``.
        repeat: surface repeat (nx, ny). A (211) slab is one step unit (3 atom rows)
            wide along x whatever nx, and ny atoms along the step.
        layers: number of atomic layers (step units for (211)); the bottom
            ``layers - NUM_FREE_LAYERS`` are fixed.
        rng: random generator used for the alloy arrangement.

    Returns:
        The slab with tags 0 (fixed, sub-surface) / 1 (free, surface), a ``FixAtoms``
        constraint on exactly the tag-0 atoms and ``pbc=True``.
    """
    if facet not in FACETS:
        raise ValueError(f"unknown facet {facet!r}; expected one of {sorted(FACETS)}")
    if layers <= NUM_FREE_LAYERS:
        raise ValueError(f"a slab needs more than {NUM_FREE_LAYERS} layers so some are fixed; got {layers}")
    nx, ny = repeat
    if facet == "211":
        nx = _STEP_WIDTH_211
    atoms = FACETS[facet](catalyst.host, size=(nx, ny, layers), a=catalyst_lattice_constant(catalyst), vacuum=VACUUM)
    atoms.info.clear()  # drop ase.build's site table (not serialisable to extxyz)
    atoms.pbc = True
    layer = _layer_from_top(atoms, nx * ny)
    _substitute(atoms, catalyst, rng)
    fixed = layer >= NUM_FREE_LAYERS
    atoms.set_tags(np.where(fixed, TAG_SUBSURFACE, TAG_SURFACE))
    atoms.set_constraint(FixAtoms(mask=fixed))
    return Slab(atoms=atoms, top_layer=np.flatnonzero(layer == 0))
