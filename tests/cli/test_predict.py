"""The `scn` command line, end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from spherical_channels.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_predict_example_reproduces_the_official_outputs(tmp_path: Path) -> None:
    """The bundled checkpoint is the cfg_tiny fixture's: same predictions as the official code."""
    out_json, out_xyz = tmp_path / "p.json", tmp_path / "p.extxyz"
    assert main(["predict", "example", "example", "--json", str(out_json), "-o", str(out_xyz), "--quiet"]) == 0
    predictions = json.loads(out_json.read_text())["predictions"]
    reference = np.load(FIXTURES / "cfg_tiny" / "preds.npz")
    energies = np.array([p["energy"] for p in predictions])
    np.testing.assert_allclose(energies, reference["energy"], atol=1e-4, rtol=1e-5)
    forces = np.concatenate([np.array(p["forces"]) for p in predictions])
    np.testing.assert_allclose(forces, reference["forces"], atol=1e-4, rtol=0)
    frames = read(out_xyz, ":")
    assert len(frames) == 8
    np.testing.assert_allclose([a.get_potential_energy() for a in frames], energies, rtol=1e-6)


def test_predict_errors_are_clear(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        main(["predict", str(tmp_path / "missing.pt"), "example"])
    bad = tmp_path / "bad.xyz"
    bad.write_text("2\n\nC 0 0 0\nO 0 0 0.00001\n")
    with pytest.raises(SystemExit, match="apart"):
        main(["predict", "example", str(bad), "--quiet"])
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "CHECKPOINT" in capsys.readouterr().out
