"""Small C/H/N/O adsorbates and their placement on a slab site."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.data import covalent_radii

from .catalysts import TAG_ADSORBATE, Slab

__all__ = ["ADSORBATES", "Adsorbate", "SITE_TYPES", "place_adsorbate"]

SITE_TYPES = ("top", "bridge", "hollow")

# Bond lengths (Angstrom) of the gas-phase-like templates below.
_OH = 0.97
_NH = 1.01
_CH = 1.09
_CO_TRIPLE = 1.15
_CO_SINGLE = 1.33
_CO_DOUBLE = 1.21
_NO = 1.17
_OC_METHOXY = 1.42
_CN = 1.17
_NN = 1.12
_CC = 1.30
_OCN_CO = 1.25
_OCN_CN = 1.17
_NNO_NN = 1.13
_NNO_NO = 1.19
_CO2 = 1.22
# Polar angles (degrees, from +z, the surface normal) of X-H bonds pointing away from
# the surface: sp3 with the fourth bond to the surface, and the pyramidal NH3.
_SP3_UP = 180.0 - 109.47
_NH3_UP = 68.1
# Angles of the bent species: H2O / NH2 / CH2 (half the H-X-H angle from +z),
# C-O-H of COH, and the in-plane H and O of formyl (CHO) on either side of +z.
_H2O_HALF = 52.0
_NH2_HALF = 53.0
_CH2_HALF = 54.7
_COH_TILT = 70.0
_CHO_O = 55.0
_CHO_H = -69.0
# Bent, C-bound CO2 (O-C-O 130 degrees, opening upwards).
_CO2_HALF = 65.0

# Placement: the binding atom sits one covalent bond length (sum of covalent radii)
# from the nearest top-layer atom, but at least _SUBLAYER_CLEARANCE bond lengths from
# deeper atoms (else small atoms start inside the 4-fold hollow of (100)); the other
# adsorbate atoms keep _CLEARANCE bond lengths from every slab atom.
_BIND_SCALE = 1.0
# ... except for elements EMT binds further out: its H sits ~1.35 bond lengths from
# the metal after relaxation (median over reference systems); starting at 1.0 put
# 3-13 eV of repulsion into the initial structures.
_BIND_SCALE_BY_ELEMENT = {"H": 1.35}
_SUBLAYER_CLEARANCE = 1.5
_CLEARANCE = 1.15
# Random orientation: full azimuth, tilt of the molecular axis up to this (degrees),
# and a Gaussian lateral offset of the site with this sigma (Angstrom).
_MAX_TILT_DEG = 15.0
_LATERAL_SIGMA = 0.15
# Two top-layer atoms are neighbours (for bridge/hollow sites) if closer than this
# factor times the shortest top-layer distance.
_NEIGHBOR_TOL = 1.2


@dataclass(frozen=True)
class Adsorbate:
    """An adsorbate template: binding atom first, at the origin, the rest above it (+z)."""

    name: str
    symbols: str
    positions: tuple[tuple[float, float, float], ...]

    def atoms(self) -> Atoms:
        """The template as ASE atoms (no cell)."""
        return Atoms(self.symbols, positions=np.array(self.positions, dtype=float))


def _polar(length: float, theta_deg: float, phi_deg: float = 0.0) -> tuple[float, float, float]:
    """Cartesian vector from bond length, polar angle from +z and azimuth (degrees)."""
    theta, phi = np.radians(theta_deg), np.radians(phi_deg)
    return (
        float(length * np.sin(theta) * np.cos(phi)),
        float(length * np.sin(theta) * np.sin(phi)),
        float(length * np.cos(theta)),
    )


def _shift(vec: tuple[float, float, float], by: tuple[float, float, float]) -> tuple[float, float, float]:
    return (vec[0] + by[0], vec[1] + by[1], vec[2] + by[2])


_ORIGIN = (0.0, 0.0, 0.0)
_TRIPOD = (0.0, 120.0, 240.0)


def _build_templates() -> dict[str, Adsorbate]:
    """Templates, OC20-style names (``*`` marks the surface-bound species)."""
    c_methoxy = (0.0, 0.0, _OC_METHOXY)
    o_coh = (0.0, 0.0, _CO_SINGLE)
    templates = [
        Adsorbate("*H", "H", (_ORIGIN,)),
        Adsorbate("*O", "O", (_ORIGIN,)),
        Adsorbate("*N", "N", (_ORIGIN,)),
        Adsorbate("*C", "C", (_ORIGIN,)),
        Adsorbate("*OH", "OH", (_ORIGIN, (0.0, 0.0, _OH))),
        Adsorbate("*H2O", "OH2", (_ORIGIN, _polar(_OH, _H2O_HALF), _polar(_OH, _H2O_HALF, 180.0))),
        Adsorbate("*NH", "NH", (_ORIGIN, (0.0, 0.0, _NH))),
        Adsorbate("*NH2", "NH2", (_ORIGIN, _polar(_NH, _NH2_HALF), _polar(_NH, _NH2_HALF, 180.0))),
        Adsorbate("*NH3", "NH3", (_ORIGIN, *(_polar(_NH, _NH3_UP, p) for p in _TRIPOD))),
        Adsorbate("*CH", "CH", (_ORIGIN, (0.0, 0.0, _CH))),
        Adsorbate("*CH2", "CH2", (_ORIGIN, _polar(_CH, _CH2_HALF), _polar(_CH, _CH2_HALF, 180.0))),
        Adsorbate("*CH3", "CH3", (_ORIGIN, *(_polar(_CH, _SP3_UP, p) for p in _TRIPOD))),
        Adsorbate("*CO", "CO", (_ORIGIN, (0.0, 0.0, _CO_TRIPLE))),
        Adsorbate("*COH", "COH", (_ORIGIN, o_coh, _shift(_polar(_OH, _COH_TILT), o_coh))),
        Adsorbate("*CHO", "CHO", (_ORIGIN, _polar(_CH, _CHO_H), _polar(_CO_DOUBLE, _CHO_O))),
        Adsorbate("*NO", "NO", (_ORIGIN, (0.0, 0.0, _NO))),
        Adsorbate(
            "*OCH3",
            "OCH3",
            (_ORIGIN, c_methoxy, *(_shift(_polar(_CH, _SP3_UP, p), c_methoxy) for p in _TRIPOD)),
        ),
        Adsorbate("*CN", "CN", (_ORIGIN, (0.0, 0.0, _CN))),
        Adsorbate("*N2", "NN", (_ORIGIN, (0.0, 0.0, _NN))),
        Adsorbate("*C2", "CC", (_ORIGIN, (0.0, 0.0, _CC))),
        Adsorbate("*OCN", "OCN", (_ORIGIN, (0.0, 0.0, _OCN_CO), (0.0, 0.0, _OCN_CO + _OCN_CN))),
        Adsorbate("*NNO", "NNO", (_ORIGIN, (0.0, 0.0, _NNO_NN), (0.0, 0.0, _NNO_NN + _NNO_NO))),
        Adsorbate("*CO2", "COO", (_ORIGIN, _polar(_CO2, _CO2_HALF), _polar(_CO2, _CO2_HALF, 180.0))),
    ]
    return {t.name: t for t in templates}


# Every template, including species that EMT cannot hold together on a metal (see
# generate.py for the subset the reference data uses).
ADSORBATES: dict[str, Adsorbate] = _build_templates()


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix about a unit ``axis`` by ``angle`` radians (Rodrigues)."""
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _random_orientation(rng: np.random.Generator) -> np.ndarray:
    """A random azimuthal rotation followed by a small tilt about a horizontal axis."""
    spin = _rotation(np.array([0.0, 0.0, 1.0]), rng.uniform(0.0, 2.0 * np.pi))
    phi = rng.uniform(0.0, 2.0 * np.pi)
    tilt_axis = np.array([np.cos(phi), np.sin(phi), 0.0])
    tilt = _rotation(tilt_axis, np.radians(rng.uniform(0.0, _MAX_TILT_DEG)))
    return tilt @ spin


