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


# ---------------------------------------------------------------- bad checkpoints, every command

COMMANDS = ("predict", "eval", "relax")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "kind", ["missing", "directory", "empty", "text", "truncated", "bit_flipped", "other_model", "unknown_options", "not_a_dict"]
)
def test_a_bad_checkpoint_is_one_line_naming_the_file(command: str, kind: str, tmp_path: Path, bad_checkpoint) -> None:
    path = bad_checkpoint(kind)
    with pytest.raises(SystemExit) as exc:
        main([command, str(path), "example", "--quiet", "-o", str(tmp_path / "out.extxyz")])
    message = exc.value.code
    assert isinstance(message, str) and message.startswith(f"scn {command}: ")  # exit status 1, not 0
    assert str(path) in message and "\n" not in message
    assert not (tmp_path / "out.extxyz").exists()


def test_a_bad_checkpoint_exits_non_zero_without_a_traceback(tmp_path: Path, bad_checkpoint) -> None:
    import subprocess
    import sys

    path = bad_checkpoint("truncated")
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from spherical_channels.cli import main; sys.exit(main())",
         "predict", str(path), "example", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and str(path) in run.stderr and len(run.stderr.strip().splitlines()) == 1


def _pickled_official_checkpoint(tmp_path: Path) -> Path:
    """The cfg_tiny checkpoint with an object that only full unpickling restores (older
    official trainers pickled such objects into their checkpoints)."""
    import argparse

    import torch

    checkpoint = torch.load(FIXTURES / "cfg_tiny" / "ckpt.pt", weights_only=True)
    checkpoint["config"]["cmd"] = argparse.Namespace(seed=0)
    path = tmp_path / "pickled.pt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_a_pickled_checkpoint_needs_trust_pickle(command: str, tmp_path: Path) -> None:
    path = _pickled_official_checkpoint(tmp_path)
    with pytest.raises(SystemExit, match="--trust-pickle") as exc:
        main([command, str(path), "example", "--quiet"])
    assert str(path) in exc.value.code


def test_trust_pickle_loads_the_checkpoint_and_predicts_as_the_clean_one(tmp_path: Path) -> None:
    from spherical_channels.security import UntrustedPickleWarning

    path = _pickled_official_checkpoint(tmp_path)
    source = _three_with_a_bad_middle(tmp_path)
    source.write_text("\n".join(source.read_text().splitlines()[:4]) + "\n")  # the first structure only
    with pytest.warns(UntrustedPickleWarning):
        assert main(["predict", str(path), str(source), "--trust-pickle", "--quiet", "--json", str(tmp_path / "p.json")]) == 0
    assert main(["predict", str(FIXTURES / "cfg_tiny" / "ckpt.pt"), str(source), "--quiet", "--json", str(tmp_path / "q.json")]) == 0
    trusted = json.loads((tmp_path / "p.json").read_text())["predictions"]
    clean = json.loads((tmp_path / "q.json").read_text())["predictions"]
    assert [p["energy"] for p in trusted] == [p["energy"] for p in clean]


@pytest.mark.parametrize("command", COMMANDS)
def test_trust_pickle_reaches_the_structure_reader(command: str, tmp_path: Path, monkeypatch) -> None:
    """Legacy OC20 LMDBs need the opt-in too: the flag must reach open_structures."""
    from spherical_channels.cli import common

    seen = []

    def spy(path, trust_pickle=False):  # noqa: ANN001, ANN202
        seen.append(trust_pickle)
        raise ValueError(f"{path}: stop here")

    monkeypatch.setattr(common, "open_structures", spy)
    structures = tmp_path / "s.lmdb"
    structures.write_bytes(b"x")
    for flag in ([], ["--trust-pickle"]):
        with pytest.raises(SystemExit, match="stop here"):
            main([command, "example" if command == "predict" else str(FIXTURES / "cfg_tiny" / "ckpt.pt"),
                  str(structures), *flag, "--quiet"])
    assert seen == [False, True]


# ---------------------------------------------------------------- structures that fail, empty input


def _three_with_a_bad_middle(tmp_path: Path) -> Path:
    path = tmp_path / "three.xyz"
    box = 'Lattice="8 0 0 0 8 0 0 0 8" pbc="T T T"'
    path.write_text(f"2\n{box}\nH 0 0 0\nH 0 0 0.74\n2\n{box}\nC 0 0 0\nO 0 0 0.00001\n2\n{box}\nH 0 0 0\nH 0 0 0.8\n")
    return path


def test_a_failing_structure_is_reported_and_the_others_are_predicted(tmp_path: Path) -> None:
    source = _three_with_a_bad_middle(tmp_path)
    out, out_json = tmp_path / "p.extxyz", tmp_path / "new" / "dir" / "p.json"  # --json's directory is created
    with pytest.raises(SystemExit, match=r"1 of 3 structures failed .*structure 1.*apart") as exc:
        main(["predict", "example", str(source), "-o", str(out), "--json", str(out_json), "--batch-size", "3", "--quiet"])
    assert "\n" not in exc.value.code
    report = json.loads(out_json.read_text(), parse_constant=_refuse)
    assert [p["index"] for p in report["predictions"]] == [0, 2]
    assert [f["index"] for f in report["failures"]] == [1]
    frames = read(out, ":")
    assert len(frames) == 2 and [len(a) for a in frames] == [2, 2]
    assert frames[1].positions[1, 2] == pytest.approx(0.8)
    assert not list(tmp_path.glob(".*.partial"))


def test_empty_or_unreadable_structure_files_are_clear(tmp_path: Path) -> None:
    empty, junk = tmp_path / "empty.extxyz", tmp_path / "junk.traj"
    empty.write_text("")
    junk.write_text("not a trajectory")
    for path in (empty, junk):
        with pytest.raises(SystemExit) as exc:
            main(["predict", "example", str(path), "--quiet"])
        assert str(path) in exc.value.code and "\n" not in exc.value.code
    with pytest.raises(SystemExit, match="device 'nonsense' is not usable"):
        main(["predict", "example", "example", "--device", "nonsense"])


def _refuse(token: str) -> None:
    raise AssertionError(f"non-strict JSON token {token}")
