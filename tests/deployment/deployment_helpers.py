"""Helpers of the deployment tests (import as ``deployment_helpers``)."""

from __future__ import annotations

import numpy as np


def assert_matches_fixture(out: dict, preds: np.lib.npyio.NpzFile, rows: slice) -> None:
    """``out`` (energy, forces of structures ``rows``) within the fixture tolerances of ``preds``."""
    natoms = preds["natoms"]
    starts = np.cumsum(natoms) - natoms
    index = range(len(natoms))[rows]
    energy = preds["energy"][list(index)].astype(np.float64)
    forces = np.concatenate([preds["forces"][starts[s] : starts[s] + natoms[s]] for s in index]).astype(np.float64)
    got_e, got_f = out["energy"].double().numpy(), out["forces"].double().numpy()
    assert np.all(np.abs(got_e - energy) <= 1e-4 + 1e-5 * np.abs(energy)), (got_e, energy)
    assert np.max(np.abs(got_f - forces)) <= 1e-4
    assert np.max(np.abs(forces)) > 0.1  # O(1) outputs: a convention error could not hide