def _in_plane_images(atoms: Atoms, positions: np.ndarray) -> np.ndarray:
    """``positions`` repeated over the 3x3 neighbouring in-plane cells, [9 * n, 3]."""
    shifts = np.array([i * atoms.cell[0] + j * atoms.cell[1] for i in (-1, 0, 1) for j in (-1, 0, 1)])
    return (positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)


def _site_position(slab: Slab, site: str, rng: np.random.Generator) -> np.ndarray:
    """Cartesian position of a random ``site`` among the top-layer atoms.

    top: an atom; bridge: midpoint of an atom and a neighbour; hollow: circumcentre of
    an atom and the two neighbours spanning the smallest angle (the 3-fold hollow on
    (111), the 4-fold one on (100), where the circumcentre is the square's centre).
    """
    top = slab.atoms.positions[slab.top_layer]
    centre = top[rng.integers(len(top))]
    if site == "top":
        return centre
    images = _in_plane_images(slab.atoms, top)
    dist = np.linalg.norm(images - centre, axis=1)
    nearest = dist[dist > 1e-6].min()
    neighbours = images[(dist > 1e-6) & (dist < _NEIGHBOR_TOL * nearest)] - centre
    if site == "bridge":
        return centre + 0.5 * neighbours[rng.integers(len(neighbours))]
    if site != "hollow":
        raise ValueError(f"unknown site {site!r}; expected one of {SITE_TYPES}")
    unit = neighbours / np.linalg.norm(neighbours, axis=1, keepdims=True)
    cosines = unit @ unit.T
    np.fill_diagonal(cosines, -np.inf)
    best = np.argwhere(np.isclose(cosines, cosines.max(), atol=1e-3))
    i, j = best[rng.integers(len(best))]
    u, v = neighbours[i], neighbours[j]
    # Circumcentre of the triangle (0, u, v), relative to the centre atom.
    w = np.cross(u, v)
    offset = (np.dot(u, u) * np.cross(v, w) + np.dot(v, v) * np.cross(w, u)) / (2.0 * np.dot(w, w))
    return centre + offset


