"""Running a model over data sets: S2EF metrics, relaxations for IS2RE / IS2RS, baselines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from ..data.batch import AtomicBatch
from ..models.scn import SCN
from .metrics import (
    S2EFMetrics,
    average_distance_within_threshold,
    average_force_below_threshold,
    minimum_image_distances,
    relaxed_energy_metrics,
)

__all__ = ["evaluate_s2ef", "evaluate_relaxations", "per_element_baseline", "s2ef_baseline"]


def _batches(dataset: Sequence[Atoms], batch_size: int, limit: int | None) -> Any:
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, count, batch_size):
        yield [dataset[i] for i in range(start, min(count, start + batch_size))]


@torch.no_grad()
def evaluate_s2ef(
    model: SCN | Callable[[AtomicBatch], dict[str, torch.Tensor]],
    dataset: Sequence[Atoms],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_structures: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """S2EF metrics (:class:`~.metrics.S2EFMetrics`) of ``model`` on ``dataset`` (structures
    with reference energies and forces; forces evaluated on free atoms)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    metrics = S2EFMetrics()
    batches = _batches(dataset, batch_size, max_structures)
    if progress:
        from tqdm import tqdm

        total = -(-min(len(dataset), max_structures or len(dataset)) // batch_size)
        batches = tqdm(batches, total=total, desc="S2EF", unit="batch", leave=False)
    for frames in batches:
        batch = AtomicBatch.from_atoms(frames, dtype=dtype, device=device)
        metrics.update(model(batch), batch)
    return metrics.compute()


def per_element_baseline(element_energies: dict[int, float]) -> Callable[[AtomicBatch], dict[str, torch.Tensor]]:
    """The trivial model: energy = sum of per-element reference energies, forces = 0 (the best
    constant force, as OC20 forces average to zero)."""
    table = torch.zeros(max(int(z) for z in element_energies) + 1 if element_energies else 1, dtype=torch.float64)
    for z, value in element_energies.items():
        table[int(z)] = value

    def predict(batch: AtomicBatch) -> dict[str, torch.Tensor]:
        z = batch.atomic_numbers.clamp(max=len(table) - 1)
        per_atom = table.to(batch.positions.device)[z]
        energy = torch.zeros(batch.num_structures, dtype=torch.float64, device=per_atom.device)
        energy = energy.index_add(0, batch.batch, per_atom)
        return {"energy": energy, "forces": torch.zeros_like(batch.positions)}

    return predict


def s2ef_baseline(dataset: Sequence[Atoms], element_energies: dict[int, float], **kwargs: Any) -> dict[str, float]:
    """S2EF metrics of :func:`per_element_baseline` on ``dataset``."""
    return evaluate_s2ef(per_element_baseline(element_energies), dataset, **kwargs)


def evaluate_relaxations(
    calculator: Calculator,
    initial: Sequence[Atoms],
    optimizer: str = "BFGS",
    fmax: float = 0.05,
    steps: int = 200,
    reference_calculator: Callable[[], Calculator] | None = None,
    max_structures: int | None = None,
    trajectory_dir: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Relax initial structures with the model; IS2RE and IS2RS metrics.

    Each structure of ``initial`` carries ``info["relaxed_energy"]`` (IS2RE target, eV)
    and/or an array ``relaxed_positions`` (IS2RS target). With ``reference_calculator`` (a
    factory, e.g. ``ase.calculators.emt.EMT`` for the built-in data), the true forces at the
    model-relaxed structures give AFbT.

    Returns ``{"is2re": {"energy_mae", "ewt"}, "is2rs": {"adwt", "afbt"?, "mean_distance"},
    "converged_fraction", "mean_steps", "num_structures", "relaxations": [...]}``.
    """
    from ..simulation.relax import max_free_force, relax

    count = len(initial) if max_structures is None else min(max_structures, len(initial))
    items = range(count)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="relax", unit="structure", leave=False)
    energies, targets, distances, true_forces, records = [], [], [], [], []
    for index in items:
        atoms = initial[index]
        trajectory = f"{trajectory_dir}/{index:05d}.traj" if trajectory_dir else None
        result = relax(atoms, calculator, optimizer=optimizer, fmax=fmax, steps=steps, trajectory=trajectory)
        record = {"index": index, "converged": result.converged, "steps": result.steps, "energy": result.energy}
        if "relaxed_energy" in atoms.info:
            energies.append(result.energy)
            targets.append(float(atoms.info["relaxed_energy"]))
            record["relaxed_energy"] = targets[-1]
        if "relaxed_positions" in atoms.arrays:
            free = ~_fixed_mask(atoms)
            d = minimum_image_distances(result.atoms.positions[free], atoms.arrays["relaxed_positions"][free], atoms.cell.array, atoms.pbc)
            distances.append(float(d.mean()) if d.size else 0.0)
            record["mean_distance"] = distances[-1]
        if reference_calculator is not None:
            probe = result.atoms.copy()
            probe.calc = reference_calculator()
            true_forces.append(max_free_force(probe))
            record["true_max_force"] = true_forces[-1]
        records.append(record)
    out: dict[str, Any] = {
        "num_structures": count,
        "converged_fraction": float(np.mean([r["converged"] for r in records])) if records else float("nan"),
        "mean_steps": float(np.mean([r["steps"] for r in records])) if records else float("nan"),
        "relaxations": records,
    }
    if energies:
        out["is2re"] = relaxed_energy_metrics(energies, targets)
    if distances:
        out["is2rs"] = {"adwt": average_distance_within_threshold(distances), "mean_distance": float(np.mean(distances))}
        if true_forces:
            out["is2rs"]["afbt"] = average_force_below_threshold(true_forces)
    return out


def _fixed_mask(atoms: Atoms) -> np.ndarray:
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.get_indices()] = True
    return mask
