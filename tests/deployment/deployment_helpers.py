"""Helpers of the deployment tests (import as ``deployment_helpers``): fixture structures as batches."""

from __future__ import annotations

import numpy as np
import torch

from spherical_channels.data.batch import AtomicBatch


def preds_batch(preds: np.lib.npyio.NpzFile, rows: slice = slice(None)) -> AtomicBatch:
    """Structures ``rows`` of a fixture, as the official model saw them (wrapped positions)."""
    natoms = torch.as_tensor(preds["natoms"], dtype=torch.long)
    starts = torch.cumsum(natoms, 0) - natoms
    index = range(len(natoms))[rows]
    atoms = torch.cat([torch.arange(int(starts[s]), int(starts[s] + natoms[s])) for s in index])
    counts = natoms[list(index)]
    return AtomicBatch(
        positions=torch.as_tensor(preds["positions"])[atoms].float(),
        atomic_numbers=torch.as_tensor(preds["atomic_numbers"], dtype=torch.long)[atoms],
        cell=torch.as_tensor(preds["cell"])[list(index)].float(),
        pbc=torch.as_tensor(preds["pbc"], dtype=torch.bool)[list(index)],
        natoms=counts,
        batch=torch.repeat_interleave(torch.arange(len(counts)), counts),
        fixed=torch.zeros(len(atoms), dtype=torch.bool),
        tags=torch.as_tensor(preds["tags"], dtype=torch.long)[atoms],
    )


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
