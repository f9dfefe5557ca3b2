"""The property suite over every SCN variant in configs/small, in float32 and float64.

The variants are shrunk for speed (2 layers, 8 channels, 16 hidden, 8 basis functions:
``shrink_options``), keeping every option that defines them: lmax, mmax, taps, bands, grid, edge
rotation, resolutions, direct or conservative forces, cutoff, cap and output points. Random
weights are amplified as the official fixtures' so that outputs are O(1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spherical_channels.models.scn import SCN
from spherical_channels.testing import (
    Expectations,
    read_model_options,
    run_property_suite,
    scn_expectations,
    shrink_options,
)
from spherical_channels.testing.scn import ROTATION_BOUNDS
from spherical_channels.training.config import load_config

from scn_helpers import scale_like_fixtures

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "small"
# the SCN variants (configs/small/schnet.yaml is the SchNet baseline: tests/models/test_schnet.py)
VARIANTS = sorted(p.stem for p in CONFIGS.glob("*.yaml") if load_config(p).model_name == "scn")
FAST = dict(smoothness_steps=8, num_rotations=2)

#: Exact properties every SCN variant must pass (not merely "n/a") in both dtypes.
EXACT = ("translation", "permutation", "batch", "wrapping", "supercell", "batch_gradient")

#: How far the official tie rule breaks permutation and 2x2x1-supercell consistency on the bcc
#: crystal (relative to the largest force on the regular structures; the crystal's own forces
#: vanish by symmetry): measured 0.07-0.70 on these shrunk variants with edge rotation, in both
#: dtypes; stated as "at most twice the largest regular force".
OFFICIAL_TIE_BOUND = 2.0


def small_model(variant: str, **changes) -> SCN:
    torch.manual_seed(0)
    options = shrink_options(read_model_options(CONFIGS / f"{variant}.yaml"))
    return scale_like_fixtures(SCN(**{**options, **changes}))


def test_every_small_config_is_covered() -> None:
    assert {"scn_demo", "scn_small_m0", "scn_small_m1_1tap", "scn_small_m2", "scn_small_no_grid",
            "scn_small_no_rotation", "scn_small_conservative", "scn_small_smooth", "scn_relax"} <= set(VARIANTS)
    # includes are merged under the file's own options
    m0 = read_model_options(CONFIGS / "scn_small_m0.yaml")
    demo = read_model_options(CONFIGS / "scn_demo.yaml")
    assert m0 == {**demo, "mmax": 0}
    assert "name" not in demo


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_passes_the_suite(variant: str) -> None:
    model = small_model(variant)
    config = model.config
    report = run_property_suite(model, expectations=scn_expectations(config), **FAST)
    print(report.table())
    assert report.passed, report.table()
    for dtype in ("float32", "float64"):
        for name in EXACT:
            assert report.get(name, dtype).status == "pass", report.table()
        # the official tie rule: measured, and bounded here
        for name in ("permutation_symmetric", "supercell_symmetric"):
            assert report.get(name, dtype).value <= OFFICIAL_TIE_BOUND, report.table()
    if model.conservative:
        assert report.get("forces_gradient", "float64").status == "pass"
        assert report.get("stress", "float64").status == "pass"
        assert report.get("isolated_atoms", "float64").status == "pass"
    if config.edge_rotation:
        energy_bound, force_bound = ROTATION_BOUNDS["one_tap" if config.num_taps == 1 else "m0" if config.mmax == 0 else "multi_tap"]
        assert report.get("rotation_energy", "float64").tolerance == energy_bound
        assert report.get("rotation_forces", "float64").tolerance == force_bound
        if config.smooth:  # no cap: equidistant neighbours cannot matter (1e-10 in float64)
            assert report.get("permutation_symmetric", "float64").status == "pass"
            assert report.get("supercell_symmetric", "float64").status == "pass"
        else:  # the official tie rule's break is there, and the suite sees it
            assert report.get("permutation_symmetric", "float64").value > 1e-3
            assert report.get("supercell_symmetric", "float64").value > 1e-3
    else:
        # identity frames: messages see distances only, so the energy is exactly invariant
        assert report.get("rotation_energy", "float64").status == "pass"
        assert report.get("rotation_energy", "float64").value < 1e-12


def test_rotation_errors_follow_the_paper() -> None:
    """Table 4: one tap (m <= 1) is far from equivariant next to 4 taps. And m = 0 without the
    grid is not exact because of the output head (a nonlinear MLP on a fixed set of sphere
    points): its error falls as the points grow."""
    def rotation(model) -> tuple[float, float]:
        report = run_property_suite(model, dtypes=[torch.float64], properties=["rotation"], num_rotations=4)
        return report.get("rotation_energy", "float64").value, report.get("rotation_forces", "float64").value

    four_taps = rotation(small_model("scn_demo"))
    one_tap = rotation(small_model("scn_small_m1_1tap"))
    assert one_tap[1] > 10 * four_taps[1]
    coarse = rotation(small_model("scn_small_m0", use_grid=False))
    fine = rotation(small_model("scn_small_m0", use_grid=False, num_sphere_samples=512))
    assert fine[0] < 0.5 * coarse[0] and fine[1] < 0.5 * coarse[1]


def test_direct_force_head_pushes_an_isolated_atom() -> None:
    """The direct force head integrates magnitude x direction over the output points; fairchem's
    weighted Fibonacci points do not average to zero (|mean| = 2.9e-4 for 64 points), so an
    atom alone feels a small constant force along that mean. Measured and stated here; the
    conservative variant's is exactly zero (its own test)."""
    from ase import Atoms

    from spherical_channels.data.batch import AtomicBatch

    model = small_model("scn_demo").double().eval()
    sampler = model.sphere_sampler
    mean_direction = sampler.integrate(sampler.directions.unsqueeze(0).double())[0]
    force = model(AtomicBatch.from_atoms([Atoms("Cu")], dtype=torch.float64))["forces"][0].detach()
    cosine = torch.dot(force, mean_direction) / (force.norm() * mean_direction.norm())
    assert abs(float(cosine)) > 1 - 1e-9
    report = run_property_suite(model, dtypes=[torch.float64], properties=["isolated_atoms"], expectations=scn_expectations(model))
    result = report.get("isolated_atoms", "float64")
    assert result.status == "report" and 0 < result.value < 1e-2


