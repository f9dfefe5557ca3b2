"""Shared fixtures: the built-in reference data at its smallest size, generated once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``scn data generate --size tiny`` output (a few seconds; EMT-labelled, OC20 splits)."""
    from spherical_channels.data.reference import generate_reference_data

    out = tmp_path_factory.mktemp("reference") / "tiny"
    generate_reference_data(out, size="tiny", seed=0, progress=False)
    return out
