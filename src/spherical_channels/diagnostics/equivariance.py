"""How far a model is from rotation equivariance (paper Appendix A, eqs. 13-14).

For a structure and a randomly rotated copy, the energy MAD is ``|E(x) - E(Rx)|`` and the force
MAD is ``mean |F(x) - R^T F(Rx)|`` over atoms and components; both are averaged over structures
and rotations. An exactly equivariant model gives 0 up to rounding.

:class:`AbsDifference` accumulates such differences over batches (also for the block-level
measurements of :mod:`.aggregation` and :mod:`.output_heads`), and
:func:`rotation_differences` is the whole-model measurement on one batch for given rotations.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from e3nn import o3

from ..data.batch import AtomicBatch

__all__ = [
    "AbsDifference",
    "NonFiniteOutput",
    "draw_rotations",
    "random_rotations",
    "rotate_batch",
    "rotate_coefficients",
    "rotation_differences",
    "rotation_mad",
]


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


def draw_rotations(num_structures: int, num_rotations: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``num_rotations`` draws of one rotation per structure: a list of float64 ``[S, 3, 3]``
    (the order :func:`rotation_mad` has always drawn them in)."""
    if num_rotations < 1:
        raise ValueError(f"num_rotations must be >= 1, got {num_rotations}")
    return [random_rotations(num_structures, generator) for _ in range(num_rotations)]


def _no_autocast(reference: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=reference.device.type, enabled=False)


def rotate_coefficients(wigner: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``wigner [N, K, K] @ coefficients [N, K, C]``, computed in float64 and returned in the
    coefficients' dtype, outside autocast: the rotation is the instrument, and must not add
    rounding of its own to what it measures."""
    with _no_autocast(coefficients):
        out = torch.matmul(wigner.to(torch.float64), coefficients.to(torch.float64))
    return out.to(coefficients.dtype)


class NonFiniteOutput(ValueError):
    """The model gave NaN or inf where a difference was to be measured."""


@dataclass
class AbsDifference:
    """Running sums for a mean absolute difference and the scale it is put in.

    ``add(reference, other)`` adds ``|other - reference|`` element-wise (float64); the scale is
    the mean ``|reference|``. ``mad`` and ``mean_abs`` are ``nan`` (``summary``: ``None``) until
    something was added.
    """

    total: float = 0.0
    scale_total: float = 0.0
    maximum: float = 0.0
    count: int = 0

    def add(self, reference: torch.Tensor, other: torch.Tensor, what: str = "output") -> None:
        """Add the element-wise differences of two same-shape tensors; a non-finite value is a
        :class:`NonFiniteOutput` naming ``what`` (a silent NaN would poison every mean)."""
        if reference.shape != other.shape:
            raise ValueError(f"{what}: shapes differ, {tuple(reference.shape)} and {tuple(other.shape)}")
        ref = reference.detach().to(torch.float64)
        diff = (other.detach().to(torch.float64) - ref).abs()
        if not (torch.isfinite(ref).all() and torch.isfinite(diff).all()):
            raise NonFiniteOutput(f"{what}: the model gives non-finite values (overflow in this precision?)")
        if diff.numel() == 0:
            return
        self.total += float(diff.sum())
        self.scale_total += float(ref.abs().sum())
        self.maximum = max(self.maximum, float(diff.max()))
        self.count += diff.numel()

    def merge(self, other: "AbsDifference") -> None:
        """Add another accumulator's sums to this one."""
        self.total += other.total
        self.scale_total += other.scale_total
        self.maximum = max(self.maximum, other.maximum)
        self.count += other.count

    @property
    def mad(self) -> float:
        """Mean absolute difference."""
        return self.total / self.count if self.count else math.nan

    @property
    def mean_abs(self) -> float:
        """Mean absolute value of the reference."""
        return self.scale_total / self.count if self.count else math.nan

    @property
    def percent(self) -> float | None:
        """``100 * mad / mean_abs`` (``None`` when the reference is all zero or empty)."""
        if not self.count or self.scale_total == 0.0:
            return None
        return 100.0 * self.total / self.scale_total

    def summary(self) -> dict[str, float | int | None]:
        """``{"mad", "mean_abs", "percent", "max", "count"}``, JSON-ready (``None`` if empty)."""
        if not self.count:
            return {"mad": None, "mean_abs": None, "percent": None, "max": None, "count": 0}
        return {"mad": self.mad, "mean_abs": self.mean_abs, "percent": self.percent,
                "max": self.maximum, "count": self.count}


def rotation_differences(
    model: torch.nn.Module,
    batch: AtomicBatch,
    rotations: Sequence[torch.Tensor],
    errors: bool = False,
) -> dict[str, AbsDifference]:
    """Whole-model differences under the given rotations (paper eqs. 13-14) on one batch.

    Args:
        model: any model ``model(batch) -> {"energy": [S], "forces": [N, 3]}``, in the mode to
            measure (eval: deterministic).
        rotations: per draw, ``[S, 3, 3]`` (one rotation per structure).
        errors: also ``"energy_error"`` / ``"force_error"``: the unrotated prediction against the
            batch's reference labels (where it has them), the paper's MAE column.

    Returns:
        ``{"energy": AbsDifference, "forces": ...}`` (forces only for models that predict them).
    """
    # direct-force models need no graph; conservative ones take their derivatives themselves
    grad = contextlib.nullcontext() if getattr(model, "conservative", False) else torch.no_grad()
    with grad:
        reference = model(batch)
        out = {"energy": AbsDifference()}
        has_forces = "forces" in reference
        if has_forces:
            out["forces"] = AbsDifference()
        for rotation in rotations:
            rotation = rotation.to(device=batch.positions.device, dtype=torch.float64)
            # the rotations are the instrument: never autocast, forces turned back in float64
            with _no_autocast(batch.positions):
                rotated_batch = rotate_batch(batch, rotation)
            rotated = model(rotated_batch)
            out["energy"].add(reference["energy"], rotated["energy"], "energy")
            if has_forces:
                with _no_autocast(batch.positions):
                    back = torch.einsum("nji,nj->ni", rotation[batch.batch], rotated["forces"].to(torch.float64))
                out["forces"].add(reference["forces"], back, "forces")
    if errors:
        if batch.energy is not None:
            out["energy_error"] = AbsDifference()
            out["energy_error"].add(batch.energy, reference["energy"], "energy")
        if has_forces and batch.forces is not None:
            out["force_error"] = AbsDifference()
            out["force_error"].add(batch.forces, reference["forces"], "forces")
    return out


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
    rotations = draw_rotations(batch.num_structures, num_rotations, torch.Generator().manual_seed(seed))
    diffs = rotation_differences(model, batch, rotations)
    out = {"energy_mad": diffs["energy"].mad, "energy_mean_abs": diffs["energy"].mean_abs}
    if "forces" in diffs:
        out["force_mad"] = diffs["forces"].mad
        out["force_mean_abs"] = diffs["forces"].mean_abs
    return out
