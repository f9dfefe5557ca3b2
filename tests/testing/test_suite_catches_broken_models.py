"""The property suite on a model that is exact by construction (a smooth pair potential), and on
wrappers that break one property each: every check fails when it should, and only then."""

from __future__ import annotations

import json
import math

import pytest
import torch
from ase.build import add_adsorbate, fcc100
from torch import nn

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.data.neighbors import build_graph, edge_vectors
from spherical_channels.models.response import compute_response
from spherical_channels.testing import (
    PROPERTIES,
    Expectations,
    PropertySuiteFailure,
    Structure,
    default_structures,
    pytest_properties,
    read_model_options,
    run_property_suite,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(smoothness_steps=40)


class PairPotential(nn.Module):
    """A Morse pair potential with a cosine cutoff (C1 at the cutoff) plus per-element
    energies; forces and stress by :func:`compute_response`. Every property holds exactly."""

    conservative = True
    regress_forces = True

    def __init__(self, cutoff: float = 5.0) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.depth = nn.Parameter(torch.tensor(0.4))
        self.width = nn.Parameter(torch.tensor(1.3))
        self.r0 = nn.Parameter(torch.tensor(2.5))
        self.register_buffer("element_energies", -torch.linspace(1.0, 3.0, 100))

    def energy_terms(self, batch: AtomicBatch, positions: torch.Tensor, cell: torch.Tensor, graph=None) -> dict:
        if graph is None:
            # no neighbour cap: nothing depends on atom order
            graph = build_graph(batch, self.cutoff, 10_000)
        r = torch.linalg.vector_norm(edge_vectors(positions, cell, batch.batch, graph), dim=1)
        envelope = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0)
        pair = self.depth * ((1.0 - torch.exp(-self.width * (r - self.r0))) ** 2 - 1.0) * envelope
        node = self.element_energies[batch.atomic_numbers].to(positions.dtype)
        node = node.index_add(0, graph.edge_index[1], 0.5 * pair)
        energy = torch.zeros(batch.num_structures, dtype=positions.dtype).index_add(0, batch.batch, node)
        return {"energy": energy}

    def forward(self, batch: AtomicBatch, stress: bool = False) -> dict:
        return compute_response(self, batch, stress=stress)


class Broken(nn.Module):
    """A wrapper that changes the inner model's outputs (``change(batch, out)``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def conservative(self) -> bool:
        return self.inner.conservative

    def forward(self, batch: AtomicBatch, stress: bool = False) -> dict:
        out = dict(self.inner(batch, stress=stress))
        return self.change(batch, out)

    def change(self, batch: AtomicBatch, out: dict) -> dict:
        raise NotImplementedError


class AddsPositionTerm(Broken):
    """Adds sum_i u . x_i to each structure's energy (not translation- or rotation-invariant)."""

    def change(self, batch, out):
        u = torch.tensor([0.03, -0.02, 0.05], dtype=batch.positions.dtype)
        term = torch.zeros_like(out["energy"]).index_add(0, batch.batch, batch.positions @ u)
        out["energy"] = out["energy"] + term
        return out


class MixesStructures(Broken):
    """Adds 1% of the whole batch's energy to every structure's."""

    def change(self, batch, out):
        out["energy"] = out["energy"] + 0.01 * out["energy"].sum()
        return out


class CouplesPositions(Broken):
    """Adds a term of the batch's mean position to every energy: identical alone and in a batch
    of one, but d E_a / d x_b != 0 in a batch."""

    def change(self, batch, out):
        out["energy"] = out["energy"] + 1e-3 * batch.positions.sum() ** 2 / batch.num_atoms
        return out


class ScalesForces(Broken):
    """Forces 0.1% too large (no longer -dE/dx)."""

    def change(self, batch, out):
        out["forces"] = 1.001 * out["forces"]
        return out


class ScalesStress(Broken):
    def change(self, batch, out):
        if "stress" in out:
            out["stress"] = 1.001 * out["stress"]
        return out


