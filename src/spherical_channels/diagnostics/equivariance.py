"""How far a model is from rotation equivariance (paper Appendix A, eqs. 13-14).

For a structure and a randomly rotated copy, the energy MAD is ``|E(x) - E(Rx)|`` and the force
MAD is ``mean |F(x) - R^T F(Rx)|`` over atoms and components; both are averaged over structures
and rotations. An exactly equivariant model gives 0 up to rounding.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from e3nn import o3

from ..data.batch import AtomicBatch

__all__ = ["random_rotations", "rotate_batch", "rotation_mad"]


def rotate_batch(batch: AtomicBatch, rotations: torch.Tensor) -> AtomicBatch:
    """Rotate every structure of ``batch`` (positions and cell) by its own rotation.

    Args:
        batch: the structures.
        rotations: ``[S, 3, 3]`` (or ``[3, 3]`` for all), acting as ``x -> R x``.
    """
    rot = rotations.to(batch.positions.dtype)
    if rot.dim() == 2:
        rot = rot.expand(batch.num_structures, 3, 3)
    per_atom = rot[batch.batch]
    positions = torch.einsum("nij,nj->ni", per_atom, batch.positions)
    cell = batch.cell @ rot.transpose(1, 2)  # cell rows are lattice vectors
    forces = None
    if batch.forces is not None:
        forces = torch.einsum("nij,nj->ni", per_atom, batch.forces)
    return replace(batch, positions=positions, cell=cell, forces=forces)


@torch.no_grad()
def random_rotations(count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 3, 3]`` rotations uniform on SO(3) (normalised Gaussian quaternions), float64."""
    quaternions = torch.randn(count, 4, generator=generator, dtype=torch.float64)
    return o3.quaternion_to_matrix(quaternions / quaternions.norm(dim=1, keepdim=True))


def rotation_mad(
    model: torch.nn.Module,
    batch: AtomicBatch,
    num_rotations: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Energy and force mean absolute differences under random rotations (paper eqs. 13-14).

    Returns ``{"energy_mad": eV, "force_mad": eV/A, "energy_mean_abs": eV,
    "force_mean_abs": eV/A}`` (the last two put the MADs in scale).
    """
    generator = torch.Generator().manual_seed(seed)
    reference = model(batch)
    energy_diff, force_diff = [], []
    for _ in range(num_rotations):
        rotations = random_rotations(batch.num_structures, generator).to(batch.positions.dtype)
        rotated = model(rotate_batch(batch, rotations))
        energy_diff.append((rotated["energy"] - reference["energy"]).abs())
        if "forces" in reference:
            back = torch.einsum("nji,nj->ni", rotations[batch.batch], rotated["forces"])
            force_diff.append((back - reference["forces"]).abs().flatten())
    out = {
        "energy_mad": float(torch.cat(energy_diff).mean()),
        "energy_mean_abs": float(reference["energy"].abs().mean()),
    }
    if force_diff:
        out["force_mad"] = float(torch.cat(force_diff).mean())
        out["force_mean_abs"] = float(reference["forces"].abs().mean())
    return out
