"""A batch of atomic structures as flat tensors (the layout the SCN model consumes)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from .validation import validate_batch

if TYPE_CHECKING:
    import ase

__all__ = ["AtomicBatch"]

_FLOAT_FIELDS = ("positions", "cell", "energy", "forces")


@dataclass
class AtomicBatch:
    """S structures with N atoms in all, concatenated.

    Attributes:
        positions: [N, 3] float, Cartesian positions (Angstrom); need not be wrapped.
        atomic_numbers: [N] long.
        cell: [S, 3, 3] float, cell vectors as rows (Angstrom). May be zero for a
            structure that is periodic along no axis.
        pbc: [S, 3] bool, periodicity per cell axis.
        natoms: [S] long, atoms per structure.
        batch: [N] long, structure index of each atom (non-decreasing).
        fixed: [N] bool, atoms held by an ASE ``FixAtoms`` constraint.
        tags: [N] long, OC20 tags (0 sub-surface, 1 surface, 2 adsorbate); 0 if absent.
        energy: [S] float target energies, or None.
        forces: [N, 3] float target forces, or None.
    """

    positions: torch.Tensor
    atomic_numbers: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    natoms: torch.Tensor
    batch: torch.Tensor
    fixed: torch.Tensor
    tags: torch.Tensor
    energy: Optional[torch.Tensor] = None
    forces: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_atoms(
        cls,
        atoms_list: Sequence[ase.Atoms],
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ) -> "AtomicBatch":
        """Batch ASE structures.

        ``energy`` / ``forces`` are read from the results stored on ``atoms.calc``
        (e.g. a SinglePointCalculator, as ``ase.io.read`` attaches); they are set only
        if every structure has them, else None. Calls :meth:`validate`.
        """
        from ase.constraints import FixAtoms

        atoms_list = list(atoms_list)
        if not atoms_list:
            raise ValueError("AtomicBatch.from_atoms: empty list of structures")

        positions, numbers, cells, pbcs, natoms, fixed, tags = [], [], [], [], [], [], []
        energies: list[Optional[float]] = []
        forces: list[Optional[np.ndarray]] = []
        for atoms in atoms_list:
            n = len(atoms)
            positions.append(np.asarray(atoms.get_positions(), dtype=np.float64).reshape(n, 3))
            numbers.append(np.asarray(atoms.get_atomic_numbers(), dtype=np.int64))
            cells.append(np.asarray(atoms.cell.array, dtype=np.float64))
            pbcs.append(np.asarray(atoms.pbc, dtype=bool))
            natoms.append(n)
            fix = np.zeros(n, dtype=bool)
            for constraint in atoms.constraints:
                if isinstance(constraint, FixAtoms):
                    fix[np.asarray(constraint.get_indices(), dtype=np.int64)] = True
            fixed.append(fix)
            tags.append(np.asarray(atoms.get_tags(), dtype=np.int64))
            # Read stored results directly: calling get_potential_energy() could
            # trigger a (possibly expensive) calculation.
            results = getattr(atoms.calc, "results", None) or {}
            e = results.get("energy")
            energies.append(None if e is None else float(np.asarray(e).reshape(())))
            f = results.get("forces")
            forces.append(None if f is None else np.asarray(f, dtype=np.float64).reshape(-1, 3))

        counts = torch.tensor(natoms, dtype=torch.long)
        out = cls(
            positions=torch.from_numpy(np.concatenate(positions)).to(dtype),
            atomic_numbers=torch.from_numpy(np.concatenate(numbers)),
            cell=torch.from_numpy(np.stack(cells)).to(dtype),
            pbc=torch.from_numpy(np.stack(pbcs)),
            natoms=counts,
            # numpy: torch's parallel repeat_interleave took ~20 ms on two busy cores
            batch=torch.from_numpy(np.repeat(np.arange(len(atoms_list), dtype=np.int64), natoms)),
            fixed=torch.from_numpy(np.concatenate(fixed)),
            tags=torch.from_numpy(np.concatenate(tags)),
            energy=(
                torch.tensor(energies, dtype=dtype)
                if all(e is not None for e in energies)
                else None
            ),
            forces=(
                torch.from_numpy(np.concatenate(forces)).to(dtype)
                if all(f is not None for f in forces)
                else None
            ),
        )
        out.validate()
        return out.to(device=device) if device is not None else out

    @classmethod
    def concatenate(cls, batches: Sequence["AtomicBatch"]) -> "AtomicBatch":
        """Join batches into one (structures in order). Targets are kept only if all
        batches have them. Tensors must share device and float dtype."""
        batches = list(batches)
        if not batches:
            raise ValueError("AtomicBatch.concatenate: empty list of batches")
        offsets = torch.cumsum(torch.tensor([0] + [b.num_structures for b in batches[:-1]]), 0)
        energy = (
            torch.cat([b.energy for b in batches])
            if all(b.energy is not None for b in batches)
            else None
        )
        forces = (
            torch.cat([b.forces for b in batches])
            if all(b.forces is not None for b in batches)
            else None
        )
        return cls(
            positions=torch.cat([b.positions for b in batches]),
            atomic_numbers=torch.cat([b.atomic_numbers for b in batches]),
            cell=torch.cat([b.cell for b in batches]),
            pbc=torch.cat([b.pbc for b in batches]),
            natoms=torch.cat([b.natoms for b in batches]),
            batch=torch.cat([b.batch + int(o) for b, o in zip(batches, offsets)]),
            fixed=torch.cat([b.fixed for b in batches]),
            tags=torch.cat([b.tags for b in batches]),
            energy=energy,
            forces=forces,
        )

    def split(self) -> list["AtomicBatch"]:
        """One single-structure batch per structure."""
        sizes = self.natoms.tolist()

        def per_atom(t: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
            return [None] * len(sizes) if t is None else list(torch.split(t, sizes))

        out = []
        for s, (pos, z, fix, tag, frc) in enumerate(
            zip(
                per_atom(self.positions),
                per_atom(self.atomic_numbers),
                per_atom(self.fixed),
                per_atom(self.tags),
                per_atom(self.forces),
            )
        ):
            out.append(
                AtomicBatch(
                    positions=pos,
                    atomic_numbers=z,
                    cell=self.cell[s : s + 1],
                    pbc=self.pbc[s : s + 1],
                    natoms=self.natoms[s : s + 1],
                    batch=torch.zeros_like(z),
                    fixed=fix,
                    tags=tag,
                    energy=None if self.energy is None else self.energy[s : s + 1],
                    forces=frc,
                )
            )
        return out

    # ------------------------------------------------------------------ conversion
    def to(
        self,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "AtomicBatch":
        """New batch on ``device``; float tensors cast to ``dtype``, integer/bool unchanged."""
        changes = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                continue
            if f.name in _FLOAT_FIELDS:
                changes[f.name] = t.to(device=device, dtype=dtype)
            else:
                changes[f.name] = t.to(device=device)
        return replace(self, **changes)

    @property
    def num_structures(self) -> int:
        return int(self.natoms.shape[0])

    @property
    def num_atoms(self) -> int:
        return int(self.positions.shape[0])

    def __len__(self) -> int:
        return self.num_structures

    # ------------------------------------------------------------------ checks
    def validate(self, *, max_atomic_number: Optional[int] = None, check_overlaps: bool = False) -> None:
        """Raise :class:`~spherical_channels.data.validation.StructureError` (a ValueError
        naming the structure and atoms) for malformed input: the checks of
        :func:`~spherical_channels.data.validation.validate_batch`."""
        validate_batch(self, max_atomic_number=max_atomic_number, check_overlaps=check_overlaps)