def test_smoothness_shows_scn_energy_jumps() -> None:
    """Report only (the next issue bounds it): SCN has a hard cutoff and ranks neighbours into
    two resolutions, so the sliding adsorbate's energy jumps; the report shows it."""
    report = run_property_suite(small_model("scn_demo"), dtypes=[torch.float64], properties=["smoothness"], smoothness_steps=100)
    result = report.get("smoothness", "float64")
    print(result.details)
    assert result.status == "report"
    assert result.details["max_over_median"] > 5
    assert result.details["max_second_difference"] > 100 * result.details["median_second_difference"]


def test_expectations_follow_the_config() -> None:
    demo = small_model("scn_demo").config
    assert scn_expectations(demo).rotation_forces == ROTATION_BOUNDS["multi_tap"][1]
    assert scn_expectations(demo.replace(mmax=0)).rotation_energy == ROTATION_BOUNDS["m0"][0]
    assert scn_expectations(demo.replace(num_taps=1)).rotation_forces == ROTATION_BOUNDS["one_tap"][1]
    no_rotation = scn_expectations(demo.replace(edge_rotation=False))
    assert no_rotation.rotation_energy == "exact" and no_rotation.rotation_forces is None
    conservative = scn_expectations(demo.replace(edge_rotation=False, direct_forces=False))
    assert conservative.rotation_forces == "exact" and conservative.bound("isolated_atoms") == "exact"
    assert scn_expectations(demo).bound("isolated_atoms") is None
    assert scn_expectations(demo).permutation_symmetric is None
    shell = scn_expectations(demo.replace(neighbor_ties="shell"))
    assert shell.permutation_symmetric == shell.supercell_symmetric == "exact"
    assert isinstance(scn_expectations(small_model("scn_demo")), Expectations)  # a model works too


def test_shell_ties_make_symmetric_crystals_exact() -> None:
    """With ``neighbor_ties="shell"`` the cap and the resolution boundary keep tied shells
    whole, so nothing depends on atom order: permutation and supercell are exact on the bcc
    crystal too."""
    model = small_model("scn_demo", neighbor_ties="shell")
    report = run_property_suite(
        model,
        expectations=scn_expectations(model.config),
        properties=["permutation", "supercell"],
    )
    print(report.table())
    for dtype in ("float32", "float64"):
        for name in ("permutation_symmetric", "supercell_symmetric"):
            result = report.get(name, dtype)
            assert result.tolerance is not None and result.status == "pass", report.table()
