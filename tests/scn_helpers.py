"""Helpers shared by test modules in several folders (import as ``scn_helpers``)."""

from __future__ import annotations

import torch


def scale_like_fixtures(model: torch.nn.Module) -> torch.nn.Module:
    """Scale random weights as the official-implementation fixtures were scaled (embeddings x300,
    linear weights x2), so that outputs are O(1) and convention errors visible."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.mul_(300.0)
            elif isinstance(module, torch.nn.Linear):
                module.weight.mul_(2.0)
    return model


def batch_from_preds(preds, dtype: torch.dtype = torch.float32, rows: slice = slice(None)):  # noqa: ANN001, ANN201
    """Structures ``rows`` (default all) of an official fixture's ``preds.npz`` as one
    ``AtomicBatch``: the exact inputs the official model saw (wrapped positions)."""
    from spherical_channels.data.batch import AtomicBatch

    natoms = torch.as_tensor(preds["natoms"], dtype=torch.long)
    starts = torch.cumsum(natoms, 0) - natoms
    index = list(range(len(natoms))[rows])
    atoms = torch.cat([torch.arange(int(starts[s]), int(starts[s] + natoms[s])) for s in index])
    counts = natoms[index]
    return AtomicBatch(
        positions=torch.as_tensor(preds["positions"])[atoms].to(dtype),
        atomic_numbers=torch.as_tensor(preds["atomic_numbers"], dtype=torch.long)[atoms],
        cell=torch.as_tensor(preds["cell"])[index].to(dtype),
        pbc=torch.as_tensor(preds["pbc"], dtype=torch.bool)[index],
        natoms=counts,
        batch=torch.repeat_interleave(torch.arange(len(counts)), counts),
        fixed=torch.zeros(len(atoms), dtype=torch.bool),
        tags=torch.as_tensor(preds["tags"], dtype=torch.long)[atoms],
    )
