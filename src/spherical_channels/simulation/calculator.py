"""An ASE calculator around an SCN model, for relaxations and molecular dynamics."""

from __future__ import annotations

from pathlib import Path

import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from ..data.batch import AtomicBatch
from ..models.checkpoint import load_model
from ..models.scn import SCN

__all__ = ["SCNCalculator"]


class SCNCalculator(Calculator):
    """Energies and forces from an SCN, the way ASE expects them.

    Args:
        model: a checkpoint path (this package's or an official OC20 SCN checkpoint) or an
            :class:`~spherical_channels.models.SCN`.
        device: torch device (``"cpu"``, ``"cuda"``, ...).
        dtype: ``torch.float32`` (default) or ``torch.float64``.
        rotation_average: average the prediction over this many random global rotations
            (forces rotated back), which reduces SCN's small equivariance error at the cost
            of that many model evaluations; 0 (default) evaluates the structure as given.
        seed: seed of the rotations (the same structure always gets the same prediction).
        weights: for checkpoints, ``"auto"`` (EMA weights when present), ``"ema"`` or ``"raw"``.

    Predictions are deterministic: the model runs in eval mode with the fixed roll rule.
    ``free_energy`` equals ``energy`` (no electronic entropy). Stress is not available.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(
        self,
        model: SCN | str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        rotation_average: int = 0,
        seed: int = 0,
        weights: str = "auto",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if rotation_average < 0:
            raise ValueError(f"rotation_average must be >= 0, got {rotation_average}")
        if isinstance(model, SCN):
            self.model = model.to(device=device, dtype=dtype)
        else:
            self.model = load_model(model, weights=weights, device=device, dtype=dtype)
        self.model.eval()
        if not self.model.regress_forces:
            raise ValueError("this model does not predict forces (regress_forces=False)")
        self.device, self.dtype = torch.device(device), dtype
        self.rotation_average = rotation_average
        self.seed = seed

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes) -> None:  # noqa: ANN001
        super().calculate(atoms, properties, system_changes)
        batch = AtomicBatch.from_atoms([self.atoms], dtype=self.dtype, device=self.device)
        if self.rotation_average:
            energy, forces = self._rotation_averaged(batch)
        else:
            with torch.no_grad():
                out = self.model(batch)
            energy, forces = out["energy"][0], out["forces"]
        energy = float(energy.detach())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": forces.detach().cpu().double().numpy(),
        }

    def _rotation_averaged(self, batch: AtomicBatch) -> tuple[torch.Tensor, torch.Tensor]:
        from ..diagnostics.equivariance import random_rotations, rotate_batch

        rotations = random_rotations(self.rotation_average, torch.Generator().manual_seed(self.seed))
        energy, forces = 0.0, torch.zeros_like(batch.positions, dtype=torch.float64)
        for rotation in rotations.to(self.device, self.dtype):
            with torch.no_grad():
                out = self.model(rotate_batch(batch, rotation))
            energy = energy + out["energy"][0].double()
            forces += (out["forces"] @ rotation).double()  # R^T F for row vectors
        n = len(rotations)
        return energy / n, forces / n

