"""The artefact of an official SCN checkpoint reproduces the official implementation's outputs,
and ``compile_model`` the eager model's.

Fixture tolerances (tests/fixtures/README.md, float32): |dE| <= 1e-4 eV + 1e-5 |E|, every force
component within 1e-4 eV/Å. The artefact is traced on the first two fixture structures (28 and
29 atoms) and evaluated on the others, alone and all eight in one batch: other atom, edge and
structure counts than it was traced with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spherical_channels.deployment import compile_model, export_model, load_exported
from spherical_channels.models.checkpoint import load_model
from spherical_channels.security import UntrustedPickleWarning

from deployment_helpers import assert_matches_fixture
from scn_helpers import batch_from_preds

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_official_scn_artefact_reproduces_the_fixture(one_thread, tmp_path: Path) -> None:  # noqa: ARG001
    model = load_model(FIXTURES / "cfg_tiny" / "ckpt.pt")  # EMA weights, direct forces
    path = tmp_path / "cfg_tiny.pt2"
    report = export_model(model, path, format="exported-program", dtype=torch.float32, source="cfg_tiny")
    # the export's own check compared the file with the eager model on all eight structures
    assert report.num_checked == 8 and report.force_error <= 1e-4 and report.energy_error <= 1e-3
    assert report.info.graph.rank_boundaries == (12,) and not report.info.conservative
    with pytest.warns(UntrustedPickleWarning):
        loaded = load_exported(path, trust_pickle=True)
    preds = np.load(FIXTURES / "cfg_tiny" / "preds.npz")
    for rows in (slice(2, 3), slice(5, 8), slice(None)):
        batch = batch_from_preds(preds, torch.float32, rows)
        assert_matches_fixture(loaded(batch), preds, rows)


def test_compiled_model_matches_the_eager_model(one_thread) -> None:  # noqa: ARG001
    model = load_model(FIXTURES / "schnet_tiny" / "ckpt.pt")  # SchNet: forces are -dE/dx
    # aot_eager: the same capture (dynamic sizes, no autograd left) without code generation,
    # which takes a minute here (benchmarks/bench_export.py measures the inductor backend)
    compiled = compile_model(model, backend="aot_eager")
    assert compiled.info.format == "torch.compile" and compiled.conservative
    assert set(compiled.seconds) == {"trace", "compile"}
    preds = np.load(FIXTURES / "schnet_tiny" / "preds.npz")
    for rows in (slice(2, 5), slice(None)):
        batch = batch_from_preds(preds, torch.float32, rows)
        got, want = compiled(batch), model(batch)
        assert float((got["energy"] - want["energy"]).abs().max()) <= 1e-4
        assert float((got["forces"] - want["forces"]).abs().max()) <= 1e-5
        assert_matches_fixture(got, preds, rows)
