"""Shared fixtures: the built-in reference data at its smallest size, generated once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``scn data generate --size tiny`` output (a few seconds; EMT-labelled, OC20 splits)."""
    from spherical_channels.data.reference import generate_reference_data

    out = tmp_path_factory.mktemp("reference") / "tiny"
    generate_reference_data(out, size="tiny", seed=0, progress=False)
    return out


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