class DependsOnOrder(Broken):
    """Adds 1e-3 * sum_i i Z_i (atom i's index in its structure)."""

    def change(self, batch, out):
        start = torch.cumsum(batch.natoms, 0) - batch.natoms
        local = torch.arange(batch.num_atoms) - start[batch.batch]
        weights = (local * batch.atomic_numbers).to(out["energy"].dtype)
        out["energy"] = out["energy"] + 1e-3 * torch.zeros_like(out["energy"]).index_add(0, batch.batch, weights)
        return out


class ConstantForce(Broken):
    """A force along x on every atom (an isolated atom is pushed; forces do not rotate)."""

    def change(self, batch, out):
        out["forces"] = out["forces"] + torch.tensor([0.01, 0.0, 0.0], dtype=out["forces"].dtype)
        return out


class ReturnsNaN(Broken):
    def change(self, batch, out):
        out["energy"] = out["energy"] * float("nan")
        return out


class FailsOnBatches(Broken):
    def change(self, batch, out):
        if batch.num_structures > 1:
            raise RuntimeError("this model takes one structure at a time")
        return out


class Float32Inside(nn.Module):
    """Computes in float32 whatever it is given (a float32 copy held outside the module tree,
    so ``.to(float64)`` does not reach it)."""

    conservative = True

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_inner32", inner.float())

    def forward(self, batch: AtomicBatch, stress: bool = False) -> dict:
        dtype = batch.positions.dtype
        out = self._inner32(batch.to(dtype=torch.float32), stress=stress)
        return {k: v.to(dtype) for k, v in out.items()}


def failed(report) -> set[str]:
    return {f"{r.name}/{r.dtype}" for r in report.failures()}


def test_exact_model_passes_every_property_in_both_dtypes() -> None:
    report = run_property_suite(PairPotential(), **FAST)
    print(report.table())
    assert report.passed, report.table()
    statuses = {(r.name, r.dtype): r.status for r in report.results}
    # everything measured: FD checks in float64, smoothness reported
    assert statuses[("forces_gradient", "float64")] == statuses[("stress", "float64")] == "pass"
    assert statuses[("forces_gradient", "float32")] == "n/a"
    assert statuses[("smoothness", "float64")] == "report"
    judged = [r for r in report.results if r.status == "pass"]
    assert len(judged) == 2 * 11 + 2  # 11 judged results per dtype, plus the two FD ones in float64
    # a pair potential is exactly invariant: rotation is held to the rounding tolerance
    assert report.get("rotation_energy", "float64").value < 1e-12
    assert report.get("rotation_forces", "float64").value < 1e-12


def test_position_term_breaks_translation_rotation_and_wrapping() -> None:
    report = run_property_suite(AddsPositionTerm(PairPotential()), dtypes=[torch.float64], **FAST)
    bad = failed(report)
    for name in ("translation", "rotation_energy", "wrapping", "supercell", "forces_gradient"):
        assert f"{name}/float64" in bad, report.table()
    # the term is a sum over atoms: order and batching are untouched
    for name in ("permutation", "batch", "batch_gradient"):
        assert report.get(name, "float64").status == "pass", report.table()


def test_mixing_structures_breaks_batching_only() -> None:
    report = run_property_suite(MixesStructures(PairPotential()), dtypes=[torch.float64], **FAST)
    assert failed(report) == {"batch/float64", "batch_gradient/float64"}, report.table()
    assert report.get("batch", "float64").details["energy_relative"] > 1e-3


def test_coupled_positions_are_caught_by_the_gradient_check() -> None:
    report = run_property_suite(
        CouplesPositions(PairPotential()), dtypes=[torch.float64], properties=["batch_gradient"]
    )
    result = report.get("batch_gradient", "float64")
    assert result.status == "fail" and result.value > 1e-6


