"""Target normalisation shared by every model: the checks and the per-element energy table.

A model predicts ``E = energy_scale * E_net + energy_shift + sum_i e[Z_i]`` (and direct forces
``force_scale * F_net``); its ``set_normalization`` fills buffers with values checked here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["check_finite_scalars", "element_energy_table"]


def check_finite_scalars(**values: float) -> None:
    """Raise ValueError naming the first value that is not a finite number."""
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")


def element_energy_table(element_energies: Mapping[int, float] | torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Per-element reference energies as a table shaped, typed and placed like ``like``
    ``[max_num_elements]``: from ``{Z: eV}``, a tensor of that shape, or None (zeros).
    Raises ValueError for a wrong shape, an atomic number outside the table or a non-finite value."""
    table = torch.zeros_like(like)
    if isinstance(element_energies, torch.Tensor):
        if element_energies.shape != table.shape:
            raise ValueError(f"element_energies must have shape {tuple(table.shape)}, got {tuple(element_energies.shape)}")
        table.copy_(element_energies)
    elif element_energies:
        for z, energy in element_energies.items():
            if not 0 <= int(z) < table.shape[0]:
                raise ValueError(f"element_energies: atomic number {z} outside this model's table 0..{table.shape[0] - 1}")
            table[int(z)] = float(energy)
    if not bool(torch.isfinite(table).all()):
        raise ValueError("element_energies must be finite")
    return table
