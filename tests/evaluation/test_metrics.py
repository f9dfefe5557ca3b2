"""Each OC20 metric against a small example computed by hand."""

from __future__ import annotations

import math

import numpy as np
import torch

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.evaluation.metrics import (
    ADWT_THRESHOLDS,
    AFBT_THRESHOLDS,
    S2EFMetrics,
    average_distance_within_threshold,
    average_force_below_threshold,
    minimum_image_distances,
    relaxed_energy_metrics,
)


def two_structures() -> tuple[dict[str, torch.Tensor], AtomicBatch]:
    """A: 2 atoms, atom 0 fixed; B: 1 atom."""
    batch = AtomicBatch(
        positions=torch.zeros(3, 3, dtype=torch.float64),
        atomic_numbers=torch.tensor([29, 8, 1]),
        cell=torch.zeros(2, 3, 3, dtype=torch.float64),
        pbc=torch.zeros(2, 3, dtype=torch.bool),
        natoms=torch.tensor([2, 1]),
        batch=torch.tensor([0, 0, 1]),
        fixed=torch.tensor([True, False, False]),
        tags=torch.zeros(3, dtype=torch.long),
        energy=torch.tensor([1.01, 2.5], dtype=torch.float64),
        forces=torch.tensor([[0.0, 0, 0], [1, 0.02, 0], [0, 0.5, 0]], dtype=torch.float64),
    )
    prediction = {
        "energy": torch.tensor([1.0, 2.0], dtype=torch.float64),
        "forces": torch.tensor([[9.0, 9, 9], [1, 0, 0], [0, 1, 0]], dtype=torch.float64),
    }
    return prediction, batch


def test_s2ef_metrics_by_hand() -> None:
    prediction, batch = two_structures()
    metrics = S2EFMetrics()
    metrics.update(prediction, batch)
    m = metrics.compute()
    assert math.isclose(m["energy_mae"], (0.01 + 0.5) / 2, abs_tol=1e-12)
    assert math.isclose(m["energy_mae_per_atom"], (0.01 / 2 + 0.5) / 2, abs_tol=1e-12)
    # free atoms 1 and 2 only: component errors 0.02 and 0.5 over 6 components
    assert math.isclose(m["force_mae"], (0.02 + 0.5) / 6, abs_tol=1e-12)
    assert math.isclose(m["force_l2mae"], (0.02 + 0.5) / 2, abs_tol=1e-12)
    assert math.isclose(m["force_cos"], (1 / math.sqrt(1 + 0.02**2) + 1.0) / 2, abs_tol=1e-12)
    # A: |dE| = 0.01 < 0.02 and its free atom's worst component 0.02 < 0.03 (the fixed atom's
    # error of 9 is not evaluated); B: |dE| = 0.5 fails
    assert m["efwt"] == 0.5
    assert m["num_structures"] == 2


def test_s2ef_metrics_merge_equals_one_pass_and_all_atoms_option() -> None:
    prediction, batch = two_structures()
    whole = S2EFMetrics()
    whole.update(prediction, batch)
    parts = S2EFMetrics()
    for s, sub in enumerate(batch.split()):
        part = S2EFMetrics()
        sl = slice(0, 2) if s == 0 else slice(2, 3)
        part.update({"energy": prediction["energy"][s : s + 1], "forces": prediction["forces"][sl]}, sub)
        parts.merge(part)
    assert whole.compute() == parts.compute()
    every = S2EFMetrics()
    every.update(prediction, batch, free_only=False)
    assert every.compute()["efwt"] == 0.0  # now the fixed atom's error of 9 counts
    assert math.isclose(every.compute()["force_mae"], (27 + 0.02 + 0.5) / 9, abs_tol=1e-12)


def test_minimum_image_distance() -> None:
    cell = np.diag([10.0, 10.0, 10.0])
    d = minimum_image_distances([[9.9, 0, 0], [5.0, 5.0, 9.95]], [[0.1, 0, 0], [5.0, 5.0, 0.05]], cell, [True, True, False])
    np.testing.assert_allclose(d, [0.2, 9.9], atol=1e-12)  # z is not periodic: no wrapping


