"""Dataset statistics a trainer stores with the model: per-element reference energies
(linear fit of energy to composition), the per-atom residual energy's mean and spread,
the force RMS and the mean structure size.

Computed once over the training set (OC20 / MACE practice: the model predicts
``sum_Z n_Z e_Z`` plus a learned, normalised correction).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .formats.common import stored_results

if TYPE_CHECKING:
    import ase

__all__ = ["DatasetStatistics", "compute_statistics"]


@dataclass
class DatasetStatistics:
    """Statistics of a set of structures.

    Attributes:
        element_energies: per-element reference energy e_Z (eV) from the least-squares fit
            E_s ~ sum_Z n_{s,Z} e_Z; 0.0 for requested elements absent from the data.
        energy_per_atom_mean / energy_per_atom_std: mean and (population) standard
            deviation of the residual (E_s - sum_Z n_{s,Z} e_Z) / N_s (eV/atom); None
            without energies.
        force_rms: root mean square of all force components (eV/A); None without forces.
        mean_num_atoms: mean atoms per structure.
        num_structures: structures used.
        elements: atomic numbers present, sorted.
        missing_elements: atomic numbers asked for but absent (their e_Z is 0.0).
        num_with_energy / num_with_forces: structures that had each target.
    """

    element_energies: dict[int, float]
    energy_per_atom_mean: Optional[float]
    energy_per_atom_std: Optional[float]
    force_rms: Optional[float]
    mean_num_atoms: float
    num_structures: int
    elements: list[int]
    missing_elements: list[int] = field(default_factory=list)
    num_with_energy: int = 0
    num_with_forces: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (element keys as strings); inverse of :meth:`from_dict`."""
        out = asdict(self)
        out["element_energies"] = {str(z): float(e) for z, e in self.element_energies.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DatasetStatistics":
        """Rebuild from :meth:`to_dict` output (also after a JSON round trip)."""
        data = dict(data)
        data["element_energies"] = {int(z): float(e) for z, e in data["element_energies"].items()}
        data["elements"] = [int(z) for z in data["elements"]]
        data["missing_elements"] = [int(z) for z in data.get("missing_elements", [])]
        return cls(**data)

    def reference_energy(self, numbers: Sequence[int]) -> float:
        """sum_Z e_Z over the atoms with atomic ``numbers`` (unknown elements count 0)."""
        return float(sum(self.element_energies.get(int(z), 0.0) for z in numbers))


def compute_statistics(
    dataset: Iterable["ase.Atoms"],
    max_structures: Optional[int] = None,
    progress: bool = True,
    elements: Optional[Sequence[int]] = None,
) -> DatasetStatistics:
    """Statistics of the first ``max_structures`` structures of ``dataset`` (any iterable
    of ``ase.Atoms`` with stored results, e.g. a :class:`StructureDataset`), in one pass.

    ``elements``: atomic numbers to report energies for (e.g. all a model embeds);
    those absent from the data get 0.0 and are listed in ``missing_elements``. Default:
    the elements present. The fit is ``numpy.linalg.lstsq`` over the structures that have
    an energy; when compositions are linearly dependent (e.g. only H2O) the
    minimum-norm solution is used and a warning says so.
    """
    from tqdm import tqdm

    total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    if max_structures is not None and total is not None:
        total = min(total, max_structures)
    compositions: list[tuple[np.ndarray, np.ndarray]] = []  # (unique Z, counts) per energy row
    energies: list[float] = []
    sizes: list[int] = []
    present: set[int] = set()
    force_sq, force_count, num_with_forces = 0.0, 0, 0
    structures = dataset if max_structures is None else islice(dataset, max_structures)
    for atoms in tqdm(structures, total=total, desc="stats", unit="structure", disable=not progress):
        numbers = np.asarray(atoms.numbers)
        unique, counts = np.unique(numbers, return_counts=True)
        present.update(int(z) for z in unique)
        sizes.append(len(numbers))
        results = stored_results(atoms)
        if results.get("energy") is not None:
            compositions.append((unique, counts))
            energies.append(float(np.asarray(results["energy"]).reshape(())))
        if results.get("forces") is not None:
            f = np.asarray(results["forces"], dtype=np.float64)
            force_sq += float(np.einsum("ij,ij->", f, f))
            force_count += f.size
            num_with_forces += 1

    found = sorted(present)
    wanted = found if elements is None else sorted({int(z) for z in elements})
    fitted = _fit_element_energies(compositions, np.asarray(energies), found)
    residual_mean = residual_std = None
    if energies:
        natoms = np.array([c.sum() for _, c in compositions], dtype=np.float64)
        reference = np.array([sum(fitted[int(z)] * n for z, n in zip(u, c)) for u, c in compositions])
        per_atom = (np.asarray(energies) - reference) / natoms
        residual_mean, residual_std = float(per_atom.mean()), float(per_atom.std())
    return DatasetStatistics(
        element_energies={z: fitted.get(z, 0.0) for z in sorted(set(wanted) | set(found))},
        energy_per_atom_mean=residual_mean,
        energy_per_atom_std=residual_std,
        force_rms=math.sqrt(force_sq / force_count) if force_count else None,
        mean_num_atoms=float(np.mean(sizes)) if sizes else 0.0,
        num_structures=len(sizes),
        elements=found,
        missing_elements=[z for z in wanted if z not in present],
        num_with_energy=len(energies),
        num_with_forces=num_with_forces,
    )


def _fit_element_energies(
    compositions: list[tuple[np.ndarray, np.ndarray]], energies: np.ndarray, elements: list[int]
) -> dict[int, float]:
    """Least-squares e_Z with E_s ~ sum_Z n_{s,Z} e_Z (elements without energies: 0)."""
    if not compositions:
        return {}
    column = {z: i for i, z in enumerate(elements)}
    counts = np.zeros((len(compositions), len(elements)))  # [S, num elements]
    for row, (unique, n) in enumerate(compositions):
        counts[row, [column[int(z)] for z in unique]] = n
    solution, _, rank, _ = np.linalg.lstsq(counts, energies, rcond=None)
    used = counts.any(axis=0)
    if rank < int(used.sum()):
        warnings.warn(
            f"element energies are not determined by these {len(energies)} compositions "
            f"(rank {rank} < {int(used.sum())} elements); using the minimum-norm fit",
            stacklevel=3,
        )
    return {z: float(solution[i]) if used[i] else 0.0 for z, i in column.items()}
