"""`scn data convert | check | stats`, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from spherical_channels.cli import main
from spherical_channels.data import open_dataset, write_dataset


def frames(count: int = 4, seed: int = 0) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        atoms = Atoms("CuCuO", positions=[[0, 0, 0], [1.8, 1.8, 0], [0.9, 0.9, 1.8]], cell=np.eye(3) * 3.6, pbc=True)
        atoms.positions += rng.normal(0, 0.05, (3, 3))
        atoms.set_tags([0, 1, 2])
        atoms.set_constraint(FixAtoms(indices=[0]))
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0 + rng.normal(), forces=rng.normal(size=(3, 3)))
        out.append(atoms)
    return out


def test_convert_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "in.extxyz"
    write_dataset(frames(), src)
    assert main(["data", "convert", str(src), str(tmp_path / "mid.aselmdb"), "--quiet"]) == 0
    assert main(["data", "convert", str(tmp_path / "mid.aselmdb"), str(tmp_path / "out.xyz"), "--quiet"]) == 0
    assert main(["data", "convert", str(tmp_path / "out.xyz"), str(tmp_path / "out.db"), "--quiet"]) == 0
    for got, want in zip(open_dataset(tmp_path / "out.db"), frames()):
        np.testing.assert_array_equal(got.positions, want.positions)
        np.testing.assert_array_equal(got.calc.results["forces"], want.calc.results["forces"])
        assert got.calc.results["energy"] == want.calc.results["energy"]
        np.testing.assert_array_equal(got.get_tags(), [0, 1, 2])
        assert got.constraints[0].get_indices().tolist() == [0]


def test_convert_errors_and_options(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.extxyz"
    bad = frames()
    bad[2].positions[1] = bad[2].positions[0]
    write_dataset(bad, src)
    with pytest.raises(SystemExit, match=r"in\.extxyz: structure 2: atoms 0 and 1 are 0\.00000 Å apart"):
        main(["data", "convert", str(src), str(tmp_path / "o.db"), "--quiet"])
    assert not (tmp_path / "o.db").exists()  # no partial output
    assert main(["data", "convert", str(src), str(tmp_path / "o.db"), "--skip-invalid"]) == 0
    assert "skipped:" in capsys.readouterr().out and len(open_dataset(tmp_path / "o.db")) == 3
    with pytest.raises(SystemExit, match="exists"):
        main(["data", "convert", str(src), str(tmp_path / "o.db"), "--skip-invalid", "--quiet"])
    assert main(["data", "convert", str(src), str(tmp_path / "o.db"), "--skip-invalid", "--overwrite", "--quiet"]) == 0
    with pytest.raises(SystemExit, match="no such file"):
        main(["data", "convert", str(tmp_path / "nope.extxyz"), str(tmp_path / "x.db")])
    with pytest.raises(SystemExit, match="unknown format 'cif'"):
        main(["data", "convert", str(src), str(tmp_path / "x.db"), "--format", "cif", "--skip-invalid"])


def test_convert_with_energy_and_forces_keys(tmp_path: Path) -> None:
    keyed = []
    for atoms in frames():
        atoms.info["REF_energy"] = atoms.calc.results["energy"] * 2
        atoms.new_array("REF_forces", atoms.calc.results["forces"] * 2)
        atoms.calc = None
        keyed.append(atoms)
    write_dataset(keyed, tmp_path / "mace.xyz")
    argv = ["data", "convert", str(tmp_path / "mace.xyz"), str(tmp_path / "o.aselmdb"), "--quiet"]
    assert main(argv + ["--energy-key", "REF_energy", "--forces-key", "REF_forces", "--require-energy"]) == 0
    for got, want in zip(open_dataset(tmp_path / "o.aselmdb"), keyed):
        assert got.calc.results["energy"] == want.info["REF_energy"]
        np.testing.assert_array_equal(got.calc.results["forces"], want.arrays["REF_forces"])


def test_check_lists_every_bad_structure(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.extxyz"
    write_dataset(frames(), good)
    assert main(["data", "check", str(good), "--quiet", "--require-energy", "--require-forces"]) == 0
    bad = frames(5)
    bad[1].numbers[2] = 0
    bad[3].calc = None
    write_dataset(bad, tmp_path / "bad.extxyz")
    assert main(["data", "check", str(tmp_path / "bad.extxyz"), "--quiet", "--require-energy"]) == 1
    out = capsys.readouterr().out
    assert "bad.extxyz: structure 1: unknown element" in out
    assert "bad.extxyz: structure 3: no energy (required)" in out
    assert "5 structures, 2 invalid" in out


def test_stats_json(tmp_path: Path, capsys) -> None:
    write_dataset(frames(6), tmp_path / "s.db")
    out_json = tmp_path / "stats.json"
    with pytest.warns(UserWarning, match="not determined"):  # every structure is Cu2O
        assert main(["data", "stats", str(tmp_path / "s.db"), "--json", str(out_json)]) == 0
    stats = json.loads(out_json.read_text())
    assert stats["num_structures"] == 6 and set(stats["element_energies"]) == {"8", "29"}
    assert "force RMS" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["generate", "convert", "check", "stats"])
def test_help_has_an_example(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["data", command, "--help"])
    assert info.value.code == 0
    assert f"scn data {command}" in capsys.readouterr().out


def test_generate_writes_the_reference_data(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ref"
    assert main(["data", "generate", str(out), "--size", "tiny", "--seed", "1", "--quiet"]) == 0
    assert "dropped" in capsys.readouterr().out
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["seed"] == 1 and set(meta["splits"]) == {"train", "val_id", "test_id", "test_ood_ads", "test_ood_cat", "test_ood_both"}
    assert len(open_dataset(out / "s2ef" / "train.extxyz", require_energy=True, require_forces=True)) > 0
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit, match="scn data generate"):  # a foreign, non-empty directory
        main(["data", "generate", str(tmp_path), "--size", "tiny", "--quiet"])


def test_check_flags_implausible_and_float32_overflowing_targets(tmp_path: Path, capsys) -> None:
    """Targets of 1e30 or 1e39 (inf in float32) passed 'scn data check' and then wrecked
    training; they are now listed, and 1e39 stays an error with the bounds turned off."""
    bad = frames(6)
    bad[1].calc.results["energy"] = 1e30
    bad[2].calc.results["energy"] = -1e39
    bad[3].calc.results["forces"][2, 0] = 1e39
    bad[4].calc.results["forces"][1, 1] = -2e4
    path = tmp_path / "big.extxyz"
    write_dataset(bad, path)
    assert main(["data", "check", str(path), "--quiet", "--require-energy", "--require-forces"]) == 1
    out = capsys.readouterr().out
    assert "big.extxyz: structure 1: implausible energy 1e+30 eV" in out
    assert "big.extxyz: structure 2: energy -1e+39 eV is not finite in float32" in out
    assert "big.extxyz: structure 3: forces not finite in float32" in out
    assert "big.extxyz: structure 4: implausible forces for atoms 1 (largest component 2e+04 eV/Å" in out
    assert "6 structures, 4 invalid" in out
    assert main(["data", "check", str(path), "--quiet", "--max-force", "3e4", "--max-energy-per-atom", "inf"]) == 1
    out = capsys.readouterr().out
    assert "structure 1:" not in out and "structure 4:" not in out
    assert "structure 2: energy -1e+39 eV is not finite in float32" in out and "6 structures, 2 invalid" in out
    with pytest.raises(SystemExit):
        main(["data", "check", str(path), "--max-force", "0"])
    assert "must be > 0" in capsys.readouterr().err


def test_cli_defaults_are_the_validation_constants() -> None:
    """cli/data.py repeats the defaults (importing them would load torch for --help)."""
    from spherical_channels.cli import data as cli_data
    from spherical_channels.data import validation

    assert cli_data.DEFAULT_MAX_ATOMIC_NUMBER == validation.DEFAULT_MAX_ATOMIC_NUMBER
    assert cli_data.MIN_DISTANCE == validation.MIN_DISTANCE
    assert cli_data.MAX_ABS_FORCE == validation.MAX_ABS_FORCE
    assert cli_data.MAX_ABS_ENERGY_PER_ATOM == validation.MAX_ABS_ENERGY_PER_ATOM