def test_wrong_forces_and_stress_fail_the_finite_differences() -> None:
    forces = run_property_suite(ScalesForces(PairPotential()), dtypes=[torch.float64], properties=["forces_gradient", "stress"])
    assert failed(forces) == {"forces_gradient/float64"}, forces.table()
    # 0.1% of the checked atoms' forces, relative to the largest force of all atoms
    assert 3e-4 < forces.get("forces_gradient", "float64").value <= 1.001e-3
    stress = run_property_suite(ScalesStress(PairPotential()), dtypes=[torch.float64], properties=["forces_gradient", "stress"])
    assert failed(stress) == {"stress/float64"}, stress.table()
    assert 3e-4 < stress.get("stress", "float64").value <= 1.001e-3


def test_order_dependence_breaks_permutation() -> None:
    report = run_property_suite(DependsOnOrder(PairPotential()), dtypes=[torch.float64], properties=["permutation", "translation"])
    # (the symmetric crystal has one element: sum_i i Z_i does not change there)
    assert failed(report) == {"permutation/float64"}, report.table()


def test_constant_force_breaks_isolated_atoms_and_rotation() -> None:
    report = run_property_suite(ConstantForce(PairPotential()), dtypes=[torch.float64], **FAST)
    bad = failed(report)
    assert {"isolated_atoms/float64", "rotation_forces/float64", "forces_gradient/float64"} <= bad, report.table()
    assert "rotation_energy/float64" not in bad


def test_nan_output_fails_rather_than_passes() -> None:
    report = run_property_suite(ReturnsNaN(PairPotential()), dtypes=[torch.float64], properties=["translation", "rotation", "isolated_atoms"])
    assert {"translation/float64", "rotation_energy/float64", "isolated_atoms/float64"} <= failed(report), report.table()


def test_a_property_that_raises_is_an_error_and_the_rest_still_run() -> None:
    report = run_property_suite(FailsOnBatches(PairPotential()), dtypes=[torch.float64], properties=["batch", "translation"])
    result = report.get("batch", "float64")
    assert result.status == "error" and "one structure at a time" in result.details["error"]
    assert report.get("translation", "float64").status == "pass"
    assert not report.passed
    with pytest.raises(PropertySuiteFailure, match="batch/float64"):
        report.assert_passed()


def test_float64_tolerance_catches_float32_arithmetic() -> None:
    """A model computing in float32 passes float32's tolerance but not float64's."""
    report = run_property_suite(Float32Inside(PairPotential()), properties=["translation", "rotation"])
    assert report.get("translation", "float32").status == "pass", report.table()
    assert report.get("translation", "float64").status == "fail", report.table()
    assert report.get("rotation_energy", "float64").status == "fail", report.table()


def test_smoothness_report_separates_smooth_and_cut_off_energies() -> None:
    """The smooth pair potential's largest step is close to its median; with a hard cutoff
    (0.3 eV per pair inside the cutoff) a neighbour crossing it shows as a step far above the
    median."""

    class HardCutoff(PairPotential):
        def energy_terms(self, batch, positions, cell, graph=None):
            out = super().energy_terms(batch, positions, cell, graph)
            graph = build_graph(batch, self.cutoff, 10_000)
            pairs = torch.zeros(batch.num_structures, dtype=positions.dtype).index_add(
                0, batch.batch[graph.edge_index[1]], torch.full((graph.num_edges,), 0.15, dtype=positions.dtype)
            )
            return {"energy": out["energy"] + pairs}

    # a Cu adatom above Cu(100), sliding 1 A over it: neighbours cross the 5 A cutoff
    slab = fcc100("Cu", size=(2, 2, 2), vacuum=6.0)
    add_adsorbate(slab, "Cu", 2.0, "hollow")
    slab.pbc = True
    slab.rattle(0.03, seed=3)
    structures = [Structure("adatom", slab)]
    settings = dict(dtypes=[torch.float64], properties=["smoothness"], structures=structures, smoothness_steps=200)
    s = run_property_suite(PairPotential(), **settings).get("smoothness", "float64")
    h = run_property_suite(HardCutoff(), **settings).get("smoothness", "float64")
    assert s.status == h.status == "report"
    assert s.details["max_over_median"] < 5, s.details
    assert h.details["max_over_median"] > 50, h.details
    # jumps stand out most in the second differences (a smooth energy's shrink as h^2)
    assert s.details["max_second_difference"] < 20 * s.details["median_second_difference"], s.details
    assert h.details["max_second_difference"] > 1000 * h.details["median_second_difference"], h.details
    assert h.details["max_step"] == pytest.approx(h.value)


