"""Built-in reference data: an offline, seeded, OC20-like data set labelled by ASE's EMT.

Adsorbate+slab systems (fcc metals and binary alloys, (111)/(100)/(211) facets, small
C/H/N/O adsorbates) are relaxed with EMT; sampled relaxation frames and rattled frames
form the S2EF data, initial structures with their relaxed energy and positions the
IS2RE/IS2RS data, in OC20's splits (in-domain and out-of-domain adsorbates/catalysts).
See :func:`generate_reference_data`.
"""

from .adsorbates import ADSORBATES, Adsorbate, place_adsorbate
from .catalysts import CATALYSTS, Catalyst, build_slab, emt_lattice_constant
from .generate import (
    HELD_OUT_ADSORBATES,
    HELD_OUT_CATALYSTS,
    IN_DOMAIN_ADSORBATES,
    IN_DOMAIN_CATALYSTS,
    RELAX_FMAX,
    SIZES,
    SPLITS,
    GenerationReport,
    SizeConfig,
    generate_reference_data,
)
from .sanity import adsorbate_bonds, drop_reason, is_broken, is_desorbed

__all__ = [
    "ADSORBATES",
    "CATALYSTS",
    "HELD_OUT_ADSORBATES",
    "HELD_OUT_CATALYSTS",
    "IN_DOMAIN_ADSORBATES",
    "IN_DOMAIN_CATALYSTS",
    "RELAX_FMAX",
    "SIZES",
    "SPLITS",
    "Adsorbate",
    "Catalyst",
    "GenerationReport",
    "SizeConfig",
    "adsorbate_bonds",
    "build_slab",
    "drop_reason",
    "emt_lattice_constant",
    "generate_reference_data",
    "is_broken",
    "is_desorbed",
    "place_adsorbate",
]
