"""Table 6 (paper eqs. 17-18): the energy and force output blocks alone."""

from __future__ import annotations

import pytest
import torch

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.diagnostics.equivariance import rotate_batch, rotation_differences
from spherical_channels.diagnostics.output_heads import final_features, head_outputs, output_head_differences
from spherical_channels.so3.wigner import wigner_D

from diagnostics_helpers import M0_NO_GRID, M1_ONE_TAP, exact_output_quadrature, linearize, make_scn, rotations_for

pytestmark = pytest.mark.usefixtures("one_thread")




def _relative(acc) -> float:
    return acc.mad / acc.mean_abs


def test_heads_on_the_final_features_are_the_models_prediction(batch: AtomicBatch) -> None:
    """head_outputs follows SCN.predict: plus the invariant offsets it gives the model's energy,
    and the model's direct forces."""
    model = make_scn(**M1_ONE_TAP)
    model.set_normalization(energy_scale=2.0, energy_shift=0.5, force_scale=3.0, element_energies={1: -1.0, 6: -2.0, 8: -3.0, 29: -4.0})
    heads = head_outputs(model, batch, final_features(model, batch))
    out = model(batch)
    offsets = torch.zeros(batch.num_structures, dtype=torch.float64).index_add(
        0, batch.batch, model.element_energies[batch.atomic_numbers]) + model.energy_shift
    torch.testing.assert_close(heads["energy"] + offsets, out["energy"], atol=1e-10, rtol=0)
    torch.testing.assert_close(heads["forces"], out["forces"], atol=1e-10, rtol=0)


def test_final_features_rotate_by_the_wigner_matrices_the_measurement_uses(batch: AtomicBatch) -> None:
    model = make_scn(**M0_NO_GRID)
    rotation = rotations_for(batch, 1)[0]
    features = final_features(model, batch)
    rotated = final_features(model, rotate_batch(batch, rotation))
    wigner = wigner_D(rotation[batch.batch], model.lmax)
    torch.testing.assert_close(wigner @ features, rotated, atol=1e-11 * features.abs().max().item(), rtol=0)


def test_an_exactly_equivariant_trunk_leaves_table_4_to_the_heads(batch: AtomicBatch) -> None:
    """m = 0 messages without the grid are exactly equivariant: s(R x) = D s(x), so the whole
    model on the rotated input is the heads on D s, and Table 4 equals Table 6 (same
    rotations) up to rounding, for the energy and the forces alike."""
    model = make_scn(**M0_NO_GRID)
    rotations = rotations_for(batch)
    whole = rotation_differences(model, batch, rotations)
    heads = output_head_differences(model, batch, rotations)
    for name in ("energy", "forces"):
        assert _relative(heads[name]) > 1e-4  # SiLU heads on 32 Fibonacci points: not exact
        assert whole[name].mad == pytest.approx(heads[name].mad, rel=1e-8), name
        assert whole[name].mean_abs == pytest.approx(heads[name].mean_abs, rel=1e-12)


def test_linear_heads_are_exact_only_on_an_exact_quadrature(batch: AtomicBatch) -> None:
    """Linear heads integrate polynomials of degree L (energy) and L + 1 (forces): exact on a
    product Gauss rule, not on the Fibonacci points. Non-linear (SiLU) heads are not exact on
    either."""
    rotations = rotations_for(batch)
    fibonacci = output_head_differences(linearize(make_scn(**M1_ONE_TAP)), batch, rotations)
    gauss = output_head_differences(exact_output_quadrature(linearize(make_scn(**M1_ONE_TAP))), batch, rotations)
    silu_gauss = output_head_differences(exact_output_quadrature(make_scn(**M1_ONE_TAP)), batch, rotations)
    for name in ("energy", "forces"):
        assert _relative(fibonacci[name]) > 1e-5, name
        assert _relative(gauss[name]) < 1e-12, name
        assert _relative(silu_gauss[name]) > 1e-5, name


def test_a_conservative_model_has_no_force_head(batch: AtomicBatch) -> None:
    model = make_scn(**M1_ONE_TAP, direct_forces=False)
    result = output_head_differences(model, batch, rotations_for(batch, 1))
    assert set(result) == {"energy"} and result["energy"].mad > 0
    with pytest.raises(TypeError, match="needs an SCN"):
        final_features(torch.nn.Linear(2, 2), batch)
