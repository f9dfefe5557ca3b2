"""`scn diagnose`: the Appendix A tables of a saved checkpoint, as text, JSON and a figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ase import Atoms
from ase.build import fcc111, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from spherical_channels.cli import main
from spherical_channels.data.formats.extxyz import ExtxyzWriter
from spherical_channels.models.checkpoint import model_checkpoint, save_checkpoint

from scn_helpers import scale_like_fixtures

TINY_SCN = dict(num_interactions=2, lmax=2, mmax=1, num_taps=1, num_bands=1, sphere_channels=8, sphere_channels_reduce=8,
                hidden_channels=16, num_sphere_samples=16, num_basis_functions=8, cutoff=5.0, max_num_neighbors=16)


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_checkpoint(model_checkpoint(model), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SCN and a tiny SchNet checkpoint, and three EMT-labelled structures."""
    from spherical_channels.models.schnet import SchNet
    from spherical_channels.models.scn import SCN

    folder = tmp_path_factory.mktemp("diagnose")
    torch.manual_seed(0)
    # amplified weights: outputs that vary, so that bf16 rounding does not hide the differences
    scn = _save(scale_like_fixtures(SCN(**TINY_SCN)), folder / "scn.pt")
    schnet = _save(SchNet(hidden_channels=8, num_filters=8, num_interactions=1, num_gaussians=8, cutoff=5.0),
                   folder / "schnet.pt")
    slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    slab.pbc = True
    slab.info.pop("adsorbate_info", None)  # a dict, which extxyz cannot store
    water, methane = molecule("H2O"), molecule("CH4")
    frames = [slab, water, methane]
    for atoms in (water, methane):
        atoms.center(vacuum=4.0)
        atoms.pbc = True
    for atoms in frames:
        atoms.rattle(0.05, seed=1)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
    structures = folder / "three.extxyz"
    with ExtxyzWriter(structures) as writer:
        for atoms in frames:
            writer.write(atoms)
    return {"scn": scn, "schnet": schnet, "structures": structures}


def test_diagnose_prints_the_tables_and_writes_json_and_a_plot(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out_json, out_png = tmp_path / "out" / "diag.json", tmp_path / "out" / "diag.png"
    argv = ["diagnose", str(files["scn"]), str(files["structures"]), "--rotations", "2", "--amp", "bf16",
            "--json", str(out_json), "--plot", str(out_png), "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().out == ""  # --quiet
    assert main(argv[:-1]) == 0
    text = capsys.readouterr().out
    for piece in ("Table 4", "Table 5", "Table 6", "float32", "bf16", "m<=1, 1 tap, grid", "silu-2 (model)"):
        assert piece in text, piece
    report = json.loads(out_json.read_text(), parse_constant=lambda token: pytest.fail(f"non-strict JSON {token}"))
    assert {"model", "checkpoint", "structures", "num_structures", "num_rotations", "precisions",
            "table4", "table5", "table6", "notes"} <= set(report)
    assert report["precisions"] == ["float32", "bf16"] and report["num_structures"] == 3
    for precision in report["precisions"]:
        for quantity in ("energy", "forces"):
            row = report["table4"][precision][quantity]
            assert {"mad", "mean_abs", "percent", "max", "mae", "percent_of_mae"} <= set(row)
            assert row["mad"] > 0 and row["mae"] > 0  # a random model on EMT labels
            assert report["table6"][precision][quantity]["mad"] > 0
        assert [r["layer"] for r in report["table5"][precision]["layers"]] == [1, 2]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_models_get_table_4_and_a_note(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out_json = tmp_path / "schnet.json"
    assert main(["diagnose", str(files["schnet"]), str(files["structures"]), "--rotations", "1",
                 "--max-structures", "2", "--dtype", "float64", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "Table 4" in text and "not applicable" in text
    report = json.loads(out_json.read_text())
    assert report["num_structures"] == 2 and "skipped" in report["table5"] and "skipped" in report["table6"]
    assert report["table4"]["float64"]["energy"]["percent"] < 1e-8  # SchNet: invariant by construction


def test_bad_input_is_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    scn, structures = str(files["scn"]), str(files["structures"])
    cases = [
        ([scn, structures, "--rotations", "0"], "--rotations must be >= 1"),
        ([scn, structures, "--max-structures", "0"], "--max-structures must be >= 1"),
        ([scn, structures, "--amp", "bf16", "--dtype", "float64"], "needs --dtype float32"),
        ([scn, structures, "--plot", str(tmp_path / "figure.txt")], "unknown figure format"),
        ([str(tmp_path / "missing.pt"), structures], "no such file"),
        ([scn, str(tmp_path / "missing.extxyz")], "no such file"),
        ([scn, structures, "--device", "nonsense"], "not usable"),
    ]
    for args, expected in cases:
        with pytest.raises(SystemExit) as exc:
            main(["diagnose", *args, "--quiet"])
        message = exc.value.code
        assert isinstance(message, str) and message.startswith("scn diagnose: ") and expected in message, message
        assert "\n" not in message
    # a structure the file reader refuses, and one only the model refuses (U: beyond its elements)
    for name, culprit, expected in (("overlap", Atoms("CO", positions=[[0, 0, 0], [0, 0, 1e-5]]), "apart"),
                                    ("uranium", Atoms("U", positions=[[0, 0, 0]]), "element")):
        bad = tmp_path / f"{name}.extxyz"
        with ExtxyzWriter(bad) as writer:
            writer.write(molecule("H2O"))
            writer.write(culprit)
        with pytest.raises(SystemExit) as exc:
            main(["diagnose", scn, str(bad), "--quiet"])
        message = exc.value.code
        assert str(bad) in message and "structure 1" in message and expected in message, message
