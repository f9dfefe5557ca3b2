"""The training loss: energy MAE plus force L2-MAE (paper B.3).

``loss = energy_coefficient * mean_s |E_s - E*_s| / scale
       + force_coefficient * mean_i ||F_i - F*_i|| / scale``

with ``scale`` the data's force scale (RMS force component), one normaliser for energies and
forces as in the official trainer (whose SCN normalisers share one standard deviation), so that
both terms are dimensionless and the paper's coefficients (2 and 100) keep their meaning. The
model predicts energies relative to per-element reference energies fitted on the training set
(:mod:`spherical_channels.data.statistics`), so the energy error is that of the residual. With
``per_atom_energy=True`` the energy term uses ``|E_s - E*_s| / N_s`` instead (for data sets
whose structures differ much in size). Forces are averaged over free atoms when training on free
atoms only (OC20 practice: fixed atoms' forces are not physical targets).

In distributed training every rank passes the global numbers of structures and force atoms;
its loss is its share of the global sums times the world size, so that DistributedDataParallel's
gradient averaging yields exactly the gradient of the global-batch loss, whatever the number of
atoms on each rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.batch import AtomicBatch

__all__ = ["LossTerms", "energy_force_loss", "force_atoms_mask"]


@dataclass
class LossTerms:
    """The loss and its parts (detached parts are for logging)."""

    loss: torch.Tensor
    energy_mae: torch.Tensor  # eV, this rank's batch
    energy_mae_per_atom: torch.Tensor  # eV/atom, this rank's batch
    force_l2mae: torch.Tensor  # eV/A, this rank's batch


def force_atoms_mask(batch: AtomicBatch, free_only: bool) -> torch.Tensor:
    """``[N]`` bool: the atoms whose forces enter the loss and the metrics."""
    if free_only:
        return ~batch.fixed
    return torch.ones_like(batch.fixed)


def energy_force_loss(
    prediction: dict[str, torch.Tensor],
    batch: AtomicBatch,
    scale: float,
    energy_coefficient: float,
    force_coefficient: float,
    free_only: bool = True,
    global_structures: int | None = None,
    global_force_atoms: int | None = None,
    world_size: int = 1,
    per_atom_energy: bool = False,
) -> LossTerms:
    """Loss of a batch (see the module docstring).

    Args:
        prediction: ``{"energy": [S], "forces": [N, 3]}``.
        batch: with targets ``energy`` and ``forces``.
        scale: force scale (eV/A) dividing both terms.
        global_structures, global_force_atoms: totals over all ranks (default: this batch's).
    """
    if batch.energy is None or batch.forces is None:
        raise ValueError("the batch has no energy/forces targets to train on")
    mask = force_atoms_mask(batch, free_only)
    num_structures = global_structures or batch.num_structures
    num_force_atoms = global_force_atoms if global_force_atoms is not None else int(mask.sum())
    energy_error = (prediction["energy"] - batch.energy).abs()
    energy_error_per_atom = energy_error / batch.natoms.to(energy_error.dtype)
    force_error = torch.linalg.vector_norm(prediction["forces"] - batch.forces, dim=1)[mask]
    energy_term = (energy_error_per_atom if per_atom_energy else energy_error).sum() / num_structures
    force_term = force_error.sum() / max(num_force_atoms, 1)
    loss = world_size * (energy_coefficient * energy_term + force_coefficient * force_term) / scale
    return LossTerms(
        loss=loss,
        energy_mae=energy_error.detach().mean(),
        energy_mae_per_atom=energy_error_per_atom.detach().mean(),
        force_l2mae=force_error.detach().mean() if force_error.numel() else force_error.new_zeros(()),
    )
