"""Files shipped with the package.

* ``example_official_layout.pt``: a small SCN checkpoint in the layout of the official OC20
  releases (lmax 4, mmax 1, 4 taps, 2 bands, 2 layers, with EMA weights). Its weights are random
  (scaled so that outputs are O(1)): it exercises loading and prediction, it knows no chemistry.
* ``example_structures.extxyz``: eight OC20-like structures (slabs with adsorbates, molecules
  in a box).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["resource_path", "EXAMPLE_CHECKPOINT", "EXAMPLE_STRUCTURES"]

EXAMPLE_CHECKPOINT = "example_official_layout.pt"
EXAMPLE_STRUCTURES = "example_structures.extxyz"


def resource_path(name: str) -> Path:
    """Path of a file shipped in ``spherical_channels/resources``."""
    path = Path(str(resources.files(__name__) / name))
    if not path.exists():
        raise FileNotFoundError(f"no bundled resource {name!r}")
    return path