def test_adwt_by_hand() -> None:
    assert len(ADWT_THRESHOLDS) == 490 and math.isclose(ADWT_THRESHOLDS[0], 0.01) and ADWT_THRESHOLDS[-1] < 0.5
    # 0.005 is below all 490 thresholds; 0.2005 below the 299 from 0.201 to 0.499; 0.6 below none
    assert math.isclose(average_distance_within_threshold([0.005, 0.2005, 0.6]), (490 + 299) / (3 * 490))


def test_afbt_and_is2re_by_hand() -> None:
    assert len(AFBT_THRESHOLDS) == 390
    assert average_force_below_threshold([0.005, 0.5]) == 0.5
    m = relaxed_energy_metrics([1.0, 2.0], [1.01, 2.5])
    assert math.isclose(m["energy_mae"], 0.255) and m["ewt"] == 0.5


def test_force_metrics_cover_the_structures_with_forces_and_efwt_those_with_both() -> None:
    """A batch where B lacks forces: the batch's own targets drop forces for both structures
    (batch.forces is None), so per-structure targets must be used; A's force error counts."""
    from spherical_channels.evaluation.metrics import S2EFTargets

    prediction, batch = two_structures()
    targets = S2EFTargets.from_batch(batch)
    targets.has_forces[1] = False
    metrics = S2EFMetrics()
    metrics.update(prediction, batch, targets=targets)
    m = metrics.compute()
    # energies of both structures; forces of A's free atom only: errors (0, 0.02, 0)
    assert math.isclose(m["energy_mae"], (0.01 + 0.5) / 2, abs_tol=1e-12)
    assert math.isclose(m["force_mae"], 0.02 / 3, abs_tol=1e-12)
    assert m["efwt"] == 1.0  # A passes; B has no forces, so it is not an EFwT structure
    assert (m["num_structures"], m["num_energy_structures"], m["num_force_structures"], m["num_efwt_structures"]) == (2, 2, 1, 1)
    assert m["num_force_atoms"] == 1


def test_without_energies_or_predicted_forces_the_metrics_needing_them_are_absent() -> None:
    from spherical_channels.evaluation.metrics import S2EFTargets

    prediction, batch = two_structures()
    targets = S2EFTargets.from_batch(batch)
    targets.has_energy[:] = False
    metrics = S2EFMetrics()
    metrics.update(prediction, batch, targets=targets)
    m = metrics.compute()
    assert math.isnan(m["energy_mae"]) and math.isnan(m["efwt"]) and m["num_energy_structures"] == 0
    assert math.isclose(m["force_mae"], (0.02 + 0.5) / 6, abs_tol=1e-12)
    # a model that predicts no forces: EFwT is undefined, not an energy-only score
    energy_only = S2EFMetrics()
    energy_only.update({"energy": prediction["energy"]}, batch)
    m = energy_only.compute()
    assert math.isnan(m["efwt"]) and math.isnan(m["force_mae"]) and m["num_efwt_structures"] == 0
    assert math.isclose(m["energy_mae"], (0.01 + 0.5) / 2, abs_tol=1e-12)


def test_targets_from_atoms_read_each_structure_and_refuse_non_finite_ones() -> None:
    import pytest
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from spherical_channels.evaluation.metrics import S2EFTargets

    a, b, c = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]]), Atoms("H"), Atoms("O")
    a.calc = SinglePointCalculator(a, energy=-1.25, forces=[[0, 0, 1.0], [0, 0, -1.0]])
    b.calc = SinglePointCalculator(b, energy=0.5)
    targets = S2EFTargets.from_atoms([a, b, c])
    assert targets.has_energy.tolist() == [True, True, False] and targets.has_forces.tolist() == [True, False, False]
    assert targets.energy.dtype == torch.float64 and targets.energy[0] == -1.25 and targets.forces.shape == (4, 3)
    b.calc = SinglePointCalculator(b, energy=float("nan"))
    with pytest.raises(ValueError, match="structure 11: non-finite reference energy"):
        S2EFTargets.from_atoms([a, b], first_index=10)


def test_json_safe_turns_undefined_numbers_into_null() -> None:
    import json

    from spherical_channels.evaluation.metrics import json_safe

    value = {"a": float("nan"), "b": [np.float32(1.5), float("inf"), (np.int64(3), True)], 4: {"c": None}}
    text = json.dumps(json_safe(value), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.5, None, [3, True]], "4": {"c": None}}
