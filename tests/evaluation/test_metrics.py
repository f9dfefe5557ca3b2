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
