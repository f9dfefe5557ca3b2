"""Table 5 (paper eq. 16): the message aggregation of each layer alone."""

from __future__ import annotations

import pytest
import torch

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.diagnostics.aggregation import (
    AGGREGATION_VARIANTS,
    aggregation_differences,
    capture_aggregation_inputs,
    swapped_activations,
)
from spherical_channels.diagnostics.equivariance import rotate_batch
from spherical_channels.so3.wigner import wigner_D

from diagnostics_helpers import M0_NO_GRID, M1_ONE_TAP, linearize, make_scn, rotations_for

pytestmark = pytest.mark.usefixtures("one_thread")




def _relative(per_layer) -> list[float]:
    return [acc.mad / acc.mean_abs for acc in per_layer]


def test_capture_gives_each_layers_inputs(batch: AtomicBatch) -> None:
    """One record per layer (their outputs are recomputed from them inside the capture); the
    first layer's input is the degree-0 embedding."""
    model = make_scn(**M1_ONE_TAP)
    inputs = capture_aggregation_inputs(model, batch)
    assert len(inputs) == model.num_interactions
    width = (model.lmax + 1) ** 2
    for item in inputs:
        assert item.x.shape == item.messages.shape == (batch.num_atoms, width, model.sphere_channels_reduce)
    assert inputs[0].x[:, 1:].abs().max() == 0 and inputs[0].x[:, 0].abs().max() > 0
    assert inputs[1].x[:, 1:].abs().max() > 0 and inputs[1].messages[:, 1:].abs().max() > 0


def test_captured_inputs_rotate_by_the_wigner_matrices_the_measurement_uses(batch: AtomicBatch) -> None:
    """With m = 0 messages the layers are exactly equivariant, so the inputs captured on the
    rotated structures are D times the original ones: D (not D^T) is the rotation of the
    coefficients that a rotation of the structure makes."""
    model = make_scn(**M0_NO_GRID)
    rotation = rotations_for(batch, 1)[0]
    wigner = wigner_D(rotation[batch.batch], model.lmax)
    original = capture_aggregation_inputs(model, batch)
    rotated = capture_aggregation_inputs(model, rotate_batch(batch, rotation))
    for before, after in zip(original, rotated):
        for a, b in ((before.x, after.x), (before.messages, after.messages)):
            torch.testing.assert_close(wigner @ a, b, atol=1e-11 * a.abs().max().item(), rtol=0)
    assert (wigner.transpose(1, 2) @ original[1].messages - rotated[1].messages).abs().max() > 1e-3


def test_linear_m0_model_without_grid_is_exact_per_layer(batch: AtomicBatch) -> None:
    """No grid: each layer keeps the sum of its messages, F is the identity, eq. 16 is rounding."""
    model = linearize(make_scn(**M0_NO_GRID))
    result = aggregation_differences(model, batch, rotations_for(batch))
    assert len(result["layers"]) == 2 and result["variants"] == {}
    assert all(r < 1e-13 for r in _relative(result["layers"])), _relative(result["layers"])


def test_linear_grid_network_is_exact_silu_is_not(batch: AtomicBatch) -> None:
    """Sampling a degree-L function on the 2(L+1) grid and projecting back is exact, so a linear
    pointwise network commutes with D; a SiLU network aliases (the paper: 4-7 %)."""
    rotations = rotations_for(batch)
    linear = aggregation_differences(linearize(make_scn(**M1_ONE_TAP)), batch, rotations)
    assert all(r < 1e-12 for r in _relative(linear["layers"])), _relative(linear["layers"])

    model = make_scn(**M1_ONE_TAP)
    silu = aggregation_differences(model, batch, rotations, variants=list(AGGREGATION_VARIANTS))
    print({k: [f"{r:.2e}" for r in _relative(v)] for k, v in silu["variants"].items()})
    assert all(r > 1e-3 for r in _relative(silu["layers"])), _relative(silu["layers"])
    # the model's own layout is the silu-2 row, on the same inputs: the same numbers
    assert _relative(silu["variants"]["silu-2"]) == pytest.approx(_relative(silu["layers"]), rel=1e-12)
    assert all(r < 1e-12 for r in _relative(silu["variants"]["linear"]))
    for name in ("silu-1", "relu-1", "relu-2"):
        assert all(r > 1e-3 for r in _relative(silu["variants"][name])), name


def test_variants_leave_the_model_as_it_was(batch: AtomicBatch) -> None:
    model = make_scn(**M1_ONE_TAP)
    before = model(batch)["energy"]
    modules = [(block.grid_mlp[1], block.grid_mlp[3]) for block in model.interactions]
    aggregation_differences(model, batch, rotations_for(batch, 1), variants=["relu-1", "linear"])
    with pytest.raises(RuntimeError, match="inside"):
        with swapped_activations(model.interactions[0], torch.nn.ReLU, 2):
            raise RuntimeError("inside")
    assert [(block.grid_mlp[1], block.grid_mlp[3]) for block in model.interactions] == modules
    assert torch.equal(model(batch)["energy"], before)


def test_bad_requests_are_clear(batch: AtomicBatch) -> None:
    model = make_scn(**M1_ONE_TAP)
    with pytest.raises(ValueError, match="unknown aggregation variants"):
        aggregation_differences(model, batch, rotations_for(batch, 1), variants=["tanh-2"])
    with pytest.raises(ValueError, match="no 1x1 grid"):
        with swapped_activations(make_scn(**M0_NO_GRID).interactions[0], torch.nn.ReLU, 1):
            pass
    with pytest.raises(TypeError, match="needs an SCN"):
        capture_aggregation_inputs(torch.nn.Linear(2, 2), batch)
