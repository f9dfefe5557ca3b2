"""An ASE calculator around an SCN model, for relaxations and molecular dynamics."""

from __future__ import annotations

from pathlib import Path

import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from ..data.batch import AtomicBatch
from ..models.checkpoint import load_model
from ..models.response import voigt
from ..models.scn import SCN

__all__ = ["SCNCalculator"]


class SCNCalculator(Calculator):
    """Energies, forces and (energy-conserving models) stress from an SCN, the way ASE expects.

    Args:
        model: a checkpoint path (this package's or an official OC20 SCN or SchNet checkpoint,
            or an ``scn export`` artefact, which needs ``trust_pickle=True``),
            an :class:`~spherical_channels.models.SCN`, a :class:`~spherical_channels.models.SchNet`,
            or any module with the same interface
            (``model(batch, stress=...)``, attributes ``conservative`` and ``regress_forces``).
        device: torch device (``"cpu"``, ``"cuda"``, ...).
        dtype: ``torch.float32`` (default) or ``torch.float64``.
        rotation_average: average the prediction over this many random global rotations
            (forces rotated back), which reduces SCN's small equivariance error at the cost
            of that many model evaluations; 0 (default) evaluates the structure as given.
        seed: seed of the rotations (the same structure always gets the same prediction).
        weights: for checkpoints, ``"auto"`` (EMA weights when present), ``"ema"`` or ``"raw"``.
        trust_pickle: allow official checkpoints that need full unpickling (runs code from the
            file; see :func:`~spherical_channels.models.checkpoint.read_checkpoint`).

    Predictions are deterministic: the model runs in eval mode with the fixed roll rule.
    ``free_energy`` equals ``energy`` (no electronic entropy). ``stress`` (eV/Å^3, ASE's Voigt
    order) is the strain derivative of the energy, so it exists for energy-conserving models
    (``direct_forces=False``) on structures periodic along all three axes; a direct-force model
    raises ``PropertyNotImplementedError`` saying why. With stress, cell relaxations work, e.g.
    ``ase.optimize.FIRE(ase.filters.FrechetCellFilter(atoms))``.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model: SCN | torch.nn.Module | str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        rotation_average: int = 0,
        seed: int = 0,
        weights: str = "auto",
        trust_pickle: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if rotation_average < 0:
            raise ValueError(f"rotation_average must be >= 0, got {rotation_average}")
        if isinstance(model, torch.nn.Module):
            self.model = model.to(device=device, dtype=dtype)
        else:
            self.model = load_model(model, weights=weights, device=device, dtype=dtype, trust_pickle=trust_pickle)
        self.model.eval()
        if not self.model.regress_forces:
            raise ValueError("this model does not predict forces (regress_forces=False)")
        self.device, self.dtype = torch.device(device), dtype
        self.rotation_average = rotation_average
        self.seed = seed

    def get_property(self, name: str, atoms: Atoms | None = None, allow_calculation: bool = True):  # noqa: ANN201
        if name == "stress":
            self._check_stress(atoms if atoms is not None else self.atoms)
        return super().get_property(name, atoms, allow_calculation)

    def _check_stress(self, atoms: Atoms | None) -> None:
        if not getattr(self.model, "has_stress", True):
            raise PropertyNotImplementedError(
                "stress: an exported model computes energies and forces only; use its checkpoint for stress"
            )
        if not self.model.conservative:
            raise PropertyNotImplementedError(
                "stress: this model predicts forces with a direct force head (direct_forces=True), "
                "which are not the gradient of an energy, so it has no stress; cell relaxations "
                "need an energy-conserving model (direct_forces=False)"
            )
        if atoms is not None and not all(atoms.pbc):
            raise PropertyNotImplementedError(
                f"stress: needs a structure periodic along all three axes (pbc={atoms.pbc.tolist()})"
            )

    def calculate(self, atoms: Atoms | None = None, properties=None, system_changes=all_changes) -> None:  # noqa: ANN001
        super().calculate(atoms, properties, system_changes)
        stress = "stress" in (properties or ())
        if stress:
            self._check_stress(self.atoms)
        batch = AtomicBatch.from_atoms([self.atoms], dtype=self.dtype, device=self.device)
        if self.rotation_average:
            out = self._rotation_averaged(batch, stress)
        else:
            with torch.no_grad():
                out = self.model(batch, stress=stress)
        energy = float(out["energy"][0].detach())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().double().numpy(),
        }
        if stress:
            self.results["stress"] = voigt(out["stress"][0]).detach().cpu().double().numpy()

    def _rotation_averaged(self, batch: AtomicBatch, stress: bool) -> dict[str, torch.Tensor]:
        from ..diagnostics.equivariance import random_rotations, rotate_batch

        rotations = random_rotations(self.rotation_average, torch.Generator().manual_seed(self.seed))
        total: dict[str, torch.Tensor] = {}
        for rotation in rotations.to(self.device, self.dtype):
            with torch.no_grad():
                out = self.model(rotate_batch(batch, rotation), stress=stress)
            # rotate back: R^T F for row vectors, R^T sigma R for the stress
            back = {"energy": out["energy"].double(), "forces": (out["forces"] @ rotation).double()}
            if stress:
                back["stress"] = (rotation.T.unsqueeze(0) @ out["stress"] @ rotation).double()
            for key, value in back.items():
                total[key] = total[key] + value if key in total else value
        return {key: value / len(rotations) for key, value in total.items()}