def test_report_table_and_dict() -> None:
    report = run_property_suite(PairPotential(), dtypes=[torch.float64], properties=["translation", "stress"])
    table = report.table()
    assert "translation" in table and "stress" in table and "passed" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True
    assert [r["name"] for r in data["results"]] == ["translation", "stress"]
    assert set(report.seconds) == {"translation/float64", "stress/float64"}


def test_expectations_set_bounds_and_report_only() -> None:
    model = AddsPositionTerm(PairPotential())
    loose = Expectations(rotation_energy=10.0, overrides={"translation": None})
    report = run_property_suite(model, dtypes=[torch.float64], properties=["translation", "rotation"], expectations=loose)
    assert report.get("rotation_energy", "float64").status == "pass"
    assert report.get("rotation_energy", "float64").tolerance == 10.0
    assert report.get("translation", "float64").status == "report"
    with pytest.raises(ValueError, match="rotation_forces"):
        Expectations(rotation_forces=-1.0)
    with pytest.raises(ValueError, match="translation"):
        Expectations(overrides={"translation": "roughly"})


def test_bad_arguments_raise_clear_errors(tmp_path) -> None:
    model = PairPotential()
    with pytest.raises(ValueError, match="unknown properties"):
        run_property_suite(model, properties=["translaton"])
    with pytest.raises(ValueError, match="float16"):
        run_property_suite(model, dtypes=[torch.float16])
    with pytest.raises(TypeError, match="Structure"):
        run_property_suite(model, structures=[default_structures()[0].atoms])
    with pytest.raises(TypeError, match="settings"):
        run_property_suite(model, num_rotation=3)
    with pytest.raises(ValueError, match="no atoms"):
        from ase import Atoms

        Structure("empty", Atoms())
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ValueError, match="missing.yaml"):
        read_model_options(missing)
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("optim: {batch_size: 2}\n")
    with pytest.raises(ValueError, match="no 'model:' section"):
        read_model_options(no_model)
    loop = tmp_path / "loop.yaml"
    loop.write_text("includes: loop.yaml\nmodel: {lmax: 2}\n")
    with pytest.raises(ValueError, match="includes itself"):
        read_model_options(loop)


def test_caller_model_is_left_unchanged() -> None:
    model = PairPotential().train()
    run_property_suite(model, dtypes=[torch.float64], properties=["translation"])
    assert model.training and model.depth.dtype == torch.float32


def test_suite_accepts_custom_structures() -> None:
    structures = [s for s in default_structures() if s.name in ("molecule", "atom")]
    report = run_property_suite(PairPotential(), structures=structures, dtypes=[torch.float64], **FAST)
    assert report.passed, report.table()
    assert report.get("supercell", "float64").status == "n/a"
    assert report.get("stress", "float64").status == "n/a"


# The pytest entry point, used as a user would: one test per property and dtype.
test_pair_potential_entry_point = pytest_properties(PairPotential, **FAST)


def test_entry_point_fails_for_a_broken_model() -> None:
    test = pytest_properties(lambda: AddsPositionTerm(PairPotential()), properties=["translation"], dtypes=[torch.float64])
    (mark,) = [m for m in test.pytestmark if m.name == "parametrize"]
    assert [p.id for p in mark.args[1]] == ["translation-float64"]
    with pytest.raises(PropertySuiteFailure, match="translation/float64"):
        test(torch.float64, "translation")
    assert len(pytest_properties(PairPotential).pytestmark[0].args[1]) == 2 * len(PROPERTIES)
