"""OC20 metrics (S2EF, IS2RS, IS2RE), as the OC20 evaluator defines them.

S2EF, over structures s and the free atoms i of each (fixed atoms are not evaluated):

* ``energy_mae``: mean_s |E_s - E*_s| (eV); ``energy_mae_per_atom``: mean_s |E_s - E*_s| / N_s;
* ``force_mae``: mean over free atoms and components |F - F*| (eV/A);
* ``force_cos``: mean over free atoms of cos(F_i, F*_i);
* ``force_l2mae``: mean over free atoms of ||F_i - F*_i|| (the training loss's force term);
* ``efwt``: fraction of structures with |E_s - E*_s| < 0.02 eV and every free-atom force
  component within 0.03 eV/A.

Each is taken over the structures that have what it needs (a reference energy, reference
forces, or both for EFwT), and the counts say how many that was.

IS2RS: ``adwt``, the mean over thresholds 0.01, 0.011, ..., 0.499 A of the fraction of
structures whose mean free-atom distance to the reference relaxed positions (minimum image
under the cell) is below the threshold (``adwt_adsorbate``: the same over the adsorbate atoms
only, tag 2 in the OC20 convention of 0 subsurface, 1 surface, 2 adsorbate); ``afbt``, the mean over force thresholds 0.01, ...,
0.399 eV/A of the fraction of model-relaxed structures whose true (reference-calculator) max
free-atom force is below it. IS2RE: ``energy_mae`` and ``ewt`` (|error| < 0.02 eV) of the
relaxed energy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "ADWT_THRESHOLDS",
    "AFBT_THRESHOLDS",
    "EFWT_ENERGY",
    "EFWT_FORCE",
    "S2EFMetrics",
    "S2EFTargets",
    "average_distance_within_threshold",
    "average_force_below_threshold",
    "json_safe",
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
    "energy_structures",
    "energy_abs",
    "energy_abs_per_atom",
    "energy_sq",
    "force_structures",
    "force_components",
    "force_abs",
    "force_atoms",
    "force_cos",
    "force_l2",
    "efwt_structures",
    "efwt",
)


@dataclass
class S2EFTargets:
    """Reference energies and forces of a batch, structure by structure: a structure may lack
    either (``has_energy`` / ``has_forces`` False; its entries in ``energy`` / ``forces`` are
    then ignored)."""

    energy: torch.Tensor  # [S] eV, float64
    forces: torch.Tensor  # [N, 3] eV/A, float64
    has_energy: torch.Tensor  # [S] bool
    has_forces: torch.Tensor  # [S] bool

    @classmethod
    def from_batch(cls, batch: "AtomicBatch") -> "S2EFTargets":  # noqa: F821
        """The targets a batch carries (all structures have each, or none does)."""
        s, n = batch.num_structures, len(batch.positions)
        energy, forces = batch.energy, batch.forces
        return cls(
            energy=energy.detach().double().cpu() if energy is not None else torch.zeros(s, dtype=torch.float64),
            forces=forces.detach().double().cpu() if forces is not None else torch.zeros(n, 3, dtype=torch.float64),
            has_energy=torch.full((s,), energy is not None),
            has_forces=torch.full((s,), forces is not None),
        )

    @classmethod
    def from_atoms(cls, frames: Sequence["Atoms"], first_index: int = 0) -> "S2EFTargets":  # noqa: F821
        """The results stored on each structure's calculator, in float64 (a structure may
        have an energy, forces, both or neither). Non-finite targets are errors naming the
        structure (``first_index`` + its position in ``frames``)."""
        energies, forces, has_energy, has_forces = [], [], [], []
        for k, atoms in enumerate(frames):
            results = getattr(atoms.calc, "results", None) or {}
            e, f = results.get("energy"), results.get("forces")
            has_energy.append(e is not None)
            has_forces.append(f is not None)
            energies.append(float(np.asarray(e, dtype=np.float64).reshape(())) if e is not None else 0.0)
            f = np.asarray(f, dtype=np.float64).reshape(-1, 3) if f is not None else np.zeros((len(atoms), 3))
            if len(f) != len(atoms):
                raise ValueError(f"structure {first_index + k}: {len(f)} force rows for {len(atoms)} atoms")
            if not np.isfinite(energies[-1]):
                raise ValueError(f"structure {first_index + k}: non-finite reference energy")
            if not np.isfinite(f).all():
                raise ValueError(f"structure {first_index + k}: non-finite reference forces")
            forces.append(f)
        return cls(
            energy=torch.tensor(energies, dtype=torch.float64),
            forces=torch.from_numpy(np.concatenate(forces)) if forces else torch.zeros(0, 3, dtype=torch.float64),
            has_energy=torch.tensor(has_energy, dtype=torch.bool),
            has_forces=torch.tensor(has_forces, dtype=torch.bool),
        )


class S2EFMetrics:
    """Accumulates S2EF errors batch by batch; sums combine exactly across batches and ranks.

    Each metric is computed over the structures that have what it needs: energy metrics over
    those with a reference (and predicted) energy, force metrics over those with reference
    (and predicted) forces, EFwT over those with both; :meth:`compute` reports how many
    structures each covers.

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
        targets: S2EFTargets | None = None,
    ) -> None:
        """Add a batch: ``prediction`` ``{"energy": [S], "forces": [N, 3]}`` (either may be
        absent), ``batch`` the structures; the references are ``targets`` when given (e.g.
        :meth:`S2EFTargets.from_atoms`, where structures may lack some), else the batch's.
        Forces are evaluated on free atoms only unless ``free_only=False``."""
        targets = targets if targets is not None else S2EFTargets.from_batch(batch)
        natoms = batch.natoms.detach().cpu()
        s, n = len(natoms), int(natoms.sum())
        if targets.energy.shape != (s,) or targets.forces.shape != (n, 3):
            raise ValueError(
                f"targets for {tuple(targets.energy.shape)} structures / {tuple(targets.forces.shape)} forces, "
                f"batch of {s} structures and {n} atoms"
            )
        structure = torch.repeat_interleave(torch.arange(s), natoms)
        sums = dict.fromkeys(_SUMS, 0.0)
        sums["structures"] = float(s)

        has_energy = targets.has_energy.cpu() & ("energy" in prediction)
        energy_error = torch.zeros(s, dtype=torch.float64)
        if "energy" in prediction:
            energy = prediction["energy"].detach().double().cpu().reshape(-1)
            energy_error = torch.where(has_energy, (energy - targets.energy).abs(), 0.0)
        sums["energy_structures"] = float(has_energy.sum())
        sums["energy_abs"] = float(energy_error.sum())
        sums["energy_abs_per_atom"] = float((energy_error / natoms).sum())
        sums["energy_sq"] = float((energy_error**2).sum())

        has_forces = targets.has_forces.cpu() & ("forces" in prediction)
        worst = torch.full((s,), math.inf, dtype=torch.float64)  # EFwT fails without forces
        if has_forces.any():
            forces = prediction["forces"].detach().double().cpu()
            target = targets.forces
            evaluated = has_forces[structure]
            if free_only:
                evaluated &= ~batch.fixed.detach().cpu()
            error = (forces - target)[evaluated]
            sums["force_structures"] = float(has_forces.sum())
            sums["force_components"] = float(error.numel())
            sums["force_abs"] = float(error.abs().sum())
            sums["force_atoms"] = float(evaluated.sum())
            sums["force_l2"] = float(torch.linalg.vector_norm(error, dim=1).sum())
            cos = torch.nn.functional.cosine_similarity(forces[evaluated], target[evaluated], dim=1)
            sums["force_cos"] = float(cos.sum())
            # largest evaluated component error per structure (0 for one without free atoms)
            per_atom = torch.where(evaluated, (forces - target).abs().amax(dim=1), 0.0)
            worst = torch.zeros(s, dtype=torch.float64).scatter_reduce(0, structure, per_atom, "amax")
        both = has_energy & has_forces
        sums["efwt_structures"] = float(both.sum())
        sums["efwt"] = float((both & (energy_error < EFWT_ENERGY) & (worst < EFWT_FORCE)).sum())
        self.sums += torch.tensor([sums[k] for k in _SUMS], dtype=torch.float64)

    def merge(self, other: "S2EFMetrics") -> None:
        """Add another accumulator's sums (e.g. another rank's)."""
        self.sums += other.sums

    def compute(self) -> dict[str, float]:
        """The metrics (see the module docstring) and the structures each covers
        (``num_energy_structures``: energy metrics, ``num_force_structures``: force metrics,
        ``num_efwt_structures``: EFwT). A metric with no structure to cover is NaN (for
        reports and JSON, :func:`json_safe` turns it into None)."""
        s = dict(zip(_SUMS, self.sums.tolist()))

        def ratio(a: str, b: str) -> float:
            return s[a] / s[b] if s[b] else float("nan")

        return {
            "energy_mae": ratio("energy_abs", "energy_structures"),
            "energy_mae_per_atom": ratio("energy_abs_per_atom", "energy_structures"),
            "energy_rmse": float(np.sqrt(ratio("energy_sq", "energy_structures"))),
            "force_mae": ratio("force_abs", "force_components"),
            "force_cos": ratio("force_cos", "force_atoms"),
            "force_l2mae": ratio("force_l2", "force_atoms"),
            "efwt": ratio("efwt", "efwt_structures"),
            "num_structures": int(s["structures"]),
            "num_energy_structures": int(s["energy_structures"]),
            "num_force_structures": int(s["force_structures"]),
            "num_efwt_structures": int(s["efwt_structures"]),
            "num_force_atoms": int(s["force_atoms"]),
        }


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an undefined metric) replaced by None and numpy
    scalars / tuples turned into plain JSON types, for ``json.dumps(..., allow_nan=False)``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


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
    predicted, reference = np.asarray(predicted, float).reshape(-1), np.asarray(reference, float).reshape(-1)
    if predicted.shape != reference.shape:
        raise ValueError(f"{predicted.size} predicted relaxed energies for {reference.size} references")
    error = np.abs(predicted - reference)
    if error.size == 0:
        return {"energy_mae": float("nan"), "ewt": float("nan")}
    return {"energy_mae": float(error.mean()), "ewt": float((error < EWT_ENERGY).mean())}
