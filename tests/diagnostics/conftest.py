"""Fixtures of the diagnostics tests."""

from __future__ import annotations

import pytest
import torch
from diagnostics_helpers import structures

from spherical_channels.data.batch import AtomicBatch


@pytest.fixture(scope="module")
def batch() -> AtomicBatch:
    """Three small slabs in float64."""
    return AtomicBatch.from_atoms(structures(3), dtype=torch.float64)
