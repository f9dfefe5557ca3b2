"""A short-range repulsion prior: the ZBL screened nuclear repulsion (Ziegler, Biersack and
Littmark's universal screening function), switched off smoothly at short range.

``V(r) = 14.3996 Z_i Z_j / r * phi(r / a) * u(r / r_max)`` eV, ``a = 0.46850 / (Z_i^0.23 +
Z_j^0.23)`` Å, ``phi(x) = 0.18175 e^(-3.19980 x) + 0.50986 e^(-0.94229 x) + 0.28022 e^(-0.40290 x)
+ 0.02817 e^(-0.20162 x)``, ``u`` the polynomial envelope (C2 at ``r_max``) and ``r_max = scale x
(covalent radius i + covalent radius j)`` (ASE's radii): well below bond lengths, so the prior
only acts where the training data has no examples and atoms would otherwise collapse.
"""

from __future__ import annotations

import torch
from ase.data import covalent_radii
from torch import nn

from .smooth import polynomial_envelope

__all__ = ["ZBLRepulsion", "COULOMB"]

#: e^2 / (4 pi epsilon_0) in eV Å.
COULOMB = 14.399645
_PHI = ((0.18175, 3.19980), (0.50986, 0.94229), (0.28022, 0.40290), (0.02817, 0.20162))


class ZBLRepulsion(nn.Module):
    """Pair energies of the ZBL prior on given pairs (no parameters)."""

    def __init__(self, max_num_elements: int, radius_scale: float, exponent: int = 5) -> None:
        super().__init__()
        radii = torch.as_tensor(covalent_radii[:max_num_elements], dtype=torch.float64)
        self.register_buffer("covalent_radii", radii, persistent=False)
        self.radius_scale = float(radius_scale)
        self.exponent = int(exponent)

    def pair_energy(
        self, distance: torch.Tensor, z_i: torch.Tensor, z_j: torch.Tensor, slope: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``V(r)`` of pairs ``[E]`` (eV; zero at and beyond each pair's ``r_max``), and with
        ``slope=True`` also ``dV/dr`` (analytic, so that it works without autograd)."""
        dtype = distance.dtype
        zi, zj = z_i.to(dtype), z_j.to(dtype)
        a = 0.46850 / (zi**0.23 + zj**0.23)
        r_max = self.radius_scale * (self.covalent_radii[z_i] + self.covalent_radii[z_j]).to(dtype)
        close = distance < r_max
        r = torch.where(close, distance, r_max)  # no overflow of 1/r beyond, where V is zero
        x, y = r / a, r / r_max
        terms = [(c * torch.exp(-k * x), k) for c, k in _PHI]
        phi = sum(t for t, _ in terms)
        envelope = polynomial_envelope(y, 1.0, self.exponent)
        prefactor = COULOMB * zi * zj
        zero = torch.zeros_like(r)
        value = torch.where(close, prefactor / r * phi * envelope, zero)
        if not slope:
            return value
        p = float(self.exponent)
        d_phi = -sum(t * k for t, k in terms) / a  # d phi / dr
        d_envelope = -p * (p + 1.0) * (p + 2.0) / 2.0 * y ** (self.exponent - 1) * (1.0 - y) ** 2 / r_max
        d_value = prefactor * ((d_phi * envelope + phi * d_envelope) / r - phi * envelope / (r * r))
        return value, torch.where(close, d_value, zero)

    def forward(
        self, distance: torch.Tensor, edge_index: torch.Tensor, atomic_numbers: torch.Tensor, batch: torch.Tensor,
        num_structures: int,
    ) -> torch.Tensor:
        """Energy ``[S]`` of directed edges ``[2, E]`` (each pair counted once per direction,
        so each direction contributes half)."""
        source, target = edge_index
        pair = 0.5 * self.pair_energy(distance, atomic_numbers[source], atomic_numbers[target])
        energy = torch.zeros(num_structures, dtype=distance.dtype, device=distance.device)
        return energy.index_add(0, batch[target], pair)

    def forces(self, vectors: torch.Tensor, edge_index: torch.Tensor, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """``-dE/dx`` ``[N, 3]`` of :meth:`forward`'s energy, for directed edges ``[2, E]`` with
        vectors ``[E, 3]`` = position of the source (image) minus that of the target."""
        source, target = edge_index
        distance = torch.linalg.vector_norm(vectors, dim=-1)
        _, slope = self.pair_energy(distance, atomic_numbers[source], atomic_numbers[target], slope=True)
        grad_vec = (0.5 * slope / distance).unsqueeze(-1) * vectors  # dE/d(vector) per edge
        forces = torch.zeros(atomic_numbers.shape[0], 3, dtype=vectors.dtype, device=vectors.device)
        return forces.index_add(0, source, -grad_vec).index_add(0, target, grad_vec)
