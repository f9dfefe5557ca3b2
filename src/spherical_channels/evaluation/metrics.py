"""OC20 metrics (S2EF, IS2RS, IS2RE), as the OC20 evaluator defines them.

S2EF, over structures s and the free atoms i of each (fixed atoms are not evaluated):

* ``energy_mae``: mean_s |E_s - E*_s| (eV); ``energy_mae_per_atom``: mean_s |E_s - E*_s| / N_s;
* ``force_mae``: mean over free atoms and components |F - F*| (eV/A);
* ``force_cos``: mean over free atoms of cos(F_i, F*_i);
* ``force_l2mae``: mean over free atoms of ||F_i - F*_i|| (the training loss's force term);
* ``efwt``: fraction of structures with |E_s - E*_s| < 0.02 eV and every free-atom force
  component within 0.03 eV/A.

IS2RS: ``adwt``, the mean over thresholds 0.01, 0.011, ..., 0.499 A of the fraction of
structures whose mean free-atom distance to the reference relaxed positions (minimum image
under the cell) is below the threshold; ``afbt``, the mean over force thresholds 0.01, ...,
0.399 eV/A of the fraction of model-relaxed structures whose true (reference-calculator) max
free-atom force is below it. IS2RE: ``energy_mae`` and ``ewt`` (|error| < 0.02 eV) of the
relaxed energy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "ADWT_THRESHOLDS",
    "AFBT_THRESHOLDS",
    "EFWT_ENERGY",
    "EFWT_FORCE",
    "S2EFMetrics",
    "average_distance_within_threshold",
    "average_force_below_threshold",
    "minimum_image_distances",
    "relaxed_energy_metrics",
]

EFWT_ENERGY = 0.02  # eV
EFWT_FORCE = 0.03  # eV/A
EWT_ENERGY = 0.02  # eV
ADWT_THRESHOLDS = np.arange(0.01, 0.5, 0.001)  # A, OC20's evaluator
AFBT_THRESHOLDS = np.arange(0.01, 0.4, 0.001)  # eV/A

_SUMS = (
    "structures",
    "energy_abs",
    "energy_abs_per_atom",
    "energy_sq",
    "force_components",
    "force_abs",
    "force_atoms",
    "force_cos",
    "force_l2",
    "efwt",
)


class S2EFMetrics:
    """Accumulates S2EF errors batch by batch; sums combine exactly across batches and ranks.

    Example::

        metrics = S2EFMetrics()
        for batch in loader:
            metrics.update(model(batch), batch)
        print(metrics.compute())   # {"energy_mae": ..., "force_mae": ..., ...}
    """

    def __init__(self) -> None:
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64)

    def update(
        self,
        prediction: dict[str, torch.Tensor],
        batch: "AtomicBatch",  # noqa: F821 - avoid importing data here
        free_only: bool = True,
    ) -> None:
        """Add a batch: ``prediction`` ``{"energy": [S], "forces": [N, 3]}``, ``batch`` with
        targets; forces are evaluated on free atoms only unless ``free_only=False``."""
        energy = prediction["energy"].detach().double().cpu()
        target_energy = batch.energy.detach().double().cpu()
        natoms = batch.natoms.cpu()
        energy_error = (energy - target_energy).abs()
        sums = dict.fromkeys(_SUMS, 0.0)
        sums["structures"] = float(len(energy))
        sums["energy_abs"] = float(energy_error.sum())
        sums["energy_abs_per_atom"] = float((energy_error / natoms).sum())
        sums["energy_sq"] = float((energy_error**2).sum())
        within = energy_error < EFWT_ENERGY
        if "forces" in prediction and batch.forces is not None:
            forces = prediction["forces"].detach().double().cpu()
            target = batch.forces.detach().double().cpu()
            mask = (~batch.fixed).cpu() if free_only else torch.ones(len(forces), dtype=torch.bool)
            error = (forces - target)[mask]
            sums["force_components"] = float(error.numel())
            sums["force_abs"] = float(error.abs().sum())
            sums["force_atoms"] = float(mask.sum())
            sums["force_l2"] = float(torch.linalg.vector_norm(error, dim=1).sum())
            sums["force_cos"] = float(torch.nn.functional.cosine_similarity(forces[mask], target[mask], dim=1).sum())
            # largest free-atom component error per structure (0 for a structure without free atoms)
            per_atom = (forces - target).abs().amax(dim=1) * mask
            structure = torch.repeat_interleave(torch.arange(len(natoms)), natoms)
            worst = torch.zeros(len(natoms), dtype=torch.float64).scatter_reduce(0, structure, per_atom, "amax")
            within &= worst < EFWT_FORCE
        sums["efwt"] = float(within.sum())
        self.sums += torch.tensor([sums[k] for k in _SUMS], dtype=torch.float64)

    def merge(self, other: "S2EFMetrics") -> None:
        self.sums += other.sums

    def compute(self) -> dict[str, float]:
        """The metrics (see the module docstring); NaN for quantities with nothing counted."""
        s = dict(zip(_SUMS, self.sums.tolist()))

        def ratio(a: str, b: str) -> float:
            return s[a] / s[b] if s[b] else float("nan")

        return {
            "energy_mae": ratio("energy_abs", "structures"),
            "energy_mae_per_atom": ratio("energy_abs_per_atom", "structures"),
            "energy_rmse": float(np.sqrt(ratio("energy_sq", "structures"))),
            "force_mae": ratio("force_abs", "force_components"),
            "force_cos": ratio("force_cos", "force_atoms"),
            "force_l2mae": ratio("force_l2", "force_atoms"),
            "efwt": ratio("efwt", "structures"),
            "num_structures": int(s["structures"]),
        }


def minimum_image_distances(
    positions: np.ndarray, reference: np.ndarray, cell: np.ndarray, pbc: Sequence[bool]
) -> np.ndarray:
    """``[N]`` distances between two sets of positions, each difference reduced to the
    nearest periodic image by rounding its fractional coordinates along periodic axes (the
    OC20 evaluator's convention)."""
    diff = np.asarray(positions, float) - np.asarray(reference, float)
    pbc = np.asarray(pbc, bool)
    if pbc.any():
        frac = np.linalg.solve(np.asarray(cell, float).T, diff.T).T
        frac[:, pbc] -= np.round(frac[:, pbc])
        diff = frac @ np.asarray(cell, float)
    return np.linalg.norm(diff, axis=1)


def average_distance_within_threshold(mean_distances: Sequence[float], thresholds: np.ndarray = ADWT_THRESHOLDS) -> float:
    """ADwT from each structure's mean free-atom distance to its reference relaxed structure."""
    d = np.asarray(mean_distances, float)
    if d.size == 0:
        return float("nan")
    return float((d[:, None] < thresholds[None, :]).mean())


def average_force_below_threshold(max_forces: Sequence[float], thresholds: np.ndarray = AFBT_THRESHOLDS) -> float:
    """AFbT from each model-relaxed structure's true maximum free-atom force (eV/A)."""
    f = np.asarray(max_forces, float)
    if f.size == 0:
        return float("nan")
    return float((f[:, None] < thresholds[None, :]).mean())


def relaxed_energy_metrics(predicted: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """IS2RE: MAE of the relaxed energies and the fraction within 0.02 eV (EwT)."""
    error = np.abs(np.asarray(predicted, float) - np.asarray(reference, float))
    if error.size == 0:
        return {"energy_mae": float("nan"), "ewt": float("nan")}
    return {"energy_mae": float(error.mean()), "ewt": float((error < EWT_ENERGY).mean())}
