"""Exported models (exported-program format): the artefact against the eager model, loading, refusals.

One small energy-conserving SCN (two resolutions, ZBL prior) is exported once for the module.
The artefact runs the model's own operations (an ATen graph of its forward and backward pass),
so in float64 it agrees with the eager model to rounding; the tolerances asked of a deployable
artefact (1e-5 eV, 1e-5 eV/Å; relaxed positions 1e-4 Å) are far above that.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.data.validation import StructureError
from spherical_channels.deployment import (
    ExportError, ExportedModel, export_model, is_exported_model, load_exported, read_info,
)
from spherical_channels.deployment.export import default_examples
from spherical_channels.deployment.inputs import flat_inputs
from spherical_channels.models import SCN
from spherical_channels.models.response import NoStressError
from spherical_channels.security import UntrustedPickleWarning
from spherical_channels.simulation import SCNCalculator, relax_many
from spherical_channels.simulation.engine import model_dtype_device

from scn_helpers import scale_like_fixtures

F64 = torch.float64
TINY = dict(num_interactions=2, lmax=1, mmax=1, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
            num_sphere_samples=16, num_basis_functions=8, max_num_neighbors=16, cutoff=4.5)
ENERGY_TOL = FORCE_TOL = 1e-5  # eV, eV/Å: what a deployable artefact must reproduce
POSITION_TOL = 1e-4  # Å after a relaxation


def tiny_scn(**changes) -> SCN:
    torch.manual_seed(0)
    return scale_like_fixtures(SCN(**{**TINY, **changes})).double().eval()


def load(path: Path) -> ExportedModel:
    with pytest.warns(UntrustedPickleWarning):
        return load_exported(path, trust_pickle=True)


@pytest.fixture(scope="module")
def exported(one_thread, tmp_path_factory) -> tuple[SCN, ExportedModel, Path]:  # noqa: ARG001
    model = tiny_scn(direct_forces=False, zbl=True)
    path = tmp_path_factory.mktemp("export") / "scn.pt2"
    # the tests below compare with the eager model themselves
    report = export_model(model, path, format="exported-program", verify=False)
    assert report.path == path and path.exists()
    return model, load(path), path


def water() -> Atoms:
    atoms = molecule("H2O")
    atoms.center(vacuum=5.0)
    atoms.pbc = False
    return atoms


def lone_atom() -> Atoms:
    return Atoms("Cu", positions=[[5.0, 5.0, 5.0]], cell=[10.0, 10.0, 10.0], pbc=False)


def test_artefact_matches_the_eager_model_at_other_sizes(exported) -> None:
    model, loaded, _ = exported
    examples = default_examples()
    options = loaded.info.graph
    traced_sizes = [t.shape for t in flat_inputs(AtomicBatch.from_atoms(examples[:2], dtype=F64), options)]
    groups = {
        "three slabs": examples[2:5],
        "one structure": [examples[6]],
        "water (no far edges)": [water()],
        "water and a slab": [water(), examples[7]],
        "a lone atom (no edges)": [lone_atom()],
    }
    seen_counts = set()
    for name, structures in groups.items():
        batch = AtomicBatch.from_atoms(structures, dtype=F64)
        sizes = [t.shape for t in flat_inputs(batch, options)]
        assert sizes != traced_sizes, name
        seen_counts.add(tuple(sizes[4 + 2 * g][1] for g in range(options.num_groups)))
        got, want = loaded(batch), model(batch)
        assert got["energy"].shape == (len(structures),) and got["forces"].shape == (batch.num_atoms, 3)
        assert float((got["energy"] - want["energy"]).abs().max()) <= ENERGY_TOL, name
        assert float((got["forces"] - want["forces"]).abs().max()) <= FORCE_TOL, name
    assert any(counts[1] == 0 for counts in seen_counts) and (0, 0) in seen_counts  # empty edge groups ran
    # the outputs are not trivially small: a wrong program could not hide under the tolerance
    batch = AtomicBatch.from_atoms(examples[2:5], dtype=F64)
    assert float(model(batch)["forces"].abs().max()) > 0.1


def test_metadata_describes_the_model_and_is_read_without_loading(exported) -> None:
    model, loaded, path = exported
    info = read_info(path)  # no opt-in needed: only JSON is read
    assert info == loaded.info
    assert (info.format, info.model_name, info.dtype, info.device) == ("exported-program", "scn", "float64", "cpu")
    assert info.conservative and info.regress_forces
    assert info.graph.cutoff == model.cutoff and info.graph.max_num_neighbors == model.max_num_neighbors
    assert info.graph.rank_boundaries == (12,) and info.graph.rank_width == model.max_num_neighbors
    assert info.max_atomic_number == model.max_num_elements - 1
    assert info.model_config == model.config.to_dict()
    assert info.inputs[:4] == ["positions", "atomic_numbers", "batch", "natoms"] and len(info.inputs) == 8
    assert loaded.conservative and loaded.regress_forces
    assert model_dtype_device(loaded) == (F64, torch.device("cpu"))


def test_relax_many_with_the_artefact_follows_the_eager_model(exported) -> None:
    model, loaded, _ = exported
    structures = default_examples()[:3] + [water()]
    settings = dict(optimizer="FIRE", fmax=0.05, steps=6, dtype=F64, progress=False)
    eager = relax_many(structures, model, **settings)
    artefact = relax_many(structures, loaded, **settings)
    assert any(o.steps > 0 for o in eager)
    for e, a in zip(eager, artefact):
        assert a.error is None and e.error is None
        assert a.steps == e.steps and a.converged == e.converged
        np.testing.assert_allclose(a.atoms.positions, e.atoms.positions, rtol=0, atol=POSITION_TOL)
        assert a.energy == pytest.approx(e.energy, abs=ENERGY_TOL)
    moved = max(np.abs(e.atoms.positions - s.positions).max() for e, s in zip(eager, structures))
    assert moved > 10 * POSITION_TOL  # the relaxation did move atoms
    assert not loaded.training  # relax_many restores the mode


def test_calculator_with_the_artefact_matches_the_eager_calculator(exported) -> None:
    model, loaded, _ = exported
    atoms = default_examples()[4]
    reference = atoms.copy()
    reference.calc = SCNCalculator(model, dtype=F64)
    atoms.calc = SCNCalculator(loaded, dtype=F64)
    assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=ENERGY_TOL)
    np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), rtol=0, atol=FORCE_TOL)
    # under rotation averaging too (the calculator rotates the batch; the artefact rebuilds the graph)
    atoms.calc = SCNCalculator(loaded, dtype=F64, rotation_average=2)
    reference.calc = SCNCalculator(model, dtype=F64, rotation_average=2)
    assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=ENERGY_TOL)


def test_the_artefact_keeps_its_dtype_and_device_and_has_no_stress(exported) -> None:
    _, loaded, path = exported
    with pytest.raises(ValueError, match="float64 on cpu cannot be moved to float32"):
        SCNCalculator(loaded)  # the calculator's default dtype is float32
    with pytest.raises(ValueError, match="float64"):
        loaded.float()
    assert loaded.to(device="cpu", dtype=F64) is loaded  # what it is: fine
    batch = AtomicBatch.from_atoms([water()], dtype=F64)
    with pytest.raises(NoStressError, match="no stress"):
        loaded(batch, stress=True)
    with pytest.raises(ValueError, match="the batch is float32"):
        loaded(AtomicBatch.from_atoms([water()], dtype=torch.float32))
    heavy = water()
    heavy.numbers[0] = 95  # beyond the model's element table (max_num_elements 90)
    with pytest.raises(StructureError, match="atomic number"):
        loaded(AtomicBatch.from_atoms([heavy], dtype=F64))
    # a cell relaxation needs stress: refused before anything runs, saying why
    with pytest.raises(ValueError, match="cell=True needs stress; an exported model"):
        relax_many([default_examples()[0]], loaded, dtype=F64, cell=True, steps=1, progress=False)


def test_loading_needs_the_opt_in_and_a_file_of_this_package(exported, tmp_path: Path) -> None:
    _, _, path = exported
    with pytest.raises(ExportError, match="runs code from the file.*trust_pickle=True"):
        load_exported(path)
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "missing.pt2", trust_pickle=True)
    checkpoint = tmp_path / "weights.pt2"
    torch.save({"state_dict": {}}, checkpoint)
    with pytest.raises(ExportError, match="not an exported model"):
        read_info(checkpoint)
    assert is_exported_model(path) and not is_exported_model(checkpoint) and not is_exported_model(tmp_path)
    text = tmp_path / "text.pt2"
    text.write_text("not a model")
    with pytest.raises(ExportError, match="not a PT2 archive"):
        load_exported(text, trust_pickle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refusal comes before any warning or loading
        with pytest.raises(ExportError):
            load_exported(path)


def test_models_that_cannot_be_exported_are_refused_before_any_work(tmp_path: Path) -> None:
    from spherical_channels.models.spinconv import SpinConv

    out = tmp_path / "m.pt2"
    with pytest.raises(ExportError, match="smooth"):
        export_model(tiny_scn(smooth=True), out)
    random_roll = tiny_scn()
    random_roll.update_config(eval_roll="random")
    with pytest.raises(ExportError, match="eval_roll='fixed'"):
        export_model(random_roll, out)
    spinconv = SpinConv(hidden_channels=8, mid_hidden_channels=8, num_interactions=1, num_basis_functions=8,
                        sphere_size_lat=4, sphere_size_long=4, embedding_size=4)
    with pytest.raises(ExportError, match="spinconv"):
        export_model(spinconv, out)
    with pytest.raises(ExportError, match="only this package's SCN and SchNet"):
        export_model(torch.nn.Linear(2, 2), out)
    with pytest.raises(ExportError, match=r"\*\.pt2"):
        export_model(tiny_scn(), tmp_path / "m.pt")
    with pytest.raises(ExportError, match="format"):
        export_model(tiny_scn(), out, format="onnx")
    # example structures too small to trace with dynamic sizes: refused, and nothing written
    with pytest.raises(ExportError, match="too few"):
        export_model(tiny_scn(), out, format="exported-program", example=[water()])
    assert list(tmp_path.iterdir()) == []


def test_the_one_loader_and_the_calculator_take_an_artefact_path(exported) -> None:
    """load_model and SCNCalculator(path) read an artefact as they read a checkpoint, behind
    the same opt-in (its code runs on loading)."""
    from ase.calculators.calculator import PropertyNotImplementedError

    from spherical_channels.models.checkpoint import load_model

    _, loaded, path = exported
    with pytest.raises(ExportError, match="trust_pickle=True"):
        load_model(path)
    with pytest.warns(UntrustedPickleWarning):
        again = load_model(path, trust_pickle=True, dtype=F64)
    atoms = default_examples()[0]
    batch = AtomicBatch.from_atoms([atoms], dtype=F64)
    torch.testing.assert_close(again(batch)["forces"], loaded(batch)["forces"], rtol=0, atol=1e-12)
    with pytest.warns(UntrustedPickleWarning):
        atoms.calc = SCNCalculator(path, dtype=F64, trust_pickle=True)
    np.testing.assert_allclose(atoms.get_forces(), loaded(batch)["forces"].numpy(), rtol=0, atol=1e-12)
    with pytest.raises(PropertyNotImplementedError, match="exported model"):
        atoms.get_stress()
