"""`diagnose`: Tables 4, 5 and 6 together, as a JSON-ready report, a text table and a figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from torch import nn

from spherical_channels.diagnostics import diagnose, format_report, plot_report
from spherical_channels.models.schnet import SchNet

from diagnostics_helpers import M0_NO_GRID, M1_ONE_TAP, exact_output_quadrature, linearize, make_scn, structures

pytestmark = pytest.mark.usefixtures("one_thread")

#: float64 round-off, as a percentage (1e-10 relative)
ROUND_OFF_PERCENT = 1e-8


def _percents(report: dict, precision: str) -> dict[str, float]:
    """Every percentage of the report at ``precision``, by name."""
    out = {f"table4 {q}": report["table4"][precision][q]["percent"] for q in ("energy", "forces")}
    out.update({f"table5 layer {r['layer']}": r["percent"] for r in report["table5"][precision]["layers"]})
    out.update({f"table6 {q}": report["table6"][precision][q]["percent"] for q in ("energy", "forces")})
    return out


@pytest.mark.parametrize("linear_messages", [True, False], ids=["all-linear", "silu-messages"])
def test_linear_m0_model_without_grid_is_exact_in_float64(linear_messages: bool) -> None:
    """With linear heads on an exact output quadrature, m = 0 messages and no grid network, the
    model is equivariant: every table is float64 rounding. m = 0 messages stay exact with a
    non-linear F_e too (they only see roll-invariant coefficients)."""
    model = make_scn(**M0_NO_GRID)
    if linear_messages:
        linearize(model)
    else:
        for head in (model.energy_head, model.force_head):
            head[1] = head[3] = nn.Identity()
    report = diagnose(exact_output_quadrature(model), structures(3), num_rotations=2, progress=False)
    percents = _percents(report, "float64")
    assert all(p < ROUND_OFF_PERCENT for p in percents.values()), percents
    assert report["table5"]["float64"]["variants"] == {}  # no grid network to vary
    assert any("no 1x1 grid network" in note for note in report["notes"])


def test_grid_model_with_one_tap_is_clearly_not_equivariant(tmp_path: Path) -> None:
    """m in [-1, 1] with one tap and the SiLU grid network: Table 4 and every layer of Table 5
    clearly above rounding; the SiLU heads make Table 6 non-zero. Labels of zero make the MAE
    the mean |prediction|."""
    frames = structures(3)
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=[[0.0, 0.0, 0.0]] * len(atoms))
    report = diagnose(make_scn(**M1_ONE_TAP), frames, num_rotations=2, progress=False)
    percents = _percents(report, "float64")
    assert all(p > 0.1 for k, p in percents.items() if not k.startswith("table6")), percents
    assert all(p > 1e-3 for k, p in percents.items() if k.startswith("table6")), percents
    for q in ("energy", "forces"):
        row = report["table4"]["float64"][q]
        assert row["mae"] == pytest.approx(row["mean_abs"], rel=1e-12)
        assert row["percent_of_mae"] == pytest.approx(row["percent"], rel=1e-12)
    table5 = report["table5"]["float64"]
    assert table5["mean_percent"] == pytest.approx(sum(r["percent"] for r in table5["layers"]) / 2)
    assert set(table5["variants"]) == {"linear", "silu-1", "silu-2", "relu-1", "relu-2"}
    assert table5["variants"]["linear"]["mean_percent"] < ROUND_OFF_PERCENT

    json.dumps(report, allow_nan=False)  # JSON-ready as it is
    text = format_report(report)
    for piece in ("Table 4", "Table 5", "Table 6", "silu-2 (model)", "m<=1, 1 tap, grid"):
        assert piece in text, piece
    path = plot_report(report, tmp_path / "figures" / "diag.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixed_precision_is_measured_next_to_the_models_own() -> None:
    """An exactly equivariant float32 model: float32 rounding without autocast, bf16 rounding
    (2^-8 relative steps) with it, measured on the same rotations."""
    model = exact_output_quadrature(linearize(make_scn(torch.float32, **M0_NO_GRID)))
    report = diagnose(model, structures(2), num_rotations=2, amp="bf16", progress=False)
    assert report["precisions"] == ["float32", "bf16"]
    single, half = _percents(report, "float32"), _percents(report, "bf16")
    print({k: (f"{single[k]:.2e}", f"{half[k]:.2e}") for k in single})
    for key in ("table4 energy", "table4 forces", "table6 energy", "table6 forces"):
        assert single[key] < 1e-3 and half[key] > 10 * single[key], key
    assert "bf16" in format_report(report)
    with pytest.raises(ValueError, match="float32"):
        diagnose(make_scn(**M0_NO_GRID), structures(1), amp="bf16", progress=False)


def test_other_models_get_table_4_only() -> None:
    """SchNet is invariant by construction: Table 4 is float64 rounding; Tables 5-6 say why
    they do not apply."""
    torch.manual_seed(0)
    model = SchNet(hidden_channels=8, num_filters=8, num_interactions=1, num_gaussians=8, cutoff=5.0).double()
    report = diagnose(model, structures(2), num_rotations=2, progress=False)
    assert report["table4"]["float64"]["energy"]["percent"] < ROUND_OFF_PERCENT
    assert report["table4"]["float64"]["forces"]["percent"] < ROUND_OFF_PERCENT
    assert "SCN" in report["table5"]["skipped"] and report["table6"] == report["table5"]
    assert "not applicable" in format_report(report)


def test_the_model_is_left_as_it_was_and_results_repeat() -> None:
    """Measured in eval mode with the fixed roll; the mode and the roll rule come back."""
    model = make_scn(**M1_ONE_TAP, eval_roll="random").train()
    first = diagnose(model, structures(2), num_rotations=1, progress=False, variants=False)
    assert model.training and model.config.eval_roll == "random"
    assert any("fixed one" in note for note in first["notes"])
    assert diagnose(model, structures(2), num_rotations=1, progress=False, variants=False) == first
    other = diagnose(model, structures(2), num_rotations=1, seed=1, progress=False, variants=False)
    assert other["table4"] != first["table4"]
    conservative = diagnose(make_scn(**M0_NO_GRID, direct_forces=False), structures(1), num_rotations=1, progress=False)
    assert set(conservative["table6"]["float64"]) == {"energy"}
    assert any("no force head" in note for note in conservative["notes"])


def test_bad_input_is_a_clear_error() -> None:
    model = make_scn(**M0_NO_GRID)
    with pytest.raises(ValueError, match="num_rotations"):
        diagnose(model, structures(1), num_rotations=0, progress=False)
    with pytest.raises(ValueError, match="amp"):
        diagnose(model, structures(1), amp="fp8", progress=False)
    with pytest.raises(ValueError, match="no structures"):
        diagnose(model, [], progress=False)
    overlapping = Atoms("CO", positions=[[0, 0, 0], [0, 0, 1e-5]], cell=[8, 8, 8], pbc=True)
    with pytest.raises(ValueError, match="structure 1: "):
        diagnose(model, [structures(1)[0], overlapping], progress=False)
