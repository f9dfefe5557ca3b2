"""Forces and stress as a response of the energy: one place for the derivatives.

A model provides ``energy_terms(batch, positions, cell, graph) -> {"energy": [S], ...}``, the
energy (and, for a direct-force model, ``"forces"`` from its force head) of the structures at the
given positions ``[N, 3]`` and cells ``[S, 3, 3]``, and says whether it is ``conservative``.
:func:`compute_response` then gives

* ``forces = -dE/dx`` for a conservative model (by autograd), or the force head's output;
* ``stress = (1/V) dE/d(strain)`` ``[S, 3, 3]`` for a conservative model: a symmetric strain
  ``eps`` deforms positions and cell as ``x -> x (I + eps)``, ``cell -> cell (I + eps)``, and the
  derivative is taken at ``eps = 0`` (ASE's sign: positive when the structure wants to shrink;
  :func:`voigt` gives ASE's 6-vector order xx, yy, zz, yz, xz, xy).

This is the way MACE, NequIP and SchNetPack get forces and stress; the direct force head is the
other response, and it has no stress (its forces are not the gradient of any energy).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from ..data.batch import AtomicBatch
from .ops import differentiated_twice

__all__ = ["EnergyModel", "NoStressError", "compute_response", "voigt"]


class NoStressError(ValueError):
    """Stress was asked of a model (or a structure) that has none."""


class EnergyModel(Protocol):
    """What :func:`compute_response` needs of a model."""

    conservative: bool
    regress_forces: bool

    def energy_terms(
        self, batch: AtomicBatch, positions: torch.Tensor, cell: torch.Tensor, graph: object | None
    ) -> dict[str, torch.Tensor]: ...


def compute_response(
    model: EnergyModel,
    batch: AtomicBatch,
    *,
    graph: object | None = None,
    stress: bool = False,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Energy ``[S]``, forces ``[N, 3]`` (if the model regresses forces) and, with ``stress``,
    stress ``[S, 3, 3]`` (eV/Å^3) of every structure in ``batch``.

    Args:
        model: see :class:`EnergyModel`.
        graph: a prebuilt neighbour graph of ``batch`` (else the model builds it).
        stress: also the stress (conservative models; periodic structures with a volume).
        create_graph: keep the graph of the derivatives (training on forces, higher
            derivatives).

    A caller that differentiates the outputs with respect to ``batch.positions`` itself (it set
    ``requires_grad``) gets them connected to those positions.
    """
    conservative = model.conservative
    if stress and not conservative:
        raise NoStressError(
            "this model predicts forces with a direct force head (direct_forces=True): they are "
            "not the gradient of an energy, so there is no stress; use an energy-conserving model "
            "(direct_forces=False)"
        )
    want_forces = model.regress_forces and conservative
    caller_grad = batch.positions.requires_grad
    with torch.set_grad_enabled(torch.is_grad_enabled() or want_forces or stress):
        positions = batch.positions
        if (want_forces or stress) and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        cell = batch.cell.to(positions.dtype)
        strain = None
        if stress:
            _check_stress_cells(batch)
            strain = torch.zeros_like(cell, requires_grad=True)  # [S, 3, 3]
            symmetric = 0.5 * (strain + strain.transpose(1, 2))
            strained_positions = positions + torch.bmm(positions.unsqueeze(1), symmetric[batch.batch]).squeeze(1)
            strained_cell = cell + torch.bmm(cell, symmetric)
        else:
            strained_positions, strained_cell = positions, cell
        twice = create_graph and (want_forces or stress)
        with differentiated_twice() if twice else contextlib.nullcontext():
            out = model.energy_terms(batch, strained_positions, strained_cell, graph)
        if want_forces or stress:
            inputs = [positions] + ([strain] if stress else [])
            grads = torch.autograd.grad(
                out["energy"].sum(),
                inputs,
                create_graph=create_graph,
                retain_graph=create_graph or caller_grad,
                allow_unused=True,
            )
            if want_forces:
                out["forces"] = -grads[0] if grads[0] is not None else torch.zeros_like(positions)
            if stress:
                grad_strain = grads[1] if grads[1] is not None else torch.zeros_like(cell)
                volume = torch.linalg.det(cell).abs()
                out["stress"] = grad_strain / volume.view(-1, 1, 1)
            if not (create_graph or caller_grad or torch.is_grad_enabled() and _outer_grad(batch)):
                out = {k: v.detach() for k, v in out.items()}
    return out


def _outer_grad(batch: AtomicBatch) -> bool:
    """Whether the caller tracks gradients through the batch (e.g. wrt the cell)."""
    return bool(batch.cell.requires_grad)


def _check_stress_cells(batch: AtomicBatch) -> None:
    """Stress needs a cell with a volume and periodicity along every axis."""
    not_periodic = torch.nonzero(~batch.pbc.all(dim=1)).flatten()
    if not_periodic.numel():
        s = int(not_periodic[0])
        raise NoStressError(
            f"structure {s}: stress needs a structure periodic along all three axes "
            f"(pbc={batch.pbc[s].tolist()})"
        )


def voigt(stress: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 3]`` -> ``[..., 6]`` in ASE's Voigt order (xx, yy, zz, yz, xz, xy)."""
    i = torch.tensor([0, 1, 2, 1, 0, 0], device=stress.device)
    j = torch.tensor([0, 1, 2, 2, 2, 1], device=stress.device)
    return stress[..., i, j]