def _drop_height(slab_images: np.ndarray, ads: np.ndarray, bond: np.ndarray, scale: np.ndarray) -> float:
    """Lowest z shift putting every adsorbate atom at least its clearance from every slab atom.

    The adsorbate is lowered vertically onto the surface: for a slab atom at lateral
    distance rho < d = scale * bond, the adsorbate atom must be sqrt(d^2 - rho^2) above it.
    ``bond`` and ``scale`` are [n_adsorbate, n_slab_images].
    """
    d = scale * bond
    rho2 = ((ads[:, None, :2] - slab_images[None, :, :2]) ** 2).sum(-1)
    needed = slab_images[None, :, 2] + np.sqrt(np.clip(d**2 - rho2, 0.0, None)) - ads[:, None, 2]
    needed[rho2 >= d**2] = -np.inf
    return float(needed.max())


def _clearance_scale(binding_symbol: str, n_ads: int, n_slab: int, top_layer: np.ndarray) -> np.ndarray:
    """[n_ads, 9 * n_slab] clearance factors in bond lengths (see the module constants)."""
    scale = np.full((n_ads, n_slab), _CLEARANCE)
    scale[0] = _SUBLAYER_CLEARANCE
    scale[0, top_layer] = _BIND_SCALE_BY_ELEMENT.get(binding_symbol, _BIND_SCALE)
    return np.tile(scale, (1, 9))


def place_adsorbate(
    slab: Slab, adsorbate: Adsorbate, rng: np.random.Generator, site: str | None = None
) -> tuple[Atoms, str]:
    """Put ``adsorbate`` on a random (or given) site of ``slab``.

    The template is rotated randomly (any azimuth, small tilt), its binding atom moved
    over the site plus a small Gaussian lateral offset, then lowered until its binding
    atom is one covalent bond length (1.35 for H, as EMT prefers) from the nearest
    top-layer atom, with larger clearances for deeper atoms and the other adsorbate
    atoms. Adsorbate atoms get tag 2.

    Returns:
        The combined system (slab constraint kept) and the site type used.
    """
    site = site if site is not None else SITE_TYPES[rng.integers(len(SITE_TYPES))]
    target = _site_position(slab, site, rng)
    target[:2] += rng.normal(0.0, _LATERAL_SIGMA, size=2)
    ads = adsorbate.atoms()
    rel = ads.positions @ _random_orientation(rng).T
    rel[:, :2] += target[:2]

    slab_atoms = slab.atoms
    images = _in_plane_images(slab_atoms, slab_atoms.positions)
    slab_radii = np.tile(covalent_radii[slab_atoms.numbers], 9)
    bond = covalent_radii[ads.numbers][:, None] + slab_radii[None, :]
    scale = _clearance_scale(ads.get_chemical_symbols()[0], len(ads), len(slab_atoms), slab.top_layer)
    rel[:, 2] += _drop_height(images, rel, bond, scale)

    ads.positions = rel
    ads.set_tags(TAG_ADSORBATE)
    system = slab_atoms.copy()
    system.extend(ads)
    # Wrap the adsorbate as a whole (shift by whole cell vectors) so it stays in one piece.
    frac = np.linalg.solve(system.cell.array.T, rel[0])
    system.positions[len(slab_atoms):] -= np.floor(frac[:2]) @ system.cell.array[:2]
    return system, site
