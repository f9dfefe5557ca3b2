"""An AOTInductor artefact: compiled once (the official SchNet fixture, forces -dE/dx inside the
compiled program), then checked against the fixture, the eager calculator and relaxation.

Compiled kernels may round float32 differently from eager (fused loops, other summation
orders): agreement with eager is asked to 1e-5 eV/Å in forces (float32 rounding of O(1) forces
is ~1e-7) and 1e-4 eV in energies of ~30 eV (~4e-6 at float32 rounding, summed over atoms);
the fixture tolerances are those of tests/fixtures/README.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spherical_channels.deployment import export_model, load_exported, read_info
from spherical_channels.deployment.export import default_examples
from spherical_channels.models.checkpoint import load_model
from spherical_channels.security import UntrustedPickleWarning
from spherical_channels.simulation import SCNCalculator, relax_many

from deployment_helpers import assert_matches_fixture
from scn_helpers import batch_from_preds

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def compiled(one_thread, tmp_path_factory):  # noqa: ARG001, ANN201
    model = load_model(FIXTURES / "schnet_tiny" / "ckpt.pt")
    path = tmp_path_factory.mktemp("aoti") / "schnet.pt2"
    report = export_model(model, path, format="aoti", source="schnet_tiny")
    assert report.force_error <= 1e-5 and report.energy_error <= 1e-4
    with pytest.warns(UntrustedPickleWarning):
        loaded = load_exported(path, trust_pickle=True)
    return model, loaded, path


def test_aoti_artefact_reproduces_the_fixture_at_other_sizes(compiled) -> None:
    model, loaded, path = compiled
    info = read_info(path)  # from the package's AOTInductor metadata, without loading the library
    assert (info.format, info.model_name, info.dtype) == ("aoti", "schnet", "float32")
    assert info.conservative and info.graph.max_num_neighbors == 50 and info.source == "schnet_tiny"
    preds = np.load(FIXTURES / "schnet_tiny" / "preds.npz")
    for rows in (slice(6, 7), slice(2, 6), slice(None)):
        batch = batch_from_preds(preds, torch.float32, rows)
        got, want = loaded(batch), model(batch)
        assert float((got["energy"] - want["energy"]).abs().max()) <= 1e-4
        assert float((got["forces"] - want["forces"]).abs().max()) <= 1e-5
        assert_matches_fixture(got, preds, rows)


def test_aoti_artefact_in_the_calculator_and_the_relaxation_engine(compiled) -> None:
    model, loaded, _ = compiled
    atoms = default_examples()[3]
    reference = atoms.copy()
    reference.calc = SCNCalculator(model)
    atoms.calc = SCNCalculator(loaded)  # float32, the artefact's dtype and the calculator's default
    assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-4)
    np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), rtol=0, atol=1e-5)
    structures = default_examples()[4:7]
    settings = dict(optimizer="FIRE", fmax=0.05, steps=4, progress=False)
    eager, artefact = relax_many(structures, model, **settings), relax_many(structures, loaded, **settings)
    for e, a in zip(eager, artefact):
        assert a.error is None and a.steps == e.steps > 0
        np.testing.assert_allclose(a.atoms.positions, e.atoms.positions, rtol=0, atol=1e-4)
    assert model_is_untouched(model)


def model_is_untouched(model: torch.nn.Module) -> bool:
    """Exporting works on a copy: the model keeps its dtype, mode and trainable weights."""
    return all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters()) and not model.training
