"""Equivariance of SCN's energy and force output blocks alone (paper Appendix A.2, eqs. 17-18,
Table 6).

The output blocks evaluate the final node coefficients ``s_i`` at the output points, apply a
pointwise network and integrate: ``E = sum_i int F_energy(s_i(r)) dr`` and
``F_i = int r F_force(s_i(r)) dr``. Given the features of real structures, the measurement
compares them with the features rotated by the Wigner-D ``D`` of a random rotation ``R``:

    | E(s) - E(D s) |,      | F(s) - R^-1 F(D s) |

A discrete set of output points makes both non-zero even for linear networks (the point set is
not an exact quadrature); the rest is the networks' non-linearity.

The energies here are the head's part only, ``energy_scale * sum_i int F_energy``: the
per-element reference energies, the shift and the ZBL prior are invariant by construction and
cancel in the differences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data.batch import AtomicBatch
from ..models.ops import no_autocast
from ..so3.wigner import wigner_D
from .equivariance import AbsDifference, rotate_coefficients

__all__ = ["final_features", "head_outputs", "output_head_differences"]


def _check_scn(model: nn.Module) -> None:
    from ..models.scn import SCN

    if not isinstance(model, SCN):
        raise TypeError(f"the output-block measurement needs an SCN, got {type(model).__name__}")


def final_features(model: nn.Module, batch: AtomicBatch) -> torch.Tensor:
    """The node coefficients after the last layer, ``s_i^(K)``: ``[N, (L+1)^2, C]``
    (no gradients; under the caller's autocast, if any)."""
    _check_scn(model)
    with torch.no_grad():
        with no_autocast(batch.positions):  # the model never autocasts its geometry
            edges = model.edge_data(batch, batch.positions)
        return model.embed(batch, edges)


def head_outputs(model: nn.Module, batch: AtomicBatch, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output blocks on ``features`` ``[N, (L+1)^2, C]``, as ``SCN.predict`` applies them.

    Returns ``{"energy": [S]}`` (the head's part: ``energy_scale`` times the integrated energy
    network, summed per structure) and, for direct-force models, ``"forces": [N, 3]``.
    """
    _check_scn(model)
    sampler = model.sphere_sampler
    dtype = model.energy_scale.dtype
    with torch.no_grad():
        values = sampler(features)  # [N, P, C]
        node_energy = sampler.integrate(model.energy_head(values)).squeeze(-1).to(dtype) * model.energy_scale
        energy = torch.zeros(batch.num_structures, dtype=node_energy.dtype, device=node_energy.device)
        out = {"energy": energy.index_add(0, batch.batch, node_energy)}
        if model.regress_forces and model.direct_forces:
            magnitude = model.force_head(values)  # [N, P, 1]
            directions = sampler.directions.to(magnitude.dtype)
            out["forces"] = sampler.integrate(magnitude * directions).to(dtype) * model.force_scale
    return out


def output_head_differences(
    model: nn.Module,
    batch: AtomicBatch,
    rotations: Sequence[torch.Tensor],
    features: torch.Tensor | None = None,
) -> dict[str, AbsDifference]:
    """Eqs. 17-18 on ``batch``'s final features.

    Args:
        model: an SCN.
        rotations: per draw, ``[S, 3, 3]`` float64 (one rotation per structure; each atom's
            features are rotated by its structure's ``D(R)``).
        features: ``[N, (L+1)^2, C]``, if already at hand (:func:`final_features`).

    Returns:
        ``{"energy": AbsDifference}``, plus ``"forces"`` for direct-force models (a
        conservative model has no force head).
    """
    if features is None:
        features = final_features(model, batch)
    reference = head_outputs(model, batch, features)
    out = {name: AbsDifference() for name in reference}
    atoms = batch.batch
    for rotation in rotations:
        rotation = rotation.to(device=atoms.device, dtype=torch.float64)
        wigner = wigner_D(rotation[atoms], model.lmax)  # [N, (L+1)^2, (L+1)^2]
        rotated = head_outputs(model, batch, rotate_coefficients(wigner, features))
        out["energy"].add(reference["energy"], rotated["energy"], "energy head")
        if "forces" in out:
            back = torch.einsum("nji,nj->ni", rotation[atoms], rotated["forces"].to(torch.float64))
            out["forces"].add(reference["forces"], back, "force head")
    return out
